//! The lab itself: traffic crosses the veth between the namespaces, the
//! relay adds its delay, tbf holds the rate, and each cut does what it
//! says; the namespaces are gone afterwards.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use livepage_netlab::{Cut, Lab};

fn lab(test: &str) -> Option<Lab> {
    if let Some(why) = Lab::available() {
        livepage_testutil::skip(test, &why);
        return None;
    }
    Some(Lab::new().unwrap())
}

/// An echo server in namespace b.
fn echo(lab: &Lab, port: u16) {
    let addr = lab.sock_b(port);
    let (tx, rx) = std::sync::mpsc::channel();
    lab.in_ns(&lab.b.clone(), move || {
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
    .unwrap();
    rx.recv().unwrap();
}

fn client(lab: &Lab, to: std::net::SocketAddr) -> TcpStream {
    let s = lab
        .in_ns(&lab.a.clone(), move || TcpStream::connect(to).unwrap())
        .unwrap()
        .join()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

#[test]
fn delay_rate_and_cuts() {
    let Some(lab) = lab("netlab_delay_rate_and_cuts") else {
        return;
    };
    echo(&lab, 9000);
    let relay = lab
        .relay(lab.sock_a(9001), lab.sock_b(9000), Duration::from_millis(5))
        .unwrap();
    // A round trip through the relay takes its two delays.
    let mut s = client(&lab, relay.addr());
    let mut b = [0u8; 4];
    let t = Instant::now();
    s.write_all(b"ping").unwrap();
    s.read_exact(&mut b).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(10),
        "{:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    // tbf at 50 Mbit/s: 4 MiB each way takes at least ~0.6 s.
    lab.shape(50, 50).unwrap();
    let data = vec![7u8; 4 << 20];
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 4 << 20];
        r.read_exact(&mut got).unwrap();
        got
    });
    let t = Instant::now();
    s.write_all(&data).unwrap();
    assert_eq!(reader.join().unwrap(), data);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    // Drop: silence, then the data flows again once healed.
    relay.cut(Cut::Drop);
    s.write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(s.read(&mut b).is_err(), "nothing may come through a drop");
    relay.heal();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"held");
    // Reset: the connection dies at once.
    relay.cut(Cut::Reset);
    let e = s.read(&mut b);
    assert!(matches!(e, Ok(0) | Err(_)), "{e:?}");
    relay.heal();
    // Half-open: the client's side stays open and silent.
    let mut s = client(&lab, relay.addr());
    s.write_all(b"ping").unwrap();
    s.read_exact(&mut b).unwrap();
    relay.cut(Cut::HalfOpen);
    s.write_all(b"lost").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let e = s.read(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    relay.heal();
    let ns = (lab.a.clone(), lab.b.clone());
    drop(relay);
    drop(lab);
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&ns.0) && !list.contains(&ns.1), "{list}");
}
