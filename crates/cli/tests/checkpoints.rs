//! Live checkpoints of the test VM: on every memory type, with both trackers
//! that save live, every checkpoint of the chain resumes to the
//! uninterrupted run's checksum; the vCPUs' pause is the harvest plus the
//! state save plus a few milliseconds; the buffer's bound does not change
//! the pause; no temporary file is left behind.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn livepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livepage"))
}

fn kvm_ok() -> bool {
    if livepage_testvm::check_host().is_err() {
        livepage_testutil::skip("checkpoints", "no /dev/kvm");
        return false;
    }
    if !livepage_uffd::probe::capabilities().wp_handover {
        livepage_testutil::skip("checkpoints", "no WP_ASYNC hand-over (livepage probe)");
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

fn chain(dir: &Path, memory: &str, tracker: &str, extra: &[&str]) -> serde_json::Value {
    json(
        &livepage()
            .args([
                "vm",
                "run",
                "--mem",
                "64M",
                "--iterations",
                "16000",
                "--checkpoint-every",
                "4000",
                "--json",
                "--memory",
                memory,
                "--tracker",
                tracker,
            ])
            .args(extra)
            .arg("--checkpoint-dir")
            .arg(dir)
            .output()
            .unwrap(),
    )
}

fn no_temporary_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp"), "left behind: {name}");
    }
}

/// Every checkpoint resumes to the reference checksum; returns the chain's
/// reports.
fn check_chain(memory: &str, tracker: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let v = chain(dir.path(), memory, tracker, extra);
    assert_eq!(v["matches_reference"], true, "{memory}/{tracker}: {v}");
    let cps = v["checkpoints"].as_array().unwrap().clone();
    assert!(cps.len() >= 3, "{v}");
    for (k, cp) in cps.iter().enumerate() {
        assert_eq!(cp["mode"], "live", "{memory}/{tracker}: {cp}");
        assert_eq!(cp["parent"].is_null(), k == 0, "{cp}");
        // Durations are plain numbers of milliseconds.
        for key in ["pause_ms", "collect_ms", "state_ms", "write_ms"] {
            assert!(cp[key].as_f64().is_some(), "{key} in {cp}");
        }
        assert!(cp["stats"]["duration_ms"].as_f64().is_some(), "{cp}");
        let img = cp["image"].as_str().unwrap();
        let r = json(
            &livepage()
                .args(["vm", "resume", "--json", img])
                .output()
                .unwrap(),
        );
        assert_eq!(
            r["matches_reference"], true,
            "{memory}/{tracker}: checkpoint {k} does not resume to the reference: {r}"
        );
    }
    no_temporary_files(dir.path());
    cps
}

#[test]
fn live_chains_resume_on_every_memory_type_wp_async() {
    if !kvm_ok() {
        return;
    }
    for memory in ["anon", "thp", "shmem", "hugetlb"] {
        check_chain(memory, "wp-async", &[]);
    }
}

#[test]
fn live_chains_resume_on_every_memory_type_kvm_dirty_log() {
    if !kvm_ok() {
        return;
    }
    for memory in ["anon", "thp", "shmem", "hugetlb"] {
        check_chain(memory, "kvm-dirty-log", &[]);
    }
}

/// With no buffer every early write saves its page itself: still exact.
#[test]
fn live_chain_with_the_buffer_forced_full() {
    if !kvm_ok() {
        return;
    }
    let cps = check_chain("anon", "wp-async", &["--buffer", "0"]);
    let buffered: u64 = cps
        .iter()
        .map(|c| c["stats"]["buffered_pages"].as_u64().unwrap())
        .sum();
    assert_eq!(buffered, 0);
}

/// The pause is the harvest plus the state save plus a few milliseconds,
/// whatever the delta (besides waiting for a parent still being written),
/// and a bound of 1 TiB costs nothing up front. The quickest delta is
/// judged: a busy test machine can only add to a pause (descheduling), so
/// the minimum shows what the pause is made of; the figures themselves are
/// `bench track`'s.
#[test]
fn the_pause_covers_the_harvest_only_and_not_the_buffer_bound() {
    if !kvm_ok() {
        return;
    }
    for buffer in ["16M", "1T"] {
        let cps = check_chain("anon", "wp-async", &["--buffer", buffer]);
        // A checkpoint that comes before its parent is on disk waits for it
        // (backpressure, reported as waited_ms); the rest is the instant.
        let mut beyond: Vec<f64> = cps[1..]
            .iter()
            .map(|cp| {
                cp["pause_ms"].as_f64().unwrap()
                    - cp["waited_ms"].as_f64().unwrap()
                    - cp["collect_ms"].as_f64().unwrap()
                    - cp["state_ms"].as_f64().unwrap()
            })
            .collect();
        beyond.sort_by(f64::total_cmp);
        let least = beyond[0];
        assert!(
            least <= 5.0,
            "--buffer {buffer}: every pause exceeds harvest + state save by more than 5 ms (least {least:.2} ms; all: {beyond:?})"
        );
    }
}

/// A buffer that could outgrow the machine is refused with the numbers and
/// a fix, before anything is armed, and leaves no file behind.
#[test]
fn a_buffer_the_machine_cannot_hold_is_refused() {
    if !kvm_ok() {
        return;
    }
    let avail = livepage_uffd::mm::mem_available().unwrap();
    // Anonymous guest RAM larger than what is available: only touched pages count.
    let mem = format!("{}G", (avail >> 30) + 2);
    let dir = tempfile::tempdir().unwrap();
    let out = livepage()
        .args([
            "vm",
            "run",
            "--mem",
            &mem,
            "--iterations",
            "20000",
            "--snapshot-at",
            "4096",
            "--buffer",
            "1T",
            "--snapshot-out",
        ])
        .arg(dir.path().join("s.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MiB available") && err.contains("smaller --buffer"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
