//! The `livemig` command as a user runs it: real processes, a real unix control socket, real
//! TCP on 127.0.0.1, and a destination killed with SIGKILL mid-migration.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn receive() -> (Kid, String) {
    let mut c = Command::new(BIN)
        .args(["receive", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    (Kid(c), addr)
}

struct Ctl(BufReader<UnixStream>);

impl Ctl {
    fn connect(path: &str) -> Ctl {
        let t = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                return Ctl(BufReader::new(s));
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        writeln!(
            self.0.get_mut(),
            "{}",
            json!({ "execute": execute, "arguments": arguments })
        )
        .unwrap();
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }
    fn wait_status(&mut self, done: &[&str]) -> Value {
        let t = Instant::now();
        loop {
            let i = self.cmd("query-migrate", json!({}))["return"].clone();
            if done.contains(&i["status"].as_str().unwrap_or("")) {
                return i;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "migration did not end: {i}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn help_documents_every_command_and_option() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for c in ["demo", "run", "migrate", "receive", "bench"] {
        assert!(s.contains(c), "--help lists {c}");
    }
    let out = Command::new(BIN).args(["demo", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for o in [
        "--memory-mib",
        "--rate",
        "--mode",
        "--channels",
        "--downtime-limit",
        "--max-iterations",
        "--auto-converge",
        "--json",
        "--dirty-log",
    ] {
        assert!(s.contains(o), "demo --help documents {o}");
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = Command::new(BIN).args(["demo", "--mode", "fast"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'fast'"));
    let out = Command::new(BIN)
        .args(["migrate", "--control", "/nonexistent/x.sock", "--to", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to the control socket /nonexistent/x.sock"));
}

#[test]
fn demo_json_reports_a_verified_migration() {
    vmm::need_kvm!();
    let out = Command::new(BIN)
        .args([
            "demo",
            "--json",
            "--memory-mib",
            "256",
            "--ws-mib",
            "128",
            "--rate",
            "64",
            "--warmup-ms",
            "300",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["livemig"]["verified"], true, "{}", v["livemig"]["verify-detail"]);
    for k in ["total-time", "setup-time", "downtime", "expected-downtime"] {
        assert!(v[k].is_u64(), "{k}");
    }
    for k in [
        "transferred",
        "dirty-sync-count",
        "duplicate",
        "normal",
        "total",
        "iteration-count",
    ] {
        assert!(v["ram"][k].is_u64(), "ram.{k}");
    }
    assert_eq!(v["ram"]["total"], 256u64 << 20);
}

#[test]
fn killed_destination_leaves_the_source_running_then_a_second_migration_succeeds() {
    vmm::need_kvm!();
    let sock = format!("/tmp/livemig-cli-test-{}.sock", std::process::id());
    let _src = Kid(Command::new(BIN)
        .args([
            "run",
            "--memory-mib",
            "256",
            "--ws-mib",
            "128",
            "--rate",
            "64",
            "--control",
            &sock,
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    let mut ctl = Ctl::connect(&sock);
    let (mut dest, addr) = receive();
    // A zero downtime limit never converges: it iterates until the destination dies.
    let r = ctl.cmd(
        "migrate",
        json!({ "uri": addr, "downtime-limit": 0, "max-iterations": 1000000 }),
    );
    assert_eq!(r, json!({ "return": {} }));
    let t = Instant::now();
    while ctl.cmd("query-migrate", json!({}))["return"]["ram"]["iteration-count"]
        .as_u64()
        .unwrap_or(0)
        < 5
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    dest.0.kill().unwrap(); // SIGKILL
    let i = ctl.wait_status(&["failed"]);
    assert_eq!(i["livemig"]["failed-phase"], "active", "{i}");
    assert!(i["error-desc"].as_str().unwrap().len() > 3);
    let s0 = ctl.cmd("query-status", json!({}))["return"].clone();
    std::thread::sleep(Duration::from_millis(300));
    let s1 = ctl.cmd("query-status", json!({}))["return"].clone();
    assert_eq!(s1["status"], "running");
    assert!(
        s1["pages-written"].as_u64() > s0["pages-written"].as_u64(),
        "{s0} -> {s1}"
    );
    assert!(
        s1["jobs-completed"].as_u64() > s0["jobs-completed"].as_u64(),
        "{s0} -> {s1}"
    );

    let (_dest2, addr) = receive();
    ctl.cmd("migrate", json!({ "uri": addr }));
    let i = ctl.wait_status(&["completed", "failed"]);
    assert_eq!(i["status"], "completed", "{i}");
    assert_eq!(i["livemig"]["verified"], true, "{i}");
}
