//! Garage (an S3-compatible distributed object store) for tests and
//! benchmarks: one node on loopback, or several nodes with replication in
//! the lab's namespaces. Each node gets its own configuration, ports and
//! directories under a directory the caller owns; a bucket and a key are
//! made, and [`Garage::env`] gives the `AWS_*` variables a client needs.
//! Nodes are killed when the [`Garage`] is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::LabError;

/// Where a node runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The network namespace (`None`: this one).
    pub netns: Option<String>,
    /// The address it listens on there.
    pub ip: IpAddr,
    /// Its RPC port; S3 is the next one, admin the one after.
    pub port: u16,
}

#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    config: PathBuf,
    child: Option<Child>,
}

/// A running Garage cluster with one bucket and one key.
#[derive(Debug)]
pub struct Garage {
    nodes: Vec<Node>,
    /// The S3 endpoint clients use (node `client`'s).
    pub endpoint: String,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
    /// The bucket.
    pub bucket: String,
    /// The region name the cluster answers to.
    pub region: String,
}

/// Where the `garage` binary is: `$GARAGE`, `$PATH`, or `~/.cargo/bin`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE") {
        return Some(p.into());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

fn hex(n: usize) -> Result<String, LabError> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| LabError::Io {
            what: "reading /dev/urandom".into(),
            source,
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A free port on loopback (for single-node clusters).
fn free_port() -> Result<u16, LabError> {
    // Three consecutive ports: try a few bases.
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| LabError::Io {
            what: "finding a free port".into(),
            source,
        })?;
        let p = l.local_addr().map(|a| a.port()).unwrap_or(0);
        drop(l);
        if p > 1024
            && p < 65000
            && (1..3).all(|k| std::net::TcpListener::bind(("127.0.0.1", p + k)).is_ok())
        {
            return Ok(p);
        }
    }
    Err(LabError::Io {
        what: "finding three free ports".into(),
        source: std::io::Error::other("none"),
    })
}

impl Garage {
    /// One node on loopback, data under `dir`.
    pub fn single(dir: &Path) -> Result<Garage, LabError> {
        let port = free_port()?;
        Garage::start(
            dir,
            &[NodeSpec {
                netns: None,
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            }],
            1,
            0,
        )
    }

    /// Starts `nodes` with `replication`, clients talking to node `client`.
    pub fn start(
        dir: &Path,
        nodes: &[NodeSpec],
        replication: usize,
        client: usize,
    ) -> Result<Garage, LabError> {
        let bin = binary().ok_or_else(|| LabError::Spawn {
            cmd: "garage".into(),
            source: std::io::Error::other(
                "not installed (cargo install garage --locked, or set $GARAGE)",
            ),
        })?;
        let secret = hex(32)?;
        let mut g = Garage {
            nodes: Vec::new(),
            endpoint: String::new(),
            key_id: format!("GK{}", hex(12)?),
            secret: hex(32)?,
            bucket: "livepage".into(),
            region: "garage".into(),
        };
        for (i, spec) in nodes.iter().enumerate() {
            let d = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&d).map_err(|source| LabError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
            let rpc = SocketAddr::new(spec.ip, spec.port);
            let cfg = format!(
                "metadata_dir = \"{m}\"\ndata_dir = \"{dd}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {replication}\nrpc_bind_addr = \"{rpc}\"\n\
                 rpc_public_addr = \"{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"{adm}\"\nadmin_token = \"{secret}\"\n",
                m = d.join("meta").display(),
                dd = d.join("data").display(),
                s3 = SocketAddr::new(spec.ip, spec.port + 1),
                adm = SocketAddr::new(spec.ip, spec.port + 2),
            );
            let config = d.join("config.toml");
            std::fs::write(&config, cfg).map_err(|source| LabError::Io {
                what: format!("writing {}", config.display()),
                source,
            })?;
            let log =
                std::fs::File::create(d.join("server.log")).map_err(|source| LabError::Io {
                    what: "creating the node's log".into(),
                    source,
                })?;
            let mut c = command(&bin, spec);
            c.arg("-c")
                .arg(&config)
                .arg("server")
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|source| LabError::Io {
                    what: "log".into(),
                    source,
                })?)
                .stderr(log)
                .env("GARAGE_ALLOW_WORLD_READABLE_SECRETS", "true");
            let child = c.spawn().map_err(|source| LabError::Spawn {
                cmd: format!("{} server", bin.display()),
                source,
            })?;
            g.nodes.push(Node {
                spec: spec.clone(),
                config,
                child: Some(child),
            });
        }
        // Every node up, then connected to the first, then a layout.
        let mut ids = Vec::new();
        for i in 0..g.nodes.len() {
            let out = g.retry(i, &["node", "id", "-q"], Duration::from_secs(20))?;
            ids.push(out.trim().to_string());
        }
        for id in &ids[1..] {
            g.retry(0, &["node", "connect", id], Duration::from_secs(10))?;
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            let zone = format!("z{i}");
            g.retry(
                0,
                &["layout", "assign", "-z", &zone, "-c", "1G", short],
                Duration::from_secs(10),
            )?;
        }
        g.retry(
            0,
            &["layout", "apply", "--version", "1"],
            Duration::from_secs(10),
        )?;
        let (kid, sec, b) = (g.key_id.clone(), g.secret.clone(), g.bucket.clone());
        g.retry(0, &["bucket", "create", &b], Duration::from_secs(20))?;
        g.retry(
            0,
            &["key", "import", "--yes", "-n", "livepage", &kid, &sec],
            Duration::from_secs(10),
        )?;
        g.retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &b, "--key", &kid,
            ],
            Duration::from_secs(10),
        )?;
        let c = &g.nodes[client].spec;
        let s3 = SocketAddr::new(c.ip, c.port + 1);
        g.endpoint = format!("http://{s3}");
        Ok(g)
    }

    /// Runs `garage -c <node i's config> args` (in its namespace) until it
    /// succeeds or `limit` passes; returns what it printed.
    fn retry(&self, i: usize, args: &[&str], limit: Duration) -> Result<String, LabError> {
        let bin = binary().unwrap_or_else(|| "garage".into());
        let n = &self.nodes[i];
        let t0 = Instant::now();
        loop {
            let out = command(&bin, &n.spec)
                .arg("-c")
                .arg(&n.config)
                .args(args)
                .env("GARAGE_ALLOW_WORLD_READABLE_SECRETS", "true")
                .stdin(Stdio::null())
                .output()
                .map_err(|source| LabError::Spawn {
                    cmd: format!("garage {}", args.join(" ")),
                    source,
                })?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if t0.elapsed() > limit {
                return Err(LabError::Command {
                    cmd: format!("garage {}", args.join(" ")),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The environment a client of this cluster needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
        ]
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes.get_mut(i).and_then(|n| n.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether node `i`'s S3 port answers.
    pub fn answers(&self, i: usize) -> bool {
        let s = &self.nodes[i].spec;
        s.netns.is_none()
            && TcpStream::connect_timeout(
                &SocketAddr::new(s.ip, s.port + 1),
                Duration::from_millis(200),
            )
            .is_ok()
    }
}

fn command(bin: &Path, spec: &NodeSpec) -> Command {
    match &spec.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
