//! `livepage probe`: what this kernel and this process can do.

use std::process::ExitCode;

use livepage_uffd::Features;
use livepage_uffd::probe::capabilities;
use serde::Serialize;

use crate::table::Table;

#[derive(Serialize)]
struct SystemFacts {
    hugetlb_2m_total: u64,
    hugetlb_2m_free: u64,
    thp_enabled: String,
    thp_defrag: String,
    kvm: Result<(), String>,
}

fn read_setting(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

fn kvm_access() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("/dev/kvm does not exist (no KVM on this host)".into())
        }
        Err(e) => Err(format!(
            "cannot open /dev/kvm: {e} (add the user to the `kvm` group)"
        )),
    }
}

fn facts() -> SystemFacts {
    SystemFacts {
        hugetlb_2m_total: livepage_mem::hugetlb::total_pages(),
        hugetlb_2m_free: livepage_mem::hugetlb::free_pages(),
        thp_enabled: read_setting("/sys/kernel/mm/transparent_hugepage/enabled"),
        thp_defrag: read_setting("/sys/kernel/mm/transparent_hugepage/defrag"),
        kvm: kvm_access(),
    }
}

/// The features the engines rely on, with what each is for.
const KEY_FEATURES: [(Features, &str, &str); 9] = [
    (
        Features::PAGEFAULT_FLAG_WP,
        "5.7",
        "live snapshots (sync write-protect)",
    ),
    (
        Features::WP_UNPOPULATED,
        "6.4",
        "catch first writes to never-touched anon pages",
    ),
    (
        Features::WP_ASYNC,
        "6.7",
        "incremental dirty tracking without fault round trips",
    ),
    (
        Features::MINOR_SHMEM,
        "5.13",
        "lazy restore into shmem with CONTINUE",
    ),
    (
        Features::MINOR_HUGETLBFS,
        "5.13",
        "lazy restore into hugetlbfs with CONTINUE",
    ),
    (Features::MOVE, "6.8", "zero-copy page placement"),
    (
        Features::POISON,
        "6.6",
        "mark unrecoverable pages during post-copy",
    ),
    (
        Features::EVENT_REMOVE,
        "4.11",
        "honour balloon/MADV_DONTNEED during restore",
    ),
    (
        Features::EVENT_FORK,
        "4.11",
        "follow forked children (needs CAP_SYS_PTRACE)",
    ),
];

pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let caps = capabilities();
    let sys = facts();
    let ok = caps.access.full();
    if json {
        let v = serde_json::json!({
            "kernel": caps,
            "system": sys,
            "advice": caps.access.advice(),
            "ok": ok,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        });
    }
    println!("kernel {}", caps.kernel_release);
    let a = &caps.access;
    let mut t = Table::new(["access", "state"]);
    t.row(["euid".into(), a.euid.to_string()]);
    t.row([
        "/dev/userfaultfd".into(),
        match (&a.device_present, &a.device_error) {
            (false, _) => "absent".into(),
            (true, None) => "usable".into(),
            (true, Some(e)) => format!("denied: {e}"),
        },
    ]);
    t.row([
        "userfaultfd(2)".to_string(),
        a.syscall_error
            .clone()
            .map_or("usable".into(), |e| format!("denied: {e}")),
    ]);
    t.row([
        "user-mode-only".to_string(),
        if a.user_mode_only_works {
            "usable"
        } else {
            "no"
        }
        .to_string(),
    ]);
    t.row([
        "vm.unprivileged_userfaultfd".to_string(),
        a.unprivileged_sysctl
            .map_or("unreadable".into(), |v| v.to_string()),
    ]);
    t.row(["CAP_SYS_PTRACE".to_string(), a.cap_sys_ptrace.to_string()]);
    t.row([
        "full userfaultfd (kernel faults, KVM)".to_string(),
        a.full_source
            .map_or("NO".into(), |s| format!("yes, via {s:?}").to_lowercase()),
    ]);
    print!("\n{}", t.render());

    let mut t = Table::new(["feature", "since", "available", "used for"]);
    for (f, since, what) in KEY_FEATURES {
        t.row([
            f.names().join(""),
            since.to_string(),
            yes(caps.has(f)).to_string(),
            what.to_string(),
        ]);
    }
    t.row([
        "PAGEMAP_SCAN",
        "6.7",
        yes(caps.pagemap_scan),
        "harvest written pages and re-protect in one call",
    ]);
    print!("\n{}", t.render());
    let others: Vec<&str> = caps
        .features
        .names()
        .into_iter()
        .filter(|n| !KEY_FEATURES.iter().any(|(f, _, _)| f.names() == [*n]))
        .collect();
    println!("other features: {}", others.join(" "));
    println!("fd ioctls: {}", caps.api_ioctls.names().join(" "));

    let mut t = Table::new(["memory", "mode", "register ioctls"]);
    for r in &caps.register {
        t.row([
            r.memory.to_string(),
            r.mode.clone(),
            match &r.result {
                Ok(i) => i.join(" "),
                Err(e) => format!("refused: {e}"),
            },
        ]);
    }
    print!("\n{}", t.render());

    let mut t = Table::new(["system", "state"]);
    t.row([
        "hugetlb 2 MiB pages".to_string(),
        format!(
            "{} total, {} free",
            sys.hugetlb_2m_total, sys.hugetlb_2m_free
        ),
    ]);
    t.row(["THP enabled".to_string(), sys.thp_enabled.clone()]);
    t.row(["THP defrag".to_string(), sys.thp_defrag.clone()]);
    t.row([
        "/dev/kvm".to_string(),
        sys.kvm.clone().err().unwrap_or_else(|| "usable".into()),
    ]);
    print!("\n{}", t.render());

    let advice = a.advice();
    if !advice.is_empty() {
        println!();
        for line in advice {
            println!("note: {line}");
        }
    }
    if !ok {
        eprintln!("error: no full userfaultfd is available to this process; see the notes above");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}
