//! What the runtime reports to its owner.

use livepage_uffd::{Errno, ReadError};

/// Why serving failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The policy panicked in a thread; the policy was told to fail closed.
    #[error("thread {thread} panicked while serving faults: {message}")]
    Panicked {
        /// The thread's name.
        thread: String,
        /// The panic's message.
        message: String,
    },
    /// Reading events failed; the thread stopped serving.
    #[error("thread {thread}: reading userfaultfd {fd}'s events failed")]
    Read {
        /// The thread's name.
        thread: String,
        /// Which userfaultfd.
        fd: usize,
        /// The cause.
        #[source]
        source: ReadError,
    },
    /// Waiting for events failed.
    #[error("thread {thread}: poll(2) failed: {errno}")]
    Poll {
        /// The thread's name.
        thread: String,
        /// The errno.
        errno: Errno,
    },
    /// A thread could not be started.
    #[error("starting thread {thread} failed: {source}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// The cause.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
