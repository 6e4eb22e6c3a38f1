//! The KVM virtual machine livemig migrates.
//!
//! It owns guest memory (vm-memory `GuestMemoryMmap`, registered both as KVM slots and as an
//! iommufd IOAS at IOVA = guest-physical address, so the vCPUs and the accelerator see the same
//! bytes), vCPUs started directly in 64-bit long mode and run on their own threads, the MMIO
//! bus with the accelerator's registers, CPU dirty tracking by dirty ring or dirty bitmap,
//! guest programs assembled at run time, and vCPU state save/restore. It does not move data
//! between hosts (the `migration` crate does) and does not implement the device or the IOMMU.
//!
//! Tests that need `/dev/kvm` skip with a one-line reason when it is missing, unless
//! `LIVEMIG_REQUIRE_KVM=1`, where a missing or failing KVM is a failure.

#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "bench")]
pub mod bench_kit;
pub mod devices;
pub mod dirty;
mod kvm_sys;
pub mod layout;
pub mod mmio;
pub mod programs;
pub mod progress;
pub mod state;
pub mod vcpu;
pub mod viommu;
mod vm;
mod x86;

pub use devices::{AccelSetup, AttachedDevice, DeviceSet};
pub use dirty::{DirtyError, DirtyLogMode, HarvestStats, PageBitmap, Slot};
pub use programs::{Content, DmaLoad, Pattern, Program};
pub use progress::{GuestProbe, GuestProgress};
pub use state::{StateError, VcpuState};
pub use vcpu::VcpuStop;
pub use viommu::{DmaSpace, ViommuMode};
pub use vm::{Counters, CpuDirtyLog, Programs, Snapshots, Vm, VmConfig, VmSnapshot};

use iommu::Errno;

/// Failures of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM is not available: {0}")]
    NoKvm(String),
    #[error("{op} failed with errno {errno}")]
    Kvm { op: &'static str, errno: i32 },
    #[error("the host lacks {0}")]
    Unsupported(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("assembling the guest program: {0}")]
    Assemble(String),
    #[error("IOMMU setup: {what}")]
    Iommu {
        what: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("device {what}")]
    Device {
        what: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("vCPU state")]
    State(#[source] StateError),
    #[error("CPU dirty tracking")]
    Dirty(#[source] dirty::DirtyError),
    #[error("the vCPUs must be paused")]
    NotPaused,
    #[error("a vCPU did not pause within 2 s")]
    PauseTimeout,
    #[error("a vCPU did not resume within 2 s")]
    ResumeTimeout,
    #[error("a vCPU stopped: {0:?}")]
    VcpuStopped(VcpuStop),
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// In a test: returns early, printing one line, when KVM is unavailable and not required
/// (with `LIVEMIG_REQUIRE_KVM=1` a missing KVM fails the test instead).
#[macro_export]
macro_rules! need_kvm {
    () => {
        if let Err(why) = $crate::kvm_for_tests() {
            $crate::report_skip(&why);
            return;
        }
    };
}

/// Says, on a line of its own, that the running test skipped for want of KVM. Written to the
/// process's stderr directly, past the test harness's capture (which only catches the print
/// macros), so a skip never passes for a pass; `ci.sh` counts these lines.
pub fn report_skip(why: &str) {
    use std::io::Write as _;
    let t = std::thread::current();
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED (needs KVM): {}: {why}",
        t.name().unwrap_or("a test")
    );
}

/// Whether tests may use KVM: `Ok` if `/dev/kvm` opens; otherwise `Err(reason)`, or a panic
/// when `LIVEMIG_REQUIRE_KVM=1` demands KVM.
pub fn kvm_for_tests() -> Result<(), String> {
    let required = std::env::var("LIVEMIG_REQUIRE_KVM").is_ok_and(|v| v == "1");
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) if required => panic!("LIVEMIG_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"),
        Err(e) => Err(format!("/dev/kvm: {e}")),
    }
}
