//! `run --incoming` processes that take guests in turn, and the soak built on them: five
//! verified migrations within the soak's bounds, and a leaked descriptor, thread or block of
//! memory caught by those bounds.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn wait_run_state(ctl: &mut Ctl, want: &str) -> Value {
    let t = Instant::now();
    loop {
        let st = ctl.ret("query-status", json!({}));
        if st["status"] == want {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never {want}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error(r: &Value) -> &str {
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {r}"))
}

#[test]
fn incoming_processes_take_guests_in_turn_and_never_drop_the_only_copy() {
    vmm::need_kvm!();
    use faults::{Action, Dir, Fault, Proxy, Step};
    let (sa, sb, so) = (sock("inc-a"), sock("inc-b"), sock("inc-origin"));
    let (_a, addr_a) = run_incoming(&sa, &[]);
    let (_b, addr_b) = run_incoming(&sb, &[]);
    let (mut ca, mut cb) = (Ctl::connect(&sa), Ctl::connect(&sb));

    // Empty: nothing to migrate, resume or release.
    let st = ca.ret("query-status", json!({}));
    assert_eq!(st["status"], "inmigrate", "{st}");
    assert_eq!(st["guests-received"], 0, "{st}");
    assert_eq!(st["incoming"], addr_a.as_str(), "{st}");
    assert!(error(&ca.cmd("migrate", json!({ "uri": addr_b }))).contains("no guest here"));
    assert!(error(&ca.cmd("cont", json!({}))).contains("no guest here"));
    assert_eq!(ca.ret("release", json!({})), json!({}));

    // The origin hands the guest to A; a process without --incoming cannot release.
    let mut origin = run_vm(&so, &[]);
    let mut co = Ctl::connect(&so);
    co.ret("migrate", json!({ "uri": addr_a }));
    assert_eq!(co.wait_status(&["completed", "failed"])["status"], "completed");
    assert!(error(&co.cmd("release", json!({}))).contains("--incoming"));
    co.ret("quit", json!({}));
    assert_eq!(origin.wait_for(Duration::from_secs(10)), Some(0));
    let st = wait_run_state(&mut ca, "running");
    assert_eq!(st["guests-received"], 1, "{st}");
    assert!(error(&ca.cmd("release", json!({}))).contains("runs here"));

    // A → B with the commit swallowed: A holds the guest, and the destination never ran it,
    // so A may hold the only copy. Release is refused without force, as quit is.
    let (dest, addr_d) = receive_with(&["--peer-timeout", "2"]);
    let fault = Fault {
        step: Step::AfterReady,
        dir: Dir::ToDest,
        action: Action::Stall,
        seed: 1,
    };
    let proxy = Proxy::start(addr_d, fault, dest.0.id(), Duration::from_secs(1)).unwrap();
    ca.ret("migrate", json!({ "uri": proxy.addr, "peer-timeout": 2000 }));
    let i = ca.wait_status(&["completed", "failed", "cancelled"]);
    assert_eq!(i["livemig"]["outcome"], "held", "{i}");
    assert!(error(&ca.cmd("release", json!({}))).contains("only copy"));
    drop(proxy);
    drop(dest);
    ca.ret("cont", json!({ "force": true }));
    wait_run_state(&mut ca, "running");

    // A → B for real; A releases and waits again, then takes the guest back from B.
    ca.ret("migrate", json!({ "uri": addr_b }));
    let i = ca.wait_status(&["completed", "failed"]);
    assert_eq!(i["status"], "completed", "{i}");
    assert_eq!(i["livemig"]["verified"], true, "{i}");
    ca.ret("release", json!({}));
    assert_eq!(ca.ret("query-status", json!({}))["status"], "inmigrate");
    wait_run_state(&mut cb, "running");
    cb.ret("migrate", json!({ "uri": addr_a }));
    let i = cb.wait_status(&["completed", "failed"]);
    assert_eq!(i["status"], "completed", "{i}");
    cb.ret("release", json!({}));
    let st = wait_run_state(&mut ca, "running");
    assert_eq!(st["guests-received"], 2, "{st}");
    let later = {
        std::thread::sleep(Duration::from_millis(300));
        ca.ret("query-status", json!({}))
    };
    assert!(
        later["pages-written"].as_u64() > st["pages-written"].as_u64(),
        "{later}"
    );
    assert_eq!(later["guest-errors"], 0, "{later}");
}

/// The source learns that the guest runs on the destination before the destination's own
/// checks after the resume are over; from that moment the `--incoming` process must not
/// say "no guest here" (which would invite an operator to quit it, or to take it for empty).
#[test]
fn an_incoming_process_owns_the_guest_from_the_moment_it_runs() {
    vmm::need_kvm!();
    let (sa, so) = (sock("own-a"), sock("own-origin"));
    let (_a, addr_a) = run_incoming(&sa, &[]);
    let mut ca = Ctl::connect(&sa);
    let _origin = run_vm(&so, &[]);
    let mut co = Ctl::connect(&so);
    co.ret("migrate", json!({ "uri": addr_a }));
    let t = Instant::now();
    loop {
        let i = co.ret("query-migrate", json!({}));
        if i["livemig"]["destination"] == "running" {
            break;
        }
        assert!(i["status"] != "failed", "{i}");
        assert!(t.elapsed() < Duration::from_secs(60), "{i}");
    }
    let st = ca.ret("query-status", json!({}));
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["running"], true, "{st}");
    if st["arriving"] == true {
        // Still checking: it cannot be sent on yet, nor released.
        assert!(error(&ca.cmd("migrate", json!({ "uri": "127.0.0.1:1" }))).contains("still arriving"));
        assert!(error(&ca.cmd("release", json!({}))).contains("runs here"));
    }
    assert_eq!(co.wait_status(&["completed", "failed"])["status"], "completed");
    let st = wait_run_state(&mut ca, "running");
    assert_eq!(st["guests-received"], 1, "{st}");
}

#[test]
fn run_takes_transport_options_only_with_incoming() {
    let out = Command::new(BIN)
        .args(["run", "--psk-file", "/nonexistent", "--control", &sock("opts")])
        .output_within(LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("for --incoming"));
}

fn soak(extra: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(BIN)
        .args(["soak", "--json", "--migrations", "5", "--memory-mib", "256"])
        .args(["--ws-mib", "128", "--rate", "64", "--dwell-ms", "300"])
        .args(extra)
        .output_within(LIMIT);
    let v =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

/// The CI soak: five verified migrations, the guest and its accelerator making progress on
/// every host, every figure of both processes within its bound.
#[test]
fn a_short_soak_passes_within_its_bounds() {
    vmm::need_kvm!();
    let (code, v) = soak(&[]);
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["passed"], true);
    assert_eq!(v["migrations"], 5);
    assert_eq!(v["breaches"], json!([]));
    for r in v["runs"].as_array().unwrap() {
        for k in ["pages", "jobs"] {
            assert!(
                r[format!("{k}-after")].as_u64() > r[format!("{k}-before")].as_u64(),
                "{k}: {r}"
            );
        }
    }
    for p in ["A", "B"] {
        for state in ["holding", "empty"] {
            assert!(
                v["processes"][p][state]["samples"].as_u64() >= Some(2),
                "{p} {state}: {v:#}"
            );
        }
    }
}

/// The bounds must see a leak: processes that leak one descriptor, one thread or 40 MiB per
/// guest received fail the soak, on that figure.
#[test]
fn the_soak_catches_a_leaked_descriptor_thread_or_memory() {
    vmm::need_kvm!();
    for (leak, what) in [("fd", "fds"), ("thread", "threads"), ("memory", "rss-kib")] {
        let (code, v) = soak(&["--sabotage-leak", leak]);
        assert_eq!(code, Some(1), "{leak}: {v:#}");
        assert_eq!(v["passed"], false);
        let b = v["breaches"].as_array().unwrap();
        assert!(!b.is_empty() && b.iter().all(|b| b["what"] == what), "{leak}: {b:?}");
        // A failed soak keeps its processes' logs, and says where.
        let logs = v["logs"].as_str().unwrap();
        assert!(std::path::Path::new(logs).join("A.log").exists(), "{logs}");
        std::fs::remove_dir_all(logs).unwrap();
    }
}
