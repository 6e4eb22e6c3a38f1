//! Property tests of the wire format: every message round-trips, arbitrary bytes never
//! panic a decoder, and page runs of any content arrive bit-exact.

use migration::frame::{encode, FrameReader, Kind};
use migration::msg::*;
use migration::pages::{MemoryMap, PageStats, RunDecoder, RunEncoder};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn accel() -> impl Strategy<Value = Option<AccelDesc>> {
    proptest::option::of(
        (
            "[a-z]{0,12}",
            any::<u32>(),
            0u8..3,
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(
                |(name, flags, format, huge_pages, qp_num, dev_id, que_iso_cfg, qp_base, dma_logging)| AccelDesc {
                    name,
                    flags,
                    format,
                    huge_pages,
                    qp_num,
                    dev_id,
                    que_iso_cfg,
                    qp_base,
                    dma_logging,
                },
            ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_round_trips(mem_mib in any::<u64>(), vcpus in any::<u32>(), regions in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..8),
                          channels in any::<u16>(), verify in any::<bool>(), accel in accel()) {
        let m = VmConfigMsg { mem_mib, vcpus, regions, channels, verify, accel };
        prop_assert_eq!(VmConfigMsg::decode(&m.encode()).unwrap(), m.clone());
        // Any strict prefix is refused, never misread.
        let b = m.encode();
        for cut in 0..b.len() {
            prop_assert!(VmConfigMsg::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn ack_and_report_round_trip(v in any::<u64>(), s in any::<u64>(), chunks in proptest::collection::vec(any::<u32>(), 0..64),
                                 devices in proptest::collection::vec(any::<u32>(), 0..4), has in any::<bool>(), reason in ".{0,40}") {
        let a = Ack { verify_ns: v, since_running_ns: s, digest: has.then_some(Digest { chunk_bytes: 1 << 20, chunks, devices }) };
        prop_assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
        let r = VerifyReport { digest_ok: has, pages_before: v, pages_after: s, jobs_before: 1, jobs_after: 2, guest_errors: 0, reason };
        prop_assert_eq!(VerifyReport::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = VmConfigMsg::decode(&b);
        let _ = Hello::decode(&b);
        let _ = Ack::decode(&b);
        let _ = VerifyReport::decode(&b);
        let _ = PagesHead::decode(&b);
        let mut r = FrameReader::new(&b[..]);
        while let Ok(Some(_)) = r.read_frame() {}
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let _ = RunDecoder::new().apply(&b, &MemoryMap { regions: vec![(0, 1 << 20)] }, &mem);
    }

    #[test]
    fn frames_round_trip_in_sequence(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..10)) {
        let mut wire = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            encode(&mut wire, Kind::DeviceData, i as u64, p);
        }
        let mut r = FrameReader::new(&wire[..]);
        for (i, p) in payloads.iter().enumerate() {
            let f = r.read_frame().unwrap().unwrap();
            prop_assert_eq!((f.kind, f.seq, &f.payload), (Kind::DeviceData, i as u64, p));
        }
        prop_assert!(r.read_frame().unwrap().is_none());
    }

    /// Pages of every kind (zero, compressible, random), any run length and alignment,
    /// compressed or not: the receiver's memory ends bit-identical to the sender's.
    #[test]
    fn page_runs_arrive_bit_exact(kinds in proptest::collection::vec(0u8..3, 1..64), first in 0u64..64, seed in any::<u64>(), compress in any::<bool>()) {
        let size = 1u64 << 20;
        let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        dst.write_slice(&vec![0xa5; size as usize], GuestAddress(0)).unwrap(); // stale content
        let mut x = seed | 1;
        for (i, k) in kinds.iter().enumerate() {
            let mut page = vec![0u8; 4096];
            match k {
                0 => {}
                1 => page[..64].copy_from_slice(&[7u8; 64]),
                _ => page.iter_mut().for_each(|b| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; *b = x as u8 }),
            }
            src.write_slice(&page, GuestAddress((first + i as u64) * 4096)).unwrap();
        }
        let gpa = first * 4096;
        let n = kinds.len() as u32;
        let stats = PageStats::default();
        let mut payloads = Vec::new();
        RunEncoder::new(compress).encode(&src, gpa, n, &stats, |p| { payloads.push(p.to_vec()); Ok(()) }).unwrap();
        prop_assert_eq!(stats.pages(), n as u64);
        let mut dec = RunDecoder::new();
        let map = MemoryMap { regions: vec![(0, size)] };
        for p in &payloads {
            dec.apply(p, &map, &dst).unwrap();
        }
        let (mut a, mut b) = (vec![0u8; n as usize * 4096], vec![0u8; n as usize * 4096]);
        src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
        dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        prop_assert!(a == b);
    }
}
