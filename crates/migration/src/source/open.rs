//! Connections and handshake: `Hello` both ways (each side's nonce; together the session
//! key), `Config` and `ConfigOk`, the page connections, the senders and the return-path reader.
//! Every read and write here is bounded by the peer timeout, and every connection is shut down
//! by a cancel.

use super::link::{Back, Link, Peer};
use super::{vm_config_msg, SourceOptions};
use crate::control::MigrationControl;
use crate::error::{MigError, WireError};
use crate::frame::{FrameReader, FrameWriter, Kind};
use crate::msg::{self, Hello, Role, VerifyMode, CAP_LZ4, CAP_VERIFY, VERSION};
use crate::pages::PageStats;
use crate::sender::{Limiter, Sender, Shared};
use crate::session;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;
use vmm::Vm;

fn connect(to: &str, timeout: Duration, ctl: &MigrationControl) -> Result<TcpStream, MigError> {
    let cerr = |e| MigError::Connect {
        what: to.to_string(),
        source: e,
    };
    let addr = to
        .to_socket_addrs()
        .map_err(cerr)?
        .next()
        .ok_or_else(|| cerr(std::io::Error::other("no address")))?;
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(cerr)?;
    let _ = s.set_nodelay(true);
    // A peer that stops reading (no FIN, no RST) blocks a write at most this long.
    s.set_write_timeout(Some(timeout)).map_err(cerr)?;
    s.set_read_timeout(Some(timeout)).map_err(cerr)?;
    ctl.watch(&s);
    Ok(s)
}

fn expect(r: &mut FrameReader<TcpStream>, want: Kind, what: &'static str) -> Result<Vec<u8>, MigError> {
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
    let control = connect(to, opts.peer_timeout, ctl)?;
    let nonce = session::nonce();
    let verify = opts.verify != VerifyMode::Off;
    let caps = CAP_LZ4 | if verify { CAP_VERIFY } else { 0 };
    let mut w = FrameWriter::new(control.try_clone()?);
    let mut r = FrameReader::new(control.try_clone()?);
    let hello = Hello {
        version: VERSION,
        role: Role::Control,
        nonce,
        caps,
    };
    w.send(Kind::Hello, &hello.encode())?;
    let peer = Hello::decode(&expect(&mut r, Kind::Hello, "Hello")?)?;
    if peer.version != VERSION {
        return Err(WireError::Version(peer.version, VERSION).into());
    }
    if peer.role != Role::Control {
        return Err(WireError::Malformed("the destination's Hello is not a control Hello").into());
    }
    if verify && peer.caps & CAP_VERIFY == 0 {
        return Err(MigError::Incompatible("the destination cannot verify".into()));
    }
    let key = session::key(nonce, peer.nonce);
    w.set_key(key);
    r.set_key(key);
    let mut cfg = vm_config_msg(vm, opts);
    cfg.verify = opts.verify;
    w.send(Kind::Config, &cfg.encode())?;
    let ok = expect(&mut r, Kind::ConfigOk, "ConfigOk").map_err(|e| match e {
        MigError::Peer(m) => MigError::Incompatible(m),
        e => e,
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
    )];
    for c in 0..opts.channels {
        let s = connect(to, opts.peer_timeout, ctl)?;
        let mut pw = FrameWriter::new(s.try_clone()?).with_key(key);
        let h = Hello {
            version: VERSION,
            role: Role::Pages { channel: c },
            nonce,
            caps,
        };
        pw.send(Kind::Hello, &h.encode())?;
        sockets.push(s.try_clone()?);
        senders.push(Sender::spawn_after(format!("mig-pages-{c}"), s, shared.clone(), 1, key));
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

    let devices = vfio::vmm::Source::new(vm.iommu().map(|s| s.accel.migration().clone()).into_iter().collect());
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
