//! The dirtier under KVM, for both CPU dirty-tracking kinds.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;
use vmm::*;

const PAGES: u64 = 2048;

fn ctrl_pfn(vcpu: u32) -> u64 {
    vmm::layout::ctrl_page(vcpu) / 4096
}

/// Runs the dirtier for `ms` with harvests every 25 ms; returns (harvested union, stamps).
fn run_and_harvest(
    mode: DirtyLogMode,
    pattern: Pattern,
    rate: f64,
    ms: u64,
) -> (Vm, BTreeSet<u64>, Vec<vmm::programs::ctrl::Stamp>) {
    let vm = Vm::new(small(64, mode, false)).unwrap();
    vm.programs()
        .load(0, &Program::dirtier(WS, PAGES, rate, pattern))
        .unwrap();
    vm.cpu_dirty_log().set_logging(true).unwrap();
    let mut all = PageBitmap::new(vm.mem_size() / 4096);
    vm.resume().unwrap();
    let rounds = ms / 25;
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(25));
        vm.cpu_dirty_log().harvest(&mut all).unwrap();
    }
    vm.pause().unwrap();
    vm.cpu_dirty_log().harvest(&mut all).unwrap();
    assert_eq!(vm.vcpu_stopped(), None);
    let (mut s, in_flight) = stamps_with_in_flight(&vm, PAGES);
    if let Some(p) = in_flight {
        // The stamp the vCPU was writing when it stopped: written, so it must be harvested.
        s.push(vmm::programs::ctrl::Stamp {
            vcpu: 0,
            pfn: p,
            generation: u64::MAX,
        });
    }
    (vm, all.iter().collect(), s)
}

fn dirty_set_is_exactly_the_written_pages(mode: DirtyLogMode) {
    let (vm, harvested, stamps) = run_and_harvest(mode, Pattern::Uniform, 64.0, 300);
    let c = vm.programs().counters(0);
    assert!(c.pages_written > 1000, "{mode:?}: {} pages written", c.pages_written);
    let mut want: BTreeSet<u64> = stamps.iter().map(|s| s.pfn).collect();
    // The only other page the program stores to is its control page (page tables and the
    // GDT are created with A/D set, and the loop uses no stack).
    want.insert(ctrl_pfn(0));
    assert_eq!(
        harvested, want,
        "{mode:?}: harvested dirty pages = stamped pages + control page"
    );
    // Every stamp verifies (checked in `stamps`), generations are unique and not ahead.
    let complete: Vec<_> = stamps.iter().filter(|s| s.generation != u64::MAX).collect();
    let gens: BTreeSet<u64> = complete.iter().map(|s| s.generation).collect();
    assert_eq!(gens.len(), complete.len(), "one write per generation");
    // Stamps of the batch in progress may be ahead of the published count, by a batch at most.
    assert!(complete
        .iter()
        .all(|s| s.generation <= c.pages_written + vmm::programs::workload::BATCH as u64 && s.vcpu == 0));
    println!(
        "{mode:?}: {} pages written, {} distinct, all harvested",
        c.pages_written,
        stamps.len()
    );
}

#[test]
fn dirty_set_ring() {
    need_kvm!();
    dirty_set_is_exactly_the_written_pages(DirtyLogMode::Ring { entries: 65536 });
}

#[test]
fn dirty_set_bitmap() {
    need_kvm!();
    dirty_set_is_exactly_the_written_pages(DirtyLogMode::Bitmap);
}

#[test]
fn small_rings_never_lose_pages_silently() {
    need_kvm!();
    // A 4096-entry ring is far smaller than the pages written; the reaper keeps it from
    // filling, so nothing is lost.
    let (_vm, harvested, stamps) =
        run_and_harvest(DirtyLogMode::Ring { entries: 4096 }, Pattern::Sequential, 64.0, 200);
    let want: BTreeSet<u64> = stamps.iter().map(|s| s.pfn).chain([ctrl_pfn(0)]).collect();
    assert_eq!(harvested, want);
    // The one-page ring (256 entries) can be overrun by KVM on this kind of host. Either
    // every written page is harvested exactly, or a harvest says the log was lost and
    // reports every page of guest RAM: a silent loss is the one outcome that must not happen,
    // and an overrun is not an error (docs/dirty-tracking.md).
    let vm = Vm::new(small(64, DirtyLogMode::Ring { entries: 256 }, false)).unwrap();
    vm.programs()
        .load(0, &Program::dirtier(WS, PAGES, 64.0, Pattern::Sequential))
        .unwrap();
    vm.cpu_dirty_log().set_logging(true).unwrap();
    let mut all = PageBitmap::new(vm.mem_size() / 4096);
    vm.resume().unwrap();
    let mut lost = 0;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(25));
        let mut one = PageBitmap::new(vm.mem_size() / 4096);
        let st = vm.cpu_dirty_log().harvest(&mut one).unwrap();
        if st.lost {
            lost += 1;
            assert_eq!(one.count(), vm.mem_size() / 4096, "a lost log reports every page");
        }
        all.union(&one);
    }
    vm.pause().unwrap();
    lost += vm.cpu_dirty_log().harvest(&mut all).unwrap().lost as u32;
    assert_eq!(vm.cpu_dirty_log().lost_harvests(), lost as u64);
    let (s, f) = stamps_with_in_flight(&vm, PAGES);
    let want: BTreeSet<u64> = s.iter().map(|x| x.pfn).chain(f).chain([ctrl_pfn(0)]).collect();
    let got: BTreeSet<u64> = all.iter().collect();
    if lost == 0 {
        assert_eq!(got, want, "256-entry ring, no overrun reported");
        println!("256-entry ring: no overrun, {} pages, all harvested", want.len());
    } else {
        assert!(got.is_superset(&want), "an overrun still covers every written page");
        println!(
            "256-entry ring: {lost} lost-log harvest(s), every page reported; {} pages written",
            want.len()
        );
    }
}

#[test]
fn rate_is_within_ten_percent() {
    need_kvm!();
    for rate in [16.0, 64.0] {
        let vm = Vm::new(small(64, DirtyLogMode::Bitmap, false)).unwrap();
        vm.programs()
            .load(0, &Program::dirtier(WS, PAGES, rate, Pattern::Sequential))
            .unwrap();
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        vm.pause().unwrap();
        let c = vm.programs().counters(0);
        // Measured from the guest's own TSC readings, not from the host's clock.
        let secs = (c.tsc_now - c.tsc_start) as f64 / (vm.tsc_khz() as f64 * 1000.0);
        let got = c.pages_written as f64 * 4096.0 / secs / 1048576.0;
        println!("configured {rate} MiB/s, achieved {got:.2} MiB/s over {secs:.3} s");
        assert!(
            (got - rate).abs() / rate < 0.10,
            "configured {rate} MiB/s, achieved {got:.2}"
        );
    }
}

#[test]
fn patterns_shape_the_working_set() {
    need_kvm!();
    // Sequential: a prefix of the working set, in order.
    let (vm, _, s) = run_and_harvest(DirtyLogMode::Bitmap, Pattern::Sequential, 16.0, 100);
    let n = vm.programs().counters(0).pages_written.min(PAGES);
    let pfns: Vec<u64> = s.iter().map(|x| x.pfn).collect();
    // The counter is published after each batch: a pause inside one leaves up to a batch of
    // pages stamped but not yet counted.
    let m = pfns.len() as u64;
    let batch = vmm::programs::workload::BATCH as u64;
    assert!(n <= m && m <= (n + batch).min(PAGES), "{m} pages stamped, {n} counted");
    assert_eq!(pfns, (0..m).map(|p| WS / 4096 + p).collect::<Vec<_>>());
    // Hot/cold: 90 % of writes to the first 64 pages.
    let (vm, _, s) = run_and_harvest(
        DirtyLogMode::Bitmap,
        Pattern::HotCold {
            hot_pages: 64,
            hot_pct: 90,
        },
        64.0,
        200,
    );
    let written = vm.programs().counters(0).pages_written;
    let hot = s.iter().filter(|x| x.pfn < WS / 4096 + 64).count();
    let cold = s.len() - hot;
    assert_eq!(hot, 64, "every hot page written");
    // ~10 % of writes are cold, spread over 2048 pages: far fewer distinct cold pages than
    // a uniform pattern would touch.
    assert!(cold as u64 <= written / 5, "{cold} cold pages for {written} writes");
    println!("hot/cold: {written} writes, {hot} hot pages, {cold} cold pages");
}

#[test]
fn resuming_a_running_vm_does_not_defeat_the_next_pause() {
    need_kvm!();
    let vm = Vm::new(small(64, DirtyLogMode::Bitmap, false)).unwrap();
    vm.programs()
        .load(0, &Program::dirtier(WS, 64, 8.0, Pattern::Sequential))
        .unwrap();
    vm.resume().unwrap();
    // A second resume of running vCPUs (an abort path does this) must be a no-op...
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    // ... so that a pause still parks them and keeps them parked.
    vm.pause().unwrap();
    let c = vm.programs().counters(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.programs().counters(0), c, "the vCPU stays paused");
}

#[test]
fn memory_sizes_that_overflow_are_refused() {
    // 2^44 MiB + 128 MiB wraps to 128 MiB when shifted into bytes.
    for mem_mib in [17_592_186_044_544u64, u64::MAX, 0] {
        let e = Vm::new(VmConfig {
            mem_mib,
            ..Default::default()
        })
        .err()
        .unwrap_or_else(|| panic!("{mem_mib} MiB accepted"));
        assert!(e.to_string().contains("memory must be between"), "{mem_mib}: {e}");
    }
    // The ceiling, stated in the error.
    let e = Vm::new(VmConfig {
        mem_mib: 8193,
        ..Default::default()
    })
    .err()
    .expect("past the ceiling");
    assert!(e.to_string().contains("and 8192 MiB"), "{e}");
}

/// More than 3 GiB: low RAM ends at 3 GiB and the rest is one slot at 4 GiB, past the hole
/// where the devices' registers are. A dirtier there runs (the guest page tables map it), its
/// pages are in the CPU dirty log at their high page numbers, and a working set across the
/// hole is refused.
#[test]
fn ram_past_three_gib_continues_at_four() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        mem_mib: 3072 + 64,
        regions: 2,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::default(),
    })
    .unwrap();
    let slots: Vec<(u64, u64)> = vm.slots().iter().map(|s| (s.gpa, s.size)).collect();
    assert_eq!(slots, [(0, 1536 << 20), (1536 << 20, 1536 << 20), (1 << 32, 64 << 20)]);
    assert_eq!((vm.mem_size(), vm.ram_end()), (3136 << 20, (1 << 32) + (64 << 20)));
    let across = Program::dirtier((3 << 30) - (1 << 20), 512, 8.0, Pattern::Sequential);
    let e = vm.programs().load(0, &across).unwrap_err().to_string();
    assert!(e.contains("[0x0, 0xc0000000) and [0x100000000, 0x104000000)"), "{e}");
    vm.programs()
        .load(0, &Program::dirtier(1 << 32, 4096, 32.0, Pattern::Sequential))
        .unwrap();
    vm.cpu_dirty_log().set_logging(true).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().unwrap();
    assert_eq!(vm.vcpu_stopped(), None);
    let c = vm.programs().counters(0);
    assert!(c.pages_written > 100, "{c:?}");
    let mut dirty = PageBitmap::new(vm.ram_end() / 4096);
    vm.cpu_dirty_log().harvest(&mut dirty).unwrap();
    let high = dirty.iter().filter(|&p| p >= (1 << 20)).count() as u64;
    assert_eq!(
        high,
        c.pages_written.min(4096),
        "every page written up there, and no other"
    );
}

/// Every vCPU runs its own program from the start: with the in-kernel LAPIC, a vCPU other than
/// the first used to wait for an INIT and SIPI nobody sends, and ran nothing (found when a
/// second accelerator's client never started).
#[test]
fn every_vcpu_runs_its_program() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        vcpus: 4,
        ..small(128, DirtyLogMode::Bitmap, false)
    })
    .unwrap();
    for v in 0..4 {
        vm.programs()
            .load(
                v,
                &Program::dirtier(WS + v as u64 * PAGES * 4096, PAGES, 8.0, Pattern::Sequential),
            )
            .unwrap();
    }
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().unwrap();
    assert_eq!(vm.vcpu_stopped(), None);
    let pages: Vec<u64> = (0..4).map(|v| vm.programs().counters(v).pages_written).collect();
    assert!(pages.iter().all(|&p| p > 0), "pages written per vCPU: {pages:?}");
}

/// A vCPU given no program halts at its entry point: it neither runs zeroed memory nor stops,
/// and it pauses and resumes like the others.
#[test]
fn a_vcpu_without_a_program_waits() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        vcpus: 2,
        ..small(64, DirtyLogMode::Bitmap, false)
    })
    .unwrap();
    vm.programs()
        .load(0, &Program::dirtier(WS, PAGES, 8.0, Pattern::Sequential))
        .unwrap();
    vm.cpu_dirty_log().set_logging(true).unwrap();
    let mut dirty = PageBitmap::new(vm.mem_size() / 4096);
    vm.cpu_dirty_log().harvest(&mut dirty).unwrap();
    dirty = PageBitmap::new(vm.mem_size() / 4096);
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    assert_eq!(vm.vcpu_stopped(), None);
    assert_eq!(vm.programs().counters(1), Counters::default(), "vCPU 1 ran nothing");
    vm.cpu_dirty_log().harvest(&mut dirty).unwrap();
    // Only vCPU 0's control page and working set were written.
    let ws = WS / 4096..WS / 4096 + PAGES;
    let stray: Vec<u64> = (0..vm.mem_size() / 4096)
        .filter(|&p| dirty.get(p) && !ws.contains(&p) && p != ctrl_pfn(0))
        .collect();
    assert!(stray.is_empty(), "pages written outside vCPU 0's: {stray:?}");
}
