//! Runtime probing of what this kernel and this process may do. Runs once
//! per process ([`capabilities`]); never a compile-time feature.
//!
//! # Safety
//!
//! The probe registers scratch mappings that nothing else can see.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use serde::Serialize;

use crate::errno::Errno;
use crate::flags::{Features, Ioctls, RegisterMode};
use crate::mm::{AnonOptions, HugePageSize, Mapping, memfd_create};
use crate::pagemap::Pagemap;
use crate::{CreateError, Source, UffdBuilder};

/// How this process may create a userfaultfd.
#[derive(Debug, Clone, Serialize)]
pub struct Access {
    /// Effective uid.
    pub euid: u32,
    /// `/dev/userfaultfd` exists.
    pub device_present: bool,
    /// Opening it failed with this errno (None: it opened).
    pub device_error: Option<String>,
    /// `userfaultfd(2)` without USER_MODE_ONLY failed with this errno (None: it worked).
    pub syscall_error: Option<String>,
    /// `userfaultfd(2)` with USER_MODE_ONLY works.
    pub user_mode_only_works: bool,
    /// `vm.unprivileged_userfaultfd`, when readable.
    pub unprivileged_sysctl: Option<u8>,
    /// The process has CAP_SYS_PTRACE (needed for EVENT_FORK, and for the syscall
    /// when the sysctl is 0).
    pub cap_sys_ptrace: bool,
    /// The source of a full (kernel-mode) userfaultfd, if any works.
    pub full_source: Option<Source>,
}

impl Access {
    /// Whether a full userfaultfd (one that also serves kernel-mode and KVM
    /// faults) can be created.
    pub fn full(&self) -> bool {
        self.full_source.is_some()
    }

    /// What is wrong and how to fix it, one line each; empty when all is well.
    pub fn advice(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.full() {
            if !self.cap_sys_ptrace {
                out.push(
                    "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE: fork events are unavailable"
                        .into(),
                );
            }
            return out;
        }
        out.push(format!(
            "this process (euid {}) cannot create a full userfaultfd: /dev/userfaultfd {}; userfaultfd(2) {}",
            self.euid,
            match (&self.device_present, &self.device_error) {
                (false, _) => "does not exist (Linux < 6.1)".to_string(),
                (true, Some(e)) => format!("failed: {e}"),
                (true, None) => "opened".to_string(),
            },
            self.syscall_error.as_deref().map_or("worked".into(), |e| format!("failed: {e}")),
        ));
        if self.device_present {
            out.push(
                "fix: grant this user read/write access to /dev/userfaultfd (e.g. `groupadd userfaultfd; chgrp userfaultfd /dev/userfaultfd; chmod 660 /dev/userfaultfd` and add the user to the group, or `setfacl -m u:USER:rw /dev/userfaultfd`)".into(),
            );
        }
        if self.unprivileged_sysctl == Some(0) {
            out.push("or fix: `sysctl -w vm.unprivileged_userfaultfd=1` (currently 0)".into());
        }
        if !self.cap_sys_ptrace {
            out.push(
                "or fix: run with CAP_SYS_PTRACE (e.g. as root, or `setcap cap_sys_ptrace+ep`)"
                    .into(),
            );
        }
        if self.user_mode_only_works {
            out.push(
                "a user-mode-only userfaultfd works, but it cannot serve faults taken in kernel mode: syscalls touching the memory get EFAULT and KVM guests cannot be served".into(),
            );
        }
        out
    }
}

/// The register ioctls one memory type offers for one mode.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterProbe {
    /// "anon", "shmem", "hugetlb".
    pub memory: &'static str,
    /// MISSING / WP / MINOR.
    pub mode: String,
    /// The ioctls returned, or why registration failed.
    pub result: Result<Vec<&'static str>, String>,
}

/// Everything the probe learned.
#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel_release: String,
    /// Permission situation.
    pub access: Access,
    /// Every feature the kernel reports (empty when no uffd could be created).
    #[serde(serialize_with = "ser_features")]
    pub features: Features,
    /// The fd-level ioctls.
    #[serde(serialize_with = "ser_ioctls")]
    pub api_ioctls: Ioctls,
    /// PAGEMAP_SCAN exists.
    pub pagemap_scan: bool,
    /// Registration results per memory type and mode.
    pub register: Vec<RegisterProbe>,
    /// uffd-wp bits survive [`crate::Uffd::unregister_keeping_protection`],
    /// so a tracker can hand its protection to another userfaultfd without
    /// walking page tables (live checkpoints use it).
    pub wp_handover: bool,
    /// The error that stopped the probe from creating a uffd, if any.
    pub create_error: Option<String>,
}

fn ser_features<S: serde::Serializer>(f: &Features, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(f.names())
}
fn ser_ioctls<S: serde::Serializer>(f: &Ioctls, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(f.names())
}

impl Capabilities {
    /// Whether the kernel supports every feature in `f`.
    pub fn has(&self, f: Features) -> bool {
        self.features.contains(f)
    }
}

static CAPS: OnceLock<Capabilities> = OnceLock::new();

/// The process-wide probe result (computed on first call).
pub fn capabilities() -> &'static Capabilities {
    CAPS.get_or_init(probe)
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether the effective capability set has CAP_SYS_PTRACE (bit 19).
pub fn has_cap_sys_ptrace() -> bool {
    read_trim("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 19) != 0)
}

fn euid() -> u32 {
    read_trim("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn err_string(e: &CreateError) -> String {
    match e.errno() {
        Some(errno) => errno.to_string(),
        None => e.to_string(),
    }
}

/// Runs the probe (uncached).
pub fn probe() -> Capabilities {
    let device = UffdBuilder::new().source(Source::Device).open_raw();
    let syscall = UffdBuilder::new().source(Source::Syscall).open_raw();
    let umo = UffdBuilder::new()
        .source(Source::Syscall)
        .user_mode_only(true)
        .open_raw();
    let full_source = if device.is_ok() {
        Some(Source::Device)
    } else if syscall.is_ok() {
        Some(Source::Syscall)
    } else {
        None
    };
    let device_error = match &device {
        Ok(_) => None,
        Err(CreateError::PermissionDenied { device, .. }) => Some(device.to_string()),
        Err(e) => Some(err_string(e)),
    };
    let access = Access {
        euid: euid(),
        device_present: std::path::Path::new("/dev/userfaultfd").exists(),
        device_error,
        syscall_error: syscall.as_ref().err().map(err_string),
        user_mode_only_works: umo.is_ok(),
        unprivileged_sysctl: read_trim("/proc/sys/vm/unprivileged_userfaultfd")
            .and_then(|s| s.parse().ok()),
        cap_sys_ptrace: has_cap_sys_ptrace(),
        full_source,
    };
    let mut caps = Capabilities {
        kernel_release: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        access,
        features: Features::empty(),
        api_ioctls: Ioctls::empty(),
        pagemap_scan: Pagemap::is_supported(),
        register: Vec::new(),
        wp_handover: false,
        create_error: None,
    };
    // Learn the feature set on a scratch fd (UFFDIO_API succeeds once per fd);
    // fall back to a user-mode-only fd so an unprivileged probe still reports it.
    let scratch = UffdBuilder::new().create().or_else(|e| {
        caps.create_error = Some(e.to_string());
        UffdBuilder::new().user_mode_only(true).create()
    });
    if let Ok(u) = &scratch {
        caps.features = u.supported_features();
        caps.api_ioctls = u.api_ioctls();
    }
    if scratch.is_ok() {
        caps.register = probe_register();
    }
    if caps.features.contains(Features::WP_ASYNC) && caps.pagemap_scan {
        caps.wp_handover = probe_wp_handover().unwrap_or(false);
    }
    caps
}

/// Protects a touched page under one async userfaultfd, hands it over with
/// [`crate::Uffd::unregister_keeping_protection`] to a second one, and asks
/// PAGEMAP_SCAN whether the page still reads as protected (not written).
fn probe_wp_handover() -> Result<bool, Box<dyn std::error::Error>> {
    use crate::pagemap::ScanRequest;
    let page = crate::mm::page_size();
    let m = Mapping::anonymous(page, AnonOptions::default())?;
    // SAFETY: the mapping is ours and live; one byte inside it is written.
    unsafe { m.as_ptr().write_volatile(1) };
    let start = m.addr() as u64;
    let end = start + page as u64;
    let create = || {
        UffdBuilder::new()
            .non_blocking(true)
            .features(Features::WP_ASYNC)
            .create()
    };
    let (a, b) = (create()?, create()?);
    // SAFETY: the probe mapping is private to this function and not touched
    // while registered; both registrations end before it is unmapped.
    unsafe { a.register(m.addr(), page, RegisterMode::WP) }?;
    let mut pm = Pagemap::open_self()?;
    // The harvest protects the page (it reads as written before).
    let before = pm.scan(ScanRequest::harvest_written(start, end)).count();
    a.unregister_keeping_protection(m.addr(), page)?;
    // SAFETY: as above.
    unsafe { b.register(m.addr(), page, RegisterMode::WP) }?;
    let after = pm.scan(ScanRequest::written(start, end)).count();
    b.unregister(m.addr(), page)?;
    Ok(before == 1 && after == 0)
}

/// A scratch mapping (and the memfd behind it, kept open while it is probed).
type ProbeMapping = Result<(Mapping, Option<std::fs::File>), Errno>;

fn probe_register() -> Vec<RegisterProbe> {
    let mut out = Vec::new();
    let modes = [
        ("MISSING", RegisterMode::MISSING),
        ("WP", RegisterMode::WP),
        ("MINOR", RegisterMode::MINOR),
    ];
    let huge = HugePageSize::Size2M.bytes();
    let mappings: [(&str, ProbeMapping); 3] = [
        (
            "anon",
            Mapping::anonymous(huge, AnonOptions::default()).map(|m| (m, None)),
        ),
        (
            "shmem",
            memfd_create("livepage-probe", None).and_then(|f| {
                f.set_len(huge as u64).map_err(Errno::from)?;
                Mapping::file(std::os::fd::AsFd::as_fd(&f), 0, huge, true).map(|m| (m, Some(f)))
            }),
        ),
        (
            "hugetlb",
            Mapping::anonymous(
                huge,
                AnonOptions {
                    shared: true,
                    hugetlb: Some(HugePageSize::Size2M),
                    ..Default::default()
                },
            )
            .map(|m| (m, None)),
        ),
    ];
    for (memory, mapping) in mappings {
        for (name, mode) in modes {
            let result = match &mapping {
                Err(e) => Err(format!("cannot map {memory} memory: {e}")),
                Ok((m, _)) => register_once(m, mode),
            };
            out.push(RegisterProbe {
                memory,
                mode: name.into(),
                result,
            });
        }
    }
    out
}

fn register_once(m: &Mapping, mode: RegisterMode) -> Result<Vec<&'static str>, String> {
    let u = UffdBuilder::new()
        .create()
        .or_else(|_| UffdBuilder::new().user_mode_only(true).create())
        .map_err(|e| e.to_string())?;
    // SAFETY: the probe mapping is private to this function, never touched while
    // registered, and unregistered when `u` is dropped below.
    let r = unsafe { u.register(m.addr(), m.len(), mode) };
    r.map(|i| i.names()).map_err(|e| e.errno().to_string())
}
