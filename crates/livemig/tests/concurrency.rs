//! Concurrency and load: two VMs migrating at once on one host, each to its own destination,
//! both verified; and a hundred management clients polling `query-migrate` throughout a
//! migration, every one of them answered.

mod common;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn two_vms_migrate_at_once_to_two_destinations_both_verified() {
    vmm::need_kvm!();
    let (s1, s2) = (sock("two-1"), sock("two-2"));
    let (_vm1, _vm2) = (run_vm(&s1, &[]), run_vm(&s2, &[]));
    let (mut c1, mut c2) = (Ctl::connect(&s1), Ctl::connect(&s2));
    let ((_d1, a1), (_d2, a2)) = (receive(), receive());
    c1.ret("migrate", json!({ "uri": a1 }));
    c2.ret("migrate", json!({ "uri": a2 }));
    // Both are under way before either is followed to its end.
    for c in [&mut c1, &mut c2] {
        let i = c.ret("query-migrate", json!({}));
        assert!(i["status"] != "failed", "{i}");
    }
    for c in [&mut c1, &mut c2] {
        let i = c.wait_status(&["completed", "failed", "cancelled"]);
        assert_eq!(i["status"], "completed", "{i}");
        assert_eq!(i["livemig"]["verified"], true, "{i}");
    }
}

/// One client on its own connection, polling until told to stop: (replies, errors).
fn poll(path: String, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let (mut ok, mut errors) = (0, Vec::new());
    while !stop.load(Ordering::Acquire) {
        let mut line = String::new();
        let sent = writeln!(w, "{}", json!({"execute": "query-migrate"}));
        match sent.and_then(|()| r.read_line(&mut line)) {
            Ok(n) if n > 0 && line.contains("\"return\"") => ok += 1,
            Ok(_) => errors.push(line),
            Err(e) => errors.push(e.to_string()),
        }
        if !errors.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (ok, errors)
}

#[test]
fn a_hundred_clients_polling_are_all_answered_during_a_migration() {
    vmm::need_kvm!();
    let s = sock("hundred");
    let _vm = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);
    let (_d, addr) = receive();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (p, st) = (s.clone(), stop.clone());
            std::thread::spawn(move || poll(p, st))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    ctl.ret("migrate", json!({ "uri": addr }));
    let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
    stop.store(true, Ordering::Release);
    assert_eq!(i["status"], "completed", "{i}");
    assert_eq!(i["livemig"]["verified"], true, "{i}");
    let mut replies = 0;
    for c in clients {
        let (ok, errors) = c.join().unwrap();
        assert!(errors.is_empty(), "a client was refused or dropped: {errors:?}");
        assert!(ok > 0);
        replies += ok;
    }
    assert!(replies >= 100, "{replies}");
}

/// A smoke of `bench control` (the documented run is longer): both rows, the ratio, and the
/// clients' figures, all answered.
#[test]
fn the_control_load_benchmark_compares_with_and_without_clients() {
    vmm::need_kvm!();
    let out = std::process::Command::new(BIN)
        .args([
            "bench",
            "control",
            "--runs",
            "1",
            "--clients",
            "20",
            "--interval-ms",
            "20",
        ])
        .args([
            "--memory-mib",
            "128",
            "--ws-mib",
            "32",
            "--rate",
            "16",
            "--warmup-ms",
            "200",
        ])
        .output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.lines().any(|l| l.starts_with("| 0 | ")), "{s}");
    assert!(s.lines().any(|l| l.starts_with("| 20 | ")), "{s}");
    assert!(s.contains("downtime with ÷ without: "), "{s}");
    assert!(s.contains(" 0 errors;"), "{s}");
}
