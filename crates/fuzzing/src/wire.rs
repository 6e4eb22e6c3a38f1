//! The migration wire: frames as a stream, and every payload's decoder.

use crate::{split_first, Verdict};
use migration::digest::PageLog;
use migration::frame::{FrameReader, Kind};
use migration::msg::{self, Digest, Hello, Ready, Report, Running, VmConfigMsg};
use migration::pages::{MemoryMap, RunDecoder};
use std::cell::RefCell;
use std::fmt::Debug;
use std::io::Read;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM for page runs: two regions with a hole between, so runs that straddle a region
/// edge or land in the hole are tried too.
const REGIONS: [(u64, u64); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

/// A reader that hands out at most `max` bytes per `read`, as a socket may.
struct Trickle<'a> {
    data: &'a [u8],
    max: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.max).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Mode byte: bit 0 set reads frames as TLS carries them (no CRC), clear checks CRCs under
/// session key 0; bits 1..7 bound each read (0: unbounded).
pub fn frame_stream(data: &[u8]) -> Verdict {
    let (mode, stream) = split_first(data);
    let max = match (mode >> 1) as usize {
        0 => usize::MAX,
        n => n,
    };
    let mut r = FrameReader::new(Trickle { data: stream, max });
    if mode & 1 != 0 {
        r.trust_transport();
    }
    loop {
        match r.read_frame() {
            Ok(Some(f)) => {
                payload(f.kind, &f.payload);
            }
            Ok(None) => return Verdict::Accepted,
            Err(_) => return Verdict::Refused,
        }
    }
}

/// First byte: the frame kind whose decoder gets the rest.
pub fn message(data: &[u8]) -> Verdict {
    let (kind, p) = split_first(data);
    match Kind::from_u8(kind) {
        Some(k) => payload(k, p).into(),
        None => Verdict::Refused,
    }
}

/// Decodes `p` as the payload of a `kind` frame, as the receiving side does; true if it was
/// accepted. A value that decodes must decode again, equal, from its own encoding.
fn payload(kind: Kind, p: &[u8]) -> bool {
    match kind {
        Kind::Hello => round_trip(Hello::decode(p), |v| Hello::decode(&v.encode())),
        Kind::Config => {
            let cfg = VmConfigMsg::decode(p);
            if let Ok(c) = &cfg {
                device_list(&c.devices);
            }
            round_trip(cfg, |v| VmConfigMsg::decode(&v.encode()))
        }
        Kind::ConfigOk | Kind::Switchover | Kind::Complete | Kind::Commit => msg::decode_empty(p).is_ok(),
        Kind::Pages => pages(p),
        Kind::DeviceData => match msg::decode_device_data(p) {
            Ok((dev, data)) => {
                let again = msg::encode_device_data(dev, data);
                assert_eq!(msg::decode_device_data(&again).ok(), Some((dev, data)));
                crate::device::decode_stream(data, usize::MAX).is_ok()
            }
            Err(_) => false,
        },
        Kind::EndOfIteration => round_trip(msg::decode_u32_u64(p), |&(a, b)| {
            msg::decode_u32_u64(&msg::encode_u32_u64(a, b))
        }),
        Kind::VcpuState => vmm::state::decode(p, 1).is_ok(),
        Kind::PlatformState => vmm::viommu::parse_platform(p).is_ok(),
        Kind::InitAck => msg::decode_u16(p).is_ok(),
        Kind::IterationAck => msg::decode_u32(p).is_ok(),
        Kind::Ready => round_trip(Ready::decode(p), |v| Ready::decode(&v.encode())),
        Kind::Digest => round_trip(Digest::decode(p), |v| Digest::decode(&v.encode())),
        Kind::Report => round_trip(Report::decode(p), |v| Report::decode(&v.encode())),
        Kind::Running => round_trip(Running::decode(p), |v| Running::decode(&v.encode())),
        Kind::Error => round_trip(msg::decode_str(p), |v| msg::decode_str(&msg::encode_str(v))),
    }
}

/// The destination VMM's reading of a configuration's device list: never a panic, and a list
/// it accepts encodes back to the same bytes (so nothing in it was ignored).
fn device_list(b: &[u8]) {
    if let Ok(set) = vmm::DeviceSet::decode(b, None) {
        assert_eq!(set.encode(), b, "an accepted device list re-encodes differently");
    }
}

fn round_trip<T: PartialEq + Debug, E: Debug>(first: Result<T, E>, again: impl Fn(&T) -> Result<T, E>) -> bool {
    match first {
        Ok(v) => {
            let w = again(&v);
            assert!(
                matches!(&w, Ok(w) if *w == v),
                "decoded {v:?}, which its own encoding decodes as {w:?}"
            );
            true
        }
        Err(_) => false,
    }
}

struct Ram {
    mem: GuestMemoryMmap,
    dec: RunDecoder,
}

thread_local! {
    static RAM: RefCell<Option<Ram>> = const { RefCell::new(None) };
}

/// Applies a `Pages` payload to guest RAM as the destination does. Whatever it accepts lies
/// inside the map and is logged as received, page by page.
fn pages(p: &[u8]) -> bool {
    RAM.with(|ram| {
        let mut ram = ram.borrow_mut();
        let ram = ram.get_or_insert_with(|| Ram {
            mem: GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(g, s)| (GuestAddress(g), s as usize)))
                .expect("fuzz guest memory"),
            dec: RunDecoder::new(),
        });
        let map = MemoryMap {
            regions: REGIONS.to_vec(),
        };
        let log = PageLog::new((REGIONS[1].0 + REGIONS[1].1) / 4096, true);
        match ram.dec.apply(p, &map, &ram.mem, &log) {
            Ok(n) => {
                let (head, _) = msg::PagesHead::decode(p).expect("an applied run has a valid head");
                assert_eq!(n, head.pages as u64);
                assert!(map.contains(head.gpa, n), "applied outside the map");
                let first = head.gpa / 4096;
                assert!(
                    (first..first + n).all(|pfn| log.received(pfn)),
                    "a page applied but not logged"
                );
                true
            }
            Err(_) => false,
        }
    })
}
