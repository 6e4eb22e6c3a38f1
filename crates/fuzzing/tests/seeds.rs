//! The seed corpora come from a real migration: a KVM guest with the accelerator busy,
//! migrated over loopback through a recording relay. Every seed cut from the recording must be
//! accepted by its target (a target that refuses what livemig itself sends is broken, or its
//! seed is). `LIVEMIG_WRITE_SEEDS=1` writes them to `fuzz/corpus/TARGET/`.

use fuzzing::host::{ioctl_calls, USER_BASE, USER_LEN};
use fuzzing::{target, Verdict, TARGETS};
use migration::frame::{self, Frame, FrameReader, Kind};
use migration::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vmm::layout::WORKSET_BASE;
use vmm::*;

/// What each side of a relayed connection sent: (towards the destination, back).
type Recording = Arc<Mutex<(Vec<u8>, Vec<u8>)>>;

type Seeds = BTreeMap<&'static str, Vec<(String, Vec<u8>)>>;

/// Relays one connection to `to`, keeping what each side sent.
fn recording_relay(to: String) -> (String, Recording) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let rec = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let r = rec.clone();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(&to).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, r: Recording, back: bool| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let mut g = r.lock().unwrap();
                    if back { &mut g.1 } else { &mut g.0 }.extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        let t1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap(), r.clone(), false);
        let t2 = pump(b, a, r, true);
        let _ = (t1.join(), t2.join());
    });
    (addr, rec)
}

/// Both directions of a verified migration of a busy 128 MiB guest's control connection.
fn record_migration() -> (Vec<u8>, Vec<u8>) {
    let vm = Arc::new(
        Vm::new(VmConfig {
            mem_mib: 128,
            regions: 2,
            vcpus: 1,
            dirty: DirtyLogMode::Bitmap,
            devices: DeviceSet::one(AccelSetup::default()),
        })
        .unwrap(),
    );
    let mut p = Program::dirtier(WORKSET_BASE, 4096, 16.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest_addr = l.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || receive(&l, &DestOptions::default()));
    let (relay, rec) = recording_relay(dest_addr);
    let o = SourceOptions {
        mode: DeviceTracking::Iommu,
        verify: VerifyMode::Gate,
        max_iterations: 10,
        ..Default::default()
    };
    let info = migrate(&vm, &relay, &o, &MigrationControl::default()).expect("the migration");
    assert_eq!(info.livemig.outcome, Outcome::Completed);
    let incoming = dest.join().unwrap().expect("the destination");
    incoming.vm.pause().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let g = rec.lock().unwrap();
    (g.0.clone(), g.1.clone())
}

/// Every frame of a recorded stream. Its CRCs carry the session key, which a reader without it
/// cannot check: they are cleared and the frames read as a trusted transport's.
fn frames(stream: &[u8]) -> Vec<Frame> {
    let mut stream = stream.to_vec();
    let mut at = 0;
    while at + frame::HEADER_LEN <= stream.len() {
        let len = u32::from_le_bytes(stream[at + 8..at + 12].try_into().unwrap()) as usize;
        stream[at + 20..at + 24].fill(0);
        at += frame::HEADER_LEN + len;
    }
    let mut r = FrameReader::new(&stream[..]);
    r.trust_transport();
    let mut out = Vec::new();
    while let Some(f) = r.read_frame().expect("a recorded stream reads back") {
        out.push(f);
    }
    out
}

/// `[mode]` and frames renumbered from 0, with CRCs under key 0 (mode 0) or none (mode 1),
/// cut at `limit` bytes.
fn stream_seed(frames: &[&Frame], mode: u8, limit: usize) -> Vec<u8> {
    let mut out = vec![mode];
    for (seq, f) in frames.iter().enumerate() {
        let mut one = Vec::new();
        if mode & 1 == 0 {
            frame::encode(&mut one, f.kind, seq as u64, &f.payload);
        } else {
            frame::encode_unchecked(&mut one, f.kind, seq as u64, &f.payload);
        }
        if out.len() + one.len() > limit {
            break;
        }
        out.extend_from_slice(&one);
    }
    out
}

fn pages_seed(f: &Frame) -> Option<Vec<u8>> {
    let (mut h, data) = msg::PagesHead::decode(&f.payload).ok()?;
    // Into the fuzz target's first 1 MiB region.
    h.gpa = ((h.gpa % (1 << 20)).min((1 << 20) - h.pages as u64 * 4096)) & !4095;
    let mut p = vec![Kind::Pages as u8];
    h.encode_into(&mut p);
    p.extend_from_slice(data);
    Some(p)
}

fn wire_seeds(src: &[Frame], dst: &[Frame], seeds: &mut Seeds) {
    let all: Vec<&Frame> = src.iter().collect();
    let s = seeds.entry("frame-stream").or_default();
    s.push(("source-crc".into(), stream_seed(&all, 0, 64 << 10)));
    s.push(("source-tls".into(), stream_seed(&all, 1, 64 << 10)));
    // The switchover's frames, after the Hello and Config they follow.
    let tail: Vec<&Frame> = all[..2]
        .iter()
        .copied()
        .chain(all[all.len() - 5..].iter().copied())
        .collect();
    s.push(("source-switchover".into(), stream_seed(&tail, 1, 64 << 10)));
    s.push((
        "destination".into(),
        stream_seed(&dst.iter().collect::<Vec<_>>(), 1, 64 << 10),
    ));
    // One message of each kind, both directions; a page run of each encoding.
    let m = seeds.entry("msg").or_default();
    let mut seen = BTreeMap::new();
    for f in src.iter().chain(dst) {
        let key = match f.kind {
            Kind::Pages => format!("pages-{}", f.payload.get(12).copied().unwrap_or(0)),
            k => format!("{k:?}").to_lowercase(),
        };
        let seed = match f.kind {
            Kind::Pages => pages_seed(f),
            // A page hash per page of RAM is 128 KiB here: the first 64 pages' keep it small.
            Kind::Digest => msg::Digest::decode(&f.payload).ok().map(|mut d| {
                d.pages.truncate(64);
                [&[Kind::Digest as u8][..], &d.encode()].concat()
            }),
            k => Some([&[k as u8][..], &f.payload].concat()),
        };
        if let Some(seed) = seed.filter(|s| s.len() <= 64 << 10) {
            seen.entry(key).or_insert(seed);
        }
    }
    m.extend(seen);
}

fn device_seeds(src: &[Frame], seeds: &mut Seeds) {
    let mut stream = Vec::new();
    for f in src.iter().filter(|f| f.kind == Kind::DeviceData) {
        let (dev, data) = msg::decode_device_data(&f.payload).unwrap();
        assert_eq!(dev, 0);
        stream.extend_from_slice(data);
    }
    let v = seeds.entry("vfio-stream").or_default();
    v.push(("whole".into(), [&[0][..], &stream].concat()));
    v.push(("in-7-byte-pieces".into(), [&[7][..], &stream].concat()));
    let mut d = vfio::stream::Decoder::new();
    d.feed(&stream);
    let mut state = Vec::new();
    while let Some(r) = d.next_record().unwrap() {
        if let vfio::stream::Record::Data(b) = r {
            state.extend_from_slice(&b);
        }
    }
    assert!(
        state.len() > accel::migration::MATCH_SIZE,
        "the device saved its queues"
    );
    let a = seeds.entry("accel-resume").or_default();
    a.push(("saved".into(), [&[0][..], &state].concat()));
    a.push((
        "saved-in-40-byte-writes-crc-fixed".into(),
        [&[(40 << 1) | 1][..], &state].concat(),
    ));
    let vcpu = src.iter().find(|f| f.kind == Kind::VcpuState).expect("a vCPU state");
    seeds
        .entry("vcpu-state")
        .or_default()
        .push(("one-vcpu".into(), [&[0][..], &vcpu.payload].concat()));
}

/// The requests `livemig migrate`, `query-migrate`, `cont` and `quit` send.
fn control_seeds(seeds: &mut Seeds) {
    let c = seeds.entry("control-json").or_default();
    let migrate = livemig::control::MigrateArgs {
        uri: "127.0.0.1:4444".into(),
        channels: 2,
        ..Default::default()
    };
    for (name, cmd, args) in [
        ("query-status", "query-status", serde_json::json!({})),
        ("query-migrate", "query-migrate", serde_json::json!({})),
        ("migrate", "migrate", serde_json::to_value(&migrate).unwrap()),
        ("migrate-cancel", "migrate-cancel", serde_json::json!({})),
        ("cont-force", "cont", serde_json::json!({"force": true})),
        ("quit", "quit", serde_json::json!({})),
    ] {
        let line = serde_json::json!({"execute": cmd, "arguments": args}).to_string();
        c.push((name.into(), line.into_bytes()));
    }
}

fn call(sel: u32, words: &[u32]) -> Vec<u8> {
    let arg: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    [&[sel as u8, arg.len() as u8][..], &arg].concat()
}

fn lo(v: u64) -> u32 {
    v as u32
}
fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

/// What a VMM does through the ABI: an IOAS, a mapping, a dirty-tracking HWPT, a harvest, and
/// the teardown. Devices are ids 1 and 2, so the IOAS is 3 and the HWPT 4.
fn iommufd_seeds(seeds: &mut Seeds) {
    let (ub, len) = (USER_BASE, USER_LEN);
    let script = [
        call(1, &[12, 0, 0]),                                             // IOAS_ALLOC
        call(6, &[24, 1, 0, 3, 0, 0]),                                    // OPTION huge pages off
        call(4, &[40, 7, 3, 0, lo(ub), hi(ub), lo(len - 4096), 0, 0, 0]), // IOAS_MAP
        call(7, &[48, 2, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0]),                  // HWPT_ALLOC dirty
        call(8, &[40, 0, 1, 0, 0, 0, 0, 0, 0, 0]),                        // GET_HW_INFO
        call(9, &[16, 1, 4, 0]),                                          // SET_DIRTY_TRACKING
        call(
            10,
            &[48, 4, 0, 0, 0, 0, lo(len - 4096), 0, 4096, 0, lo(ub + len - 64), hi(ub)],
        ), // GET_DIRTY_BITMAP
        call(3, &[32, 3, 4, 0, lo(ub + 1024), hi(ub), 0, 0]),             // IOVA_RANGES
        call(5, &[24, 3, 0, 0, lo(len - 4096), 0]),                       // IOAS_UNMAP
        call(0, &[8, 4]),                                                 // DESTROY hwpt
        call(0, &[8, 3]),                                                 // DESTROY ioas
    ];
    let seq = script.concat();
    let results = ioctl_calls(&seq);
    assert_eq!(results.len(), script.len());
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "call {i} of the VMM's script: {r:?}");
    }
    seeds
        .entry("iommufd-ioctl")
        .or_default()
        .push(("vmm-lifecycle".into(), seq));
}

#[test]
fn a_real_migration_gives_every_target_seeds_it_accepts() {
    vmm::need_kvm!();
    let (sent, returned) = record_migration();
    let (src, dst) = (frames(&sent), frames(&returned));
    assert!(
        src.iter().any(|f| f.kind == Kind::Complete),
        "the recording holds the whole migration"
    );
    let mut seeds = Seeds::new();
    wire_seeds(&src, &dst, &mut seeds);
    device_seeds(&src, &mut seeds);
    control_seeds(&mut seeds);
    iommufd_seeds(&mut seeds);
    for t in TARGETS {
        let s = seeds.get(t.name).map_or(&[][..], |v| &v[..]);
        assert!(!s.is_empty(), "no seed for {}", t.name);
        for (name, bytes) in s {
            assert_eq!((t.run)(bytes), Verdict::Accepted, "{}/{name}", t.name);
        }
    }
    if std::env::var_os("LIVEMIG_WRITE_SEEDS").is_some() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        for (t, s) in &seeds {
            assert!(target(t).is_some());
            let d = root.join(t);
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            for (name, bytes) in s {
                std::fs::write(d.join(name), bytes).unwrap();
            }
        }
        println!("seeds written to {}", root.display());
    }
}
