//! Errors of the wire and of the engine.

use thiserror::Error;

/// Something wrong with the bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("the peer stalled: nothing arrived within the peer timeout")]
    Stalled,
    #[error("I/O error ({0:?}): {1}")]
    Io(std::io::ErrorKind, String),
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLong(u32),
    #[error("frame {seq} failed its CRC32C check")]
    Checksum { seq: u64 },
    #[error(
        "frame {seq} does not verify under the pre-shared key: the peers hold different keys, or the stream was altered"
    )]
    Unauthentic { seq: u64 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame out of sequence: expected {expected}, found {found}")]
    Sequence { expected: u64, found: u64 },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("unexpected {found:?} frame while waiting for {expected}")]
    Unexpected {
        found: crate::frame::Kind,
        expected: &'static str,
    },
    #[error("protocol version {0} is not supported (this side speaks {1})")]
    Version(u16, u16),
    #[error("page run at {gpa:#x} of {pages} pages is outside the memory map")]
    OutOfMap { gpa: u64, pages: u64 },
    #[error("page run data does not decode to {pages} pages: {why}")]
    BadPageData { pages: u64, why: String },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e.kind(), e.to_string())
    }
}

/// Why a migration failed.
#[derive(Debug, Error)]
pub enum MigError {
    #[error("connection to {what}: {source}")]
    Connect {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wire")]
    Wire(#[from] WireError),
    #[error("the peer reported an error: {0}")]
    Peer(String),
    #[error("sending to the peer: {0}")]
    Send(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("incompatible configuration: {0}")]
    Incompatible(String),
    #[error("VM")]
    Vm(#[from] vmm::VmError),
    #[error("device migration")]
    Device(#[from] vfio::vmm::VfioMigError),
    #[error("{op} failed")]
    Iommu {
        op: &'static str,
        #[source]
        errno: iommu::Errno,
    },
    #[error("migration cancelled")]
    Cancelled,
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Other(String),
}

impl From<std::io::Error> for MigError {
    fn from(e: std::io::Error) -> Self {
        MigError::Wire(e.into())
    }
}

impl MigError {
    /// The whole chain, for reports and error frames.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}
