//! The shadow vIOMMU: virtio-iommu-style MAP and UNMAP requests, carried out in a
//! single-stage HWPT, with the IOVA → GPA table the VMM keeps
//! (`docs/viommu.md#the-shadow-viommu`).
//!
//! The HWPT's dirty bits are indexed by IOVA. While a migration logs, an UNMAP goes through
//! `LIVEMIG_IOAS_UNMAP_DIRTY`: the dirty bits of what it removes come back, are translated
//! to guest pages through the table before the mapping is forgotten, and wait for the next
//! harvest ([`DmaSpace::take_unmapped_dirty`]). New mappings need nothing: HWPT tracking is
//! per domain, so a range mapped after logging started is logged from its first write.

use super::virtio::*;
use super::{DmaSpace, Mapping, UnmapLog, ID, ID_VALUE, MODE, REQ, REQ_STATUS};
use crate::dirty::CpuDirty;
use crate::layout::{VIOMMU_IOVA, VIOMMU_IOVA_SIZE};
use crate::mmio::MmioDevice;
use iommufd::{IoasMap, IoasUnmap, IoasUnmapDirty, IommuFd, IOMMU_IOAS_MAP_FIXED_IOVA};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) struct ShadowViommu {
    fd: Arc<IommuFd>,
    ioas: u32,
    mem: Arc<GuestMemoryMmap>,
    /// Where the status bytes written into the guest's requests are logged for migration.
    dirty: Arc<CpuDirty>,
    /// Guest RAM as registered user memory: (gpa, size, user va).
    ram: Vec<(u64, u64, u64)>,
    /// IOVA → (length, GPA, virtio MAP flags) of every mapping the guest made.
    map: Mutex<BTreeMap<u64, (u64, u64, u32)>>,
    logging: Mutex<Option<UnmapLog>>,
    pending: Mutex<Vec<u64>>,
    last_status: AtomicU32,
    /// Test-only sabotage: unmap without reading the dirty bits first.
    skip_unmap_dirty: AtomicBool,
    /// Test-only sabotage: report the mappings as if IOVA were GPA.
    skip_translation: AtomicBool,
}

impl ShadowViommu {
    pub fn new(
        fd: Arc<IommuFd>,
        ioas: u32,
        mem: Arc<GuestMemoryMmap>,
        ram: Vec<(u64, u64, u64)>,
        dirty: Arc<CpuDirty>,
    ) -> Self {
        Self {
            fd,
            ioas,
            mem,
            dirty,
            ram,
            map: Mutex::new(BTreeMap::new()),
            logging: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            last_status: AtomicU32::new(0),
            skip_unmap_dirty: AtomicBool::new(false),
            skip_translation: AtomicBool::new(false),
        }
    }

    /// Sabotage for tests: the IOVA-indexed bits are taken for guest pages untranslated.
    pub fn sabotage_skip_translation(&self, on: bool) {
        self.skip_translation.store(on, Ordering::Relaxed);
    }

    /// Sabotage for tests: unmaps stop reading the dirty bits of what they remove.
    pub fn sabotage_skip_unmap_dirty(&self, on: bool) {
        self.skip_unmap_dirty.store(on, Ordering::Relaxed);
    }

    /// The user address of `[gpa, gpa + len)` if it is RAM in one region.
    fn user_va(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        self.ram
            .iter()
            .find(|&&(g, s, _)| g <= gpa && end <= g + s)
            .map(|&(g, _, va)| va + (gpa - g))
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().expect("in bounds"))
    }

    /// Carries out the request at `gpa` and writes its status into its tail.
    fn request(&self, gpa: u64) {
        let mut head = [0u8; 1];
        if self.mem.read_slice(&mut head, GuestAddress(gpa)).is_err() {
            self.last_status.store(S_DEVERR as u32, Ordering::Release);
            return;
        }
        let (len, status_at) = match head[0] {
            T_MAP => (MAP_LEN, MAP_STATUS),
            T_UNMAP => (UNMAP_LEN, UNMAP_STATUS),
            _ => {
                self.last_status.store(S_UNSUPP as u32, Ordering::Release);
                return;
            }
        };
        let mut b = vec![0u8; len];
        if self.mem.read_slice(&mut b, GuestAddress(gpa)).is_err() {
            self.last_status.store(S_DEVERR as u32, Ordering::Release);
            return;
        }
        let status = if head[0] == T_MAP {
            let flags = u32::from_le_bytes(b[32..36].try_into().expect("in bounds"));
            self.map(Self::u64_at(&b, 8), Self::u64_at(&b, 16), Self::u64_at(&b, 24), flags)
        } else {
            self.unmap(Self::u64_at(&b, 8), Self::u64_at(&b, 16))
        };
        self.last_status.store(status as u32, Ordering::Release);
        let Some(at) = gpa.checked_add(status_at as u64) else {
            return;
        };
        if self.mem.write_slice(&[status], GuestAddress(at)).is_ok() {
            self.dirty.mark_host_write(at, 1);
        }
    }

    fn map(&self, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
        if flags & !(MAP_READ | MAP_WRITE | MAP_MMIO) != 0 || flags & (MAP_READ | MAP_WRITE) == 0 {
            return S_INVAL;
        }
        if flags & MAP_MMIO != 0 {
            return S_UNSUPP;
        }
        let Some(len) = end.checked_sub(start).and_then(|l| l.checked_add(1)) else {
            return S_INVAL;
        };
        // The vIOMMU's input range is the client's window (virtio-iommu's `input_range`): a
        // device log over the window sees every mapping, and the table stays within 512
        // mappings (the IOAS refuses overlaps).
        let in_window = start >= VIOMMU_IOVA && end < VIOMMU_IOVA + VIOMMU_IOVA_SIZE;
        if !start.is_multiple_of(4096) || !len.is_multiple_of(4096) || !phys.is_multiple_of(4096) || !in_window {
            return S_RANGE;
        }
        let Some(va) = self.user_va(phys, len) else {
            return S_INVAL; // not guest RAM
        };
        let mut perm = 0;
        if flags & MAP_READ != 0 {
            perm |= iommufd::IOMMU_IOAS_MAP_READABLE;
        }
        if flags & MAP_WRITE != 0 {
            perm |= iommufd::IOMMU_IOAS_MAP_WRITEABLE;
        }
        let mut table = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = IoasMap {
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | perm,
            ioas_id: self.ioas,
            user_va: va,
            length: len,
            iova: start,
            ..Default::default()
        };
        match self.fd.ioas_map(&mut m) {
            Ok(()) => {
                table.insert(start, (len, phys, flags));
                S_OK
            }
            Err(e) if e.code() == iommu::errno::EEXIST || e.code() == iommu::errno::EINVAL => S_INVAL,
            Err(_) => S_DEVERR,
        }
    }

    fn unmap(&self, start: u64, end: u64) -> u8 {
        if end < start {
            return S_INVAL;
        }
        let mut table = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let removed: Vec<(u64, u64, u64)> = table
            .range(..=end)
            .filter(|(&i, &(l, _, _))| i + l > start)
            .map(|(&i, &(l, g, _))| (i, l, g))
            .collect();
        if removed.is_empty() {
            return S_OK; // nothing mapped there
        }
        if removed.iter().any(|&(i, l, _)| i < start || i + l - 1 > end) {
            return S_RANGE; // it would split a mapping: nothing is removed
        }
        let log = if self.skip_unmap_dirty.load(Ordering::Relaxed) {
            None
        } else {
            self.logging.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        // One mapping at a time: the work is bounded by what is mapped (at most the window),
        // never by the range the guest names.
        let mut pending = Vec::new();
        let mut failed = None;
        for &(iova, len, gpa) in &removed {
            let mut bits = vec![0u8; (len / 4096).div_ceil(8) as usize];
            let unmap = |fd: &IommuFd| {
                fd.ioas_unmap(&mut IoasUnmap {
                    ioas_id: self.ioas,
                    iova,
                    length: len,
                })
            };
            let r = match log {
                Some(UnmapLog::Hwpt) => self.fd.ioas_unmap_dirty(&mut IoasUnmapDirty {
                    ioas_id: self.ioas,
                    flags: 0,
                    __reserved: 0,
                    iova,
                    length: len,
                    page_size: 4096,
                    data: &mut bits,
                }),
                // The unmap drains the device's accesses through the range first: after it,
                // the log holds every write the range saw (the device logs before and after
                // each write, `accel::jobs`).
                Some(UnmapLog::Device(ref dev)) => unmap(&self.fd).map(|()| {
                    if dev.dma_logging_report(iova, len, 4096, &mut bits).is_err() {
                        // The translation is gone and its log unread: every page counts.
                        bits.fill(0xff);
                    }
                }),
                None => unmap(&self.fd),
            };
            match r {
                Ok(()) => {
                    table.remove(&iova);
                    if log.is_some() {
                        // Translated while this mapping still says where each IOVA led.
                        for n in 0..len / 4096 {
                            if bits[(n / 8) as usize] >> (n % 8) & 1 != 0 {
                                pending.push(gpa / 4096 + n);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("vIOMMU: unmap of {iova:#x}+{len:#x} failed: {e}");
                    failed = Some(e);
                }
            }
        }
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).extend(pending);
        if failed.is_some() {
            S_DEVERR
        } else {
            S_OK
        }
    }
}

impl super::ViommuState for ShadowViommu {
    fn save(&self) -> Vec<u8> {
        let table = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = (table.len() as u32).to_le_bytes().to_vec();
        for (&i, &(l, g, f)) in table.iter() {
            for v in [i, l, g] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&f.to_le_bytes());
        }
        b
    }
    fn restore(&self, b: &[u8]) -> Result<(), String> {
        let n = b
            .get(..4)
            .map(|h| u32::from_le_bytes(h.try_into().expect("4 bytes")) as usize)
            .ok_or("shadow vIOMMU state shorter than its count")?;
        if b.len() != 4 + n * 28 {
            return Err(format!("shadow vIOMMU state of {} bytes for {n} mappings", b.len()));
        }
        for k in 0..n {
            let e = &b[4 + k * 28..4 + (k + 1) * 28];
            let at = |o| super::u64_at(e, o).expect("in bounds");
            let (iova, len, gpa) = (at(0), at(8), at(16));
            let flags = u32::from_le_bytes(e[24..28].try_into().expect("4 bytes"));
            let end = iova
                .checked_add(len)
                .and_then(|e| e.checked_sub(1))
                .ok_or("mapping wraps")?;
            // The same checks as the guest's own MAP: a bad entry is refused, not mapped.
            let st = self.map(iova, end, gpa, flags);
            if st != S_OK {
                return Err(format!(
                    "mapping {iova:#x}+{len:#x} -> {gpa:#x}: virtio-iommu status {st}"
                ));
            }
        }
        Ok(())
    }
}

impl MmioDevice for ShadowViommu {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v: u64 = match offset {
            ID => ID_VALUE as u64,
            MODE => super::ViommuMode::Shadow.register() as u64,
            REQ_STATUS => self.last_status.load(Ordering::Acquire) as u64,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == REQ {
            let mut b = [0u8; 8];
            let n = data.len().min(8);
            b[..n].copy_from_slice(&data[..n]);
            self.request(u64::from_le_bytes(b));
        }
    }
}

impl DmaSpace for ShadowViommu {
    fn with_ram_mappings(&self, f: &mut dyn FnMut(&[Mapping])) {
        let table = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let untranslated = self.skip_translation.load(Ordering::Relaxed);
        let v: Vec<Mapping> = table
            .iter()
            .map(|(&i, &(l, g, _))| (i, l, if untranslated { i } else { g }))
            .collect();
        f(&v);
    }
    fn identity(&self) -> bool {
        false
    }
    fn log_ranges(&self) -> Result<Vec<(u64, u64)>, String> {
        Ok(vec![(VIOMMU_IOVA, VIOMMU_IOVA_SIZE)])
    }
    fn set_unmap_log(&self, log: Option<UnmapLog>) {
        // Under the table's lock: an unmap in progress finishes under the old setting.
        let _t = self.map.lock().unwrap_or_else(|e| e.into_inner());
        *self.logging.lock().unwrap_or_else(|e| e.into_inner()) = log;
    }
    fn take_unmapped_dirty(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::{DirtyLogMode, Slot};
    use iommu::HostMemory;
    use iommufd::*;

    const RAM: u64 = 16 << 20;
    const REQ_AT: u64 = 0x1000;

    /// A shadow vIOMMU over 16 MiB of guest RAM, without KVM: the request path alone.
    fn shadow() -> (Arc<GuestMemoryMmap>, ShadowViommu) {
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
        let fd = Arc::new(IommuFd::new());
        let mut a = IoasAlloc::default();
        fd.ioas_alloc(&mut a).unwrap();
        let dev = fd.bind_device(DeviceSpec::new("d", iommu::FormatKind::VtdSs));
        let mut h = HwptAlloc {
            flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id: dev,
            pt_id: a.out_ioas_id,
            ..Default::default()
        };
        fd.hwpt_alloc(&mut h).unwrap();
        fd.attach(dev, h.out_hwpt_id).unwrap();
        let region = iommu::mem::GuestRamRegion::new(mem.clone(), 0).unwrap();
        let va = fd.register_user_memory(Arc::new(region) as Arc<dyn HostMemory>);
        let slots = vec![Slot {
            slot: 0,
            gpa: 0,
            size: RAM,
        }];
        let dirty = Arc::new(CpuDirty::new(DirtyLogMode::Bitmap, slots, RAM / 4096));
        let s = ShadowViommu::new(fd, a.out_ioas_id, mem.clone(), vec![(0, RAM, va)], dirty);
        (mem, s)
    }

    fn map(mem: &GuestMemoryMmap, s: &ShadowViommu, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
        let mut b = [0u8; MAP_LEN];
        b[0] = T_MAP;
        b[8..16].copy_from_slice(&start.to_le_bytes());
        b[16..24].copy_from_slice(&end.to_le_bytes());
        b[24..32].copy_from_slice(&phys.to_le_bytes());
        b[32..36].copy_from_slice(&flags.to_le_bytes());
        b[MAP_STATUS] = 0xff;
        mem.write_slice(&b, GuestAddress(REQ_AT)).unwrap();
        s.write(REQ, &REQ_AT.to_le_bytes());
        mem.read_obj::<u8>(GuestAddress(REQ_AT + MAP_STATUS as u64)).unwrap()
    }

    fn unmap(mem: &GuestMemoryMmap, s: &ShadowViommu, start: u64, end: u64) -> u8 {
        let mut b = [0u8; UNMAP_LEN];
        b[0] = T_UNMAP;
        b[8..16].copy_from_slice(&start.to_le_bytes());
        b[16..24].copy_from_slice(&end.to_le_bytes());
        b[UNMAP_STATUS] = 0xff;
        mem.write_slice(&b, GuestAddress(REQ_AT)).unwrap();
        s.write(REQ, &REQ_AT.to_le_bytes());
        mem.read_obj::<u8>(GuestAddress(REQ_AT + UNMAP_STATUS as u64)).unwrap()
    }

    /// Each virtio-iommu status the requests can get, and the guest's worst ranges handled
    /// by what is mapped, not by what the guest names.
    #[test]
    fn requests_get_the_virtio_iommu_statuses() {
        let (mem, s) = shadow();
        let w = VIOMMU_IOVA;
        let rw = MAP_READ | MAP_WRITE;
        assert_eq!(map(&mem, &s, w, w + 0xfff, 0x20_0000, rw), S_OK);
        assert_eq!(map(&mem, &s, w, w + 0xfff, 0x30_0000, rw), S_INVAL, "overlap");
        assert_eq!(
            map(&mem, &s, w + 0x1000, w + 0x1fff, 0x20_0000, 0),
            S_INVAL,
            "no permission"
        );
        assert_eq!(
            map(&mem, &s, w + 0x1000, w + 0x1fff, 0x20_0000, 8),
            S_INVAL,
            "unknown flag"
        );
        assert_eq!(
            map(&mem, &s, w + 0x1000, w + 0x1fff, 0x20_0000, MAP_MMIO | rw),
            S_UNSUPP
        );
        assert_eq!(map(&mem, &s, w + 0x1000, w + 0x1fff, RAM, rw), S_INVAL, "not RAM");
        assert_eq!(
            map(&mem, &s, 0x1000, 0x1fff, 0x20_0000, rw),
            S_RANGE,
            "outside the window"
        );
        assert_eq!(
            map(
                &mem,
                &s,
                w + VIOMMU_IOVA_SIZE - 0x1000,
                w + VIOMMU_IOVA_SIZE,
                0x20_0000,
                rw
            ),
            S_RANGE,
            "across the window's end"
        );
        assert_eq!(
            map(&mem, &s, w + 0x1800, w + 0x27ff, 0x20_0000, rw),
            S_RANGE,
            "unaligned"
        );
        assert_eq!(map(&mem, &s, w + 0x2000, w + 0x3fff, 0x40_0000, rw), S_OK);
        assert_eq!(
            unmap(&mem, &s, w + 0x2000, w + 0x2fff),
            S_RANGE,
            "it would split a mapping"
        );
        assert_eq!(s.map.lock().unwrap().len(), 2, "nothing removed");
        assert_eq!(unmap(&mem, &s, w + 0x10_0000, w + 0x10_0fff), S_OK, "nothing there");
        assert_eq!(unmap(&mem, &s, 5, 4), S_INVAL);
        // The whole 64-bit space at once: bounded by the two mappings it removes.
        s.set_unmap_log(Some(UnmapLog::Hwpt));
        let t = std::time::Instant::now();
        assert_eq!(unmap(&mem, &s, 0, u64::MAX - 1), S_OK);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(s.map.lock().unwrap().is_empty());
        // A request beyond guest RAM, or whose status would wrap, is refused without a panic.
        s.write(REQ, &u64::MAX.to_le_bytes());
        s.write(REQ, &(RAM - 1).to_le_bytes());
        let mut st = [0u8; 4];
        s.read(REQ_STATUS, &mut st);
        assert_ne!(st[0], S_OK);
    }
}
