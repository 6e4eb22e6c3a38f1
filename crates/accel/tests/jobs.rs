//! Jobs through each IOMMU format: results checked byte for byte, a faulting job, the device
//! carrying on, and its writes in the HWPT dirty bitmap.

mod common;
use accel::client::GuestBus;
use accel::regs::*;
use accel::AccelConfig;
use common::*;
use iommu::FormatKind;

const SQ: u64 = 0x10_0000;
const CQ: u64 = 0x11_0000;
const SRC: u64 = 0x20_0000;
const DST: u64 = 0x40_0000;

struct Driver<'a> {
    rig: &'a Rig,
    tail: u16,
    head: u16,
    phase: bool,
}

impl<'a> Driver<'a> {
    fn new(rig: &'a Rig) -> Self {
        for (cmd, base) in [(MB_SQC, SQ), (MB_CQC, CQ)] {
            rig.mmio_write(MB_DATA_LO, &(base as u32).to_le_bytes());
            rig.mmio_write(MB_DATA_HI, &0u32.to_le_bytes());
            rig.mmio_write(MB_DEPTH, &16u32.to_le_bytes());
            rig.mmio_write(MB_CMD, &cmd.to_le_bytes());
        }
        let mut st = [0u8; 4];
        rig.mmio_read(MB_STATUS, &mut st);
        assert_eq!(st, [0; 4]);
        Driver {
            rig,
            tail: 0,
            head: 0,
            phase: true,
        }
    }

    fn run(&mut self, sqe: Sqe) -> Cqe {
        self.rig.write(SQ + self.tail as u64 * SQE_SIZE, &sqe.to_bytes());
        self.tail = (self.tail + 1) % 16;
        self.rig
            .mmio_write(DOORBELL, &doorbell(0, DB_SQ, self.tail).to_le_bytes());
        let mut cqe = Cqe::default();
        assert!(wait_until(10, || {
            let mut raw = [0u8; 16];
            self.rig.read(CQ + self.head as u64 * CQE_SIZE, &mut raw);
            cqe = Cqe::from_bytes(&raw);
            cqe.phase == self.phase
        }));
        self.head = (self.head + 1) % 16;
        if self.head == 0 {
            self.phase = !self.phase;
        }
        self.rig
            .mmio_write(DOORBELL, &doorbell(0, DB_CQ, self.head).to_le_bytes());
        cqe
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 31) ^ (i >> 5)) as u8 & if i % 200 < 120 { 0x0f } else { 0xff })
        .collect()
}

#[test]
fn jobs_through_every_format() {
    for fmt in FormatKind::ALL {
        let rig = Rig::new(fmt, AccelConfig::default());
        let mut id = [0u8; 4];
        rig.mmio_read(ID, &mut id);
        assert_eq!(u32::from_le_bytes(id), ID_VALUE);
        let mut d = Driver::new(&rig);
        let src = data(70_000);
        rig.write(SRC, &src);
        rig.track(true);

        // COPY
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 1,
            src: SRC,
            dst: DST,
            src_len: src.len() as u32,
            dst_len: 1 << 20,
            arg: 0,
        });
        assert_eq!((c.status, c.result, c.tag, c.sq_head), (0, 70_000, 1, 1), "{fmt}");
        let mut out = vec![0u8; src.len()];
        rig.read(DST, &mut out);
        assert_eq!(out, src, "{fmt}: copy byte for byte");

        // CRC32C against the reference implementation, with the CRC also written out.
        let c = d.run(Sqe {
            opcode: Opcode::Crc32c as u8,
            tag: 2,
            src: SRC,
            dst: DST + 0x10_0000,
            src_len: 70_000,
            dst_len: 4,
            arg: 0,
        });
        assert_eq!(c.result, crc32c::crc32c(&src), "{fmt}");
        let mut crc = [0u8; 4];
        rig.read(DST + 0x10_0000, &mut crc);
        assert_eq!(u32::from_le_bytes(crc), c.result);

        // LZ4 round trip: compress, then decompress the device's own output.
        let c = d.run(Sqe {
            opcode: Opcode::Lz4Compress as u8,
            tag: 3,
            src: SRC,
            dst: DST,
            src_len: 70_000,
            dst_len: 1 << 20,
            arg: 0,
        });
        assert_eq!(c.status, 0, "{fmt}");
        assert!(
            c.result > 0 && c.result < 70_000,
            "{fmt}: compressible input, {} bytes",
            c.result
        );
        let mut comp = vec![0u8; c.result as usize];
        rig.read(DST, &mut comp);
        assert_eq!(
            lz4_flex::decompress(&comp, 70_000).unwrap(),
            src,
            "{fmt}: the host decompresses the device's output"
        );
        let c = d.run(Sqe {
            opcode: Opcode::Lz4Decompress as u8,
            tag: 4,
            src: DST,
            dst: DST + 0x20_0000,
            src_len: comp.len() as u32,
            dst_len: 1 << 20,
            arg: 0,
        });
        assert_eq!((c.status, c.result), (0, 70_000), "{fmt}");
        let mut back = vec![0u8; 70_000];
        rig.read(DST + 0x20_0000, &mut back);
        assert_eq!(back, src, "{fmt}: LZ4 round trip byte for byte");

        // FILL
        let c = d.run(Sqe {
            opcode: Opcode::Fill as u8,
            tag: 5,
            src: 0,
            dst: DST + 0x30_0000,
            src_len: 0,
            dst_len: 5000,
            arg: 0xab,
        });
        assert_eq!((c.status, c.result), (0, 5000));
        let mut f = vec![0u8; 5001];
        rig.read(DST + 0x30_0000, &mut f);
        assert!(f[..5000].iter().all(|&b| b == 0xab) && f[5000] == 0, "{fmt}");

        // The device's writes are in the HWPT dirty bitmap: exactly the pages it wrote
        // (destinations and completion ring), not the source pages the CPU wrote.
        let dirty = rig.iommu_dirty();
        let mut want: Vec<u64> = (DST / 4096..(DST + 70_000).div_ceil(4096)).collect(); // copy, compress
        want.push((DST + 0x10_0000) / 4096);
        want.extend((DST + 0x20_0000) / 4096..(DST + 0x20_0000 + 70_000).div_ceil(4096));
        want.extend((DST + 0x30_0000) / 4096..(DST + 0x30_0000 + 5000).div_ceil(4096));
        want.push(CQ / 4096);
        want.sort();
        want.dedup();
        assert_eq!(dirty, want, "{fmt}");

        // Faults: an unmapped source, an unmapped destination, a bad opcode, too long.
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 6,
            src: MEM + 0x1000,
            dst: DST,
            src_len: 100,
            dst_len: 100,
            arg: 0,
        });
        assert_eq!(c.status, Status::ReadFault as u16, "{fmt}");
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 7,
            src: SRC,
            dst: MEM + 0x1000,
            src_len: 100,
            dst_len: 100,
            arg: 0,
        });
        assert_eq!(c.status, Status::WriteFault as u16, "{fmt}");
        let c = d.run(Sqe {
            opcode: 99,
            tag: 8,
            ..Default::default()
        });
        assert_eq!(c.status, Status::BadOpcode as u16);
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 9,
            src: SRC,
            dst: DST,
            src_len: MAX_JOB_LEN + 1,
            dst_len: 100,
            arg: 0,
        });
        assert_eq!(c.status, Status::TooLong as u16);
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 10,
            src: SRC,
            dst: DST,
            src_len: 100,
            dst_len: 50,
            arg: 0,
        });
        assert_eq!(c.status, Status::NoSpace as u16);
        assert_eq!(
            rig.fd.hwpt_domain(rig.hwpt).unwrap().faults().1,
            2,
            "{fmt}: two IOMMU faults logged"
        );
        // ... and the device keeps working.
        let c = d.run(Sqe {
            opcode: Opcode::Copy as u8,
            tag: 11,
            src: SRC,
            dst: DST,
            src_len: 10,
            dst_len: 10,
            arg: 0,
        });
        assert_eq!((c.status, c.tag), (0, 11), "{fmt}");
        assert_eq!(rig.accel.jobs_done(), 11);
    }
}

#[test]
fn client_runs_many_jobs_correctly() {
    let rig = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let client = accel::client::Client::new(&rig, 0x100_0000, 1);
    client.setup(3000).unwrap();
    assert!(wait_until(60, || {
        client.step();
        client.finished()
    }));
    let c = client.counters();
    assert_eq!((c.submitted, c.completed, c.errors, c.duplicates), (3000, 3000, 0, 0));
}

const WINDOW_IOVA: u64 = 0xd000_0000 + PEER_WINDOW;

/// A second device (READY) behind `rig`'s domain (of format `fmt`), its peer window mapped
/// there at `WINDOW_IOVA`, as a VMM maps a peer's BAR.
fn peer_of(rig: &Rig, fmt: FormatKind) -> accel::Accel {
    let peer_dev = rig.fd.bind_device(iommufd::DeviceSpec::new("peer", fmt));
    rig.fd.attach(peer_dev, rig.hwpt).unwrap();
    let peer = accel::Accel::new(AccelConfig::default(), rig.fd.device_dma(peer_dev).unwrap()).unwrap();
    peer.mmio_write(VF_STATE, &VF_STATE_READY.to_le_bytes());
    let va = rig.fd.register_user_memory(peer.peer_window());
    let mut m = iommufd::IoasMap {
        flags: iommufd::IOMMU_IOAS_MAP_FIXED_IOVA
            | iommufd::IOMMU_IOAS_MAP_READABLE
            | iommufd::IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: rig.ioas,
        user_va: va,
        length: PEER_WINDOW_SIZE,
        iova: WINDOW_IOVA,
        ..Default::default()
    };
    rig.fd.ioas_map(&mut m).unwrap();
    peer
}

/// Saves a stopped device (from STOP, or from STOP_COPY with its stream read) and leaves it
/// in STOP.
fn save_stopped(dev: &accel::Accel) -> Vec<u8> {
    let m = dev.migration();
    if m.get_state() != vfio::MigState::Stop {
        m.set_state(vfio::MigState::Stop).unwrap();
    }
    let s = m.set_state(vfio::MigState::StopCopy).unwrap().unwrap();
    let mut out = vec![0u8; 1 << 16];
    let n = s.read(&mut out).unwrap();
    out.truncate(n);
    m.set_state(vfio::MigState::Stop).unwrap();
    out
}

/// Why every device must be in RUNNING_P2P before any stops, without a VM: device A keeps
/// filling its peer P's window. P stopped and saved while A still runs: A's next jobs land in
/// P's window, and P saved again differs from what it saved, in the window's bytes (and the
/// CRC) alone: the writes the first save lost. With A in RUNNING_P2P before P stops, nothing
/// reaches P after its save, and both saves are the same bytes.
#[test]
fn a_peer_write_after_the_stop_is_lost_unless_peers_enter_p2p_first() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
    let rig = Rig::new(FormatKind::VtdSs, AccelConfig::default());
    let peer = peer_of(&rig, FormatKind::VtdSs);
    let (done, stop) = (AtomicU64::new(0), AtomicBool::new(false));
    let window = accel::migration::state_len(2) - 4 - PEER_WINDOW_SIZE as usize;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut d = Driver::new(&rig);
            let mut tag = 0u32;
            while !stop.load(Acquire) {
                tag += 1;
                let cqe = d.run(Sqe {
                    opcode: Opcode::Fill as u8,
                    tag,
                    dst: WINDOW_IOVA + (tag as u64 % 512) * 8,
                    dst_len: 8,
                    arg: tag as u64,
                    ..Default::default()
                });
                assert_eq!(cqe.status, Status::Ok as u16);
                done.fetch_add(1, Release);
            }
        });
        let more = |n: u64| {
            let at = done.load(Acquire);
            assert!(wait_until(10, || done.load(Acquire) >= at + n), "A runs jobs");
        };
        more(5);
        // The wrong order: P stops while A runs.
        let first = save_stopped(&peer);
        more(5);
        let second = save_stopped(&peer);
        assert_ne!(first, second, "A's writes after P's save");
        let differ: Vec<usize> = (0..first.len()).filter(|&i| first[i] != second[i]).collect();
        assert!(
            differ
                .iter()
                .all(|&i| (window..window + PEER_WINDOW_SIZE as usize).contains(&i) || i >= first.len() - 4),
            "only the window and its CRC changed: {:?}",
            &differ[..differ.len().min(8)]
        );
        // The right order: A in RUNNING_P2P (its job in flight finishes), then P stops.
        peer.migration().set_state(vfio::MigState::Running).unwrap();
        more(5);
        rig.accel.migration().set_state(vfio::MigState::RunningP2p).unwrap();
        peer.migration().set_state(vfio::MigState::RunningP2p).unwrap();
        let first = save_stopped(&peer);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(save_stopped(&peer), first, "nothing reached P after its save");
        stop.store(true, Release);
        rig.accel.migration().set_state(vfio::MigState::Running).unwrap();
    });
}

/// A job DMAs into a peer's window through the IOMMU (the window mapped into the IOAS as a
/// VMM maps a BAR), the peer's saved state carries what landed there, and a fresh device
/// loads it back.
#[test]
fn a_job_writes_a_peers_window_and_the_peer_migrates_it() {
    let rig = Rig::new(FormatKind::AmdV1, AccelConfig::default());
    let peer = peer_of(&rig, FormatKind::AmdV1);
    let mut d = Driver::new(&rig);
    let cqe = d.run(Sqe {
        opcode: Opcode::Fill as u8,
        tag: 1,
        dst: WINDOW_IOVA + 16,
        dst_len: 8,
        arg: 0x5a,
        ..Default::default()
    });
    assert_eq!((cqe.status, cqe.result), (Status::Ok as u16, 8));
    let w = peer.peer_window_bytes();
    assert_eq!(&w[8..32], &[[0u8; 8], [0x5a; 8], [0u8; 8]].concat()[..]);
    // The guest sees the same bytes through the register block.
    let mut b = [0u8; 8];
    peer.mmio_read(PEER_WINDOW + 16, &mut b);
    assert_eq!(b, [0x5a; 8]);
    // A write past the window's end faults instead of reaching anything else.
    let cqe = d.run(Sqe {
        opcode: Opcode::Fill as u8,
        tag: 2,
        dst: WINDOW_IOVA + PEER_WINDOW_SIZE - 4,
        dst_len: 8,
        arg: 1,
        ..Default::default()
    });
    assert_eq!(cqe.status, Status::WriteFault as u16);

    let state = save_stopped(&peer);
    let at = accel::migration::state_len(2) - 4 - PEER_WINDOW_SIZE as usize;
    assert_eq!(&state[at + 16..at + 24], &[0x5a; 8]);
    let fresh_rig = Rig::new(FormatKind::AmdV1, AccelConfig::default());
    let fresh = &fresh_rig.accel;
    fresh.migration().set_state(vfio::MigState::Stop).unwrap();
    let s = fresh.migration().set_state(vfio::MigState::Resuming).unwrap().unwrap();
    assert_eq!(s.write(&state).unwrap(), state.len());
    drop(s);
    fresh.migration().set_state(vfio::MigState::Stop).unwrap();
    assert_eq!(fresh.peer_window_bytes(), peer.peer_window_bytes());
}
