//! `livepage bench migrate`: live migration of the test VM between two
//! network namespaces (livepage-netlab: veth shaped with tc tbf; a relay
//! adding the round trip), `vm run --migrate-to` in one and `vm receive`
//! in the other, every run checked against the host reference.
//!
//! For each link (1 Gbit/s; 100 Mbit/s with 10 ms of round trip) and each
//! write rate of the guest (idle; below, near and above the link's
//! bandwidth, in pages dirtied per second), each method: stop-and-copy
//! (the baseline: what a VMM without live migration does), pre-copy,
//! post-copy in missing mode (anon) and minor mode (shmem), hybrid (minor
//! mode).
//! Reported: total time, downtime, bytes on the wire ÷ guest RAM and ÷
//! touched memory, remote-fault p50/p99, the guest's progress during the
//! migration against undisturbed, and the physical limit: touched bytes ÷
//! bandwidth. Then a switchover with a ~100 MiB final dirty set in both
//! post-copy modes (missing mode must drop the stale copies before the
//! guest resumes; minor mode does not wait).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepage_netlab::Lab;
use serde::Serialize;

use crate::args::parse_size;
use crate::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkArg {
    /// 1 Gbit/s, no added latency.
    #[value(name = "1g")]
    Gbit,
    /// 100 Mbit/s with 10 ms of added round trip.
    #[value(name = "100m")]
    Mbit100,
}

impl LinkArg {
    fn mbit(self) -> u64 {
        match self {
            LinkArg::Gbit => 1000,
            LinkArg::Mbit100 => 100,
        }
    }
    fn one_way(self) -> Duration {
        match self {
            LinkArg::Gbit => Duration::ZERO,
            LinkArg::Mbit100 => Duration::from_millis(5),
        }
    }
    fn bytes_per_sec(self) -> f64 {
        self.mbit() as f64 * 1e6 / 8.0
    }
    fn name(self) -> &'static str {
        match self {
            LinkArg::Gbit => "1 Gbit/s",
            LinkArg::Mbit100 => "100 Mbit/s +10 ms",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateArg {
    /// 2% of the link's bandwidth in dirtied pages.
    Idle,
    /// Half the bandwidth.
    Below,
    /// 90% of it.
    Near,
    /// Twice the bandwidth (or as fast as the guest goes).
    Above,
}

impl RateArg {
    fn share(self) -> f64 {
        match self {
            RateArg::Idle => 0.02,
            RateArg::Below => 0.5,
            RateArg::Near => 0.9,
            RateArg::Above => 2.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMethod {
    StopAndCopy,
    Precopy,
    PostcopyMissing,
    PostcopyMinor,
    Hybrid,
}

impl BenchMethod {
    fn args(self) -> (&'static str, &'static str, &'static str) {
        // (method, memory, mode)
        match self {
            BenchMethod::StopAndCopy => ("stop-and-copy", "anon", "missing"),
            BenchMethod::Precopy => ("precopy", "anon", "missing"),
            BenchMethod::PostcopyMissing => ("postcopy", "anon", "missing"),
            BenchMethod::PostcopyMinor => ("postcopy", "shmem", "minor"),
            // Hybrid as we recommend it: minor mode, whose downtime does not
            // grow with the final dirty set (the switchover table shows
            // missing mode's).
            BenchMethod::Hybrid => ("hybrid", "shmem", "minor"),
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// Guest RAM (2 vCPUs).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub mem: u64,
    /// Share of RAM the guest has touched when the migration starts.
    #[arg(long, default_value_t = 25)]
    pub touched_percent: u64,
    /// Links.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["1g", "100m"])]
    pub links: Vec<LinkArg>,
    /// Write rates.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["idle", "below", "near", "above"])]
    pub rates: Vec<RateArg>,
    /// Methods.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["stop-and-copy", "precopy", "postcopy-missing", "postcopy-minor", "hybrid"])]
    pub methods: Vec<BenchMethod>,
    /// Pre-copy rounds before pre-copy gives up.
    #[arg(long, default_value_t = 4)]
    pub max_rounds: u32,
    /// Skip the final-dirty-set comparison of the post-copy modes.
    #[arg(long)]
    pub no_switchover_table: bool,
    /// JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrateRow {
    pub link: String,
    pub rate: RateArg,
    /// Pages the guest was set to dirty per second (0: as fast as it goes).
    pub target_pages_per_sec: u64,
    pub method: BenchMethod,
    /// "ok", "not converging", or the failure.
    pub outcome: String,
    pub total_s: f64,
    pub downtime_ms: f64,
    /// The downtime's parts: final collect, copy while paused, resume.
    pub collect_ms: f64,
    pub copy_ms: f64,
    pub resume_ms: f64,
    pub bytes_per_ram: f64,
    pub bytes_per_touched: f64,
    /// Post-copy bytes ÷ the post-copy set's page bytes (1.0: each page
    /// once; below 1: zero pages without payload).
    pub postcopy_bytes_per_page: f64,
    pub rounds: usize,
    /// The last round's measured dirty rate, MB/s.
    pub dirty_mb_s: f64,
    pub postcopy_pages: u64,
    pub remote_faults: u64,
    pub fault_p50_ms: f64,
    pub fault_p99_ms: f64,
    /// Heartbeat round trips' p99 over the same link, ms.
    pub rtt_p99_ms: f64,
    /// The lab relay's own lateness against its delay line, p99, ms
    /// (None without a relay): the part of a latency that is the lab's.
    pub relay_late_p99_ms: Option<f64>,
    /// Guest steps during the migration ÷ undisturbed steps in that time;
    /// None where the guest reports progress too rarely for that time
    /// (every 1024 steps: a throttled guest over a short migration).
    pub guest_progress: Option<f64>,
    /// Touched bytes ÷ bandwidth, s.
    pub limit_s: f64,
    pub checksum_ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchRow {
    pub mode: String,
    pub final_dirty_mib: f64,
    pub downtime_ms: f64,
    pub copy_while_paused_ms: f64,
    pub remote_faults: u64,
}

#[derive(Debug, Serialize)]
pub struct MigrateBench {
    pub mem_mib: u64,
    pub touched_mib: u64,
    pub vcpus: u32,
    /// Undisturbed guest speed, steps per second per vCPU.
    pub free_steps_per_sec: f64,
    pub rows: Vec<MigrateRow>,
    pub switchover: Vec<SwitchRow>,
}

const VCPUS: u32 = 2;

fn exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("finding the livepage binary")
}

/// Runs one process to its end; its exit code and JSON.
fn run_json(
    mut cmd: std::process::Command,
    name: &str,
    limit: Duration,
) -> anyhow::Result<(i32, serde_json::Value)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(out), &mut s);
        s
    });
    forward(
        child.stderr.take().context("stderr")?,
        name.to_string(),
        None,
    );
    let Some(status) = wait_for(&mut child, limit)? else {
        bail!("{name} did not finish within {limit:?}");
    };
    let text = reader.join().unwrap_or_default();
    Ok((
        status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

/// Waits for `child` to exit; kills it and returns None after `limit`.
fn wait_for(
    child: &mut std::process::Child,
    limit: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies a child's stderr lines to ours (prefixed) as they come, and to
/// `tx` if given.
fn forward(
    err: std::process::ChildStderr,
    name: String,
    tx: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if !l.starts_with("listening on")
                && !l.starts_with("receiving migration")
                && !l.starts_with("resumed here")
            {
                eprintln!("  {name}: {l}");
            }
            if let Some(tx) = &tx {
                let _ = tx.send(l);
            }
        }
    });
}

struct Plan {
    mem: u64,
    migrate_at: u64,
    touched: u64,
}

/// One migration in the lab: (source JSON, source exit, dest JSON, dest exit).
#[allow(clippy::too_many_arguments)]
fn migrate_once(
    lab: &Lab,
    via: Option<&livepage_netlab::Relay>,
    port: u16,
    plan: &Plan,
    (m, memory, mode): (&str, &str, &str),
    rate_per_vcpu: u64,
    iterations: u64,
    extra: &[&str],
) -> anyhow::Result<(serde_json::Value, i32, serde_json::Value, i32)> {
    let dest_addr = lab.sock_b(port);
    let mut d = lab.command(&lab.b, exe()?);
    d.args([
        "vm",
        "receive",
        "--insecure",
        "--json",
        "--memory",
        memory,
        "--mode",
        mode,
    ])
    .arg("--listen")
    .arg(dest_addr.to_string());
    if rate_per_vcpu > 0 {
        d.arg("--write-rate").arg(rate_per_vcpu.to_string());
    }
    let mut dest = d.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (tx, rx) = std::sync::mpsc::channel();
    forward(
        dest.stderr.take().context("stderr")?,
        "the destination".into(),
        Some(tx),
    );
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .context("the destination did not start")?;
        if l.contains("listening on") {
            break;
        }
    }
    let out = dest.stdout.take().context("stdout")?;
    let dest_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(out), &mut s);
        s
    });
    // A relay (on the first host) forwards to the destination's address.
    let to = match via {
        Some(r) => r.addr(),
        None => dest_addr,
    };
    let mut s = lab.command(&lab.a, exe()?);
    s.args([
        "vm",
        "run",
        "--insecure",
        "--json",
        "--compress",
        "none",
        "--migration",
        m,
        "--memory",
        memory,
    ])
    .args([
        "--mem",
        &plan.mem.to_string(),
        "--vcpus",
        &VCPUS.to_string(),
    ])
    .args([
        "--iterations",
        &iterations.to_string(),
        "--migrate-at",
        &plan.migrate_at.to_string(),
    ])
    .args(["--migrate-to", &to.to_string()])
    .args(extra);
    if rate_per_vcpu > 0 {
        s.arg("--write-rate").arg(rate_per_vcpu.to_string());
    }
    let (sc, sj) = run_json(s, "the source", Duration::from_secs(600))?;
    let dc = wait_for(&mut dest, Duration::from_secs(600))?
        .and_then(|st| st.code())
        .unwrap_or(-1);
    let dj = serde_json::from_str(&dest_reader.join().unwrap_or_default())
        .unwrap_or(serde_json::Value::Null);
    Ok((sj, sc, dj, dc))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Runs the benchmark.
pub fn run(args: &MigrateBenchArgs) -> anyhow::Result<MigrateBench> {
    if let Some(why) = Lab::available() {
        bail!("bench migrate needs two network namespaces: {why}");
    }
    livepage_testvm::check_host()?;
    if args.touched_percent == 0 || args.touched_percent >= 100 {
        bail!("--touched-percent must be 1 to 99");
    }
    let slice_pages = args.mem / u64::from(VCPUS) / 4096;
    let share = args.touched_percent as f64 / 100.0;
    let migrate_at = ((-(1.0 - share).ln()) * slice_pages as f64) as u64;
    let plan = Plan {
        mem: args.mem,
        migrate_at,
        touched: (share * args.mem as f64) as u64,
    };
    // Undisturbed speed: the same VM with no migration.
    let calib = 60_000u64;
    let mut c = std::process::Command::new(exe()?);
    c.args([
        "vm",
        "run",
        "--json",
        "--vcpus",
        &VCPUS.to_string(),
        "--mem",
        &args.mem.to_string(),
    ])
    .args(["--iterations", &calib.to_string()]);
    let (_, cj) = run_json(c, "the calibration run", Duration::from_secs(300))?;
    let free = calib as f64 / f(&cj["seconds"]).max(1e-3);
    eprintln!("undisturbed guest: {free:.0} steps/s per vCPU");
    let mut rows = Vec::new();
    let mut switchover = Vec::new();
    let mut port = 7100u16;
    for &link in &args.links {
        let lab = Lab::new()?;
        lab.shape(link.mbit(), 20)?;
        for &rate in &args.rates {
            let want = rate.share() * link.bytes_per_sec() / 4096.0 / f64::from(VCPUS);
            // Faster than the guest goes: let it run free.
            let per_vcpu = if want >= free * 0.9 {
                0
            } else {
                want.max(50.0) as u64
            };
            let speed = if per_vcpu == 0 { free } else { per_vcpu as f64 };
            let expect = plan.touched as f64 / link.bytes_per_sec() * 3.0 + 5.0;
            let iterations = plan.migrate_at + (speed * expect) as u64 + 2000;
            for &method in &args.methods {
                port += 1;
                // The relay forwards to one port: a fresh relay per run.
                let relay_now = if link.one_way() > Duration::ZERO {
                    Some(lab.relay(lab.sock_a(port + 1000), lab.sock_b(port), link.one_way())?)
                } else {
                    None
                };
                eprintln!("{} {:?} {:?}...", link.name(), rate, method);
                let rounds = args.max_rounds.to_string();
                let (sj, sc, dj, dc) = migrate_once(
                    &lab,
                    relay_now.as_ref(),
                    port,
                    &plan,
                    method.args(),
                    per_vcpu,
                    iterations,
                    &["--max-rounds", &rounds],
                )?;
                let mut r = row(link, rate, per_vcpu, method, &plan, &sj, sc, &dj, dc, free);
                r.relay_late_p99_ms = relay_now
                    .as_ref()
                    .map(|x| x.stats().late_p99_us as f64 / 1e3);
                rows.push(r);
            }
        }
        if link == LinkArg::Gbit && !args.no_switchover_table {
            for (spec, label) in [
                (("hybrid", "anon", "missing"), "missing (anon)"),
                (("hybrid", "shmem", "minor"), "minor (shmem)"),
            ] {
                port += 1;
                // One pre-copy round of the touched memory while the guest
                // dirties freely: ~100 MiB are stale at the switchover.
                let iterations = plan.migrate_at + (free * 6.0) as u64;
                let (sj, _, dj, dc) = migrate_once(
                    &lab,
                    None,
                    port,
                    &plan,
                    spec,
                    0,
                    iterations,
                    &["--max-rounds", "1"],
                )?;
                let r = &sj["migration"]["report"];
                switchover.push(SwitchRow {
                    mode: label.into(),
                    final_dirty_mib: f(&r["postcopy_pages"]) * 4096.0 / (1 << 20) as f64,
                    downtime_ms: f(&r["downtime_ms"]),
                    copy_while_paused_ms: f(&r["downtime_parts"]["copy_ms"]),
                    remote_faults: dj["migration_report"]["remote_faults"]
                        .as_u64()
                        .unwrap_or(0),
                });
                if dc != 0 {
                    eprintln!("warning: the {label} switchover run's destination failed");
                }
            }
        }
    }
    Ok(MigrateBench {
        mem_mib: args.mem >> 20,
        touched_mib: plan.touched >> 20,
        vcpus: VCPUS,
        free_steps_per_sec: free,
        rows,
        switchover,
    })
}

#[allow(clippy::too_many_arguments)]
fn row(
    link: LinkArg,
    rate: RateArg,
    per_vcpu: u64,
    method: BenchMethod,
    plan: &Plan,
    sj: &serde_json::Value,
    sc: i32,
    dj: &serde_json::Value,
    dc: i32,
    free: f64,
) -> MigrateRow {
    let m = &sj["migration"];
    let r = &m["report"];
    let d = &dj["migration_report"];
    let outcome = if sc == 0 && dc == 0 {
        "ok".to_string()
    } else if m["error"]
        .as_str()
        .is_some_and(|e| e.contains("did not converge"))
    {
        "not converging".to_string()
    } else {
        m["error"]
            .as_str()
            .unwrap_or("failed")
            .chars()
            .take(60)
            .collect()
    };
    let total_s = f(&r["total_ms"]) / 1e3;
    let ram = plan.mem as f64;
    let bytes = f(&r["bytes"]["total"]);
    let steps = |v: &serde_json::Value| -> f64 {
        v.as_array()
            .map_or(0.0, |a| a.iter().map(|x| x.as_f64().unwrap_or(0.0)).sum())
    };
    let src_steps = steps(&m["paused_at_steps"]) - steps(&m["at_steps"]);
    let dst_steps = f(&dj["steps_when_resident"]) - f(&dj["steps_at_resume"]);
    let speed = if per_vcpu == 0 { free } else { per_vcpu as f64 } * f64::from(VCPUS);
    let rounds = r["rounds"].as_array().map_or(0, Vec::len);
    MigrateRow {
        link: link.name().into(),
        rate,
        target_pages_per_sec: per_vcpu * u64::from(VCPUS),
        method,
        outcome,
        total_s,
        downtime_ms: f(&r["downtime_ms"]),
        collect_ms: f(&r["downtime_parts"]["collect_ms"]),
        copy_ms: f(&r["downtime_parts"]["copy_ms"]),
        resume_ms: f(&r["downtime_parts"]["resume_ms"]),
        postcopy_bytes_per_page: f(&r["postcopy_bytes_per_page_bytes"]),
        bytes_per_ram: bytes / ram,
        bytes_per_touched: bytes / plan.touched as f64,
        rounds,
        dirty_mb_s: r["rounds"]
            .as_array()
            .and_then(|a| a.last())
            .map_or(0.0, |x| f(&x["dirty_rate"]) / 1e6),
        postcopy_pages: r["postcopy_pages"].as_u64().unwrap_or(0),
        remote_faults: d["remote_faults"].as_u64().unwrap_or(0),
        fault_p50_ms: f(&d["fault_p50_us"]) / 1e3,
        fault_p99_ms: f(&d["fault_p99_us"]) / 1e3,
        rtt_p99_ms: f(&r["rtt_p99_ms"]),
        relay_late_p99_ms: None,
        guest_progress: (total_s > 0.0 && speed * total_s >= 10.0 * 1024.0 * f64::from(VCPUS))
            .then(|| (src_steps + dst_steps) / (speed * total_s)),
        limit_s: plan.touched as f64 / link.bytes_per_sec(),
        checksum_ok: dj["matches_reference"].as_bool().unwrap_or(false)
            || sj["matches_reference"].as_bool().unwrap_or(false),
    }
}

/// The tables.
pub fn render(b: &MigrateBench) -> String {
    let mut t = Table::new([
        "link",
        "rate",
        "pages/s",
        "method",
        "outcome",
        "total s",
        "limit s",
        "downtime ms",
        "collect/copy/resume ms",
        "bytes/RAM",
        "bytes/touched",
        "post-copy bytes/page",
        "rounds",
        "dirty MB/s",
        "post-copy pages",
        "remote faults",
        "fault p50 ms",
        "fault p99 ms",
        "heartbeat RTT p99 ms",
        "relay late p99 ms",
        "guest progress",
        "checksum",
    ]);
    for r in &b.rows {
        t.row([
            r.link.clone(),
            format!("{:?}", r.rate).to_lowercase(),
            if r.target_pages_per_sec == 0 {
                "free".into()
            } else {
                r.target_pages_per_sec.to_string()
            },
            format!("{:?}", r.method),
            r.outcome.clone(),
            format!("{:.2}", r.total_s),
            format!("{:.2}", r.limit_s),
            format!("{:.2}", r.downtime_ms),
            format!("{:.1}/{:.1}/{:.1}", r.collect_ms, r.copy_ms, r.resume_ms),
            format!("{:.3}", r.bytes_per_ram),
            format!("{:.3}", r.bytes_per_touched),
            if r.postcopy_pages == 0 {
                "-".into()
            } else {
                format!("{:.3}", r.postcopy_bytes_per_page)
            },
            r.rounds.to_string(),
            format!("{:.1}", r.dirty_mb_s),
            r.postcopy_pages.to_string(),
            r.remote_faults.to_string(),
            format!("{:.2}", r.fault_p50_ms),
            format!("{:.2}", r.fault_p99_ms),
            format!("{:.2}", r.rtt_p99_ms),
            r.relay_late_p99_ms
                .map_or("-".into(), |x| format!("{x:.2}")),
            r.guest_progress
                .map_or("-".into(), |p| format!("{:.0}%", p * 100.0)),
            if r.checksum_ok {
                "match".into()
            } else {
                "-".into()
            },
        ]);
    }
    let mut out = format!(
        "guest: {} MiB, {} vCPUs, {} MiB touched at the start; undisturbed {:.0} steps/s per vCPU\n\n{}",
        b.mem_mib,
        b.vcpus,
        b.touched_mib,
        b.free_steps_per_sec,
        t.render()
    );
    if !b.switchover.is_empty() {
        let mut s = Table::new([
            "post-copy mode (1 Gbit/s, hybrid, 1 round)",
            "final dirty MiB",
            "downtime ms",
            "of which paused copying ms",
            "remote faults",
        ]);
        for r in &b.switchover {
            s.row([
                r.mode.clone(),
                format!("{:.1}", r.final_dirty_mib),
                format!("{:.2}", r.downtime_ms),
                format!("{:.2}", r.copy_while_paused_ms),
                r.remote_faults.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&s.render());
    }
    out
}
