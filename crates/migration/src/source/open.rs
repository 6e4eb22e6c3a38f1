//! Connections and handshake: the transport's own (TLS), `Hello` both ways (each side's
//! nonce; together the session key, and with a pre-shared key the MAC keys), `Config` and
//! `ConfigOk`, the page connections, the senders and the return-path reader. Every read and
//! write here is bounded by the peer timeout, and every connection is shut down by a cancel.

use super::link::{Back, Link, Peer};
use super::{vm_config_msg, SourceOptions};
use crate::control::MigrationControl;
use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, FrameWriter, Kind};
use crate::msg::{self, Hello, Role, VerifyMode, CAP_LZ4, CAP_PSK, CAP_VERIFY, VERSION};
use crate::pages::PageStats;
use crate::sender::{Limiter, Sender, Shared};
use crate::session;
use crate::transport::psk::{Dir, PAGE_HELLO};
use crate::transport::{self, Conn};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::channel;
use std::sync::Arc;
use vmm::Vm;

fn connect(to: &str, opts: &SourceOptions, ctl: &MigrationControl) -> Result<Conn, MigError> {
    let timeout = opts.peer_timeout;
    let cerr = |e| MigError::Connect {
        what: to.to_string(),
        source: e,
    };
    let addr = to
        .to_socket_addrs()
        .map_err(cerr)?
        .next()
        .ok_or_else(|| cerr(std::io::Error::other("no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(cerr)?;
    // Registered before the TLS handshake: a cancel ends that too.
    if let Ok(t) = tcp.try_clone() {
        ctl.watch(&Conn::tcp(t));
    }
    let s = transport::client(tcp, transport::host_of(to), &opts.security, timeout).map_err(MigError::Transport)?;
    // A peer that stops reading (no FIN, no RST) blocks a write at most this long.
    s.set_write_timeout(Some(timeout)).map_err(cerr)?;
    s.set_read_timeout(Some(timeout)).map_err(cerr)?;
    ctl.watch(&s);
    Ok(s)
}

/// A failure on `conn`, with the transport's reason when it has one (a TLS alert says more
/// than "connection closed").
fn explain(e: MigError, conn: &Conn) -> MigError {
    match (conn.transport_error(), &e) {
        (Some(why), MigError::Wire(_)) => {
            let hint = transport::tls::alert_hint(&why)
                .map(|h| format!("{h}; "))
                .unwrap_or_default();
            MigError::Transport(format!(
                "the destination refused the TLS session: {hint}{why} ({})",
                e.chain()
            ))
        }
        _ => e,
    }
}

fn expect(r: &mut FrameReader<Conn>, want: Kind, what: &'static str) -> Result<Vec<u8>, MigError> {
    let f = r.expect()?;
    match f.kind {
        k if k == want => Ok(f.payload),
        Kind::Error => Err(MigError::Peer(msg::decode_str(&f.payload)?)),
        k => Err(WireError::Unexpected {
            found: k,
            expected: what,
        }
        .into()),
    }
}

pub(super) fn open(
    vm: &Arc<Vm>,
    to: &str,
    opts: &SourceOptions,
    ctl: &MigrationControl,
) -> Result<(Box<Link>, Arc<PageStats>), MigError> {
    let control = connect(to, opts, ctl)?;
    let nonce = session::nonce();
    let verify = opts.verify != VerifyMode::Off;
    let psk = opts.security.psk();
    let caps = CAP_LZ4 | if verify { CAP_VERIFY } else { 0 } | if psk.is_some() { CAP_PSK } else { 0 };
    let mut w = FrameWriter::new(control.try_clone()?);
    let mut r = FrameReader::new(control.try_clone()?);
    let hello = Hello {
        version: VERSION,
        role: Role::Control,
        nonce,
        caps,
    }
    .encode();
    w.send(Kind::Hello, &hello).map_err(|e| explain(e.into(), &control))?;
    let peer_hello = expect(&mut r, Kind::Hello, "Hello").map_err(|e| explain(e, &control))?;
    let peer = Hello::decode(&peer_hello)?;
    if peer.version != VERSION {
        return Err(WireError::Version(peer.version, VERSION).into());
    }
    if peer.role != Role::Control {
        return Err(WireError::Malformed("the destination's Hello is not a control Hello").into());
    }
    if verify && peer.caps & CAP_VERIFY == 0 {
        return Err(MigError::Incompatible("the destination cannot verify".into()));
    }
    match (psk.is_some(), peer.caps & CAP_PSK != 0) {
        (true, false) => {
            return Err(MigError::Transport(
                "the destination has no pre-shared key; start it with the same --psk-file".into(),
            ))
        }
        (false, true) => {
            return Err(MigError::Transport(
                "the destination requires a pre-shared key (--psk-file)".into(),
            ))
        }
        _ => {}
    }
    let key = session::key(nonce, peer.nonce);
    w.set_key(key);
    r.set_key(key);
    let keys = psk.map(|p| p.session(&hello, &peer_hello));
    w.set_mac(keys.as_ref().map(|k| k.key(Dir::ToDest, 0)));
    r.set_mac(keys.as_ref().map(|k| k.key(Dir::ToSource, 0)));
    if control.authenticated() {
        w.trust_transport();
        r.trust_transport();
    }
    let mut cfg = vm_config_msg(vm, opts);
    cfg.verify = opts.verify;
    w.send(Kind::Config, &cfg.encode())?;
    let ok = expect(&mut r, Kind::ConfigOk, "ConfigOk").map_err(|e| match e {
        MigError::Peer(m) => MigError::Incompatible(m),
        e => explain(e, &control),
    })?;
    msg::decode_empty(&ok)?;

    let stats = Arc::new(PageStats::default());
    let stop = ctl.stop_flag();
    let drain = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shared = Arc::new(Shared {
        mem: vm.memory().clone(),
        stats: stats.clone(),
        compress: opts.compress,
        limit: opts.max_bandwidth.map(Limiter::new),
        stop: stop.clone(),
        drain: drain.clone(),
    });
    let mut sockets = vec![control.try_clone()?];
    // The control connection's sender continues the sequence the handshake started.
    let mut senders = vec![Sender::spawn_after(
        "mig-control".into(),
        control.try_clone()?,
        shared.clone(),
        w.seq(),
        key,
        keys.as_ref().map(|k| k.key(Dir::ToDest, 0)),
    )];
    for c in 0..opts.channels {
        let s = connect(to, opts, ctl)?;
        let mut pw = FrameWriter::new(s.try_clone()?).with_key(key);
        pw.set_mac(keys.as_ref().map(|k| k.key(Dir::ToDest, PAGE_HELLO)));
        if s.authenticated() {
            pw.trust_transport();
        }
        let h = Hello {
            version: VERSION,
            role: Role::Pages { channel: c },
            nonce,
            caps,
        };
        pw.send(Kind::Hello, &h.encode()).map_err(|e| explain(e.into(), &s))?;
        sockets.push(s.try_clone()?);
        let mac = keys.as_ref().map(|k| k.key(Dir::ToDest, c + 1));
        senders.push(Sender::spawn_after(
            format!("mig-pages-{c}"),
            s,
            shared.clone(),
            1,
            key,
            mac,
        ));
    }
    let pages: Vec<usize> = if opts.channels == 0 {
        vec![0]
    } else {
        (1..=opts.channels as usize).collect()
    };
    // The return path blocks in reads: the destination may rightly be silent for long
    // (a bulk round under a bandwidth cap). Every wait on it is bounded by the engine
    // instead, and closing the connection ends the reader.
    control.set_read_timeout(None)?;
    let (btx, back) = channel();
    std::thread::Builder::new()
        .name("mig-return".into())
        .spawn(move || loop {
            let b = match r.read_frame() {
                Ok(Some(f)) => Back::Frame(f.kind, f.payload),
                Ok(None) => Back::Failed(WireError::Closed),
                Err(e) => Back::Failed(e),
            };
            let end = matches!(b, Back::Failed(_));
            if btx.send(b).is_err() || end {
                return;
            }
        })
        .map_err(|e| MigError::Other(format!("spawning the return-path reader: {e}")))?;

    let devices = vfio::vmm::Source::new(vm.devices().iter().map(|d| d.migration.clone()).collect());
    let link = Box::new(Link {
        vm: vm.clone(),
        control,
        sockets,
        senders,
        pages,
        devices,
        device_dirty: None,
        throttle: None,
        back,
        peer: Peer::default(),
        timeout: opts.peer_timeout,
        stop,
        drain,
        early: None,
    });
    Ok((link, stats))
}
