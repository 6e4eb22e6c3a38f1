//! vCPU state that moves between VM instances, and its binary form.
//!
//! Encoding (little-endian): magic `b"LMVCPUST"`, u32 version, u32 vCPU count, then per vCPU
//! a u32 id, a u32 record count and records `{u8 kind, u32 length, bytes}`, and finally a
//! CRC32C of everything before it. Each record is one KVM struct in its kernel layout; its
//! length must be that struct's size exactly. Loading checks the magic, the version, the
//! checksum, the lengths, and that the vCPU count is the target VM's, before anything touches
//! a vCPU.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

pub const MAGIC: &[u8; 8] = b"LMVCPUST";
pub const VERSION: u32 = 1;

/// Everything a vCPU needs to continue on another VM instance.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state: the legacy 4 KiB XSAVE area (`struct kvm_xsave`), as bytes.
    pub xsave: Vec<u8>,
    pub xcrs: Option<kvm_xcrs>,
    /// Saved MSRs, the TSC among them.
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
}

/// Why a saved state was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    #[error("not a livemig vCPU state (bad magic)")]
    BadMagic,
    #[error("vCPU state version {found} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("vCPU state is truncated")]
    Truncated,
    #[error("vCPU state checksum mismatch")]
    Checksum,
    #[error("vCPU state holds {found} vCPUs, the VM has {expected}")]
    WrongVcpuCount { found: u32, expected: u32 },
    #[error("vCPU {vcpu}: record {kind} has {len} bytes")]
    BadRecord { vcpu: u32, kind: u8, len: u32 },
    #[error("vCPU {vcpu}: record {kind} missing")]
    MissingRecord { vcpu: u32, kind: u8 },
}

const R_REGS: u8 = 1;
const R_SREGS: u8 = 2;
const R_XSAVE: u8 = 3;
const R_XCRS: u8 = 4;
const R_MSR: u8 = 5;
const R_LAPIC: u8 = 6;
const R_EVENTS: u8 = 7;
const R_DEBUGREGS: u8 = 8;
const R_MP_STATE: u8 = 9;

fn put(out: &mut Vec<u8>, kind: u8, bytes: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes the states of all vCPUs of a VM.
pub fn encode(vcpus: &[VcpuState]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(vcpus.len() as u32).to_le_bytes());
    for v in vcpus {
        out.extend_from_slice(&v.id.to_le_bytes());
        let records = 7 + v.xcrs.is_some() as u32 + v.msrs.len() as u32;
        out.extend_from_slice(&records.to_le_bytes());
        put(&mut out, R_REGS, v.regs.as_bytes());
        put(&mut out, R_SREGS, v.sregs.as_bytes());
        put(&mut out, R_XSAVE, &v.xsave);
        if let Some(x) = &v.xcrs {
            put(&mut out, R_XCRS, x.as_bytes());
        }
        for m in &v.msrs {
            put(&mut out, R_MSR, m.as_bytes());
        }
        put(&mut out, R_LAPIC, v.lapic.as_bytes());
        put(&mut out, R_EVENTS, v.events.as_bytes());
        put(&mut out, R_DEBUGREGS, v.debugregs.as_bytes());
        put(&mut out, R_MP_STATE, v.mp_state.as_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// `MSR_IA32_TSC`: the guest's TSC keeps counting while a vCPU is paused, so a restored
/// vCPU reads back a later value than the one it was given.
const MSR_IA32_TSC: u32 = 0x10;

/// CRC32C of the architectural state a migration must carry exactly, for end-to-end
/// verification: registers, segment and control registers, the FPU/SSE area, XCRs, debug
/// registers, MP state, the LAPIC's registers and every saved MSR but the TSC. Left out is
/// what KVM recomputes from the clock while a vCPU is paused or after a load (the TSC, the
/// LAPIC timer's current count) and pending events, which KVM may deliver or fold on load.
/// A state that went through a save, a restore into another VM and a second save has the
/// same digest (`tests/devices.rs`).
pub fn digest(vcpus: &[VcpuState]) -> u32 {
    let mut crc = 0u32;
    for v in vcpus {
        let mut lapic = v.lapic;
        // APIC_TMCCT: the timer's current count, recomputed from the clock on every read.
        lapic.regs[0x390..0x394].fill(0);
        for b in [
            &v.id.to_le_bytes()[..],
            v.regs.as_bytes(),
            v.sregs.as_bytes(),
            &v.xsave,
            v.xcrs.as_ref().map_or(&[][..], |x| x.as_bytes()),
            v.debugregs.as_bytes(),
            v.mp_state.as_bytes(),
            lapic.as_bytes(),
        ] {
            crc = crc32c::crc32c_append(crc, b);
        }
        for m in v.msrs.iter().filter(|m| m.index != MSR_IA32_TSC) {
            crc = crc32c::crc32c_append(crc, m.as_bytes());
        }
    }
    crc
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let s = self
            .b
            .get(self.pos..self.pos.checked_add(n).ok_or(StateError::Truncated)?)
            .ok_or(StateError::Truncated)?;
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
}

fn read_as<T: FromBytes>(vcpu: u32, kind: u8, bytes: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::BadRecord {
        vcpu,
        kind,
        len: bytes.len() as u32,
    })
}

/// Decodes and validates states for a VM with `expected_vcpus` vCPUs.
pub fn decode(bytes: &[u8], expected_vcpus: u32) -> Result<Vec<VcpuState>, StateError> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(if bytes.len() < 8 && MAGIC.starts_with(bytes) {
            StateError::Truncated
        } else {
            StateError::BadMagic
        });
    }
    let mut r = Reader { b: bytes, pos: 8 };
    let version = r.u32()?;
    if version != VERSION {
        return Err(StateError::UnsupportedVersion { found: version });
    }
    if bytes.len() < 20 {
        return Err(StateError::Truncated);
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(tail.try_into().expect("4 bytes")) {
        // A short buffer fails the checksum too; say which it is.
        return Err(if decode_structure(&Reader { b: body, pos: 12 }).is_err() {
            StateError::Truncated
        } else {
            StateError::Checksum
        });
    }
    let mut r = Reader { b: body, pos: 12 };
    let count = r.u32()?;
    if count != expected_vcpus {
        return Err(StateError::WrongVcpuCount {
            found: count,
            expected: expected_vcpus,
        });
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let id = r.u32()?;
        let n = r.u32()?;
        let mut regs = None;
        let mut sregs = None;
        let mut xsave = None;
        let mut xcrs = None;
        let mut msrs = Vec::new();
        let mut lapic = None;
        let mut events = None;
        let mut debugregs = None;
        let mut mp = None;
        for _ in 0..n {
            let kind = r.take(1)?[0];
            let len = r.u32()?;
            let data = r.take(len as usize)?;
            match kind {
                R_REGS => regs = Some(read_as::<kvm_regs>(id, kind, data)?),
                R_SREGS => sregs = Some(read_as::<kvm_sregs>(id, kind, data)?),
                R_XSAVE => xsave = Some(read_as::<kvm_xsave>(id, kind, data)?.as_bytes().to_vec()),
                R_XCRS => xcrs = Some(read_as::<kvm_xcrs>(id, kind, data)?),
                R_MSR => msrs.push(read_as::<kvm_msr_entry>(id, kind, data)?),
                R_LAPIC => lapic = Some(read_as::<kvm_lapic_state>(id, kind, data)?),
                R_EVENTS => events = Some(read_as::<kvm_vcpu_events>(id, kind, data)?),
                R_DEBUGREGS => debugregs = Some(read_as::<kvm_debugregs>(id, kind, data)?),
                R_MP_STATE => mp = Some(read_as::<kvm_mp_state>(id, kind, data)?),
                _ => return Err(StateError::BadRecord { vcpu: id, kind, len }),
            }
        }
        let missing = |k| StateError::MissingRecord { vcpu: id, kind: k };
        out.push(VcpuState {
            id,
            regs: regs.ok_or(missing(R_REGS))?,
            sregs: sregs.ok_or(missing(R_SREGS))?,
            xsave: xsave.ok_or(missing(R_XSAVE))?,
            xcrs,
            msrs,
            lapic: lapic.ok_or(missing(R_LAPIC))?,
            events: events.ok_or(missing(R_EVENTS))?,
            debugregs: debugregs.ok_or(missing(R_DEBUGREGS))?,
            mp_state: mp.ok_or(missing(R_MP_STATE))?,
        });
    }
    if r.pos != body.len() {
        return Err(StateError::BadRecord {
            vcpu: count,
            kind: 0,
            len: (body.len() - r.pos) as u32,
        });
    }
    Ok(out)
}

/// Walks the record structure without interpreting it (to tell truncation from corruption).
fn decode_structure(r: &Reader<'_>) -> Result<(), StateError> {
    let mut r = Reader { b: r.b, pos: r.pos };
    let count = r.u32()?;
    for _ in 0..count {
        r.u32()?;
        let n = r.u32()?;
        for _ in 0..n {
            r.take(1)?;
            let len = r.u32()?;
            r.take(len as usize)?;
        }
    }
    if r.pos == r.b.len() {
        Ok(())
    } else {
        Err(StateError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u32) -> VcpuState {
        let mut regs = kvm_regs {
            rip: 0x10_0000 + id as u64,
            rax: 42,
            ..Default::default()
        };
        regs.rflags = 2;
        VcpuState {
            id,
            regs,
            sregs: kvm_sregs {
                cr3: 0x9000,
                ..Default::default()
            },
            xsave: kvm_xsave::default().as_bytes().to_vec(),
            xcrs: Some(kvm_xcrs::default()),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 123_456,
                ..Default::default()
            }],
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            mp_state: kvm_mp_state::default(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let s = vec![sample(0), sample(1)];
        let b = encode(&s);
        assert_eq!(decode(&b, 2).unwrap(), s);
        assert_eq!(
            decode(&b, 1).unwrap_err(),
            StateError::WrongVcpuCount { found: 2, expected: 1 }
        );
        let mut v = b.clone();
        v[8] = 9;
        assert_eq!(decode(&v, 2).unwrap_err(), StateError::UnsupportedVersion { found: 9 });
        assert_eq!(decode(&b[..b.len() / 2], 2).unwrap_err(), StateError::Truncated);
        assert_eq!(decode(&b[..5], 2).unwrap_err(), StateError::Truncated);
        let mut c = b.clone();
        c[100] ^= 1;
        assert_eq!(decode(&c, 2).unwrap_err(), StateError::Checksum);
        assert_eq!(decode(b"nonsense-bytes-here", 2).unwrap_err(), StateError::BadMagic);
    }
}
