//! A TCP relay that impairs a link the way `netem` would, for machines that lack it: every
//! chunk of bytes is delivered `latency ± jitter` after it was read (in order, as TCP would
//! deliver it), and at chosen moments the relay stalls (holds everything for a while) or cuts
//! (closes every connection). `livemig proxy` runs one; `livemig bench net` puts one in front
//! of a destination (`docs/network.md`).

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the relay does to the link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// One-way delay added to every chunk.
    pub latency: Duration,
    /// Each chunk's delay is `latency` plus a uniform draw from `-jitter..=jitter`, never
    /// below zero, and never delivered before the chunk read ahead of it.
    pub jitter: Duration,
    /// From `.0` after the relay started, for `.1`, nothing is delivered (then the backlog
    /// flows on).
    pub stall: Option<(Duration, Duration)>,
    /// This long after the relay started, every connection is closed, and new ones are
    /// refused.
    pub cut: Option<Duration>,
    /// Seeds the jitter.
    pub seed: u64,
}

/// Bytes read in one go; also the unit of delay.
const CHUNK: usize = 64 << 10;
/// Chunks held per direction before the reader waits: 8 MiB, the bandwidth-delay product of
/// 1 GiB/s at 8 ms. Beyond it the sender is slowed, as by a full queue on a real link.
const IN_FLIGHT: usize = 128;
/// The longest the relay waits to reach its target for a new connection.
const CONNECT: Duration = Duration::from_secs(5);
/// How often blocked threads look at the stop and cut flags.
const POLL: Duration = Duration::from_millis(20);

struct Shared {
    imp: Impairment,
    started: Instant,
    stop: AtomicBool,
    /// Every open connection's two sockets, by connection id, to close at a cut or a stop.
    socks: Mutex<Vec<(u64, [TcpStream; 2])>>,
}

impl Shared {
    fn cut_due(&self) -> bool {
        self.imp.cut.is_some_and(|c| self.started.elapsed() >= c)
    }
    fn halted(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.cut_due()
    }
    /// When a stall that covers `t` ends (`None`: no stall covers it).
    fn stalled_until(&self, t: Instant) -> Option<Instant> {
        let (after, len) = self.imp.stall?;
        let (from, to) = (self.started + after, self.started + after + len);
        (t >= from && t < to).then_some(to)
    }
    fn close_all(&self) {
        for (_, pair) in self.socks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            for s in pair {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
    /// Forgets a connection both of whose directions have ended.
    fn forget(&self, id: u64) {
        self.socks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
    }
}

/// A running relay; dropping it closes every connection.
pub struct ImpairedLink {
    pub addr: String,
    sh: Arc<Shared>,
}

impl ImpairedLink {
    /// Listens on `listen` and relays every connection to `to`, impaired.
    pub fn start(listen: &str, to: String, imp: Impairment) -> std::io::Result<ImpairedLink> {
        let l = TcpListener::bind(listen)?;
        let addr = l.local_addr()?.to_string();
        l.set_nonblocking(true)?;
        let sh = Arc::new(Shared {
            imp,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            socks: Mutex::new(Vec::new()),
        });
        let s = sh.clone();
        std::thread::Builder::new()
            .name("impair-accept".into())
            .spawn(move || accept(l, to, s))?;
        Ok(ImpairedLink { addr, sh })
    }
}

impl Drop for ImpairedLink {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Release);
        self.sh.close_all();
    }
}

fn accept(l: TcpListener, to: String, sh: Arc<Shared>) {
    // Each connection's jitter comes from its own seed, drawn from the link's.
    let mut seeds = SmallRng::seed_from_u64(sh.imp.seed);
    let mut cut_done = false;
    let mut id = 0u64;
    while !sh.stop.load(Ordering::Acquire) {
        if sh.cut_due() {
            if !cut_done {
                sh.close_all();
                cut_done = true;
            }
            // Refuse newcomers: accept and close at once.
            if let Ok((c, _)) = l.accept() {
                drop(c);
            }
            std::thread::sleep(POLL);
            continue;
        }
        match l.accept() {
            Ok((a, _)) => {
                let seed = seeds.next_u64();
                id += 1;
                let _ = a.set_nonblocking(false);
                // Connected off this thread: a target that does not answer must not hold up
                // the next connection, nor a cut.
                let (to, sh, seed, id) = (to.clone(), sh.clone(), seed, id);
                let spawned = std::thread::Builder::new()
                    .name("impair-connect".into())
                    .spawn(move || {
                        let b = to
                            .to_socket_addrs()
                            .and_then(|mut a| a.next().ok_or_else(|| std::io::Error::other("no address")))
                            .and_then(|sa| TcpStream::connect_timeout(&sa, CONNECT));
                        match b {
                            Ok(b) => {
                                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                                if let Err(e) = relay(id, a, b, &sh, seed) {
                                    tracing::warn!(error = %e, "impair: a connection could not be relayed");
                                    sh.forget(id);
                                }
                            }
                            Err(e) => tracing::warn!(%to, error = %e, "impair: cannot reach the target"),
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "impair: a connection was dropped");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Two directions, each a reader that stamps chunks with their delivery time and a writer
/// that delivers them then.
fn relay(id: u64, a: TcpStream, b: TcpStream, sh: &Arc<Shared>, seed: u64) -> std::io::Result<()> {
    {
        let mut socks = sh.socks.lock().unwrap_or_else(|e| e.into_inner());
        if sh.halted() {
            return Ok(());
        }
        socks.push((id, [a.try_clone()?, b.try_clone()?]));
    }
    // The last of the two writers to end forgets the connection.
    let ended = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let mut seeds = SmallRng::seed_from_u64(seed);
    for (from, to) in [(a.try_clone()?, b.try_clone()?), (b, a)] {
        let ended = ended.clone();
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
        let (s1, s2) = (sh.clone(), sh.clone());
        let mut rng = Jitter(SmallRng::from_rng(&mut seeds));
        let mut from = from;
        let _ = from.set_read_timeout(Some(POLL));
        std::thread::Builder::new().name("impair-read".into()).spawn(move || {
            let mut last = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            while !s1.halted() {
                // A stalled link takes nothing in either: the sender's queue fills.
                if let Some(until) = s1.stalled_until(Instant::now()) {
                    std::thread::sleep((until - Instant::now()).min(POLL));
                    continue;
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let due = (Instant::now() + rng.delay(&s1.imp)).max(last);
                        last = due;
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        })?;
        std::thread::Builder::new().name("impair-write".into()).spawn(move || {
            deliver(rx, to, &s2);
            if ended.fetch_add(1, Ordering::AcqRel) == 1 {
                s2.forget(id);
            }
        })?;
    }
    Ok(())
}

fn deliver(rx: Receiver<(Instant, Vec<u8>)>, mut to: TcpStream, sh: &Shared) {
    loop {
        let (due, bytes) = match rx.recv_timeout(POLL) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) if !sh.halted() => continue,
            // The reader ended (EOF or a cut): pass the end on once the backlog is out.
            _ => {
                if !sh.halted() {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
        };
        loop {
            if sh.halted() {
                return;
            }
            let now = Instant::now();
            let until = sh.stalled_until(now).unwrap_or(due).max(due);
            if now >= until {
                break;
            }
            std::thread::sleep((until - now).min(POLL));
        }
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
}

/// Jitter draws, reproducible from the seed.
struct Jitter(SmallRng);

impl Jitter {
    fn delay(&mut self, imp: &Impairment) -> Duration {
        let j = imp.jitter.as_nanos() as i128;
        let d = imp.latency.as_nanos() as i128 + if j > 0 { self.0.random_range(-j..=j) } else { 0 };
        Duration::from_nanos(d.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; its address.
    fn echo() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut c);
                });
            }
        });
        addr
    }

    fn round_trip(c: &mut TcpStream, n: usize) -> Duration {
        let t = Instant::now();
        c.write_all(&vec![7u8; n]).unwrap();
        let mut got = vec![0u8; n];
        c.read_exact(&mut got).unwrap();
        t.elapsed()
    }

    #[test]
    fn latency_is_added_each_way() {
        let imp = Impairment {
            latency: Duration::from_millis(40),
            ..Default::default()
        };
        let link = ImpairedLink::start("127.0.0.1:0", echo(), imp).unwrap();
        let mut c = TcpStream::connect(&link.addr).unwrap();
        let rtt = round_trip(&mut c, 100);
        assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
        assert!(rtt < Duration::from_millis(400), "{rtt:?}");
    }

    #[test]
    fn jitter_varies_the_delay_but_never_reorders() {
        let imp = Impairment {
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            seed: 3,
            ..Default::default()
        };
        let link = ImpairedLink::start("127.0.0.1:0", echo(), imp).unwrap();
        let mut c = TcpStream::connect(&link.addr).unwrap();
        let mut w = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..2000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let mut b = [0u8; 4];
        for i in 0..2000u32 {
            c.read_exact(&mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), i, "in order");
        }
        sender.join().unwrap();
        let mut r = Jitter(SmallRng::seed_from_u64(9));
        let ds: Vec<Duration> = (0..1000).map(|_| r.delay(&imp)).collect();
        assert!(ds.iter().all(|d| *d <= Duration::from_millis(10)));
        assert!(ds.iter().any(|d| *d < Duration::from_millis(2)) && ds.iter().any(|d| *d > Duration::from_millis(8)));
    }

    #[test]
    fn a_stall_holds_everything_then_lets_it_through() {
        let imp = Impairment {
            stall: Some((Duration::ZERO, Duration::from_millis(300))),
            ..Default::default()
        };
        let link = ImpairedLink::start("127.0.0.1:0", echo(), imp).unwrap();
        let mut c = TcpStream::connect(&link.addr).unwrap();
        let rtt = round_trip(&mut c, 10);
        assert!(rtt >= Duration::from_millis(250), "{rtt:?}");
        assert!(round_trip(&mut c, 10) < Duration::from_millis(200), "after the stall");
    }

    #[test]
    fn a_closed_connection_is_forgotten() {
        let link = ImpairedLink::start("127.0.0.1:0", echo(), Impairment::default()).unwrap();
        for _ in 0..20 {
            let mut c = TcpStream::connect(&link.addr).unwrap();
            round_trip(&mut c, 10);
        }
        let t = Instant::now();
        while !link.sh.socks.lock().unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "sockets kept after their connections closed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_cut_closes_every_connection_and_refuses_new_ones() {
        let imp = Impairment {
            cut: Some(Duration::from_millis(200)),
            ..Default::default()
        };
        let link = ImpairedLink::start("127.0.0.1:0", echo(), imp).unwrap();
        let mut c = TcpStream::connect(&link.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        round_trip(&mut c, 10);
        std::thread::sleep(Duration::from_millis(300));
        let _ = c.write_all(b"x");
        let mut b = [0u8; 1];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)), "closed");
        let mut n = TcpStream::connect(&link.addr).unwrap();
        n.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = n.write_all(b"x");
        assert!(matches!(n.read(&mut b), Ok(0) | Err(_)), "refused");
    }
}
