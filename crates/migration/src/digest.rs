//! Verification's evidence: what each side computes so the two can be compared
//! (`docs/protocol.md`, "Verification").
//!
//! * Memory: a hash per 4 KiB page. The destination records each page's hash as it applies
//!   it ([`PageLog`]), so at resume its digest is already complete and nothing is hashed
//!   while its guest waits; the source hashes its frozen memory ([`memory_hashes`]).
//! * Devices: a hash of all the state a device sent, and of what the loaded device saves
//!   again on the destination ([`DeviceHash`], [`resave_hash`]).
//! * vCPUs: `vmm::state::digest` of the state saved, and of the state the destination's
//!   vCPUs hold after loading it.
//!
//! The hash is XXH3 (its low 32 bits), not a CRC: a CRC is linear, and any data that ends in
//! its own CRC32C (the accelerator's saved state does, and so can a guest's page) has one
//! and the same CRC32C whatever the data, seeded or not, so two different such states would
//! compare equal.

use crate::pages::MemoryMap;
use std::hash::Hasher as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use twox_hash::XxHash3_64;
use vfio::stream::{Decoder, Record};
use vfio::{MigState, MigrationDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PAGE: u64 = 4096;

/// The digest's hash of one page.
pub fn page_hash(page: &[u8]) -> u32 {
    XxHash3_64::oneshot(page) as u32
}

/// The hash of the platform state (`vmm::Snapshots::save_platform`), as of any byte string.
pub fn platform_hash(state: &[u8]) -> u32 {
    XxHash3_64::oneshot(state) as u32
}

/// The hash of a page of zeros.
pub fn zero_page_hash() -> u32 {
    static Z: OnceLock<u32> = OnceLock::new();
    *Z.get_or_init(|| page_hash(&[0u8; PAGE as usize]))
}

/// What the destination has received: which pages arrived at least once and, when verifying,
/// the hash of what each page last received. Page connections record concurrently; each
/// page belongs to one connection (its stripe), so a page's entries are written by one thread.
pub struct PageLog {
    received: Vec<AtomicU64>,
    hashes: Option<Vec<AtomicU32>>,
    pages: u64,
}

impl PageLog {
    /// A log of `pages` pages from guest-physical 0; `hashes` keeps a hash per page.
    pub fn new(pages: u64, hashes: bool) -> Self {
        Self {
            received: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            hashes: hashes.then(|| (0..pages).map(|_| AtomicU32::new(0)).collect()),
            pages,
        }
    }

    pub fn keeps_hashes(&self) -> bool {
        self.hashes.is_some()
    }

    /// Page `pfn` was written with data whose hash is `hash` (ignored without hashes).
    pub fn record(&self, pfn: u64, hash: u32) {
        if pfn >= self.pages {
            return;
        }
        self.received[(pfn / 64) as usize].fetch_or(1 << (pfn % 64), Ordering::Relaxed);
        if let Some(h) = &self.hashes {
            h[pfn as usize].store(hash, Ordering::Relaxed);
        }
    }

    pub fn received(&self, pfn: u64) -> bool {
        pfn < self.pages && self.received[(pfn / 64) as usize].load(Ordering::Relaxed) >> (pfn % 64) & 1 != 0
    }

    /// Pages of `map` that never arrived: how many, and the first one's address.
    pub fn missing(&self, map: &MemoryMap) -> Option<(u64, u64)> {
        let mut first = None;
        let mut n = 0u64;
        for &(gpa, size) in &map.regions {
            for pfn in gpa / PAGE..(gpa + size) / PAGE {
                if !self.received(pfn) {
                    n += 1;
                    first.get_or_insert(pfn * PAGE);
                }
            }
        }
        first.map(|f| (n, f))
    }

    /// The per-page hashes (empty without hashes).
    pub fn hashes(&self) -> Vec<u32> {
        self.hashes
            .as_ref()
            .map(|h| h.iter().map(|a| a.load(Ordering::Relaxed)).collect())
            .unwrap_or_default()
    }
}

/// The hash of every page of `[0, end of the last region)`, pages outside the regions 0: the
/// source's side of the memory digest. Hashes on two threads; memory must be frozen (vCPUs
/// paused, devices stopped).
pub fn memory_hashes(mem: &GuestMemoryMmap, regions: &[(u64, u64)]) -> Result<Vec<u32>, String> {
    let pages = regions.iter().map(|&(g, s)| (g + s) / PAGE).max().unwrap_or(0);
    let mut out = vec![0u32; pages as usize];
    let mut jobs: Vec<(u64, &mut [u32])> = Vec::new();
    let mut rest: &mut [u32] = &mut out;
    let mut at = 0u64;
    for &(gpa, size) in regions {
        let (_, r) = std::mem::take(&mut rest).split_at_mut((gpa / PAGE - at) as usize);
        let (mine, r) = r.split_at_mut((size / PAGE) as usize);
        // Two halves per region: one per core.
        let half = mine.len() / 2;
        let (a, b) = mine.split_at_mut(half);
        jobs.push((gpa, a));
        jobs.push((gpa + half as u64 * PAGE, b));
        rest = r;
        at = (gpa + size) / PAGE;
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = jobs
            .into_iter()
            .map(|(gpa, hashes)| {
                s.spawn(move || -> Result<(), String> {
                    let mut buf = vec![0u8; 64 * PAGE as usize];
                    for (k, chunk) in hashes.chunks_mut(64).enumerate() {
                        let at = gpa + k as u64 * 64 * PAGE;
                        let bytes = &mut buf[..chunk.len() * PAGE as usize];
                        mem.read_slice(bytes, GuestAddress(at)).map_err(|e| e.to_string())?;
                        for (h, page) in chunk.iter_mut().zip(bytes.chunks(PAGE as usize)) {
                            *h = page_hash(page);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err("a hashing thread panicked".into())))
    })?;
    Ok(out)
}

/// The device data carried by one framed vfio section (whole records), in order.
fn data_records(section: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(section);
    while let Some(r) = d.next_record().map_err(|e| e.to_string())? {
        if let Record::Data(b) = r {
            out.push(b);
        }
    }
    if d.pending() != 0 {
        return Err("a device section ends inside a record".into());
    }
    Ok(out)
}

/// The device data carried by one framed vfio section, concatenated.
pub fn device_data(section: &[u8]) -> Result<Vec<u8>, String> {
    Ok(data_records(section)?.concat())
}

/// The hash of everything one device saved, over the sections it sent (pre-copy and
/// stop-copy). For a device whose save stream is its pre-copy data followed by the rest, as
/// hisi_acc's (and the accelerator's) is, that is the hash of its full saved state.
#[derive(Default)]
pub struct DeviceHash(XxHash3_64);

impl DeviceHash {
    pub fn section(&mut self, section: &[u8]) -> Result<(), String> {
        for b in data_records(section)? {
            self.0.write(&b);
        }
        Ok(())
    }
    pub fn value(&self) -> u32 {
        self.0.finish() as u32
    }
}

/// With the device stopped (in STOP, or in STOP_COPY after its stream was read): save it again (STOP → STOP_COPY,
/// read to the end, → STOP) and return the hash of what it saves. Equal to the source's
/// [`DeviceHash`] when the device loaded exactly what was sent (on the destination), or when
/// nothing changed it after it was saved (on the source).
pub fn resave_hash(dev: &MigrationDevice) -> Result<u32, String> {
    // A source device is still in STOP_COPY, its stream read to the end.
    if dev.get_state() == MigState::StopCopy {
        dev.set_state(MigState::Stop)
            .map_err(|e| format!("STOP_COPY -> STOP: {e}"))?;
    }
    let s = dev
        .set_state(MigState::StopCopy)
        .map_err(|e| format!("STOP -> STOP_COPY: {e}"))?
        .ok_or("no STOP_COPY stream")?;
    let mut buf = vec![0u8; 64 << 10];
    let mut h = XxHash3_64::default();
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("reading the re-save: {e}"))?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    dev.set_state(MigState::Stop)
        .map_err(|e| format!("STOP_COPY -> STOP: {e}"))?;
    Ok(h.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_finds_every_missing_page() {
        let map = MemoryMap {
            regions: vec![(0, 64 * PAGE), (64 * PAGE, 64 * PAGE)],
        };
        let log = PageLog::new(128, true);
        for p in 0..128 {
            if p != 5 && p != 100 {
                log.record(p, p as u32);
            }
        }
        assert_eq!(log.missing(&map), Some((2, 5 * PAGE)));
        log.record(5, 0);
        log.record(100, 0);
        assert_eq!(log.missing(&map), None);
        assert_eq!(log.hashes()[7], 7);
        log.record(1000, 1); // outside: ignored
    }

    #[test]
    fn source_hashes_match_page_by_page() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)])
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(3 * PAGE + 7)).unwrap();
        mem.write_slice(b"world", GuestAddress((1 << 20) + 255 * PAGE)).unwrap();
        let h = memory_hashes(&mem, &[(0, 1 << 20), (1 << 20, 1 << 20)]).unwrap();
        assert_eq!(h.len(), 512);
        let mut page = vec![0u8; PAGE as usize];
        for (i, v) in h.iter().enumerate() {
            mem.read_slice(&mut page, GuestAddress(i as u64 * PAGE)).unwrap();
            assert_eq!(*v, page_hash(&page), "page {i}");
        }
        assert_ne!(h[3], zero_page_hash());
        assert_ne!(h[511], zero_page_hash());
        assert_eq!(h[4], zero_page_hash());
    }

    #[test]
    fn self_checksummed_data_is_told_apart() {
        // Two states that each end in their own CRC32C: every CRC32C of them is the same
        // (the residue), seeded or not. The digest's hash tells them apart.
        let seal = |mut v: Vec<u8>| {
            let c = crc32c::crc32c(&v);
            v.extend_from_slice(&c.to_le_bytes());
            v
        };
        let (a, b) = (seal(vec![1u8; 100]), seal(vec![2u8; 100]));
        assert_eq!(crc32c::crc32c(&a), crc32c::crc32c(&b));
        assert_eq!(crc32c::crc32c(&a), 0x4867_4bc7, "the CRC32C residue");
        assert_eq!(
            crc32c::crc32c_append(0x1234_5678, &a),
            crc32c::crc32c_append(0x1234_5678, &b),
            "a seed does not help: a CRC is affine in its start value"
        );
        assert_ne!(page_hash(&a), page_hash(&b));
    }
}
