//! Handler threads, worker threads and their supervision.

use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use livepage_uffd::ReadError;
use livepage_uffd::poll::{EventFd, PollSet};

use crate::cx::{Cx, Fault, Reader};
use crate::error::{RuntimeError, panic_message};
use crate::policy::Policy;

/// How the runtime runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RuntimeOptions {
    /// Thread names start with this (Linux keeps 15 bytes of a name).
    pub name: String,
    /// Handler threads. With fewer threads than userfaultfds each thread
    /// polls several; with more, several threads poll each userfaultfd.
    pub threads: usize,
}

impl RuntimeOptions {
    /// `threads` handler threads named `name-N`.
    pub fn new(name: impl Into<String>, threads: usize) -> RuntimeOptions {
        RuntimeOptions {
            name: name.into(),
            threads,
        }
    }
}

/// What every thread of one runtime shares.
struct Supervisor<P: Policy> {
    policy: Arc<P>,
    failed: AtomicBool,
    first: Mutex<Option<RuntimeError>>,
}

impl<P: Policy> Supervisor<P> {
    /// Records a failure; the first one makes the policy fail closed.
    fn report(&self, e: RuntimeError) {
        let first = match self.first.lock() {
            Ok(mut slot) if slot.is_none() => {
                *slot = Some(e.clone());
                true
            }
            _ => false,
        };
        self.failed.store(true, Ordering::SeqCst);
        if first {
            let policy = &self.policy;
            let _ = catch_unwind(AssertUnwindSafe(|| policy.fail(&e)));
        }
    }

    /// Runs `body` on a worker; a panic is reported, and the faults the
    /// worker read while draining are served before it goes either way.
    fn supervise<R>(
        &self,
        thread: &str,
        worker: &mut Worker<P>,
        body: impl FnOnce(&P, &mut Worker<P>) -> R,
    ) -> Option<R> {
        let policy = &*self.policy;
        let r = catch_unwind(AssertUnwindSafe(|| {
            let r = body(policy, worker);
            worker.serve_pending(policy);
            r
        }));
        match r {
            Ok(r) => Some(r),
            Err(p) => {
                self.report(RuntimeError::Panicked {
                    thread: thread.to_string(),
                    message: panic_message(p.as_ref()),
                });
                // Nobody else will see the faults this worker read.
                for (fd, pf) in worker.reader.pending.drain(..) {
                    policy.fault_after_failure(&Fault {
                        fd,
                        fault: pf,
                        batch: 1,
                    });
                }
                None
            }
        }
    }
}

/// The state of a thread that serves faults: its reader and its policy's
/// per-thread state. Engine threads that place pages themselves (a
/// prefetcher, a collect) use one to drain events and serve what they read.
pub struct Worker<P: Policy> {
    reader: Reader,
    /// The policy's state for this thread.
    pub local: P::Local,
}

impl<P: Policy> std::fmt::Debug for Worker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("pending", &self.reader.pending.len())
            .finish_non_exhaustive()
    }
}

impl<P: Policy> Worker<P> {
    /// A worker with fresh buffers.
    pub fn new(policy: &P) -> Worker<P> {
        Worker {
            reader: Reader::new(),
            local: policy.local(),
        }
    }

    /// The serving context and the thread state, to call the policy's own
    /// placement code from a worker thread.
    pub fn split<'a>(&'a mut self, policy: &'a P) -> (Cx<'a, P>, &'a mut P::Local) {
        (
            Cx {
                policy,
                reader: &mut self.reader,
            },
            &mut self.local,
        )
    }

    /// Serves the faults drains read (and any they read in turn), then
    /// tells the policy the batch is done.
    pub fn serve_pending(&mut self, policy: &P) {
        while let Some((fd, fault)) = self.reader.pending.pop() {
            let batch = self.reader.pending.len() + 1;
            let (mut cx, local) = self.split(policy);
            policy.fault(&mut cx, local, Fault { fd, fault, batch });
        }
        let (mut cx, local) = self.split(policy);
        policy.batch_done(&mut cx, local);
    }

    /// Reads `fd`'s events and serves them: discards and the like first (in
    /// the order read), then the faults as one batch, then the faults their
    /// drains read.
    fn serve_read(&mut self, policy: &P, fd: usize) -> Result<(), ReadError> {
        self.reader.read_batch(policy, fd)?;
        let mut batch = std::mem::take(&mut self.reader.batch);
        let n = batch.len();
        for pf in batch.drain(..) {
            let (mut cx, local) = self.split(policy);
            policy.fault(
                &mut cx,
                local,
                Fault {
                    fd,
                    fault: pf,
                    batch: n,
                },
            );
        }
        self.reader.batch = batch;
        self.serve_pending(policy);
        Ok(())
    }
}

/// Handler threads serving one policy's userfaultfds. Dropping it stops
/// them.
pub struct Runtime<P: Policy> {
    sup: Arc<Supervisor<P>>,
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    name: String,
}

impl<P: Policy> std::fmt::Debug for Runtime<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("name", &self.name)
            .field("threads", &self.threads.len())
            .field("failed", &self.has_failed())
            .finish_non_exhaustive()
    }
}

impl<P: Policy> Runtime<P> {
    /// Starts the handler threads. Thread `i` polls userfaultfds
    /// `i, i+T, i+2T, …` (T threads), or `i mod F` when there are more
    /// threads than userfaultfds.
    pub fn start(policy: Arc<P>, opts: RuntimeOptions) -> Result<Runtime<P>, RuntimeError> {
        let stop = Arc::new(EventFd::new().map_err(|e| RuntimeError::Poll {
            thread: opts.name.clone(),
            errno: e,
        })?);
        let sup = Arc::new(Supervisor {
            policy,
            failed: AtomicBool::new(false),
            first: Mutex::new(None),
        });
        let mut rt = Runtime {
            sup,
            stop,
            threads: Vec::new(),
            name: opts.name.clone(),
        };
        let nfds = rt.sup.policy.fds().len();
        let threads = opts.threads.max(1);
        for i in 0..threads {
            let mine: Vec<usize> = if nfds == 0 {
                Vec::new()
            } else if threads >= nfds {
                vec![i % nfds]
            } else {
                (0..nfds).filter(|f| f % threads == i).collect()
            };
            let name = format!("{}-{i}", opts.name);
            let (sup, stop, n2) = (rt.sup.clone(), rt.stop.clone(), name.clone());
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || handler_thread(&sup, &n2, &mine, &stop))
                .map_err(|e| RuntimeError::Spawn {
                    thread: name,
                    source: Arc::new(e),
                })?;
            rt.threads.push(h);
        }
        Ok(rt)
    }

    /// The policy.
    pub fn policy(&self) -> &Arc<P> {
        &self.sup.policy
    }

    /// Starts an engine thread that places pages too (a prefetcher, a
    /// writer): `body` runs with a [`Worker`] under the runtime's
    /// supervision (a panic is reported and fails the policy closed), and
    /// the faults it read while draining are served before it ends.
    pub fn spawn_worker(
        &self,
        name: impl Into<String>,
        body: impl FnOnce(&P, &mut Worker<P>) + Send + 'static,
    ) -> Result<JoinHandle<()>, RuntimeError> {
        let name = name.into();
        let (sup, n2) = (self.sup.clone(), name.clone());
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let policy = &*sup.policy;
                let Some(mut w) = catch_unwind(AssertUnwindSafe(|| Worker::new(policy))).ok()
                else {
                    sup.report(RuntimeError::Panicked {
                        thread: n2,
                        message: "making the thread's state panicked".into(),
                    });
                    return;
                };
                sup.supervise(&n2, &mut w, body);
            })
            .map_err(|e| RuntimeError::Spawn {
                thread: name,
                source: Arc::new(e),
            })
    }

    /// Runs `body` in the calling thread as a supervised worker. `None`
    /// when it panicked (the failure is reported as for any thread).
    pub fn run_worker<R>(&self, body: impl FnOnce(&P, &mut Worker<P>) -> R) -> Option<R> {
        let name = std::thread::current()
            .name()
            .unwrap_or("a worker")
            .to_string();
        let mut w = Worker::new(&*self.sup.policy);
        self.sup.supervise(&name, &mut w, body)
    }

    /// Whether a thread failed.
    pub fn has_failed(&self) -> bool {
        self.sup.failed.load(Ordering::SeqCst)
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<RuntimeError> {
        self.sup.first.lock().ok().and_then(|f| f.clone())
    }

    /// Stops the handler threads and joins them. Returns the first failure.
    pub fn stop(&mut self) -> Result<(), RuntimeError> {
        self.stop.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<P: Policy> Drop for Runtime<P> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn timeout_ms(d: Option<Duration>) -> i32 {
    match d {
        None => -1,
        Some(d) => d.as_millis().clamp(u128::from(!d.is_zero()), 60_000) as i32,
    }
}

/// One handler thread: wait, read, dispatch, until stopped. After a failure
/// it goes on reading events without the policy, so that nobody waits.
fn handler_thread<P: Policy>(sup: &Supervisor<P>, name: &str, mine: &[usize], stop: &EventFd) {
    let policy = &*sup.policy;
    let fds = policy.fds();
    let mut set = PollSet::new(mine.iter().map(|&i| fds[i].as_fd()).chain([stop.as_fd()]));
    let stop_at = mine.len();
    let mut worker = match catch_unwind(AssertUnwindSafe(|| Worker::new(policy))) {
        Ok(w) => Some(w),
        Err(p) => {
            sup.report(RuntimeError::Panicked {
                thread: name.to_string(),
                message: panic_message(p.as_ref()),
            });
            None
        }
    };
    let mut spare = Reader::new();
    loop {
        let failed = sup.failed.load(Ordering::SeqCst);
        let timeout = match (&mut worker, failed) {
            (Some(w), false) => {
                match catch_unwind(AssertUnwindSafe(|| policy.idle(&mut w.local))) {
                    Ok(t) => timeout_ms(t),
                    Err(p) => {
                        sup.report(RuntimeError::Panicked {
                            thread: name.to_string(),
                            message: panic_message(p.as_ref()),
                        });
                        continue;
                    }
                }
            }
            _ => -1,
        };
        if let Err(errno) = set.wait(timeout) {
            sup.report(RuntimeError::Poll {
                thread: name.to_string(),
                errno,
            });
            return;
        }
        if set.ready(stop_at) {
            return;
        }
        for (k, &fd) in mine.iter().enumerate() {
            if !set.ready(k) {
                continue;
            }
            match (&mut worker, sup.failed.load(Ordering::SeqCst)) {
                (Some(w), false) => {
                    match catch_unwind(AssertUnwindSafe(|| w.serve_read(policy, fd))) {
                        Ok(Ok(())) => {}
                        Ok(Err(source)) => sup.report(RuntimeError::Read {
                            thread: name.to_string(),
                            fd,
                            source,
                        }),
                        Err(p) => {
                            sup.report(RuntimeError::Panicked {
                                thread: name.to_string(),
                                message: panic_message(p.as_ref()),
                            });
                            for (fd, pf) in w.reader.pending.drain(..) {
                                policy.fault_after_failure(&Fault {
                                    fd,
                                    fault: pf,
                                    batch: 1,
                                });
                            }
                        }
                    }
                }
                _ => {
                    // Failed: read on, answer faults without the policy's
                    // placement, drop the rest (a fork's fd is closed).
                    let res = spare.read_unserved(&fds[fd], |pf| {
                        let f = Fault {
                            fd,
                            fault: pf,
                            batch: 1,
                        };
                        let _ = catch_unwind(AssertUnwindSafe(|| policy.fault_after_failure(&f)));
                    });
                    if res.is_err() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}
