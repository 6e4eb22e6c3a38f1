//! The pre-shared key: an HMAC-SHA256 on every frame after the `Hello`s, with keys derived
//! per session, per direction and per connection (`docs/transport.md`).
//!
//! * session key = HMAC(psk, "livemig psk v1" ‖ both `Hello` payloads): a change to either
//!   `Hello` (a nonce, a capability) makes every later frame fail, and a stream recorded from
//!   one session verifies in no other;
//! * frame key = HMAC(session key, direction ‖ connection): a frame moved to the other
//!   direction or to another connection does not verify;
//! * tag = HMAC(frame key, sequence number ‖ kind ‖ payload): a frame dropped, duplicated,
//!   reordered or renumbered is caught even by someone who recomputes the CRCs.

use ring::hmac;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Length of a frame's tag.
pub const TAG: usize = 32;
/// Connection number of a page connection's `Hello`, before its channel is known.
pub const PAGE_HELLO: u16 = u16::MAX;

/// A key file's secret.
pub struct Psk {
    key: hmac::Key,
}

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ToDest,
    ToSource,
}

/// The key of one direction of one connection of one session.
#[derive(Clone)]
pub struct MacKey(hmac::Key);

/// The keys of one session.
pub struct Session(hmac::Key);

impl Psk {
    /// Reads a key file: at least 32 hex digits (128 bits), and readable by its owner only.
    pub fn load(path: &Path) -> Result<Psk, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("--psk-file {}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "--psk-file {}: open to others (mode {:o}); `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let bytes = super::read_small(path, "--psk-file", 4096)?;
        let text = String::from_utf8(bytes).map_err(|_| format!("--psk-file {}: not text", path.display()))?;
        Self::from_hex(text.trim()).map_err(|e| format!("--psk-file {}: {e}", path.display()))
    }

    /// A key from its hex digits (at least 32).
    pub fn from_hex(hex: &str) -> Result<Psk, String> {
        if hex.len() < 32 || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(
                "a key must be at least 32 hex digits (128 bits), an even number of them; e.g. `openssl rand -hex 32`"
                    .into(),
            );
        }
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        Ok(Psk {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// The session's keys, from the two `Hello` payloads as they were on the wire.
    pub fn session(&self, hello_source: &[u8], hello_dest: &[u8]) -> Session {
        let mut c = hmac::Context::with_key(&self.key);
        c.update(b"livemig psk v1");
        for h in [hello_source, hello_dest] {
            c.update(&(h.len() as u32).to_le_bytes());
            c.update(h);
        }
        Session(hmac::Key::new(hmac::HMAC_SHA256, c.sign().as_ref()))
    }
}

impl Session {
    /// The key of direction `dir` on connection `conn` (0 the control connection, 1 + i page
    /// channel i, [`PAGE_HELLO`] a page connection's `Hello`).
    pub fn key(&self, dir: Dir, conn: u16) -> MacKey {
        let label: &[u8] = match dir {
            Dir::ToDest => b"to-dest",
            Dir::ToSource => b"to-source",
        };
        let mut c = hmac::Context::with_key(&self.0);
        c.update(label);
        c.update(&conn.to_le_bytes());
        MacKey(hmac::Key::new(hmac::HMAC_SHA256, c.sign().as_ref()))
    }
}

impl MacKey {
    fn context(&self, seq: u64, kind: u8, payload: &[u8]) -> hmac::Context {
        let mut c = hmac::Context::with_key(&self.0);
        c.update(&seq.to_le_bytes());
        c.update(&[kind]);
        c.update(payload);
        c
    }

    /// The tag of frame `seq` of `kind` carrying `payload`.
    pub fn tag(&self, seq: u64, kind: u8, payload: &[u8]) -> [u8; TAG] {
        let mut t = [0u8; TAG];
        t.copy_from_slice(self.context(seq, kind, payload).sign().as_ref());
        t
    }

    /// Whether `tag` is that frame's (in constant time).
    pub fn verify(&self, seq: u64, kind: u8, payload: &[u8], tag: &[u8]) -> bool {
        let mine = self.context(seq, kind, payload).sign();
        // Every byte compared whatever the first difference: no timing says how much of a
        // forged tag was right.
        tag.len() == TAG
            && std::hint::black_box(mine.as_ref().iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b))) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_sessions_directions_and_connections() {
        let p = Psk::from_hex("00112233445566778899aabbccddeeff").unwrap();
        let s = p.session(b"hello-s", b"hello-d");
        let k = s.key(Dir::ToDest, 0);
        let t = k.tag(5, 4, b"page");
        assert!(k.verify(5, 4, b"page", &t));
        assert!(!k.verify(6, 4, b"page", &t), "renumbered");
        assert!(!k.verify(5, 5, b"page", &t), "another kind");
        assert!(!k.verify(5, 4, b"pagf", &t), "altered");
        assert!(!s.key(Dir::ToSource, 0).verify(5, 4, b"page", &t), "other direction");
        assert!(!s.key(Dir::ToDest, 1).verify(5, 4, b"page", &t), "other connection");
        let other = p.session(b"hello-s", b"hello-x");
        assert!(!other.key(Dir::ToDest, 0).verify(5, 4, b"page", &t), "other session");
        let q = Psk::from_hex("00112233445566778899aabbccddeefe").unwrap();
        assert!(
            !q.session(b"hello-s", b"hello-d")
                .key(Dir::ToDest, 0)
                .verify(5, 4, b"page", &t),
            "other key"
        );
    }

    #[test]
    fn short_or_odd_keys_are_refused() {
        for bad in [
            "",
            "abc",
            "00112233445566778899aabbccddeef",
            "0011223344556677889900112233445g",
        ] {
            assert!(Psk::from_hex(bad).is_err(), "{bad:?}");
        }
    }
}
