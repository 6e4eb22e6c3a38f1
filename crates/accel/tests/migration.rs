//! Device migration of a busy accelerator between two instances in one process.

mod common;
use accel::client::{Client, GuestBus};
use accel::regs::*;
use accel::AccelConfig;
use common::*;
use iommu::errno::EFAULT;
use iommu::FormatKind;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use vfio::vmm::{Destination, Source};
use vfio::{LogRange, MigFlags, MigState};

const BASE: u64 = 0x100_0000;
const QN: u16 = 1;
/// Enough work that the guest is still submitting at the switchover.
const JOBS: u32 = 12_000;

/// Runs the client against `rig` until `stop` is set, pausing while `pause` is set; reports
/// paused/running in `parked`.
fn client_thread(rig: &Rig, stop: &AtomicBool, pause: &AtomicBool, parked: &AtomicBool) {
    let c = Client::new(rig, BASE, QN);
    while !stop.load(Ordering::Acquire) {
        if pause.load(Ordering::Acquire) {
            parked.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        parked.store(false, Ordering::Release);
        c.step();
        if c.finished() {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    parked.store(true, Ordering::Release);
}

/// Sets the flag when dropped, so a failed assertion in a scope stops the client thread
/// instead of hanging the scope's join.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn reference_memory(cfg: &AccelConfig) -> Vec<u8> {
    let rig = Rig::new(FormatKind::VtdSs, cfg.clone());
    let c = Client::new(&rig, BASE, QN);
    c.setup(JOBS).unwrap();
    assert!(wait_until(120, || {
        c.step();
        c.finished()
    }));
    rig.snapshot()
}

fn migrate_busy(flags: MigFlags) {
    let cfg = AccelConfig {
        flags,
        ..Default::default()
    };
    let src = Rig::new(FormatKind::VtdSs, cfg.clone());
    let dst = Rig::new(FormatKind::ArmLpaeS1, cfg.clone()); // any format on the other side
    Client::new(&src, BASE, QN).setup(JOBS).unwrap();
    let (stop, pause, parked) = (AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false));
    let pending_at_stop = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| client_thread(&src, &stop, &pause, &parked));
        let _guard = StopOnDrop(&stop);
        assert!(
            wait_until(30, || src.accel.jobs_done() > 300),
            "the device is busy before migration"
        );

        let mut vsrc = Source::new(vec![src.accel.migration().clone()]);
        let mut vdst = Destination::new(vec![dst.accel.migration().clone()]);
        vdst.setup().unwrap();
        for (i, b) in vsrc.setup().unwrap() {
            vdst.load(i, &b).unwrap();
        }
        let done_before = src.accel.jobs_done();
        for _ in 0..20 {
            let (sections, _) = vsrc.iterate().unwrap();
            for (i, b) in sections {
                vdst.load(i, &b).unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            src.accel.jobs_done() > done_before,
            "jobs keep completing during pre-copy"
        );
        assert!(
            vdst.init_data_received() && vsrc.initial_data_sent(),
            "switchover acknowledged"
        );

        // Devices to their P2P states first: with P2P, no DMA from here on, even though the
        // guest keeps ringing doorbells.
        assert!(
            !Client::new(&src, BASE, QN).finished(),
            "the guest still has work at the switchover"
        );
        vsrc.enter_p2p().unwrap();
        if flags.contains(MigFlags::P2P) {
            let ops = src.accel.dma_ops();
            let rung = src.accel.regs();
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(src.accel.dma_ops(), ops, "RUNNING_P2P: no new job, no DMA");
            assert_eq!(src.accel.regs(), rung);
            let q = src.accel.queues()[QN as usize];
            assert_ne!(q.sq_head, q.sq_tail, "jobs are queued at the switchover");
        }
        // The vCPUs pause, then the devices stop.
        pause.store(true, Ordering::Release);
        assert!(wait_until(10, || parked.load(Ordering::Acquire)));
        let sections = vsrc.stop_copy().unwrap();
        assert_eq!(src.accel.migration().get_state(), MigState::StopCopy);
        let ops = src.accel.dma_ops();
        let q = src.accel.queues()[QN as usize];
        pending_at_stop.store((q.sq_tail + 32 - q.sq_head) % 32, Ordering::Relaxed);
        src.accel
            .mmio_write(DOORBELL, &doorbell(QN, DB_SQ, q.sq_tail as u16).to_le_bytes());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(src.accel.dma_ops(), ops, "STOP: no DMA at all");

        // Memory moves (here all of it, the engine's job in the real thing), then the state.
        dst.write(0, &src.snapshot());
        for (i, b) in sections {
            vdst.load(i, &b).unwrap();
        }
        vdst.finish().unwrap();
        vdst.start().unwrap();
        vsrc.complete();
        stop.store(true, Ordering::Release);
    });
    // The guest continues on the destination.
    let c = Client::new(&dst, BASE, QN);
    assert!(wait_until(120, || {
        c.step();
        c.finished()
    }));
    let n = c.counters();
    assert_eq!(
        (n.submitted, n.completed, n.errors, n.duplicates),
        (JOBS, JOBS, 0, 0),
        "{flags}"
    );
    assert_eq!(
        dst.accel.jobs_done(),
        JOBS as u64,
        "{flags}: every job executed exactly once, on one side"
    );
    assert_eq!(
        dst.snapshot(),
        reference_memory(&cfg),
        "{flags}: memory identical to a run without migration"
    );
    println!(
        "{flags}: {} jobs pending in the SQ at the switchover",
        pending_at_stop.load(Ordering::Relaxed)
    );
}

#[test]
fn busy_device_migrates_all_three_flags() {
    migrate_busy(MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY);
}

#[test]
fn busy_device_migrates_hisi_flags() {
    migrate_busy(MigFlags::STOP_COPY | MigFlags::PRE_COPY);
}

#[test]
fn busy_device_migrates_stop_copy_only() {
    migrate_busy(MigFlags::STOP_COPY);
}

#[test]
fn mismatched_destination_is_refused_during_precopy() {
    let src = Rig::new(FormatKind::AmdV1, AccelConfig::default());
    let dst = Rig::new(
        FormatKind::AmdV1,
        AccelConfig {
            qp_num: 4,
            ..Default::default()
        },
    );
    Client::new(&src, BASE, QN).setup(JOBS).unwrap();
    let (stop, pause, parked) = (AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        s.spawn(|| client_thread(&src, &stop, &pause, &parked));
        let _guard = StopOnDrop(&stop);
        let mut vsrc = Source::new(vec![src.accel.migration().clone()]);
        let mut vdst = Destination::new(vec![dst.accel.migration().clone()]);
        vdst.setup().unwrap();
        for (i, b) in vsrc.setup().unwrap() {
            vdst.load(i, &b).unwrap();
        }
        let (sections, _) = vsrc.iterate().unwrap();
        let err = vdst.load(sections[0].0, &sections[0].1).unwrap_err();
        assert_eq!(err.errno().map(|e| e.code()), Some(EFAULT), "{err}");
        assert_eq!(
            src.accel.migration().get_state(),
            MigState::PreCopy,
            "refused while the source still runs"
        );
        vsrc.abort();
        vdst.abort();
        assert_eq!(src.accel.migration().get_state(), MigState::Running);
        let before = src.accel.jobs_done();
        assert!(
            wait_until(60, || Client::new(&src, BASE, QN).finished()),
            "the source keeps running to the end"
        );
        assert!(src.accel.jobs_done() > before);
        stop.store(true, Ordering::Release);
    });
    let n = Client::new(&src, BASE, QN).counters();
    assert_eq!((n.completed, n.errors, n.duplicates), (JOBS, 0, 0));
}

#[test]
fn device_log_matches_the_iommu_dirty_set() {
    let rig = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let c = Client::new(&rig, BASE, QN);
    c.setup(2000).unwrap();
    let dev = rig.accel.migration();
    let page = dev
        .dma_logging_start(&[LogRange { iova: 0, length: MEM }], 4096)
        .unwrap();
    assert_eq!(page, 4096);
    rig.track(true);
    assert!(wait_until(60, || {
        c.step();
        c.finished()
    }));
    let mut bm = vec![0u8; (MEM / 4096 / 8) as usize];
    dev.dma_logging_report(0, MEM, 4096, &mut bm).unwrap();
    let logged: Vec<u64> = (0..MEM / 4096)
        .filter(|p| bm[(p / 8) as usize] >> (p % 8) & 1 != 0)
        .collect();
    let iommu = rig.iommu_dirty();
    assert!(!logged.is_empty());
    assert_eq!(logged, iommu, "the device's own log and the IOMMU see the same writes");
    // Only pages the device wrote: the CQ and the destination buffers, never the SQ, the
    // control block or the sources (the CPU writes those).
    let cq = (BASE + 0x2000) / 4096;
    let dst_first = (BASE + 0x10000 + 32 * 8192) / 4096;
    assert!(logged.iter().all(|&p| p == cq || p >= dst_first), "{logged:?}");
    let mut again = vec![0u8; bm.len()];
    dev.dma_logging_report(0, MEM, 4096, &mut again).unwrap();
    assert!(again.iter().all(|&b| b == 0), "read and cleared");
    dev.dma_logging_stop().unwrap();
}

#[test]
fn device_without_guest_driver_saves_its_peer_window_alone() {
    let src = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let dst = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    // A peer wrote its window; its own guest driver never set it up.
    src.accel.mmio_write(PEER_WINDOW + 8, &0x1122_3344u32.to_le_bytes());
    let s = src.accel.migration();
    s.set_state(MigState::Stop).unwrap();
    let stream = s.set_state(MigState::StopCopy).unwrap().unwrap();
    let mut buf = vec![0u8; 8192];
    let n = stream.read(&mut buf).unwrap();
    assert_eq!(n, accel::migration::NOT_READY_LEN, "NOT_READY: prefix, window, CRC");
    assert_eq!(
        u32::from_le_bytes(buf[24..28].try_into().unwrap()),
        1,
        "vf_qm_state NOT_READY"
    );
    assert_eq!(
        &buf[40 + 8..40 + 12],
        &0x1122_3344u32.to_le_bytes(),
        "the window follows the prefix"
    );
    assert_eq!(stream.read(&mut buf[n..]).unwrap(), 0);
    let d = dst.accel.migration();
    d.set_state(MigState::Stop).unwrap();
    let w = d.set_state(MigState::Resuming).unwrap().unwrap();
    w.write(&buf[..n]).unwrap();
    d.set_state(MigState::Stop).unwrap();
    assert_eq!(
        dst.accel.peer_window_bytes(),
        src.accel.peer_window_bytes(),
        "the window moved"
    );
    d.set_state(MigState::Running).unwrap();
    assert_eq!(dst.accel.queues()[0], accel::Queue::default(), "no queue was loaded");
    // The prefix alone lost the window on the way: refused at RESUMING -> STOP, like a
    // truncated full state.
    for cut in [40, n - 1, 100] {
        d.set_state(MigState::Stop).unwrap();
        let w = d.set_state(MigState::Resuming).unwrap().unwrap();
        w.write(&buf[..cut]).unwrap();
        assert_eq!(
            d.set_state(MigState::Stop).unwrap_err().code(),
            iommu::errno::EINVAL,
            "{cut} bytes"
        );
        d.reset();
    }
    // A flipped window byte fails the CRC.
    d.set_state(MigState::Stop).unwrap();
    let w = d.set_state(MigState::Resuming).unwrap().unwrap();
    let mut bad = buf[..n].to_vec();
    bad[100] ^= 1;
    w.write(&bad).unwrap();
    assert_eq!(d.set_state(MigState::Stop).unwrap_err().code(), iommu::errno::EINVAL);
}

/// The guest sets its driver READY while the device is in PRE_COPY, after the pre-copy prefix
/// (NOT_READY) went out: the stop-copy stream goes on from that prefix, so the destination
/// loads a consistent READY state, and saving the stopped device again gives the same bytes.
#[test]
fn ready_set_during_precopy_still_saves_one_consistent_state() {
    let src = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let dst = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let s = src.accel.migration();
    let pre = s.set_state(MigState::PreCopy).unwrap().unwrap();
    let mut sent = vec![0u8; 64];
    let n = pre.read(&mut sent).unwrap();
    sent.truncate(n);
    assert_eq!((n, u32::from_le_bytes(sent[24..28].try_into().unwrap())), (40, 1));
    src.accel.mmio_write(VF_STATE, &VF_STATE_READY.to_le_bytes());
    // PRE_COPY -> STOP_COPY goes on in the same stream.
    assert!(s.set_state(MigState::StopCopy).unwrap().is_none());
    let mut rest = vec![0u8; 16384];
    let m = pre.read(&mut rest).unwrap();
    sent.extend_from_slice(&rest[..m]);
    assert_eq!(sent.len(), accel::migration::state_len(2));
    let d = dst.accel.migration();
    d.set_state(MigState::Stop).unwrap();
    let w = d.set_state(MigState::Resuming).unwrap().unwrap();
    w.write(&sent).unwrap();
    d.set_state(MigState::Stop).unwrap();
    assert_eq!(dst.accel.regs().vf_state, VF_STATE_READY, "loaded as READY");
    // Saved again, stopped, on either side: the very same bytes.
    let resave = |m: &vfio::MigrationDevice| {
        if m.get_state() == MigState::StopCopy {
            m.set_state(MigState::Stop).unwrap();
        }
        let st = m.set_state(MigState::StopCopy).unwrap().unwrap();
        let mut b = vec![0u8; 16384];
        let k = st.read(&mut b).unwrap();
        b.truncate(k);
        m.set_state(MigState::Stop).unwrap();
        b
    };
    assert_eq!(resave(s), sent);
    assert_eq!(resave(d), sent);
    // Running again, the device's next migration sends a fresh prefix.
    s.set_state(MigState::Running).unwrap();
    s.set_state(MigState::Stop).unwrap();
    let again = resave(s);
    assert_eq!(u32::from_le_bytes(again[24..28].try_into().unwrap()), 0, "READY now");
}
