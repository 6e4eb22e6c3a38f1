//! How the bytes of a migration travel (`docs/transport.md`): plain TCP (the default, as in
//! QEMU), TLS 1.3 with mutual authentication on every connection, or a pre-shared key that
//! puts an HMAC on every frame.
//!
//! The engines see one type, [`Conn`], whatever the transport: a TCP stream, or a TLS session
//! over one that the connection's threads share (`session.rs`). Timeouts, `shutdown` (which a
//! cancel relies on) and clones for a reader and a writer work the same on both.

pub mod psk;
mod session;
pub mod throwaway;
pub mod tls;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub use psk::Psk;
pub use tls::TlsCreds;

/// The transport of a migration; both sides must use the same.
#[derive(Clone, Default)]
pub enum Security {
    /// Plain TCP: frames carry a CRC32C under the session key, which catches accidents, not
    /// intent.
    #[default]
    Plain,
    /// TLS 1.3, both sides authenticated by certificates of one CA.
    Tls(Arc<TlsCreds>),
    /// An HMAC-SHA256 on every frame, with keys derived from a pre-shared key and both
    /// sides' nonces.
    Psk(Arc<Psk>),
}

impl Security {
    /// `tcp`, `tls` or `psk`: what `livemig.transport` reports.
    pub fn name(&self) -> &'static str {
        match self {
            Security::Plain => "tcp",
            Security::Tls(_) => "tls",
            Security::Psk(_) => "psk",
        }
    }
    pub fn psk(&self) -> Option<&Arc<Psk>> {
        match self {
            Security::Psk(p) => Some(p),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

enum Inner {
    Tcp(TcpStream),
    Tls(Arc<session::Tls>),
}

/// One connection of a migration, whatever its transport.
pub struct Conn {
    inner: Inner,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Tcp(s) => write!(f, "Conn::Tcp({s:?})"),
            Inner::Tls(t) => write!(f, "Conn::Tls({:?})", t.tcp()),
        }
    }
}

impl Conn {
    pub fn tcp(s: TcpStream) -> Conn {
        Conn { inner: Inner::Tcp(s) }
    }

    fn socket(&self) -> &TcpStream {
        match &self.inner {
            Inner::Tcp(s) => s,
            Inner::Tls(t) => t.tcp(),
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(Conn {
            inner: match &self.inner {
                Inner::Tcp(s) => Inner::Tcp(s.try_clone()?),
                Inner::Tls(t) => Inner::Tls(t.clone()),
            },
        })
    }

    /// Shuts the connection down; TLS says `close_notify` first when it can.
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match &self.inner {
            Inner::Tcp(s) => s.shutdown(how),
            Inner::Tls(t) => t.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.socket().set_read_timeout(d)
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.socket().set_write_timeout(d)
    }

    /// Whether the connection authenticates every byte itself (TLS), so frames need no CRC.
    pub fn authenticated(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// Why the TLS session failed, if it did (an alert from the peer, a bad record).
    pub fn transport_error(&self) -> Option<String> {
        match &self.inner {
            Inner::Tcp(_) => None,
            Inner::Tls(t) => t.error(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Tcp(s) => s.read(buf),
            Inner::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Tcp(s) => s.write(buf),
            Inner::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Tcp(s) => s.flush(),
            Inner::Tls(_) => Ok(()),
        }
    }
}

/// Reads a small regular file named by option `what`: a FIFO, a device or a huge file is
/// refused rather than read (it could block, or fill memory).
pub(crate) fn read_small(path: &std::path::Path, what: &str, max: u64) -> Result<Vec<u8>, String> {
    let named = || format!("{what} {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", named()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", named()));
    }
    if meta.len() > max {
        return Err(format!(
            "{}: {} bytes, more than the {max} bytes allowed",
            named(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", named()))
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too): the name a destination's certificate
/// must carry.
pub fn host_of(to: &str) -> &str {
    let h = to.rsplit_once(':').map_or(to, |(h, _)| h);
    h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h)
}

/// Bytes a TLS handshake record starts with (content type 22, version 3.x).
fn looks_like_tls(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0x16 && b[1] == 0x03
}

fn tls_conn(tcp: TcpStream, session: rustls::Connection) -> Conn {
    Conn {
        inner: Inner::Tls(Arc::new(session::Tls::new(tcp, session))),
    }
}

/// The source's side of a new connection to `host` over `tcp`, with the handshake done.
pub fn client(tcp: TcpStream, host: &str, sec: &Security, timeout: Duration) -> Result<Conn, String> {
    let _ = tcp.set_nodelay(true);
    match sec {
        Security::Tls(creds) => {
            let session = creds.client_handshake(&tcp, host, timeout)?;
            Ok(tls_conn(tcp, session))
        }
        _ => Ok(Conn::tcp(tcp)),
    }
}

/// The destination's side of a connection it accepted, with the handshake done. A client
/// of the other kind (plain against TLS, or TLS against plain) is told so where it can be.
pub fn server(tcp: TcpStream, sec: &Security, timeout: Duration) -> Result<Conn, String> {
    let _ = tcp.set_nodelay(true);
    match sec {
        Security::Tls(creds) => {
            let session = creds.server_handshake(&tcp, timeout)?;
            Ok(tls_conn(tcp, session))
        }
        _ => {
            let mut first = [0u8; 2];
            tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            if matches!(tcp.peek(&mut first), Ok(2)) && looks_like_tls(&first) {
                refuse_tls(&tcp);
                return Err(
                    "the source speaks TLS; this destination was started without TLS credentials \
                            (--tls-cert, --tls-key, --tls-ca)"
                        .into(),
                );
            }
            Ok(Conn::tcp(tcp))
        }
    }
}

/// Answers a TLS ClientHello in livemig framing, which the source recognises as a plain
/// destination. Its hello is read first: closing with it unread would reset the connection
/// and could discard the answer.
fn refuse_tls(tcp: &TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = (&mut &*tcp).read(&mut sink);
    let mut w = crate::frame::FrameWriter::new(tcp);
    let _ = w.send(
        crate::frame::Kind::Error,
        &crate::msg::encode_str("this destination speaks plain TCP (started without --tls-cert, --tls-key, --tls-ca)"),
    );
    let _ = tcp.shutdown(Shutdown::Write);
}
