//! A two-host network for migration tests and benchmarks, on one machine:
//! two network namespaces joined by a veth pair (addresses only inside
//! them), bandwidth shaped with `tc tbf` on both ends, and a userspace
//! [`Relay`] in the first namespace that adds latency and cuts links
//! (silent drop, reset, half-open), since this kernel has no netem.
//! Everything is removed when the [`Lab`] is dropped.
//!
//! Needs root and iproute2 (`ip`, `tc`); [`Lab::available`] says why not.

pub mod garage;
mod relay;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub use relay::{Cut, Relay, RelayStats};

/// Why the lab could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// A command could not run.
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Entering a namespace failed.
    #[error("cannot enter network namespace {ns}: {source}")]
    Setns {
        /// The namespace.
        ns: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn run(args: &[&str]) -> Result<(), LabError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Two namespaces joined by a veth pair.
#[derive(Debug)]
pub struct Lab {
    /// The first host's namespace (the source's side).
    pub a: String,
    /// The second host's namespace (the destination's side).
    pub b: String,
    veth_a: String,
    veth_b: String,
    /// The first host's address.
    pub addr_a: Ipv4Addr,
    /// The second host's address.
    pub addr_b: Ipv4Addr,
}

impl Lab {
    /// Why a lab cannot be made here (None: it can).
    pub fn available() -> Option<String> {
        // Root is needed for namespaces and tc.
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if uid.as_deref() != Some("0") {
            return Some("network namespaces need root".into());
        }
        for tool in ["ip", "tc"] {
            let ok = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Some(format!("`{tool}` (iproute2) is not installed"));
            }
        }
        None
    }

    /// Makes the two namespaces, the veth pair and their addresses
    /// (10.213.N.1 and 10.213.N.2, N unique in this process).
    pub fn new() -> Result<Lab, LabError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{}", std::process::id() % 100_000, n);
        let subnet = ((std::process::id() * 7 + n * 13) % 250) as u8 + 1;
        let lab = Lab {
            a: format!("lpa{tag}"),
            b: format!("lpb{tag}"),
            veth_a: format!("lva{tag}"),
            veth_b: format!("lvb{tag}"),
            addr_a: Ipv4Addr::new(10, 213, subnet, 1),
            addr_b: Ipv4Addr::new(10, 213, subnet, 2),
        };
        // Dropped (and cleaned up) if any step fails.
        run(&["ip", "netns", "add", &lab.a])?;
        run(&["ip", "netns", "add", &lab.b])?;
        run(&[
            "ip",
            "link",
            "add",
            &lab.veth_a,
            "netns",
            &lab.a,
            "type",
            "veth",
            "peer",
            "name",
            &lab.veth_b,
            "netns",
            &lab.b,
        ])?;
        for (ns, dev, addr) in [
            (&lab.a, &lab.veth_a, lab.addr_a),
            (&lab.b, &lab.veth_b, lab.addr_b),
        ] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Shapes both directions to `mbit` Mbit/s with `tc tbf` (a queue of
    /// `queue_ms` of traffic at that rate).
    pub fn shape(&self, mbit: u64, queue_ms: u64) -> Result<(), LabError> {
        let bytes_per_ms = mbit * 1000 / 8;
        let burst = (bytes_per_ms / 4).max(16 << 10);
        for (ns, dev) in [(&self.a, &self.veth_a), (&self.b, &self.veth_b)] {
            let _ = run(&["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"]);
            run(&[
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &burst.to_string(),
                "latency",
                &format!("{queue_ms}ms"),
            ])?;
        }
        Ok(())
    }

    /// `addr_a:port`.
    pub fn sock_a(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.addr_a, port))
    }

    /// `addr_b:port`.
    pub fn sock_b(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.addr_b, port))
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Runs `f` on a thread inside namespace `ns` (sockets it makes live
    /// there) and returns its result.
    pub fn in_ns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>, LabError> {
        let ns = ns.to_string();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let h = std::thread::spawn(move || {
            let entered = relay::enter(&ns);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            assert!(ok, "could not enter the namespace");
            f()
        });
        rx.recv().map_err(|_| LabError::Io {
            what: "the namespace thread ended".into(),
            source: std::io::Error::other("no answer"),
        })??;
        Ok(h)
    }

    /// A relay in namespace `a` listening on `listen` and forwarding to
    /// `target` (in `b`), adding `one_way` of delay in each direction.
    pub fn relay(
        &self,
        listen: SocketAddr,
        target: SocketAddr,
        one_way: std::time::Duration,
    ) -> Result<Relay, LabError> {
        Relay::start(&self.a, listen, target, one_way)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
    }
}
