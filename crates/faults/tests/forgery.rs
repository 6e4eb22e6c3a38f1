//! Frames forged by a man in the middle that holds no key, with correct CRCs: a replayed page
//! run, a stale page, a dropped frame with the rest renumbered, a switchover before the
//! configuration. On plain TCP they reach the destination's memory (only the verification
//! gate, after every page was applied, stops the guest from resuming wrong; with
//! verification off, the wrong guest runs): that shows the forgeries are real. With a
//! pre-shared key or TLS each is refused at the frame or record it touches, the source runs
//! on, and the destination never resumes.

use faults::{Forged, Forger, Forgery};
use migration::transport::throwaway;
use migration::*;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use vmm::layout::WORKSET_BASE;
use vmm::*;

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn source_vm() -> Arc<Vm> {
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 2,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup::default()),
    })
    .unwrap();
    let mut p = Program::dirtier(WORKSET_BASE, 16384, 32.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    Arc::new(vm)
}

struct Run {
    source: Result<MigrationInfo, MigError>,
    info: MigrationInfo,
    dest: Result<Incoming, MigError>,
    forged: Forged,
    vm: Arc<Vm>,
}

fn migrate_through(forgery: Forgery, src: Security, dst: Security, verify: VerifyMode) -> Run {
    let vm = source_vm();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dopts = DestOptions {
        security: dst,
        peer_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    // The destination's events, in the test's output.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dest = std::thread::spawn(move || receive(&l, &dopts));
    let forger = Forger::start(addr.clone(), forgery).unwrap();
    let ctl = MigrationControl::default();
    let o = SourceOptions {
        mode: DeviceTracking::Iommu,
        verify,
        max_iterations: 10,
        security: src,
        peer_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let source = migrate(&vm, &forger.addr, &o, &ctl);
    let forged = forger.forged();
    drop(forger);
    // A destination that refused the forged stream before it knew the source waits for
    // another: a connection that closes at once ends it.
    let t = std::time::Instant::now();
    while !dest.is_finished() && t.elapsed() < Duration::from_secs(5) {
        let _ = std::net::TcpStream::connect(&addr).map(drop);
        std::thread::sleep(Duration::from_millis(50));
    }
    let dest = if dest.is_finished() {
        dest.join().unwrap()
    } else {
        Err(MigError::Other("still waiting".into()))
    };
    Run {
        source,
        info: ctl.snapshot(),
        dest,
        forged,
        vm,
    }
}

fn err(r: &Result<Incoming, MigError>) -> String {
    match r {
        Ok(_) => "resumed".into(),
        Err(e) => e.chain(),
    }
}

/// The source gave up and runs the guest; the destination never resumed it.
fn refused(o: &Run, what: &str) {
    assert!(o.forged.what.is_some(), "{what}: the forger acted");
    assert!(o.source.is_err(), "{what}: the source completed");
    assert_eq!(o.info.livemig.outcome, Outcome::RolledBack, "{what}");
    assert!(o.vm.running(), "{what}: the source runs");
    assert!(o.dest.is_err(), "{what}: the destination resumed the guest");
}

#[test]
fn on_plain_tcp_the_forgeries_reach_the_guest() {
    need_kvm!();
    for f in [Forgery::ReplayRun, Forgery::StalePage, Forgery::DropRenumber] {
        // Verification off: nothing below the guest notices, and the forged guest runs.
        let o = migrate_through(f, Security::Plain, Security::Plain, VerifyMode::Off);
        println!(
            "{} (verify off): {:?}; destination: {}",
            f.name(),
            o.forged.what,
            err(&o.dest)
        );
        assert!(o.forged.what.is_some(), "{}", f.name());
        let info = o.source.unwrap_or_else(|e| panic!("{}: {}", f.name(), e.chain()));
        assert_eq!(info.status, Status::Completed, "{}", f.name());
        assert!(o.dest.is_ok(), "{}", f.name());
        // The gate catches it, but only by comparing the whole guest after every page was
        // applied.
        let o = migrate_through(f, Security::Plain, Security::Plain, VerifyMode::Gate);
        println!(
            "{} (gate): {:?}; destination: {}",
            f.name(),
            o.forged.what,
            err(&o.dest)
        );
        refused(&o, f.name());
        assert!(
            matches!(o.dest, Err(MigError::Verification(_))),
            "{}: {}",
            f.name(),
            err(&o.dest)
        );
    }
    // The protocol's order alone refuses a switchover before the configuration.
    let o = migrate_through(
        Forgery::SwitchoverFirst,
        Security::Plain,
        Security::Plain,
        VerifyMode::Off,
    );
    println!("switchover first: {:?}; destination: {}", o.forged.what, err(&o.dest));
    refused(&o, "switchover first");
}

#[test]
fn a_pre_shared_key_refuses_every_forgery_at_the_forged_frame() {
    need_kvm!();
    for f in Forgery::ALL {
        let psk = || Security::Psk(Arc::new(Psk::from_hex(KEY).unwrap()));
        let o = migrate_through(f, psk(), psk(), VerifyMode::Off);
        let why = err(&o.dest);
        println!("{}: {:?}; destination: {why}", f.name(), o.forged.what);
        refused(&o, f.name());
        assert!(
            why.contains("does not verify under the pre-shared key"),
            "{}: {why}",
            f.name()
        );
    }
}

#[test]
fn tls_refuses_every_forgery_at_the_forged_record() {
    need_kvm!();
    let d = std::env::temp_dir().join(format!("livemig-forgery-{}", std::process::id()));
    let files = throwaway::generate(&d).unwrap();
    let tls = |s: &throwaway::Side| Security::Tls(Arc::new(TlsCreds::load(&s.cert, &s.key, &files.ca, None).unwrap()));
    for f in Forgery::ALL {
        let o = migrate_through(f, tls(&files.source), tls(&files.dest), VerifyMode::Off);
        let why = err(&o.dest);
        println!("{}: {:?}; destination: {why}", f.name(), o.forged.what);
        assert!(o.forged.tls, "{}", f.name());
        refused(&o, f.name());
        assert!(
            why.contains("the TLS session with the source failed"),
            "{}: {why}",
            f.name()
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
