//! Guest programs: what the vCPUs run, written as Rust that assembles x86-64 with iced-x86's
//! `code_asm` (no external assembler), and the host side of their memory layout.

pub mod ctrl;
pub mod viommu_client;
pub mod workload;

/// How the dirtier picks pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pattern {
    #[default]
    Sequential,
    Uniform,
    /// `hot_pct` % of writes go to the first `hot_pages` pages.
    HotCold {
        hot_pages: u64,
        hot_pct: u64,
    },
}

/// What the working set's pages hold besides the dirtier's stamps.
///
/// The stamp (the first 32 bytes) changes at every write either way. A random page's other
/// 4064 bytes are random, written by the host when the program is loaded: a guest that made
/// them itself would pay 512 stores and a generator step per 4 KiB page, which at this host's
/// ~600 ns per guest instruction caps a vCPU at ~2 MiB/s (docs/host-notes.md). The bytes a
/// page sends are what matter to a migration, and those do not compress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Content {
    /// Stamps on zero pages: compress to a few dozen bytes.
    #[default]
    Stamp,
    /// Stamps on random pages: incompressible.
    Random,
    /// This percentage of the pages random, the rest as `Stamp` (chosen by page number).
    Mixed(u8),
}

impl Content {
    /// `stamp`, `random` or `mixed:P` with P a percentage.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "stamp" => Ok(Self::Stamp),
            "random" => Ok(Self::Random),
            _ => {
                let p = s
                    .strip_prefix("mixed:")
                    .ok_or_else(|| format!("'{s}': content is stamp, random or mixed:P"))?;
                match p.parse::<u8>() {
                    Ok(p) if p <= 100 => Ok(Self::Mixed(p)),
                    _ => Err(format!("'{s}': P in mixed:P is a percentage, 0 to 100")),
                }
            }
        }
    }

    /// Whether page frame `pfn` of the working set holds random bytes.
    pub fn is_random(self, pfn: u64) -> bool {
        match self {
            Self::Stamp => false,
            Self::Random => true,
            // A multiplicative hash spreads the random pages over the working set.
            Self::Mixed(p) => (pfn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100 < p as u64,
        }
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stamp => f.write_str("stamp"),
            Self::Random => f.write_str("random"),
            Self::Mixed(p) => write!(f, "mixed:{p}"),
        }
    }
}

/// What one vCPU runs.
/// The accel-client's paced DMA writer: its device copies `rate_mib_s` MiB/s into
/// `[base, base + pages × 4 KiB)`, one [`ctrl::DMA_CHUNK`] after another, round and round.
/// The range must be the writer's alone (the dirtier's stamps would not survive it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DmaLoad {
    pub rate_mib_s: f64,
    pub base: u64,
    pub pages: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// Run the dirtier.
    pub dirtier: bool,
    /// Dirtier rate in MiB/s; 0 = as fast as the vCPU can.
    pub rate_mib_s: f64,
    /// Working set: guest-physical base and pages (4 KiB).
    pub ws_base: u64,
    pub ws_pages: u64,
    pub pattern: Pattern,
    pub seed: u64,
    /// Run the accel-client on this queue pair.
    pub accel_queue: Option<u16>,
    /// Of this accelerator (its index in the VM's device list).
    pub accel_device: u32,
    /// What the working set holds.
    pub content: Content,
    /// The accel-client's DMA writer, if any (needs `accel_queue`).
    pub dma: Option<DmaLoad>,
    /// Run the vIOMMU client instead of the accel-client on `accel_queue` (no dirtier, no DMA
    /// writer; on a device without a vIOMMU it maps nothing and uses IOVA = GPA).
    pub viommu_client: bool,
    /// The vIOMMU client's jobs (each one remap) per second; 0 = as fast as it can.
    pub remap_rate: f64,
}

impl Program {
    /// The dirtier alone over `ws_pages` pages from `ws_base`.
    pub fn dirtier(ws_base: u64, ws_pages: u64, rate_mib_s: f64, pattern: Pattern) -> Self {
        Self {
            dirtier: true,
            rate_mib_s,
            ws_base,
            ws_pages,
            pattern,
            seed: 0x2545_f491_4f6c_dd1d,
            accel_queue: None,
            accel_device: 0,
            content: Content::Stamp,
            dma: None,
            viommu_client: false,
            remap_rate: 0.0,
        }
    }

    /// The vIOMMU client on queue `queue` of device `dev`, alone on its vCPU.
    pub fn viommu_client(dev: u32, queue: u16) -> Self {
        Self {
            dirtier: false,
            ws_pages: 1,
            accel_queue: Some(queue),
            accel_device: dev,
            viommu_client: true,
            ..Self::dirtier(crate::layout::WORKSET_BASE, 1, 0.0, Pattern::Sequential)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Content;

    #[test]
    fn content_parses_and_mixes_as_asked() {
        assert_eq!(Content::parse("stamp"), Ok(Content::Stamp));
        assert_eq!(Content::parse("random"), Ok(Content::Random));
        assert_eq!(Content::parse("mixed:30"), Ok(Content::Mixed(30)));
        for bad in ["mixed:101", "mixed:", "mixed:-1", "zeros", ""] {
            assert!(Content::parse(bad).is_err(), "{bad}");
        }
        for p in [0u8, 30, 100] {
            let n = (0..100_000u64).filter(|&f| Content::Mixed(p).is_random(f)).count();
            assert!(
                (n as f64 / 1000.0 - p as f64).abs() < 1.0,
                "mixed:{p} made {n} of 100000 random"
            );
        }
        assert_eq!(Content::parse(&Content::Mixed(7).to_string()), Ok(Content::Mixed(7)));
    }
}
