//! Connection senders: one thread per connection reads guest pages, encodes runs and writes
//! frames, so harvesting, encoding and socket writes of different channels overlap.

use crate::frame::{FrameWriter, Kind};
use crate::msg::MAX_RUN_PAGES;
use crate::pages::{PageStats, RunEncoder};
use crate::transport::psk::MacKey;
use crate::transport::Conn;
use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;
use vmm::PageBitmap;

/// Pages are split between page channels by 2 MiB stripes of guest-physical address.
pub const STRIPE_PAGES: u64 = 512;

pub enum Job {
    /// `pages` pages at `gpa`, at most [`MAX_RUN_PAGES`], within one stripe.
    Run {
        gpa: u64,
        pages: u32,
    },
    Frame(Kind, Vec<u8>),
    /// Flush the socket, then answer.
    Flush(SyncSender<()>),
}

/// What every sender of one migration shares.
pub struct Shared {
    pub mem: Arc<GuestMemoryMmap>,
    pub stats: Arc<PageStats>,
    pub compress: bool,
    /// QEMU's `max-bandwidth`: wire bytes per second over all connections.
    pub limit: Option<Limiter>,
    /// Set when the migration is cancelled or aborted: senders stop at once, even in the
    /// middle of sleeping off the bandwidth cap.
    pub stop: Arc<AtomicBool>,
    /// Set when the migration is being abandoned: queued page runs are skipped, so a last
    /// frame (the reason) goes out without waiting behind them.
    pub drain: Arc<AtomicBool>,
}

/// A token bucket over all connections; a sender that overdraws it sleeps the debt off.
pub struct Limiter {
    bytes_per_s: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: bytes_per_s.max(1) as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Accounts `n` bytes just written, sleeping while the bucket is in debt; gives up (false)
    /// as soon as `stop` is set.
    pub fn take(&self, n: u64, stop: &AtomicBool) -> bool {
        let wait = {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Up to 100 ms of unused allowance carries over (a burst).
            g.0 = (g.0 + now.duration_since(g.1).as_secs_f64() * self.bytes_per_s).min(self.bytes_per_s / 10.0);
            g.1 = now;
            g.0 -= n as f64;
            if g.0 < 0.0 {
                Duration::from_secs_f64(-g.0 / self.bytes_per_s)
            } else {
                Duration::ZERO
            }
        };
        let end = Instant::now() + wait;
        loop {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(10)));
        }
    }
}

pub struct Sender {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Sender {
    /// A sender for a connection on which `seq` frames were already sent, keyed with the
    /// session `key` (and a pre-shared key's `mac`).
    pub fn spawn_after(
        name: String,
        stream: Conn,
        shared: Arc<Shared>,
        seq: u64,
        key: u64,
        mac: Option<MacKey>,
    ) -> Self {
        let (tx, rx) = sync_channel::<Job>(1024);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(rx, stream, &shared, seq, key, mac))
            .ok();
        Self { tx: Some(tx), thread }
    }

    /// Queues a job; fails if the connection's thread has stopped.
    pub fn send(&mut self, job: Job) -> Result<(), String> {
        match &self.tx {
            Some(tx) if tx.send(job).is_ok() => Ok(()),
            _ => Err(self.finish().err().unwrap_or_else(|| "connection closed".into())),
        }
    }

    /// Waits until everything queued so far is on the socket.
    pub fn flush(&mut self) -> Result<(), String> {
        let rx = self.start_flush()?;
        match rx.recv() {
            Ok(()) => Ok(()),
            Err(_) => Err(self.finish().err().unwrap_or_else(|| "connection closed".into())),
        }
    }

    /// Asks for a flush; the receiver answers once everything queued so far is on the
    /// socket, and disconnects if the connection failed first (then [`Self::finish`] says why).
    pub fn start_flush(&mut self) -> Result<Receiver<()>, String> {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Flush(tx))?;
        Ok(rx)
    }

    /// Stops the thread and returns its outcome.
    pub fn finish(&mut self) -> Result<(), String> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err("sender thread panicked".into())),
            None => Err("connection closed".into()),
        }
    }
}

fn run(rx: Receiver<Job>, stream: Conn, sh: &Shared, seq: u64, key: u64, mac: Option<MacKey>) -> Result<(), String> {
    let (mem, stats) = (&*sh.mem, &*sh.stats);
    let tls = stream.authenticated();
    let mut w = FrameWriter::with_seq(BufWriter::with_capacity(1 << 20, stream), seq).with_key(key);
    w.set_mac(mac);
    if tls {
        w.trust_transport();
    }
    let mut enc = RunEncoder::new(sh.compress);
    let mut counted = 0u64;
    let err = |e: std::io::Error| e.to_string();
    while let Ok(job) = rx.recv() {
        match job {
            Job::Run { .. } if sh.drain.load(Ordering::Acquire) => {}
            Job::Run { gpa, pages } => enc
                .encode(mem, gpa, pages, stats, |p| w.send(Kind::Pages, p))
                .map_err(err)?,
            Job::Frame(k, p) => w.send(k, &p).map_err(err)?,
            Job::Flush(ack) => {
                w.flush().map_err(err)?;
                let _ = ack.send(());
            }
        }
        let n = w.bytes() - counted;
        stats.wire_bytes.fetch_add(n, Ordering::Relaxed);
        counted = w.bytes();
        if let Some(l) = &sh.limit {
            // Under a cap, bytes go to the wire before their time is slept off: the
            // destination sees a slow stream, never a silent one.
            w.flush().map_err(err)?;
            if !l.take(n, &sh.stop) {
                return Err("stopped".into());
            }
        }
        if sh.stop.load(Ordering::Acquire) {
            return Err("stopped".into());
        }
    }
    w.flush().map_err(err)
}

/// Splits the set pages of `bm` into runs (contiguous, at most [`MAX_RUN_PAGES`], never
/// crossing a stripe) and calls `f(channel_stripe_index, gpa, pages)`.
pub fn runs(bm: &PageBitmap, mut f: impl FnMut(u64, u64, u32)) {
    let mut start = None::<(u64, u64)>; // (first pfn, count)
    let flush = |s: Option<(u64, u64)>, f: &mut dyn FnMut(u64, u64, u32)| {
        if let Some((p, n)) = s {
            f(p / STRIPE_PAGES, p * 4096, n as u32);
        }
    };
    for pfn in bm.iter() {
        start = match start {
            Some((p, n)) if p + n == pfn && n < MAX_RUN_PAGES as u64 && pfn % STRIPE_PAGES != 0 => Some((p, n + 1)),
            s => {
                flush(s, &mut f);
                Some((pfn, 1))
            }
        };
    }
    flush(start, &mut f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_length_and_stripes() {
        let mut bm = PageBitmap::new(4096);
        for p in 500..700 {
            bm.set(p);
        }
        bm.set(1000);
        let mut got = Vec::new();
        runs(&bm, |s, g, n| got.push((s, g / 4096, n)));
        assert_eq!(
            got,
            vec![(0, 500, 12), (1, 512, 64), (1, 576, 64), (1, 640, 60), (1, 1000, 1)]
        );
    }
}
