//! A forger: a man in the middle that holds no key and rewrites the source's control stream
//! so that every check it can satisfy passes. Frames it copies, injects or renumbers carry a
//! correct CRC under the session key (which it derives from the two `Hello` nonces it sees);
//! what it cannot make is a pre-shared key's tag or a TLS record's AEAD tag. So on plain TCP
//! its forgeries reach the destination's memory, and with a key or TLS they must not
//! (`docs/transport.md`, "What a forger can do").
//!
//! Only the first connection (the control connection) is rewritten; run it with page
//! channels off so the final round travels there.

use migration::frame::{encode_keyed, encode_unchecked, Kind, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use migration::msg::{Encoding, Hello, PagesHead, CAP_PSK, PAGES_HEAD};
use migration::transport::psk::TAG;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the forger does to the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forgery {
    /// An earlier page run sent again after the final round, renumbered: its pages go back
    /// to what they held before they were last sent. (TLS: a record sent again.)
    ReplayRun,
    /// A forged one-page zero run for a page of the final round, after it: that page goes
    /// back to its content before the guest wrote it. (TLS: a forged record.)
    StalePage,
    /// The final round's first page run dropped and every later frame renumbered. (TLS: a
    /// record dropped.)
    DropRenumber,
    /// A `Switchover` before the `Config`, later frames renumbered. (TLS: a forged record
    /// before the Config's.)
    SwitchoverFirst,
}

impl Forgery {
    pub const ALL: [Forgery; 4] = [
        Forgery::ReplayRun,
        Forgery::StalePage,
        Forgery::DropRenumber,
        Forgery::SwitchoverFirst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Forgery::ReplayRun => "replayed page run",
            Forgery::StalePage => "stale page",
            Forgery::DropRenumber => "dropped frame, renumbered",
            Forgery::SwitchoverFirst => "switchover before config",
        }
    }
}

/// What the forger did.
#[derive(Clone, Debug, Default)]
pub struct Forged {
    /// The forgery as done (`None`: the stream ended before its point).
    pub what: Option<String>,
    /// The stream was TLS, so the forgery was made on its records.
    pub tls: bool,
}

struct Shared {
    forgery: Forgery,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    forged: Mutex<Forged>,
    /// The destination's `Hello` nonce on the control connection.
    dest_nonce: Mutex<Option<u64>>,
    accepted: AtomicUsize,
}

/// A running forger; it stops when dropped.
pub struct Forger {
    pub addr: String,
    sh: Arc<Shared>,
}

/// The TLS record the forger counts to before it acts: past the handshake, in the bulk
/// round (a 128 MiB guest's stream, well compressed, is only some 30 records).
const TLS_RECORD: usize = 8;
/// How many records later a replayed TLS record is sent again.
const TLS_REPLAY_AFTER: usize = 4;

impl Forger {
    /// Listens on loopback and forwards every connection to `to`.
    pub fn start(to: String, forgery: Forgery) -> std::io::Result<Forger> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        l.set_nonblocking(true)?;
        let sh = Arc::new(Shared {
            forgery,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            forged: Mutex::new(Forged::default()),
            dest_nonce: Mutex::new(None),
            accepted: AtomicUsize::new(0),
        });
        let s = sh.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => {
                        let Ok(d) = TcpStream::connect(&to) else {
                            let _ = c.shutdown(Shutdown::Both);
                            continue;
                        };
                        let control = s.accepted.fetch_add(1, Ordering::AcqRel) == 0;
                        let _ = c.set_nonblocking(false);
                        for x in [&c, &d] {
                            let _ = x.set_nodelay(true);
                            if let Ok(y) = x.try_clone() {
                                s.conns.lock().unwrap_or_else(|e| e.into_inner()).push(y);
                            }
                        }
                        let (Ok(c2), Ok(d2)) = (c.try_clone(), d.try_clone()) else {
                            continue;
                        };
                        let (s1, s2) = (s.clone(), s.clone());
                        std::thread::spawn(move || if control { to_dest(c, d, &s1) } else { copy(c, d) });
                        std::thread::spawn(move || if control { to_source(d2, c2, &s2) } else { copy(d2, c2) });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Forger { addr, sh })
    }

    pub fn forged(&self) -> Forged {
        self.sh.forged.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Forger {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Release);
        for c in self.sh.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn note(sh: &Shared, what: String, tls: bool) {
    *sh.forged.lock().unwrap_or_else(|e| e.into_inner()) = Forged { what: Some(what), tls };
}

/// One frame, header and payload; `None` at the end of the stream or on anything that is
/// not a frame (the forger then only copies).
fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[8..12].try_into().ok()?);
    if u32::from_le_bytes(h[0..4].try_into().ok()?) != MAGIC || len > MAX_PAYLOAD {
        return None;
    }
    let mut f = h.to_vec();
    f.resize(HEADER_LEN + len as usize, 0);
    s.read_exact(&mut f[HEADER_LEN..]).ok()?;
    Some(f)
}

fn seq_of(f: &[u8]) -> u64 {
    u64::from_le_bytes(f[12..20].try_into().unwrap_or([0; 8]))
}

/// The destination's replies: copied, its `Hello` nonce noted on the way.
fn to_source(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let mut first = [0u8; 2];
    if matches!(from.peek(&mut first), Ok(2)) && first == MAGIC.to_le_bytes()[..2] {
        if let Some(f) = read_frame(&mut from) {
            if let Ok(h) = Hello::decode(&f[HEADER_LEN..]) {
                *sh.dest_nonce.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.nonce);
            }
            if to.write_all(&f).is_err() {
                return;
            }
        }
    }
    copy(from, to)
}

fn to_dest(from: TcpStream, to: TcpStream, sh: &Shared) {
    let mut first = [0u8; 2];
    match from.peek(&mut first) {
        Ok(2) if first == [0x16, 0x03] => records(from, to, sh),
        Ok(2) => frames(from, to, sh),
        _ => copy(from, to),
    }
}

/// The session key, once the destination's `Hello` has gone by (the source sends nothing
/// else before it has it).
fn session_key(sh: &Shared, source_nonce: u64) -> Option<u64> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) && !sh.stop.load(Ordering::Acquire) {
        if let Some(d) = *sh.dest_nonce.lock().unwrap_or_else(|e| e.into_inner()) {
            return Some(migration::session::key(source_nonce, d));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// A page run the forger has seen after the bulk round: its pages, and whether a later
/// frame sent any of them again with other bytes (so a replay makes them stale).
struct Seen {
    pfns: std::ops::Range<u64>,
    frame: Vec<u8>,
    superseded: bool,
}

/// The pages of a run, from its head alone (with a key, a tag follows the data).
fn pfns(payload: &[u8]) -> Option<std::ops::Range<u64>> {
    let gpa = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let pages = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?);
    Some(gpa / 4096..gpa / 4096 + pages as u64)
}

fn frames(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let Some(hello) = read_frame(&mut from) else {
        return copy(from, to);
    };
    let Ok(h) = Hello::decode(&hello[HEADER_LEN..]) else {
        let _ = to.write_all(&hello);
        return copy(from, to);
    };
    if to.write_all(&hello).is_err() {
        return;
    }
    let psk = h.caps & CAP_PSK != 0;
    let mut key = None;
    // Added to the sequence number of every frame from here on.
    let mut shift: i64 = 0;
    let (mut iterations, mut switched, mut done) = (0u32, false, false);
    let mut seen: Vec<Seen> = Vec::new();
    let mut last_final: Option<u64> = None;
    let mut out = Vec::new();
    while let Some(f) = read_frame(&mut from) {
        let key = *key.get_or_insert_with(|| session_key(sh, h.nonce).unwrap_or(0));
        let kind = Kind::from_u8(f[4]);
        let seq = seq_of(&f);
        let payload = &f[HEADER_LEN..];
        // Frames as the sender makes them: with a key, no CRC but a tag, which the forger
        // cannot compute (zeros stand in for it in a frame it makes up).
        let encode = |out: &mut Vec<u8>, kind: Kind, seq: u64, payload: &[u8]| {
            if psk {
                encode_unchecked(out, kind, seq, payload)
            } else {
                encode_keyed(out, key, kind, seq, payload)
            }
        };
        let forge = |out: &mut Vec<u8>, kind: Kind, seq: u64, body: &[u8]| {
            let mut p = body.to_vec();
            if psk {
                p.extend_from_slice(&[0; TAG]);
            }
            encode(out, kind, seq, &p);
        };
        out.clear();
        let at = |shift: i64| seq.wrapping_add_signed(shift);
        if !done {
            match sh.forgery {
                Forgery::SwitchoverFirst if kind == Some(Kind::Config) => {
                    forge(&mut out, Kind::Switchover, at(shift), &[]);
                    shift += 1;
                    done = true;
                    note(sh, format!("a Switchover as frame {seq}, before the Config"), false);
                }
                Forgery::DropRenumber if switched && kind == Some(Kind::Pages) => {
                    done = true;
                    note(
                        sh,
                        format!(
                            "dropped the final round's first page run (frame {seq}, {:?})",
                            pfns(payload)
                        ),
                        false,
                    );
                    shift -= 1;
                    continue;
                }
                Forgery::ReplayRun | Forgery::StalePage
                    if switched && !matches!(kind, Some(Kind::Pages) | Some(Kind::Switchover)) =>
                {
                    done = true;
                    if sh.forgery == Forgery::ReplayRun {
                        let pick = seen.iter().find(|s| s.superseded).or(seen.first());
                        if let Some(s) = pick {
                            let p = &s.frame[HEADER_LEN..];
                            let kind = Kind::Pages;
                            encode(&mut out, kind, at(shift), p);
                            shift += 1;
                            note(
                                sh,
                                format!(
                                    "replayed the run of pages {:?} (sent as frame {}{}) as frame {}",
                                    s.pfns,
                                    seq_of(&s.frame),
                                    if s.superseded { ", sent again since" } else { "" },
                                    at(shift - 1)
                                ),
                                false,
                            );
                        }
                    } else if let Some(pfn) = last_final {
                        let mut body = Vec::with_capacity(PAGES_HEAD);
                        PagesHead {
                            gpa: pfn * 4096,
                            pages: 1,
                            encoding: Encoding::Zero,
                        }
                        .encode_into(&mut body);
                        forge(&mut out, Kind::Pages, at(shift), &body);
                        shift += 1;
                        note(
                            sh,
                            format!(
                                "a zero run for page {pfn:#x} of the final round as frame {}",
                                at(shift - 1)
                            ),
                            false,
                        );
                    }
                }
                _ => {}
            }
        }
        match kind {
            Some(Kind::EndOfIteration) => iterations += 1,
            Some(Kind::Switchover) => switched = true,
            Some(Kind::Pages) => {
                if let Some(r) = pfns(payload) {
                    for s in seen.iter_mut() {
                        // A page written again with the same bytes (dirty, yet unchanged) is
                        // not stale when replayed: only a resend that differs makes it so.
                        let same = s.pfns == r && s.frame.get(HEADER_LEN + 12..) == payload.get(12..);
                        if s.pfns.start < r.end && r.start < s.pfns.end && !same {
                            s.superseded = true;
                        }
                    }
                    // A page that holds data: zeroing it is a change.
                    if switched && payload.get(12) != Some(&(Encoding::Zero as u8)) {
                        last_final = Some(r.start);
                    } else if switched {
                    } else if iterations >= 1 {
                        seen.push(Seen {
                            pfns: r,
                            frame: f.clone(),
                            superseded: false,
                        });
                    }
                }
            }
            _ => {}
        }
        match kind {
            Some(k) if shift != 0 => encode(&mut out, k, at(shift), payload),
            _ => out.extend_from_slice(&f),
        }
        if to.write_all(&out).is_err() {
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The TLS case: the forger sees records, and does to one of them what it would do to a
/// frame.
fn records(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let (mut n, mut held) = (0usize, None::<Vec<u8>>);
    let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut forged_record = |len: usize| {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend((0..len).map(|_| rng.random::<u8>()));
        r
    };
    loop {
        let mut h = [0u8; 5];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        let mut rec = h.to_vec();
        rec.resize(5 + len, 0);
        if from.read_exact(&mut rec[5..]).is_err() {
            break;
        }
        let data = h[0] == 23;
        if data {
            n += 1;
        }
        let mut out = Vec::new();
        match sh.forgery {
            // rustls sends the rest of its handshake as record 1, the source's Hello as 2.
            Forgery::SwitchoverFirst if data && n == 3 => {
                out.extend(forged_record(len));
                note(sh, format!("a forged record before record {n}, the Config's"), true);
            }
            Forgery::StalePage if data && n == TLS_RECORD => {
                out.extend(forged_record(len));
                note(sh, format!("a forged record before record {n}"), true);
            }
            Forgery::DropRenumber if data && n == TLS_RECORD => {
                note(sh, format!("dropped record {n}"), true);
                continue;
            }
            Forgery::ReplayRun if data && n == TLS_RECORD => held = Some(rec.clone()),
            _ => {}
        }
        out.extend_from_slice(&rec);
        if data && n == TLS_RECORD + TLS_REPLAY_AFTER {
            if let Some(r) = held.take() {
                out.extend(r);
                note(sh, format!("record {TLS_RECORD} sent again after record {n}"), true);
            }
        }
        if to.write_all(&out).is_err() {
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
