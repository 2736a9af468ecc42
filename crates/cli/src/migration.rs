//! What the migration commands share: the link's security options, the
//! progress bars that follow a migration's phases, and the report tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use livepage_migrate::{DestReport, ProgressView, Security, SourceReport, Stage};

use crate::table::{Table, mib};

/// How the link is secured.
#[derive(Debug, Args, Clone, Default)]
pub struct LinkArgs {
    /// Mutual TLS 1.3 with the credentials in DIR (ca-cert.pem, and
    /// server-cert.pem/server-key.pem on the destination,
    /// client-cert.pem/client-key.pem on the source; make a test set with
    /// `livepage tls-creds --out DIR`).
    #[arg(long, value_name = "DIR", conflicts_with = "insecure")]
    pub tls_creds: Option<std::path::PathBuf>,
    /// Plain TCP, unauthenticated and unencrypted: only on a trusted network.
    #[arg(long)]
    pub insecure: bool,
    /// Seconds post-copy waits for a lost link to come back (then the
    /// destination fails closed and the source resumes the guest; default 30).
    #[arg(long, value_name = "SECONDS")]
    pub recovery_timeout: Option<u64>,
}

impl LinkArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.tls_creds.is_none() && !self.insecure {
            bail!(
                "the link needs --tls-creds DIR (mutual TLS; make test credentials with `livepage tls-creds --out DIR`) or an explicit --insecure for plain TCP"
            );
        }
        if self.recovery_timeout == Some(0) {
            bail!("--recovery-timeout must be at least 1 second");
        }
        Ok(())
    }

    /// The source's security (it connects).
    pub fn client(&self, server_name: &str) -> anyhow::Result<Security> {
        self.check()?;
        match &self.tls_creds {
            Some(dir) => Security::tls_client(dir, server_name)
                .with_context(|| format!("loading TLS credentials from {}", dir.display())),
            None => Ok(Security::Insecure),
        }
    }

    /// The destination's security (it listens).
    pub fn server(&self) -> anyhow::Result<Security> {
        self.check()?;
        match &self.tls_creds {
            Some(dir) => Security::tls_server(dir)
                .with_context(|| format!("loading TLS credentials from {}", dir.display())),
            None => Ok(Security::Insecure),
        }
    }

    pub fn recovery(&self) -> Duration {
        Duration::from_secs(self.recovery_timeout.unwrap_or(30))
    }
}

/// Progress bars for a migration: a new bar per phase (and per pre-copy
/// round), with bytes, rate and time left. Hidden when stderr is not a
/// terminal.
pub struct Bars {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Bars {
    pub fn start(view: Arc<ProgressView>) -> Bars {
        use std::io::IsTerminal;
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            return Bars { stop, thread: None };
        }
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut current: Option<(Stage, u32, indicatif::ProgressBar)> = None;
            while !s.load(Ordering::Relaxed) {
                let p = view.get();
                let same = current
                    .as_ref()
                    .is_some_and(|(st, r, _)| *st == p.stage && *r == p.round);
                if !same {
                    if let Some((_, _, b)) = current.take() {
                        b.finish();
                    }
                    let b = indicatif::ProgressBar::new(p.total_bytes.max(1));
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{msg:>18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    let label = if p.stage == Stage::Precopy {
                        format!("pre-copy round {}", p.round)
                    } else {
                        p.stage.name().to_string()
                    };
                    b.set_message(label);
                    current = Some((p.stage, p.round, b));
                }
                if let Some((_, _, b)) = &current {
                    b.set_length(p.total_bytes.max(1));
                    b.set_position(p.done_bytes.min(p.total_bytes));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some((_, _, b)) = current {
                b.finish_and_clear();
            }
        });
        Bars {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The source's side of a migration, as table rows.
pub fn source_rows(t: &mut Table, r: &SourceReport) {
    t.row(["method".into(), r.method.clone()]);
    t.row([
        "link".into(),
        format!(
            "{}, {} bulk connection(s), rtt {:.2} ms, {:.1} MB/s measured",
            if r.tls {
                "mutual TLS 1.3"
            } else {
                "plain TCP (--insecure)"
            },
            r.connections,
            r.rtt_ms,
            r.bandwidth / 1e6
        ),
    ]);
    t.row([
        "guest RAM / touched".into(),
        format!("{} / {}", mib(r.ram_bytes), mib(r.touched_bytes)),
    ]);
    t.row(["total time".into(), format!("{:.1} ms", r.total_ms)]);
    t.row([
        "downtime".into(),
        format!(
            "{:.2} ms: last collect {:.2}, copy while paused {:.2}, device state to running {:.2} (pause hook {:.2} before)",
            r.downtime_ms,
            r.downtime_parts.collect_ms,
            r.downtime_parts.copy_ms,
            r.downtime_parts.resume_ms,
            r.pause_ms
        ),
    ]);
    for round in &r.rounds {
        t.row([
            format!("  round {}", round.round),
            format!(
                "{} in {:.0} ms; {} dirty after ({:.1} MB/s dirty, {:.1} MB/s link) -> {:?}",
                mib(round.pages_bytes),
                round.send_ms,
                mib(round.dirty_bytes),
                round.dirty_rate / 1e6,
                round.bandwidth / 1e6,
                round.decision
            ),
        ]);
    }
    t.row(["switch".into(), r.switch_reason.clone()]);
    t.row([
        "bytes".into(),
        format!(
            "pre-copy {}, switchover {}, post-copy {}; total {} = {:.3} x RAM",
            mib(r.bytes.precopy),
            mib(r.bytes.switchover),
            mib(r.bytes.postcopy),
            mib(r.bytes.total),
            r.bytes_per_ram
        ),
    ]);
    t.row([
        "pages".into(),
        format!(
            "{} with data, {} as zero ranges; compressed to {:.3}",
            r.data_pages, r.zero_pages, r.compression_ratio
        ),
    ]);
    if r.postcopy_pages > 0 {
        t.row([
            "post-copy".into(),
            format!(
                "{} pages: {} pushed, {} on demand ({} requests), {} sent again when asked again; {:.3} bytes per page byte",
                r.postcopy_pages,
                r.pushed_pages,
                r.demanded_pages,
                r.requests,
                r.asked_again_pages,
                r.postcopy_bytes_per_page_bytes
            ),
        ]);
    }
    if r.recoveries > 0 {
        t.row([
            "recoveries".into(),
            format!(
                "{} ({:?} ms), {} pages sent again",
                r.recoveries, r.recovery_ms, r.resent_pages
            ),
        ]);
    }
}

/// The destination's side, as table rows.
pub fn dest_rows(t: &mut Table, r: &DestReport) {
    t.row([
        "placement".into(),
        format!(
            "{} mode; {} pages pre-copied, {} in post-copy ({} pushed, {} kept current)",
            r.mode, r.precopy_pages, r.postcopy_pages, r.pushed_pages, r.kept_current
        ),
    ]);
    t.row([
        "remote faults".into(),
        format!(
            "{}: p50 {:.0} us, p99 {:.0} us, max {:.0} us; vCPUs blocked {:.1} ms",
            r.remote_faults, r.fault_p50_us, r.fault_p99_us, r.fault_max_us, r.blocked_ms
        ),
    ]);
    if !r.fault_histogram.is_empty() {
        let h: Vec<String> = r
            .fault_histogram
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(b, c)| format!("<{b}us:{c}"))
            .collect();
        t.row(["  histogram".into(), h.join(" ")]);
    }
    t.row([
        "switchover here".into(),
        format!(
            "{:.2} ms (device state to running), all resident {:.1} ms after",
            r.switchover_ms, r.postcopy_ms
        ),
    ]);
    if r.recoveries > 0 {
        t.row(["recoveries".into(), r.recoveries.to_string()]);
    }
}
