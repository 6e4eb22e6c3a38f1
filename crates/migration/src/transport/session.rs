//! A TLS session shared by the threads of one connection. The engines read a connection on
//! one thread and write it on another (a sender and the return path share the control
//! connection), and a rustls session is one object: so it sits behind a lock that is never
//! held across a blocking socket call.
//!
//! * A reader reads ciphertext from the socket into a buffer of its own with no lock on the
//!   session, then takes the lock to feed it in and take plaintext out. Ciphertext read but
//!   not yet fed stays in the shared state, so a reader that is dropped loses nothing.
//! * A writer takes the write lock for the whole write. It seals its plaintext into records
//!   under the session lock and hands them to the socket from the session's own buffers
//!   (no copy), but only as much as the socket takes at once: when it is full, the writer
//!   lets go of the session and waits for room. Records leave in the order they were sealed,
//!   whatever the number of writers.
//!
//! Why and what it saves: `docs/transport.md`, "One session, several threads". Lock order:
//! reader buffer, then write lock, then session. Timeouts, `shutdown` and
//! clones act on the socket, as for plain TCP. The first session error is kept for
//! [`super::Conn::transport_error`].

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{SendAncillaryBuffer, SendFlags};
use rustls::Connection;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Ciphertext read at once.
const READ: usize = 256 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Rx {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

pub(super) struct Tls {
    tcp: TcpStream,
    session: Mutex<Connection>,
    rx: Mutex<Rx>,
    /// The write lock.
    tx: Mutex<()>,
    error: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl Tls {
    /// The connection after its handshake.
    pub(super) fn new(tcp: TcpStream, mut session: Connection) -> Tls {
        // Back-pressure is the socket's: each write is sealed and sent before the next, so
        // the session need not refuse plaintext.
        session.set_buffer_limit(None);
        Tls {
            tcp,
            session: Mutex::new(session),
            rx: Mutex::new(Rx {
                buf: vec![0; READ],
                pos: 0,
                end: 0,
            }),
            tx: Mutex::new(()),
            error: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub(super) fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// Keeps the session's error, sends the alert that says why if the socket is free, and
    /// turns it into an I/O error.
    fn fail(&self, e: rustls::Error) -> std::io::Error {
        let why = e.to_string();
        lock(&self.error).get_or_insert(why.clone());
        if let Ok(_tx) = self.tx.try_lock() {
            let _ = self.drain(Some(Duration::from_millis(100)));
        }
        std::io::Error::new(ErrorKind::InvalidData, why)
    }

    /// Sends everything the session has sealed. The caller holds the write lock. The session
    /// is locked only while the socket takes bytes without blocking; waiting for room, the
    /// other threads may use it. `limit` bounds each wait (default: the socket's write
    /// timeout, as a blocking write would).
    fn drain(&self, limit: Option<Duration>) -> std::io::Result<()> {
        let limit = match limit {
            Some(l) => Some(l),
            None => self.tcp.write_timeout()?,
        };
        loop {
            {
                let mut s = lock(&self.session);
                if !s.wants_write() {
                    return Ok(());
                }
                match s.write_tls(&mut NoWait(&self.tcp)) {
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            wait_writable(&self.tcp, limit)?;
        }
    }

    pub(super) fn read(&self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            let mut s = lock(&self.session);
            loop {
                // Also decrypts what the handshake read past its end.
                if let Err(e) = s.process_new_packets() {
                    drop(s);
                    return Err(self.fail(e));
                }
                if rx.pos == rx.end {
                    break;
                }
                let Rx { buf, pos, end } = &mut *rx;
                match s.read_tls(&mut &buf[*pos..*end]) {
                    Ok(0) => break, // the peer's close_notify came: no more
                    Ok(n) => *pos += n,
                    Err(_) => break, // its plaintext buffer is full: deliver that first
                }
            }
            let wants_write = s.wants_write();
            let r = s.reader().read(out);
            drop(s);
            if wants_write {
                // What the session queued by itself (a key update's answer).
                let _tx = lock(&self.tx);
                self.drain(None)?;
            }
            match r {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Data, a clean close (0), or a close without close_notify (UnexpectedEof).
                r => return r,
            }
            let n = (&self.tcp).read(&mut rx.buf)?;
            (rx.pos, rx.end) = (0, n);
            if n == 0 {
                let mut s = lock(&self.session);
                let _ = s.read_tls(&mut &[][..]);
                if let Err(e) = s.process_new_packets() {
                    drop(s);
                    return Err(self.fail(e));
                }
                return match s.reader().read(out) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => Err(ErrorKind::UnexpectedEof.into()),
                    r => r,
                };
            }
        }
    }

    pub(super) fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        let _tx = lock(&self.tx);
        let n = lock(&self.session).writer().write(buf)?;
        self.drain(None)?;
        Ok(n)
    }

    /// Sends `close_notify` once, unless a writer holds the socket (then the peer sees the
    /// connection end without it, as after a cut).
    fn close_notify(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(_tx) = self.tx.try_lock() {
            lock(&self.session).send_close_notify();
            let _ = self.drain(Some(Duration::from_millis(100)));
        }
    }

    pub(super) fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        if how != Shutdown::Read {
            self.close_notify();
        }
        self.tcp.shutdown(how)
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        // The last handle is gone: end the session properly, without waiting long on a peer
        // that does not read.
        self.close_notify();
    }
}

/// The socket written without blocking: as much as it takes now, several records per call.
struct NoWait<'a>(&'a TcpStream);

impl Write for NoWait<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        loop {
            match rustix::net::sendmsg(self.0, bufs, &mut SendAncillaryBuffer::default(), flags) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.map_err(std::io::Error::from),
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until the socket takes more bytes; `TimedOut` after `limit` without room, as a
/// blocking write with that timeout would end. A shut-down or failed socket counts as
/// writable: the next send says what is wrong.
fn wait_writable(tcp: &TcpStream, limit: Option<Duration>) -> std::io::Result<()> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Err(ErrorKind::TimedOut.into());
        }
        let ts = left.map(|l| Timespec {
            tv_sec: l.as_secs() as _,
            tv_nsec: l.subsec_nanos() as _,
        });
        let mut fds = [PollFd::new(tcp, PollFlags::OUT)];
        match poll(&mut fds, ts.as_ref()) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
