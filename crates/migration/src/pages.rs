//! Page runs: how the sender turns guest pages into `Pages` payloads (zero runs, LZ4 where it
//! pays, raw otherwise), and how the receiver checks one against its memory map and applies it.

use crate::digest::{page_hash, zero_page_hash, PageLog};
use crate::error::WireError;
use crate::msg::{Encoding, PagesHead, MAX_RUN_PAGES, PAGES_HEAD};
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PAGE: usize = 4096;

/// Counters of what went on the wire, shared by every sender.
#[derive(Debug, Default)]
pub struct PageStats {
    pub normal_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub compressed_pages: AtomicU64,
    /// Bytes of compressed page data on the wire.
    pub compressed_bytes: AtomicU64,
    /// Every byte written to any connection, headers included.
    pub wire_bytes: AtomicU64,
}

impl PageStats {
    /// Pages sent with data (raw or compressed): what moving dirty pages costs.
    pub fn data_pages(&self) -> u64 {
        self.normal_pages.load(Ordering::Relaxed) + self.compressed_pages.load(Ordering::Relaxed)
    }

    pub fn pages(&self) -> u64 {
        self.normal_pages.load(Ordering::Relaxed)
            + self.zero_pages.load(Ordering::Relaxed)
            + self.compressed_pages.load(Ordering::Relaxed)
    }
}

fn is_zero(p: &[u8]) -> bool {
    // Stamped pages differ in their first bytes, so most non-zero pages exit at once.
    let mut c = p.chunks_exact(8);
    c.all(|w| u64::from_ne_bytes(w.try_into().unwrap()) == 0) && c.remainder().iter().all(|&b| b == 0)
}

/// Encodes guest pages into `Pages` payloads.
pub struct RunEncoder {
    buf: Vec<u8>,
    lz4: Vec<u8>,
    compress: bool,
}

impl RunEncoder {
    pub fn new(compress: bool) -> Self {
        let n = MAX_RUN_PAGES as usize * PAGE;
        Self {
            buf: vec![0; n],
            lz4: vec![0; lz4_flex::block::get_maximum_output_size(n)],
            compress,
        }
    }

    /// Reads `pages` (at most [`MAX_RUN_PAGES`]) pages at `gpa` and calls `emit` with one
    /// payload per sub-run of zero or non-zero pages.
    pub fn encode(
        &mut self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        pages: u32,
        stats: &PageStats,
        mut emit: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let len = pages as usize * PAGE;
        mem.read_slice(&mut self.buf[..len], GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(format!("reading guest page {gpa:#x}: {e}")))?;
        let mut payload = Vec::with_capacity(PAGES_HEAD + len);
        let mut i = 0usize;
        while i < pages as usize {
            let zero = is_zero(&self.buf[i * PAGE..(i + 1) * PAGE]);
            let mut j = i + 1;
            while j < pages as usize && is_zero(&self.buf[j * PAGE..(j + 1) * PAGE]) == zero {
                j += 1;
            }
            let n = (j - i) as u32;
            let at = gpa + (i * PAGE) as u64;
            payload.clear();
            if zero {
                PagesHead {
                    gpa: at,
                    pages: n,
                    encoding: Encoding::Zero,
                }
                .encode_into(&mut payload);
                stats.zero_pages.fetch_add(n as u64, Ordering::Relaxed);
            } else {
                let raw = &self.buf[i * PAGE..j * PAGE];
                let c = if self.compress {
                    lz4_flex::block::compress_into(raw, &mut self.lz4).ok()
                } else {
                    None
                };
                match c {
                    // Worth it only when it saves at least an eighth.
                    Some(c) if c > 0 && c < raw.len() - raw.len() / 8 => {
                        PagesHead {
                            gpa: at,
                            pages: n,
                            encoding: Encoding::Lz4,
                        }
                        .encode_into(&mut payload);
                        payload.extend_from_slice(&self.lz4[..c]);
                        stats.compressed_pages.fetch_add(n as u64, Ordering::Relaxed);
                        stats.compressed_bytes.fetch_add(c as u64, Ordering::Relaxed);
                    }
                    _ => {
                        PagesHead {
                            gpa: at,
                            pages: n,
                            encoding: Encoding::Raw,
                        }
                        .encode_into(&mut payload);
                        payload.extend_from_slice(raw);
                        stats.normal_pages.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            emit(&payload)?;
            i = j;
        }
        Ok(())
    }
}

/// The receiver's view of guest RAM: the regions it will accept writes to.
#[derive(Clone, Debug)]
pub struct MemoryMap {
    pub regions: Vec<(u64, u64)>,
}

impl MemoryMap {
    /// Whether `[gpa, gpa + pages*4096)` lies inside one region.
    pub fn contains(&self, gpa: u64, pages: u64) -> bool {
        let Some(end) = pages.checked_mul(PAGE as u64).and_then(|l| gpa.checked_add(l)) else {
            return false;
        };
        self.regions.iter().any(|&(g, s)| gpa >= g && end <= g + s)
    }
}

/// Decodes and applies page runs on the receiver.
pub struct RunDecoder {
    buf: Vec<u8>,
    zeros: Vec<u8>,
}

impl Default for RunDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RunDecoder {
    pub fn new() -> Self {
        let n = MAX_RUN_PAGES as usize * PAGE;
        Self {
            buf: vec![0; n],
            zeros: vec![0; n],
        }
    }

    /// Checks a `Pages` payload completely (encoding, lengths, addresses, decompressed size)
    /// and only then writes it to `mem`, recording every page in `log`. Returns the pages
    /// written.
    pub fn apply(
        &mut self,
        payload: &[u8],
        map: &MemoryMap,
        mem: &GuestMemoryMmap,
        log: &PageLog,
    ) -> Result<u64, WireError> {
        let (h, data) = PagesHead::decode(payload)?;
        let pages = h.pages as u64;
        if !map.contains(h.gpa, pages) {
            return Err(WireError::OutOfMap { gpa: h.gpa, pages });
        }
        let len = h.pages as usize * PAGE;
        let bytes: &[u8] = match h.encoding {
            Encoding::Raw => data,
            Encoding::Zero => {
                // A fresh destination is zero: reading maps the shared zero page, writing would
                // allocate and fault in every page of guest RAM during the bulk round.
                mem.read_slice(&mut self.buf[..len], GuestAddress(h.gpa))
                    .map_err(|e| WireError::BadPageData {
                        pages,
                        why: e.to_string(),
                    })?;
                if self.buf[..len] != self.zeros[..len] {
                    mem.write_slice(&self.zeros[..len], GuestAddress(h.gpa))
                        .map_err(|e| WireError::BadPageData {
                            pages,
                            why: e.to_string(),
                        })?;
                }
                for p in 0..pages {
                    log.record(h.gpa / PAGE as u64 + p, zero_page_hash());
                }
                return Ok(pages);
            }
            Encoding::Lz4 => {
                let n = lz4_flex::block::decompress_into(data, &mut self.buf[..len]).map_err(|e| {
                    WireError::BadPageData {
                        pages,
                        why: e.to_string(),
                    }
                })?;
                if n != len {
                    return Err(WireError::BadPageData {
                        pages,
                        why: format!("decompressed to {n} bytes"),
                    });
                }
                &self.buf[..len]
            }
        };
        mem.write_slice(bytes, GuestAddress(h.gpa))
            .map_err(|e| WireError::BadPageData {
                pages,
                why: e.to_string(),
            })?;
        let keep = log.keeps_hashes();
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            log.record(h.gpa / PAGE as u64 + i as u64, if keep { page_hash(page) } else { 0 });
        }
        Ok(pages)
    }
}
