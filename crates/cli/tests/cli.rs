//! The command line end to end: a live snapshot of the test VM resumed to the
//! same checksum; corrupted, truncated and foreign images rejected clearly.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::process::Command;

fn livepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livepage"))
}

fn kvm_ok() -> bool {
    if livepage_testvm::check_host().is_err() {
        livepage_testutil::skip("cli", "no /dev/kvm");
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

fn snapshot(dir: &std::path::Path, memory: &str) -> std::path::PathBuf {
    let img = dir.join(format!("{memory}.img"));
    let out = livepage()
        .args([
            "vm",
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--iterations",
            "30000",
            "--snapshot-at",
            "10000",
            "--buffer",
            "1M",
            "--json",
            "--memory",
            memory,
            "--snapshot-out",
        ])
        .arg(&img)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["matches_reference"], true);
    assert!(v["snapshot"]["stats"]["pages"].as_u64().unwrap() > 0);
    img
}

#[test]
fn live_snapshot_then_resume_reaches_the_same_checksum() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for memory in ["anon", "shmem"] {
        let img = snapshot(dir.path(), memory);
        let v = json(
            &livepage()
                .args(["vm", "resume", "--json"])
                .arg(&img)
                .output()
                .unwrap(),
        );
        assert_eq!(v["matches_reference"], true, "{v}");
        assert_eq!(v["resumed_from_steps"][0].as_u64().unwrap() / 1024, 10);
        let v = json(
            &livepage()
                .args(["inspect", "--json"])
                .arg(&img)
                .output()
                .unwrap(),
        );
        assert_eq!(v["vm_state"]["vcpus"], 2);
        json(
            &livepage()
                .args(["verify", "--json"])
                .arg(&img)
                .output()
                .unwrap(),
        );
    }
    // Never over an existing image.
    let img = dir.path().join("anon.img");
    let out = livepage()
        .args([
            "vm",
            "run",
            "--mem",
            "64M",
            "--iterations",
            "3000",
            "--snapshot-at",
            "1000",
            "--snapshot-out",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn damaged_images_are_rejected_with_a_clear_message() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = snapshot(dir.path(), "anon");
    let v = json(
        &livepage()
            .args(["inspect", "--json"])
            .arg(&img)
            .output()
            .unwrap(),
    );
    let data_offset = v["regions"][0]["data_offset"].as_u64().unwrap();
    // Find a stored page and flip a byte in it.
    let reader = livepage_image::Image::open(&img).unwrap();
    let page = (0..reader.pages())
        .find(|p| reader.page_state(*p).unwrap().0 == livepage_image::PageState::Data)
        .unwrap();
    drop(reader);
    let offset = data_offset + page * 4096 + 17;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    let out = livepage().arg("verify").arg(&img).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("page {page} ")) && err.contains(&format!("{:#x}", offset - 17)),
        "{err}"
    );
    let out = livepage()
        .args(["vm", "resume"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
    // Truncated.
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    for cmd in [&["inspect"][..], &["verify"], &["vm", "resume"]] {
        let out = livepage().args(cmd).arg(&img).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("truncated"), "{cmd:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Not an image at all.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"hello, this is not an image").unwrap();
    let out = livepage().arg("inspect").arg(&junk).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a livepage image"));
}

#[test]
fn requests_the_host_cannot_hold_are_refused() {
    if !kvm_ok() {
        return;
    }
    let out = livepage()
        .args(["vm", "run", "--mem", "120G", "--workload", "touch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("available") || err.contains("exceeds"),
        "{err}"
    );
    let out = livepage()
        .args(["vm", "run", "--mem", "3M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid VM spec"));
}

#[test]
fn probe_json_reports_the_features_the_engines_need() {
    let v = json(&livepage().args(["probe", "--json"]).output().unwrap());
    let feats: Vec<String> = v["kernel"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    for f in [
        "WP_ASYNC",
        "MINOR_SHMEM",
        "MINOR_HUGETLBFS",
        "MOVE",
        "POISON",
    ] {
        if !feats.iter().any(|x| x == f) {
            livepage_testutil::skip("probe_json", &format!("kernel lacks {f}"));
            return;
        }
    }
    assert_eq!(v["kernel"]["pagemap_scan"], true);
}

/// Run as nobody, the probe explains the permission problem and fails.
#[test]
fn probe_explains_missing_permission() {
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        livepage_testutil::skip("probe_unprivileged", "setpriv not installed");
        return;
    }
    let bin = std::env::temp_dir().join(format!("livepage-probe-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_livepage"), &bin).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .arg("probe")
        .output()
        .unwrap();
    // The test VM without access to /dev/kvm says so and fails.
    let vm = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args(["vm", "run", "--mem", "64M"])
        .output()
        .unwrap();
    let vm_err = String::from_utf8_lossy(&vm.stderr).to_string();
    std::fs::remove_file(&bin).ok();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("setpriv:") {
        livepage_testutil::skip("probe_unprivileged", "cannot drop privileges here");
        return;
    }
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("/dev/userfaultfd")
            && text.contains("vm.unprivileged_userfaultfd")
            && text.contains("CAP_SYS_PTRACE"),
        "{text}"
    );
    assert!(text.contains("KVM"), "{text}");
    assert!(!vm.status.success(), "{vm_err}");
    assert!(vm_err.contains("/dev/kvm"), "{vm_err}");
}

/// A checkpoint chain of the running VM: resume from a middle checkpoint and
/// from the merged chain reaches the same checksum; a missing parent is named;
/// nothing is written over an existing image.
#[test]
fn checkpoint_chain_resume_merge_and_broken_chain() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let run = || {
        livepage()
            .args([
                "vm",
                "run",
                "--mem",
                "64M",
                "--vcpus",
                "2",
                "--iterations",
                "20000",
                "--checkpoint-every",
                "5000",
                "--json",
                "--checkpoint-dir",
            ])
            .arg(&ck)
            .output()
            .unwrap()
    };
    let v = json(&run());
    assert_eq!(v["matches_reference"], true);
    let cps = v["checkpoints"].as_array().unwrap();
    assert!(cps.len() >= 3, "{v}");
    assert!(cps[0]["parent"].is_null() && !cps[1]["parent"].is_null());
    let middle = ck.join("checkpoint-0002.img");
    let r = json(
        &livepage()
            .args(["vm", "resume", "--json"])
            .arg(&middle)
            .output()
            .unwrap(),
    );
    assert_eq!(r["matches_reference"], true, "{r}");
    let v = json(
        &livepage()
            .args(["verify", "--json"])
            .arg(ck.join("checkpoint-0003.img"))
            .output()
            .unwrap(),
    );
    assert_eq!(v["chain_length"], 3);
    let merged = dir.path().join("merged.img");
    json(
        &livepage()
            .args(["merge", "--json", "--out"])
            .arg(&merged)
            .arg(ck.join("checkpoint-0003.img"))
            .output()
            .unwrap(),
    );
    let r = json(
        &livepage()
            .args(["vm", "resume", "--json"])
            .arg(&merged)
            .output()
            .unwrap(),
    );
    assert_eq!(r["matches_reference"], true);
    // Never over existing images.
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // A missing parent is named, by verify and by resume.
    std::fs::remove_file(ck.join("checkpoint-0001.img")).unwrap();
    for cmd in [&["verify"][..], &["vm", "resume"]] {
        let out = livepage().args(cmd).arg(&middle).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("parent image") && err.contains("missing"),
            "{cmd:?}: {err}"
        );
    }
}

/// Checkpoints through the synchronous write-protect backend and through
/// KVM's dirty log give chains that resume to the same checksum.
#[test]
fn checkpoint_chains_with_every_tracker() {
    if !kvm_ok() {
        return;
    }
    for tracker in ["sync-wp", "kvm-dirty-log"] {
        let dir = tempfile::tempdir().unwrap();
        let v = json(
            &livepage()
                .args([
                    "vm",
                    "run",
                    "--mem",
                    "64M",
                    "--iterations",
                    "12000",
                    "--checkpoint-every",
                    "4000",
                    "--json",
                    "--tracker",
                    tracker,
                    "--checkpoint-dir",
                ])
                .arg(dir.path())
                .output()
                .unwrap(),
        );
        assert_eq!(v["matches_reference"], true);
        let r = json(
            &livepage()
                .args(["vm", "resume", "--json"])
                .arg(dir.path().join("checkpoint-0002.img"))
                .output()
                .unwrap(),
        );
        assert_eq!(r["matches_reference"], true, "{tracker}: {r}");
    }
}

#[test]
fn lazy_resume_in_every_mode_and_policy_reaches_the_same_checksum() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = snapshot(dir.path(), "shmem");
    let resume = |extra: &[&str]| {
        json(
            &livepage()
                .args(["vm", "resume", "--json", "--lazy"])
                .args(extra)
                .arg(&img)
                .output()
                .unwrap(),
        )
    };
    // Missing mode records the working set; minor mode replays it.
    let v = resume(&[
        "--mode",
        "missing",
        "--handlers",
        "2",
        "--uffds",
        "2",
        "--record-working-set",
    ]);
    assert_eq!(v["matches_reference"], true, "{v}");
    let first = v["restore"]["faults_served"].as_u64().unwrap();
    assert!(first > 0, "{v}");
    assert!(v["seconds_until_vcpus_run"].as_f64().unwrap() < 1.0);
    let hist: u64 = v["restore"]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(hist, first, "the histogram counts every served fault");
    let mut wset = img.clone().into_os_string();
    wset.push(".wset");
    assert!(std::path::Path::new(&wset).exists());
    let mut faults = std::collections::HashMap::new();
    for (mode, prefetch) in [
        ("minor", "recorded"),
        ("minor", "none"),
        ("missing", "sequential"),
    ] {
        let v = resume(&["--mode", mode, "--prefetch", prefetch]);
        assert_eq!(v["matches_reference"], true, "{mode} {prefetch}: {v}");
        assert_eq!(v["restore"]["mode"], mode);
        faults.insert(prefetch, v["restore"]["faults_served"].as_u64().unwrap());
    }
    // Replaying the working set spares the guest most of its faults.
    assert!(faults["recorded"] < faults["none"], "{faults:?}");
    // Minor mode needs memory with a page cache.
    let out = livepage()
        .args([
            "vm", "resume", "--lazy", "--mode", "minor", "--memory", "anon",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("minor mode needs shmem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A damaged working set is refused by name.
    std::fs::write(&wset, b"LPWSET\0\0garbage").unwrap();
    let out = livepage()
        .args(["vm", "resume", "--lazy", "--prefetch", "recorded"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a usable working set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_page_corrupted_on_disk_fails_a_lazy_resume_closed() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = snapshot(dir.path(), "anon");
    // Flip a byte inside the first stored page of guest data.
    let image = livepage_image::Image::open(&img).unwrap();
    let data_page = (0..image.pages())
        .rev()
        .find(|g| {
            matches!(
                image.page_state(*g),
                Some((livepage_image::PageState::Data, _))
            )
        })
        .unwrap();
    let off = image.page_offset(0, data_page) + 100;
    drop(image);
    let f = std::fs::File::options().write(true).open(&img).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&img).unwrap(), &mut b, off)
        .unwrap();
    f.write_all_at(&[b[0] ^ 0xff], off).unwrap();
    let t0 = std::time::Instant::now();
    let out = livepage()
        .args(["vm", "resume", "--lazy"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
}
