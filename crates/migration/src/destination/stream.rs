//! The stream, from `ConfigOk` to `Complete`: the page connections (each in its own thread),
//! device data, iteration acknowledgements, and the switchover's frames in their order.

use super::{io, unexpected, Ctl, DestOptions, DestReport};
use crate::digest::PageLog;
use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, Kind};
use crate::msg::{self, Hello, Role, VerifyMode, VmConfigMsg};
use crate::pages::{MemoryMap, RunDecoder};
use crate::session::mono_ns;
use crate::transport::psk::{self, Dir, PAGE_HELLO};
use crate::transport::{self, Conn};
use std::io::BufReader;
use std::net::{Shutdown, TcpListener};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vfio::MigState;
use vmm::Vm;

/// Everything received, once the source sent `Complete` on every connection.
pub(super) struct Received {
    pub report: DestReport,
    pub devices: vfio::vmm::Destination,
    pub log: Arc<PageLog>,
    pub map: MemoryMap,
    pub vcpu_state: Vec<u8>,
    pub platform_state: Vec<u8>,
    /// Monotonic times of the `Switchover` frame and of the last `Complete`.
    pub t_switch: u64,
    pub t_complete: u64,
}

/// What ties the page connections to this session: the source's nonce, the CRC key and,
/// with a pre-shared key, its session keys.
pub(super) struct Session<'a> {
    pub nonce: u64,
    pub key: u64,
    pub keys: Option<&'a psk::Session>,
}

/// What the page connections share with the control loop.
struct PageSide {
    threads: Vec<JoinHandle<u64>>,
    streams: Vec<Conn>,
    /// Per connection, the last iteration it applied completely.
    progress: Arc<Vec<AtomicU32>>,
    /// Page frames applied over every connection: how the control loop tells a long page
    /// round that moves from a stalled one.
    applied: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<MigError>>>,
}

impl PageSide {
    /// Whether the page connections applied anything since `last` was taken (and updates it).
    fn moved(&self, last: &mut u64) -> bool {
        let now = self.applied.load(Ordering::Acquire);
        std::mem::replace(last, now) != now
    }

    fn failure(&self) -> Option<MigError> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Stops every page connection and collects what they received.
    fn end(self, abort: bool) -> Result<u64, MigError> {
        if abort {
            for s in &self.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let mut pages = 0;
        for t in self.threads {
            pages += t.join().unwrap_or(0);
        }
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(pages),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn receive_stream(
    listener: &TcpListener,
    control: &Conn,
    ctl: &mut Ctl,
    r: &mut FrameReader<BufReader<Conn>>,
    cfg: &VmConfigMsg,
    vm: &Arc<Vm>,
    sess: Session<'_>,
    opts: &DestOptions,
) -> Result<Received, MigError> {
    let map = MemoryMap {
        regions: cfg.regions.clone(),
    };
    let mut devices = vfio::vmm::Destination::new(vm.devices().iter().map(|d| d.migration.clone()).collect());
    for d in devices.devices() {
        d.set_state(MigState::Stop)
            .map_err(|e| MigError::Other(format!("device to STOP: {e}")))?;
    }
    devices.setup()?;
    ctl.send(Kind::ConfigOk, &[])?;
    let log = Arc::new(PageLog::new(vm.ram_end() / 4096, cfg.verify != VerifyMode::Off));
    let side = accept_pages(listener, cfg.channels, &sess, opts, &map, vm, &log, control)?;

    let mut report = DestReport::default();
    let mut dec = RunDecoder::new();
    let mut vcpu_state = None;
    let mut platform_state = None;
    let mut t_switch = None;
    // The control connection is silent while the page connections carry a round: that is a
    // stall only if they stall too.
    let mut seen = 0u64;
    let res: Result<(), MigError> = (|| loop {
        let f = r.expect_or_wait(|| side.moved(&mut seen))?;
        match f.kind {
            Kind::Pages if cfg.channels == 0 => {
                report.pages_received += dec.apply(&f.payload, &map, vm.memory(), &log)?;
            }
            Kind::DeviceData => {
                let (idx, data) = msg::decode_device_data(&f.payload)?;
                report.device_bytes += data.len() as u64;
                for ev in devices.load(idx as usize, data)? {
                    let vfio::vmm::DestEvent::InitDataReceived(i) = ev;
                    ctl.send(Kind::InitAck, &(i as u16).to_le_bytes())?;
                }
            }
            Kind::EndOfIteration if t_switch.is_none() => {
                let (it, _dirty) = msg::decode_u32_u64(&f.payload)?;
                // Acknowledged once every page connection has applied the iteration too; the
                // wait is bounded by how long they may go without applying anything.
                let mut end = Instant::now() + opts.peer_timeout;
                while side.progress.iter().any(|p| p.load(Ordering::Acquire) < it) {
                    if let Some(e) = side.failure() {
                        return Err(e);
                    }
                    if side.moved(&mut seen) {
                        end = Instant::now() + opts.peer_timeout;
                    } else if Instant::now() > end {
                        return Err(MigError::Timeout("the page connections to finish an iteration"));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                report.iterations = it;
                ctl.send(Kind::IterationAck, &it.to_le_bytes())?;
            }
            Kind::Switchover if t_switch.is_none() => {
                msg::decode_empty(&f.payload)?;
                t_switch = Some(mono_ns());
            }
            Kind::PlatformState if t_switch.is_some() && platform_state.is_none() && vcpu_state.is_none() => {
                platform_state = Some(f.payload)
            }
            Kind::VcpuState if platform_state.is_some() && vcpu_state.is_none() => vcpu_state = Some(f.payload),
            Kind::Complete if vcpu_state.is_some() => return Ok(msg::decode_empty(&f.payload)?),
            Kind::Error => return Err(MigError::Peer(msg::decode_str(&f.payload)?)),
            k => {
                return Err(unexpected(
                    k,
                    match (t_switch, &vcpu_state) {
                        (None, _) => "a pre-copy frame (Pages, DeviceData, EndOfIteration, Switchover)",
                        (Some(_), None) => "the switchover's Pages, DeviceData, PlatformState or VcpuState",
                        (Some(_), Some(_)) => "Complete",
                    },
                ))
            }
        }
    })();
    if let Err(e) = res {
        // A page connection's failure is the cause; the control loop only saw it end.
        let cause = side.failure();
        let _ = side.end(true);
        return Err(cause.unwrap_or(e));
    }
    report.pages_received += side.end(false)?;
    Ok(Received {
        report,
        devices,
        log,
        map,
        vcpu_state: vcpu_state.unwrap_or_default(),
        platform_state: platform_state.unwrap_or_default(),
        t_switch: t_switch.unwrap_or(0),
        t_complete: mono_ns(),
    })
}

/// Accepts the `n` page connections of this session, each in its own receiving thread.
#[allow(clippy::too_many_arguments)]
fn accept_pages(
    listener: &TcpListener,
    n: u16,
    sess: &Session<'_>,
    opts: &DestOptions,
    map: &MemoryMap,
    vm: &Arc<Vm>,
    log: &Arc<PageLog>,
    control: &Conn,
) -> Result<PageSide, MigError> {
    let mut side = PageSide {
        threads: Vec::new(),
        streams: Vec::new(),
        progress: Arc::new((0..n).map(|_| AtomicU32::new(0)).collect()),
        applied: Arc::new(AtomicU64::new(0)),
        failed: Arc::new(Mutex::new(None)),
    };
    if n == 0 {
        return Ok(side);
    }
    let timeout = opts.peer_timeout;
    listener.set_nonblocking(true).map_err(io)?;
    let end = Instant::now() + timeout;
    let mut seen = vec![false; n as usize];
    let res = (|| {
        while side.threads.len() < n as usize {
            let s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > end {
                        return Err(MigError::Timeout("the page connections"));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(io(e)),
            };
            s.set_nonblocking(false).map_err(io)?;
            // A stray connection (another session's, or not a migration's at all) is closed
            // and the wait goes on; its handshake and first frame have a few seconds.
            let first = timeout.min(Duration::from_secs(5));
            let Ok(s) = transport::server(s, &opts.security, first) else {
                continue;
            };
            s.set_read_timeout(Some(first)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            // Keyed from the first frame: a connection of another session fails its CRC (and
            // with a pre-shared key, its tag).
            let mut r =
                FrameReader::new(BufReader::with_capacity(1 << 20, s.try_clone().map_err(io)?)).with_key(sess.key);
            r.set_mac(sess.keys.map(|k| k.key(Dir::ToDest, PAGE_HELLO)));
            if s.authenticated() {
                r.trust_transport();
            }
            let channel = match r.expect().map_err(MigError::from).and_then(|f| {
                if f.kind != Kind::Hello {
                    return Err(unexpected(f.kind, "Hello"));
                }
                match Hello::decode(&f.payload)? {
                    Hello {
                        role: Role::Pages { channel },
                        nonce: hn,
                        ..
                    } if hn == sess.nonce && channel < n && !seen[channel as usize] => Ok(channel),
                    _ => Err(MigError::Wire(WireError::Malformed(
                        "not a page connection of this session",
                    ))),
                }
            }) {
                Ok(c) => c,
                Err(_) => {
                    let _ = s.shutdown(Shutdown::Both);
                    continue;
                }
            };
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            r.set_mac(sess.keys.map(|k| k.key(Dir::ToDest, channel + 1)));
            seen[channel as usize] = true;
            side.streams.push(s.try_clone().map_err(io)?);
            let (map, vm, log, failed, progress) = (
                map.clone(),
                vm.clone(),
                log.clone(),
                side.failed.clone(),
                side.progress.clone(),
            );
            let applied = side.applied.clone();
            let control = control.try_clone().map_err(io)?;
            side.threads.push(
                std::thread::Builder::new()
                    .name(format!("mig-recv-{channel}"))
                    .spawn(move || {
                        match receive_pages(&mut r, &map, &vm, &log, &progress[channel as usize], &applied) {
                            Ok(n) => n,
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                                f.get_or_insert(MigError::Wire(e));
                                // Wakes the control loop, which reports the failure.
                                let _ = control.shutdown(Shutdown::Read);
                                0
                            }
                        }
                    })
                    .map_err(|e| MigError::Other(format!("spawning a receiver: {e}")))?,
            );
        }
        Ok(())
    })();
    let _ = listener.set_nonblocking(false);
    match res {
        Ok(()) => Ok(side),
        Err(e) => {
            let _ = side.end(true);
            Err(e)
        }
    }
}

/// A page connection: page runs and iteration ends until `Complete`; `done` is the last
/// iteration it has applied completely.
fn receive_pages<R: std::io::Read>(
    r: &mut FrameReader<R>,
    map: &MemoryMap,
    vm: &Vm,
    log: &PageLog,
    done: &AtomicU32,
    applied: &AtomicU64,
) -> Result<u64, WireError> {
    let mut dec = RunDecoder::new();
    let mut pages = 0;
    loop {
        let f = r.expect()?;
        match f.kind {
            Kind::Pages => {
                pages += dec.apply(&f.payload, map, vm.memory(), log)?;
                applied.fetch_add(1, Ordering::Release);
            }
            Kind::EndOfIteration => done.store(msg::decode_u32_u64(&f.payload)?.0, Ordering::Release),
            Kind::Complete => {
                msg::decode_empty(&f.payload)?;
                return Ok(pages);
            }
            k => {
                return Err(WireError::Unexpected {
                    found: k,
                    expected: "Pages, EndOfIteration or Complete on a page connection",
                })
            }
        }
    }
}
