//! livemig's tagged framing of one device's migration data, modelled on QEMU's VFIO stream
//! (hw/vfio/migration.c). The engine carries each device's framed bytes as opaque chunks.
//!
//! Every record starts with a big-endian u64 tag:
//!
//! | tag | name | followed by |
//! |---|---|---|
//! | `0xffffffffef100001` | END_OF_STATE | nothing; closes a section |
//! | `0xffffffffef100002` | DEV_CONFIG_STATE | be64 length, that many bytes of device config |
//! | `0xffffffffef100003` | DEV_SETUP_STATE | nothing |
//! | `0xffffffffef100004` | DEV_DATA_STATE | be64 length, that many bytes of the device's data stream |
//! | `0xffffffffef100005` | DEV_INIT_DATA_SENT | nothing; the source's initial pre-copy data is all sent |
//!
//! Sections: setup is `SETUP, END_OF_STATE`; each pre-copy iteration is `DATA*, END_OF_STATE`
//! (with `INIT_DATA_SENT` once, after the data that brought `initial_bytes` to 0); the
//! stop-copy section is `DATA*, END_OF_STATE`; the config section is `CONFIG, END_OF_STATE`.
//! A DATA or CONFIG length above [`MAX_RECORD`] is refused.

use thiserror::Error;

pub const END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
pub const DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
pub const DEV_SETUP_STATE: u64 = 0xffff_ffff_ef10_0003;
pub const DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
pub const DEV_INIT_DATA_SENT: u64 = 0xffff_ffff_ef10_0005;

/// Largest DATA or CONFIG payload accepted in one record.
pub const MAX_RECORD: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    EndOfState,
    Config(Vec<u8>),
    Setup,
    Data(Vec<u8>),
    InitDataSent,
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::EndOfState => out.extend_from_slice(&END_OF_STATE.to_be_bytes()),
            Record::Setup => out.extend_from_slice(&DEV_SETUP_STATE.to_be_bytes()),
            Record::InitDataSent => out.extend_from_slice(&DEV_INIT_DATA_SENT.to_be_bytes()),
            Record::Config(b) | Record::Data(b) => {
                let tag = if matches!(self, Record::Config(_)) {
                    DEV_CONFIG_STATE
                } else {
                    DEV_DATA_STATE
                };
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(&(b.len() as u64).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// Why a device stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    /// A tag no version of the format defines.
    #[error("unknown record tag {0:#018x}")]
    UnknownTag(u64),
    /// A payload longer than [`MAX_RECORD`].
    #[error("record of {0} bytes exceeds the limit")]
    TooLong(u64),
}

/// Incremental decoder: feed bytes in any chunking, take complete records.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete record.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn be64(&self, at: usize) -> Option<u64> {
        Some(u64::from_be_bytes(self.buf.get(at..at + 8)?.try_into().ok()?))
    }

    /// The next complete record, `Ok(None)` if more bytes are needed.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        let Some(tag) = self.be64(self.pos) else {
            return Ok(None);
        };
        let rec = match tag {
            END_OF_STATE => (Record::EndOfState, 8),
            DEV_SETUP_STATE => (Record::Setup, 8),
            DEV_INIT_DATA_SENT => (Record::InitDataSent, 8),
            DEV_CONFIG_STATE | DEV_DATA_STATE => {
                let Some(len) = self.be64(self.pos + 8) else {
                    return Ok(None);
                };
                if len > MAX_RECORD {
                    return Err(StreamError::TooLong(len));
                }
                let start = self.pos + 16;
                let Some(body) = self.buf.get(start..start + len as usize) else {
                    return Ok(None);
                };
                let body = body.to_vec();
                let r = if tag == DEV_CONFIG_STATE {
                    Record::Config(body)
                } else {
                    Record::Data(body)
                };
                (r, 16 + len as usize)
            }
            other => return Err(StreamError::UnknownTag(other)),
        };
        self.pos += rec.1;
        if self.pos > (1 << 20) && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(rec.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_any_chunking() {
        let recs = vec![
            Record::Setup,
            Record::EndOfState,
            Record::Data(vec![1, 2, 3]),
            Record::InitDataSent,
            Record::Data(vec![]),
            Record::Config(vec![9; 100]),
            Record::EndOfState,
        ];
        let mut bytes = Vec::new();
        for r in &recs {
            r.encode(&mut bytes);
        }
        assert_eq!(&bytes[..8], &[0xff, 0xff, 0xff, 0xff, 0xef, 0x10, 0x00, 0x03]);
        for chunk in [1, 3, 7, 1000] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                d.feed(c);
                while let Some(r) = d.next_record().unwrap() {
                    got.push(r);
                }
            }
            assert_eq!(got, recs, "chunk {chunk}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn refuses_bad_records() {
        let mut d = Decoder::new();
        d.feed(&0x1234u64.to_be_bytes());
        assert_eq!(d.next_record(), Err(StreamError::UnknownTag(0x1234)));
        let mut d = Decoder::new();
        d.feed(&DEV_DATA_STATE.to_be_bytes());
        d.feed(&(MAX_RECORD + 1).to_be_bytes());
        assert_eq!(d.next_record(), Err(StreamError::TooLong(MAX_RECORD + 1)));
    }
}
