//! The control socket's plumbing, built so that nothing a client does can take the VM down:
//!
//! * the path is claimed with a lock file beside it (`PATH.lock`, `flock`), so a second VM
//!   on the same path is refused instead of stealing the socket; an existing file at the path
//!   is removed only if it is a socket nobody listens on, and only our own socket is removed
//!   on exit;
//! * connections are bounded ([`MAX_CLIENTS`]); one more is told so and closed;
//! * an `accept` error (out of file descriptors, or anything else) is logged and backed off,
//!   never fatal;
//! * each client has its own thread, a read timeout (an idle client is closed after
//!   [`IDLE`]) and a write timeout, so a client that never reads blocks no one.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Control connections served at once.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is disconnected.
pub const IDLE: Duration = Duration::from_secs(60);
/// The longest a reply waits for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The claimed path: the lock, and the identity of the socket we bound.
pub struct ControlSocket {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    ino: (u64, u64),
    listener: UnixListener,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl ControlSocket {
    /// Claims `path` and listens on it.
    pub fn bind(path: &Path) -> Result<Self> {
        let lock_path = lock_path(path);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening the lock file {}", lock_path.display()))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => bail!(
                "another livemig VM owns the control socket {} (its lock {} is held); pick another --control path",
                path.display(),
                lock_path.display()
            ),
            Err(e) => bail!("locking {}: {e}", lock_path.display()),
        }
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; not touching it (pick another --control path)",
                    path.display()
                );
            }
            match UnixStream::connect(path) {
                Ok(_) => bail!(
                    "something already listens on {}; refusing to take it over",
                    path.display()
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    // A socket file nobody listens on, and we hold the path's lock: stale.
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing the stale socket {}", path.display()))?;
                }
                Err(e) => bail!("{} exists and cannot be checked ({e}); not touching it", path.display()),
            }
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
            ino: (m.dev(), m.ino()),
            listener,
        })
    }

    /// Accepts clients until `stop`, each served by `serve(request line) -> reply line` in its
    /// own thread.
    pub fn serve(&self, stop: &AtomicBool, serve: Arc<dyn Fn(&str) -> String + Send + Sync>) {
        let clients = Arc::new(AtomicUsize::new(0));
        let mut backoff = Duration::from_millis(20);
        while !stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((s, _)) => {
                    backoff = Duration::from_millis(20);
                    if clients.load(Ordering::Acquire) >= MAX_CLIENTS {
                        refuse(s);
                        continue;
                    }
                    clients.fetch_add(1, Ordering::AcqRel);
                    let (c, f) = (clients.clone(), serve.clone());
                    let spawned = std::thread::Builder::new().name("ctl-client".into()).spawn(move || {
                        client(s, &*f);
                        c.fetch_sub(1, Ordering::AcqRel);
                    });
                    if spawned.is_err() {
                        clients.fetch_sub(1, Ordering::AcqRel);
                        eout!("control socket: cannot start a client thread; connection dropped");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ...: the VM must not go down for it.
                    eout!(
                        "control socket: accept failed ({e}); retrying in {} ms",
                        backoff.as_millis()
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only our own socket: if the path was replaced meanwhile, it is someone else's.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

fn refuse(mut s: UnixStream) {
    let _ = s.set_nonblocking(true);
    let _ = writeln!(
        s,
        "{}",
        serde_json::json!({"error": {"class": "GenericError",
            "desc": format!("too many control connections (at most {MAX_CLIENTS}); close one and retry")}})
    );
}

fn client(s: UnixStream, serve: &dyn Fn(&str) -> String) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IDLE));
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(mut w) = s.try_clone() else { return };
    // A line is bounded too: a client that never sends a newline cannot grow memory.
    let mut r = BufReader::new(s).take(1 << 20);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        r.set_limit(1 << 20);
        if line.trim().is_empty() {
            continue;
        }
        if writeln!(w, "{}", serve(&line)).is_err() {
            return;
        }
    }
}
