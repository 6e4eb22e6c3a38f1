//! Everything the source engine started for one migration (connections, senders, the
//! return path, device streams, trackers, the throttle), with the waits on the destination,
//! each bounded, and the way back to a running source.

use crate::digest;
use crate::dirty_source::DeviceDirty;
use crate::error::{MigError, WireError};
use crate::frame::Kind;
use crate::msg;
use crate::sender::{runs, Job, Sender};
use crate::throttle::Throttle;
use crate::transport::Conn;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::{PageBitmap, Vm};

/// What the return-path reader passes on.
pub(super) enum Back {
    Frame(Kind, Vec<u8>),
    Failed(WireError),
}

/// What the destination has acknowledged.
#[derive(Default)]
pub(super) struct Peer {
    /// The device's initial pre-copy data (switchover-ack).
    pub init_acked: bool,
    /// The last iteration the destination has applied completely.
    pub iter_acked: u32,
}

/// Device data sent so far: bytes, and per device the hash of the data it saved (and, for
/// the `FlipDeviceByte` sabotage only, the data itself).
pub(super) struct DeviceProgress {
    pub bytes: u64,
    pub hashes: Vec<digest::DeviceHash>,
    pub saved: Option<Vec<Vec<u8>>>,
}

impl DeviceProgress {
    pub fn hashes(&self) -> Vec<u32> {
        self.hashes.iter().map(|h| h.value()).collect()
    }

    /// Accounts one section of device `i`, as saved (before any sabotage).
    pub fn account(&mut self, i: usize, section: &[u8]) -> Result<(), MigError> {
        self.bytes += section.len() as u64;
        self.hashes[i].section(section).map_err(MigError::Other)?;
        if let Some(saved) = &mut self.saved {
            saved[i].extend(digest::device_data(section).map_err(MigError::Other)?);
        }
        Ok(())
    }
}

pub(super) struct Link {
    pub vm: Arc<Vm>,
    pub control: Conn,
    /// Every connection, the control one first, to shut down when the migration ends.
    pub sockets: Vec<Conn>,
    pub senders: Vec<Sender>,
    /// The sender of each page channel.
    pub pages: Vec<usize>,
    pub devices: vfio::vmm::Source,
    pub device_dirty: Option<DeviceDirty>,
    pub throttle: Option<Throttle>,
    pub back: Receiver<Back>,
    pub peer: Peer,
    /// The longest any wait on the destination lasts.
    pub timeout: Duration,
    /// Stops the senders (shared with them).
    pub stop: Arc<AtomicBool>,
    /// Makes the senders skip queued page runs (shared with them).
    pub drain: Arc<AtomicBool>,
    /// A frame that arrived while a flush was still waiting, kept for the wait that follows.
    pub early: Option<(Kind, Vec<u8>)>,
}

impl Link {
    pub fn stop_throttle(&mut self) {
        if let Some(mut t) = self.throttle.take() {
            t.stop();
        }
    }

    /// Closes every connection (a sender blocked on a peer that stopped reading fails at
    /// once) and joins the senders.
    pub fn close(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for s in &mut self.senders {
            let _ = s.finish();
        }
    }

    /// Back to a running source: devices to RUNNING, trackers off, vCPUs resumed; then the
    /// destination is told why, if it still listens. Only before the commit: until `Commit`
    /// the destination cannot run the guest, so the guest runs here again at once.
    pub fn abort(&mut self, why: &str) {
        self.stop_throttle();
        self.devices.abort();
        if let Some(mut d) = self.device_dirty.take() {
            d.stop();
        }
        let _ = self.vm.cpu_dirty_log().set_logging(false);
        // Paused by the switchover or parked by the throttle: either way, running again.
        let _ = self.vm.resume();
        // The reason goes out ahead of any queued pages, and a stalled destination gets a
        // short while to take it.
        self.drain.store(true, Ordering::Release);
        let _ = self.control.set_write_timeout(Some(Duration::from_millis(200)));
        if let Some(s) = self.senders.first_mut() {
            if s.send(Job::Frame(Kind::Error, msg::encode_str(why))).is_ok() {
                let _ = s.flush();
            }
        }
        self.close();
    }

    /// After the commit: everything torn down but the guest, which stays paused with its
    /// devices stopped (`save_cleanup`).
    pub fn release(&mut self) {
        self.stop_throttle();
        self.close();
        self.devices.complete();
        if let Some(mut d) = self.device_dirty.take() {
            d.stop();
        }
        let _ = self.vm.cpu_dirty_log().set_logging(false);
    }

    /// Handles one return-path frame that is not what a wait is waiting for.
    fn handle(&mut self, b: Back) -> Result<(), MigError> {
        match b {
            Back::Frame(Kind::InitAck, p) => {
                msg::decode_u16(&p)?;
                self.peer.init_acked = true;
                Ok(())
            }
            Back::Frame(Kind::IterationAck, p) => {
                let n = msg::decode_u32(&p)?;
                self.peer.iter_acked = self.peer.iter_acked.max(n);
                Ok(())
            }
            Back::Frame(Kind::Error, p) => Err(MigError::Peer(msg::decode_str(&p)?)),
            Back::Frame(k, _) => Err(MigError::Wire(WireError::Unexpected {
                found: k,
                expected: "a return-path frame",
            })),
            Back::Failed(e) => Err(MigError::Wire(e)),
        }
    }

    /// Handles what arrived so far without waiting.
    pub fn check_back(&mut self) -> Result<(), MigError> {
        self.check_back_keeping(None)
    }

    /// The same, but a `keep` frame is put aside for the next [`Self::wait_for`].
    fn check_back_keeping(&mut self, keep: Option<Kind>) -> Result<(), MigError> {
        loop {
            match self.back.try_recv() {
                Ok(Back::Frame(k, p)) if Some(k) == keep && self.early.is_none() => self.early = Some((k, p)),
                Ok(b) => self.handle(b)?,
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
                Err(_) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
    }

    /// Waits for at most `d` for one return-path frame and handles it.
    pub fn poll_back(&mut self, d: Duration) -> Result<(), MigError> {
        match self.back.recv_timeout(d) {
            Ok(b) => self.handle(b),
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Err(RecvTimeoutError::Disconnected) => Err(MigError::Wire(WireError::Closed)),
        }
    }

    pub fn wait_iteration(&mut self, n: u32) -> Result<(), MigError> {
        let end = Instant::now() + self.timeout;
        while self.peer.iter_acked < n {
            match self.back.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(b) => self.handle(b)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigError::Timeout("the destination to apply an iteration"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
        Ok(())
    }

    /// Waits for a `want` frame; any other frame is handled (an `Error` ends the wait).
    pub fn wait_for(&mut self, want: Kind, what: &'static str) -> Result<Vec<u8>, MigError> {
        if let Some((k, p)) = self.early.take() {
            if k == want {
                return Ok(p);
            }
            return Err(MigError::Wire(WireError::Unexpected {
                found: k,
                expected: what,
            }));
        }
        let end = Instant::now() + self.timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.back.recv_timeout(left) {
                Ok(Back::Frame(k, p)) if k == want => return Ok(p),
                Ok(b) => self.handle(b)?,
                Err(RecvTimeoutError::Timeout) => return Err(MigError::Timeout(what)),
                Err(RecvTimeoutError::Disconnected) => return Err(MigError::Wire(WireError::Closed)),
            }
        }
    }

    /// Marks the end of iteration `n` on every connection.
    pub fn end_iteration(&mut self, n: u32, dirty: u64) -> Result<(), MigError> {
        for s in &mut self.senders {
            s.send(Job::Frame(Kind::EndOfIteration, msg::encode_u32_u64(n, dirty)))
                .map_err(MigError::Send)?;
        }
        Ok(())
    }

    /// Queues the runs of `bm`, spread over the page connections.
    pub fn queue_pages(&mut self, bm: &PageBitmap) -> Result<(), MigError> {
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
        err.map_or(Ok(()), |e| Err(MigError::Send(e)))
    }

    /// Adds the pages devices wrote since the last harvest.
    pub fn harvest_device(&mut self, out: &mut PageBitmap) -> Result<(), MigError> {
        match &mut self.device_dirty {
            Some(d) => d.harvest(out),
            None => Ok(()),
        }
    }

    /// Sends device sections on the control connection, counting their bytes and extending
    /// each device's hash of the data it sent. `wire` may alter what goes on the wire after
    /// the hash was taken (the sabotage of a test).
    pub fn send_sections(
        &mut self,
        sections: &[vfio::vmm::Section],
        dev: &mut DeviceProgress,
        wire: impl Fn(&mut Vec<u8>),
    ) -> Result<(), MigError> {
        for (i, b) in sections {
            dev.account(*i, b)?;
            let mut p = msg::encode_device_data(*i as u16, b);
            wire(&mut p);
            self.control_frame(Kind::DeviceData, p)?;
        }
        Ok(())
    }

    pub fn control_frame(&mut self, k: Kind, p: Vec<u8>) -> Result<(), MigError> {
        self.senders[0].send(Job::Frame(k, p)).map_err(MigError::Send)
    }

    /// `Complete` on every page connection, then on the control connection.
    pub fn complete_all(&mut self) -> Result<(), MigError> {
        for k in 1..self.senders.len() {
            self.senders[k]
                .send(Job::Frame(Kind::Complete, Vec::new()))
                .map_err(MigError::Send)?;
        }
        self.control_frame(Kind::Complete, Vec::new())
    }

    pub fn flush_all(&mut self) -> Result<(), MigError> {
        self.flush_all_with(None, &mut || {})
    }

    /// Flushes the stream whose answer (`reply`) may overtake the flush's own confirmation.
    pub fn flush_expecting(&mut self, reply: Kind) -> Result<(), MigError> {
        self.flush_all_with(Some(reply), &mut || {})
    }

    /// Waits until everything queued is on the sockets, however long a bandwidth cap makes
    /// that; meanwhile it watches the return path (a destination that gave up says so there;
    /// a `reply` frame is kept for the next wait) and calls `tick` every 100 ms.
    pub fn flush_all_with(&mut self, reply: Option<Kind>, tick: &mut dyn FnMut()) -> Result<(), MigError> {
        let mut waits = Vec::new();
        for (i, s) in self.senders.iter_mut().enumerate() {
            waits.push((i, s.start_flush().map_err(MigError::Send)?));
        }
        let mut last = Instant::now();
        for (i, rx) in waits {
            loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(()) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        self.check_back_keeping(reply)?;
                        if last.elapsed() >= Duration::from_millis(100) {
                            tick();
                            last = Instant::now();
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let why = self.senders[i]
                            .finish()
                            .err()
                            .unwrap_or_else(|| "connection closed".into());
                        // The destination's own account, if it gave one, says more.
                        self.check_back_keeping(reply)?;
                        return Err(MigError::Send(why));
                    }
                }
            }
        }
        Ok(())
    }
}
