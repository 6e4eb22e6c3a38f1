//! Logging as a user sees it: events on stderr (text, or JSON lines with `--log-format json`),
//! levels from RUST_LOG, and stdout left to the command's output. The process is a
//! `run --incoming` that is told to quit: quick, and no KVM needed (it has no guest yet).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `livemig [args] run --incoming` with RUST_LOG set to `rust_log` (unset: None), quits
/// it, and returns what it printed: (stdout after the `listening on` line, stderr).
fn run_and_quit(name: &str, args: &[&str], rust_log: Option<&str>) -> (String, String) {
    let s = sock(name);
    let mut c = Command::new(BIN);
    c.args(args)
        .args(["run", "--incoming", "127.0.0.1:0", "--control", &s])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match rust_log {
        Some(v) => c.env("RUST_LOG", v),
        None => c.env_remove("RUST_LOG"),
    };
    let mut kid = Kid(c.spawn().unwrap());
    let mut out = BufReader::new(kid.0.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("listening on "), "stdout's first line: {first:?}");
    let mut ctl = Ctl::connect(&s);
    assert_eq!(ctl.ret("quit", json!({})), json!({}));
    assert_eq!(kid.wait_for(Duration::from_secs(10)), Some(0), "quit ends the process");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    kid.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (rest, err)
}

#[test]
fn log_format_json_writes_one_json_object_per_line_on_stderr() {
    let (out, err) = run_and_quit("log-json", &["--log-format", "json"], None);
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{err}")))
        .collect();
    assert!(!lines.is_empty(), "no log lines on stderr");
    for v in &lines {
        assert!(v.is_object(), "{v}");
        assert!(v["level"].is_string(), "a level: {v}");
        assert!(v["message"].is_string(), "a message: {v}");
        assert!(v["timestamp"].is_string(), "a timestamp: {v}");
    }
    let waiting = lines
        .iter()
        .find(|v| v["message"] == "waiting for an incoming guest")
        .unwrap_or_else(|| panic!("the start is logged: {err}"));
    assert_eq!(waiting["level"], "INFO");
    assert!(
        waiting["control"].as_str().unwrap().ends_with("log-json.sock"),
        "its fields: {waiting}"
    );
    assert!(lines.iter().any(|v| v["message"] == "quit"), "{err}");
    // Stdout carries the command's output, never a log event.
    assert!(
        !out.contains("waiting for an incoming guest") && !out.contains("quit"),
        "{out}"
    );
}

#[test]
fn rust_log_warn_suppresses_info_lines() {
    // The default (text) format, at the default level: the info events are there ...
    let (_, err) = run_and_quit("log-info", &[], None);
    assert!(
        err.lines()
            .any(|l| l.contains(" INFO ") && l.contains("waiting for an incoming guest")),
        "{err}"
    );
    assert!(err.lines().any(|l| l.contains(" INFO ") && l.contains("quit")), "{err}");
    // ... and with RUST_LOG=warn they are not, in either format.
    let (_, err) = run_and_quit("log-warn", &[], Some("warn"));
    assert!(
        !err.contains("INFO") && !err.contains("waiting for an incoming guest"),
        "{err}"
    );
    let (_, err) = run_and_quit("log-warn-json", &["--log-format", "json"], Some("warn"));
    assert!(
        err.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["level"] != "INFO"),
        "{err}"
    );
    assert!(!err.contains("waiting for an incoming guest"), "{err}");
}

#[test]
fn help_documents_the_log_format_and_rust_log() {
    let out = Command::new(BIN).arg("--help").output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("--log-format"), "{s}");
    assert!(s.contains("RUST_LOG"), "{s}");
    // A global option: every command takes it.
    let out = Command::new(BIN).args(["demo", "--help"]).output_within(LIMIT);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--log-format"));
    let out = Command::new(BIN)
        .args(["receive", "--listen", "127.0.0.1:0", "--log-format", "xml"])
        .output_within(LIMIT);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'xml'"));
}
