//! The control plane must never take the VM down: a thousand idle connections, a path that
//! is not ours, cancels at any moment (under a bandwidth cap, in a stuck handshake, racing
//! the completion), and quit while a migration hangs.

mod common;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

#[test]
fn a_thousand_idle_connections_do_not_take_the_vm_down() {
    vmm::need_kvm!();
    raise_fd_limit();
    let s = sock("idle");
    let mut vm = run_vm(&s, &[]);
    let mut busy = Ctl::connect(&s);
    let mut idle: Vec<UnixStream> = Vec::new();
    for i in 0..1000 {
        idle.push(UnixStream::connect(&s).unwrap());
        if i % 100 == 0 {
            // A client that keeps asking is never the one closed to make room.
            busy.ret("query-status", json!({}));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(vm.wait_for(Duration::ZERO).is_none(), "the VM process is alive");
    // The first idle ones were closed to make room, and told why...
    idle[0].set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(&idle[0]).read_line(&mut line).unwrap();
    assert!(line.contains("this one was idle the longest"), "{line}");
    // ...so a newcomer is served at once, and so is the client that kept asking.
    let mut fresh = Ctl::connect(&s);
    guest_moves(&mut fresh);
    guest_moves(&mut busy);
    drop(idle);
    assert_eq!(fresh.ret("quit", json!({})), json!({}));
    assert_eq!(vm.wait_for(Duration::from_secs(10)), Some(0));
}

#[test]
fn the_control_path_is_never_stolen_or_clobbered() {
    vmm::need_kvm!();
    // A regular file is not ours to delete.
    let f = sock("file");
    std::fs::write(&f, b"precious").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--memory-mib", "64", "--control", &f])
        .output_within(LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    assert!(
        !std::path::Path::new(&format!("{f}.lock")).exists(),
        "no lock file left behind"
    );
    std::fs::remove_file(&f).unwrap();

    // A path a live VM listens on is refused, and the first VM keeps its socket.
    let s = sock("owned");
    let mut first = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);
    let out = std::process::Command::new(BIN)
        .args(["run", "--memory-mib", "64", "--control", &s])
        .output_within(LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another livemig VM owns the control socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    guest_moves(&mut ctl);
    assert!(UnixStream::connect(&s).is_ok(), "the first VM's socket is still there");
    ctl.ret("quit", json!({}));
    assert_eq!(first.wait_for(Duration::from_secs(10)), Some(0));
    assert!(!std::path::Path::new(&s).exists());

    // A stale socket (nobody listens) is replaced.
    let stale = sock("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(std::path::Path::new(&stale).exists());
    let mut vm = run_vm(&stale, &[]);
    let mut ctl = Ctl::connect(&stale);
    guest_moves(&mut ctl);
    ctl.ret("quit", json!({}));
    assert_eq!(vm.wait_for(Duration::from_secs(10)), Some(0));
}

/// Cancel at random moments: either it is cancelled and the source runs, or it completed
/// and the cancel is refused; never both, never neither.
#[test]
fn cancel_is_race_free_against_completion() {
    vmm::need_kvm!();
    let s = sock("race");
    let _vm = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);
    let (mut cancelled, mut completed) = (0, 0);
    for round in 0..8 {
        let delay = Duration::from_millis(rand::random_range(0..900));
        let (dest, addr) = receive();
        ctl.ret("migrate", json!({ "uri": addr }));
        std::thread::sleep(delay);
        let r = ctl.cmd("migrate-cancel", json!({}));
        let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
        println!("round {round}: cancel after {delay:?}: {r} -> {}", i["status"]);
        if r.get("return").is_some() {
            assert_eq!(i["status"], "cancelled", "accepted cancel: {i}");
            assert_eq!(i["livemig"]["outcome"], "rolled-back");
            guest_moves(&mut ctl);
            cancelled += 1;
        } else {
            let why = r["error"]["desc"].as_str().unwrap();
            assert!(
                why.contains("too late") || why.contains("no migration is running"),
                "{why}"
            );
            assert_eq!(i["status"], "completed", "refused cancel: {i}");
            assert_eq!(ctl.ret("query-status", json!({}))["status"], "postmigrate");
            // Take the guest back (the destination is about to go) for the next round.
            drop(dest);
            ctl.ret("cont", json!({ "force": true }));
            guest_moves(&mut ctl);
            completed += 1;
        }
    }
    println!("{cancelled} cancelled, {completed} completed");
}

#[test]
fn cancel_and_quit_take_effect_under_a_bandwidth_cap_and_in_a_stuck_handshake() {
    vmm::need_kvm!();
    let s = sock("stuck");
    let mut vm = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);

    // A migration crawling at 1 MiB/s: the sender sleeps off its debt; a cancel still works.
    let (_dest, addr) = receive();
    ctl.ret(
        "migrate",
        json!({ "uri": addr, "max-bandwidth": 1 << 20, "compress": false }),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    ctl.ret("migrate-cancel", json!({}));
    let i = ctl.wait_status(&["cancelled", "failed", "completed"]);
    assert_eq!(i["status"], "cancelled", "{i}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    guest_moves(&mut ctl);

    // A destination that accepts and then says nothing: the handshake would hang for the
    // peer timeout; a cancel ends it at once.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mute.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || mute.accept().map(|(c, _)| c));
    ctl.ret("migrate", json!({ "uri": addr, "peer-timeout": 60000 }));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    ctl.ret("migrate-cancel", json!({}));
    let i = ctl.wait_status(&["cancelled", "failed"]);
    assert_eq!(i["status"], "cancelled", "{i}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    guest_moves(&mut ctl);
    drop(held);

    // The same, and `quit`: the process exits promptly, not after the peer timeout.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = mute.local_addr().unwrap().to_string();
    let _held = std::thread::spawn(move || mute.accept().map(|(c, _)| c));
    ctl.ret("migrate", json!({ "uri": addr, "peer-timeout": 60000 }));
    std::thread::sleep(Duration::from_millis(300));
    ctl.ret("quit", json!({}));
    assert_eq!(vm.wait_for(Duration::from_secs(5)), Some(0), "quit ends the process");
}

#[test]
fn release_after_ends_the_source_once_the_handover_is_confirmed() {
    vmm::need_kvm!();
    let s = sock("release");
    let mut vm = run_vm(&s, &["--release-after", "0.5"]);
    let mut ctl = Ctl::connect(&s);
    let (_dest, addr) = receive();
    ctl.ret("migrate", json!({ "uri": addr }));
    let i = ctl.wait_status(&["completed", "failed"]);
    assert_eq!(i["status"], "completed", "{i}");
    assert_eq!(
        vm.wait_for(Duration::from_secs(5)),
        Some(0),
        "released and exited on its own"
    );
}

/// Past the commit, `quit` cannot drop what may be the guest's only copy: it is refused until
/// the outcome is known, and then needs force while the destination may not run the guest.
#[test]
fn quit_never_drops_what_may_be_the_only_copy() {
    vmm::need_kvm!();
    use faults::{Action, Dir, Fault, Proxy, Step};
    let s = sock("quit");
    let mut vm = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);
    let (dest, addr) = receive_with(&["--peer-timeout", "2"]);
    // The proxy swallows the commit: the destination never resumes, and the source, which
    // committed, cannot know that.
    let fault = Fault {
        step: Step::AfterReady,
        dir: Dir::ToDest,
        action: Action::Stall,
        seed: 1,
    };
    let proxy = Proxy::start(addr, fault, dest.0.id(), Duration::from_secs(1)).unwrap();
    ctl.ret("migrate", json!({ "uri": proxy.addr, "peer-timeout": 2000 }));
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(30), "no switchover");
        let st = ctl.ret("query-status", json!({}));
        if st["status"] == "finish-migrate" && proxy.fired().frame.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = ctl.cmd("quit", json!({}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("past its commit"), "{r}");
    let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
    assert_eq!(i["livemig"]["outcome"], "held", "{i}");
    let r = ctl.cmd("quit", json!({}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("only copy"), "{r}");
    let r = ctl.cmd("quit", json!({ "force": "yes" }));
    assert!(r["error"]["desc"].as_str().unwrap().contains("true or false"), "{r}");
    assert!(
        vm.wait_for(Duration::from_millis(300)).is_none(),
        "still holding the guest"
    );
    // The destination gave up without the commit; the operator runs the guest here again.
    drop(proxy);
    drop(dest);
    ctl.ret("cont", json!({ "force": true }));
    guest_moves(&mut ctl);
    assert_eq!(ctl.ret("quit", json!({})), json!({}));
    assert_eq!(vm.wait_for(Duration::from_secs(10)), Some(0));
}

/// A command sent right after `query-migrate` said `failed` sees the state that status
/// promised: a retry is accepted, not refused as "a migration is already running" (the
/// migration thread may still be handing the guest back when the status is published).
#[test]
fn a_retry_right_after_failed_is_accepted() {
    vmm::need_kvm!();
    let s = sock("retry");
    let _vm = run_vm(&s, &[]);
    let mut ctl = Ctl::connect(&s);
    // The window is short: enough rounds that the race, if it is there, shows.
    for round in 0..25 {
        // A port nobody listens on: the connection is refused at once.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        ctl.ret("migrate", json!({ "uri": closed.to_string(), "peer-timeout": 2000 }));
        let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
        assert_eq!(i["status"], "failed", "round {round}: {i}");
        let r = ctl.cmd("migrate", json!({ "uri": closed.to_string(), "peer-timeout": 2000 }));
        assert!(r.get("return").is_some(), "round {round}: retry refused: {r}");
        let i = ctl.wait_status(&["completed", "failed", "cancelled"]);
        assert_eq!(i["status"], "failed", "round {round}: {i}");
    }
    let (_dest, addr) = receive();
    ctl.ret("migrate", json!({ "uri": addr }));
    let i = ctl.wait_status(&["completed", "failed"]);
    assert_eq!(i["status"], "completed", "{i}");
}
