//! A TCP proxy between a migration's source and destination that reads the stream frame by
//! frame (it only needs the 24-byte header: kind and length), follows the protocol's steps,
//! and at a chosen step does one harmful thing to the first frame that crosses in a chosen
//! direction: cut every connection, stall them (open but silent), kill the destination or
//! freeze it for a while (SIGSTOP, then SIGCONT), flip a bit, truncate, duplicate, drop or
//! reorder the frame, or inject garbage before it.

use migration::frame::{Kind, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustix::process::{kill_process, Pid, Signal};
use serde::Serialize;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where in the protocol the fault strikes: at the first frame in its direction at or after
/// this point (`docs/protocol.md`, "Switchover").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The `Hello` of either side.
    Handshake,
    /// `Config`, and the destination's `ConfigOk`.
    Config,
    /// The first page run.
    Bulk,
    /// The end of the second iteration.
    Iteration,
    /// The `Switchover` frame: the source's vCPUs are paused.
    Switchover,
    /// The first frame after the final pages (device state).
    AfterPages,
    /// The platform (vIOMMU) state, the first frame after the device state; the vCPU state
    /// follows it.
    AfterDevice,
    /// `Complete`, after the vCPU state.
    AfterVcpu,
    /// The destination's `Ready`.
    AfterReady,
    /// The source's `Commit`.
    AfterCommit,
    /// The destination's `Running` (its confirmation).
    AfterConfirm,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::Handshake,
        Step::Config,
        Step::Bulk,
        Step::Iteration,
        Step::Switchover,
        Step::AfterPages,
        Step::AfterDevice,
        Step::AfterVcpu,
        Step::AfterReady,
        Step::AfterCommit,
        Step::AfterConfirm,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Step::Handshake => "handshake",
            Step::Config => "config",
            Step::Bulk => "bulk",
            Step::Iteration => "iteration",
            Step::Switchover => "switchover",
            Step::AfterPages => "after-pages",
            Step::AfterDevice => "after-device",
            Step::AfterVcpu => "after-vcpu",
            Step::AfterReady => "after-ready",
            Step::AfterCommit => "after-commit",
            Step::AfterConfirm => "after-confirm",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Cut,
    Stall,
    Kill,
    /// SIGSTOP the destination, forward the frame, SIGCONT it after 1.5 peer timeouts: a
    /// process that stops and comes back (a VM pause, a debugger, a swap storm).
    Freeze,
    Flip,
    Truncate,
    Duplicate,
    Drop,
    Reorder,
    Garbage,
}

impl Action {
    pub const ALL: [Action; 10] = [
        Action::Cut,
        Action::Stall,
        Action::Kill,
        Action::Freeze,
        Action::Flip,
        Action::Truncate,
        Action::Duplicate,
        Action::Drop,
        Action::Reorder,
        Action::Garbage,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Action::Cut => "cut",
            Action::Stall => "stall",
            Action::Kill => "kill",
            Action::Freeze => "freeze",
            Action::Flip => "flip",
            Action::Truncate => "truncate",
            Action::Duplicate => "duplicate",
            Action::Drop => "drop",
            Action::Reorder => "reorder",
            Action::Garbage => "garbage",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dir {
    /// Source to destination.
    ToDest,
    /// Destination to source (acknowledgements, `Ready`, `Running`, reports).
    ToSource,
}

impl Dir {
    pub const ALL: [Dir; 2] = [Dir::ToDest, Dir::ToSource];
    pub fn name(self) -> &'static str {
        match self {
            Dir::ToDest => "to-dest",
            Dir::ToSource => "to-source",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Fault {
    pub step: Step,
    pub dir: Dir,
    pub action: Action,
    /// Chooses the bit, the cut point, the garbage.
    pub seed: u64,
}

/// What the proxy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fired {
    /// The frame the action hit (`None`: the step was never reached, or no frame followed).
    pub frame: Option<String>,
    /// Whether the bytes the receiver got differ from what the sender sent (a reorder with
    /// nothing to swap with only delays).
    pub altered: bool,
}

struct Shared {
    fault: Fault,
    /// The destination process, and how long a freeze lasts.
    dest: Pid,
    freeze: Duration,
    /// The step has been reached.
    armed: AtomicBool,
    /// The action was taken (exactly once).
    taken: AtomicBool,
    fired: Mutex<Fired>,
    stalled: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    // Step tracking on the control connection.
    switched: AtomicBool,
    vcpu_seen: AtomicBool,
    pages_done: AtomicBool,
    accepted: AtomicUsize,
}

pub struct Proxy {
    pub addr: String,
    sh: Arc<Shared>,
}

/// How long a pump waits in one read before it looks at the stop and stall flags.
const POLL: Duration = Duration::from_millis(50);
/// How long a reordered frame waits for a later one to overtake it.
const REORDER_WAIT: Duration = Duration::from_millis(300);

impl Proxy {
    /// Listens on loopback and forwards every connection to `to`, the destination process
    /// `dest`, which a `Kill` kills and a `Freeze` stops for `freeze`.
    pub fn start(to: String, fault: Fault, dest: u32, freeze: Duration) -> std::io::Result<Proxy> {
        let dest = i32::try_from(dest)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| std::io::Error::other("no such process"))?;
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        l.set_nonblocking(true)?;
        let sh = Arc::new(Shared {
            fault,
            dest,
            freeze,
            armed: AtomicBool::new(false),
            taken: AtomicBool::new(false),
            fired: Mutex::new(Fired::default()),
            stalled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            switched: AtomicBool::new(false),
            vcpu_seen: AtomicBool::new(false),
            pages_done: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
        });
        let s = sh.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => {
                        let Ok(d) = TcpStream::connect(&to) else {
                            let _ = c.shutdown(Shutdown::Both);
                            continue;
                        };
                        let control = s.accepted.fetch_add(1, Ordering::AcqRel) == 0;
                        let _ = c.set_nonblocking(false);
                        for x in [&c, &d] {
                            let _ = x.set_nodelay(true);
                            let _ = x.set_read_timeout(Some(POLL));
                            if let Ok(y) = x.try_clone() {
                                s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(y);
                            }
                        }
                        let (c2, d2) = match (c.try_clone(), d.try_clone()) {
                            (Ok(a), Ok(b)) => (a, b),
                            _ => continue,
                        };
                        let (s1, s2) = (s.clone(), s.clone());
                        std::thread::spawn(move || pump(c, d, Dir::ToDest, control, &s1));
                        std::thread::spawn(move || pump(d2, c2, Dir::ToSource, control, &s2));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Proxy { addr, sh })
    }

    pub fn fired(&self) -> Fired {
        self.sh.fired.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes every connection (ends a stall too).
    pub fn stop(&self) {
        self.sh.stop.store(true, Ordering::Release);
        cut(&self.sh);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cut(sh: &Shared) {
    for c in sh.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = c.shutdown(Shutdown::Both);
    }
}

enum Read2 {
    Done,
    Closed,
    /// Nothing arrived within `limit`.
    Idle,
}

/// Reads exactly `buf`, polling the stop flag; `limit` bounds the wait for its first byte.
fn read_full(s: &mut TcpStream, buf: &mut [u8], sh: &Shared, limit: Option<Duration>) -> Read2 {
    let mut got = 0;
    let t = Instant::now();
    while got < buf.len() {
        if sh.stop.load(Ordering::Acquire) {
            return Read2::Closed;
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Read2::Closed,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if got == 0 && limit.is_some_and(|l| t.elapsed() >= l) {
                    return Read2::Idle;
                }
            }
            Err(_) => return Read2::Closed,
        }
    }
    Read2::Done
}

/// One frame, raw: header and payload. `None` at the end of the stream.
fn read_frame(s: &mut TcpStream, sh: &Shared, limit: Option<Duration>) -> Result<Option<Vec<u8>>, ()> {
    let mut h = [0u8; HEADER_LEN];
    match read_full(s, &mut h, sh, limit) {
        Read2::Done => {}
        Read2::Closed => return Err(()),
        Read2::Idle => return Ok(None),
    }
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4]));
    if u32::from_le_bytes(h[0..4].try_into().unwrap_or([0; 4])) != MAGIC || len > MAX_PAYLOAD {
        // Not a frame of ours: pass it on as it is and let the receiver refuse it.
        return Ok(Some(h.to_vec()));
    }
    let mut f = h.to_vec();
    f.resize(HEADER_LEN + len as usize, 0);
    match read_full(s, &mut f[HEADER_LEN..], sh, None) {
        Read2::Done => Ok(Some(f)),
        _ => Err(()),
    }
}

fn kind(f: &[u8]) -> Option<Kind> {
    f.get(4).and_then(|k| Kind::from_u8(*k))
}

/// Notes the protocol step `f` marks (frames of direction `dir` on a connection).
fn track(f: &[u8], dir: Dir, control: bool, sh: &Shared) {
    let step = sh.fault.step;
    let k = kind(f);
    let reached = match (dir, k) {
        (_, Some(Kind::Hello)) if control => step == Step::Handshake,
        (Dir::ToDest, Some(Kind::Config)) => step == Step::Config,
        (Dir::ToDest, Some(Kind::Pages)) => {
            if control && sh.switched.load(Ordering::Acquire) {
                false
            } else {
                step == Step::Bulk
            }
        }
        (Dir::ToDest, Some(Kind::EndOfIteration)) => {
            let it = f
                .get(HEADER_LEN..HEADER_LEN + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
            step == Step::Iteration && it >= 2
        }
        (Dir::ToDest, Some(Kind::Switchover)) if control => {
            sh.switched.store(true, Ordering::Release);
            step == Step::Switchover
        }
        (Dir::ToDest, Some(Kind::PlatformState)) if control => step == Step::AfterDevice,
        (Dir::ToDest, Some(Kind::VcpuState)) if control => {
            sh.vcpu_seen.store(true, Ordering::Release);
            false
        }
        (Dir::ToDest, Some(Kind::Complete)) if control && sh.vcpu_seen.load(Ordering::Acquire) => {
            step == Step::AfterVcpu
        }
        (Dir::ToSource, Some(Kind::Ready)) => step == Step::AfterReady,
        (Dir::ToDest, Some(Kind::Commit)) => step == Step::AfterCommit,
        (Dir::ToSource, Some(Kind::Running)) => step == Step::AfterConfirm,
        _ => false,
    };
    // After the switchover, the first control frame that is not a page run ends the final
    // pages (device state, or the vCPU state for a VM without a device).
    let after_pages = step == Step::AfterPages
        && control
        && dir == Dir::ToDest
        && sh.switched.load(Ordering::Acquire)
        && !matches!(k, Some(Kind::Pages) | Some(Kind::Switchover))
        && !sh.pages_done.swap(true, Ordering::AcqRel);
    if reached || after_pages {
        sh.armed.store(true, Ordering::Release);
    }
}

fn record(sh: &Shared, f: &[u8], altered: bool) {
    *sh.fired.lock().unwrap_or_else(|e| e.into_inner()) = Fired {
        frame: Some(kind(f).map_or_else(|| "?".into(), |k| format!("{k:?}"))),
        altered,
    };
}

fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, control: bool, sh: &Shared) {
    let mut held: Option<Vec<u8>> = None;
    loop {
        if sh.stalled.load(Ordering::Acquire) {
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(POLL);
            continue;
        }
        let limit = held.as_ref().map(|_| REORDER_WAIT);
        let f = match read_frame(&mut from, sh, limit) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // The reordered frame waited long enough: nothing overtakes it.
                if let Some(h) = held.take() {
                    record(sh, &h, false);
                    if to.write_all(&h).is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(()) => {
                if let Some(h) = held.take() {
                    let _ = to.write_all(&h);
                }
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        };
        if sh.stalled.load(Ordering::Acquire) {
            // Read while the stall began: it never arrives.
            continue;
        }
        if let Some(h) = held.take() {
            // The next frame overtakes the held one.
            if to.write_all(&f).is_err() || to.write_all(&h).is_err() {
                return;
            }
            continue;
        }
        track(&f, dir, control, sh);
        let act = sh.fault.dir == dir && sh.armed.load(Ordering::Acquire) && !sh.taken.swap(true, Ordering::AcqRel);
        if !act {
            if to.write_all(&f).is_err() {
                return;
            }
            continue;
        }
        let mut rng = SmallRng::seed_from_u64(sh.fault.seed);
        match sh.fault.action {
            Action::Cut => {
                record(sh, &f, true);
                cut(sh);
                return;
            }
            Action::Stall => {
                record(sh, &f, true);
                sh.stalled.store(true, Ordering::Release);
            }
            Action::Kill => {
                record(sh, &f, true);
                let _ = kill_process(sh.dest, Signal::KILL);
            }
            Action::Freeze => {
                record(sh, &f, false);
                let _ = kill_process(sh.dest, Signal::STOP);
                let (pid, d) = (sh.dest, sh.freeze);
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let _ = kill_process(pid, Signal::CONT);
                });
                if to.write_all(&f).is_err() {
                    return;
                }
            }
            Action::Flip => {
                let mut g = f.clone();
                let bit = rng.random_range(0..g.len() as u64 * 8);
                g[(bit / 8) as usize] ^= 1 << (bit % 8);
                record(sh, &f, true);
                if to.write_all(&g).is_err() {
                    return;
                }
            }
            Action::Truncate => {
                let n = rng.random_range(1..f.len());
                record(sh, &f, true);
                let _ = to.write_all(&f[..n]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            Action::Duplicate => {
                record(sh, &f, true);
                if to.write_all(&f).is_err() || to.write_all(&f).is_err() {
                    return;
                }
            }
            Action::Drop => record(sh, &f, true),
            Action::Reorder => {
                record(sh, &f, true);
                held = Some(f);
            }
            Action::Garbage => {
                let n = rng.random_range(16..64);
                let g: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                record(sh, &f, true);
                if to.write_all(&g).is_err() || to.write_all(&f).is_err() {
                    return;
                }
            }
        }
    }
}
