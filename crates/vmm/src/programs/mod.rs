//! Guest programs: what the vCPUs run, written as Rust that assembles x86-64 with iced-x86's
//! `code_asm` (no external assembler), and the host side of their memory layout.

pub mod ctrl;
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

/// What one vCPU runs.
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
        }
    }
}
