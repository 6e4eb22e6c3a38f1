//! Frame payloads: their fields and byte layouts (little-endian; `docs/protocol.md`).
//! Decoding checks lengths and values and never panics on what a peer sent.

use crate::error::WireError;

pub const VERSION: u16 = 1;
/// Capability bits of `Hello`.
pub const CAP_LZ4: u64 = 1;
pub const CAP_VERIFY: u64 = 2;
/// Pages per `Pages` frame at most.
pub const MAX_RUN_PAGES: u32 = 64;
const MAX_NAME: usize = 64;
const MAX_REGIONS: u32 = 64;

type R<T> = Result<T, WireError>;

/// A cursor over a payload.
pub struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self(b)
    }
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.0.len() < n {
            return Err(WireError::Malformed("payload shorter than its fields"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn bool(&mut self) -> R<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("boolean is neither 0 nor 1")),
        }
    }
    pub fn str(&mut self, max: usize) -> R<String> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(WireError::Malformed("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Malformed("string is not UTF-8"))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    pub fn end(&self) -> R<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("trailing bytes after the last field"))
        }
    }
}

/// Appending writer.
#[derive(Default)]
pub struct Wr(pub Vec<u8>);

impl Wr {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Control,
    Pages { channel: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// Ties page channels to their control connection.
    pub session: u64,
    pub caps: u64,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let (role, ch) = match self.role {
            Role::Control => (0, 0),
            Role::Pages { channel } => (1, channel),
        };
        let mut w = Wr::default();
        w.u16(self.version).u8(role).u16(ch).u64(self.session).u64(self.caps);
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let version = r.u16()?;
        let role = match (r.u8()?, r.u16()?) {
            (0, 0) => Role::Control,
            (1, channel) => Role::Pages { channel },
            _ => return Err(WireError::Malformed("unknown connection role")),
        };
        let h = Hello {
            version,
            role,
            session: r.u64()?,
            caps: r.u64()?,
        };
        r.end()?;
        Ok(h)
    }
}

/// The accelerator as the source has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelDesc {
    pub name: String,
    pub flags: u32,
    pub format: u8,
    pub huge_pages: bool,
    pub qp_num: u32,
    pub dev_id: u32,
    pub que_iso_cfg: u32,
    pub qp_base: u32,
    pub dma_logging: bool,
}

/// The VM's shape: the destination builds its VM from this and checks its memory map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfigMsg {
    pub mem_mib: u64,
    pub vcpus: u32,
    /// (gpa, size) of every RAM region, ascending.
    pub regions: Vec<(u64, u64)>,
    pub channels: u16,
    pub verify: bool,
    pub accel: Option<AccelDesc>,
}

impl VmConfigMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u64(self.mem_mib).u32(self.vcpus).u32(self.regions.len() as u32);
        for &(g, s) in &self.regions {
            w.u64(g).u64(s);
        }
        w.u16(self.channels)
            .u8(self.verify as u8)
            .u8(self.accel.is_some() as u8);
        if let Some(a) = &self.accel {
            w.str(&a.name).u32(a.flags).u8(a.format).u8(a.huge_pages as u8);
            w.u32(a.qp_num)
                .u32(a.dev_id)
                .u32(a.que_iso_cfg)
                .u32(a.qp_base)
                .u8(a.dma_logging as u8);
        }
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let mem_mib = r.u64()?;
        let vcpus = r.u32()?;
        let n = r.u32()?;
        if n == 0 || n > MAX_REGIONS {
            return Err(WireError::Malformed("region count out of range"));
        }
        let mut regions = Vec::new();
        for _ in 0..n {
            regions.push((r.u64()?, r.u64()?));
        }
        let channels = r.u16()?;
        let verify = r.bool()?;
        let accel = if r.bool()? {
            Some(AccelDesc {
                name: r.str(MAX_NAME)?,
                flags: r.u32()?,
                format: r.u8()?,
                huge_pages: r.bool()?,
                qp_num: r.u32()?,
                dev_id: r.u32()?,
                que_iso_cfg: r.u32()?,
                qp_base: r.u32()?,
                dma_logging: r.bool()?,
            })
        } else {
            None
        };
        r.end()?;
        Ok(Self {
            mem_mib,
            vcpus,
            regions,
            channels,
            verify,
            accel,
        })
    }
}

/// How a page run's data is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw = 0,
    Zero = 1,
    Lz4 = 2,
}

/// The 16-byte head of a `Pages` payload; the data follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesHead {
    pub gpa: u64,
    pub pages: u32,
    pub encoding: Encoding,
}

pub const PAGES_HEAD: usize = 16;

impl PagesHead {
    pub fn encode_into(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(&self.gpa.to_le_bytes());
        w.extend_from_slice(&self.pages.to_le_bytes());
        w.extend_from_slice(&[self.encoding as u8, 0, 0, 0]);
    }
    /// The head and the data; checks the encoding, the run length and the data length
    /// (raw: exactly the pages; zero: none; lz4: non-empty).
    pub fn decode(b: &[u8]) -> R<(Self, &[u8])> {
        let mut r = Rd::new(b);
        let gpa = r.u64()?;
        let pages = r.u32()?;
        let enc = r.u8()?;
        if r.take(3)? != [0, 0, 0] {
            return Err(WireError::Malformed("reserved bytes of a page run are not zero"));
        }
        let data = r.rest();
        let encoding = match enc {
            0 => Encoding::Raw,
            1 => Encoding::Zero,
            2 => Encoding::Lz4,
            _ => return Err(WireError::Malformed("unknown page encoding")),
        };
        if pages == 0 || pages > MAX_RUN_PAGES {
            return Err(WireError::Malformed("page run length out of range"));
        }
        if gpa % 4096 != 0 {
            return Err(WireError::Malformed("page run address not page aligned"));
        }
        let ok = match encoding {
            Encoding::Raw => data.len() == pages as usize * 4096,
            Encoding::Zero => data.is_empty(),
            Encoding::Lz4 => !data.is_empty() && data.len() < pages as usize * 4096,
        };
        if !ok {
            return Err(WireError::Malformed("page run data length does not match its encoding"));
        }
        Ok((Self { gpa, pages, encoding }, data))
    }
}

/// Per-MiB CRC32C of guest memory, and CRC32C of each device's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub chunk_bytes: u32,
    pub chunks: Vec<u32>,
    pub devices: Vec<u32>,
}

impl Digest {
    pub fn encode_into(&self, w: &mut Wr) {
        w.u32(self.chunk_bytes).u32(self.chunks.len() as u32);
        for c in &self.chunks {
            w.u32(*c);
        }
        w.u16(self.devices.len() as u16);
        for c in &self.devices {
            w.u32(*c);
        }
    }
    pub fn decode_from(r: &mut Rd<'_>) -> R<Self> {
        let chunk_bytes = r.u32()?;
        let n = r.u32()? as usize;
        if n > crate::frame::MAX_PAYLOAD as usize / 4 {
            return Err(WireError::Malformed("digest too long"));
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            chunks.push(r.u32()?);
        }
        let d = r.u16()? as usize;
        let mut devices = Vec::new();
        for _ in 0..d {
            devices.push(r.u32()?);
        }
        Ok(Self {
            chunk_bytes,
            chunks,
            devices,
        })
    }
    /// The first memory chunk that differs, as a guest-physical address, and how many differ.
    pub fn mismatch(&self, o: &Digest) -> Option<String> {
        if self.chunk_bytes != o.chunk_bytes || self.chunks.len() != o.chunks.len() {
            return Some("memory digests have different shapes".into());
        }
        let bad: Vec<usize> = (0..self.chunks.len())
            .filter(|&i| self.chunks[i] != o.chunks[i])
            .collect();
        if let Some(&first) = bad.first() {
            return Some(format!(
                "{} MiB chunk(s) of guest memory differ, the first at {:#x}",
                bad.len(),
                first as u64 * self.chunk_bytes as u64
            ));
        }
        if self.devices != o.devices {
            return Some(format!(
                "device state differs: {:08x?} vs {:08x?}",
                self.devices, o.devices
            ));
        }
        None
    }
}

/// The destination's acknowledgement: its vCPUs are running.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Time the destination spent verifying before resuming (excluded from downtime).
    pub verify_ns: u64,
    /// From its vCPUs running to this frame being sent.
    pub since_running_ns: u64,
    pub digest: Option<Digest>,
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u64(self.verify_ns)
            .u64(self.since_running_ns)
            .u8(self.digest.is_some() as u8);
        if let Some(d) = &self.digest {
            d.encode_into(&mut w);
        }
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let verify_ns = r.u64()?;
        let since_running_ns = r.u64()?;
        let digest = if r.bool()? {
            Some(Digest::decode_from(&mut r)?)
        } else {
            None
        };
        r.end()?;
        Ok(Self {
            verify_ns,
            since_running_ns,
            digest,
        })
    }
}

/// The destination's verdict after its guest ran on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub digest_ok: bool,
    pub pages_before: u64,
    pub pages_after: u64,
    pub jobs_before: u64,
    pub jobs_after: u64,
    pub guest_errors: u64,
    pub reason: String,
}

impl VerifyReport {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u8(self.digest_ok as u8).u64(self.pages_before).u64(self.pages_after);
        w.u64(self.jobs_before)
            .u64(self.jobs_after)
            .u64(self.guest_errors)
            .str(&self.reason);
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let v = Self {
            digest_ok: r.bool()?,
            pages_before: r.u64()?,
            pages_after: r.u64()?,
            jobs_before: r.u64()?,
            jobs_after: r.u64()?,
            guest_errors: r.u64()?,
            reason: r.str(4096)?,
        };
        r.end()?;
        Ok(v)
    }
}

/// `(device index, bytes)` of a `DeviceData` frame.
pub fn encode_device_data(dev: u16, data: &[u8]) -> Vec<u8> {
    let mut w = Wr::default();
    w.u16(dev).bytes(data);
    w.0
}

pub fn decode_device_data(b: &[u8]) -> R<(u16, &[u8])> {
    let mut r = Rd::new(b);
    Ok((r.u16()?, r.rest()))
}

pub fn encode_u32_u64(a: u32, b: u64) -> Vec<u8> {
    let mut w = Wr::default();
    w.u32(a).u64(b);
    w.0
}

pub fn decode_u32_u64(b: &[u8]) -> R<(u32, u64)> {
    let mut r = Rd::new(b);
    let v = (r.u32()?, r.u64()?);
    r.end()?;
    Ok(v)
}

pub fn encode_str(s: &str) -> Vec<u8> {
    let mut w = Wr::default();
    w.str(s);
    w.0
}

pub fn decode_str(b: &[u8]) -> R<String> {
    let mut r = Rd::new(b);
    let s = r.str(4096)?;
    r.end()?;
    Ok(s)
}
