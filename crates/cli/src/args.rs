//! Argument types shared by several commands.

use clap::ValueEnum;
use livepage_mem::MemoryKind;

/// Which guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Each vCPU writes every page of its slice once.
    Touch,
    /// Seeded read-modify-writes of random words.
    Dirty,
}

/// Guest memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemoryArg {
    /// Private anonymous memory.
    Anon,
    /// Anonymous memory with transparent huge pages.
    Thp,
    /// memfd (shmem).
    Shmem,
    /// hugetlbfs memfd (2 MiB pages).
    Hugetlb,
}

impl From<MemoryArg> for MemoryKind {
    fn from(m: MemoryArg) -> MemoryKind {
        match m {
            MemoryArg::Anon => MemoryKind::Anon,
            MemoryArg::Thp => MemoryKind::Thp,
            MemoryArg::Shmem => MemoryKind::Shmem,
            MemoryArg::Hugetlb => MemoryKind::Hugetlb,
        }
    }
}

/// Background prefetch policy of a lazy restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrefetchArg {
    /// Only demand faults place pages.
    None,
    /// Fill untouched pages in address order, following the latest fault.
    Sequential,
    /// Replay the working set recorded on an earlier restore first, then as sequential.
    Recorded,
}

/// How a lazy restore resolves faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// UFFDIO_COPY into empty memory (any memory type).
    Missing,
    /// Fill the page cache through a second mapping, map with UFFDIO_CONTINUE
    /// (shmem, hugetlb).
    Minor,
}

impl From<ModeArg> for livepage_restore::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Missing => livepage_restore::Mode::Missing,
            ModeArg::Minor => livepage_restore::Mode::Minor,
        }
    }
}

/// Dirty-tracking backend for checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrackerArg {
    /// The best userfaultfd backend the kernel offers (WP_ASYNC + PAGEMAP_SCAN).
    Auto,
    /// Async write-protect with PAGEMAP_SCAN.
    WpAsync,
    /// Synchronous write-protect with a handler thread.
    SyncWp,
    /// KVM's dirty log (KVM_GET_DIRTY_LOG), what VMMs use today.
    KvmDirtyLog,
}

impl TrackerArg {
    /// The userfaultfd backend, when this is one.
    pub fn backend(self) -> Option<livepage_track::Backend> {
        match self {
            TrackerArg::WpAsync => Some(livepage_track::Backend::WpAsync),
            TrackerArg::SyncWp => Some(livepage_track::Backend::SyncWp),
            _ => None,
        }
    }
}

/// Parses `64M`, `1G`, `512MiB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64M or 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a count of at least 1 (threads, userfaultfds).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").unwrap_err().contains("unknown size unit"));
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").is_err());
    }
}
