//! Live migration of the test VM between two network namespaces (the
//! `livepage-netlab` harness: veth, tc tbf, a relay for latency and cuts),
//! `vm run --migrate-to` in one and `vm receive` in the other: the
//! migrated guest's final checksum equals the host reference for every
//! method, both post-copy modes, anon/shmem/hugetlb, compression on and
//! off, TLS; each kind of cut during pre-copy leaves the guest running at
//! the source; during post-copy the link recovers with no command given;
//! past the recovery timeout the destination fails closed and the source
//! resumes the guest; a peer without valid credentials moves no page.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use livepage_netlab::{Cut, Lab};

const BIN: &str = env!("CARGO_BIN_EXE_livepage");

fn lab(test: &str) -> Option<Lab> {
    if let Some(why) = Lab::available() {
        livepage_testutil::skip(test, &why);
        return None;
    }
    if !livepage_uffd::probe::capabilities().access.full() {
        livepage_testutil::skip(test, "no full userfaultfd");
        return None;
    }
    if livepage_testvm::check_host().is_err() {
        livepage_testutil::skip(test, "no KVM");
        return None;
    }
    Some(Lab::new().unwrap())
}

/// A process in a namespace, its output lines as they come.
struct Proc {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
    name: &'static str,
}

impl Proc {
    fn start(lab: &Lab, ns: &str, name: &'static str, args: &[String]) -> Proc {
        let mut child = lab
            .command(ns, BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, out) = channel();
        let o = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(o).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (tx, err) = channel();
        let e = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                eprintln!("{name}: {l}");
                let _ = tx.send(l);
            }
        });
        Proc {
            child,
            out,
            err,
            name,
        }
    }

    /// Waits for a stderr line containing `what`.
    fn wait_line(&self, what: &str, limit: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            match self.err.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("{}: no line with {what:?} within {limit:?}", self.name),
            }
        }
    }

    /// Waits for the exit; its code and the JSON it printed.
    fn finish(mut self, limit: Duration) -> (i32, serde_json::Value) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < limit,
                "{} did not exit within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        let text: Vec<String> = self.out.try_iter().collect();
        let json = serde_json::from_str(&text.join("\n")).unwrap_or(serde_json::Value::Null);
        (status.code().unwrap_or(-1), json)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

struct Run<'a> {
    memory: &'a str,
    mode: &'a str,
    method: &'a str,
    compress: &'a str,
    tls: bool,
    extra_src: Vec<String>,
    extra_dst: Vec<String>,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Run {
            memory: "anon",
            mode: "missing",
            method: "hybrid",
            compress: "none",
            tls: true,
            extra_src: vec![],
            extra_dst: vec![],
        }
    }
}

const VM: &[&str] = &[
    "--mem",
    "64M",
    "--vcpus",
    "1",
    "--iterations",
    "40000",
    "--seed",
    "5",
];

fn start_pair(
    lab: &Lab,
    creds: &std::path::Path,
    r: &Run,
    via: Option<std::net::SocketAddr>,
) -> (Proc, Proc) {
    let security = |tls: bool| {
        if tls {
            vec!["--tls-creds".to_string(), creds.display().to_string()]
        } else {
            vec!["--insecure".to_string()]
        }
    };
    let dst_mem = if r.mode == "minor" && r.memory == "anon" {
        "shmem"
    } else {
        r.memory
    };
    let mut dargs = s(&[
        "vm",
        "receive",
        "--listen",
        &lab.sock_b(7000).to_string(),
        "--memory",
        dst_mem,
        "--mode",
        r.mode,
        "--json",
    ]);
    dargs.extend(security(r.tls));
    dargs.extend(r.extra_dst.iter().cloned());
    let dest = Proc::start(lab, &lab.b, "dest", &dargs);
    dest.wait_line("listening on", Duration::from_secs(20));
    let to = via.unwrap_or(lab.sock_b(7000));
    let mut sargs = s(&["vm", "run"]);
    sargs.extend(s(VM));
    sargs.extend(s(&[
        "--memory",
        r.memory,
        "--migrate-to",
        &to.to_string(),
        "--migrate-at",
        "8000",
        "--migration",
        r.method,
        "--compress",
        r.compress,
        "--json",
    ]));
    sargs.extend(security(r.tls));
    sargs.extend(r.extra_src.iter().cloned());
    let src = Proc::start(lab, &lab.a, "source", &sargs);
    (src, dest)
}

fn creds() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let st = std::process::Command::new(BIN)
        .args(["tls-creds", "--out"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(st.status.success());
    d
}

/// One migration that must succeed: both sides exit 0, the destination's
/// memory matches the reference.
fn migrate_ok(
    lab: &Lab,
    creds: &std::path::Path,
    r: &Run,
) -> (serde_json::Value, serde_json::Value) {
    let (src, dest) = start_pair(lab, creds, r, None);
    let (sc, sj) = src.finish(Duration::from_secs(120));
    let (dc, dj) = dest.finish(Duration::from_secs(120));
    assert_eq!(
        (sc, dc),
        (0, 0),
        "{} {} {}: source {sj} dest {dj}",
        r.method,
        r.memory,
        r.mode
    );
    assert_eq!(dj["matches_reference"], true, "{dj}");
    (sj, dj)
}

#[test]
fn every_method_mode_memory_and_codec_reaches_the_reference() {
    let Some(lab) = lab("migrate_every_method") else {
        return;
    };
    lab.shape(1000, 20).unwrap();
    let c = creds();
    let cases = [
        ("stop-and-copy", "anon", "missing", "none", false),
        ("precopy", "anon", "missing", "lz4", true),
        ("postcopy", "anon", "missing", "zstd", true),
        ("hybrid", "anon", "missing", "auto", true),
        ("postcopy", "shmem", "minor", "none", true),
        ("hybrid", "shmem", "minor", "lz4", true),
        ("hybrid", "hugetlb", "minor", "zstd", true),
        ("postcopy", "hugetlb", "missing", "none", true),
    ];
    for (method, memory, mode, compress, tls) in cases {
        let (sj, dj) = migrate_ok(
            &lab,
            c.path(),
            &Run {
                memory,
                mode,
                method,
                compress,
                tls,
                ..Run::default()
            },
        );
        let m = &sj["migration"]["report"];
        assert_eq!(m["tls"], tls);
        let postcopy_pages = m["postcopy_pages"].as_u64().unwrap();
        if method == "postcopy" || method == "hybrid" {
            // Each post-copy page crossed once: pushed or on demand.
            let sent = m["pushed_pages"].as_u64().unwrap() + m["demanded_pages"].as_u64().unwrap();
            assert!(sent <= postcopy_pages, "{m}");
            let ratio = m["postcopy_bytes_per_page_bytes"].as_f64().unwrap();
            if compress == "none" {
                assert!(ratio <= 1.05, "{method} {memory}: {ratio}");
            }
        } else {
            assert_eq!(postcopy_pages, 0);
        }
        if compress == "lz4" || compress == "zstd" {
            assert!(m["compression_ratio"].as_f64().unwrap() < 0.5, "{m}");
        }
        eprintln!(
            "{method} {memory} {mode} {compress}: downtime {} ms, total {} ms, remote faults {}",
            m["downtime_ms"], m["total_ms"], dj["migration_report"]["remote_faults"]
        );
    }
}

#[test]
fn a_peer_without_valid_credentials_moves_no_page() {
    let Some(lab) = lab("migrate_bad_credentials") else {
        return;
    };
    let good = creds();
    let other = creds(); // another CA
    let mut dargs = s(&[
        "vm",
        "receive",
        "--listen",
        &lab.sock_b(7000).to_string(),
        "--json",
        "--tls-creds",
    ]);
    dargs.push(good.path().display().to_string());
    let dest = Proc::start(&lab, &lab.b, "dest", &dargs);
    dest.wait_line("listening on", Duration::from_secs(20));
    for creds in [Some(other.path()), None] {
        let mut sargs = s(&["vm", "run"]);
        sargs.extend(s(VM));
        sargs.extend(s(&[
            "--migrate-to",
            &lab.sock_b(7000).to_string(),
            "--migrate-at",
            "8000",
            "--json",
        ]));
        match creds {
            Some(p) => sargs.extend(["--tls-creds".to_string(), p.display().to_string()]),
            None => sargs.push("--insecure".into()),
        }
        let src = Proc::start(&lab, &lab.a, "source", &sargs);
        let (code, sj) = src.finish(Duration::from_secs(60));
        // Refused at the handshake: the guest ran on and finished there.
        assert_eq!(code, 2, "{sj}");
        assert_eq!(sj["matches_reference"], true);
        assert_eq!(sj["migration"]["migrated"], false);
        dest.wait_line("refused a peer", Duration::from_secs(10));
    }
    // The destination never took a migration and still waits.
    assert!(
        dest.err
            .try_iter()
            .all(|l| !l.contains("receiving migration"))
    );
    let mut dest = dest;
    assert!(
        dest.child.try_wait().unwrap().is_none(),
        "the destination must go on listening"
    );
    // And then takes a good one.
    let mut sargs = s(&["vm", "run"]);
    sargs.extend(s(VM));
    sargs.extend(s(&[
        "--migrate-to",
        &lab.sock_b(7000).to_string(),
        "--migrate-at",
        "8000",
        "--json",
        "--tls-creds",
    ]));
    sargs.push(good.path().display().to_string());
    let src = Proc::start(&lab, &lab.a, "source", &sargs);
    assert_eq!(src.finish(Duration::from_secs(60)).0, 0);
    let (dc, dj) = dest.finish(Duration::from_secs(60));
    assert_eq!(
        (dc, &dj["matches_reference"]),
        (0, &serde_json::Value::Bool(true))
    );
}

fn slow_link(lab: &Lab) -> livepage_netlab::Relay {
    // 100 Mbit/s and 2 ms each way: ~40 MB of guest memory takes seconds.
    lab.shape(100, 20).unwrap();
    lab.relay(lab.sock_a(7001), lab.sock_b(7000), Duration::from_millis(2))
        .unwrap()
}

#[test]
fn a_cut_during_precopy_leaves_the_guest_running_at_the_source() {
    let Some(lab) = lab("migrate_cut_precopy") else {
        return;
    };
    let c = creds();
    for cut in [Cut::Drop, Cut::Reset, Cut::HalfOpen] {
        let relay = slow_link(&lab);
        let r = Run {
            method: "precopy",
            extra_src: s(&["--max-rounds", "50"]),
            ..Run::default()
        };
        let (src, dest) = start_pair(&lab, c.path(), &r, Some(relay.addr()));
        dest.wait_line("receiving migration", Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(500));
        relay.cut(cut);
        let (sc, sj) = src.finish(Duration::from_secs(60));
        assert_eq!(sc, 2, "{cut:?}: {sj}");
        assert_eq!(sj["matches_reference"], true, "{cut:?}: {sj}");
        let err = sj["migration"]["error"].as_str().unwrap_or("");
        assert!(
            err.contains("Precopy") && err.contains("runs on here"),
            "{err}"
        );
        let (dc, _) = dest.finish(Duration::from_secs(30));
        assert_ne!(dc, 0, "{cut:?}: the destination must fail");
        drop(relay);
    }
}

#[test]
fn a_cut_during_postcopy_recovers_with_no_command() {
    let Some(lab) = lab("migrate_cut_postcopy") else {
        return;
    };
    let c = creds();
    for cut in [Cut::Drop, Cut::Reset, Cut::HalfOpen] {
        let relay = slow_link(&lab);
        let r = Run {
            method: "postcopy",
            extra_src: s(&["--recovery-timeout", "30"]),
            extra_dst: s(&["--recovery-timeout", "30"]),
            ..Run::default()
        };
        let (src, dest) = start_pair(&lab, c.path(), &r, Some(relay.addr()));
        dest.wait_line("resumed here", Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(300));
        let cut_at = unix_ms();
        relay.cut(cut);
        std::thread::sleep(Duration::from_secs(2));
        let heal_at = unix_ms();
        relay.heal();
        let (sc, sj) = src.finish(Duration::from_secs(90));
        let (dc, dj) = dest.finish(Duration::from_secs(90));
        assert_eq!((sc, dc), (0, 0), "{cut:?}: {sj} {dj}");
        assert_eq!(dj["matches_reference"], true);
        let m = &sj["migration"]["report"];
        let ev = &m["recovery_events"][0];
        let detected = ev["detected_unix_ms"].as_f64().unwrap();
        let recovered = ev["recovered_unix_ms"].as_f64().unwrap();
        // Found within a second; working again within a second of the heal.
        assert!(
            detected - cut_at <= 1000.0,
            "{cut:?}: detected after {} ms",
            detected - cut_at
        );
        assert!(
            recovered - heal_at <= 1000.0,
            "{cut:?}: recovered {} ms after the heal",
            recovered - heal_at
        );
        eprintln!(
            "{cut:?}: detected in {:.0} ms, recovered {:.0} ms after the heal, {} pages resent",
            detected - cut_at,
            recovered - heal_at,
            m["resent_pages"]
        );
        drop(relay);
    }
}

#[test]
fn a_second_cut_during_recovery_is_survived() {
    let Some(lab) = lab("migrate_second_cut") else {
        return;
    };
    let c = creds();
    let relay = slow_link(&lab);
    let r = Run {
        method: "postcopy",
        ..Run::default()
    };
    let (src, dest) = start_pair(&lab, c.path(), &r, Some(relay.addr()));
    dest.wait_line("resumed here", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    relay.cut(Cut::Reset);
    std::thread::sleep(Duration::from_millis(1500));
    // Back just long enough for the reconnect to start, then gone again.
    relay.heal();
    std::thread::sleep(Duration::from_millis(150));
    relay.cut(Cut::Drop);
    std::thread::sleep(Duration::from_millis(1500));
    relay.heal();
    let (sc, sj) = src.finish(Duration::from_secs(90));
    let (dc, dj) = dest.finish(Duration::from_secs(90));
    assert_eq!((sc, dc), (0, 0), "{sj} {dj}");
    assert_eq!(dj["matches_reference"], true);
}

#[test]
fn past_the_recovery_timeout_the_destination_fails_closed_and_the_source_resumes() {
    let Some(lab) = lab("migrate_recovery_timeout") else {
        return;
    };
    let c = creds();
    let relay = slow_link(&lab);
    let r = Run {
        method: "postcopy",
        extra_src: s(&["--recovery-timeout", "2"]),
        extra_dst: s(&["--recovery-timeout", "2"]),
        ..Run::default()
    };
    let (src, dest) = start_pair(&lab, c.path(), &r, Some(relay.addr()));
    dest.wait_line("resumed here", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    relay.cut(Cut::Drop);
    let (dc, _) = dest.finish(Duration::from_secs(30));
    assert_ne!(dc, 0, "the destination must fail closed");
    let (sc, sj) = src.finish(Duration::from_secs(60));
    assert_eq!(sc, 2, "{sj}");
    assert_eq!(
        sj["matches_reference"], true,
        "the source resumed the guest to the right end: {sj}"
    );
    let err = sj["migration"]["error"].as_str().unwrap_or("");
    assert!(err.contains("resumed here"), "{err}");
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}
