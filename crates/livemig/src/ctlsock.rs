//! The control socket's plumbing, built so that nothing a client does can take the VM down:
//!
//! * the path is claimed with a lock file beside it (`PATH.lock`, `flock`), so a second VM
//!   on the same path is refused instead of stealing the socket; an existing file at the path
//!   is removed only if it is a socket nobody listens on, and only our own socket is removed
//!   on exit;
//! * connections are bounded ([`MAX_CLIENTS`]): one more evicts the client that has sent
//!   nothing for the longest (it is told why), so the socket always serves a newcomer;
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Control connections served at once: room for a hundred management clients polling at
/// once (`tests/concurrency.rs`), each with its own thread.
pub const MAX_CLIENTS: usize = 128;
/// A client that sends nothing for this long is disconnected.
pub const IDLE: Duration = Duration::from_secs(60);
/// The longest a reply waits for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line.
const MAX_LINE: u64 = 1 << 20;

fn lock(c: &Mutex<Clients>) -> std::sync::MutexGuard<'_, Clients> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// The clients being served: for each, a handle on its socket, when it connected and when
/// it last asked for something.
#[derive(Default)]
struct Clients {
    next: u64,
    live: Vec<(u64, UnixStream, Instant, Option<Instant>)>,
}

impl Clients {
    fn touch(&mut self, id: u64) {
        if let Some(c) = self.live.iter_mut().find(|c| c.0 == id) {
            c.3 = Some(Instant::now());
        }
    }
    fn remove(&mut self, id: u64) {
        self.live.retain(|c| c.0 != id);
    }
    /// Makes room by closing the client idle the longest: one that never asked for anything
    /// first (oldest first), so a flood of silent connections only displaces its own kind.
    fn evict(&mut self) {
        let key = |c: &(u64, UnixStream, Instant, Option<Instant>)| (c.3.is_some(), c.3, c.2);
        if let Some(i) = (0..self.live.len()).min_by_key(|&i| key(&self.live[i])) {
            let (_, mut s, _, _) = self.live.remove(i);
            let _ = s.set_nonblocking(true);
            let _ = writeln!(
                s,
                "{}",
                serde_json::json!({"error": {"class": "GenericError",
                    "desc": format!("closed: {MAX_CLIENTS} control connections are open and this one was idle the longest")}})
            );
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

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
        // We hold the lock from here: a refusal removes the lock file we may have created.
        let claimed = (|| -> Result<UnixListener> {
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
            Ok(listener)
        })();
        let listener = match claimed {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&lock_path);
                return Err(e);
            }
        };
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
        let clients = Arc::new(Mutex::new(Clients::default()));
        let mut backoff = Duration::from_millis(20);
        while !stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((s, _)) => {
                    backoff = Duration::from_millis(20);
                    let Ok(handle) = s.try_clone() else { continue };
                    let id = {
                        let mut c = lock(&clients);
                        if c.live.len() >= MAX_CLIENTS {
                            c.evict();
                        }
                        c.next += 1;
                        let id = c.next;
                        c.live.push((id, handle, Instant::now(), None));
                        id
                    };
                    let (c, f) = (clients.clone(), serve.clone());
                    let spawned = std::thread::Builder::new().name("ctl-client".into()).spawn(move || {
                        client(s, &*f, &|| lock(&c).touch(id));
                        lock(&c).remove(id);
                    });
                    if spawned.is_err() {
                        lock(&clients).remove(id);
                        tracing::warn!("control socket: cannot start a client thread; connection dropped");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ...: the VM must not go down for it.
                    tracing::warn!(
                        error = %e,
                        retry_ms = backoff.as_millis() as u64,
                        "control socket: accept failed; retrying"
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

fn error_line(desc: &str) -> String {
    serde_json::json!({"error": {"class": "GenericError", "desc": desc}}).to_string()
}

/// Serves one client: a request per line, a reply per request. `active` marks a request
/// (blank lines do not count).
fn client(s: UnixStream, serve: &dyn Fn(&str) -> String, active: &dyn Fn()) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IDLE));
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(mut w) = s.try_clone() else { return };
    // A line is bounded too: a client that never sends a newline cannot grow memory.
    let mut r = BufReader::new(s).take(MAX_LINE);
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        line.clear();
        r.set_limit(MAX_LINE);
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.ends_with(b"\n");
        if too_long {
            // The rest of an over-long request, already answered.
            too_long = !complete;
            continue;
        }
        let reply = if !complete && line.len() as u64 >= MAX_LINE {
            too_long = true;
            error_line(&format!("request longer than {MAX_LINE} bytes"))
        } else {
            match std::str::from_utf8(&line) {
                Ok(l) if l.trim().is_empty() => continue,
                Ok(l) => {
                    active();
                    serve(l)
                }
                Err(_) => error_line("request is not UTF-8"),
            }
        };
        if writeln!(w, "{reply}").is_err() {
            return;
        }
    }
}
