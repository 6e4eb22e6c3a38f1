//! The source engine: setup, bulk round, pre-copy iterations with QEMU's convergence test,
//! switchover, and the way back to a running source on any failure before the destination's
//! acknowledgement.

use crate::convergence::Convergence;
use crate::dirty_source::{DeviceDirty, DeviceTracking};
use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, Kind};
use crate::info::{MigrationInfo, Status};
use crate::msg::{self, AccelDesc, Ack, Hello, Role, VerifyReport, VmConfigMsg, CAP_LZ4, CAP_VERIFY, VERSION};
use crate::pages::PageStats;
use crate::sender::{runs, Job, Limiter, Sender, Shared};
use crate::throttle::Throttle;
use crate::verify;
use iommu::FormatKind;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{DirtyLogMode, PageBitmap, Vm};

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
    pub verify: bool,
    /// How long to wait for the destination at the end (acknowledgement, verification).
    pub peer_timeout: Duration,
    /// QEMU's `max-bandwidth`, in wire bytes per second over all connections (none: as
    /// fast as the connections go).
    pub max_bandwidth: Option<u64>,
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
            verify: false,
            peer_timeout: Duration::from_secs(60),
            max_bandwidth: None,
        }
    }
}

/// Shared with whoever watches or cancels the migration (the control socket, the demo).
#[derive(Default)]
pub struct MigrationControl {
    pub info: Mutex<MigrationInfo>,
    pub cancel: AtomicBool,
}

impl MigrationControl {
    pub fn snapshot(&self) -> MigrationInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

enum Back {
    Frame(Kind, Vec<u8>),
    Failed(WireError),
}

/// Everything the engine started, so a failure can undo it.
struct Live {
    vm: Arc<Vm>,
    control: TcpStream,
    senders: Vec<Sender>,
    pages: Vec<usize>,
    devices: vfio::vmm::Source,
    device_dirty: Option<DeviceDirty>,
    throttle: Option<Throttle>,
    back: Receiver<Back>,
}

impl Live {
    fn stop_throttle(&mut self) {
        if let Some(mut t) = self.throttle.take() {
            t.stop();
        }
    }

    /// Back to a running source: devices to RUNNING, trackers off, vCPUs resumed.
    fn abort(&mut self, why: &str) {
        self.stop_throttle();
        if let Some(s) = self.senders.first_mut() {
            let _ = s.send(Job::Frame(Kind::Error, msg::encode_str(why)));
            let _ = s.flush();
        }
        let _ = self.control.shutdown(Shutdown::Both);
        for s in &mut self.senders {
            let _ = s.finish();
        }
        self.devices.abort();
        if let Some(mut d) = self.device_dirty.take() {
            d.stop();
        }
        let _ = self.vm.set_cpu_dirty_logging(false);
        // Paused by the switchover or parked by the throttle: either way, running again.
        let _ = self.vm.resume();
    }

    fn check_back(&self, peer: &mut Peer) -> Result<(), MigError> {
        loop {
            match self.back.try_recv() {
                Ok(b) => handle_back(b, peer)?,
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
                Err(_) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
    }

    fn wait_iteration(&self, n: u32, timeout: Duration, peer: &mut Peer) -> Result<(), MigError> {
        let end = Instant::now() + timeout;
        while peer.iter_acked < n {
            match self.back.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(b) => handle_back(b, peer)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigError::Timeout("the destination to apply an iteration"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
        Ok(())
    }

    /// Marks the end of iteration `n` on every connection.
    fn end_iteration(&mut self, n: u32, dirty: u64) -> Result<(), MigError> {
        for s in &mut self.senders {
            s.send(Job::Frame(Kind::EndOfIteration, msg::encode_u32_u64(n, dirty)))
                .map_err(|e| MigError::Peer(format!("connection: {e}")))?;
        }
        Ok(())
    }

    fn wait_back(&self, want: Kind, timeout: Duration, peer: &mut Peer) -> Result<Vec<u8>, MigError> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.back.recv_timeout(left) {
                Ok(Back::Frame(k, p)) if k == want => return Ok(p),
                Ok(b) => handle_back(b, peer)?,
                Err(RecvTimeoutError::Timeout) => return Err(MigError::Timeout("the destination")),
                Err(RecvTimeoutError::Disconnected) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
    }

    /// Queues the runs of `bm`, spread over the page connections.
    fn queue_pages(&mut self, bm: &PageBitmap) -> Result<(), MigError> {
        let n = self.pages.len() as u64;
        let mut err = None;
        let (pages, senders) = (&self.pages, &mut self.senders);
        runs(bm, |stripe, gpa, count| {
            if err.is_none() {
                let s = pages[(stripe % n) as usize];
                if let Err(e) = senders[s].send(Job::Run { gpa, pages: count }) {
                    err = Some(e);
                }
            }
        });
        err.map_or(Ok(()), |e| Err(MigError::Peer(format!("sending pages: {e}"))))
    }

    /// Adds the pages devices wrote since the last harvest.
    fn harvest_device(&mut self, out: &mut PageBitmap) -> Result<(), MigError> {
        match &mut self.device_dirty {
            Some(d) => d.harvest(out),
            None => Ok(()),
        }
    }

    /// Sends device sections on the control connection, counting their bytes and extending
    /// each device's digest of the data it sent.
    fn send_sections(&mut self, sections: &[vfio::vmm::Section], dev: &mut DeviceProgress) -> Result<(), MigError> {
        for (i, b) in sections {
            dev.bytes += b.len() as u64;
            dev.crcs[*i] = verify::device_data_crc(dev.crcs[*i], b).map_err(MigError::Other)?;
            self.control_frame(Kind::DeviceData, msg::encode_device_data(*i as u16, b))?;
        }
        Ok(())
    }

    fn control_frame(&mut self, k: Kind, p: Vec<u8>) -> Result<(), MigError> {
        self.senders[0]
            .send(Job::Frame(k, p))
            .map_err(|e| MigError::Peer(format!("control connection: {e}")))
    }

    fn flush_all(&mut self) -> Result<(), MigError> {
        for s in &mut self.senders {
            s.flush().map_err(|e| MigError::Peer(format!("connection: {e}")))?;
        }
        Ok(())
    }
}

/// Device data sent so far: bytes, and per device the CRC32C of its data (`verify`).
struct DeviceProgress {
    bytes: u64,
    crcs: Vec<u32>,
}

/// What the destination has acknowledged.
#[derive(Default)]
struct Peer {
    /// The device's initial pre-copy data (switchover-ack).
    init_acked: bool,
    /// The last iteration the destination has applied completely.
    iter_acked: u32,
}

fn handle_back(b: Back, peer: &mut Peer) -> Result<(), MigError> {
    match b {
        Back::Frame(Kind::InitAck, _) => {
            peer.init_acked = true;
            Ok(())
        }
        Back::Frame(Kind::IterationAck, p) => {
            let n = msg::Rd::new(&p).u32()?;
            peer.iter_acked = peer.iter_acked.max(n);
            Ok(())
        }
        Back::Frame(Kind::Error, p) => Err(MigError::Peer(
            msg::decode_str(&p).unwrap_or_else(|_| "(unreadable)".into()),
        )),
        Back::Frame(k, _) => Err(MigError::Wire(WireError::Unexpected {
            found: k,
            expected: "a return-path frame",
        })),
        Back::Failed(e) => Err(MigError::Wire(e)),
    }
}

fn connect(to: &str) -> Result<TcpStream, MigError> {
    let cerr = |e| MigError::Connect {
        what: to.to_string(),
        source: e,
    };
    let addr = to
        .to_socket_addrs()
        .map_err(cerr)?
        .next()
        .ok_or_else(|| cerr(std::io::Error::other("no address")))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(cerr)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The VM's shape as the destination must rebuild it.
pub fn vm_config_msg(vm: &Vm, opts: &SourceOptions) -> VmConfigMsg {
    let accel = vm.config().accel.as_ref().map(|a| AccelDesc {
        name: "accel".into(),
        flags: a.config.flags.bits() as u32,
        format: FormatKind::ALL.iter().position(|k| *k == a.format).unwrap_or(0) as u8,
        huge_pages: a.huge_pages,
        qp_num: a.config.qp_num,
        dev_id: a.config.dev_id,
        que_iso_cfg: a.config.que_iso_cfg,
        qp_base: a.config.qp_base,
        dma_logging: a.config.dma_logging,
    });
    VmConfigMsg {
        mem_mib: vm.config().mem_mib,
        vcpus: vm.vcpu_count(),
        regions: vm.slots().iter().map(|s| (s.gpa, s.size)).collect(),
        channels: opts.channels,
        verify: opts.verify,
        accel,
    }
}

/// Migrates `vm` to the destination at `to`. On success the source VM is left paused with
/// its devices stopped (it has moved); on failure it is running again, as before.
pub fn migrate(
    vm: &Arc<Vm>,
    to: &str,
    opts: &SourceOptions,
    ctl: &MigrationControl,
) -> Result<MigrationInfo, MigError> {
    let t0 = Instant::now();
    ctl.update(|i| {
        *i = MigrationInfo::default();
        i.status = Status::Setup;
        i.livemig.mode = opts.mode.to_string();
        i.livemig.channels = opts.channels;
        i.livemig.downtime_limit_ms = opts.downtime_limit.as_millis() as u64;
        i.livemig.cpu_dirty_log = match vm.dirty_mode() {
            DirtyLogMode::Ring { entries } => format!("ring-{entries}"),
            DirtyLogMode::Bitmap => "bitmap".into(),
        };
        i.ram.page_size = 4096;
        i.ram.total = vm.mem_size();
    });
    ctl.cancel.store(false, Ordering::Release);
    match run(vm, to, opts, ctl, t0) {
        Ok(info) => Ok(info),
        Err((e, live)) => {
            let cancelled = matches!(e, MigError::Cancelled);
            if let Some(mut live) = live {
                live.abort(&e.chain());
            }
            ctl.update(|i| {
                i.livemig.failed_phase = Some(i.status);
                i.status = if cancelled { Status::Cancelled } else { Status::Failed };
                i.error_desc = Some(e.chain());
                i.total_time = t0.elapsed().as_millis() as u64;
                i.livemig.source_vcpus_running = vm.vcpu_stopped().is_none();
            });
            Err(e)
        }
    }
}

type Fail = (MigError, Option<Box<Live>>);

fn run(
    vm: &Arc<Vm>,
    to: &str,
    opts: &SourceOptions,
    ctl: &MigrationControl,
    t0: Instant,
) -> Result<MigrationInfo, Fail> {
    let (mut live, stats) = open(vm, to, opts, t0).map_err(|e| (e, None))?;
    drive(&mut live, vm, opts, ctl, t0, &stats).map_err(|e| (e, Some(live)))
}

/// Connections, handshake and configuration, senders and the return-path reader.
fn open(vm: &Arc<Vm>, to: &str, opts: &SourceOptions, t0: Instant) -> Result<(Box<Live>, Arc<PageStats>), MigError> {
    // ---- connections ----
    let control = connect(to)?;
    let session = (std::process::id() as u64) << 32 ^ t0.elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let caps = CAP_LZ4 | if opts.verify { CAP_VERIFY } else { 0 };
    let mut hello_w = crate::frame::FrameWriter::new(control.try_clone()?);
    let mut reader = FrameReader::new(control.try_clone()?);
    let hello = Hello {
        version: VERSION,
        role: Role::Control,
        session,
        caps,
    };
    hello_w.send(Kind::Hello, &hello.encode())?;
    let f = reader.expect()?;
    let peer = match f.kind {
        Kind::Hello => Hello::decode(&f.payload)?,
        Kind::Error => return Err(MigError::Peer(msg::decode_str(&f.payload).unwrap_or_default())),
        k => {
            return Err(WireError::Unexpected {
                found: k,
                expected: "Hello",
            }
            .into())
        }
    };
    if peer.version != VERSION {
        return Err(WireError::Version(peer.version, VERSION).into());
    }
    if opts.verify && peer.caps & CAP_VERIFY == 0 {
        return Err(MigError::Incompatible("the destination cannot verify".into()));
    }
    hello_w.send(Kind::Config, &vm_config_msg(vm, opts).encode())?;
    let f = reader.expect()?;
    match f.kind {
        Kind::ConfigOk => {}
        Kind::Error => {
            return Err(MigError::Incompatible(msg::decode_str(&f.payload).unwrap_or_default()));
        }
        k => {
            return Err(WireError::Unexpected {
                found: k,
                expected: "ConfigOk",
            }
            .into())
        }
    }
    let stats = Arc::new(PageStats::default());
    let mem = vm.memory().clone();
    // The control connection's writer continues the sequence the hello writer started.
    let shared = Arc::new(Shared {
        mem,
        stats: stats.clone(),
        compress: opts.compress,
        limit: opts.max_bandwidth.map(Limiter::new),
    });
    let mut senders = vec![Sender::spawn_after(
        "mig-control".into(),
        control.try_clone()?,
        shared.clone(),
        2,
    )];
    for c in 0..opts.channels {
        let s = connect(to)?;
        let mut w = crate::frame::FrameWriter::new(s.try_clone()?);
        let h = Hello {
            version: VERSION,
            role: Role::Pages { channel: c },
            session,
            caps,
        };
        w.send(Kind::Hello, &h.encode())?;
        senders.push(Sender::spawn_after(format!("mig-pages-{c}"), s, shared.clone(), 1));
    }
    let pages: Vec<usize> = if opts.channels == 0 {
        vec![0]
    } else {
        (1..=opts.channels as usize).collect()
    };
    let (btx, back) = channel();
    std::thread::Builder::new()
        .name("mig-return".into())
        .spawn(move || loop {
            match reader.read_frame() {
                Ok(Some(f)) => {
                    if btx.send(Back::Frame(f.kind, f.payload)).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = btx.send(Back::Failed(WireError::Closed));
                    return;
                }
                Err(e) => {
                    let _ = btx.send(Back::Failed(e));
                    return;
                }
            }
        })
        .map_err(|e| MigError::Other(format!("spawning the return-path reader: {e}")))?;

    let devices = vfio::vmm::Source::new(vm.iommu().map(|s| s.accel.migration().clone()).into_iter().collect());
    let live = Box::new(Live {
        vm: vm.clone(),
        control,
        senders,
        pages,
        devices,
        device_dirty: None,
        throttle: None,
        back,
    });
    Ok((live, stats))
}

/// Everything after the connections: setup, bulk round, pre-copy, switchover, and after the
/// destination's acknowledgement verification and cleanup. An error before the
/// acknowledgement makes the caller abort (the source runs on); nothing after it may fail.
fn drive(
    live: &mut Live,
    vm: &Arc<Vm>,
    opts: &SourceOptions,
    ctl: &MigrationControl,
    t0: Instant,
    stats: &Arc<PageStats>,
) -> Result<MigrationInfo, MigError> {
    // ---- setup: trackers, then the devices' pre-copy streams ----
    let mut scratch = PageBitmap::new(vm.mem_size() / 4096);
    vm.set_cpu_dirty_logging(true)?;
    vm.harvest_cpu_dirty(&mut scratch)?; // the bulk round sends everything anyway
    live.device_dirty = Some(DeviceDirty::start(vm, opts.mode)?);
    live.harvest_device(&mut scratch)?;
    let mut devp = DeviceProgress {
        bytes: 0,
        crcs: vec![0; live.devices.devices().count()],
    };
    let sections = live.devices.setup()?;
    live.send_sections(&sections, &mut devp)?;
    if opts.auto_converge {
        live.throttle = Some(Throttle::new(vm.clone()));
    }
    let setup = t0.elapsed();
    ctl.update(|i| {
        i.status = Status::Active;
        i.setup_time = setup.as_millis() as u64;
    });

    // ---- bulk round ----
    let mut all = PageBitmap::new(vm.mem_size() / 4096);
    for s in vm.slots() {
        for p in s.gpa / 4096..(s.gpa + s.size) / 4096 {
            all.set(p);
        }
    }
    let mut conv = Convergence::new(opts.downtime_limit, opts.auto_converge, Instant::now(), 0);
    let mut peer = Peer::default();
    let mut iteration = 1u64;
    let (mut cpu_dirty_total, mut dev_dirty_total) = (0u64, 0u64);
    live.queue_pages(&all)?;
    live.end_iteration(1, all.count())?;
    live.flush_all()?;
    let precopy_start = Instant::now();
    let mut last_sync = Instant::now();
    let mut cpu = PageBitmap::new(vm.mem_size() / 4096);
    let mut dev = PageBitmap::new(vm.mem_size() / 4096);
    let reason;
    let mut max_reached = None::<Instant>;
    // ---- iterations ----
    loop {
        if ctl.cancel.load(Ordering::Acquire) {
            return Err(MigError::Cancelled);
        }
        live.check_back(&mut peer)?;
        // Flow control: the destination applies every iteration before the next sync, so
        // it never lags by more than one iteration of socket buffers and the switchover
        // does not start with a backlog.
        live.wait_iteration(iteration as u32, opts.peer_timeout, &mut peer)?;
        cpu.clear();
        dev.clear();
        vm.harvest_cpu_dirty(&mut cpu)?;
        live.harvest_device(&mut dev)?;
        let now = Instant::now();
        let dt = now.duration_since(last_sync).as_secs_f64().max(1e-6);
        last_sync = now;
        let (nc, nd) = (cpu.count(), dev.count());
        cpu_dirty_total += nc;
        dev_dirty_total += nd;
        cpu.union(&dev);
        let dirty = cpu.count();
        // Guest bytes of data pages moved, not wire bytes: see `convergence`.
        let sent = stats.data_pages() * 4096 + devp.bytes;
        conv.update(now, sent);
        if let Some(p) = conv.on_sync(dirty * 4096, sent) {
            if let Some(t) = &live.throttle {
                t.set(p);
            }
        }
        let pending = live.devices.pending();
        let allowed = peer.init_acked || !live.devices.needs_switchover_ack();
        let total_pending = dirty * 4096 + pending.exact;
        publish(
            ctl,
            stats,
            &conv,
            t0,
            iteration,
            dirty,
            devp.bytes,
            nc as f64 / dt,
            nd as f64 / dt,
            live.throttle.as_ref().map_or(0, |t| t.pct()),
        );
        if conv.can_switch(total_pending, allowed) {
            reason = "converged";
            break;
        }
        if iteration >= opts.max_iterations as u64 {
            if allowed {
                reason = "max-iterations";
                break;
            }
            // Never stop before the destination acknowledged the device's initial data.
            let waited = *max_reached.get_or_insert_with(Instant::now);
            if waited.elapsed() > opts.peer_timeout {
                return Err(MigError::Timeout("the destination's switchover acknowledgement"));
            }
        }
        if !allowed && dirty < 64 {
            // Waiting for the destination's acknowledgement with nothing much to send: wait
            // for it a little instead of spinning through empty dirty syncs.
            match live.back.recv_timeout(Duration::from_millis(10)) {
                Ok(b) => handle_back(b, &mut peer)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
        iteration += 1;
        live.queue_pages(&cpu)?;
        let (sections, _) = live.devices.iterate()?;
        live.send_sections(&sections, &mut devp)?;
        live.end_iteration(iteration as u32, dirty)?;
        live.flush_all()?;
    }
    let precopy = precopy_start.elapsed().as_secs_f64().max(1e-6);
    let expected = conv.expected_downtime;
    let precopy_bytes = stats.wire_bytes.load(Ordering::Relaxed);

    // ---- switchover ----
    ctl.update(|i| i.status = Status::Device);
    live.stop_throttle();
    live.devices.enter_p2p()?;
    let t_pause = Instant::now();
    vm.pause()?;
    let sections = live.devices.stop_copy()?;
    // Devices are stopped: no more DMA. The last harvest covers both kinds of writers.
    vm.harvest_cpu_dirty(&mut cpu)?;
    live.harvest_device(&mut cpu)?;
    let final_pages = cpu.count();
    live.control_frame(Kind::Switchover, Vec::new())?;
    live.queue_pages(&cpu)?;
    live.send_sections(&sections, &mut devp)?;
    let vcpus = vm.save_vcpus()?;
    live.control_frame(Kind::VcpuState, vmm::state::encode(&vcpus))?;
    for k in 1..live.senders.len() {
        live.senders[k]
            .send(Job::Frame(Kind::Complete, Vec::new()))
            .map_err(MigError::Peer)?;
    }
    live.control_frame(Kind::Complete, Vec::new())?;
    live.flush_all()?;
    let ack = live.wait_back(Kind::Ack, opts.peer_timeout, &mut peer)?;
    let t_ack = Instant::now();
    // ---- the destination runs the guest now; nothing below may resume the source ----
    let ack = Ack::decode(&ack).unwrap_or_default();
    let downtime = t_ack
        .duration_since(t_pause)
        .saturating_sub(Duration::from_nanos(ack.verify_ns + ack.since_running_ns));
    let total_bytes = stats.wire_bytes.load(Ordering::Relaxed);
    ctl.update(|i| {
        i.total_time = t0.elapsed().as_millis() as u64;
        i.downtime = Some(downtime.as_millis() as u64);
        i.downtime_us = Some(downtime.as_micros() as u64);
        i.vfio.transferred = devp.bytes;
        i.ram.precopy_bytes = precopy_bytes;
        i.ram.downtime_bytes = total_bytes - precopy_bytes;
        i.ram.remaining = 0;
        i.ram.iteration_count = iteration;
        i.livemig.switchover_reason = reason.into();
        i.livemig.expected_downtime_at_switchover_ms = expected.as_millis() as u64;
        i.livemig.cpu_dirty_pages = cpu_dirty_total;
        i.livemig.device_dirty_pages = dev_dirty_total;
        i.livemig.cpu_dirty_pages_rate = (cpu_dirty_total as f64 / precopy) as u64;
        i.livemig.device_dirty_pages_rate = (dev_dirty_total as f64 / precopy) as u64;
        i.livemig.dest_verify_ms = ack.verify_ns as f64 / 1e6;
        i.livemig.source_vcpus_running = false;
        i.livemig.final_pages = final_pages;
        fill_ram(i, stats);
    });
    if opts.verify {
        let detail = verify_with_peer(live, vm, &ack, devp.crcs, opts, &mut peer);
        ctl.update(|i| match &detail {
            Ok(r) => {
                i.livemig.dest_pages_before = r.pages_before;
                i.livemig.dest_pages_after = r.pages_after;
                i.livemig.dest_jobs_before = r.jobs_before;
                i.livemig.dest_jobs_after = r.jobs_after;
                i.livemig.verified = Some(r.digest_ok && r.reason.is_empty());
                i.livemig.verify_detail = if r.reason.is_empty() {
                    "memory, device state and guest progress match".into()
                } else {
                    r.reason.clone()
                };
            }
            Err(e) => {
                i.livemig.verified = Some(false);
                i.livemig.verify_detail = e.clone();
            }
        });
    }
    // save_cleanup, outside the downtime; the source VM stays paused: it has moved.
    live.devices.complete();
    if let Some(mut d) = live.device_dirty.take() {
        d.stop();
    }
    let _ = vm.set_cpu_dirty_logging(false);
    let _ = live.control.shutdown(Shutdown::Both);
    for s in &mut live.senders {
        let _ = s.finish();
    }
    // Completed only now, with verification done, so a watcher that stops at "completed"
    // sees the whole result.
    ctl.update(|i| i.status = Status::Completed);
    Ok(ctl.snapshot())
}

/// Source digest (memory is frozen: vCPUs paused, devices stopped), compared with the
/// destination's; then the destination's verdict on its running guest.
fn verify_with_peer(
    live: &mut Live,
    vm: &Vm,
    ack: &Ack,
    dev_crcs: Vec<u32>,
    opts: &SourceOptions,
    peer: &mut Peer,
) -> Result<VerifyReport, String> {
    let regions: Vec<(u64, u64)> = vm.slots().iter().map(|s| (s.gpa, s.size)).collect();
    let mine = verify::digest(verify::memory_digest(vm.memory(), &regions)?, dev_crcs);
    let mut w = msg::Wr::default();
    mine.encode_into(&mut w);
    live.control_frame(Kind::Verify, w.0).map_err(|e| e.chain())?;
    live.flush_all().map_err(|e| e.chain())?;
    let theirs = ack.digest.as_ref().ok_or("the destination sent no digest")?;
    let report = live
        .wait_back(Kind::VerifyReport, opts.peer_timeout, peer)
        .map_err(|e| e.chain())?;
    let mut r = VerifyReport::decode(&report).map_err(|e| e.to_string())?;
    if let Some(m) = mine.mismatch(theirs) {
        r.digest_ok = false;
        r.reason = m;
    }
    Ok(r)
}

fn fill_ram(i: &mut MigrationInfo, stats: &PageStats) {
    i.ram.transferred = stats.wire_bytes.load(Ordering::Relaxed);
    i.ram.duplicate = stats.zero_pages.load(Ordering::Relaxed);
    i.ram.normal = stats.normal_pages.load(Ordering::Relaxed);
    i.ram.normal_bytes = i.ram.normal * 4096;
    i.livemig.compressed_pages = stats.compressed_pages.load(Ordering::Relaxed);
    i.livemig.compressed_bytes = stats.compressed_bytes.load(Ordering::Relaxed);
}

#[allow(clippy::too_many_arguments)]
fn publish(
    ctl: &MigrationControl,
    stats: &PageStats,
    conv: &Convergence,
    t0: Instant,
    iteration: u64,
    dirty: u64,
    vfio_bytes: u64,
    cpu_rate: f64,
    dev_rate: f64,
    throttle: u8,
) {
    ctl.update(|i| {
        i.total_time = t0.elapsed().as_millis() as u64;
        i.expected_downtime = conv.expected_downtime.as_millis() as u64;
        i.cpu_throttle_percentage = throttle;
        i.ram.remaining = dirty * 4096;
        i.ram.dirty_sync_count += 1;
        i.ram.iteration_count = iteration;
        i.ram.mbps = conv.bandwidth * 1000.0 * 8.0 / 1e6;
        i.ram.dirty_pages_rate = (cpu_rate + dev_rate) as u64;
        i.vfio.transferred = vfio_bytes;
        fill_ram(i, stats);
    });
}
