//! From `Complete` to a running guest: the stream must be complete, the devices must accept
//! their state, the vCPUs load; with the gate, the digests must match; then `Ready`, and the
//! guest resumes only on `Commit`. After it runs: the guest's first progress, and with
//! verification its progress and (audit) the digest comparison, in a `Report`.

use super::stream::Received;
use super::{unexpected, Ctl, DestOptions, Incoming};
use crate::digest;
use crate::error::MigError;
use crate::frame::{FrameReader, Kind};
use crate::msg::{self, Digest, Ready, Report, Running, VerifyMode, VmConfigMsg};
use crate::progress;
use crate::session::{boot_id, mono_ns};
use crate::transport::Conn;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;
use vfio::{MigFlags, MigState};
use vmm::{GuestProbe, GuestProgress, Vm};

/// The destination's side of the conversation, and what it goes by.
pub(super) struct Talk<'a> {
    pub ctl: &'a mut Ctl,
    pub r: &'a mut FrameReader<BufReader<Conn>>,
    pub cfg: &'a VmConfigMsg,
    pub opts: &'a DestOptions,
}

/// This side's digest, taken with everything loaded and before the guest resumes: the page
/// hashes recorded while applying (with `pages`), the devices saved again, the vCPUs as
/// loaded. The page hashes are the record of what arrived, which the running guest does not
/// change, so the audit collects them after the resume: on an 8 GiB guest that is 9 MiB of
/// hashes, milliseconds the blackout need not hold.
fn own_digest(vm: &Vm, rx: &Received, pages: bool) -> Result<Digest, MigError> {
    let mut devices = Vec::new();
    for d in rx.devices.devices() {
        devices.push(digest::resave_hash(d).map_err(MigError::Other)?);
    }
    Ok(Digest {
        vcpus: vmm::state::digest(&vm.snapshots().save_vcpus()?),
        platform: digest::platform_hash(&vm.snapshots().save_platform()),
        devices,
        pages: if pages { rx.log.hashes() } else { Vec::new() },
    })
}

fn read_digest(r: &mut FrameReader<BufReader<Conn>>) -> Result<Digest, MigError> {
    let f = r.expect()?;
    match f.kind {
        Kind::Digest => Ok(Digest::decode(&f.payload)?),
        Kind::Error => Err(MigError::Peer(msg::decode_str(&f.payload)?)),
        k => Err(unexpected(k, "the source's Digest")),
    }
}

pub(super) fn finish(control: &Conn, t: Talk<'_>, vm: Arc<Vm>, mut rx: Received) -> Result<Incoming, MigError> {
    let Talk { ctl, r, cfg, opts } = t;
    // ---- the whole guest, checked ----
    if let Some((n, first)) = rx.log.missing(&rx.map) {
        return Err(MigError::Other(format!(
            "the stream is incomplete: {n} page(s) of guest memory never arrived, the first at {first:#x}"
        )));
    }
    rx.devices.finish()?;
    // The vIOMMU before the vCPUs: its mappings must be in place when the device resumes.
    vm.snapshots().restore_platform(&rx.platform_state)?;
    let states =
        vmm::state::decode(&rx.vcpu_state, vm.vcpu_count()).map_err(|e| MigError::Vm(vmm::VmError::State(e)))?;
    vm.snapshots().restore_vcpus(&states)?;
    // The time this side spends on verification (not waiting for the source's digest).
    let t0 = mono_ns();
    let mine = match cfg.verify {
        VerifyMode::Off => None,
        v => Some(own_digest(&vm, &rx, v == VerifyMode::Gate)?),
    };
    let mut verify_ns = mono_ns() - t0;
    if cfg.verify == VerifyMode::Gate {
        let theirs = read_digest(r)?;
        let t1 = mono_ns();
        if let Some(why) = mine.as_ref().and_then(|m| m.mismatch(&theirs)) {
            tracing::error!(reason = %why, "verification FAILED before resuming; discarding the VM");
            return Err(MigError::Verification(why));
        }
        verify_ns += mono_ns() - t1;
    }
    // Taken before `Ready` leaves: however long this process is held up after sending it, the
    // window for the commit counts from no later than the source could have heard it.
    let t_ready = mono_ns();
    ctl.send(
        Kind::Ready,
        &Ready {
            load_ns: t_ready - rx.t_complete,
            verify_ns,
        }
        .encode(),
    )?;

    // ---- only the source's commit lets this guest run ----
    // It counts only if it arrives within half the shorter peer timeout of `Ready`: the source
    // waits its whole peer timeout for `Running` after committing, so a guest resumed here is
    // always one the source still waits to hear about, never one it gave up on (a process
    // stopped and continued, a commit stuck in a buffer).
    let window = opts.peer_timeout.min(Duration::from_millis(cfg.peer_timeout_ms as u64)) / 2;
    if !opts.sabotage_resume_before_commit {
        let _ = control.set_read_timeout(Some(window.max(Duration::from_millis(1))));
        let f = r
            .expect()
            .map_err(|e| MigError::Other(format!("the source never committed ({e}); the VM is discarded")))?;
        let _ = control.set_read_timeout(Some(opts.peer_timeout));
        match f.kind {
            Kind::Commit => msg::decode_empty(&f.payload)?,
            Kind::Error => return Err(MigError::Peer(msg::decode_str(&f.payload)?)),
            k => return Err(unexpected(k, "Commit")),
        }
        let late = Duration::from_nanos(mono_ns() - t_ready);
        if late > window {
            return Err(MigError::Other(format!(
                "the commit came {:.1} s after Ready, past the {:.1} s this side may take one; the VM is discarded",
                late.as_secs_f64(),
                window.as_secs_f64()
            )));
        }
    }
    for d in rx.devices.devices() {
        if d.migration_flags().contains(MigFlags::P2P) {
            d.set_state(MigState::RunningP2p)
                .map_err(|e| MigError::Other(format!("device to RUNNING_P2P: {e}")))?;
        }
    }
    for d in rx.devices.devices() {
        d.set_state(MigState::Running)
            .map_err(|e| MigError::Other(format!("device to RUNNING: {e}")))?;
    }
    let before = vm.progress();
    let base = vm.progress_word();
    vm.resume()?;
    let t_resumed = mono_ns();
    rx.report.resume_time = Duration::from_nanos(t_resumed.saturating_sub(rx.t_switch));
    // From here the guest runs here, whatever happens to the connection. Said first, then
    // told: whoever reads this log knows of every guest the source may hear of.
    tracing::info!(
        pages_received = rx.report.pages_received,
        "guest running on the destination"
    );
    if let Some(h) = &opts.on_running {
        (h.0)(&vm);
    }
    let told = ctl.send(
        Kind::Running,
        &Running {
            resumed_ns: t_resumed,
            boot: boot_id(),
        }
        .encode(),
    );
    if let Err(e) = told {
        tracing::warn!(
            error = %e.chain(),
            "could not tell the source that the guest runs here; it holds its copy paused"
        );
        rx.report.unverified = (cfg.verify != VerifyMode::Off).then(|| "the source is unreachable".into());
        return Ok(Incoming { vm, report: rx.report });
    }
    let at = Resumed {
        mine,
        before,
        base,
        t_resumed,
    };
    after_resume(Talk { ctl, r, cfg, opts }, vm, rx, at)
}

/// What this side knew when its guest resumed.
struct Resumed {
    /// Its digest (with verification).
    mine: Option<Digest>,
    /// What the guest's programs had done.
    before: GuestProgress,
    /// The guest's progress word.
    base: u64,
    t_resumed: u64,
}

/// The guest runs: when it first moves, and with verification whether it makes progress and
/// (audit) whether what it resumed from is the source's guest. A failure stops and discards
/// it: the source still holds the original, paused.
fn after_resume(t: Talk<'_>, vm: Arc<Vm>, mut rx: Received, at: Resumed) -> Result<Incoming, MigError> {
    let Talk { ctl, r, cfg, opts } = t;
    let Resumed {
        mut mine,
        before,
        base,
        t_resumed,
    } = at;
    let mut rep = Report {
        first_progress_ns: progress::first_change(&vm, base, Duration::from_secs(1)).unwrap_or(0),
        ..Default::default()
    };
    if cfg.verify != VerifyMode::Off {
        let ran = Duration::from_nanos(mono_ns() - t_resumed);
        std::thread::sleep(opts.progress_check.saturating_sub(ran));
        let after = vm.progress();
        let mut reasons = Vec::new();
        if let Some(s) = vm.vcpu_stopped() {
            reasons.push(format!("a vCPU stopped: {s:?}"));
        }
        reasons.extend(before.stalled_in(&after));
        if cfg.verify == VerifyMode::Audit {
            if let Some(m) = &mut mine {
                m.pages = rx.log.hashes();
            }
            match read_digest(r) {
                Ok(theirs) => {
                    if let Some(why) = mine.as_ref().and_then(|m| m.mismatch(&theirs)) {
                        reasons.push(why);
                    }
                }
                Err(e) => {
                    // The guest runs here and the source holds its copy: keep running,
                    // unverified, rather than lose both, and tell the source if it can hear.
                    tracing::warn!(error = %e.chain(), "the audit could not run; the guest runs on, unverified");
                    rep.checked = true;
                    rep.reason = format!(
                        "the audit could not run: {}; the destination runs the guest unverified",
                        e.chain()
                    );
                    let _ = ctl.send(Kind::Report, &rep.encode());
                    rx.report.unverified = Some(e.chain());
                    rx.report.report = Some(rep);
                    return Ok(Incoming { vm, report: rx.report });
                }
            }
        }
        rep.checked = true;
        rep.pages_before = before.count(vmm::progress::PAGES);
        rep.pages_after = after.count(vmm::progress::PAGES);
        rep.jobs_before = before.count(vmm::progress::JOBS);
        rep.jobs_after = after.count(vmm::progress::JOBS);
        rep.guest_errors = after.errors;
        rep.reason = reasons.join("; ");
    }
    if !rep.reason.is_empty() {
        let _ = vm.pause();
        rep.discarded = true;
        tracing::error!(
            reason = %rep.reason,
            "verification FAILED after resuming; the guest is stopped and discarded"
        );
        let _ = ctl.send(Kind::Report, &rep.encode());
        rx.report.report = Some(rep.clone());
        return Err(MigError::Verification(rep.reason));
    }
    if let Err(e) = ctl.send(Kind::Report, &rep.encode()) {
        tracing::warn!(error = %e.chain(), "could not send the report");
    }
    if cfg.verify != VerifyMode::Off {
        tracing::info!("verified: memory, device and vCPU state, and the guest makes progress");
    }
    rx.report.report = Some(rep);
    Ok(Incoming { vm, report: rx.report })
}
