//! Device state from the wire: the VFIO stream framing, and the accelerator's loader behind
//! the VFIO migration state machine.

use crate::{split_first, Verdict};
use accel::{Accel, AccelConfig};
use iommu::{AnonMemory, FormatKind, HostMemory};
use iommufd::{DeviceSpec, HwptAlloc, IoasAlloc, IoasMap, IommuFd};
use std::sync::{Arc, Mutex, OnceLock};
use vfio::stream::{Decoder, Record, StreamError};
use vfio::{MigState, MigrationDevice};

/// Decodes a VFIO stream fed `chunk` bytes at a time. The records, re-encoded, must give back
/// exactly the bytes they were decoded from.
pub(crate) fn decode_stream(data: &[u8], chunk: usize) -> Result<Vec<Record>, StreamError> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        d.feed(piece);
        while let Some(r) = d.next_record()? {
            out.push(r);
        }
    }
    let mut again = Vec::new();
    for r in &out {
        r.encode(&mut again);
    }
    assert_eq!(
        again[..],
        data[..data.len() - d.pending()],
        "records do not re-encode to their bytes"
    );
    Ok(out)
}

/// Mode byte: the feeding chunk size (0: all at once).
pub fn vfio_stream(data: &[u8]) -> Verdict {
    let (mode, rest) = split_first(data);
    let chunk = if mode == 0 { usize::MAX } else { mode as usize };
    decode_stream(rest, chunk).is_ok().into()
}

/// One accelerator behind an iommufd context, shared by every input of a run (a device
/// costs a thread; the loader is reset between inputs).
struct Rig {
    _fd: IommuFd,
    accel: Accel,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let fd = IommuFd::new();
        let mem = Arc::new(AnonMemory::new(1 << 20, false).expect("fuzz device memory"));
        let va = fd.register_user_memory(mem as Arc<dyn HostMemory>);
        let mut a = IoasAlloc::default();
        fd.ioas_alloc(&mut a).expect("IOAS");
        let mut m = IoasMap {
            flags: iommufd::IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd::IOMMU_IOAS_MAP_READABLE
                | iommufd::IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: a.out_ioas_id,
            user_va: va,
            length: 1 << 20,
            iova: 0,
            ..Default::default()
        };
        fd.ioas_map(&mut m).expect("map");
        let dev = fd.bind_device(DeviceSpec::new("accel", FormatKind::AmdV1));
        let mut h = HwptAlloc {
            dev_id: dev,
            pt_id: a.out_ioas_id,
            ..Default::default()
        };
        fd.hwpt_alloc(&mut h).expect("HWPT");
        fd.attach(dev, h.out_hwpt_id).expect("attach");
        let accel = Accel::new(AccelConfig::default(), fd.device_dma(dev).expect("DMA")).expect("accel");
        Mutex::new(Rig { _fd: fd, accel })
    })
}

/// Writes `state` into a RESUMING device in `chunk`-byte write()s and takes the arc to STOP,
/// which loads it.
fn load(dev: &MigrationDevice, state: &[u8], chunk: usize) -> bool {
    dev.reset();
    let Ok(Some(s)) = dev.set_state(MigState::Resuming) else {
        panic!("RUNNING → RESUMING must open a resume stream");
    };
    for piece in state.chunks(chunk.max(1)) {
        match s.write(piece) {
            Ok(n) if n == piece.len() => {}
            Ok(n) => panic!("write() took {n} of {} bytes", piece.len()),
            Err(_) => return false,
        }
    }
    dev.set_state(MigState::Stop).is_ok()
}

/// The state a stopped device saves.
fn save(dev: &MigrationDevice) -> Vec<u8> {
    let Ok(Some(s)) = dev.set_state(MigState::StopCopy) else {
        panic!("STOP → STOP_COPY must open a save stream");
    };
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("saving a loaded state: {e}"),
        }
    }
    dev.set_state(MigState::Stop).expect("STOP_COPY → STOP");
    out
}

/// Mode byte: bit 0 set replaces the input's last four bytes with the CRC32C of the rest (so
/// the loader's checks past the checksum are reached); bits 1..7 are the write() size (0: one
/// write). A state that loads must save again in a form that loads and saves to itself.
pub fn accel_resume(data: &[u8]) -> Verdict {
    let (mode, rest) = split_first(data);
    let mut state = rest.to_vec();
    if mode & 1 != 0 && state.len() >= 4 {
        let (body, tail) = state.split_at_mut(rest.len() - 4);
        tail.copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    }
    let chunk = match (mode >> 1) as usize {
        0 => usize::MAX,
        n => n,
    };
    let rig = rig().lock().unwrap_or_else(|e| e.into_inner());
    let dev = rig.accel.migration();
    let ok = load(dev, &state, chunk);
    if ok {
        let once = save(dev);
        assert!(load(dev, &once, usize::MAX), "a saved state does not load");
        assert_eq!(save(dev), once, "a loaded state saves differently");
    }
    dev.reset();
    ok.into()
}
