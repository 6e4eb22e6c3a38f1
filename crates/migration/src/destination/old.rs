//! The destination: builds a VM of the announced shape, receives pages into its memory
//! (checked against the memory map before any write), feeds device data to RESUMING streams,
//! validates the device state, loads the vCPUs, resumes, acknowledges. Nothing resumes from a
//! stream that failed anywhere.

use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, FrameWriter, Kind};
use crate::msg::{self, Ack, Hello, Role, VerifyReport, VmConfigMsg, CAP_LZ4, CAP_VERIFY, VERSION};
use crate::pages::{MemoryMap, RunDecoder};
use crate::verify;
use accel::AccelConfig;
use iommu::FormatKind;
use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vfio::{MigFlags, MigState};
use vmm::programs::ctrl::{C_FLAGS, FLAG_ACCEL, FLAG_DIRTIER};
use vmm::{layout, AccelSetup, DirtyLogMode, Vm, VmConfig};

/// How the destination behaves.
#[derive(Clone, Debug)]
pub struct DestOptions {
    /// This host's accelerator identity, when it differs from the source's (`dev_id`): the
    /// device's own compatibility check then refuses the migration during pre-copy.
    pub accel_dev_id: Option<u32>,
    /// How long the guest runs before the progress check of `--verify`.
    pub progress_check: Duration,
    /// How long to wait for the page connections.
    pub accept_timeout: Duration,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            accel_dev_id: None,
            progress_check: Duration::from_millis(300),
            accept_timeout: Duration::from_secs(10),
        }
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default)]
pub struct DestReport {
    pub iterations: u32,
    pub pages_received: u64,
    pub device_bytes: u64,
    /// From the source's Switchover frame to the vCPUs running, minus verification.
    pub resume_time: Duration,
    pub verify: Option<VerifyReport>,
}

/// A migrated, running VM.
pub struct Incoming {
    pub vm: Arc<Vm>,
    pub report: DestReport,
}

struct Ctl {
    w: FrameWriter<TcpStream>,
}

impl Ctl {
    fn send(&mut self, k: Kind, p: &[u8]) -> Result<(), MigError> {
        self.w.send(k, p).map_err(|e| MigError::Wire(e.into()))
    }
}

/// Waits for one incoming migration on `listener` and runs it to the end. `log` receives
/// one-line progress messages.
pub fn receive(listener: &TcpListener, opts: &DestOptions, log: &dyn Fn(&str)) -> Result<Incoming, MigError> {
    let (control, peer) = listener.accept().map_err(|e| MigError::Connect {
        what: "listener".into(),
        source: e,
    })?;
    let _ = control.set_nodelay(true);
    log(&format!("incoming migration from {peer}"));
    let mut ctl = Ctl {
        w: FrameWriter::new(control.try_clone().map_err(|e| MigError::Wire(e.into()))?),
    };
    let res = run(listener, &control, &mut ctl, opts, log);
    if let Err(e) = &res {
        // Best effort: the source learns why, then both ends close.
        let _ = ctl.send(Kind::Error, &msg::encode_str(&e.chain()));
        let _ = control.shutdown(Shutdown::Both);
    }
    res
}

fn unexpected(k: Kind, expected: &'static str) -> MigError {
    MigError::Wire(WireError::Unexpected { found: k, expected })
}

fn build_vm(cfg: &VmConfigMsg, opts: &DestOptions) -> Result<Vm, MigError> {
    let accel = match &cfg.accel {
        None => None,
        Some(a) => {
            let format = *FormatKind::ALL
                .get(a.format as usize)
                .ok_or_else(|| MigError::Incompatible(format!("unknown IOMMU format {}", a.format)))?;
            let flags = MigFlags(a.flags as u64);
            if !MigFlags::DEFINED.contains(&flags) {
                return Err(MigError::Incompatible(format!(
                    "device migration flags {:#x} are not a defined set",
                    a.flags
                )));
            }
            Some(AccelSetup {
                format,
                config: AccelConfig {
                    qp_num: a.qp_num,
                    flags,
                    dev_id: opts.accel_dev_id.unwrap_or(a.dev_id),
                    que_iso_cfg: a.que_iso_cfg,
                    qp_base: a.qp_base,
                    dma_logging: a.dma_logging,
                },
                dirty_tracking: true,
                eager_split: false,
                huge_pages: a.huge_pages,
            })
        }
    };
    if cfg.accel.as_ref().is_some_and(|a| a.qp_num == 0 || a.qp_num > 64) {
        return Err(MigError::Incompatible("device queue count out of range".into()));
    }
    let vm = Vm::new(VmConfig {
        mem_mib: cfg.mem_mib,
        regions: cfg.regions.len() as u32,
        vcpus: cfg.vcpus,
        dirty: DirtyLogMode::Bitmap,
        accel,
    })
    .map_err(|e| MigError::Incompatible(format!("cannot build the announced VM: {}", MigError::Vm(e).chain())))?;
    let mine: Vec<(u64, u64)> = vm.slots().iter().map(|s| (s.gpa, s.size)).collect();
    if mine != cfg.regions {
        return Err(MigError::Incompatible(format!(
            "memory map {:x?} differs from this VM's {mine:x?}",
            cfg.regions
        )));
    }
    Ok(vm)
}

#[allow(clippy::too_many_arguments)]
/// Accepts `n` page connections of `session`, each in its own receiving thread.
fn accept_pages(
    listener: &TcpListener,
    n: u16,
    session: u64,
    timeout: Duration,
    map: &MemoryMap,
    vm: &Arc<Vm>,
    failed: &Arc<Mutex<Option<MigError>>>,
    control: &TcpStream,
    progress: &Arc<Vec<AtomicU32>>,
) -> Result<(Vec<JoinHandle<u64>>, Vec<TcpStream>), MigError> {
    listener.set_nonblocking(true).map_err(|e| MigError::Wire(e.into()))?;
    let end = Instant::now() + timeout;
    let mut seen = vec![false; n as usize];
    let (mut threads, mut streams) = (Vec::new(), Vec::new());
    let res = (|| {
        while threads.len() < n as usize {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > end {
                        return Err(MigError::Timeout("the page connections"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(MigError::Wire(e.into())),
            };
            s.set_nonblocking(false).map_err(|e| MigError::Wire(e.into()))?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| MigError::Wire(e.into()))?;
            let mut r = FrameReader::new(BufReader::with_capacity(
                1 << 20,
                s.try_clone().map_err(|e| MigError::Wire(e.into()))?,
            ));
            let f = r.expect()?;
            if f.kind != Kind::Hello {
                return Err(unexpected(f.kind, "Hello"));
            }
            let h = Hello::decode(&f.payload)?;
            let Role::Pages { channel } = h.role else {
                return Err(MigError::Wire(WireError::Malformed("a second control connection")));
            };
            if h.session != session || channel >= n || seen[channel as usize] {
                return Err(MigError::Wire(WireError::Malformed(
                    "page connection of another session or channel",
                )));
            }
            seen[channel as usize] = true;
            s.set_read_timeout(None).map_err(|e| MigError::Wire(e.into()))?;
            streams.push(s.try_clone().map_err(|e| MigError::Wire(e.into()))?);
            let (map, vm, failed, progress) = (map.clone(), vm.clone(), failed.clone(), progress.clone());
            let control = control.try_clone().map_err(|e| MigError::Wire(e.into()))?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("mig-recv-{channel}"))
                    .spawn(
                        move || match receive_pages(&mut r, &map, &vm, &progress[channel as usize]) {
                            Ok(n) => n,
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                                f.get_or_insert(MigError::Wire(e));
                                // Wakes the control loop, which reports the failure.
                                let _ = control.shutdown(Shutdown::Read);
                                0
                            }
                        },
                    )
                    .map_err(|e| MigError::Other(format!("spawning a receiver: {e}")))?,
            );
        }
        Ok(())
    })();
    let _ = listener.set_nonblocking(false);
    res.map(|()| (threads, streams))
}

/// A page connection: page runs and iteration ends until `Complete`; `done` is the last
/// iteration it has applied completely.
fn receive_pages<R: std::io::Read>(
    r: &mut FrameReader<R>,
    map: &MemoryMap,
    vm: &Vm,
    done: &AtomicU32,
) -> Result<u64, WireError> {
    let mut dec = RunDecoder::new();
    let mut pages = 0;
    loop {
        let f = r.expect()?;
        match f.kind {
            Kind::Pages => pages += dec.apply(&f.payload, map, vm.memory())?,
            Kind::EndOfIteration => done.store(msg::decode_u32_u64(&f.payload)?.0, Ordering::Release),
            Kind::Complete => return Ok(pages),
            k => {
                return Err(WireError::Unexpected {
                    found: k,
                    expected: "Pages, EndOfIteration or Complete on a page connection",
                })
            }
        }
    }
}

fn counters(vm: &Vm) -> (u64, u64, u64, u64) {
    let (mut pages, mut jobs, mut errors, mut flags) = (0, 0, 0, 0);
    for v in 0..vm.vcpu_count() {
        let c = vm.counters(v);
        pages += c.pages_written;
        jobs += c.jobs_completed;
        errors += c.errors;
        flags |=
            vm_memory::Bytes::read_obj::<u64>(&**vm.memory(), vm_memory::GuestAddress(layout::ctrl_page(v) + C_FLAGS))
                .unwrap_or(0);
    }
    (pages, jobs, errors, flags)
}

fn run(
    listener: &TcpListener,
    control: &TcpStream,
    ctl: &mut Ctl,
    opts: &DestOptions,
    log: &dyn Fn(&str),
) -> Result<Incoming, MigError> {
    let mut r = FrameReader::new(BufReader::with_capacity(
        1 << 20,
        control.try_clone().map_err(|e| MigError::Wire(e.into()))?,
    ));
    let f = r.expect()?;
    if f.kind != Kind::Hello {
        return Err(unexpected(f.kind, "Hello"));
    }
    let hello = Hello::decode(&f.payload)?;
    if hello.role != Role::Control {
        return Err(MigError::Wire(WireError::Malformed(
            "the first connection must be the control connection",
        )));
    }
    if hello.version != VERSION {
        return Err(MigError::Wire(WireError::Version(hello.version, VERSION)));
    }
    ctl.send(
        Kind::Hello,
        &Hello {
            version: VERSION,
            role: Role::Control,
            session: hello.session,
            caps: CAP_LZ4 | CAP_VERIFY,
        }
        .encode(),
    )?;
    let f = r.expect()?;
    if f.kind != Kind::Config {
        return Err(unexpected(f.kind, "Config"));
    }
    let cfg = VmConfigMsg::decode(&f.payload)?;
    let vm = Arc::new(build_vm(&cfg, opts)?);
    // This VM first-touches most of its RAM while receiving; on a nested host every 4 KiB
    // first-touch fault costs microseconds, and during the final round they add to downtime.
    vm.prefer_huge_pages()?;
    log(&format!(
        "built a VM of {} MiB, {} vCPU(s), {}; {} page connection(s)",
        cfg.mem_mib,
        cfg.vcpus,
        if cfg.accel.is_some() {
            "with the accelerator"
        } else {
            "no device"
        },
        cfg.channels
    ));
    let map = MemoryMap {
        regions: cfg.regions.clone(),
    };
    let mut devices =
        vfio::vmm::Destination::new(vm.iommu().map(|s| s.accel.migration().clone()).into_iter().collect());
    for d in devices.devices() {
        d.set_state(MigState::Stop)
            .map_err(|e| MigError::Other(format!("device to STOP: {e}")))?;
    }
    devices.setup()?;
    ctl.send(Kind::ConfigOk, &[])?;
    let failed = Arc::new(Mutex::new(None::<MigError>));
    let progress: Arc<Vec<AtomicU32>> = Arc::new((0..cfg.channels).map(|_| AtomicU32::new(0)).collect());
    let (threads, streams) = accept_pages(
        listener,
        cfg.channels,
        hello.session,
        opts.accept_timeout,
        &map,
        &vm,
        &failed,
        control,
        &progress,
    )?;
    let stop_pages = |streams: &[TcpStream]| {
        for s in streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    let page_err = |e: MigError| failed.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or(e);

    // ---- the stream ----
    let mut report = DestReport::default();
    let mut dec = RunDecoder::new();
    let mut vcpu_state = None;
    let mut t_switch = None;
    let res: Result<(), MigError> = (|| loop {
        let f = r.expect()?;
        match f.kind {
            Kind::Pages if cfg.channels == 0 => report.pages_received += dec.apply(&f.payload, &map, vm.memory())?,
            Kind::DeviceData => {
                let (idx, data) = msg::decode_device_data(&f.payload)?;
                report.device_bytes += data.len() as u64;
                for ev in devices.load(idx as usize, data)? {
                    let vfio::vmm::DestEvent::InitDataReceived(i) = ev;
                    ctl.send(Kind::InitAck, &(i as u16).to_le_bytes())?;
                }
            }
            Kind::EndOfIteration => {
                let (it, _dirty) = msg::decode_u32_u64(&f.payload)?;
                // Acknowledged once every page connection has applied the iteration too.
                let end = Instant::now() + opts.accept_timeout;
                while progress.iter().any(|p| p.load(Ordering::Acquire) < it) {
                    if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return Err(MigError::Other("a page connection failed".into()));
                    }
                    if Instant::now() > end {
                        return Err(MigError::Timeout("the page connections to finish an iteration"));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                report.iterations = it;
                ctl.send(Kind::IterationAck, &it.to_le_bytes())?;
            }
            Kind::Switchover => t_switch = Some(Instant::now()),
            Kind::VcpuState => vcpu_state = Some(f.payload),
            Kind::Complete => return Ok(()),
            Kind::Error => return Err(MigError::Peer(msg::decode_str(&f.payload).unwrap_or_default())),
            k => return Err(unexpected(k, "a migration stream frame")),
        }
    })();
    if let Err(e) = res {
        stop_pages(&streams);
        for t in threads {
            let _ = t.join();
        }
        return Err(page_err(e));
    }
    for t in threads {
        report.pages_received += t.join().unwrap_or(0);
    }
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    let t_switch = t_switch.ok_or(MigError::Wire(WireError::Malformed(
        "stream completed without a switchover",
    )))?;
    let vcpu_state = vcpu_state.ok_or(MigError::Wire(WireError::Malformed(
        "stream completed without vCPU state",
    )))?;

    // ---- validate, load, verify, resume ----
    devices.finish()?;
    let states = vmm::state::decode(&vcpu_state, vm.vcpu_count()).map_err(|e| MigError::Vm(vmm::VmError::State(e)))?;
    vm.restore_vcpus(&states)?;
    let tv = Instant::now();
    let digest = if cfg.verify {
        let chunks = verify::memory_digest(vm.memory(), &cfg.regions).map_err(MigError::Other)?;
        let mut devs = Vec::new();
        for d in devices.devices() {
            devs.push(verify::resave_crc(d).map_err(MigError::Other)?);
        }
        Some(verify::digest(chunks, devs))
    } else {
        None
    };
    let verify_time = tv.elapsed();
    let before = counters(&vm);
    for d in devices.devices() {
        if d.migration_flags().contains(MigFlags::P2P) {
            d.set_state(MigState::RunningP2p)
                .map_err(|e| MigError::Other(format!("device to RUNNING_P2P: {e}")))?;
        }
    }
    for d in devices.devices() {
        d.set_state(MigState::Running)
            .map_err(|e| MigError::Other(format!("device to RUNNING: {e}")))?;
    }
    vm.resume()?;
    let t_running = Instant::now();
    report.resume_time = t_running.duration_since(t_switch).saturating_sub(verify_time);
    let ack = Ack {
        verify_ns: verify_time.as_nanos() as u64,
        since_running_ns: t_running.elapsed().as_nanos() as u64,
        digest,
    };
    ctl.send(Kind::Ack, &ack.encode())?;
    log(&format!(
        "guest running on the destination ({} pages received)",
        report.pages_received
    ));

    if let Some(mine) = &ack.digest {
        // The source's digest; then let the guest run and check that it makes progress.
        let f = r.expect()?;
        if f.kind != Kind::Verify {
            return Err(unexpected(f.kind, "Verify"));
        }
        let theirs = msg::Digest::decode_from(&mut msg::Rd::new(&f.payload))?;
        std::thread::sleep(opts.progress_check);
        let after = counters(&vm);
        let mut reasons = Vec::new();
        if let Some(m) = mine.mismatch(&theirs) {
            reasons.push(m);
        }
        if let Some(s) = vm.vcpu_stopped() {
            reasons.push(format!("a vCPU stopped: {s:?}"));
        }
        if before.3 & FLAG_DIRTIER != 0 && after.0 <= before.0 {
            reasons.push(format!(
                "the dirtier made no progress ({} pages written before and after)",
                after.0
            ));
        }
        if before.3 & FLAG_ACCEL != 0 && after.1 <= before.1 {
            reasons.push(format!("no accelerator job completed ({} before and after)", after.1));
        }
        if after.2 != 0 {
            reasons.push(format!("the guest counted {} errors", after.2));
        }
        let v = VerifyReport {
            digest_ok: mine.mismatch(&theirs).is_none(),
            pages_before: before.0,
            pages_after: after.0,
            jobs_before: before.1,
            jobs_after: after.1,
            guest_errors: after.2,
            reason: reasons.join("; "),
        };
        ctl.send(Kind::VerifyReport, &v.encode())?;
        log(&if v.reason.is_empty() {
            "verified: memory, device state and guest progress".into()
        } else {
            format!("verification FAILED: {}", v.reason)
        });
        report.verify = Some(v);
    }
    let _ = control.shutdown(Shutdown::Both);
    Ok(Incoming { vm, report })
}
