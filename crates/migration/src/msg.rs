//! Frame payloads: their fields and byte layouts (little-endian; `docs/protocol.md`).
//! Decoding checks lengths and values and never panics on what a peer sent.

use crate::error::WireError;

/// 3: the VM configuration carries a list of devices instead of one accelerator.
pub const VERSION: u16 = 4;
/// Capability bits of `Hello`.
pub const CAP_LZ4: u64 = 1;
pub const CAP_VERIFY: u64 = 2;
/// The side uses a pre-shared key: every frame after the `Hello`s carries an HMAC tag.
pub const CAP_PSK: u64 = 4;
/// Pages per `Pages` frame at most.
pub const MAX_RUN_PAGES: u32 = 64;
const MAX_REGIONS: u32 = 64;
/// Longest device list (`VmConfigMsg::devices`) a side reads.
pub const MAX_DEVICE_LIST: usize = 256;

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
    /// A fresh random number from each side of the control connection; the two make the
    /// session key (`session::key`). Page connections repeat the source's.
    pub nonce: u64,
    pub caps: u64,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let (role, ch) = match self.role {
            Role::Control => (0, 0),
            Role::Pages { channel } => (1, channel),
        };
        let mut w = Wr::default();
        w.u16(self.version).u8(role).u16(ch).u64(self.nonce).u64(self.caps);
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
            nonce: r.u64()?,
            caps: r.u64()?,
        };
        r.end()?;
        Ok(h)
    }
}

/// How a migration proves that the destination holds the source's guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    /// Nothing beyond the wire's own checks.
    Off = 0,
    /// The destination compares digests before it resumes; a mismatch rolls back.
    #[default]
    Gate = 1,
    /// The destination resumes at once and compares afterwards; a mismatch fails loudly.
    Audit = 2,
}

impl VerifyMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "gate" => Some(Self::Gate),
            "audit" => Some(Self::Audit),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Gate => "gate",
            Self::Audit => "audit",
        }
    }
    fn from_u8(v: u8) -> R<Self> {
        match v {
            0 => Ok(Self::Off),
            1 => Ok(Self::Gate),
            2 => Ok(Self::Audit),
            _ => Err(WireError::Malformed("unknown verification mode")),
        }
    }
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The VM's shape: the destination builds its VM from this and checks its memory map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfigMsg {
    pub mem_mib: u64,
    pub vcpus: u32,
    /// (gpa, size) of every RAM region, ascending.
    pub regions: Vec<(u64, u64)>,
    pub channels: u16,
    pub verify: VerifyMode,
    /// The source's peer timeout in milliseconds: the destination takes a commit only within
    /// half of the shorter of the two after its `Ready`, so it never resumes after the source
    /// stopped waiting for it.
    pub peer_timeout_ms: u32,
    /// The VM's devices as its VMM describes them (`vmm::DeviceSet::encode`): the engine
    /// carries the list and the destination's VMM rebuilds and checks it.
    pub devices: Vec<u8>,
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
            .u32(self.peer_timeout_ms)
            .u16(self.devices.len() as u16)
            .bytes(&self.devices);
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
        let verify = VerifyMode::from_u8(r.u8()?)?;
        let peer_timeout_ms = r.u32()?;
        if peer_timeout_ms == 0 {
            return Err(WireError::Malformed("a zero peer timeout"));
        }
        let n = r.u16()? as usize;
        if n > MAX_DEVICE_LIST {
            return Err(WireError::Malformed("device list too long"));
        }
        let devices = r.take(n)?.to_vec();
        r.end()?;
        Ok(Self {
            mem_mib,
            vcpus,
            regions,
            channels,
            verify,
            peer_timeout_ms,
            devices,
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

/// What verification compares (`digest`): a hash per 4 KiB page of guest RAM (index = page
/// frame number), one per device over its whole saved state, and one of the vCPU state
/// (`vmm::state::digest`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub vcpus: u32,
    /// Hash of the platform state (`digest::platform_hash` of `vmm::Snapshots::save_platform`).
    pub platform: u32,
    pub devices: Vec<u32>,
    pub pages: Vec<u32>,
}

/// Most pages a digest can describe in one frame.
pub const MAX_DIGEST_PAGES: usize = (crate::frame::MAX_DIGEST_PAYLOAD as usize - 1024) / 4;

impl Digest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u32(self.vcpus).u32(self.platform).u16(self.devices.len() as u16);
        for c in &self.devices {
            w.u32(*c);
        }
        w.u32(self.pages.len() as u32);
        for c in &self.pages {
            w.u32(*c);
        }
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let vcpus = r.u32()?;
        let platform = r.u32()?;
        let d = r.u16()? as usize;
        let mut devices = Vec::with_capacity(d);
        for _ in 0..d {
            devices.push(r.u32()?);
        }
        let n = r.u32()? as usize;
        if n > MAX_DIGEST_PAGES {
            return Err(WireError::Malformed("digest too long"));
        }
        let mut pages = Vec::with_capacity(n);
        for _ in 0..n {
            pages.push(r.u32()?);
        }
        r.end()?;
        Ok(Self {
            vcpus,
            platform,
            devices,
            pages,
        })
    }
    /// What differs between the two, in words; `None` when they are equal.
    pub fn mismatch(&self, o: &Digest) -> Option<String> {
        let mut why = Vec::new();
        if self.pages.len() != o.pages.len() {
            why.push(format!(
                "the memory digests cover {} and {} pages",
                self.pages.len(),
                o.pages.len()
            ));
        } else {
            let mut bad = (0..self.pages.len()).filter(|&i| self.pages[i] != o.pages[i]);
            if let Some(first) = bad.next() {
                let more: Vec<usize> = bad.collect();
                why.push(format!(
                    "{} page(s) of guest memory differ, the first at {:#x}",
                    more.len() + 1,
                    first as u64 * 4096
                ));
            }
        }
        if self.devices != o.devices {
            why.push(format!(
                "device state differs ({:08x?} against {:08x?})",
                self.devices, o.devices
            ));
        }
        if self.vcpus != o.vcpus {
            why.push(format!(
                "vCPU state differs ({:08x} against {:08x})",
                self.vcpus, o.vcpus
            ));
        }
        if self.platform != o.platform {
            why.push(format!(
                "platform (vIOMMU) state differs ({:08x} against {:08x})",
                self.platform, o.platform
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// The destination holds the whole guest, checked, and waits for `Commit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// From `Complete` to ready: the last pages applied, devices validated, vCPUs loaded.
    pub load_ns: u64,
    /// Of that, comparing digests (gate).
    pub verify_ns: u64,
}

impl Ready {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u64(self.load_ns).u64(self.verify_ns);
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let v = Self {
            load_ns: r.u64()?,
            verify_ns: r.u64()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// The destination's vCPUs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Running {
    /// `CLOCK_MONOTONIC` when the last vCPU was running, in nanoseconds.
    pub resumed_ns: u64,
    /// This kernel's boot id: equal on both sides, the two clocks are one.
    pub boot: u64,
}

impl Running {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u64(self.resumed_ns).u64(self.boot);
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let v = Self {
            resumed_ns: r.u64()?,
            boot: r.u64()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// The destination's account after its guest resumed: when the guest first made progress,
/// and with verification, the guest's progress and (audit) the digest comparison.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `CLOCK_MONOTONIC` of the guest's first visible progress; 0: none seen.
    pub first_progress_ns: u64,
    /// Whether the progress counters below were checked.
    pub checked: bool,
    pub pages_before: u64,
    pub pages_after: u64,
    pub jobs_before: u64,
    pub jobs_after: u64,
    pub guest_errors: u64,
    /// Why verification failed; empty when it passed or was not asked for.
    pub reason: String,
    /// The destination stopped and discarded its guest (after a failed verification).
    pub discarded: bool,
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Wr::default();
        w.u64(self.first_progress_ns).u8(self.checked as u8);
        w.u64(self.pages_before)
            .u64(self.pages_after)
            .u64(self.jobs_before)
            .u64(self.jobs_after)
            .u64(self.guest_errors)
            .str(&self.reason)
            .u8(self.discarded as u8);
        w.0
    }
    pub fn decode(b: &[u8]) -> R<Self> {
        let mut r = Rd::new(b);
        let v = Self {
            first_progress_ns: r.u64()?,
            checked: r.bool()?,
            pages_before: r.u64()?,
            pages_after: r.u64()?,
            jobs_before: r.u64()?,
            jobs_after: r.u64()?,
            guest_errors: r.u64()?,
            reason: r.str(4096)?,
            discarded: r.bool()?,
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

pub fn decode_u32(b: &[u8]) -> R<u32> {
    let mut r = Rd::new(b);
    let v = r.u32()?;
    r.end()?;
    Ok(v)
}

pub fn decode_u16(b: &[u8]) -> R<u16> {
    let mut r = Rd::new(b);
    let v = r.u16()?;
    r.end()?;
    Ok(v)
}

pub fn decode_empty(b: &[u8]) -> R<()> {
    Rd::new(b).end()
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
