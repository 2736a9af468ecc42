//! The source after the switchover: serve post-copy (demand answers, the
//! background push) until the destination holds every page, and recover
//! from lost links without an operator: reconnect with backoff, learn what
//! the destination holds, send again exactly what it lacks. Past the
//! recovery timeout the guest is resumed here if the destination cannot
//! have finished (some page never left this side).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livepage_mem::RangeSet;

use super::Guest;
use super::control::{self, Event};
use super::postcopy::{self, Post};
use super::run::{Run, ms};
use crate::error::{FailedIn, MigrateError};
use crate::progress::Stage;
use crate::proto::frame::Kind;
use crate::proto::msg::Phase;

/// The post-copy in progress: its sets and its threads.
pub(super) struct Postcopy {
    pub(super) post: Arc<Post>,
    threads: Vec<JoinHandle<()>>,
}

impl Run {
    fn start_postcopy(&mut self, pc: &mut Postcopy) -> Result<(), MigrateError> {
        // Demand first: requests are answered from the source's own sets
        // while the stale list is still on its way.
        pc.threads.push(postcopy::spawn_demand(
            &self.link,
            self.shared.clone(),
            pc.post.clone(),
        )?);
        let rtt = self
            .shared
            .rtt
            .min()
            .unwrap_or(std::time::Duration::from_millis(1));
        let paced = self.shared.pace.then_some((&*self.shared.window, rtt));
        let b = control::send_list(
            &self.link.control,
            Kind::Stale,
            0,
            &pc.post.stale_sets(),
            paced,
        )?;
        self.shared.count(b);
        let (link, senders, shared, post) = (
            self.link.clone(),
            self.senders_arc(),
            self.shared.clone(),
            pc.post.clone(),
        );
        pc.threads.push(
            std::thread::Builder::new()
                .name("lp-push".into())
                .spawn(move || {
                    postcopy::push(&link, &senders, &shared, &post);
                })
                .map_err(crate::error::spawn_err("lp-push"))?,
        );
        Ok(())
    }

    fn stop_postcopy(&mut self, pc: &mut Postcopy) {
        self.link.fail("stopping post-copy");
        for t in pc.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Waits until the destination reports every page resident, serving
    /// post-copy if `post` is given, recovering lost links.
    pub(super) fn wait_resident(
        &mut self,
        post: Option<Arc<Post>>,
        switched: bool,
        guest: &mut dyn Guest,
    ) -> Result<(), MigrateError> {
        let mut pc = post.map(|post| Postcopy {
            post,
            threads: Vec::new(),
        });
        if let Some(pc) = pc.as_mut() {
            let total = pc.post.stale_count() * self.page_bytes();
            self.progress.stage(Stage::Postcopy, 0, total);
            let started = if switched {
                self.start_postcopy(pc)
            } else {
                Err(MigrateError::Aborted {
                    peer: self.dial.to,
                    reason: "the switchover could not be sent".into(),
                })
            };
            if let Err(e) = started {
                self.stop_postcopy(pc);
                if self.recover(Some(pc), guest, e)? {
                    return Ok(());
                }
            }
        }
        loop {
            if let Some(pc) = &pc {
                let sent = pc.post.stale_count() - pc.post.unsent();
                self.progress.set_done(sent * self.page_bytes());
            }
            let ev = self.wait_for(FailedIn::Postcopy, false, |e| {
                matches!(e, Event::Resumed(_) | Event::Resident(_))
            });
            match ev {
                Ok(Event::Resumed(at)) => {
                    if let Some(t) = self.t_paused {
                        // One clock: the destination's resume time in ours
                        // (offset from the fastest heartbeat round trip),
                        // else arrival less half a round trip.
                        self.report.downtime_ms = match (self.rtt.offset_ns(), self.paused_unix_ns)
                        {
                            (Some(off), Some(p)) => {
                                (at as i64 - off - p as i64).max(0) as f64 / 1e6
                            }
                            _ => {
                                let half_rtt = Duration::from_secs_f64(self.rtt.median_ms() / 2e3);
                                ms(t.elapsed().saturating_sub(half_rtt))
                            }
                        };
                        let p = &mut self.report.downtime_parts;
                        p.resume_ms = (self.report.downtime_ms - p.collect_ms - p.copy_ms).max(0.0);
                    }
                    self.retired = None;
                }
                Ok(Event::Resident(dest)) => {
                    if let Some(pc) = pc.as_mut() {
                        self.report.pushed_pages =
                            pc.post.pushed.load(std::sync::atomic::Ordering::Relaxed);
                        self.report.demanded_pages =
                            pc.post.demanded.load(std::sync::atomic::Ordering::Relaxed);
                        self.report.requests =
                            pc.post.requests.load(std::sync::atomic::Ordering::Relaxed);
                        self.report.asked_again_pages = pc
                            .post
                            .asked_again
                            .load(std::sync::atomic::Ordering::Relaxed);
                        self.stop_postcopy(pc);
                    }
                    self.dest_report = *dest;
                    return Ok(());
                }
                Ok(_) => {}
                Err(MigrateError::LinkLost { source, .. }) => {
                    if let Some(pc) = pc.as_mut() {
                        self.stop_postcopy(pc);
                    }
                    if self.recover(pc.as_mut(), guest, *source)? {
                        // The destination holds every page already (its
                        // "resident" went down with the old link).
                        return Ok(());
                    }
                }
                Err(e) => {
                    if let Some(pc) = pc.as_mut() {
                        self.stop_postcopy(pc);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn page_bytes(&self) -> u64 {
        self.regions.first().map_or(4096, |r| r.page_size() as u64)
    }

    /// The switchover frame could not be sent: find out whether it arrived.
    /// Returns whether the destination is complete already.
    pub(super) fn recover_switchover(
        &mut self,
        seen: MigrateError,
        guest: &mut dyn Guest,
    ) -> Result<bool, MigrateError> {
        self.recover(None, guest, seen)
    }

    /// Reconnects until the recovery timeout; then resumes the guest here
    /// if the destination cannot have finished. Ok(true): the destination
    /// says it holds every page.
    fn recover(
        &mut self,
        mut pc: Option<&mut Postcopy>,
        guest: &mut dyn Guest,
        seen: MigrateError,
    ) -> Result<bool, MigrateError> {
        let loss = Instant::now();
        let detected_unix_ms = crate::stats::unix_ms();
        let mut attempts = 0u32;
        self.progress.set_stage(Stage::Recovering);
        self.stop_threads();
        // The destination fails closed `recovery_timeout` after it saw the
        // loss (within `dead_after` of ours); this side waits longer.
        let live = self.opts.liveness;
        let deadline =
            loss + self.opts.recovery_timeout + live.dead_after * 2 + Duration::from_secs(1);
        let mut backoff = Duration::from_millis(50);
        let mut generation = self.link.generation;
        loop {
            if Instant::now() >= deadline {
                let can_resume = pc.as_ref().is_some_and(|p| p.post.unsent() > 0);
                if can_resume {
                    guest.resume().map_err(|source| MigrateError::Hook {
                        op: "resume",
                        source,
                    })?;
                }
                return Err(MigrateError::RecoveryTimedOut {
                    after: loss.elapsed(),
                    guest_resumed_here: can_resume,
                    at_destination: false,
                });
            }
            generation += 1;
            attempts += 1;
            let (link, welcome) = match control::connect(&self.dial, generation) {
                Ok(x) => x,
                Err(MigrateError::Refused { peer, reason }) => {
                    // The destination gave up (its own timeout): the guest
                    // is failed closed there.
                    let can_resume = pc.as_ref().is_some_and(|p| p.post.unsent() > 0);
                    if can_resume {
                        guest.resume().map_err(|source| MigrateError::Hook {
                            op: "resume",
                            source,
                        })?;
                    }
                    return Err(MigrateError::Aborted { peer, reason });
                }
                Err(_) => {
                    std::thread::sleep(
                        backoff.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            };
            self.link = link;
            self.start_threads()?;
            match welcome.phase {
                Phase::Precopy => {
                    // The device state never arrived: the guest is here.
                    return self.give_back(guest, seen).map(|()| false);
                }
                Phase::Complete => {
                    self.report.recoveries += 1;
                    self.report.recovery_ms.push(ms(loss.elapsed()));
                    return Ok(true);
                }
                Phase::Postcopy => {
                    if let Some(pc) = pc.as_deref_mut() {
                        match self.collect_have() {
                            Ok(have) => {
                                self.report.resent_pages += pc.post.resend_missing(&have);
                            }
                            Err(_) => {
                                self.stop_threads();
                                continue;
                            }
                        }
                        if self.start_postcopy(pc).is_err() {
                            self.stop_postcopy(pc);
                            self.stop_threads();
                            continue;
                        }
                    }
                }
            }
            self.report.recoveries += 1;
            self.report.recovery_ms.push(ms(loss.elapsed()));
            self.report
                .recovery_events
                .push(crate::stats::RecoveryEvent {
                    detected_unix_ms,
                    recovered_unix_ms: crate::stats::unix_ms(),
                    attempts,
                });
            self.progress.set_stage(if pc.is_some() {
                Stage::Postcopy
            } else {
                Stage::Switchover
            });
            return Ok(false);
        }
    }

    /// The destination's list of pages it holds, after a reconnect.
    fn collect_have(&mut self) -> Result<Vec<RangeSet>, MigrateError> {
        let mut have: Vec<RangeSet> = self.regions.iter().map(|_| RangeSet::new()).collect();
        loop {
            let ev = self.wait_for(FailedIn::Postcopy, false, |e| {
                matches!(e, Event::Have { .. })
            })?;
            if let Event::Have {
                region,
                ranges,
                last,
            } = ev
            {
                for (a, b) in ranges {
                    have[region].insert(a, b);
                }
                if last {
                    return Ok(have);
                }
            }
        }
    }
}
