//! The test VM: checksums against the host reference, every region type,
//! pause/save/resume in this process and in a second one, crashes, 16 GiB,
//! KVM's dirty log, and guest faults served through userfaultfd.
#![allow(clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]

use std::sync::Arc;

use livepage_mem::{MemoryKind, Region};
use livepage_testutil::require;
use livepage_testvm::reference::expected_checksum;
use livepage_testvm::{
    RunControl, RunOutcome, TestVm, VmError, VmOptions, VmSpec, VmState, Workload, checksum,
    prepare_memory,
};

const MIB: u64 = 1 << 20;

fn kvm_ok() -> bool {
    match livepage_testvm::check_host() {
        Ok(()) => true,
        Err(e) => {
            livepage_testutil::skip("testvm", &e.to_string());
            false
        }
    }
}

fn boot(kind: MemoryKind, spec: VmSpec) -> Option<Arc<Region>> {
    let region = match Region::new(kind, spec.ram as usize) {
        Ok(r) => r,
        Err(e) if kind == MemoryKind::Hugetlb => {
            livepage_testutil::skip("testvm hugetlb", &e.to_string());
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    prepare_memory(&region, &spec).unwrap();
    Some(Arc::new(region))
}

fn run_to_end(vm: &mut TestVm) {
    let control = RunControl::new(vm.spec().vcpus, None);
    assert_eq!(vm.run(&control).unwrap(), RunOutcome::Finished);
    assert!(vm.finished());
}

#[test]
fn checksum_equals_host_reference() {
    require!(kvm_ok(), "no KVM");
    for (workload, vcpus) in [
        (Workload::Touch, 1),
        (Workload::Touch, 3),
        (
            Workload::Dirty {
                seed: 7,
                iterations: 20_000,
            },
            1,
        ),
        (
            Workload::Dirty {
                seed: 7,
                iterations: 20_000,
            },
            2,
        ),
    ] {
        let spec = VmSpec {
            ram: 64 * MIB,
            vcpus,
            workload,
        };
        let region = boot(MemoryKind::Anon, spec).unwrap();
        let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
        run_to_end(&mut vm);
        let want = expected_checksum(workload, spec.ram, vcpus);
        assert_ne!(want, 0);
        assert_eq!(
            checksum(&region, spec.ram).unwrap(),
            want,
            "{workload:?} x{vcpus}"
        );
        let steps = workload.steps(livepage_testvm::layout::slice(spec.ram, vcpus, 0).1);
        assert!(
            vm.progress().iter().all(|p| *p == steps),
            "{:?}",
            vm.progress()
        );
    }
    // A different seed gives a different memory.
    let a = expected_checksum(
        Workload::Dirty {
            seed: 7,
            iterations: 1000,
        },
        64 * MIB,
        2,
    );
    let b = expected_checksum(
        Workload::Dirty {
            seed: 8,
            iterations: 1000,
        },
        64 * MIB,
        2,
    );
    assert_ne!(a, b);
}

#[test]
fn every_region_type() {
    require!(kvm_ok(), "no KVM");
    let workload = Workload::Dirty {
        seed: 11,
        iterations: 8_000,
    };
    for kind in MemoryKind::ALL {
        let spec = VmSpec {
            ram: 64 * MIB,
            vcpus: 2,
            workload,
        };
        let Some(region) = boot(kind, spec) else {
            continue;
        };
        let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
        run_to_end(&mut vm);
        assert_eq!(
            checksum(&region, spec.ram).unwrap(),
            expected_checksum(workload, spec.ram, 2),
            "{kind}"
        );
    }
}

#[test]
fn pause_save_resume_in_process_any_number_of_times() {
    require!(kvm_ok(), "no KVM");
    let workload = Workload::Dirty {
        seed: 3,
        iterations: 12_000,
    };
    let spec = VmSpec {
        ram: 64 * MIB,
        vcpus: 2,
        workload,
    };
    let region = boot(MemoryKind::Shmem, spec).unwrap();
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    for stop in [2_000u64, 5_000, 9_000] {
        let control = RunControl::new(2, Some(stop));
        assert_eq!(vm.run(&control).unwrap(), RunOutcome::Paused);
        assert!(
            vm.progress().iter().all(|p| *p >= stop && *p < stop + 1024),
            "{:?}",
            vm.progress()
        );
        // Through bytes, into a brand-new VM over the same memory.
        let bytes = vm.save().unwrap().to_bytes();
        drop(vm);
        let state = VmState::from_bytes(&bytes).unwrap();
        vm = TestVm::restore(region.clone(), &state, VmOptions::default()).unwrap();
    }
    run_to_end(&mut vm);
    assert_eq!(
        checksum(&region, spec.ram).unwrap(),
        expected_checksum(workload, spec.ram, 2)
    );
}

/// The second process's half of `pause_save_resume_in_another_process`.
#[test]
fn child_resume_helper() {
    let Ok(dir) = std::env::var("LIVEPAGE_TESTVM_CHILD_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let state = VmState::from_bytes(&std::fs::read(dir.join("vcpus.state")).unwrap()).unwrap();
    let memory = std::fs::read(dir.join("memory.raw")).unwrap();
    let region = Arc::new(Region::new(MemoryKind::Anon, state.ram as usize).unwrap());
    region.write(0, &memory).unwrap();
    let mut vm = TestVm::restore(region.clone(), &state, VmOptions::default()).unwrap();
    run_to_end(&mut vm);
    std::fs::write(
        dir.join("checksum"),
        checksum(&region, state.ram).unwrap().to_string(),
    )
    .unwrap();
}

#[test]
fn pause_save_resume_in_another_process() {
    require!(kvm_ok(), "no KVM");
    let workload = Workload::Dirty {
        seed: 5,
        iterations: 10_000,
    };
    let spec = VmSpec {
        ram: 64 * MIB,
        vcpus: 2,
        workload,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    assert_eq!(
        vm.run(&RunControl::new(2, Some(4_000))).unwrap(),
        RunOutcome::Paused
    );
    let dir = std::env::temp_dir().join(format!("livepage-testvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vcpus.state"), vm.save().unwrap().to_bytes()).unwrap();
    let mut memory = vec![0u8; spec.ram as usize];
    region.read(0, &mut memory).unwrap();
    std::fs::write(dir.join("memory.raw"), &memory).unwrap();
    drop(vm);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_resume_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LIVEPAGE_TESTVM_CHILD_DIR", &dir)
        .status()
        .unwrap();
    assert!(status.success(), "second process failed: {status}");
    let got: u64 = std::fs::read_to_string(dir.join("checksum"))
        .unwrap()
        .parse()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(got, expected_checksum(workload, spec.ram, 2));
}

#[test]
fn triple_fault_is_reported_with_registers() {
    require!(kvm_ok(), "no KVM");
    let spec = VmSpec {
        ram: 8 * MIB,
        vcpus: 1,
        workload: Workload::Crash,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region, spec, VmOptions::default()).unwrap();
    match vm.run(&RunControl::new(1, None)) {
        Err(VmError::GuestCrashed {
            vcpu,
            reason,
            registers,
        }) => {
            assert_eq!(vcpu, 0);
            assert!(reason.contains("triple fault"), "{reason}");
            assert!(registers.contains("rip=0x81"), "{registers}");
        }
        other => panic!("expected a crash report, got {other:?}"),
    }
}

#[test]
fn sixteen_gib_guest() {
    require!(kvm_ok(), "no KVM");
    let workload = Workload::Dirty {
        seed: 9,
        iterations: 4_000,
    };
    let spec = VmSpec {
        ram: 16 << 30,
        vcpus: 2,
        workload,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    run_to_end(&mut vm);
    assert_eq!(
        checksum(&region, spec.ram).unwrap(),
        expected_checksum(workload, spec.ram, 2)
    );
}

#[test]
fn kvm_dirty_log_reports_written_pages() {
    require!(kvm_ok(), "no KVM");
    let spec = VmSpec {
        ram: 16 * MIB,
        vcpus: 1,
        workload: Workload::Touch,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region, spec, VmOptions { dirty_log: true }).unwrap();
    let _ = vm.dirty_log().unwrap();
    run_to_end(&mut vm);
    let bitmap = vm.dirty_log().unwrap();
    let bit = |p: u64| bitmap[(p / 64) as usize] >> (p % 64) & 1 == 1;
    let data_first = livepage_testvm::layout::DATA_START / 4096;
    let (_, pages) = livepage_testvm::layout::slice(spec.ram, 1, 0);
    assert!(
        (data_first..data_first + pages).all(bit),
        "every touched page is dirty"
    );
    // The log was cleared by the read: a second read reports nothing new.
    let again = vm.dirty_log().unwrap();
    assert!(again.iter().all(|w| *w == 0));
}

/// Guest RAM registered MISSING with a userfaultfd: every guest access to the
/// data area arrives as a kernel-mode fault (KVM's GUP) and is served by COPY.
#[test]
fn guest_faults_served_by_userfaultfd() {
    require!(kvm_ok(), "no KVM");
    require!(
        livepage_uffd::probe::capabilities().access.full(),
        "no full userfaultfd"
    );
    use livepage_uffd::poll::{EventFd, poll_readable};
    use livepage_uffd::{CopyMode, Event, EventBuffer, RegisterMode, Resolved, UffdBuilder};
    let workload = Workload::Touch;
    let spec = VmSpec {
        ram: 32 * MIB,
        vcpus: 2,
        workload,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let data = livepage_testvm::layout::DATA_START as usize;
    let uffd = Arc::new(UffdBuilder::new().non_blocking(true).create().unwrap());
    // SAFETY (test): the data area is only accessed by the guest and through raw
    // copies; prepare_memory wrote only below it, so every data page is missing.
    unsafe {
        uffd.register(
            region.addr() + data,
            spec.ram as usize - data,
            RegisterMode::MISSING,
        )
    }
    .unwrap();
    let stop = Arc::new(EventFd::new().unwrap());
    let (u2, stop2) = (uffd.clone(), stop.clone());
    let handler = std::thread::spawn(move || {
        let zero = vec![0u8; 4096];
        let mut buf = EventBuffer::new(16);
        let mut served = 0u64;
        loop {
            let ready =
                poll_readable([std::os::fd::AsFd::as_fd(u2.as_ref()), stop2.as_fd()], -1).unwrap();
            if ready[1] {
                return served;
            }
            for ev in u2.read_events(&mut buf).unwrap() {
                if let Event::PageFault(pf) = ev {
                    let a = pf.address as usize & !4095;
                    match u2.copy(a, &zero, CopyMode::default()).unwrap() {
                        Resolved::AlreadyPresent => u2.wake(a, 4096).unwrap(),
                        _ => served += 1,
                    }
                }
            }
        }
    });
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    run_to_end(&mut vm);
    stop.signal();
    let served = handler.join().unwrap();
    region
        .unregister_range(&uffd, data, spec.ram as usize - data)
        .unwrap();
    let (_, pages) = livepage_testvm::layout::slice(spec.ram, 2, 0);
    assert_eq!(served, 2 * pages, "one userfault per touched guest page");
    assert_eq!(
        checksum(&region, spec.ram).unwrap(),
        expected_checksum(workload, spec.ram, 2)
    );
}

#[test]
fn pause_now_stops_between_reports_and_the_state_resumes_exactly() {
    require!(kvm_ok(), "no KVM");
    let workload = Workload::Dirty {
        seed: 11,
        iterations: 40_000,
    };
    let spec = VmSpec {
        ram: 64 * MIB,
        vcpus: 2,
        workload,
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    let mut pauses = Vec::new();
    for round in 0..4 {
        let control = RunControl::new(2, None);
        let kicker = {
            let control = control.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(60 + 37 * round));
                let t = std::time::Instant::now();
                control.pause_now();
                t.elapsed()
            })
        };
        let outcome = vm.run(&control).unwrap();
        pauses.push(kicker.join().unwrap());
        if outcome == RunOutcome::Finished {
            break;
        }
        let state = VmState::from_bytes(&vm.save().unwrap().to_bytes()).unwrap();
        drop(vm);
        vm = TestVm::restore(region.clone(), &state, VmOptions::default()).unwrap();
    }
    run_to_end(&mut vm);
    assert_eq!(
        checksum(&region, spec.ram).unwrap(),
        expected_checksum(workload, spec.ram, 2)
    );
    // A report comes every 1024 steps (tens of ms here); a kick is far quicker.
    let worst = pauses.iter().max().unwrap();
    assert!(
        *worst < std::time::Duration::from_millis(20),
        "pause_now took {pauses:?}"
    );
}

#[test]
fn the_rate_throttle_holds_a_vcpu_to_its_steps_per_second() {
    require!(kvm_ok(), "no KVM");
    let spec = VmSpec {
        ram: 64 * MIB,
        vcpus: 1,
        workload: Workload::Dirty {
            seed: 2,
            iterations: 6 * 1024,
        },
    };
    let region = boot(MemoryKind::Anon, spec).unwrap();
    let mut vm = TestVm::new(region.clone(), spec, VmOptions::default()).unwrap();
    let control = RunControl::new(1, None);
    control.set_rate(8 * 1024);
    let t = std::time::Instant::now();
    assert_eq!(vm.run(&control).unwrap(), RunOutcome::Finished);
    // 5 intervals of 1024 steps at 8192 steps/s: at least 0.625 s.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        checksum(&region, spec.ram).unwrap(),
        expected_checksum(spec.workload, spec.ram, 1)
    );
}
