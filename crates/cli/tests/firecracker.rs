//! `livepage serve-firecracker` against a client written from Firecracker's
//! documented handshake: this test process maps guest memory, registers it
//! MISSING with EVENT_REMOVE, connects, sends the region JSON with the
//! userfaultfd as SCM_RIGHTS, then touches, discards and verifies its pages.
//! Malformed handshakes are rejected with a message while the server goes on
//! serving the VMs that follow.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SIZES, events, mapping, mem_file, memory, ok, server, server_with, uffd};
use livepage_mem::{MemoryKind, Region};
use livepage_uffd::fdpass::send_with_fd;
use livepage_uffd::{Features, RegisterMode, UffdBuilder};

/// Sends a handshake and returns the server's one-line answer (empty if it
/// accepted and said nothing).
fn reject_reason(socket: &Path, body: &str, with_fd: bool) -> String {
    let s = UnixStream::connect(socket).unwrap();
    let u = uffd();
    if with_fd {
        send_with_fd(s.as_fd(), body.as_bytes(), u.as_fd()).unwrap();
    } else {
        (&s).write_all(body.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    let _ = (&s).read_to_string(&mut answer);
    answer
}

/// One VM: maps and registers its regions, hands them over, then touches,
/// discards and checks every page.
fn run_vm(socket: &Path, want: &[u8]) {
    let (regions, _u, s) = common::vm(
        socket,
        &[(SIZES[0], SIZES[0], 0), (SIZES[1], SIZES[1], SIZES[0])],
    );
    // Firecracker keeps its copy of the uffd; so do we, and the socket stays open.
    let mut offset = 0;
    for r in &regions {
        // Two vCPU-like threads touch every page in opposite orders.
        let pages = r.pages();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..pages {
                        let p = if t == 0 { i } else { pages - 1 - i };
                        r.read_u64(p * 4096 + 8).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got = vec![0u8; r.len()];
        r.read(0, &mut got).unwrap();
        assert!(
            got == want[offset..offset + r.len()],
            "served memory differs from the snapshot"
        );
        // A balloon takes 16 pages: they come back as zeros, not snapshot data.
        r.discard(64 * 4096, 16 * 4096).unwrap();
        for p in 64..80 {
            assert_eq!(r.read_u64(p * 4096 + 8).unwrap(), 0, "page {p}");
        }
        assert_ne!(r.read_u64(81 * 4096 + 8).unwrap(), 0);
        offset += r.len();
    }
    drop(s);
}

#[test]
fn serves_firecracker_vms_from_a_mem_file_and_rejects_bad_handshakes() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let mut srv = server(dir.path(), &["--mem-file", mem.to_str().unwrap()], 2);

    let a = 0x7000_0000_0000usize;
    let bad = [
        ("{not json".to_string(), true, "not a JSON array"),
        ("[]".to_string(), true, "no guest regions"),
        (
            format!("[{}]", mapping(a, 8192, 0, 4096)),
            false,
            "no file descriptor",
        ),
        (
            format!("[{}]", mapping(a + 12, 8192, 0, 4096)),
            true,
            "not aligned",
        ),
        (
            format!(
                "[{},{}]",
                mapping(a, 8192, 0, 4096),
                mapping(a + 4096, 4096, 0, 4096)
            ),
            true,
            "overlap",
        ),
        (
            format!("[{}]", mapping(a, 64 << 20, 0, 4096)),
            true,
            "memory snapshot, which has",
        ),
    ];
    for (body, fd, why) in &bad {
        let answer = reject_reason(&srv.socket, body, *fd);
        assert!(answer.contains(why), "{body}: {answer}");
    }
    let ev = events(&srv, bad.len());
    assert!(ev.iter().all(|e| e["event"] == "rejected"), "{ev:?}");

    // Two VMs at once, after the bad ones: the server still serves.
    let (s1, s2) = (srv.socket.clone(), srv.socket.clone());
    let (w1, w2) = (want.clone(), want.clone());
    let vm1 = std::thread::spawn(move || run_vm(&s1, &w1));
    let vm2 = std::thread::spawn(move || run_vm(&s2, &w2));
    vm1.join().unwrap();
    vm2.join().unwrap();
    let ev = events(&srv, 4);
    let finished: Vec<_> = ev.iter().filter(|e| e["event"] == "finished").collect();
    assert_eq!(finished.len(), 2, "{ev:?}");
    for f in finished {
        // Every page placed once: by a fault, by the prefetcher, or left to
        // the kernel; the 32 discarded pages read back as zeros (checked by
        // the client).
        let placed = f["faults"].as_u64().unwrap()
            + f["prefetched"].as_u64().unwrap()
            + f["left_to_kernel"].as_u64().unwrap();
        assert_eq!(placed, (want.len() / 4096) as u64, "{f}");
        assert_eq!(f["discarded"].as_u64().unwrap(), 32, "{f}");
        assert_eq!(f["failed"], false, "{f}");
    }
    // --max-vms 2: the server exits on its own.
    let t0 = Instant::now();
    loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_firecracker_from_a_livepage_image() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = memory();
    let img = dir.path().join("vm.img");
    let descs: Vec<_> = SIZES
        .iter()
        .enumerate()
        .map(|(i, s)| livepage_image::RegionDesc {
            base: 0x1000_0000 * (i as u64 + 1),
            len: *s as u64,
            page_size: 4096,
            kind: livepage_image::kind::of(MemoryKind::Anon),
        })
        .collect();
    let w = livepage_image::ImageWriter::create(&img, &descs, None).unwrap();
    for (p, page) in want.chunks(4096).enumerate() {
        if page.iter().any(|b| *b != 0) {
            w.write_page(p as u64, page).unwrap();
        } else {
            w.mark_zero(p as u64);
        }
    }
    w.finish().unwrap();
    let mut srv = server(dir.path(), &["--image", img.to_str().unwrap()], 1);
    run_vm(&srv.socket, &want);
    let ev = events(&srv, 2);
    assert_eq!(ev[1]["event"], "finished", "{ev:?}");
    assert!(srv.child.wait().unwrap().success());

    // The same image from a chunk store: two VMs, the second served from
    // the chunk cache the first filled.
    let store = format!("dir://{}", dir.path().join("store").display());
    let push = std::process::Command::new(env!("CARGO_BIN_EXE_livepage"))
        .args(["push", img.to_str().unwrap(), &store])
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let url = format!("{store}/vm.img");
    let cache = dir.path().join("cache");
    let mut srv = server_with(
        dir.path(),
        &["--image", &url, "--chunk-cache", cache.to_str().unwrap()],
        &["--max-vms", "2"],
    );
    run_vm(&srv.socket, &want);
    run_vm(&srv.socket, &want);
    let ev = events(&srv, 4);
    assert_eq!(
        ev.iter().filter(|e| e["event"] == "finished").count(),
        2,
        "{ev:?}"
    );
    assert!(srv.child.wait().unwrap().success());
    assert!(
        std::fs::read_dir(&cache).unwrap().count() > 0,
        "the cache holds chunks"
    );
}

#[test]
fn a_snapshot_that_breaks_mid_serving_fails_closed() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    // Faults only, so that the pages beyond the break are still missing.
    let srv = server(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap(), "--prefetch", "none"],
        1,
    );
    let r = Arc::new(Region::new(MemoryKind::Anon, SIZES[0]).unwrap());
    let u = uffd();
    r.register(&u, RegisterMode::MISSING).unwrap();
    let s = UnixStream::connect(&srv.socket).unwrap();
    let body = format!("[{}]", mapping(r.addr(), SIZES[0], 0, 4096));
    send_with_fd(s.as_fd(), body.as_bytes(), u.as_fd()).unwrap();
    assert_eq!(
        r.read_u64(8).unwrap(),
        u64::from_ne_bytes(want[8..16].try_into().unwrap())
    );
    // The snapshot file loses its tail while the VM runs.
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(16 * 4096)
        .unwrap();
    // A page beyond it: the vCPU gets an error (SIGBUS for a guest access,
    // EFAULT through the kernel) at once instead of waiting.
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    assert!(r.read_checked(100 * 4096, &mut b).is_err());
    assert!(r.read_checked(1000 * 4096, &mut b).is_err());
    assert!(t0.elapsed() < Duration::from_secs(20));
    // What was served stays, and pages the file still holds are served.
    r.read_checked(0, &mut b).unwrap();
    r.read_checked(5 * 4096, &mut b).unwrap();
    drop(s);
    let ev = events(&srv, 2);
    assert_eq!(ev[1]["failed"], true, "{ev:?}");
    assert_eq!(ev[1]["lost"], 2, "only the pages beyond the break: {ev:?}");
    assert!(
        ev[1]["error"].as_str().unwrap().contains("offset 409600"),
        "the cause names the file offset: {ev:?}"
    );
}

#[test]
fn serves_a_hugetlbfs_guest_in_2_mib_pages() {
    if !ok() {
        return;
    }
    let size = 8 << 20;
    let r = match Region::new(MemoryKind::Hugetlb, size) {
        Ok(r) => r,
        Err(e) => {
            livepage_testutil::skip("serve_firecracker_hugetlb", &e.to_string());
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut want = memory();
    want.truncate(size);
    // The second huge page is all zeros in the snapshot.
    want[2 << 20..4 << 20].fill(0);
    let mem = dir.path().join("mem");
    std::fs::write(&mem, &want).unwrap();
    let srv = server(dir.path(), &["--mem-file", mem.to_str().unwrap()], 1);
    let u = UffdBuilder::new()
        .non_blocking(true)
        .user_mode_only(false)
        .features(Features::EVENT_REMOVE | Features::MISSING_HUGETLBFS)
        .create()
        .unwrap();
    r.register(&u, RegisterMode::MISSING).unwrap();
    let s = UnixStream::connect(&srv.socket).unwrap();
    let body = format!("[{}]", mapping(r.addr(), size, 0, 2 << 20));
    send_with_fd(s.as_fd(), body.as_bytes(), u.as_fd()).unwrap();
    let mut got = vec![0u8; size];
    r.read(0, &mut got).unwrap();
    assert!(got == want, "served huge pages differ from the snapshot");
    // A balloon takes the third huge page: it comes back as zeros.
    r.discard(4 << 20, 2 << 20).unwrap();
    assert_eq!(r.read_u64((4 << 20) + 8).unwrap(), 0);
    assert_ne!(r.read_u64((6 << 20) + 8).unwrap(), 0);
    drop(s);
    let ev = events(&srv, 2);
    assert_eq!(ev[1]["event"], "finished", "{ev:?}");
    // 4 huge pages placed once (one of them zero), one discarded.
    let f = &ev[1];
    let placed = f["faults"].as_u64().unwrap()
        + f["prefetched"].as_u64().unwrap()
        + f["left_to_kernel"].as_u64().unwrap();
    assert_eq!(placed, 4, "{ev:?}");
    assert_eq!(f["discarded"].as_u64().unwrap(), 1, "{ev:?}");
}

/// One scrape of the Prometheus endpoint: metric name -> value.
fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.") && text.contains(" 200 "),
        "{text}"
    );
    text.lines()
        .filter(|l| l.starts_with("livepage_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_metrics_endpoint_counts_what_the_vms_did() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let srv = server_with(
        dir.path(),
        &["--mem-file", mem.to_str().unwrap()],
        &[
            "--max-vms",
            "1",
            "--metrics",
            "127.0.0.1:0",
            "--handlers",
            "2",
        ],
    );
    let addr = srv
        .banner
        .split("http://")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap()
        .to_string();
    let before = scrape(&addr);
    assert_eq!(before["livepage_vms_connected"], 0.0, "{before:?}");
    assert_eq!(before["livepage_vms_accepted_total"], 0.0);
    run_vm(&srv.socket, &want);
    let ev = events(&srv, 2);
    let f = &ev[1];
    assert_eq!(f["event"], "finished", "{ev:?}");
    let m = scrape(&addr);
    let n = |k: &str| f[k].as_f64().unwrap();
    assert_eq!(m["livepage_vms_connected"], 0.0, "{m:?}");
    assert_eq!(m["livepage_vms_accepted_total"], 1.0);
    assert_eq!(m["livepage_vms_failed_total"], 0.0);
    assert_eq!(m["livepage_faults_served_total"], n("faults"), "{m:?} {f}");
    assert_eq!(m["livepage_pages_prefetched_total"], n("prefetched"));
    assert_eq!(m["livepage_pages_zero_filled_total"], n("zero_filled"));
    assert_eq!(
        m["livepage_pages_left_to_kernel_total"],
        n("left_to_kernel")
    );
    assert_eq!(m["livepage_pages_lost_total"], 0.0);
    // Every demand fault served is in the histogram.
    assert_eq!(
        m["livepage_fault_latency_seconds_count"],
        n("faults"),
        "{m:?}"
    );
    assert_eq!(
        m[r#"livepage_fault_latency_seconds_bucket{le="+Inf"}"#],
        n("faults")
    );
}

/// Touches pages 200..264 of region 0 from one thread, in that order,
/// `after` the handshake.
fn touch_some(socket: &Path, after: Duration) {
    let (r, _u, s) = common::vm(socket, &[(SIZES[0], SIZES[0], 0)]);
    std::thread::sleep(after);
    for p in 200..264 {
        r[0].read_u64(p * 4096).unwrap();
    }
    drop(s);
}

#[test]
fn a_working_set_recorded_for_a_snapshot_is_replayed_for_the_next_vm() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = mem_file(dir.path());
    let m = mem.to_str().unwrap();
    // First VM: faults only, recorded.
    let mut srv = server_with(
        dir.path(),
        &[
            "--mem-file",
            m,
            "--prefetch",
            "none",
            "--record-working-set",
        ],
        &["--max-vms", "1"],
    );
    touch_some(&srv.socket, Duration::ZERO);
    let ev = events(&srv, 3);
    assert!(
        ev.iter().any(|e| e["event"] == "notice"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("recorded a working set of 64 pages")),
        "{ev:?}"
    );
    assert!(common::exit_status(&mut srv, Duration::from_secs(20)).success());
    let wset = livepage_restore::WorkingSet::load(&dir.path().join("mem.wset"), 2048).unwrap();
    assert_eq!(wset.pages, (200..264).collect::<Vec<u64>>());
    drop(srv);
    // Second VM of the same snapshot: the recorded pages are placed first,
    // so its touches find them there.
    let srv = server_with(
        dir.path(),
        &["--mem-file", m, "--prefetch", "recorded"],
        &["--max-vms", "1"],
    );
    // The VM comes to life a moment after its handshake, as one does.
    touch_some(&srv.socket, Duration::from_millis(300));
    let ev = events(&srv, 2);
    let f = &ev[1];
    assert_eq!(f["event"], "finished", "{ev:?}");
    assert_eq!(
        ev[0]["event"], "accepted",
        "no fallback from the recorded set: {ev:?}"
    );
    assert!(
        f["faults"].as_u64().unwrap() < 64,
        "the recorded pages should have been prefetched before the touches: {f}"
    );
}

#[test]
fn an_imported_memory_file_serves_the_same_memory_and_verifies() {
    if !ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mem, want) = mem_file(dir.path());
    let img = dir.path().join("mem.img");
    let out = Command::new(env!("CARGO_BIN_EXE_livepage"))
        .args([
            "import-firecracker",
            mem.to_str().unwrap(),
            "--json",
            "--out",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every seventh page of the snapshot is zero.
    let pages = (want.len() / 4096) as u64;
    assert_eq!(v["pages"].as_u64().unwrap(), pages);
    assert_eq!(v["zero_pages"].as_u64().unwrap(), pages.div_ceil(7));
    let out = Command::new(env!("CARGO_BIN_EXE_livepage"))
        .arg("verify")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A refused page size, and a file that is not whole pages.
    let out = Command::new(env!("CARGO_BIN_EXE_livepage"))
        .args([
            "import-firecracker",
            mem.to_str().unwrap(),
            "--page-size",
            "8K",
            "--out",
        ])
        .arg(dir.path().join("x.img"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("4K or 2M"));
    let mut srv = server(dir.path(), &["--image", img.to_str().unwrap()], 1);
    run_vm(&srv.socket, &want);
    let ev = events(&srv, 2);
    assert_eq!(ev[1]["failed"], false, "{ev:?}");
    assert!(common::exit_status(&mut srv, Duration::from_secs(20)).success());
}
