#![allow(dead_code)]
//! Processes and the control socket, as the tests drive them.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// A child process, killed when dropped.
pub struct Kid(pub Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Kid {
    /// Waits at most `d` for the process to exit; its status code.
    pub fn wait_for(&mut self, d: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < d {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Starts `cmd`, a livemig that prints `listening on ADDR` first: the child and ADDR.
pub fn listening(mut cmd: Command) -> (Kid, String) {
    let mut c = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    (Kid(c), addr)
}

/// `livemig receive` on a free port, with `extra` arguments.
pub fn receive_with(extra: &[&str]) -> (Kid, String) {
    let mut c = Command::new(BIN);
    c.args(["receive", "--listen", "127.0.0.1:0"]).args(extra);
    listening(c)
}

/// `livemig run --incoming` on a free port with control socket `sock`: empty until a guest
/// migrates in.
pub fn run_incoming(sock: &str, extra: &[&str]) -> (Kid, String) {
    let mut c = Command::new(BIN);
    c.args(["run", "--incoming", "127.0.0.1:0", "--control", sock])
        .args(extra);
    listening(c)
}

/// The guest runs here, making progress.
pub fn guest_moves(ctl: &mut Ctl) {
    let a = ctl.ret("query-status", json!({}));
    std::thread::sleep(Duration::from_millis(300));
    let b = ctl.ret("query-status", json!({}));
    assert_eq!(b["status"], "running", "{b}");
    assert_eq!(b["running"], true, "{b}");
    assert!(b["pages-written"].as_u64() > a["pages-written"].as_u64(), "{a} -> {b}");
}

pub fn receive() -> (Kid, String) {
    receive_with(&[])
}

/// A unique control socket path for this test process.
pub fn sock(name: &str) -> String {
    format!("/tmp/livemig-test-{}-{name}.sock", std::process::id())
}

/// `livemig run` with a small busy guest on `sock`, and `extra` arguments.
pub fn run_vm(sock: &str, extra: &[&str]) -> Kid {
    Kid(Command::new(BIN)
        .args([
            "run",
            "--memory-mib",
            "128",
            "--ws-mib",
            "64",
            "--rate",
            "32",
            "--control",
            sock,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap())
}

pub struct Ctl(pub BufReader<UnixStream>);

impl Ctl {
    pub fn connect(path: &str) -> Ctl {
        let t = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return Ctl(BufReader::new(s));
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        writeln!(
            self.0.get_mut(),
            "{}",
            json!({ "execute": execute, "arguments": arguments })
        )
        .unwrap();
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }
    pub fn ret(&mut self, execute: &str, arguments: Value) -> Value {
        let r = self.cmd(execute, arguments);
        assert!(r.get("return").is_some(), "{execute}: {r}");
        r["return"].clone()
    }
    pub fn wait_status(&mut self, done: &[&str]) -> Value {
        let t = Instant::now();
        loop {
            let i = self.ret("query-migrate", json!({}));
            if done.contains(&i["status"].as_str().unwrap_or("")) {
                return i;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "migration did not end: {i}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How long a test waits for a `livemig` it runs to exit (a demo takes seconds here).
pub const LIMIT: Duration = Duration::from_secs(300);

/// `Command::output`, bounded: a child that outlives `d` is killed (its own children, which
/// watch their parent, follow it) and the test fails saying so, instead of hanging CI.
pub trait OutputWithin {
    fn output_within(&mut self, d: Duration) -> std::process::Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, d: Duration) -> std::process::Output {
        use std::io::Read;
        let mut c = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(c.stdout.take().unwrap()));
        let err = drain(Box::new(c.stderr.take().unwrap()));
        let t = Instant::now();
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > d {
                let _ = c.kill();
                let _ = c.wait();
                let e = err.join().unwrap_or_default();
                panic!(
                    "{self:?} did not exit within {d:?}; its stderr:\n{}",
                    String::from_utf8_lossy(&e)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::process::Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }
}
