//! A key-value store that moves live into another process on another host.
//!
//! The store's table lives in a livepage `Region` (65536 keys, one 64-byte
//! slot each: key, version, a checksum of both). A writer thread keeps
//! putting keys and appends each put to the store's log (key -> last
//! version). The example makes two hosts (network namespaces joined by a
//! veth pair, livepage-netlab), starts itself in the second as the
//! destination, and migrates the store there from the first while the
//! writer runs: pre-copy rounds with the WP_ASYNC tracker (process memory,
//! not a VM), a switchover that pauses the writer and hands over the log,
//! then post-copy. The destination checks every key of its table against
//! the log right after it resumes (slots not there yet are fetched on first
//! touch), then goes on writing.
//!
//! Run (as root): `cargo run --release -p livepage-migrate --example kvstore_migrate`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::{MemoryKind, Region};
use livepage_migrate::dest::{DestOptions, Listening};
use livepage_migrate::{
    Converge, DestMode, Guest, HookError, Method, Security, SourceOptions, migrate,
};
use livepage_track::{Backend, DirtyTracker, Tracker};

const KEYS: u64 = 1 << 16;
const SLOT: usize = 64;
const PORT: u16 = 7400;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Which key put number `n` writes (a hot quarter takes most puts).
fn key_of(n: u64) -> u64 {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    if x % 4 == 0 {
        (x >> 8) % KEYS
    } else {
        (x >> 8) % (KEYS / 4)
    }
}

fn check_word(key: u64, version: u64) -> u64 {
    (key ^ version.rotate_left(17)).wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// The store: its table, its log, and a writer thread that can be paused.
struct Store {
    table: Arc<Region>,
    /// The last version put for each key (0: never).
    log: Mutex<Vec<u64>>,
    next: AtomicU64,
    stop: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    fn new(table: Arc<Region>, log: Vec<u64>, next: u64) -> Arc<Store> {
        Arc::new(Store {
            table,
            log: Mutex::new(log),
            next: AtomicU64::new(next),
            stop: AtomicBool::new(false),
            writer: Mutex::new(None),
        })
    }

    fn put(&self, n: u64) -> Result<(), Error> {
        let key = key_of(n);
        let version = n + 1;
        let at = key as usize * SLOT;
        self.table.write_u64(at, key)?;
        self.table.write_u64(at + 8, version)?;
        self.table.write_u64(at + 16, check_word(key, version))?;
        self.log.lock().map_err(|_| "log poisoned")?[key as usize] = version;
        Ok(())
    }

    /// Puts at `rate` per second until paused.
    fn run(self: &Arc<Self>, rate: u64) {
        self.stop.store(false, Ordering::SeqCst);
        let s = self.clone();
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            let n0 = s.next.load(Ordering::SeqCst);
            while !s.stop.load(Ordering::SeqCst) {
                let n = s.next.load(Ordering::SeqCst);
                if let Err(e) = s.put(n) {
                    eprintln!("put {n} failed: {e}");
                    return;
                }
                s.next.store(n + 1, Ordering::SeqCst);
                if n % 64 == 0 {
                    let due = Duration::from_secs_f64((n + 1 - n0) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        });
        if let Ok(mut w) = self.writer.lock() {
            *w = Some(t);
        }
    }

    fn pause(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = t.join();
        }
    }

    /// Every key's slot against the log: (keys checked, first mismatch).
    fn check(&self) -> Result<(u64, Option<u64>), Error> {
        let log = self.log.lock().map_err(|_| "log poisoned")?.clone();
        for (key, &version) in log.iter().enumerate() {
            let at = key * SLOT;
            let (k, v, c) = (
                self.table.read_u64(at)?,
                self.table.read_u64(at + 8)?,
                self.table.read_u64(at + 16)?,
            );
            let want = if version == 0 {
                (0, 0, 0)
            } else {
                (key as u64, version, check_word(key as u64, version))
            };
            if (k, v, c) != want {
                return Ok((key as u64, Some(key as u64)));
            }
        }
        Ok((log.len() as u64, None))
    }
}

/// The source's hooks: the switchover pauses the writer and hands over
/// the log and the next put number.
struct Hooks(Arc<Store>);

impl Guest for Hooks {
    fn pause(&mut self) -> Result<Vec<u8>, HookError> {
        self.0.pause();
        let log = self
            .0
            .log
            .lock()
            .map_err(|_| HookError::from("log poisoned"))?;
        let mut state = self.0.next.load(Ordering::SeqCst).to_le_bytes().to_vec();
        for v in log.iter() {
            state.extend_from_slice(&v.to_le_bytes());
        }
        Ok(state)
    }
    fn resume(&mut self) -> Result<(), HookError> {
        self.0.run(RATE);
        Ok(())
    }
}

const RATE: u64 = 200_000;

fn table() -> Result<Arc<Region>, Error> {
    Ok(Arc::new(Region::new(
        MemoryKind::Anon,
        KEYS as usize * SLOT,
    )?))
}

/// The destination: receives the table, checks every key, writes on.
fn destination(listen: SocketAddr) -> Result<(), Error> {
    let listening = Listening::bind(
        listen,
        DestOptions::new(Security::Insecure).mode(DestMode::Missing),
    )?;
    eprintln!("listening on {listen}");
    let incoming = listening.accept(None)?.ok_or("no source came")?;
    let region = table()?;
    let mut rx = incoming.receive(vec![region.clone()])?;
    let state = rx.switchover()?;
    if state.len() != 8 * (KEYS as usize + 1) {
        return Err(format!("a state of {} bytes is not this store's", state.len()).into());
    }
    let word = |i: usize| u64::from_le_bytes(state[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let next = word(0);
    let log: Vec<u64> = (1..=KEYS as usize).map(word).collect();
    let store = Store::new(region, log, next);
    rx.resumed();
    let t = Instant::now();
    let (checked, bad) = store.check()?;
    let checked_in = t.elapsed();
    store.run(RATE);
    let report = rx.finish()?;
    std::thread::sleep(Duration::from_millis(200));
    store.pause();
    let (after, bad_after) = store.check()?;
    println!(
        "destination: {checked} keys checked against the source's log in {:.1} ms while post-copy ran ({} remote faults, p99 {:.0} us, max {:.0} us, {} asked again): {}; {} more puts here, all {after} keys still match: {}",
        checked_in.as_secs_f64() * 1e3,
        report.remote_faults,
        report.fault_p99_us,
        report.fault_max_us,
        report.asked_again,
        bad.map_or("all match".to_string(), |k| format!("key {k} DIFFERS")),
        store.next.load(Ordering::SeqCst) - next,
        bad_after.is_none()
    );
    if bad.is_some() || bad_after.is_some() {
        return Err("the migrated store does not match its log".into());
    }
    Ok(())
}

/// The source: fills the store, writes on, migrates it to `to`.
fn source(to: SocketAddr) -> Result<(), Error> {
    let region = table()?;
    let store = Store::new(region.clone(), vec![0; KEYS as usize], 0);
    for n in 0..200_000 {
        store.put(n)?;
    }
    store.next.store(200_000, Ordering::SeqCst);
    store.run(RATE);
    let r = region.clone();
    let opts = SourceOptions::new(Security::Insecure).converge(Converge {
        method: Method::Hybrid,
        downtime_target: Duration::from_millis(10),
        max_rounds: 5,
    });
    let report = migrate(
        to,
        vec![region],
        Box::new(move || {
            Ok(Box::new(DirtyTracker::start(vec![r], Some(Backend::WpAsync))?) as Box<dyn Tracker>)
        }),
        &mut Hooks(store.clone()),
        opts,
    )?;
    println!(
        "source: {} puts before the switchover; {} pre-copy rounds, downtime {:.2} ms, {} pages in post-copy, total {:.0} ms",
        store.next.load(Ordering::SeqCst),
        report.rounds.len(),
        report.downtime_ms,
        report.postcopy_pages,
        report.total_ms
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--destination") {
        let listen = args.get(2).ok_or("--destination ADDR")?.parse()?;
        return destination(listen);
    }
    if let Some(why) = livepage_netlab::Lab::available() {
        return Err(format!("this example needs two network namespaces: {why}").into());
    }
    let lab = livepage_netlab::Lab::new()?;
    lab.shape(1000, 20)?;
    let listen = lab.sock_b(PORT);
    let mut dest = lab
        .command(&lab.b, std::env::current_exe()?)
        .arg("--destination")
        .arg(listen.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Wait until it listens.
    let mut err = std::io::BufReader::new(dest.stderr.take().ok_or("stderr")?);
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        if std::io::BufRead::read_line(&mut err, &mut line)? == 0 {
            return Err("the destination did not start".into());
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
    let src = lab.in_ns(&lab.a.clone(), move || source(listen))?;
    let res = src.join().map_err(|_| "the source thread panicked")?;
    if res.is_err() {
        // It may never have connected: the destination would wait forever.
        let _ = dest.kill();
    }
    let status = dest.wait()?;
    res?;
    if !status.success() {
        return Err("the destination failed".into());
    }
    Ok(())
}
