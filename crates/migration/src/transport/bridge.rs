//! The TLS bridge: a thread per connection that owns the TLS session and its TCP socket and
//! relays plaintext to and from the application's end of a local socket pair. A TLS session
//! cannot be read on one thread and written on another, and the engines do both (a sender
//! and the return path share the control connection); through the socket pair they keep a
//! stream that clones, times out and shuts down like TCP.
//!
//! Back-pressure is the socket pair's and TCP's own: the bridge reads from the application
//! only when everything it encrypted before is on the wire, and reads from TCP only when what
//! it decrypted has reached the application. When the application shuts its end, the bridge
//! sends `close_notify` and closes TCP; when the peer closes, or the session fails (the error
//! is kept for [`super::Conn::transport_error`]), it closes the application's end.

use super::{Conn, Inner};
use rustix::event::{poll, PollFd, PollFlags};
use rustls::Connection;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Plaintext read from the application at once (TLS cuts it into 16 KiB records).
const CHUNK: usize = 256 << 10;

/// Starts the bridge for an established session; the application's end of it.
pub(super) fn spawn(tcp: TcpStream, mut tls: Connection) -> Result<Conn, String> {
    let err = Arc::new(Mutex::new(None));
    let (app, ours) = UnixStream::pair().map_err(|e| format!("a socket pair for the TLS bridge: {e}"))?;
    // Back-pressure is the bridge's (it reads from the application only when the session has
    // sent everything), so the session itself need not refuse plaintext.
    tls.set_buffer_limit(None);
    let e2 = err.clone();
    let spawned = std::thread::Builder::new().name("tls-bridge".into()).spawn(move || {
        if let Err(why) = relay(tls, &tcp, &ours) {
            *e2.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
        let _ = ours.shutdown(Shutdown::Both);
        let _ = tcp.shutdown(Shutdown::Both);
    });
    spawned.map_err(|e| format!("starting the TLS bridge thread: {e}"))?;
    Ok(Conn {
        inner: Inner::Bridged(app),
        tls_error: Some(err),
    })
}

fn io(e: std::io::Error) -> String {
    e.to_string()
}

/// The relay; returns when both directions are closed, or with the session's error.
fn relay(mut tls: Connection, tcp: &TcpStream, app: &UnixStream) -> Result<(), String> {
    tcp.set_nonblocking(true).map_err(io)?;
    app.set_nonblocking(true).map_err(io)?;
    let (mut tcp_r, mut tcp_w, mut app_r, mut app_w) = (tcp, tcp, app, app);
    let mut buf = vec![0u8; CHUNK];
    // Decrypted bytes not yet taken by the application.
    let mut to_app: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let (mut app_done, mut peer_done) = (false, false);
    loop {
        // Decrypted data first: it may already be waiting in the session.
        if !peer_done && to_app.len() - at < CHUNK {
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => {
                        peer_done = true;
                        break;
                    }
                    Ok(n) => to_app.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // The peer closed the TCP stream without close_notify.
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        peer_done = true;
                        break;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        while at < to_app.len() {
            match app_w.write(&to_app[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The application closed its reading side: nothing more to deliver.
                Err(_) => {
                    at = to_app.len();
                }
            }
        }
        if at == to_app.len() {
            to_app.clear();
            at = 0;
            if peer_done {
                let _ = app.shutdown(Shutdown::Write);
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut tcp_w) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("sending to the peer: {e}")),
            }
        }
        if app_done && !tls.wants_write() {
            let _ = tcp.shutdown(Shutdown::Write);
            if peer_done && to_app.is_empty() {
                return Ok(());
            }
        }
        if peer_done && to_app.is_empty() && app_done {
            return Ok(());
        }

        // What to wait for.
        let want_tcp_in = !peer_done && tls.wants_read() && to_app.is_empty();
        let want_app_in = !app_done && !tls.wants_write();
        let mut tf = PollFlags::empty();
        if want_tcp_in {
            tf |= PollFlags::IN;
        }
        if tls.wants_write() {
            tf |= PollFlags::OUT;
        }
        let mut af = PollFlags::empty();
        if want_app_in {
            af |= PollFlags::IN;
        }
        if !to_app.is_empty() {
            af |= PollFlags::OUT;
        }
        if tf.is_empty() && af.is_empty() {
            // Nothing either side can do any more.
            return Ok(());
        }
        // Only the sockets of interest: poll reports a hang-up whatever is asked, and a
        // socket reported but not served would spin this loop.
        let mut fds = Vec::with_capacity(2);
        if !tf.is_empty() {
            fds.push(PollFd::new(&tcp_r, tf));
        }
        if !af.is_empty() {
            fds.push(PollFd::new(&app_r, af));
        }
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let (tr, ar) = match (tf.is_empty(), af.is_empty()) {
            (false, false) => (fds[0].revents(), fds[1].revents()),
            (false, true) => (fds[0].revents(), PollFlags::empty()),
            _ => (PollFlags::empty(), fds[0].revents()),
        };
        if tr.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) && want_tcp_in {
            match tls.read_tls(&mut tcp_r) {
                Ok(0) => peer_done = true,
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        // Send the alert that says why, then give up.
                        let _ = tls.write_tls(&mut tcp_w);
                        return Err(e.to_string());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("receiving from the peer: {e}")),
            }
        }
        if ar.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) && want_app_in {
            match app_r.read(&mut buf) {
                Ok(0) => {
                    app_done = true;
                    tls.send_close_notify();
                }
                Ok(n) => {
                    tls.writer().write_all(&buf[..n]).map_err(io)?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    app_done = true;
                    tls.send_close_notify();
                }
            }
        }
    }
}
