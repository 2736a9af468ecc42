//! The source a restore reads from, replaceable while it serves, and what
//! happens while it is lost: placements are given back and their faulting
//! threads wait (parked) until a new source comes or the deadline passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::options::OnSourceLoss;
use crate::source::{PageSource, SourceError};

/// What to do after a fatal source error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterLoss {
    /// The source was replaced meanwhile: read again.
    Retry,
    /// Wait for a replacement (give the placement back, park its range).
    Wait,
    /// Fail closed now.
    FailClosed,
}

/// A parked range: (userfaultfd, address, bytes), woken when a source comes.
pub(crate) type Parked = (usize, usize, usize);

#[derive(Default)]
struct Lost {
    since: Option<Instant>,
    cause: Option<SourceError>,
    parked: Vec<Parked>,
}

/// The current source, its generation, and the loss state.
pub(crate) struct Supply {
    current: RwLock<(Arc<dyn PageSource>, u64)>,
    on_loss: OnSourceLoss,
    is_lost: AtomicBool,
    lost: Mutex<Lost>,
}

impl Supply {
    pub(crate) fn new(source: Arc<dyn PageSource>, on_loss: OnSourceLoss) -> Supply {
        Supply {
            current: RwLock::new((source, 0)),
            on_loss,
            is_lost: AtomicBool::new(false),
            lost: Mutex::new(Lost::default()),
        }
    }

    /// The source to read from and its generation.
    pub(crate) fn get(&self) -> (Arc<dyn PageSource>, u64) {
        match self.current.read() {
            Ok(c) => (c.0.clone(), c.1),
            Err(p) => {
                let c = p.into_inner();
                (c.0.clone(), c.1)
            }
        }
    }

    /// Whether the source is lost (placements park).
    pub(crate) fn is_lost(&self) -> bool {
        self.is_lost.load(Ordering::Acquire)
    }

    /// A read from generation `generation` failed fatally.
    pub(crate) fn lose(&self, generation: u64, cause: &SourceError) -> AfterLoss {
        if self.get().1 != generation {
            return AfterLoss::Retry;
        }
        match self.on_loss {
            OnSourceLoss::FailClosed => AfterLoss::FailClosed,
            OnSourceLoss::WaitFor(_) => {
                let Ok(mut l) = self.lost.lock() else {
                    return AfterLoss::FailClosed;
                };
                if self.get().1 != generation {
                    return AfterLoss::Retry;
                }
                l.since.get_or_insert_with(Instant::now);
                l.cause.get_or_insert_with(|| cause.clone());
                self.is_lost.store(true, Ordering::Release);
                AfterLoss::Wait
            }
        }
    }

    /// Parks a range while the source is lost. False if it is not lost
    /// (any more): the caller reads now.
    pub(crate) fn park(&self, range: Parked) -> bool {
        let Ok(mut l) = self.lost.lock() else {
            return false;
        };
        if !self.is_lost() {
            return false;
        }
        l.parked.push(range);
        true
    }

    /// Installs a new source; returns the parked ranges, to be woken.
    pub(crate) fn replace(&self, source: Arc<dyn PageSource>) -> Vec<Parked> {
        let mut l = match self.lost.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        {
            let mut c = match self.current.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let generation = c.1 + 1;
            *c = (source, generation);
        }
        self.is_lost.store(false, Ordering::Release);
        l.since = None;
        l.cause = None;
        std::mem::take(&mut l.parked)
    }

    /// The cause and how long it has been lost, once past the deadline.
    pub(crate) fn past_deadline(&self) -> Option<(SourceError, Duration)> {
        let OnSourceLoss::WaitFor(limit) = self.on_loss else {
            return None;
        };
        if !self.is_lost() {
            return None;
        }
        let l = self.lost.lock().ok()?;
        let since = l.since?;
        let cause = l.cause.clone()?;
        (since.elapsed() > limit).then(|| (cause, since.elapsed()))
    }

    /// The ranges parked so far (they are woken by the caller, which fails
    /// them closed first).
    pub(crate) fn take_parked(&self) -> Vec<Parked> {
        self.lost
            .lock()
            .map(|mut l| std::mem::take(&mut l.parked))
            .unwrap_or_default()
    }
}
