//! The transport options as a user gives them: `demo --tls`, `demo --psk-file`, and `migrate`
//! to a `receive` holding TLS credentials or a key, through real processes.

mod common;
use common::*;
use migration::transport::throwaway;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-cli-transport-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn key_file(d: &std::path::Path, mode: u32) -> PathBuf {
    let f = d.join(format!("psk-{mode:o}"));
    std::fs::write(&f, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// `livemig demo --json` with `extra` arguments: its JSON, and its process id.
fn demo(extra: &[&str]) -> (Value, u32) {
    let child = Command::new(BIN)
        .args(["demo", "--json", "--warmup-ms", "300", "--channels", "2"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), pid)
}

#[test]
fn demo_over_mutual_tls_and_with_a_key_completes_verified() {
    vmm::need_kvm!();
    let d = dir("demo");
    let f = key_file(&d, 0o600);
    let small = ["--memory-mib", "256", "--ws-mib", "128", "--rate", "64"];
    // TLS at the demo's own size (1 GiB, the dirtier at 256 MiB/s); the others smaller.
    let key = [&["--psk-file", f.to_str().unwrap()][..], &small[..]].concat();
    for (extra, transport) in [(vec!["--tls"], "tls"), (key, "psk"), (small.to_vec(), "tcp")] {
        let (v, pid) = demo(&extra);
        assert_eq!(v["status"], "completed", "{extra:?}");
        assert_eq!(v["livemig"]["transport"], transport, "{extra:?}");
        assert_eq!(
            v["livemig"]["verified"], true,
            "{extra:?}: {}",
            v["livemig"]["verify-detail"]
        );
        // The throwaway credentials are gone with the demo.
        let creds = std::env::temp_dir().join(format!("livemig-demo-{pid}-tls"));
        assert!(!creds.exists(), "{}", creds.display());
    }
}

#[test]
fn bad_transport_options_are_refused_up_front() {
    let d = dir("bad");
    let open = key_file(&d, 0o644);
    let short = d.join("short");
    std::fs::write(&short, "abcd").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cert = d.join("c.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    // A FIFO would block a reader forever; a huge file would fill its memory.
    let fifo = d.join("fifo");
    let made = Command::new("mkfifo").arg("-m").arg("600").arg(&fifo).status().unwrap();
    assert!(made.success());
    let huge = d.join("huge.pem");
    std::fs::File::create(&huge).unwrap().set_len(2 << 20).unwrap();
    let (open, short, cert) = (open.to_str().unwrap(), short.to_str().unwrap(), cert.to_str().unwrap());
    let (fifo, huge) = (fifo.to_str().unwrap(), huge.to_str().unwrap());
    for (args, says) in [
        (vec!["demo", "--tls", "--psk-file", open], "--psk-file"),
        (vec!["migrate", "--to", "h:1", "--tls-cert", cert], "--tls-key"),
        (
            vec!["receive", "--listen", "127.0.0.1:0", "--tls-ca", cert],
            "--tls-cert",
        ),
        (
            vec![
                "migrate",
                "--to",
                "h:1",
                "--tls-cert",
                cert,
                "--tls-key",
                cert,
                "--tls-ca",
                cert,
                "--psk-file",
                open,
            ],
            "--psk-file",
        ),
        (
            vec!["receive", "--listen", "127.0.0.1:0", "--psk-file", open],
            "chmod 600",
        ),
        (
            vec!["receive", "--listen", "127.0.0.1:0", "--psk-file", short],
            "at least 32 hex digits",
        ),
        (
            vec!["receive", "--listen", "127.0.0.1:0", "--psk-file", "/nonexistent/k"],
            "/nonexistent/k",
        ),
        (
            vec![
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                cert,
                "--tls-ca",
                cert,
            ],
            "no PEM certificate",
        ),
        (vec!["demo", "--psk-file", open], "chmod 600"),
        (vec!["demo", "--psk-file", fifo], "not a regular file"),
        (
            vec![
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                huge,
                "--tls-key",
                cert,
                "--tls-ca",
                cert,
            ],
            "more than the 1048576 bytes",
        ),
    ] {
        let out = Command::new(BIN).args(&args).output_within(LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{args:?}"
        );
    }
}

/// `livemig migrate` with the right credentials completes; with the wrong ones (a key against
/// a TLS destination, a certificate of another CA) it rolls back, exit status 2, and the
/// source's guest runs on.
#[test]
fn migrate_over_tls_through_the_control_socket() {
    vmm::need_kvm!();
    let d = dir("migrate");
    let f = throwaway::generate(&d).unwrap();
    let other = throwaway::generate(&d.join("other")).unwrap();
    let key = key_file(&d, 0o600);
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let dest_args = [
        "--tls-cert",
        &p(&f.dest.cert),
        "--tls-key",
        &p(&f.dest.key),
        "--tls-ca",
        &p(&f.ca),
    ];
    let sock = sock("tls");
    let _src = run_vm(&sock, &[]);
    let mut ctl = Ctl::connect(&sock);
    let migrate = |to: &str, sec: &[String]| {
        Command::new(BIN)
            .args([
                "migrate",
                "--json",
                "--control",
                &sock,
                "--to",
                to,
                "--peer-timeout",
                "3",
            ])
            .args(sec)
            .output_within(LIMIT)
    };
    let (_dest, addr) = receive_with(&dest_args);
    for (sec, says) in [
        (vec!["--psk-file".to_string(), p(&key)], "requires TLS"),
        (
            vec![
                "--tls-cert".into(),
                p(&other.source.cert),
                "--tls-key".into(),
                p(&other.source.key),
                "--tls-ca".into(),
                p(&f.ca),
            ],
            "the destination does not trust this source's certificate",
        ),
    ] {
        let out = migrate(&addr, &sec);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{sec:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["error-desc"].as_str().unwrap().contains(says), "{sec:?}: {v}");
        let s0 = ctl.ret("query-status", json!({}));
        std::thread::sleep(Duration::from_millis(200));
        let s1 = ctl.ret("query-status", json!({}));
        assert_eq!(s1["status"], "running", "{sec:?}");
        assert!(
            s1["pages-written"].as_u64() > s0["pages-written"].as_u64(),
            "{sec:?}: the guest runs on"
        );
    }
    // The destination turned the strangers away and still waits: the right credentials, given
    // relative to another directory than the VM process's, complete.
    let out = Command::new(BIN)
        .current_dir(&d)
        .args(["migrate", "--json", "--control", &sock, "--to", &addr])
        .args([
            "--tls-cert",
            "source-cert.pem",
            "--tls-key",
            "source-key.pem",
            "--tls-ca",
            "livemig-ca.pem",
        ])
        .args(["--tls-hostname", "localhost"])
        .output_within(LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["livemig"]["transport"], "tls");
    assert_eq!(v["livemig"]["verified"], true);
    let _ = ctl.cmd("quit", json!({}));
}

/// A smoke of the throughput benchmarks (the documented runs are longer): every transport
/// gets its row and its ratio against plain TCP from the same run.
#[test]
fn the_transport_benchmarks_compare_against_plain_tcp() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "transport",
            "--gib",
            "0.05",
            "--runs",
            "1",
            "--channels",
            "1,2",
        ])
        .output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in ["| tcp | 1 |", "| tls | 1 |", "| psk | 1 |", "| tls | 2 |"] {
        let line = s
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row}: {s}"));
        assert!(line.contains("GiB/s") && line.contains('×'), "{line}");
    }
    vmm::need_kvm!();
    let out = Command::new(BIN)
        .args([
            "bench",
            "migration",
            "--memory-mib",
            "128",
            "--ws-mib",
            "16",
            "--rate",
            "16",
        ])
        .args(["--modes", "iommu", "--verify", "off", "--transport", "tcp,tls,psk"])
        .args(["--no-compress", "--fill", "--warmup-ms", "100", "--channels", "2"])
        .output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains("no compression; RAM past the working set filled"), "{s}");
    for t in ["tcp", "tls", "psk"] {
        let row = format!("| {t} | iommu | off | ");
        let line = s
            .lines()
            .filter(|l| l.starts_with(&row))
            .find(|l| l.contains("MiB/s"))
            .unwrap_or_else(|| panic!("{t}: {s}"));
        assert!(line.contains('×'), "{line}");
    }
}
