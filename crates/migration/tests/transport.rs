//! Migrations over mutual TLS and with a pre-shared key, and every way to hold the wrong
//! credentials: refused with a clear error, the source running on.

mod common;
use common::*;
use migration::transport::throwaway::{self, Ca, Leaf};
use migration::*;
use std::path::PathBuf;
use std::sync::Arc;
use vmm::DirtyLogMode;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-transport-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tls(side: &throwaway::Side, ca: &std::path::Path) -> Security {
    Security::Tls(Arc::new(TlsCreds::load(&side.cert, &side.key, ca, None).unwrap()))
}

fn psk(hex: &str) -> Security {
    Security::Psk(Arc::new(Psk::from_hex(hex).unwrap()))
}

const KEY: &str = "6c6976656d69672070726573686172656420746573742d6b6579";

/// Migrates a busy 128 MiB guest with `src` and `dst` transports; the outcome, and the
/// destination's.
fn migrate_with(
    src: Security,
    dst: Security,
    channels: u16,
) -> (
    Result<MigrationInfo, MigError>,
    MigrationInfo,
    Result<Incoming, MigError>,
    Arc<vmm::Vm>,
) {
    let vm = source_vm(128, 16.0, DirtyLogMode::Bitmap);
    let (addr, dest) = spawn_dest(DestOptions {
        security: dst,
        peer_timeout: std::time::Duration::from_secs(3),
        ..Default::default()
    });
    let ctl = MigrationControl::default();
    let o = SourceOptions {
        security: src,
        channels,
        peer_timeout: std::time::Duration::from_secs(3),
        ..opts(DeviceTracking::Iommu)
    };
    let r = migrate(&vm, &addr, &o, &ctl);
    // A destination that refused the source goes on waiting for another: stop it.
    if r.is_err() && !dest.is_finished() {
        let _ = std::net::TcpStream::connect(&addr).map(drop);
    }
    let d = if dest.is_finished() || r.is_ok() {
        dest.join().unwrap()
    } else {
        Err(MigError::Other("still waiting".into()))
    };
    (r, ctl.snapshot(), d, vm)
}

#[test]
fn mutual_tls_end_to_end_verified() {
    need_kvm!();
    let d = dir("tls");
    let f = throwaway::generate(&d).unwrap();
    for channels in [0, 2] {
        let (r, info, dst, _vm) = migrate_with(tls(&f.source, &f.ca), tls(&f.dest, &f.ca), channels);
        let info2 = r.unwrap_or_else(|e| panic!("{}", e.chain()));
        assert_eq!(info2.status, Status::Completed);
        assert_eq!(info.livemig.transport, "tls");
        assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
        assert!(dst.is_ok());
    }
}

#[test]
fn pre_shared_key_end_to_end_verified() {
    need_kvm!();
    let (r, info, dst, _vm) = migrate_with(psk(KEY), psk(KEY), 2);
    r.unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(info.livemig.transport, "psk");
    assert_eq!(info.livemig.verified, Some(true));
    assert!(dst.is_ok());
}

/// Each mismatch is refused with a reason that names it, the source rolls back and runs, and
/// the destination never resumes.
#[test]
fn wrong_credentials_are_refused_and_the_source_runs_on() {
    need_kvm!();
    let d = dir("wrong");
    let f = throwaway::generate(&d).unwrap();
    let other = Ca::new(&d, "other").unwrap();
    let stranger = other.leaf(&d, "stranger", Leaf::default()).unwrap();
    let ca = Ca::new(&d, "aged").unwrap();
    let expired = ca.leaf(&d, "expired", Leaf { expired: true }).unwrap();
    let fresh = ca.leaf(&d, "fresh", Leaf::default()).unwrap();
    let cases: Vec<(&str, Security, Security, &str)> = vec![
        (
            "a source certificate of an unknown CA",
            tls(&stranger, &f.ca),
            tls(&f.dest, &f.ca),
            "the destination refused the TLS session: the destination does not trust this source's certificate",
        ),
        (
            "a destination certificate of an unknown CA",
            tls(&f.source, &f.ca),
            tls(&stranger, &other.pem),
            "UnknownIssuer",
        ),
        (
            "an expired destination certificate",
            tls(&f.source, &ca.pem),
            tls(&expired, &ca.pem),
            "certificate expired",
        ),
        (
            "an expired source certificate",
            tls(&expired, &ca.pem),
            tls(&fresh, &ca.pem),
            "expired",
        ),
        (
            "a wrong pre-shared key",
            psk(KEY),
            psk("00112233445566778899aabbccddeeff"),
            "pre-shared key",
        ),
        (
            "a plain source against TLS",
            Security::Plain,
            tls(&f.dest, &f.ca),
            "requires TLS",
        ),
        (
            "a TLS source against plain",
            tls(&f.source, &f.ca),
            Security::Plain,
            "plain TCP",
        ),
        (
            "a plain source against a key",
            Security::Plain,
            psk(KEY),
            "requires a pre-shared key",
        ),
        (
            "a keyed source against plain",
            psk(KEY),
            Security::Plain,
            "no pre-shared key",
        ),
    ];
    for (what, src, dst, says) in cases {
        let (r, info, d, vm) = migrate_with(src, dst, 0);
        let e = r.expect_err(what).chain();
        println!("{what}: {e}");
        assert!(e.contains(says), "{what}: {e}");
        assert_eq!(info.livemig.outcome, Outcome::RolledBack, "{what}");
        assert!(d.is_err(), "{what}: the destination never ran the guest");
        assert!(vm.running(), "{what}: the source runs");
    }
}

/// A page round that takes longer than the peer timeout, with pages on their own connection:
/// the control connection stays silent for the whole round, and that is not a stall while
/// the page connection moves. (Found when a 4 GiB guest's bulk round outlasted the 10 s
/// timeout and the destination gave up on the silent control connection.)
#[test]
fn a_page_round_longer_than_the_peer_timeout_is_not_a_stall() {
    need_kvm!();
    let vm = source_vm(128, 4.0, DirtyLogMode::Bitmap);
    // 48 MiB that do not compress, at 24 MiB/s: a bulk round of about 2 s.
    vm.programs().fill_incompressible(80 << 20).unwrap();
    let timeout = std::time::Duration::from_millis(700);
    let (addr, dest) = spawn_dest(DestOptions {
        peer_timeout: timeout,
        ..Default::default()
    });
    let o = SourceOptions {
        channels: 1,
        peer_timeout: timeout,
        max_bandwidth: Some(24 << 20),
        ..opts(DeviceTracking::Iommu)
    };
    let t = std::time::Instant::now();
    let info = migrate(&vm, &addr, &o, &MigrationControl::default()).unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(
        t.elapsed() > 3 * timeout,
        "the round outlasted the timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
    assert!(dest.join().unwrap().is_ok());
}
