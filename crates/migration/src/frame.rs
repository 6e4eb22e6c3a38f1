//! Frame layer: every message on every connection is one frame, a fixed 24-byte header and a
//! bounded payload, checksummed together with the session key (layout in `docs/protocol.md`).
//!
//! The key binds every frame after the handshake to its session: a frame recorded from
//! another session fails its CRC here, however well-formed it is. A CRC is not a MAC; it
//! catches accidents (a stream replayed to the wrong destination, a stale connection), not a
//! forger. Against a forger, a pre-shared key's tag ends every payload, or TLS carries the
//! frames; either way the CRC is redundant and left zero (`docs/transport.md`).

use crate::error::WireError;
use crate::transport::psk::{MacKey, TAG};
use std::io::{Read, Write};

/// "LMIG", little-endian.
pub const MAGIC: u32 = 0x4749_4d4c;
pub const HEADER_LEN: usize = 24;
/// The largest payload a peer may send, but for a digest: a 64-page run plus its header, or a
/// 1 MiB device chunk, with room; anything longer is refused before it is read.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// The largest `Digest` payload: one u32 per page up to the end of the largest guest's RAM
/// (checked below). Only that kind may be this long.
pub const MAX_DIGEST_PAYLOAD: u32 = 12 << 20;
const _: () = assert!(
    (vmm::layout::HIGH_RAM + vmm::layout::MAX_MEM - vmm::layout::LOW_RAM_MAX) / 4096 * 4 + 1024
        <= MAX_DIGEST_PAYLOAD as u64
);

/// Frame kinds. The numbers are the wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Config = 2,
    ConfigOk = 3,
    Pages = 4,
    DeviceData = 5,
    EndOfIteration = 6,
    Switchover = 7,
    VcpuState = 8,
    Complete = 9,
    InitAck = 10,
    Ready = 11,
    Digest = 12,
    Report = 13,
    Error = 14,
    IterationAck = 15,
    Commit = 16,
    Running = 17,
    /// The VM's platform state beside the vCPUs (vIOMMU registers, shadow mappings).
    PlatformState = 18,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Config,
            3 => ConfigOk,
            4 => Pages,
            5 => DeviceData,
            6 => EndOfIteration,
            7 => Switchover,
            8 => VcpuState,
            9 => Complete,
            10 => InitAck,
            11 => Ready,
            12 => Digest,
            13 => Report,
            14 => Error,
            15 => IterationAck,
            16 => Commit,
            17 => Running,
            18 => PlatformState,
            _ => return None,
        })
    }
}

/// One received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn header(kind: Kind, len: u32, seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h
}

/// CRC32C of the session key (8 bytes, little-endian; 0 before the handshake has set it),
/// the header's first 20 bytes and the payload.
fn checksum(key: u64, h: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c_append(crc32c::crc32c(&key.to_le_bytes()), &h[..20]);
    crc32c::crc32c_append(c, payload)
}

/// Encodes a frame into `out` (appending). Payloads over [`MAX_PAYLOAD`] are a bug of the
/// sender and panic in debug builds; callers split data into runs and chunks first.
pub fn encode(out: &mut Vec<u8>, kind: Kind, seq: u64, payload: &[u8]) {
    encode_keyed(out, 0, kind, seq, payload)
}

/// [`encode`] under session key `key`.
pub fn encode_keyed(out: &mut Vec<u8>, key: u64, kind: Kind, seq: u64, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_DIGEST_PAYLOAD as usize);
    let mut h = header(kind, payload.len() as u32, seq);
    let crc = checksum(key, &h, payload);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
}

/// Encodes a frame whose CRC field stays zero: one a tag or TLS authenticates.
pub fn encode_unchecked(out: &mut Vec<u8>, kind: Kind, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&header(kind, payload.len() as u32, seq));
    out.extend_from_slice(payload);
}

/// Writes frames with consecutive sequence numbers.
pub struct FrameWriter<W: Write> {
    w: W,
    seq: u64,
    key: u64,
    /// With a pre-shared key: every payload goes out followed by its tag.
    mac: Option<MacKey>,
    /// Whether frames carry a CRC (not when a tag or TLS authenticates them).
    crc: bool,
    buf: Vec<u8>,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        Self::with_seq(w, 0)
    }
    /// Continues a connection on which `seq` frames were already sent.
    pub fn with_seq(w: W, seq: u64) -> Self {
        Self {
            w,
            seq,
            key: 0,
            mac: None,
            crc: true,
            buf: Vec::new(),
            bytes: 0,
        }
    }
    /// Frames from here on carry an HMAC tag under `mac` (a pre-shared key's), which makes
    /// their CRC redundant: it is left zero.
    pub fn set_mac(&mut self, mac: Option<MacKey>) {
        self.crc &= mac.is_none();
        self.mac = mac;
    }
    /// Frames from here on go over a connection that authenticates every byte (TLS): their
    /// CRC is left zero.
    pub fn trust_transport(&mut self) {
        self.crc = false;
    }
    /// Frames from here on carry the session key in their CRC.
    pub fn with_key(mut self, key: u64) -> Self {
        self.key = key;
        self
    }
    pub fn set_key(&mut self, key: u64) {
        self.key = key;
    }
    /// Frames sent so far (the next sequence number).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
        self.buf.clear();
        match &self.mac {
            None if self.crc => encode_keyed(&mut self.buf, self.key, kind, self.seq, payload),
            None => encode_unchecked(&mut self.buf, kind, self.seq, payload),
            Some(m) => {
                let tag = m.tag(self.seq, kind as u8, payload);
                let mut p = Vec::with_capacity(payload.len() + TAG);
                p.extend_from_slice(payload);
                p.extend_from_slice(&tag);
                encode_unchecked(&mut self.buf, kind, self.seq, &p);
            }
        }
        self.seq += 1;
        self.bytes += self.buf.len() as u64;
        self.w.write_all(&self.buf)
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
    /// Bytes written so far, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads frames and checks magic, kind, length bound, checksum and sequence.
pub struct FrameReader<R: Read> {
    r: R,
    seq: u64,
    key: u64,
    /// With a pre-shared key: every payload must end in its tag.
    mac: Option<MacKey>,
    /// Whether frames carry a CRC to check.
    crc: bool,
    bytes: u64,
}

fn io_err(e: std::io::Error) -> WireError {
    match e.kind() {
        // A socket read timeout: the peer sent nothing for that long.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Stalled,
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
        k => WireError::Io(k, e.to_string()),
    }
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        Self {
            r,
            seq: 0,
            key: 0,
            mac: None,
            crc: true,
            bytes: 0,
        }
    }
    /// Frames from here on must carry an HMAC tag under `mac`, and no CRC.
    pub fn set_mac(&mut self, mac: Option<MacKey>) {
        self.crc &= mac.is_none();
        self.mac = mac;
    }
    /// Frames from here on come over a connection that authenticates every byte (TLS), and
    /// carry no CRC.
    pub fn trust_transport(&mut self) {
        self.crc = false;
    }
    /// Frames from here on must carry the session key in their CRC.
    pub fn set_key(&mut self, key: u64) {
        self.key = key;
    }
    pub fn with_key(mut self, key: u64) -> Self {
        self.key = key;
        self
    }
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// The next frame; `Ok(None)` on a clean end of stream at a frame boundary.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, WireError> {
        self.read_frame_or_wait(|| false)
    }

    /// Like `read_frame`, but when the read timeout passes before the first byte of the next
    /// frame, `keep_waiting` decides: `true` waits another timeout, `false` is a stall. A
    /// timeout inside a frame is always a stall. For a connection that may rightly be silent
    /// while others carry the traffic (the control connection during a long page round).
    pub fn read_frame_or_wait(&mut self, mut keep_waiting: impl FnMut() -> bool) -> Result<Option<Frame>, WireError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.r.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if got == 0
                        && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                        && keep_waiting() => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let limit = if h[4] == Kind::Digest as u8 {
            MAX_DIGEST_PAYLOAD
        } else {
            MAX_PAYLOAD
        };
        if len > limit {
            return Err(WireError::TooLong(len));
        }
        let mut payload = vec![0u8; len as usize];
        self.r.read_exact(&mut payload).map_err(io_err)?;
        let want = u32::from_le_bytes(h[20..24].try_into().unwrap());
        let mut hh = h;
        hh[20..24].fill(0);
        let sum = if self.crc { checksum(self.key, &hh, &payload) } else { 0 };
        if sum != want {
            return Err(WireError::Checksum { seq: self.seq });
        }
        // Checked after the checksum, so a corrupted kind or reserved byte reads as corruption.
        let kind = Kind::from_u8(h[4]).ok_or(WireError::UnknownKind(h[4]))?;
        if h[5] != 0 || h[6] != 0 || h[7] != 0 {
            return Err(WireError::Malformed("reserved header bytes are not zero"));
        }
        let seq = u64::from_le_bytes(h[12..20].try_into().unwrap());
        if let Some(m) = &self.mac {
            // Before the sequence check: with a key, a renumbered frame is a forged one.
            let ok = payload.len() >= TAG && {
                let (p, t) = payload.split_at(payload.len() - TAG);
                m.verify(seq, h[4], p, t)
            };
            if !ok {
                return Err(WireError::Unauthentic { seq: self.seq });
            }
            payload.truncate(payload.len() - TAG);
        }
        if seq != self.seq {
            return Err(WireError::Sequence {
                expected: self.seq,
                found: seq,
            });
        }
        self.seq += 1;
        self.bytes += (HEADER_LEN + payload.len()) as u64;
        Ok(Some(Frame { kind, seq, payload }))
    }

    /// Like `next`, but the end of the stream is an error.
    pub fn expect(&mut self) -> Result<Frame, WireError> {
        self.read_frame()?.ok_or(WireError::Closed)
    }

    /// `expect` with `read_frame_or_wait`'s patience.
    pub fn expect_or_wait(&mut self, keep_waiting: impl FnMut() -> bool) -> Result<Frame, WireError> {
        self.read_frame_or_wait(keep_waiting)?.ok_or(WireError::Closed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes() {
        let mut v = Vec::new();
        encode(&mut v, Kind::Pages, 7, b"abc");
        assert_eq!(&v[0..4], b"LMIG");
        assert_eq!(v[4], 4);
        assert_eq!(&v[8..12], &3u32.to_le_bytes());
        assert_eq!(&v[12..20], &7u64.to_le_bytes());
        assert_eq!(v.len(), HEADER_LEN + 3);
    }

    #[test]
    fn a_frame_of_another_session_is_refused() {
        let mut v = Vec::new();
        encode_keyed(&mut v, 0x1234, Kind::Pages, 0, b"data");
        assert_eq!(
            FrameReader::new(&v[..])
                .with_key(0x1234)
                .read_frame()
                .unwrap()
                .unwrap()
                .payload,
            b"data"
        );
        for key in [0, 0x1235, u64::MAX] {
            assert_eq!(
                FrameReader::new(&v[..]).with_key(key).read_frame(),
                Err(WireError::Checksum { seq: 0 }),
                "key {key:#x}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let mut v = Vec::new();
        encode(&mut v, Kind::DeviceData, 0, b"0123456789");
        for bit in 0..v.len() * 8 {
            let mut c = v.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let r = FrameReader::new(&c[..]).read_frame();
            assert!(r.is_err(), "flip of bit {bit} accepted: {r:?}");
        }
        assert_eq!(
            FrameReader::new(&v[..]).read_frame().unwrap().unwrap().payload,
            b"0123456789"
        );
    }
}
