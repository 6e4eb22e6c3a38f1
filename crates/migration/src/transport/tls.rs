//! TLS credentials and handshakes, as QEMU's `tls-creds-x509` with `verify-peer`: each side
//! has a certificate and key signed by a CA both trust, each verifies the other's, TLS 1.3
//! only, AES-128-GCM preferred (AES-NI makes it the cheapest suite here), and every
//! connection authenticated by a full handshake (`docs/transport.md`).

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One side's credentials, loaded and ready for both roles.
pub struct TlsCreds {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// The name the destination's certificate must carry (QEMU's `tls-hostname`); by
    /// default the host the source connects to.
    hostname: Option<String>,
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = provider::default_provider();
    // AES-128-GCM first: with AES-NI it costs the least per byte.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// PEM files larger than this are refused unread.
const MAX_PEM: u64 = 1 << 20;

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = super::read_small(path, what, MAX_PEM)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

impl TlsCreds {
    /// Loads a certificate (chain), its private key and the CA that signs the peer's.
    pub fn load(cert: &Path, key: &Path, ca: &Path, hostname: Option<String>) -> Result<TlsCreds, String> {
        let chain = read_certs(cert, "--tls-cert")?;
        let pem = super::read_small(key, "--tls-key", MAX_PEM)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "--tls-ca")? {
            roots.add(c).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        let roots = Arc::new(roots);
        let p = crypto();
        let tls13 = [&rustls::version::TLS13];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        let mut server = ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&tls13)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        let mut client = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&tls13)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        // Every connection runs the full mutual handshake: no tickets, no resumption.
        server.send_tls13_tickets = 0;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsCreds {
            client: Arc::new(client),
            server: Arc::new(server),
            hostname,
        })
    }

    /// The source's handshake with the destination at `host`.
    pub(super) fn client_handshake(
        &self,
        tcp: &TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<Connection, String> {
        let name = self.hostname.clone().unwrap_or_else(|| host.to_string());
        let server =
            ServerName::try_from(name.clone()).map_err(|_| format!("'{name}' is not a host name or address"))?;
        let mut c = ClientConnection::new(self.client.clone(), server).map_err(|e| e.to_string())?;
        handshake(&mut c, tcp, timeout).map_err(|(e, first)| {
            if first.starts_with(&crate::frame::MAGIC.to_le_bytes()) {
                "the destination speaks plain TCP: it was started without TLS credentials \
                 (--tls-cert, --tls-key, --tls-ca)"
                    .to_string()
            } else {
                format!("TLS handshake with the destination failed: {e}")
            }
        })?;
        Ok(Connection::Client(c))
    }

    /// The destination's handshake with a source that connected.
    pub(super) fn server_handshake(&self, tcp: &TcpStream, timeout: Duration) -> Result<Connection, String> {
        tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        if peer_speaks_plain(tcp) {
            // Tell a plain livemig source why, in its own framing.
            let mut w = crate::frame::FrameWriter::new(tcp);
            let _ = w.send(
                crate::frame::Kind::Error,
                &crate::msg::encode_str(
                    "this destination requires TLS (start the source with --tls-cert/--tls-key/--tls-ca)",
                ),
            );
            return Err("the source speaks plain TCP; this destination requires TLS".into());
        }
        let mut c = ServerConnection::new(self.server.clone()).map_err(|e| e.to_string())?;
        handshake(&mut c, tcp, timeout).map_err(|(e, _)| format!("TLS handshake with the source failed: {e}"))?;
        Ok(Connection::Server(c))
    }
}

/// Whether the first bytes waiting on `tcp` are a livemig frame (the peer does not speak TLS).
fn peer_speaks_plain(tcp: &TcpStream) -> bool {
    let mut b = [0u8; 4];
    matches!(tcp.peek(&mut b), Ok(4)) && b == crate::frame::MAGIC.to_le_bytes()
}

/// The socket as the handshake sees it, keeping the first bytes the peer sent: when they are
/// a livemig frame rather than a TLS record, the peer is a plain livemig.
struct Tee<'a> {
    tcp: &'a TcpStream,
    first: Vec<u8>,
}

impl std::io::Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (&mut &*self.tcp).read(buf)?;
        let want = 4usize.saturating_sub(self.first.len()).min(n);
        self.first.extend_from_slice(&buf[..want]);
        Ok(n)
    }
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&mut &*self.tcp).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&mut &*self.tcp).flush()
    }
}

/// Runs a handshake to its end on a blocking socket, bounded by `timeout` per read or write.
/// On failure, the reason and the first bytes the peer sent.
fn handshake<D>(
    c: &mut rustls::ConnectionCommon<D>,
    tcp: &TcpStream,
    timeout: Duration,
) -> Result<(), (String, Vec<u8>)> {
    let mut io = Tee { tcp, first: Vec::new() };
    let r = (|| {
        tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        while c.is_handshaking() {
            c.complete_io(&mut io).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "the peer stalled".to_string(),
                _ => e.to_string(),
            })?;
        }
        while c.wants_write() {
            c.write_tls(&mut io).map_err(|e| e.to_string())?;
        }
        io.flush().map_err(|e| e.to_string())
    })();
    r.map_err(|e| (e, io.first))
}

/// What an alert from the destination means for the source's credentials. With TLS 1.3 the
/// destination checks the source's certificate after the source thinks the handshake is
/// done, so its verdict arrives as an alert on the first read.
pub fn alert_hint(why: &str) -> Option<&'static str> {
    let alert = why.strip_prefix("received fatal alert: ")?;
    Some(match alert {
        "UnknownCA" | "DecryptError" | "BadCertificate" => {
            "the destination does not trust this source's certificate: its --tls-ca did not sign it"
        }
        "CertificateExpired" => "the destination finds this source's certificate expired or not yet valid",
        "CertificateRevoked" => "the destination finds this source's certificate revoked",
        "CertificateRequired" => "the destination requires a certificate from the source",
        _ => return None,
    })
}
