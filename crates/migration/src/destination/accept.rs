//! Waiting for the source. Whatever else connects first (a port scanner, a stray client, a
//! source of another protocol version or transport, a TLS client the CA did not sign) is
//! logged and closed, and the destination keeps waiting: only a connection that passes the
//! transport's handshake and opens with this version's control `Hello` starts the migration.
//! Each connection does that in its own thread, so a silent one holds up no one.

use super::{io, DestOptions};
use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, FrameWriter, Kind};
use crate::msg::{self, Hello, Role, CAP_PSK, VERSION};
use crate::transport::{self, Conn};
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// Connections whose first frame is awaited at once; more are closed at once.
const MAX_PENDING: usize = 16;
/// How long a new connection has to send its `Hello` (a source sends it at once).
const FIRST_FRAME: Duration = Duration::from_secs(5);

/// The connection the migration runs on.
pub(super) struct Opened {
    pub control: Conn,
    pub reader: FrameReader<BufReader<Conn>>,
    pub hello: Hello,
    /// The `Hello` as it was on the wire (a pre-shared key's session keys cover it).
    pub hello_bytes: Vec<u8>,
    pub peer: SocketAddr,
}

/// Runs the transport's handshake, then reads and checks the first frame of a new connection.
fn first_frame(tcp: TcpStream, opts: &DestOptions) -> Result<Opened, String> {
    let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
    let first = FIRST_FRAME.min(opts.peer_timeout);
    let s = transport::server(tcp, &opts.security, first)?;
    s.set_read_timeout(Some(first)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(opts.peer_timeout))
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(BufReader::with_capacity(
        1 << 20,
        s.try_clone().map_err(|e| e.to_string())?,
    ));
    let refuse = |why: String| {
        // Tell it why if it speaks frames at all, then close.
        if let Ok(c) = s.try_clone() {
            let mut w = FrameWriter::new(c);
            let _ = w.send(Kind::Error, &msg::encode_str(&why));
        }
        let _ = s.shutdown(Shutdown::Both);
        why
    };
    let f = reader.expect().map_err(|e| {
        refuse(match s.transport_error() {
            Some(t) => format!("{e}: TLS: {t}"),
            None => e.to_string(),
        })
    })?;
    if f.kind != Kind::Hello {
        return Err(refuse(format!("opened with {:?}, not Hello", f.kind)));
    }
    let hello = Hello::decode(&f.payload).map_err(|e| refuse(e.to_string()))?;
    if hello.version != VERSION {
        return Err(refuse(WireError::Version(hello.version, VERSION).to_string()));
    }
    if hello.role != Role::Control {
        return Err(refuse("a page connection before any control connection".into()));
    }
    match (opts.security.psk().is_some(), hello.caps & CAP_PSK != 0) {
        (true, false) => return Err(refuse("this destination requires a pre-shared key (--psk-file)".into())),
        (false, true) => {
            return Err(refuse(
                "this destination has no pre-shared key; start it with the same --psk-file".into(),
            ))
        }
        _ => {}
    }
    s.set_read_timeout(Some(opts.peer_timeout)).map_err(|e| e.to_string())?;
    Ok(Opened {
        control: s,
        reader,
        hello,
        hello_bytes: f.payload,
        peer,
    })
}

/// Waits, as long as it takes, for a connection that opens a migration.
pub(super) fn wait_for_source(listener: &TcpListener, opts: &DestOptions) -> Result<Opened, MigError> {
    listener.set_nonblocking(true).map_err(io)?;
    let (tx, rx) = channel::<(SocketAddr, Result<Opened, String>)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let res = loop {
        match rx.try_recv() {
            Ok((_, Ok(o))) => break Ok(o),
            Ok((peer, Err(why))) => tracing::warn!(%peer, %why, "ignored a connection"),
            Err(TryRecvError::Empty) => {}
            // This loop holds a sender: the channel cannot disconnect.
            Err(TryRecvError::Disconnected) => {}
        }
        match listener.accept() {
            Ok((s, peer)) => {
                if pending.load(Ordering::Acquire) >= MAX_PENDING {
                    tracing::warn!(%peer, "ignored a connection: too many connections opening at once");
                    continue;
                }
                let _ = s.set_nonblocking(false);
                pending.fetch_add(1, Ordering::AcqRel);
                let (tx, opts, p2) = (tx.clone(), opts.clone(), pending.clone());
                let spawned = std::thread::Builder::new().name("mig-accept".into()).spawn(move || {
                    let _ = tx.send((peer, first_frame(s, &opts)));
                    p2.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                // Out of descriptors and the like: wait, do not give up the VM to come.
                tracing::warn!(error = %e, "accept failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let _ = listener.set_nonblocking(false);
    res
}
