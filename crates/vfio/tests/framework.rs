//! Data-stream semantics, VFIO_DEVICE_FEATURE, DMA logging through a device, and the VMM-side
//! sequence across several devices.

use iommu::errno::*;
use iommu::Errno;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vfio::device::*;
use vfio::vmm::{DestEvent, Destination, Source};
use vfio::*;
use MigState::*;

type Log = Arc<Mutex<Vec<(String, MigState, MigState)>>>;

/// A device whose state is a byte string: `initial` is sent in pre-copy, the whole of `state`
/// in stop-copy; `dirty` grows when the test says the device changed.
struct Blob {
    name: String,
    flags: MigFlags,
    state: Vec<u8>,
    initial: usize,
    pos: usize,
    dirty: Arc<AtomicU64>,
    sent_dirty: u64,
    stop_pos: usize,
    received: Arc<Mutex<Vec<u8>>>,
    log: Log,
    log_ops: Option<Arc<DmaLog>>,
}

impl Blob {
    fn new(name: &str, flags: MigFlags, log: &Log) -> (Self, Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>) {
        let received = Arc::new(Mutex::new(Vec::new()));
        let dirty = Arc::new(AtomicU64::new(0));
        let state: Vec<u8> = (0..300u32).map(|i| (i * 7 + name.len() as u32) as u8).collect();
        (
            Blob {
                name: name.into(),
                flags,
                state,
                initial: 100,
                pos: 0,
                dirty: dirty.clone(),
                sent_dirty: 0,
                stop_pos: 0,
                received: received.clone(),
                log: log.clone(),
                log_ops: None,
            },
            received,
            dirty,
        )
    }
}

impl MigrationDriver for Blob {
    fn migration_flags(&self) -> MigFlags {
        self.flags
    }
    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<StreamKind>, Errno> {
        self.log.lock().unwrap().push((self.name.clone(), from, to));
        Ok(match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                self.pos = 0;
                Some(StreamKind::Save)
            }
            (Stop, StopCopy) => {
                self.stop_pos = 0;
                Some(StreamKind::Save)
            }
            (PreCopy | PreCopyP2p, StopCopy) => {
                self.stop_pos = 0;
                None
            }
            (Stop, Resuming) => {
                self.received.lock().unwrap().clear();
                Some(StreamKind::Resume)
            }
            (Resuming, Stop) => {
                let got = self.received.lock().unwrap();
                if got.len() < 300 || got[got.len() - 300..] != self.state[..] {
                    return Err(Errno::new(EINVAL, "bad device state"));
                }
                None
            }
            _ => None,
        })
    }
    fn save_read(&mut self, state: MigState, buf: &mut [u8]) -> Result<usize, Errno> {
        if state.is_precopy() {
            if self.pos < self.initial {
                let n = buf.len().min(self.initial - self.pos).min(40);
                buf[..n].copy_from_slice(&self.state[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            let d = self.dirty.load(Ordering::SeqCst);
            if d > self.sent_dirty {
                let n = ((d - self.sent_dirty) as usize).min(buf.len());
                buf[..n].fill(0xdd);
                self.sent_dirty += n as u64;
                return Ok(n);
            }
            return Ok(0);
        }
        let n = buf.len().min(self.state.len() - self.stop_pos);
        buf[..n].copy_from_slice(&self.state[self.stop_pos..self.stop_pos + n]);
        self.stop_pos += n;
        Ok(n)
    }
    fn resume_write(&mut self, b: &[u8]) -> Result<usize, Errno> {
        self.received.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn precopy_info(&mut self) -> PrecopyInfo {
        PrecopyInfo {
            initial_bytes: (self.initial - self.pos) as u64,
            dirty_bytes: self.dirty.load(Ordering::SeqCst) - self.sent_dirty,
        }
    }
    fn stop_copy_size(&mut self) -> Result<u64, Errno> {
        Ok(self.state.len() as u64)
    }
    fn reset(&mut self) {
        self.pos = 0;
        self.stop_pos = 0;
    }
    fn dma_logging(&mut self) -> Option<&mut dyn DmaLogging> {
        self.log_ops.as_mut().map(|l| l as &mut dyn DmaLogging)
    }
}

fn dev(name: &str, flags: MigFlags, log: &Log) -> (MigrationDevice, Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>) {
    let (b, r, d) = Blob::new(name, flags, log);
    (MigrationDevice::new(name, b).unwrap(), r, d)
}

#[test]
fn enomsg_versus_eof_and_precopy_info_shrinks() {
    let log = Log::default();
    let (d, _, dirty) = dev("a", MigFlags(5), &log);
    let s = d
        .set_state(PreCopy)
        .unwrap()
        .expect("RUNNING -> PRE_COPY opens a stream");
    let mut infos = vec![s.precopy_info().unwrap()];
    let mut buf = [0u8; 64];
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(n) => {
                assert!(n > 0, "pre-copy never returns 0");
                got += n;
                infos.push(s.precopy_info().unwrap());
            }
            Err(e) => {
                assert_eq!(e, ENOMSG, "a temporary end in PRE_COPY");
                break;
            }
        }
    }
    assert_eq!(got, 100);
    let initial: Vec<u64> = infos.iter().map(|i| i.initial_bytes).collect();
    assert_eq!(initial, vec![100, 60, 20, 0], "initial_bytes drops as data is read");
    assert!(infos.iter().all(|i| i.dirty_bytes == 0));
    dirty.store(30, Ordering::SeqCst);
    assert_eq!(
        s.precopy_info().unwrap(),
        PrecopyInfo {
            initial_bytes: 0,
            dirty_bytes: 30
        }
    );
    assert_eq!(s.read(&mut buf).unwrap(), 30);
    assert_eq!(s.read(&mut buf).unwrap_err(), ENOMSG);
    // STOP_COPY continues the same stream; 0 is now the real end.
    assert!(
        d.set_state(StopCopy).unwrap().is_none(),
        "PRE_COPY -> STOP_COPY returns no new stream"
    );
    assert_eq!(s.precopy_info().unwrap_err(), EINVAL, "PRECOPY_INFO outside pre-copy");
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 300);
    assert_eq!(s.read(&mut buf).unwrap(), 0, "EOF stays EOF");
    assert_eq!(d.mig_data_size().unwrap(), 300);
    d.set_state(Stop).unwrap();
    assert_eq!(
        s.read(&mut buf).unwrap_err(),
        ENODEV,
        "leaving STOP_COPY ends the stream"
    );
}

#[test]
fn reset_invalidates_streams_and_leaves_error() {
    let log = Log::default();
    let (d, _, _) = dev("a", MigFlags(7), &log);
    let s = d.set_state(PreCopy).unwrap().unwrap();
    d.reset();
    assert_eq!(d.get_state(), Running);
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap_err(), ENODEV);
    assert_eq!(s.precopy_info().unwrap_err(), ENODEV);
    assert!(!s.is_open());
    // A failed RESUMING -> STOP (bad data) fails the SET; reset gets the device back.
    d.set_state(Stop).unwrap();
    let r = d.set_state(Resuming).unwrap().unwrap();
    r.write(b"garbage").unwrap();
    assert_eq!(d.set_state(Stop).unwrap_err(), EINVAL);
    assert_eq!(d.get_state(), Resuming, "left in the original state");
    assert_eq!(r.read(&mut buf).unwrap_err(), EINVAL, "a resume stream is write-only");
    d.reset();
    assert_eq!(r.write(b"x").unwrap_err(), ENODEV);
}

#[test]
fn feature_get_set_probe() {
    let log = Log::default();
    let (d, _, _) = dev("a", MigFlags(5), &log);
    let get = FEATURE_GET;
    let set = FEATURE_SET;
    let probe = FEATURE_PROBE;
    let f = |flags, argsz, arg| d.feature(flags, argsz, arg);
    assert!(matches!(
        f(get | FEATURE_MIGRATION, 16, FeatureArg::None),
        Ok(FeatureReply::Migration(MigFlags(5)))
    ));
    assert!(matches!(
        f(probe | get | FEATURE_MIGRATION, 8, FeatureArg::None),
        Ok(FeatureReply::Probed)
    ));
    assert_eq!(
        f(set | FEATURE_MIGRATION, 16, FeatureArg::None).unwrap_err(),
        EINVAL,
        "MIGRATION has no SET"
    );
    assert_eq!(
        f(probe | set | FEATURE_MIGRATION, 16, FeatureArg::None).unwrap_err(),
        EINVAL,
        "PROBE of an unsupported op"
    );
    assert_eq!(
        f(FEATURE_MIGRATION, 16, FeatureArg::None).unwrap_err(),
        EINVAL,
        "neither GET nor SET"
    );
    assert_eq!(
        f(get | set | FEATURE_MIG_DEVICE_STATE, 16, FeatureArg::None).unwrap_err(),
        EINVAL,
        "GET and SET without PROBE"
    );
    assert!(matches!(
        f(probe | get | set | FEATURE_MIG_DEVICE_STATE, 8, FeatureArg::None),
        Ok(FeatureReply::Probed)
    ));
    assert_eq!(
        f(get | FEATURE_MIGRATION, 12, FeatureArg::None).unwrap_err(),
        EINVAL,
        "argsz short of the payload"
    );
    assert_eq!(
        f(get | FEATURE_MIGRATION, 4, FeatureArg::None).unwrap_err(),
        EINVAL,
        "argsz below the header"
    );
    assert_eq!(
        f(get | 1 << 20 | FEATURE_MIGRATION, 16, FeatureArg::None).unwrap_err(),
        EINVAL,
        "undefined flag bit"
    );
    assert_eq!(
        f(get | 55, 16, FeatureArg::None).unwrap_err(),
        ENOTTY,
        "unknown feature"
    );
    assert_eq!(
        f(probe | set | FEATURE_DMA_LOGGING_START, 32, FeatureArg::None).unwrap_err(),
        ENOTTY,
        "no log_ops"
    );
    match f(
        set | FEATURE_MIG_DEVICE_STATE,
        16,
        FeatureArg::DeviceState(PreCopy as u32),
    )
    .unwrap()
    {
        FeatureReply::MigDeviceState {
            device_state: PreCopy,
            stream: Some(_),
        } => {}
        other => panic!("{other:?}"),
    }
    match f(get | FEATURE_MIG_DEVICE_STATE, 16, FeatureArg::None).unwrap() {
        FeatureReply::MigDeviceState {
            device_state: PreCopy,
            stream: None,
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f(set | FEATURE_MIG_DEVICE_STATE, 16, FeatureArg::DeviceState(8)).unwrap_err(),
        EINVAL,
        "state >= 8"
    );
    assert!(matches!(
        f(get | FEATURE_MIG_DATA_SIZE, 16, FeatureArg::None),
        Ok(FeatureReply::MigDataSize(300))
    ));
}

#[test]
fn dma_logging_through_the_device() {
    let log = Log::default();
    let (mut b, _, _) = Blob::new("logger", MigFlags(7), &log);
    let dlog = DmaLog::new(4096);
    b.log_ops = Some(dlog.clone());
    let d = MigrationDevice::new("logger", b).unwrap();
    let r = |iova, length| LogRange { iova, length };
    assert_eq!(d.dma_logging_start(&[], 4096).unwrap_err(), EINVAL);
    assert_eq!(d.dma_logging_start(&vec![r(0, 4096); 257], 4096).unwrap_err(), E2BIG);
    assert_eq!(d.dma_logging_start(&[r(0x100, 4096)], 4096).unwrap_err(), EINVAL);
    assert_eq!(
        d.dma_logging_start(&[r(u64::MAX - 4095, 8192)], 4096).unwrap_err(),
        EOVERFLOW
    );
    assert_eq!(
        d.dma_logging_start(&[r(0, 8192), r(4096, 4096)], 4096).unwrap_err(),
        EINVAL
    );
    let mut bm = [0u8; 8];
    assert_eq!(
        d.dma_logging_report(0, 64 * 4096, 4096, &mut bm).unwrap_err(),
        EINVAL,
        "not started"
    );
    // The device raises a 2 KiB request to its 4 KiB granularity.
    assert_eq!(d.dma_logging_start(&[r(0, 64 * 4096)], 2048).unwrap(), 4096);
    assert_eq!(
        d.dma_logging_start(&[r(0, 64 * 4096)], 4096).unwrap_err(),
        EINVAL,
        "START again before STOP"
    );
    dlog.record(5 * 4096 + 10, 100);
    dlog.record(40 * 4096, 4096);
    assert_eq!(
        d.dma_logging_report(0, 64 * 4096, 1000, &mut bm).unwrap_err(),
        EINVAL,
        "page_size not a power of two"
    );
    d.dma_logging_report(0, 64 * 4096, 4096, &mut bm).unwrap();
    assert_eq!(bm, [0x20, 0, 0, 0, 0, 0x01, 0, 0]);
    let mut again = [0u8; 8];
    d.dma_logging_report(0, 64 * 4096, 4096, &mut again).unwrap();
    assert_eq!(again, [0; 8], "REPORT reads and clears");
    d.dma_logging_stop().unwrap();
    assert!(matches!(
        d.feature(
            FEATURE_PROBE | FEATURE_SET | FEATURE_DMA_LOGGING_START,
            8,
            FeatureArg::None
        ),
        Ok(FeatureReply::Probed)
    ));
}

#[test]
fn vmm_moves_every_p2p_device_before_any_stops() {
    let log = Log::default();
    let (a, _, _) = dev("a", MigFlags(7), &log);
    let (b, _, _) = dev("b", MigFlags(3), &log);
    let (c, _, _) = dev("c", MigFlags(5), &log);
    let (a2, ra, _) = dev("a", MigFlags(7), &log);
    let (b2, rb, _) = dev("b", MigFlags(3), &log);
    let (c2, rc, _) = dev("c", MigFlags(5), &log);
    let mut src = Source::new(vec![a.clone(), b.clone(), c.clone()]);
    let mut dst = Destination::new(vec![a2.clone(), b2.clone(), c2.clone()]);
    dst.setup().unwrap();
    for (i, bytes) in src.setup().unwrap() {
        dst.load(i, &bytes).unwrap();
    }
    assert_eq!(
        (a.get_state(), b.get_state(), c.get_state()),
        (PreCopy, Running, PreCopy)
    );
    let p = src.pending();
    assert_eq!(p.estimate, 200, "initial bytes of the two pre-copy devices");
    assert_eq!(p.exact, 200 + 900, "plus every stop_copy_length");
    let mut acked = false;
    for _ in 0..10 {
        let (sections, done) = src.iterate().unwrap();
        for (i, bytes) in sections {
            for ev in dst.load(i, &bytes).unwrap() {
                assert!(matches!(ev, DestEvent::InitDataReceived(0 | 2)));
            }
        }
        acked = dst.init_data_received();
        if done {
            break;
        }
    }
    assert!(
        acked && src.initial_data_sent(),
        "switchover acknowledged only after initial data"
    );
    log.lock().unwrap().clear();
    src.enter_p2p().unwrap();
    let sections = src.stop_copy().unwrap();
    let arcs = log.lock().unwrap().clone();
    let first_stop = arcs
        .iter()
        .position(|(_, _, to)| matches!(to, Stop | StopCopy))
        .unwrap();
    let last_p2p = arcs
        .iter()
        .rposition(|(_, _, to)| matches!(to, RunningP2p | PreCopyP2p))
        .unwrap();
    assert!(
        last_p2p < first_stop,
        "every P2P device entered P2P before any stopped: {arcs:?}"
    );
    assert_eq!(
        &arcs[..2],
        &[("a".into(), PreCopy, PreCopyP2p), ("b".into(), Running, RunningP2p)]
    );
    for (i, bytes) in sections {
        dst.load(i, &bytes).unwrap();
    }
    dst.finish().unwrap();
    dst.start().unwrap();
    src.complete();
    for r in [&ra, &rb, &rc] {
        assert!(r.lock().unwrap().len() >= 300);
    }
    assert_eq!(
        (a2.get_state(), b2.get_state(), c2.get_state()),
        (Running, Running, Running)
    );
    assert_eq!((a.get_state(), b.get_state(), c.get_state()), (Stop, Stop, Stop));
}

#[test]
fn vmm_abort_returns_devices_to_running() {
    let log = Log::default();
    let (a, _, _) = dev("a", MigFlags(7), &log);
    let (c, _, _) = dev("c", MigFlags(1), &log);
    let mut src = Source::new(vec![a.clone(), c.clone()]);
    src.setup().unwrap();
    src.iterate().unwrap();
    src.enter_p2p().unwrap();
    assert_eq!(a.get_state(), PreCopyP2p);
    src.abort();
    assert_eq!((a.get_state(), c.get_state()), (Running, Running));
    // After a stop-copy too.
    src.setup().unwrap();
    src.stop_copy().unwrap();
    assert_eq!((a.get_state(), c.get_state()), (StopCopy, StopCopy));
    src.abort();
    assert_eq!((a.get_state(), c.get_state()), (Running, Running));
}

#[test]
fn destination_refuses_malformed_streams() {
    let log = Log::default();
    let (a, _, _) = dev("a", MigFlags(1), &log);
    let mut dst = Destination::new(vec![a]);
    dst.setup().unwrap();
    let mut bytes = Vec::new();
    vfio::stream::Record::Setup.encode(&mut bytes);
    vfio::stream::Record::Data(vec![1]).encode(&mut bytes);
    assert!(dst.load(0, &bytes).unwrap_err().to_string().contains("END_OF_STATE"));
    let mut d2 = Destination::new(vec![dev("b", MigFlags(1), &log).0]);
    d2.setup().unwrap();
    let mut bytes = Vec::new();
    vfio::stream::Record::InitDataSent.encode(&mut bytes);
    assert!(
        d2.load(0, &bytes).is_err(),
        "INIT_DATA_SENT from a device without PRE_COPY"
    );
    assert!(d2.load(5, &[]).is_err(), "no such device");
}
