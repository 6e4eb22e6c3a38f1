//! Property tests of the wire format: every message round-trips, arbitrary bytes never
//! panic a decoder, and page runs of any content arrive bit-exact.

use migration::digest::PageLog;
use migration::frame::{encode, encode_keyed, FrameReader, Kind};
use migration::msg::*;
use migration::pages::{MemoryMap, PageStats, RunDecoder, RunEncoder};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_round_trips(mem_mib in any::<u64>(), vcpus in any::<u32>(), regions in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..8),
                          channels in any::<u16>(), verify in 0u8..3, peer_timeout_ms in 1u32.., devices in proptest::collection::vec(any::<u8>(), 0..200)) {
        let verify = [VerifyMode::Off, VerifyMode::Gate, VerifyMode::Audit][verify as usize];
        let m = VmConfigMsg { mem_mib, vcpus, regions, channels, verify, peer_timeout_ms, devices };
        prop_assert_eq!(VmConfigMsg::decode(&m.encode()).unwrap(), m.clone());
        // Any strict prefix is refused, never misread.
        let b = m.encode();
        for cut in 0..b.len() {
            prop_assert!(VmConfigMsg::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn switchover_messages_round_trip(a in any::<u64>(), b in any::<u64>(), vcpus in any::<u32>(), platform in any::<u32>(),
                                      pages in proptest::collection::vec(any::<u32>(), 0..64),
                                      devices in proptest::collection::vec(any::<u32>(), 0..4),
                                      flag in any::<bool>(), reason in ".{0,40}") {
        let d = Digest { vcpus, platform, devices, pages };
        prop_assert_eq!(Digest::decode(&d.encode()).unwrap(), d.clone());
        prop_assert_eq!(d.mismatch(&d), None);
        let other = Digest { platform: platform ^ 1, ..d.clone() };
        prop_assert!(d.mismatch(&other).unwrap().contains("platform"));
        let r = Ready { load_ns: a, verify_ns: b };
        prop_assert_eq!(Ready::decode(&r.encode()).unwrap(), r);
        let run = Running { resumed_ns: a, boot: b };
        prop_assert_eq!(Running::decode(&run.encode()).unwrap(), run);
        let rep = Report { first_progress_ns: a, checked: flag, pages_before: b, pages_after: 1, jobs_before: 2,
                           jobs_after: 3, guest_errors: 0, reason, discarded: !flag };
        prop_assert_eq!(Report::decode(&rep.encode()).unwrap(), rep.clone());
        // Any strict prefix or any extra byte is refused, never misread.
        let (de, re, ru, rp) = (d.encode(), r.encode(), run.encode(), rep.encode());
        for cut in 0..de.len() { prop_assert!(Digest::decode(&de[..cut]).is_err()); }
        for cut in 0..re.len() { prop_assert!(Ready::decode(&re[..cut]).is_err()); }
        for cut in 0..ru.len() { prop_assert!(Running::decode(&ru[..cut]).is_err()); }
        for cut in 0..rp.len() { prop_assert!(Report::decode(&rp[..cut]).is_err()); }
        let mut long = rep.encode();
        long.push(0);
        prop_assert!(Report::decode(&long).is_err());
        prop_assert!(Ready::decode(&r.encode()[..15]).is_err());
        prop_assert!(Running::decode(&[run.encode(), vec![1]].concat()).is_err());
    }

    #[test]
    fn a_digest_names_the_first_page_that_differs(n in 1usize..300, bad in proptest::collection::btree_set(0usize..300, 1..5)) {
        let a = Digest { vcpus: 1, platform: 0, devices: vec![7], pages: (0..n as u32).collect() };
        let mut b = a.clone();
        let bad: Vec<usize> = bad.into_iter().filter(|&i| i < n).collect();
        for &i in &bad {
            b.pages[i] ^= 0x8000_0000;
        }
        match bad.first() {
            None => prop_assert_eq!(a.mismatch(&b), None),
            Some(&first) => {
                let m = a.mismatch(&b).unwrap();
                let want = format!("{} page(s) of guest memory differ, the first at {:#x}", bad.len(), first * 4096);
                prop_assert!(m.contains(&want), "{} / {}", m, want);
            }
        }
        b.vcpus = 2;
        prop_assert!(a.mismatch(&b).unwrap().contains("vCPU state differs"));
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = VmConfigMsg::decode(&b);
        let _ = Hello::decode(&b);
        let _ = Digest::decode(&b);
        let _ = Ready::decode(&b);
        let _ = Running::decode(&b);
        let _ = Report::decode(&b);
        let _ = PagesHead::decode(&b);
        let mut r = FrameReader::new(&b[..]);
        while let Ok(Some(_)) = r.read_frame() {}
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let _ = RunDecoder::new().apply(&b, &MemoryMap { regions: vec![(0, 1 << 20)] }, &mem, &PageLog::new(256, true));
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

    /// Frames of one session are refused by a reader of any other session key.
    #[test]
    fn frames_are_bound_to_their_session(key in any::<u64>(), other in any::<u64>(), p in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assume!(key != other);
        let mut wire = Vec::new();
        encode_keyed(&mut wire, key, Kind::Pages, 0, &p);
        prop_assert!(FrameReader::new(&wire[..]).with_key(key).read_frame().unwrap().is_some());
        prop_assert!(FrameReader::new(&wire[..]).with_key(other).read_frame().is_err());
    }

    /// Pages of every kind (zero, compressible, random), any run length and alignment,
    /// compressed or not: the receiver's memory ends bit-identical to the sender's.
    #[test]
    fn page_runs_arrive_bit_exact(kinds in proptest::collection::vec(0u8..3, 1..64), first in 0u64..64, seed in any::<u64>(), compress in any::<bool>()) {
        let size = 1u64 << 20;
        let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        dst.write_slice(&vec![0xa5; size as usize], GuestAddress(0)).unwrap(); // stale content
        let mut rng = SmallRng::seed_from_u64(seed);
        for (i, k) in kinds.iter().enumerate() {
            let mut page = vec![0u8; 4096];
            match k {
                0 => {}
                1 => page[..64].copy_from_slice(&[7u8; 64]),
                _ => rng.fill_bytes(&mut page),
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
        let log = PageLog::new(size / 4096, true);
        for p in &payloads {
            dec.apply(p, &map, &dst, &log).unwrap();
        }
        // Every page arrived, and its recorded hash is the hash of what the sender has.
        for i in 0..n as u64 {
            let mut page = vec![0u8; 4096];
            src.read_slice(&mut page, GuestAddress(gpa + i * 4096)).unwrap();
            prop_assert!(log.received(first + i));
            prop_assert_eq!(log.hashes()[(first + i) as usize], migration::digest::page_hash(&page));
        }
        let (mut a, mut b) = (vec![0u8; n as usize * 4096], vec![0u8; n as usize * 4096]);
        src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
        dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        prop_assert!(a == b);
    }
}
