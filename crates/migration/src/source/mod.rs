//! The source engine: setup, bulk round, pre-copy iterations with QEMU's convergence test,
//! switchover, the commit, and what follows it (`docs/protocol.md`, "Switchover").
//!
//! Before the commit, any failure or cancel returns the source to running, devices and all,
//! and the destination never resumes (it resumes only on `Commit`). After the commit the
//! source never resumes on its own: it holds its paused guest until an operator releases it
//! (`quit`) or resumes it (`cont`), so a destination that dies at any point loses nothing.

mod handover;
mod link;
mod open;
mod precopy;

use crate::control::MigrationControl;
use crate::dirty_source::DeviceTracking;
use crate::error::MigError;
use crate::info::{DestState, MigrationInfo, Outcome, Status};
use crate::msg::{VerifyMode, VmConfigMsg};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::{DirtyLogMode, Vm};

/// How to migrate.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub mode: DeviceTracking,
    /// Extra page connections; 0 sends pages on the control connection.
    pub channels: u16,
    pub downtime_limit: Duration,
    /// Switch over after this many iterations (the bulk round counts) even if not converged.
    pub max_iterations: u32,
    pub auto_converge: bool,
    pub compress: bool,
    pub verify: VerifyMode,
    /// The longest the source waits on the destination: for a reply, or for a write to make
    /// progress (a peer that stopped reading). The destination has its own.
    pub peer_timeout: Duration,
    /// QEMU's `max-bandwidth`, in wire bytes per second over all connections (none: as
    /// fast as the connections go).
    pub max_bandwidth: Option<u64>,
    /// Plain TCP, TLS or a pre-shared key; the destination must use the same.
    pub security: crate::transport::Security,
    /// Test-only: injects a loss the verification must catch.
    #[doc(hidden)]
    pub sabotage: Option<Sabotage>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            mode: DeviceTracking::Iommu,
            channels: 0,
            downtime_limit: Duration::from_millis(300),
            max_iterations: 30,
            auto_converge: false,
            compress: true,
            verify: VerifyMode::Gate,
            peer_timeout: Duration::from_secs(10),
            max_bandwidth: None,
            security: crate::transport::Security::Plain,
            sabotage: None,
        }
    }
}

/// Losses a test injects on purpose, each after the source took its own digest, to show
/// that verification catches them (`tests/verification.rs`).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// The final round leaves out one dirty page.
    DropFinalPage,
    /// One byte of the device's stop-copy data is flipped on the wire.
    FlipDeviceByte,
    /// One general-purpose register of the sent vCPU state is changed.
    CorruptVcpuRegister,
    /// The devices stop one at a time in index order, without the P2P step, while the vCPUs
    /// still run: a device's peers go on writing to its window after its state was saved.
    SkipP2p,
    /// The low bit of the first device's saved platform state, after its 8-byte leading
    /// field, is flipped on the wire: for a nested vIOMMU, the invalidation queue's head moves
    /// by one, a state the destination loads without complaint.
    CorruptPlatformState,
}

/// The VM's shape as the destination must rebuild it.
pub fn vm_config_msg(vm: &Vm, opts: &SourceOptions) -> VmConfigMsg {
    VmConfigMsg {
        mem_mib: vm.config().mem_mib,
        vcpus: vm.vcpu_count(),
        regions: vm.slots().iter().map(|s| (s.gpa, s.size)).collect(),
        channels: opts.channels,
        verify: opts.verify,
        peer_timeout_ms: opts.peer_timeout.as_millis().clamp(1, u32::MAX as u128) as u32,
        devices: vm.config().devices.encode(),
    }
}

/// How the engine stopped, when it did not complete.
enum Failure {
    /// Before the commit: roll back.
    Before(MigError, Option<Box<link::Link>>),
    /// After the commit: hold the paused guest; what is known of the destination.
    After(MigError, DestState),
}

/// Migrates `vm` to the destination at `to`.
///
/// * `Ok`: the destination runs the guest (verified, if asked). The source VM is left paused,
///   devices stopped, outcome `completed`: the caller keeps it until released.
/// * `Err` with outcome `rolled-back`: the source runs again, as before.
/// * `Err` with outcome `held`: the source committed, then something failed; the VM stays
///   paused and resumable, and `destination` says what is known of the other side.
pub fn migrate(
    vm: &Arc<Vm>,
    to: &str,
    opts: &SourceOptions,
    ctl: &MigrationControl,
) -> Result<MigrationInfo, MigError> {
    let t0 = Instant::now();
    ctl.start();
    let lost0 = vm.cpu_dirty_log().lost_harvests();
    ctl.update(|i| {
        i.status = Status::Setup;
        i.livemig.mode = opts.mode.to_string();
        i.livemig.verify = opts.verify.to_string();
        i.livemig.transport = opts.security.name().into();
        i.livemig.channels = opts.channels;
        i.livemig.devices = vm.devices().len() as u32;
        i.livemig.downtime_limit_ms = opts.downtime_limit.as_millis() as u64;
        i.livemig.cpu_dirty_log = match vm.cpu_dirty_log().mode() {
            DirtyLogMode::Ring { entries } => format!("ring-{entries}"),
            DirtyLogMode::Bitmap => "bitmap".into(),
        };
        i.ram.page_size = 4096;
        i.ram.total = vm.mem_size();
    });
    let res = run(vm, to, opts, ctl, t0);
    let overruns = vm.cpu_dirty_log().lost_harvests() - lost0;
    let out = match res {
        Ok(()) => {
            ctl.update(|i| {
                i.status = Status::Completed;
                i.livemig.outcome = Outcome::Completed;
            });
            Ok(())
        }
        Err(Failure::Before(e, link)) => {
            let e = if ctl.is_cancelled() { MigError::Cancelled } else { e };
            if let Some(mut l) = link {
                l.abort(&e.chain());
            }
            let cancelled = matches!(e, MigError::Cancelled);
            ctl.update(|i| {
                i.livemig.failed_phase = Some(i.status);
                i.status = if cancelled { Status::Cancelled } else { Status::Failed };
                i.livemig.outcome = Outcome::RolledBack;
                i.error_desc = Some(e.chain());
            });
            Err(e)
        }
        Err(Failure::After(e, dest)) => {
            ctl.update(|i| {
                i.livemig.failed_phase = Some(i.status);
                i.status = Status::Failed;
                i.livemig.outcome = Outcome::Held;
                i.livemig.destination = dest;
                i.error_desc = Some(format!("{}; {}", e.chain(), held_advice(dest)));
            });
            Err(e)
        }
    };
    ctl.update(|i| {
        i.total_time = t0.elapsed().as_millis() as u64;
        i.livemig.source_vcpus_running = vm.running();
        i.livemig.dirty_ring_overruns = overruns;
    });
    ctl.finish();
    out.map(|()| ctl.snapshot())
}

/// What the operator of a source that holds its guest should do.
pub fn held_advice(dest: DestState) -> &'static str {
    match dest {
        DestState::Discarded => "the destination discarded its guest; the source holds it paused: `cont` runs it here",
        DestState::Running => {
            "the destination runs the guest but failed verification; the source holds the original paused: \
             stop the destination, then `cont` here, or `quit` to keep the destination's"
        }
        _ => {
            "whether the destination runs the guest is unknown; the source holds it paused: \
             if the destination is gone, `cont` (with force) runs it here; if it runs there, `quit`"
        }
    }
}

fn run(vm: &Arc<Vm>, to: &str, opts: &SourceOptions, ctl: &MigrationControl, t0: Instant) -> Result<(), Failure> {
    if ctl.is_cancelled() {
        return Err(Failure::Before(MigError::Cancelled, None));
    }
    let (mut link, stats) = open::open(vm, to, opts, ctl).map_err(|e| Failure::Before(e, None))?;
    let pre = match precopy::run(&mut link, vm, opts, ctl, t0, &stats) {
        Ok(p) => p,
        Err(e) => return Err(Failure::Before(e, Some(link))),
    };
    let ready = match handover::switch_over(&mut link, vm, opts, ctl, &stats, pre) {
        Ok(r) => r,
        Err(e) => return Err(Failure::Before(e, Some(link))),
    };
    if !ctl.commit() {
        return Err(Failure::Before(MigError::Cancelled, Some(link)));
    }
    handover::after_commit(link, vm, opts, ctl, &stats, ready)
}
