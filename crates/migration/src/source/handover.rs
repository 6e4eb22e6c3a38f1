//! The switchover and the commit (`docs/protocol.md`, "Switchover"): pause, the final round,
//! device and vCPU state, the gate's digest, the destination's `Ready`; then `Commit`, its
//! `Running`, and what follows (the audit's digest, the destination's report).
//!
//! [`switch_over`] may fail: nothing is committed yet and the caller rolls back.
//! [`after_commit`] never resumes the source: any failure there leaves it holding its paused
//! guest, with what is known of the destination.

use super::link::{DeviceProgress, Link};
use super::precopy::{fill_ram, Precopy};
use super::{Failure, Sabotage, SourceOptions};
use crate::control::MigrationControl;
use crate::digest;
use crate::error::MigError;
use crate::frame::Kind;
use crate::info::{DestState, DowntimeParts, Status};
use crate::msg::{Digest, Ready, Report, Running, VerifyMode};
use crate::pages::PageStats;
use crate::progress::LastProgress;
use crate::session::{boot_id, mono_ns};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vfio::stream::{Decoder, Record};
use vmm::{PageBitmap, Vm};

/// Where the switchover left off: the destination is ready and waits for the commit.
pub(super) struct Switched {
    pre: Precopy,
    /// Monotonic times: the source's vCPUs told to pause; the destination's `Ready`.
    t_pause: u64,
    t_ready: u64,
    parts: DowntimeParts,
    /// The guest's last visible progress before the pause.
    last_progress: Option<u64>,
    vcpu_digest: u32,
    platform_digest: u32,
    ready: Ready,
}

fn us(a: u64, b: u64) -> u64 {
    b.saturating_sub(a) / 1000
}

/// The source's digest: memory hashed now (it must be frozen), with the device and vCPU
/// hashes taken when their state was saved.
fn source_digest(vm: &Vm, devices: &[u32], vcpus: u32, platform: u32) -> Result<Digest, MigError> {
    let regions: Vec<(u64, u64)> = vm.slots().iter().map(|s| (s.gpa, s.size)).collect();
    Ok(Digest {
        vcpus,
        platform,
        devices: devices.to_vec(),
        pages: digest::memory_hashes(vm.memory(), &regions).map_err(MigError::Other)?,
    })
}

pub(super) fn switch_over(
    link: &mut Link,
    vm: &Arc<Vm>,
    opts: &SourceOptions,
    ctl: &MigrationControl,
    stats: &Arc<PageStats>,
    mut pre: Precopy,
) -> Result<Switched, MigError> {
    ctl.update(|i| i.status = Status::Device);
    link.stop_throttle();
    let watcher = LastProgress::start(vm.clone());
    watcher.wait_active(std::time::Duration::from_millis(20));
    let skip_p2p = opts.sabotage == Some(Sabotage::SkipP2p);
    let mut sections = Vec::new();
    if skip_p2p {
        for i in 0..vm.devices().len() {
            sections.push(link.devices.stop_copy_one(i)?);
            // Long enough for the guest to submit, and the running peers to run, new jobs.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    } else {
        link.devices.enter_p2p()?;
    }
    let t_pause = mono_ns();
    let paused = vm.pause();
    let t_paused = mono_ns();
    let last_progress = watcher.stop();
    paused?;
    if !skip_p2p {
        sections = link.devices.stop_copy()?;
    }
    let t_stopped = mono_ns();
    // Devices are stopped: no more DMA. The last harvest covers both kinds of writers.
    let mut fin = std::mem::replace(&mut pre.pending, PageBitmap::new(0));
    vm.cpu_dirty_log().harvest(&mut fin)?;
    link.harvest_device(&mut fin)?;
    if opts.sabotage == Some(Sabotage::DropFinalPage) {
        let first = fin.iter().next();
        if let Some(p) = first {
            fin.unset(p);
        }
    }
    let final_pages = fin.count();
    link.control_frame(Kind::Switchover, Vec::new())?;
    link.queue_pages(&fin)?;
    link.flush_all()?;
    let t_pages = mono_ns();
    let flip = opts.sabotage == Some(Sabotage::FlipDeviceByte);
    send_stop_copy(link, &sections, &mut pre.devp, flip)?;
    unchanged_since_saved(link, &pre.devp)?;
    let t_devsent = mono_ns();
    // The vIOMMU's registers and shadow mappings: the guest is paused, so it changes none.
    let mut platform = vm.snapshots().save_platform();
    let platform_digest = crate::digest::platform_hash(&platform);
    // Device count, the first device's mode and length (6 bytes), then its state.
    if opts.sabotage == Some(Sabotage::CorruptPlatformState) && platform.len() > 14 {
        platform[14] ^= 1;
    }
    link.control_frame(Kind::PlatformState, platform)?;
    let vcpus = vm.snapshots().save_vcpus()?;
    let vcpu_digest = vmm::state::digest(&vcpus);
    let mut wire = vcpus;
    if opts.sabotage == Some(Sabotage::CorruptVcpuRegister) {
        wire[0].regs.rbx ^= 1;
    }
    link.control_frame(Kind::VcpuState, vmm::state::encode(&wire))?;
    link.complete_all()?;
    link.flush_expecting(Kind::Ready)?;
    let t_sent = mono_ns();
    if opts.verify == VerifyMode::Gate {
        let d = source_digest(vm, &pre.devp.hashes(), vcpu_digest, platform_digest)?;
        link.control_frame(Kind::Digest, d.encode())?;
        link.flush_expecting(Kind::Ready)?;
    }
    let t_digest = mono_ns();
    let ready = Ready::decode(&link.wait_for(Kind::Ready, "the destination to load the guest")?)?;
    let t_ready = mono_ns();
    ctl.update(|i| {
        i.livemig.destination = DestState::Ready;
        i.livemig.final_pages = final_pages;
        fill_ram(i, stats);
    });
    Ok(Switched {
        parts: DowntimeParts {
            pause: us(t_pause, t_paused),
            device_state: us(t_paused, t_stopped) + us(t_pages, t_devsent),
            final_pages: us(t_stopped, t_pages),
            vcpu_state: us(t_devsent, t_sent),
            verification: us(t_sent, t_digest),
            destination: us(t_digest, t_ready),
            commit: 0,
        },
        pre,
        t_pause,
        t_ready,
        last_progress,
        vcpu_digest,
        platform_digest,
        ready,
    })
}

/// With every device stopped, each must still hold exactly the state it saved. A device whose
/// state changed since received a peer's DMA after it stopped (the P2P order was broken), and
/// what was sent lacks that write: the migration must not go on.
fn unchanged_since_saved(link: &Link, devp: &DeviceProgress) -> Result<(), MigError> {
    let sent = devp.hashes();
    let attached = link.vm.devices();
    if sent.len() != attached.len() || link.devices.devices().count() != attached.len() {
        return Err(MigError::Other("device lists of different lengths".into()));
    }
    for ((d, sent), attached) in link.devices.devices().zip(sent).zip(attached) {
        // A device that could only STOP (no STOP_COPY) saved nothing to compare.
        if d.get_state() != vfio::MigState::StopCopy {
            continue;
        }
        let now = digest::resave_hash(d).map_err(MigError::Other)?;
        if now != sent {
            return Err(MigError::Verification(format!(
                "{}: its state changed after it was saved (a peer's DMA or a register write reached \
                 it after it stopped); the saved state would lose that write",
                attached.name
            )));
        }
    }
    Ok(())
}

/// Sends the stop-copy sections. With the `FlipDeviceByte` sabotage, one byte of the
/// device's state is changed after its hash was taken; a state that ends in its own CRC32C
/// (the accelerator's does) is re-sealed, so the device loads it and only the end-to-end
/// digest can tell.
fn send_stop_copy(
    link: &mut Link,
    sections: &[vfio::vmm::Section],
    devp: &mut DeviceProgress,
    flip: bool,
) -> Result<(), MigError> {
    if !flip {
        return link.send_sections(sections, devp, |_| {});
    }
    for (i, b) in sections {
        let before = devp.saved.as_ref().map_or(0, |s| s[*i].len());
        devp.account(*i, b)?;
        let full = devp.saved.as_ref().map(|s| s[*i].clone()).unwrap_or_default();
        let wire = flipped(b, &full, before).map_err(MigError::Other)?;
        link.control_frame(Kind::DeviceData, crate::msg::encode_device_data(*i as u16, &wire))?;
    }
    Ok(())
}

/// `section` with one byte of its device data flipped. `full` is everything the device saved
/// so far, `section`'s data from offset `at`; if it ends in a CRC32C of the rest, the CRC is
/// recomputed.
fn flipped(section: &[u8], full: &[u8], at: usize) -> Result<Vec<u8>, String> {
    let n = full.len();
    let mut full = full.to_vec();
    if n <= at + 8 {
        return Ok(section.to_vec());
    }
    let sealed = crc32c::crc32c(&full[..n - 4]) == u32::from_le_bytes(full[n - 4..].try_into().unwrap());
    // The accelerator's completed-jobs counter (offset 60): a field its load cannot check,
    // unlike its registers and queue contexts, so the state still loads. Other layouts: the
    // middle of this section.
    let pos = if at <= 60 && n > 72 { 60 } else { at + (n - 4 - at) / 2 };
    full[pos] ^= 0x01;
    if sealed {
        let c = crc32c::crc32c(&full[..n - 4]);
        full[n - 4..].copy_from_slice(&c.to_le_bytes());
    }
    // Re-frame: this section's data records replaced by the changed bytes, in one record.
    let mut d = Decoder::new();
    d.feed(section);
    let mut out = Vec::new();
    let mut data_done = false;
    while let Some(r) = d.next_record().map_err(|e| e.to_string())? {
        match r {
            Record::Data(_) if data_done => {}
            Record::Data(_) => {
                Record::Data(full[at..].to_vec()).encode(&mut out);
                data_done = true;
            }
            r => r.encode(&mut out),
        }
    }
    Ok(out)
}

/// After the commit. Returns `Ok` when the destination confirmed that its guest runs (and
/// it verified, if asked); the source's guest stays paused either way.
pub(super) fn after_commit(
    mut link: Box<Link>,
    vm: &Arc<Vm>,
    opts: &SourceOptions,
    ctl: &MigrationControl,
    stats: &Arc<PageStats>,
    sw: Switched,
) -> Result<(), Failure> {
    let pre = &sw.pre;
    ctl.update(|i| {
        i.vfio.transferred = pre.devp.bytes;
        i.ram.precopy_bytes = pre.bytes;
        i.livemig.precopy_ms = pre.sending * 1e3;
        i.ram.downtime_bytes = stats.wire_bytes.load(Ordering::Relaxed) - pre.bytes;
        i.ram.remaining = 0;
        i.ram.iteration_count = pre.iteration;
        i.livemig.switchover_reason = pre.reason.into();
        i.livemig.expected_downtime_at_switchover_ms = pre.expected.as_millis() as u64;
        i.livemig.cpu_dirty_pages = pre.cpu_dirty_total;
        i.livemig.device_dirty_pages = pre.dev_dirty_total;
        i.livemig.guest_cpu_write_mib_s = pre.guest_cpu_mib_s;
        i.livemig.guest_dma_write_mib_s = pre.guest_dma_mib_s;
        i.livemig.cpu_dirty_pages_rate = (pre.cpu_dirty_total as f64 / pre.seconds) as u64;
        i.livemig.device_dirty_pages_rate = (pre.dev_dirty_total as f64 / pre.seconds) as u64;
        i.livemig.dest_verify_ms = sw.ready.verify_ns as f64 / 1e6;
        i.livemig.downtime_parts = sw.parts.clone();
        fill_ram(i, stats);
    });
    let fail = |link: &mut Link, e: MigError, dest: DestState| {
        link.release();
        Err(Failure::After(e, dest))
    };
    // ---- the point of no return: from here the source never resumes on its own ----
    if let Err(e) = link
        .control_frame(Kind::Commit, Vec::new())
        .and_then(|()| link.flush_expecting(Kind::Running))
    {
        let dest = if matches!(e, MigError::Peer(_)) {
            DestState::Discarded
        } else {
            DestState::Unknown
        };
        return fail(&mut link, e, dest);
    }
    let running = link
        .wait_for(Kind::Running, "the destination to confirm that its guest runs")
        .and_then(|p| Ok(Running::decode(&p)?));
    let t_heard = mono_ns();
    let running = match running {
        Ok(r) => r,
        // An `Error` after the commit: the destination discarded its guest, never ran it.
        Err(e @ MigError::Peer(_)) => return fail(&mut link, e, DestState::Discarded),
        Err(e) => return fail(&mut link, e, DestState::Unknown),
    };
    let shared = running.boot != 0 && running.boot == boot_id();
    let (end, clock) = if shared {
        (running.resumed_ns, "shared")
    } else {
        (t_heard, "source")
    };
    let downtime_ns = end.saturating_sub(sw.t_pause);
    ctl.update(|i| {
        i.livemig.destination = DestState::Running;
        i.downtime = Some(downtime_ns / 1_000_000);
        i.downtime_us = Some(downtime_ns / 1000);
        i.livemig.downtime_clock = clock.into();
        i.livemig.downtime_parts.commit = us(sw.t_ready, end);
        i.livemig.source_vcpus_running = false;
    });

    // ---- what follows: the audit's digest, then the destination's report ----
    if opts.verify == VerifyMode::Audit {
        let sent = source_digest(vm, &pre.devp.hashes(), sw.vcpu_digest, sw.platform_digest).and_then(|d| {
            link.control_frame(Kind::Digest, d.encode())?;
            link.flush_expecting(Kind::Report)
        });
        if let Err(e) = sent {
            return fail(
                &mut link,
                MigError::Verification(format!("the audit could not run: {}", e.chain())),
                DestState::Unknown,
            );
        }
    }
    let report = link
        .wait_for(Kind::Report, "the destination's report")
        .and_then(|p| Ok(Report::decode(&p)?));
    let report = match report {
        Ok(r) => r,
        Err(e) if opts.verify == VerifyMode::Off => {
            // The guest runs there; only the guest-side timing is missing.
            ctl.update(|i| i.livemig.verify_detail = format!("no report from the destination: {}", e.chain()));
            link.release();
            return Ok(());
        }
        Err(e) => {
            return fail(
                &mut link,
                MigError::Verification(format!("the destination confirmed, then sent no report: {}", e.chain())),
                DestState::Unknown,
            )
        }
    };
    ctl.update(|i| {
        if shared && report.first_progress_ns != 0 {
            i.livemig.guest_blackout_us = sw
                .last_progress
                .map(|l| report.first_progress_ns.saturating_sub(l) / 1000);
        }
        i.livemig.dest_pages_before = report.pages_before;
        i.livemig.dest_pages_after = report.pages_after;
        i.livemig.dest_jobs_before = report.jobs_before;
        i.livemig.dest_jobs_after = report.jobs_after;
        if opts.verify != VerifyMode::Off {
            i.livemig.verified = Some(report.reason.is_empty());
            i.livemig.verify_detail = if report.reason.is_empty() {
                match opts.verify {
                    VerifyMode::Gate => {
                        "memory, device and vCPU state matched before the guest resumed; it makes progress"
                    }
                    _ => "memory, device and vCPU state at resume match the source's; the guest makes progress",
                }
                .into()
            } else {
                report.reason.clone()
            };
        }
    });
    if opts.verify != VerifyMode::Off && !report.reason.is_empty() {
        let dest = if report.discarded {
            DestState::Discarded
        } else {
            DestState::Running
        };
        return fail(&mut link, MigError::Verification(report.reason), dest);
    }
    link.release();
    Ok(())
}
