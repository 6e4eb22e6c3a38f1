//! Migrations between two hosts on one machine: the source and the destination in two network
//! namespaces joined by a veth pair shaped with `tc tbf`, and faults on that link (it is cut,
//! or goes down and comes back), and latency and jitter from the impairing relay. The
//! namespaces are removed whatever happens, a panicking test included.

mod common;
use common::*;
use netlab::{Shape, Side, TwoHosts};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `BIN args...` inside `side`'s namespace, printing `listening on ADDR` first: the child and
/// ADDR.
fn listening_in(h: &TwoHosts, side: Side, args: &[&str]) -> (Kid, String) {
    let mut c = h.command(side, BIN);
    c.args(args);
    listening(c)
}

fn receive_in(h: &TwoHosts) -> (Kid, String) {
    let listen = format!("{}:0", h.addr(Side::Dest));
    listening_in(h, Side::Dest, &["receive", "--listen", &listen, "--peer-timeout", "2"])
}

/// A small busy guest in the source's namespace, controlled through `sock`.
fn source_in(h: &TwoHosts, sock: &str) -> (Kid, Ctl) {
    let vm = h
        .command(Side::Source, BIN)
        .args([
            "run",
            "--memory-mib",
            "256",
            "--ws-mib",
            "128",
            "--rate",
            "64",
            "--control",
            sock,
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (Kid(vm), Ctl::connect(sock))
}

fn completed_verified(i: &Value) {
    assert_eq!(i["status"], "completed", "{i}");
    assert_eq!(i["livemig"]["verified"], true, "{i}");
}

/// Waits until pre-copy is under way: the migration is active and has sent something.
fn wait_precopy(ctl: &mut Ctl) {
    let t = Instant::now();
    loop {
        let i = ctl.ret("query-migrate", json!({}));
        if i["status"] == "active" && i["ram"]["transferred"].as_u64() > Some(1 << 20) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no pre-copy: {i}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_verified_migration_crosses_a_shaped_link_between_two_namespaces() {
    vmm::need_kvm!();
    netlab::need_netns!();
    let h = TwoHosts::create(Some(Shape { mbit: 1000.0 })).unwrap();
    for side in [Side::Source, Side::Dest] {
        let q = h.qdisc(side).unwrap();
        assert!(q.contains("tbf") && q.contains("rate 1Gbit"), "{q}");
    }
    let (_dest, addr) = receive_in(&h);
    assert!(addr.starts_with("10.77.0.2:"), "{addr}");
    let s = sock("net-ok");
    let (_vm, mut ctl) = source_in(&h, &s);
    // The source cannot reach the destination on its own loopback: the link is the only way.
    let port = addr.rsplit_once(':').unwrap().1;
    let r = ctl.cmd(
        "migrate",
        json!({ "uri": format!("127.0.0.1:{port}"), "peer-timeout": 2000 }),
    );
    if r.get("return").is_some() {
        let i = ctl.wait_status(&["completed", "failed"]);
        assert_eq!(i["status"], "failed", "{i}");
    }
    ctl.ret("migrate", json!({ "uri": addr }));
    completed_verified(&ctl.wait_status(&["completed", "failed"]));
}

/// The cable pulled out mid-pre-copy: the source gives up after its peer timeout, rolls back
/// and runs the guest; the destination, without a commit, discards its copy and exits non-zero.
#[test]
fn cutting_the_link_mid_migration_leaves_the_guest_with_the_source() {
    vmm::need_kvm!();
    netlab::need_netns!();
    let h = TwoHosts::create(Some(Shape { mbit: 1000.0 })).unwrap();
    let (mut dest, addr) = receive_in(&h);
    let s = sock("net-cut");
    let (_vm, mut ctl) = source_in(&h, &s);
    // A bandwidth cap keeps pre-copy going for seconds.
    ctl.ret(
        "migrate",
        json!({ "uri": addr, "max-bandwidth": 4 << 20, "peer-timeout": 2000, "compress": false }),
    );
    wait_precopy(&mut ctl);
    h.cut().unwrap();
    let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
    assert_eq!(i["status"], "failed", "{i}");
    assert_eq!(i["livemig"]["outcome"], "rolled-back", "{i}");
    guest_moves(&mut ctl);
    let code = dest.wait_for(Duration::from_secs(15));
    assert!(
        matches!(code, Some(c) if c != 0),
        "the destination discards and fails: {code:?}"
    );
}

/// The link goes down for longer than the peer timeout and comes back: the migration fails
/// cleanly (rolled back, the guest runs on the source), and a retry over the same link
/// succeeds.
#[test]
fn a_link_down_then_up_fails_cleanly_and_a_retry_succeeds() {
    vmm::need_kvm!();
    netlab::need_netns!();
    let h = TwoHosts::create(Some(Shape { mbit: 1000.0 })).unwrap();
    let (mut dest, addr) = receive_in(&h);
    let s = sock("net-flap");
    let (_vm, mut ctl) = source_in(&h, &s);
    ctl.ret(
        "migrate",
        json!({ "uri": addr, "max-bandwidth": 4 << 20, "peer-timeout": 2000, "compress": false }),
    );
    wait_precopy(&mut ctl);
    h.set_link(false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    h.set_link(true).unwrap();
    let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
    assert_eq!(i["status"], "failed", "{i}");
    assert_eq!(i["livemig"]["outcome"], "rolled-back", "{i}");
    guest_moves(&mut ctl);
    assert!(dest.wait_for(Duration::from_secs(15)).is_some_and(|c| c != 0));
    let (_dest2, addr2) = receive_in(&h);
    ctl.ret("migrate", json!({ "uri": addr2 }));
    completed_verified(&ctl.wait_status(&["completed", "failed"]));
}

/// Latency and jitter from the impairing relay (`livemig proxy`) in the source's namespace:
/// the migration still completes verified, and the relay's delay is visible in a round trip.
#[test]
fn a_migration_through_latency_and_jitter_completes_verified() {
    vmm::need_kvm!();
    netlab::need_netns!();
    let h = TwoHosts::create(None).unwrap();
    let (_dest, addr) = receive_in(&h);
    let (_relay, relay) = listening_in(
        &h,
        Side::Source,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &addr,
            "--latency-ms",
            "10",
            "--jitter-ms",
            "5",
        ],
    );
    let s = sock("net-lat");
    let (_vm, mut ctl) = source_in(&h, &s);
    ctl.ret("migrate", json!({ "uri": relay }));
    let i = ctl.wait_status(&["completed", "failed"]);
    completed_verified(&i);
    // Every acknowledgement crossed the relay twice: pre-copy took at least a few round trips.
    assert!(i["total-time"].as_u64() >= Some(40), "{i}");
}

/// The namespaces go with the test that made them, also when it panics; and ones left by a
/// process that was killed are removed by the next creation.
#[test]
fn namespaces_are_removed_even_when_a_test_fails() {
    netlab::need_netns!();
    let made = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let h = TwoHosts::create(Some(Shape { mbit: 10_000.0 })).unwrap();
        for side in [Side::Source, Side::Dest] {
            made.lock().unwrap().push(h.namespace(side).to_string());
        }
        assert!(netlab::list().contains(&made.lock().unwrap()[0]));
        panic!("a failing test");
    });
    assert!(r.is_err());
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 2);
    let now = netlab::list();
    assert!(
        made.iter().all(|n| !now.contains(n)),
        "left behind: {made:?} in {now:?}"
    );

    // A namespace named after a process that no longer exists.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = format!("lmig{pid}x0s");
    let ok = Command::new("ip").args(["netns", "add", &stale]).status().unwrap();
    assert!(ok.success());
    let h = TwoHosts::create(None).unwrap();
    assert!(!netlab::list().contains(&stale), "the stale namespace was swept");
    drop(h);
}

/// A smoke of `bench net` (the documented run is longer): a row per link and mode, each with
/// the link's raw TCP throughput and its ratio against iommu from the same run.
#[test]
fn the_network_benchmark_measures_every_link_and_mode() {
    vmm::need_kvm!();
    netlab::need_netns!();
    let child = Command::new(BIN)
        .args(["bench", "net", "--links", "loopback,1gbit", "--modes", "iommu,none"])
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
        .args(["--probe-mib", "32", "--latency-ms", "1", "--jitter-ms", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains("through the relay, 1 ms ± 1 ms each way"), "{s}");
    for row in ["| loopback |", "| 1gbit |"] {
        for mode in ["| iommu | completed |", "| none | completed |"] {
            let line = s
                .lines()
                .find(|l| l.starts_with(row) && l.contains(mode))
                .unwrap_or_else(|| panic!("{row} {mode}: {s}"));
            assert!(line.contains("MiB/s") && line.contains('×'), "{line}");
        }
    }
    assert_eq!(
        netlab::of_process(pid),
        Vec::<String>::new(),
        "the benchmark's namespaces are gone"
    );
}

#[test]
fn bad_links_are_refused_up_front() {
    for (link, says) in [
        ("2tbit", "a link is loopback or a rate"),
        ("0gbit", "from 1mbit to 100gbit"),
    ] {
        let out = Command::new(BIN)
            .args(["bench", "net", "--links", link])
            .output_within(LIMIT);
        assert_eq!(out.status.code(), Some(1), "{link}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(says), "{link}");
    }
}
