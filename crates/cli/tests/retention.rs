//! `--keep N`: older checkpoints are folded into their parents in the
//! background; the kept ones resume to the uninterrupted run's checksum, no
//! temporary file is ever left (also when the process is killed in the
//! middle of a fold), and a full disk fails a fold with every checkpoint
//! intact.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn livepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livepage"))
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

/// The files of `dir`, sorted; none of them may be a temporary file (every
/// image is written unnamed and linked when complete).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    for p in &v {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(!name.starts_with('.'), "left behind: {}", p.display());
    }
    v
}

fn resumes_to_reference(image: &Path) {
    let r = json(
        &livepage()
            .args(["vm", "resume", "--json"])
            .arg(image)
            .output()
            .unwrap(),
    );
    assert_eq!(
        r["matches_reference"],
        true,
        "{} does not resume to the reference: {r}",
        image.display()
    );
}

fn run_args(dir: &Path, mem: &str, iterations: &str, every: &str, keep: &str) -> Command {
    let mut c = livepage();
    c.args([
        "vm",
        "run",
        "--json",
        "--mem",
        mem,
        "--iterations",
        iterations,
        "--checkpoint-every",
        every,
        "--keep",
        keep,
        "--checkpoint-dir",
    ])
    .arg(dir);
    c
}

#[test]
fn keep_two_over_ten_checkpoints_leaves_two_resumable() {
    if !kvm_ok("keep_two") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = json(
        &run_args(dir.path(), "32M", "44000", "4000", "2")
            .output()
            .unwrap(),
    );
    assert_eq!(v["matches_reference"], true, "{v}");
    let cps = v["checkpoints"].as_array().unwrap();
    assert_eq!(cps.len(), 10, "{v}");
    let folds = v["folds"].as_array().unwrap();
    assert_eq!(folds.len(), 8, "{v}");
    for f in folds {
        assert!(f["duration_ms"].as_f64().is_some(), "{f}");
    }
    let kept = files(dir.path());
    let last: Vec<PathBuf> = cps[8..]
        .iter()
        .map(|c| PathBuf::from(c["image"].as_str().unwrap()))
        .collect();
    assert_eq!(kept, last, "only the newest two remain");
    for k in &kept {
        resumes_to_reference(k);
    }
}

/// The task of `pid` named `name`, if any.
fn task(pid: u32, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .map(|t| t.path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name))
}

/// Whether a task is busy (not waiting on a futex for its next head).
fn busy(task: &Path) -> bool {
    std::fs::read_to_string(task.join("syscall")).is_ok_and(|s| !s.starts_with("202 "))
}

#[test]
fn a_run_killed_in_the_middle_of_a_fold_leaves_resumable_checkpoints_only() {
    if !kvm_ok("killed_mid_fold") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 128 MiB folds take long enough to be caught in the middle.
    let mut child = run_args(dir.path(), "128M", "40000", "2500", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut caught = false;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        // The retention thread is busy only while it folds.
        if let Some(t) = task(pid, "retain") {
            if busy(&t) {
                std::thread::sleep(Duration::from_millis(5));
                if busy(&t) {
                    child.kill().unwrap();
                    caught = true;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.wait();
    assert!(caught, "no fold was caught in progress");
    // No temporary file; every checkpoint left resumes.
    let left = files(dir.path());
    assert!(left.len() >= 2, "{left:?}");
    let newest = left.last().unwrap().clone();
    for k in &left {
        resumes_to_reference(k);
    }
    // Retention finishes what the run left.
    let r = json(
        &livepage()
            .args(["prune", "--json", "--keep", "2"])
            .arg(&newest)
            .output()
            .unwrap(),
    );
    assert!(r["kept"].as_array().unwrap().len() == 2, "{r}");
    // A kill between a fold's rename and its unlink (microseconds) leaves
    // the folded parent, which prune names and keeps (resumed above).
    let strays: Vec<PathBuf> = r["strays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let kept: Vec<PathBuf> = files(dir.path())
        .into_iter()
        .filter(|p| !strays.contains(p))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept.last(), Some(&newest));
    for k in &kept {
        resumes_to_reference(k);
    }
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("livepage-test")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_fold_and_keeps_every_checkpoint() {
    if !kvm_ok("full_disk_fold") {
        return;
    }
    // A chain of three written where there is room...
    let src = tempfile::tempdir().unwrap();
    let v = json(
        &livepage()
            .args([
                "vm",
                "run",
                "--json",
                "--mem",
                "32M",
                "--iterations",
                "12000",
                "--checkpoint-every",
                "4000",
                "--checkpoint-dir",
            ])
            .arg(src.path())
            .output()
            .unwrap(),
    );
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 2, "{v}");
    let chain = files(src.path());
    // ...copied onto a file system with no room for a folded image.
    let used: u64 = chain
        .iter()
        .map(|p| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512)
        .sum();
    let mnt = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(mnt.path(), used + (4 << 20)) else {
        livepage_testutil::skip("full_disk_fold", "cannot mount a tmpfs (not root?)");
        return;
    };
    for p in &chain {
        let to = mnt.path().join(p.file_name().unwrap());
        let out = Command::new("cp")
            .arg("--sparse=always")
            .arg(p)
            .arg(&to)
            .status()
            .unwrap();
        assert!(out.success());
    }
    let head = mnt.path().join(chain.last().unwrap().file_name().unwrap());
    let out = livepage()
        .args(["prune", "--keep", "1"])
        .arg(&head)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the fold fit: {err}");
    assert!(
        err.contains("is full") && err.contains("every existing image is intact"),
        "{err}"
    );
    // Nothing changed: the same files, each resuming.
    let left = files(mnt.path());
    assert_eq!(left.len(), chain.len(), "{left:?}");
    for k in &left {
        resumes_to_reference(k);
    }
}
