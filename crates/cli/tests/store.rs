//! Images in a real object store (Garage, started here): a checkpoint chain
//! pushed once per distinct chunk, resumed lazily straight from `s3://` in
//! missing and minor mode, cold and warm chunk cache, and eagerly; a
//! corrupted chunk named with its image and pages; the demo's `dir://`
//! store needs no server.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use livepage_netlab::garage::{self, Garage};

fn livepage(env: &[(String, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livepage"));
    c.envs(env.iter().map(|(k, v)| (k, v)));
    c
}

fn kvm_ok(test: &str) -> bool {
    if livepage_testvm::check_host().is_err() {
        livepage_testutil::skip(test, "no /dev/kvm");
        return false;
    }
    true
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A chain of three live checkpoints of a 64 MiB test VM on shmem.
fn checkpoints(dir: &Path) -> std::path::PathBuf {
    let out = livepage(&[])
        .args([
            "vm",
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--workload",
            "dirty",
            "--iterations",
            "40000",
            "--memory",
            "shmem",
            "--checkpoint-every",
            "10000",
            "--json",
            "--checkpoint-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    json(&out);
    dir.join("checkpoint-0003.img")
}

fn resume(env: &[(String, String)], url: &str, extra: &[&str]) -> serde_json::Value {
    let out = livepage(env)
        .args(["vm", "resume", url, "--json"])
        .args(extra)
        .output()
        .unwrap();
    let r = json(&out);
    assert_eq!(r["matches_reference"], true, "{url} {extra:?}: {r}");
    r
}

#[test]
fn a_chain_in_garage_resumes_lazily_in_both_modes_cold_and_warm() {
    if !kvm_ok("store_garage") {
        return;
    }
    if garage::binary().is_none() {
        livepage_testutil::skip(
            "store_garage",
            "garage is not installed (cargo install garage --locked)",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let g = Garage::single(&d.path().join("garage")).unwrap();
    let env = g.env();
    let head = checkpoints(&d.path().join("ck"));
    let url = format!("s3://{}/fleet", g.bucket);

    let p = json(
        &livepage(&env)
            .args(["push", "--json"])
            .arg(&head)
            .arg(&url)
            .output()
            .unwrap(),
    );
    let images = p["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    // Deltas share what did not change (here: the zero spans' absence and
    // the unchanged spans), and pushing again sends nothing.
    let again = json(
        &livepage(&env)
            .args(["push", "--json"])
            .arg(&head)
            .arg(&url)
            .output()
            .unwrap(),
    );
    assert_eq!(again["chunks_new"], 0, "{again}");
    let ls = json(
        &livepage(&env)
            .args(["ls", "--json", &url])
            .output()
            .unwrap(),
    );
    assert_eq!(ls["images"].as_array().unwrap().len(), 3);
    assert_eq!(ls["chunks"], p["chunks_new"]);

    let img = format!("{url}/checkpoint-0002.img");
    let cache = d.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    // Cold cache, missing mode: every chunk comes from the store.
    let cold = resume(&env, &img, &["--lazy", "--chunk-cache", cache_arg]);
    assert!(cold["store"]["from_store"].as_u64().unwrap() > 0, "{cold}");
    // Warm cache, minor mode: none does.
    let warm = resume(
        &env,
        &img,
        &[
            "--lazy",
            "--mode",
            "minor",
            "--memory",
            "shmem",
            "--chunk-cache",
            cache_arg,
        ],
    );
    assert_eq!(warm["store"]["from_store"], 0, "{warm}");
    assert!(warm["store"]["from_cache"].as_u64().unwrap() > 0, "{warm}");
    // Cold again in minor mode, and an eager load.
    resume(
        &env,
        &img,
        &[
            "--lazy",
            "--mode",
            "minor",
            "--memory",
            "shmem",
            "--no-chunk-cache",
        ],
    );
    resume(&env, &format!("{url}/checkpoint-0003.img"), &[]);

    let v = json(
        &livepage(&env)
            .args(["verify", "--json", &img])
            .output()
            .unwrap(),
    );
    assert_eq!(v["ok"], true);
    let pulled = d.path().join("pulled.img");
    json(
        &livepage(&env)
            .args(["pull", "--json", &img])
            .arg(&pulled)
            .output()
            .unwrap(),
    );
    resume(&env, pulled.to_str().unwrap(), &[]);
    // Nothing unnamed: gc keeps every chunk.
    let gc = json(
        &livepage(&env)
            .args(["gc", "--json", "--min-age", "0", &url])
            .output()
            .unwrap(),
    );
    assert_eq!(gc["deleted"], 0, "{gc}");
}

#[test]
fn a_corrupt_chunk_fails_the_restore_naming_image_chunk_and_pages() {
    if !kvm_ok("store_corrupt") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let head = checkpoints(&d.path().join("ck"));
    let root = d.path().join("store");
    let url = format!("dir://{}", root.display());
    json(
        &livepage(&[])
            .args(["push", "--json"])
            .arg(&head)
            .arg(&url)
            .output()
            .unwrap(),
    );
    // Flip a byte in the middle of every chunk of guest pages (the VM
    // state's and the span list's are left alone: the restore gets to its
    // pages).
    let img = format!("{url}/checkpoint-0003.img");
    let body = json(
        &livepage(&[])
            .args(["inspect", "--json", &img])
            .output()
            .unwrap(),
    );
    let state = body["vm_state"].as_str().unwrap().to_string();
    let spans = body["spans"].as_str().unwrap().to_string();
    let chunks: Vec<_> = walk(&root.join("chunks"))
        .into_iter()
        .filter(|p| !p.ends_with(&state) && !p.ends_with(&spans))
        .collect();
    assert!(!chunks.is_empty());
    for c in &chunks {
        let mut b = std::fs::read(c).unwrap();
        let n = b.len();
        b[n / 2] ^= 0x20;
        std::fs::write(c, b).unwrap();
    }
    let out = livepage(&[])
        .args(["vm", "resume", &img, "--lazy", "--no-chunk-cache"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint-0003.img")
            && err.contains("region 0, pages")
            && err.contains("hash"),
        "{err}"
    );
    let out = livepage(&[]).args(["verify", &img]).output().unwrap();
    assert!(!out.status.success());
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// Three Garage nodes with replication 3 across the lab's two namespaces
/// (the restoring host talks to the one beside it); one of the others is
/// killed during a lazy restore, which completes to the right checksum;
/// then the node the host talks to is killed during another, whose pages
/// fail closed once the store stays unreachable past the deadline, the
/// error naming the store and the chunk.
#[test]
fn a_three_node_store_survives_a_dead_node_and_fails_closed_when_gone() {
    if !kvm_ok("store_cluster") {
        return;
    }
    if let Some(why) = livepage_netlab::Lab::available() {
        livepage_testutil::skip("store_cluster", &why);
        return;
    }
    if garage::binary().is_none() {
        livepage_testutil::skip(
            "store_cluster",
            "garage is not installed (cargo install garage --locked)",
        );
        return;
    }
    let lab = livepage_netlab::Lab::new().unwrap();
    lab.shape(1000, 20).unwrap();
    let d = tempfile::tempdir().unwrap();
    let node = |ns: &str, ip, port| garage::NodeSpec {
        netns: Some(ns.to_string()),
        ip: std::net::IpAddr::V4(ip),
        port,
    };
    let mut g = Garage::start(
        &d.path().join("garage"),
        &[
            node(&lab.b, lab.addr_b, 3900),
            node(&lab.b, lab.addr_b, 3910),
            node(&lab.a, lab.addr_a, 3900),
        ],
        3,
        2,
    )
    .unwrap();
    let env = g.env();
    let head = checkpoints(&d.path().join("ck"));
    let url = format!("s3://{}/cluster", g.bucket);
    let in_a = |args: &[&str]| {
        let mut c = lab.command(&lab.a, env!("CARGO_BIN_EXE_livepage"));
        c.envs(env.iter().map(|(k, v)| (k, v))).args(args);
        c
    };
    let push = in_a(&["push", "--json", head.to_str().unwrap(), &url])
        .output()
        .unwrap();
    json(&push);
    let img = format!("{url}/checkpoint-0002.img");

    // A node the host does not talk to dies mid-restore.
    let child = in_a(&["vm", "resume", &img, "--lazy", "--no-chunk-cache", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    g.kill(0);
    let r = json(&child.wait_with_output().unwrap());
    assert_eq!(r["matches_reference"], true, "{r}");

    // The node it talks to dies: pages fail closed after the deadline.
    let t0 = std::time::Instant::now();
    let child = in_a(&[
        "vm",
        "resume",
        &img,
        "--lazy",
        "--no-chunk-cache",
        "--prefetch",
        "none",
        "--store-deadline",
        "2",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    g.kill(2);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("fail-closed error: {err}");
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("s3://livepage/cluster") && err.contains("chunks/"),
        "the error names the store and the chunk: {err}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        t0.elapsed()
    );
}

/// Bad addresses and store options given to a local image are refused
/// with what to write instead; no store is needed.
#[test]
fn bad_addresses_and_misplaced_store_options_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.img");
    std::fs::write(&img, b"not an image").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["ls".into(), "dir://relative/path".into()],
            "absolute path",
        ),
        (
            vec!["ls".into(), "http://host/x".into()],
            "starts with dir://",
        ),
        (
            vec!["ls".into(), format!("dir://{}/none", d.path().display())],
            "livepage push",
        ),
        (
            vec![
                "inspect".into(),
                img.display().to_string(),
                "--store-deadline".into(),
                "5".into(),
            ],
            "--store-deadline applies to an image in a store",
        ),
        (
            vec![
                "vm".into(),
                "resume".into(),
                img.display().to_string(),
                "--lazy".into(),
                "--no-chunk-cache".into(),
            ],
            "apply to an image in a store",
        ),
        (
            vec!["pull".into(), img.display().to_string(), "out.img".into()],
            "is not a store address",
        ),
        (
            vec!["push".into(), img.display().to_string(), "s3://".into()],
            "names a bucket",
        ),
    ];
    for (args, want) in cases {
        let out = livepage(&[]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A working set recorded while resuming from a store is replayed first by
/// the next resume from it (the store has no file beside the image: the
/// working set is named).
#[test]
fn a_recorded_working_set_replays_from_a_store() {
    if !kvm_ok("store_working_set") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let head = checkpoints(&d.path().join("ck"));
    let url = format!("dir://{}", d.path().join("store").display());
    json(
        &livepage(&[])
            .args(["push", "--json"])
            .arg(&head)
            .arg(&url)
            .output()
            .unwrap(),
    );
    let img = format!("{url}/checkpoint-0002.img");
    let ws = d.path().join("ws");
    let ws_arg = ws.to_str().unwrap();
    let cache = d.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    resume(
        &[],
        &img,
        &[
            "--lazy",
            "--record-working-set",
            "--working-set",
            ws_arg,
            "--chunk-cache",
            cache_arg,
        ],
    );
    assert!(std::fs::metadata(&ws).unwrap().len() > 0);
    let r = resume(
        &[],
        &img,
        &[
            "--lazy",
            "--prefetch",
            "recorded",
            "--working-set",
            ws_arg,
            "--chunk-cache",
            cache_arg,
        ],
    );
    assert_eq!(r["store"]["from_store"], 0, "{r}");
    // Without naming it, recording is refused.
    let out = livepage(&[])
        .args(["vm", "resume", &img, "--lazy", "--record-working-set"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--working-set"));
}
