//! Issue 10's adversarial findings, each as a regression test that failed
//! before its fix: serve-firecracker's signal handling and stale sockets, a
//! fault outside the declared regions, a userfaultfd sent before its
//! handshake, --max-vms, the exit status, rejected handshakes failing the VM
//! closed, a corrupt page named first and poisoned alone, and options
//! accepted without effect.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{SIZES, events, exit_status, mapping, mem_file, ok, server, server_with, within};
use livepage_mem::Region;
use livepage_uffd::Uffd;
use livepage_uffd::fdpass::send_with_fd;

fn livepage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livepage"))
}

/// One region of `size` bytes, its first `declared` announced.
fn vm(socket: &std::path::Path, size: usize, declared: usize) -> (Arc<Region>, Uffd, UnixStream) {
    let (mut rs, u, s) = common::vm(socket, &[(size, declared, 0)]);
    (rs.remove(0), u, s)
}

fn page(want: &[u8], p: usize) -> u64 {
    u64::from_ne_bytes(want[p * 4096 + 8..p * 4096 + 16].try_into().unwrap())
}

#[test]
fn issue10_sigterm_fails_the_vms_closed_and_removes_the_socket() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let mut srv = server_with(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        &[],
    );
    let (r, _u, _s) = vm(&srv.socket, SIZES[0], SIZES[0]);
    assert_eq!(r.read_u64(8).unwrap(), page(&want, 0));
    let pid = srv.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    // The server exits, saying a VM failed; the socket is gone.
    let st = exit_status(&mut srv, Duration::from_secs(20));
    assert!(
        !st.success(),
        "a VM was failed closed: the exit status must say so"
    );
    assert!(!srv.socket.exists(), "the socket file was left behind");
    // The VM was failed closed: every page not served errors at once (no
    // server is left to answer: without the fail-closed this would hang).
    let r2 = r.clone();
    let failed = within(Duration::from_secs(20), move || {
        let mut b = [0u8; 8];
        (1..r2.pages())
            .step_by(97)
            .all(|p| r2.read_checked(p * 4096, &mut b).is_err())
    });
    assert!(failed, "a page of the stopped server's VM was served");
    // What was served stays.
    assert_eq!(r.read_u64(8).unwrap(), page(&want, 0));
}

#[test]
fn issue10_a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = mem_file(dir.path());
    // A socket file left by a killed server: nobody listens on it.
    let stale = dir.path().join("fc.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut srv = server(dir.path(), &["--mem-file", mem.to_str().unwrap()], 1);
    // A second server on the same (live) socket is refused, naming it.
    let out = livepage()
        .args([
            "serve-firecracker",
            "--mem-file",
            mem.to_str().unwrap(),
            "--socket",
        ])
        .arg(&srv.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another server is listening"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = srv.child.kill();
}

#[test]
fn issue10_a_fault_outside_the_declared_regions_fails_closed_and_is_logged() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let srv = server(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        1,
    );
    // 8 MiB registered, only the first 4 MiB declared.
    let (r, _u, s) = vm(&srv.socket, 8 << 20, 4 << 20);
    assert_eq!(r.read_u64(8).unwrap(), page(&want, 0));
    let r2 = r.clone();
    let failed = within(Duration::from_secs(20), move || {
        let mut b = [0u8; 8];
        r2.read_checked(6 << 20, &mut b).is_err()
    });
    assert!(failed);
    drop(s);
    let ev = events(&srv, 3);
    assert!(
        ev.iter().any(|e| e["event"] == "notice"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("outside the regions")),
        "{ev:?}"
    );
    let fin = ev.iter().find(|e| e["event"] == "finished").unwrap();
    assert_eq!(fin["outside_faults"], 1, "{fin}");
}

#[test]
fn issue10_a_userfaultfd_without_its_api_handshake_is_refused() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = mem_file(dir.path());
    let srv = server(dir.path(), &["--mem-file", mem.to_str().unwrap()], 1);
    let raw = livepage_uffd::UffdBuilder::new()
        .open_unhandshaken()
        .unwrap();
    let s = UnixStream::connect(&srv.socket).unwrap();
    let body = format!("[{}]", mapping(0x7000_0000_0000, 8192, 0, 4096));
    send_with_fd(s.as_fd(), body.as_bytes(), raw.as_fd()).unwrap();
    let ev = events(&srv, 1);
    assert_eq!(ev[0]["event"], "rejected", "{ev:?}");
    assert!(
        ev[0]["reason"].as_str().unwrap().contains("UFFDIO_API"),
        "{ev:?}"
    );
}

#[test]
fn issue10_max_vms_stops_accepting_and_serves_the_connected_vms_to_the_end() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let mut srv = server(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        2,
    );
    let (a, _ua, sa) = vm(&srv.socket, SIZES[0], SIZES[0]);
    assert_eq!(a.read_u64(8).unwrap(), page(&want, 0));
    // The second VM comes and goes.
    let (b, _ub, sb) = vm(&srv.socket, SIZES[0], SIZES[0]);
    assert_eq!(b.read_u64(4096 + 8).unwrap(), page(&want, 1));
    drop(sb);
    // Two were accepted: a third is refused at connect, not left waiting.
    let t0 = std::time::Instant::now();
    loop {
        if UnixStream::connect(&srv.socket).is_err() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a third VM could still connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first VM is still served, page after page, to the end.
    let a2 = a.clone();
    let w2 = want.clone();
    let all = within(Duration::from_secs(30), move || {
        (0..a2.pages()).all(|p| a2.read_u64(p * 4096 + 8).unwrap() == page(&w2, p))
    });
    assert!(all, "the connected VM was not served to the end");
    drop(sa);
    let st = exit_status(&mut srv, Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
}

#[test]
fn issue10_the_exit_status_says_a_vm_failed() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = mem_file(dir.path());
    let mut srv = server(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        1,
    );
    let (r, _u, s) = vm(&srv.socket, SIZES[0], SIZES[0]);
    r.read_u64(8).unwrap();
    // The snapshot loses its tail: a page beyond it cannot be served.
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(4 * 4096)
        .unwrap();
    // (Not as zeros: past the end of the file is missing data, not a hole.)
    let r2 = r.clone();
    assert!(within(Duration::from_secs(20), move || r2
        .read_checked(900 * 4096, &mut [0u8; 8])
        .is_err()));
    drop(s);
    let ev = events(&srv, 2);
    assert_eq!(ev[1]["failed"], true, "{ev:?}");
    assert!(
        ev[1]["error"]
            .as_str()
            .unwrap()
            .contains("1 page(s) could not be read"),
        "{ev:?}"
    );
    let st = exit_status(&mut srv, Duration::from_secs(20));
    assert!(
        !st.success(),
        "serving a VM failed, yet the server exited 0"
    );
}

#[test]
fn issue10_a_rejected_handshake_fails_the_vm_closed() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = mem_file(dir.path());
    let srv = server(dir.path(), &["--mem-file", mem.to_str().unwrap()], 1);
    // The snapshot is 12 MiB; this VM announces 64 MiB: refused. Firecracker
    // never reads the reply, so its vCPUs must fail at once rather than wait.
    let (r, _u, _s) = vm(&srv.socket, 64 << 20, 64 << 20);
    let r2 = r.clone();
    let failed = within(Duration::from_secs(20), move || {
        r2.read_checked(4096, &mut [0u8; 8]).is_err()
    });
    assert!(failed);
    let ev = events(&srv, 1);
    assert_eq!(ev[0]["event"], "rejected", "{ev:?}");
    assert_eq!(ev[0]["failed_closed"], true, "{ev:?}");
}

fn kvm_ok() -> bool {
    if livepage_testvm::check_host().is_err() {
        livepage_testutil::skip("issue10", "no /dev/kvm");
        return false;
    }
    true
}

#[test]
fn issue10_a_corrupt_page_is_named_first_and_poisoned_alone() {
    if !kvm_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let out = livepage()
        .args([
            "vm",
            "run",
            "--mem",
            "64M",
            "--iterations",
            "30000",
            "--snapshot-at",
            "10000",
            "--snapshot-out",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One data page in the middle of a run of data pages is damaged.
    let image = livepage_image::Image::open(&img).unwrap();
    let is_data = |g: u64| {
        matches!(
            image.page_state(g),
            Some((livepage_image::PageState::Data, _))
        )
    };
    let g = (1..image.pages() - 1)
        .find(|&g| is_data(g - 1) && is_data(g) && is_data(g + 1))
        .unwrap();
    let off = image.page_offset(0, g) + 100;
    drop(image);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0xff], off).unwrap();
    let out = livepage()
        .args(["vm", "resume", "--lazy"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The cause first: the image, the page, the file offset; one page lost.
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        first.starts_with(&format!("error: {}: page {g} of region 0", img.display())),
        "{err}"
    );
    assert!(
        first.contains(&format!("file offset {:#x}", off - 100)),
        "{err}"
    );
    assert!(
        first.contains("1 page(s) could not be read"),
        "only the bad page is lost: {err}"
    );
}

#[test]
fn issue10_options_without_effect_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("missing.img");
    let img = img.to_str().unwrap();
    let refused = |args: &[&str], why: &str| {
        let out = livepage().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    };
    // Lazy-only options without --lazy.
    refused(&["vm", "resume", img, "--handlers", "2"], "--lazy");
    refused(&["vm", "resume", img, "--uffds", "2"], "--lazy");
    refused(&["vm", "resume", img, "--mode", "minor"], "--lazy");
    refused(&["vm", "resume", img, "--prefetch", "none"], "--lazy");
    // Zero threads or userfaultfds are not quietly made 1.
    refused(
        &["vm", "resume", img, "--lazy", "--handlers", "0"],
        "at least 1",
    );
    refused(
        &["vm", "resume", img, "--lazy", "--uffds", "0"],
        "at least 1",
    );
    refused(
        &[
            "serve-firecracker",
            "--socket",
            "/nonexistent/s",
            "--mem-file",
            img,
            "--handlers",
            "0",
        ],
        "at least 1",
    );
    // A working set file nobody reads or writes.
    refused(
        &["vm", "resume", img, "--lazy", "--working-set", "w"],
        "--prefetch recorded",
    );
    refused(
        &[
            "serve-firecracker",
            "--socket",
            "/nonexistent/s",
            "--mem-file",
            img,
            "--working-set",
            "w",
        ],
        "--prefetch recorded",
    );
    // Snapshot options without a snapshot, tracker without checkpoints.
    refused(&["vm", "run", "--buffer", "1M"], "--snapshot-at");
    refused(&["vm", "run", "--snapshot-handlers", "2"], "--snapshot-at");
    refused(&["vm", "run", "--tracker", "sync-wp"], "--checkpoint-every");
    if !kvm_ok() {
        return;
    }
    // A snapshot or checkpoint the run never reaches.
    let out = dir.path().join("never.img");
    refused(
        &[
            "vm",
            "run",
            "--mem",
            "64M",
            "--iterations",
            "1000",
            "--snapshot-at",
            "5000",
            "--snapshot-out",
            out.to_str().unwrap(),
        ],
        "never reached",
    );
    refused(
        &[
            "vm",
            "run",
            "--mem",
            "64M",
            "--iterations",
            "1000",
            "--checkpoint-every",
            "1000",
            "--checkpoint-dir",
            dir.path().to_str().unwrap(),
        ],
        "takes no checkpoint",
    );
}

#[test]
fn one_vm_failing_leaves_the_others_served() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let mut srv = server(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        2,
    );
    // VM A maps the snapshot's second region (the file's tail), VM B its first.
    let (a, _ua, sa) = common::vm(&srv.socket, &[(SIZES[1], SIZES[1], SIZES[0])]);
    let (b, _ub, sb) = common::vm(&srv.socket, &[(SIZES[0], SIZES[0], 0)]);
    let ev = events(&srv, 2);
    assert!(ev.iter().all(|e| e["event"] == "accepted"), "{ev:?}");
    // The file loses its tail: A's pages cannot be served any more...
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(SIZES[0] as u64)
        .unwrap();
    let a2 = a[0].clone();
    assert!(within(Duration::from_secs(20), move || a2
        .read_checked(10 * 4096, &mut [0u8; 8])
        .is_err()));
    // ...while B is served, every page, from the same server.
    let b2 = b[0].clone();
    let w2 = want.clone();
    assert!(within(Duration::from_secs(30), move || {
        (0..b2.pages()).all(|p| b2.read_u64(p * 4096 + 8).unwrap() == page(&w2, p))
    }));
    drop((sa, sb));
    let ev = events(&srv, 2);
    let fin: Vec<_> = ev.iter().filter(|e| e["event"] == "finished").collect();
    assert_eq!(fin.len(), 2, "{ev:?}");
    assert_eq!(
        fin.iter().filter(|f| f["failed"] == true).count(),
        1,
        "{ev:?}"
    );
    assert!(!exit_status(&mut srv, Duration::from_secs(20)).success());
}
