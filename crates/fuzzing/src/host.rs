//! What a VMM host parses: saved vCPU state, control-socket requests, and the iommufd ABI.

use crate::{split_first, Verdict};
use iommu::{AnonMemory, FormatKind, HostMemory};
use iommufd::*;
use livemig::control::Request;
use std::sync::Arc;

/// Mode byte: bits 0..1 are the vCPU count less one; bit 2 set replaces the last four bytes
/// with the CRC32C of the rest, so the checks past the checksum are reached. A state that
/// decodes must decode again, equal, from its own encoding.
pub fn vcpu_state(data: &[u8]) -> Verdict {
    let (mode, rest) = split_first(data);
    let mut bytes = rest.to_vec();
    if mode & 4 != 0 && bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
    let vcpus = (mode & 3) as u32 + 1;
    match vmm::state::decode(&bytes, vcpus) {
        Ok(v) => {
            let again = vmm::state::decode(&vmm::state::encode(&v), vcpus);
            assert!(
                matches!(&again, Ok(a) if *a == v),
                "a decoded state does not survive its encoding"
            );
            Verdict::Accepted
        }
        Err(_) => Verdict::Refused,
    }
}

/// A request line as the control socket gets it; a `migrate` is checked as far as it can be
/// without opening files (a transport option names files, which the fuzzer must not read).
pub fn control_json(data: &[u8]) -> Verdict {
    let Ok(line) = std::str::from_utf8(data) else {
        return Verdict::Refused;
    };
    match Request::parse(line) {
        Ok(Request::Migrate(a)) => {
            let files = a.tls_cert.is_some() || a.tls_key.is_some() || a.tls_ca.is_some() || a.psk_file.is_some();
            (files || a.options().is_ok()).into()
        }
        Ok(_) => Verdict::Accepted,
        Err(_) => Verdict::Refused,
    }
}

/// The commands the ABI knows, and one it does not.
const CMDS: [u32; 12] = [
    IOMMU_DESTROY,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_ALLOW_IOVAS,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_UNMAP,
    IOMMU_OPTION,
    IOMMU_HWPT_ALLOC,
    IOMMU_GET_HW_INFO,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    iommufd_cmd(0xff),
];

/// User memory the calls may point into, at a fixed stand-in address: a pointer field the
/// fuzzer sets to [`USER_BASE`] + k is moved to the real buffer's address + k before the call
/// (the real one differs from run to run).
pub const USER_BASE: u64 = 0x7e57_0000_0000;
pub const USER_LEN: u64 = 64 << 10;

/// A sequence of calls, each `[selector][length][length bytes of the argument]`, on a fresh
/// context with 64 KiB of user memory and two devices bound (dev ids 1 and 2, AMD and VT-d
/// formats). Selector: the low four bits pick the command (modulo 12); bit 7 set writes the
/// argument's own length into its `size` field. Accepted when any call succeeded.
pub fn iommufd_ioctl(data: &[u8]) -> Verdict {
    ioctl_calls(data).iter().any(Result::is_ok).into()
}

/// [`iommufd_ioctl`]'s calls and what each returned.
pub fn ioctl_calls(data: &[u8]) -> Vec<Result<(), Errno>> {
    let fd = IommuFd::new();
    let mem = Arc::new(AnonMemory::new(USER_LEN as usize, false).expect("fuzz user memory"));
    let va = fd.register_user_memory(mem as Arc<dyn HostMemory>);
    fd.bind_device(DeviceSpec::new("a", FormatKind::AmdV1));
    fd.bind_device(DeviceSpec::new("b", FormatKind::VtdSs));
    let mut rest = data;
    let mut out = Vec::new();
    for _ in 0..64 {
        let [sel, len, tail @ ..] = rest else {
            break;
        };
        let (arg, next) = tail.split_at((*len as usize).min(tail.len()));
        rest = next;
        let mut arg = arg.to_vec();
        if sel & 0x80 != 0 && arg.len() >= 4 {
            let n = arg.len() as u32;
            arg[..4].copy_from_slice(&n.to_le_bytes());
        }
        for field in arg.chunks_exact_mut(8) {
            let v = u64::from_le_bytes(field.try_into().expect("8 bytes"));
            if (USER_BASE..USER_BASE + USER_LEN).contains(&v) {
                field.copy_from_slice(&(va + (v - USER_BASE)).to_le_bytes());
            }
        }
        out.push(fd.ioctl(CMDS[(sel & 0xf) as usize % CMDS.len()], &mut arg));
    }
    out
}
