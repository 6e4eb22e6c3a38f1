//! Failures: a destination that dies mid-iteration, a corrupted or out-of-map frame, an
//! incompatible device, cancel, a stream with pages missing, a configuration beyond the
//! host, a stream replayed from another session. The source must end running and unchanged;
//! the destination must never resume.

mod common;
use common::*;
use migration::frame::{encode_keyed, FrameReader, FrameWriter, Kind};
use migration::msg::*;
use migration::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio::MigState;
use vmm::{AccelSetup, DeviceSet};
use vmm::{DirtyLogMode, Vm};

/// The source is back to normal: vCPUs, the dirtier and the accelerator run, the device is
/// RUNNING, every tracker is off.
fn assert_source_running(vm: &Vm, info: &MigrationInfo) {
    assert!(info.livemig.source_vcpus_running);
    assert_eq!(vm.vcpu_stopped(), None);
    let c0 = vm.programs().counters(0);
    std::thread::sleep(Duration::from_millis(200));
    let c1 = vm.programs().counters(0);
    assert!(
        c1.pages_written > c0.pages_written,
        "the dirtier runs on: {c0:?} -> {c1:?}"
    );
    assert!(
        c1.jobs_completed > c0.jobs_completed,
        "accel jobs complete: {c0:?} -> {c1:?}"
    );
    assert_eq!(c1.errors, 0);
    let io = &vm.devices()[0];
    assert_eq!(io.migration.get_state(), MigState::Running);
    assert!(
        !io.fd.hwpt_dirty_tracking(io.hwpt).unwrap(),
        "HWPT dirty tracking is off again"
    );
}

/// Forwards both directions between a client and `to`; once `cut` is set, drops both ends
/// at once, as a killed process would.
fn proxy(to: String, cut: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let s = TcpStream::connect(&to).unwrap();
            for (mut a, mut b) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                let cut = cut.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        if cut.load(Ordering::Acquire) {
                            let _ = a.shutdown(Shutdown::Both);
                            let _ = b.shutdown(Shutdown::Both);
                            return;
                        }
                        let _ = a.set_read_timeout(Some(Duration::from_millis(5)));
                        match a.read(&mut buf) {
                            Ok(0) => {
                                let _ = b.shutdown(Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if b.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        }
    });
    addr
}

#[test]
fn destination_dies_mid_iteration_then_a_second_migration_succeeds() {
    need_kvm!();
    let vm = source_vm(256, 32.0, DirtyLogMode::Ring { entries: 65536 });
    let (addr, dest) = spawn_dest(DestOptions::default());
    let cut = Arc::new(AtomicBool::new(false));
    let via = proxy(addr, cut.clone());
    let ctl = Arc::new(MigrationControl::default());
    // A zero downtime limit never converges: the source iterates until the cut.
    let o = SourceOptions {
        downtime_limit: Duration::ZERO,
        max_iterations: 1_000_000,
        ..opts(DeviceTracking::Iommu)
    };
    let (v2, c2) = (vm.clone(), ctl.clone());
    let src = std::thread::spawn(move || migrate(&v2, &via, &o, &c2));
    let t = Instant::now();
    while ctl.snapshot().ram.iteration_count < 5 {
        assert!(t.elapsed() < Duration::from_secs(20), "no iterations");
        std::thread::sleep(Duration::from_millis(5));
    }
    cut.store(true, Ordering::Release);
    let e = src.join().unwrap().unwrap_err();
    println!("source: {}", e.chain());
    let info = ctl.snapshot();
    assert_eq!(info.status, Status::Failed);
    assert_eq!(
        info.livemig.failed_phase,
        Some(Status::Active),
        "it failed mid-iteration"
    );
    assert!(info.error_desc.is_some());
    assert!(dest.join().unwrap().is_err(), "the destination did not complete");
    assert_source_running(&vm, &info);

    // A fresh destination: the same source migrates, verified.
    let (addr, dest) = spawn_dest(DestOptions::default());
    let info = migrate(&vm, &addr, &opts(DeviceTracking::Iommu), &ctl).unwrap_or_else(|e| panic!("{}", e.chain()));
    dest.join().unwrap().unwrap();
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
}

#[test]
fn incompatible_device_is_refused_during_precopy() {
    need_kvm!();
    let vm = source_vm(128, 16.0, DirtyLogMode::Bitmap);
    let (addr, dest) = spawn_dest(DestOptions {
        dev_id: Some(0xbeef),
        ..Default::default()
    });
    let ctl = MigrationControl::default();
    let e = migrate(&vm, &addr, &opts(DeviceTracking::Iommu), &ctl).unwrap_err();
    let msg = e.chain();
    println!("source: {msg}");
    assert!(msg.contains("EFAULT"), "the device's compatibility check: {msg}");
    let info = ctl.snapshot();
    assert_eq!(
        info.livemig.failed_phase,
        Some(Status::Active),
        "refused during pre-copy, before any pause"
    );
    assert!(info.downtime.is_none());
    let d = dest.join().unwrap();
    assert!(d.is_err());
    assert_source_running(&vm, &info);
}

#[test]
fn cancel_leaves_the_source_running() {
    need_kvm!();
    let vm = source_vm(128, 16.0, DirtyLogMode::Bitmap);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let ctl = Arc::new(MigrationControl::default());
    let o = SourceOptions {
        downtime_limit: Duration::ZERO,
        max_iterations: 1_000_000,
        ..opts(DeviceTracking::DeviceLog)
    };
    let (v2, c2) = (vm.clone(), ctl.clone());
    let src = std::thread::spawn(move || migrate(&v2, &addr, &o, &c2));
    let t = Instant::now();
    while ctl.snapshot().ram.iteration_count < 3 {
        assert!(t.elapsed() < Duration::from_secs(20), "no iterations");
        std::thread::sleep(Duration::from_millis(5));
    }
    ctl.cancel().unwrap();
    assert!(matches!(src.join().unwrap(), Err(MigError::Cancelled)));
    assert_eq!(ctl.snapshot().status, Status::Cancelled);
    assert_eq!(ctl.snapshot().livemig.outcome, Outcome::RolledBack);
    assert_eq!(ctl.cancel(), Err(CancelError::NotRunning), "nothing left to cancel");
    let d = dest.join().unwrap();
    assert!(d.is_err(), "the destination never resumed");
    assert_source_running(&vm, &ctl.snapshot());
    let e = vm.devices()[0]
        .migration
        .dma_logging_report(0, 4096, 4096, &mut [0u8; 1])
        .unwrap_err();
    assert_eq!(e.code(), iommu::errno::EINVAL, "DMA logging was stopped");
}

/// A raw client that gets a destination to the point where it accepts pages.
/// A raw client's end of a session: writer, reader, the destination's thread, the key.
type RawSession = (
    FrameWriter<TcpStream>,
    FrameReader<TcpStream>,
    std::thread::JoinHandle<Result<Incoming, MigError>>,
    u64,
);

/// A raw client past the handshake: the session key set on both ends.
fn handshake() -> RawSession {
    let (addr, dest) = spawn_dest(DestOptions::default());
    let s = TcpStream::connect(addr).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let mut r = FrameReader::new(s);
    w.send(
        Kind::Hello,
        &Hello {
            version: VERSION,
            role: Role::Control,
            nonce: 1,
            caps: 0,
        }
        .encode(),
    )
    .unwrap();
    let h = r.expect().unwrap();
    assert_eq!(h.kind, Kind::Hello);
    let key = migration::session::key(1, Hello::decode(&h.payload).unwrap().nonce);
    w.set_key(key);
    r.set_key(key);
    (w, r, dest, key)
}

/// Sends `cfg` after a handshake; the destination's refusal, after checking it gave up as
/// incompatible.
fn config_refused(cfg: &VmConfigMsg) -> String {
    let (mut w, mut r, dest, _) = handshake();
    w.send(Kind::Config, &cfg.encode()).unwrap();
    let why = error_frame(&mut r);
    assert!(matches!(dest.join().unwrap(), Err(MigError::Incompatible(_))));
    why
}

fn raw_session(mem_mib: u64) -> RawSession {
    let (mut w, mut r, dest, key) = handshake();
    let cfg = VmConfigMsg {
        mem_mib,
        vcpus: 1,
        regions: vec![(0, mem_mib << 20)],
        channels: 0,
        verify: VerifyMode::Off,
        peer_timeout_ms: 10_000,
        devices: DeviceSet::default().encode(),
    };
    w.send(Kind::Config, &cfg.encode()).unwrap();
    assert_eq!(r.expect().unwrap().kind, Kind::ConfigOk);
    (w, r, dest, key)
}

fn pages_payload(gpa: u64, pages: u32) -> Vec<u8> {
    let mut p = Vec::new();
    PagesHead {
        gpa,
        pages,
        encoding: Encoding::Raw,
    }
    .encode_into(&mut p);
    p.extend((0..pages as usize * 4096).map(|i| i as u8));
    p
}

fn error_frame(r: &mut FrameReader<TcpStream>) -> String {
    let f = r.expect().unwrap();
    assert_eq!(f.kind, Kind::Error);
    decode_str(&f.payload).unwrap()
}

#[test]
fn corrupted_frame_is_refused_and_nothing_resumes() {
    need_kvm!();
    let (mut w, mut r, dest, key) = raw_session(64);
    w.send(Kind::Pages, &pages_payload(0x100000, 4)).unwrap();
    // The next frame, with one payload bit flipped after its CRC was computed.
    let mut f = Vec::new();
    encode_keyed(&mut f, key, Kind::Pages, 3, &pages_payload(0x200000, 4));
    f[100] ^= 0x10;
    w.get_mut().write_all(&f).unwrap();
    let why = error_frame(&mut r);
    println!("destination: {why}");
    assert!(why.contains("frame 3 failed its CRC32C check"), "{why}");
    match dest.join().unwrap() {
        Err(MigError::Wire(WireError::Checksum { seq: 3 })) => {}
        other => panic!("{:?}", other.map(|_| "resumed")),
    }
}

#[test]
fn out_of_map_and_malformed_frames_are_refused() {
    need_kvm!();
    // A run that starts inside guest RAM and ends past it.
    let (mut w, mut r, dest, _) = raw_session(64);
    w.send(Kind::Pages, &pages_payload((64 << 20) - 2 * 4096, 4)).unwrap();
    let why = error_frame(&mut r);
    assert!(why.contains("outside the memory map"), "{why}");
    assert!(matches!(
        dest.join().unwrap(),
        Err(MigError::Wire(WireError::OutOfMap {
            gpa: 0x3ffe000,
            pages: 4
        }))
    ));
    // Raw data one byte short of its page count.
    let (mut w, mut r, dest, _) = raw_session(64);
    let mut p = pages_payload(0x100000, 2);
    p.pop();
    w.send(Kind::Pages, &p).unwrap();
    assert!(error_frame(&mut r).contains("does not match its encoding"));
    assert!(dest.join().unwrap().is_err());
    // An unknown frame kind with a valid CRC.
    let (mut w, mut r, dest, key) = raw_session(64);
    let mut f = Vec::new();
    encode_keyed(&mut f, key, Kind::Pages, 2, b"");
    f[4] = 99;
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&key.to_le_bytes()), &f[..20]), b"");
    f[20..24].copy_from_slice(&crc.to_le_bytes());
    w.get_mut().write_all(&f).unwrap();
    assert!(error_frame(&mut r).contains("unknown frame kind 99"));
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn a_stream_without_pages_is_refused() {
    need_kvm!();
    // Hello, Config, then straight to the switchover: no page ever sent.
    let (mut w, mut r, dest, _) = raw_session(64);
    w.send(Kind::Switchover, &[]).unwrap();
    w.send(Kind::PlatformState, &[0]).unwrap();
    w.send(Kind::VcpuState, b"not even a state").unwrap();
    w.send(Kind::Complete, &[]).unwrap();
    let why = error_frame(&mut r);
    println!("destination: {why}");
    assert!(
        why.contains("the stream is incomplete: 16384 page(s) of guest memory never arrived, the first at 0x0"),
        "{why}"
    );
    assert!(dest.join().unwrap().is_err(), "nothing resumed");
    // And one page short of the whole map.
    let (mut w, mut r, dest, _) = raw_session(64);
    for gpa in (0..64u64 << 20).step_by(64 * 4096) {
        let pages = if gpa == 64 * 4096 { 63 } else { 64 };
        let mut p = Vec::new();
        PagesHead {
            gpa,
            pages,
            encoding: Encoding::Zero,
        }
        .encode_into(&mut p);
        w.send(Kind::Pages, &p).unwrap();
    }
    w.send(Kind::Switchover, &[]).unwrap();
    w.send(Kind::PlatformState, &[0]).unwrap();
    w.send(Kind::VcpuState, b"x").unwrap();
    w.send(Kind::Complete, &[]).unwrap();
    let why = error_frame(&mut r);
    assert!(
        why.contains("1 page(s) of guest memory never arrived, the first at 0x7f000"),
        "{why}"
    );
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn a_config_beyond_this_host_is_refused_up_front() {
    need_kvm!();
    let why = config_refused(&VmConfigMsg {
        mem_mib: 1 << 44,
        vcpus: 1,
        regions: vec![(0, 1 << 20)],
        channels: 0,
        verify: VerifyMode::Off,
        peer_timeout_ms: 10_000,
        devices: DeviceSet::default().encode(),
    });
    assert!(
        why.contains("17592186044416 MiB of RAM; this VMM builds at most 8192 MiB"),
        "{why}"
    );
}

/// A device list this VMM cannot build is refused before anything is allocated: too many
/// devices, an unknown IOMMU format, shared devices that disagree, bytes cut short.
#[test]
fn a_device_list_this_vmm_cannot_build_is_refused() {
    need_kvm!();
    let two = DeviceSet {
        accels: vec![AccelSetup::default(); 2],
        shared_domain: true,
    }
    .encode();
    let mut unknown_format = two.clone();
    unknown_format[3] = 9;
    let mut disagree = two.clone();
    disagree[4] ^= 1; // the first device's huge-leaf flag
    let mut four = two.clone();
    four[2] = 4;
    for (devices, want) in [
        (unknown_format, "unknown IOMMU format 9"),
        (disagree, "must have the same format, page sizes and tracking"),
        (four, "at most 3"),
        (two[..two.len() - 1].to_vec(), "cut short"),
    ] {
        let why = config_refused(&VmConfigMsg {
            mem_mib: 64,
            vcpus: 1,
            regions: vec![(0, 64 << 20)],
            channels: 0,
            verify: VerifyMode::Off,
            peer_timeout_ms: 10_000,
            devices,
        });
        assert!(
            why.contains("the source's devices") && why.contains(want),
            "{want}: {why}"
        );
    }
}

/// Records what a source sends; a replay of it to another destination fails at its first
/// frame after the handshake: it belongs to another session.
#[test]
fn a_recorded_stream_replayed_to_another_destination_is_refused() {
    need_kvm!();
    let vm = source_vm(128, 16.0, DirtyLogMode::Bitmap);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = l.local_addr().unwrap().to_string();
    let tape = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t2 = tape.clone();
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let d = TcpStream::connect(addr).unwrap();
        let (mut c2, mut d2) = (c.try_clone().unwrap(), d.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut d2, &mut c2);
        });
        let (mut c, mut d) = (c, d);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    t2.lock().unwrap().extend_from_slice(&buf[..n]);
                    if d.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let o = SourceOptions {
        verify: VerifyMode::Off,
        ..opts(DeviceTracking::Iommu)
    };
    migrate(&vm, &via, &o, &MigrationControl::default()).unwrap_or_else(|e| panic!("{}", e.chain()));
    dest.join().unwrap().unwrap();
    let tape = tape.lock().unwrap().clone();
    assert!(tape.len() > 100_000, "a real stream was recorded: {} bytes", tape.len());

    let (addr, dest) = spawn_dest(DestOptions::default());
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(&tape);
    match dest.join().unwrap() {
        Err(MigError::Wire(WireError::Checksum { seq: 1 })) => {}
        other => panic!(
            "the replay was not refused at the Config frame: {:?}",
            other.map(|_| "resumed")
        ),
    }
}

/// Whatever connects before the source (a port scanner, junk, a silent client, another
/// protocol version) is turned away, and the real migration that follows runs.
#[test]
fn strays_before_the_source_are_turned_away() {
    need_kvm!();
    let (addr, dest) = spawn_dest(DestOptions::default());
    drop(TcpStream::connect(&addr).unwrap());
    let mut junk = TcpStream::connect(&addr).unwrap();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut old = TcpStream::connect(&addr).unwrap();
    let mut w = FrameWriter::new(&mut old);
    w.send(
        Kind::Hello,
        &Hello {
            version: 1,
            role: Role::Control,
            nonce: 3,
            caps: 0,
        }
        .encode(),
    )
    .unwrap();
    let why = error_frame(&mut FrameReader::new(old.try_clone().unwrap()));
    assert!(why.contains("protocol version 1 is not supported"), "{why}");
    let vm = source_vm(128, 16.0, DirtyLogMode::Bitmap);
    let info = migrate(&vm, &addr, &opts(DeviceTracking::Iommu), &MigrationControl::default())
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(info.livemig.verified, Some(true));
    dest.join().unwrap().unwrap();
}
