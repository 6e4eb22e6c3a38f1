//! The `livemig` command as a user runs it: real processes, a real unix control socket, real
//! TCP on 127.0.0.1, and a destination killed with SIGKILL mid-migration.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn help_documents_every_command_and_option() {
    let out = Command::new(BIN).arg("--help").output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    for c in ["demo", "run", "migrate", "receive", "bench"] {
        assert!(s.contains(c), "--help lists {c}");
    }
    let out = Command::new(BIN).args(["demo", "--help"]).output_within(LIMIT);
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
    let out = Command::new(BIN).args(["demo", "--mode", "fast"]).output_within(LIMIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'fast'"));
    let out = Command::new(BIN)
        .args(["migrate", "--control", "/nonexistent/x.sock", "--to", "127.0.0.1:1"])
        .output_within(LIMIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to the control socket /nonexistent/x.sock"));
    // Numbers: overflow, limits that match the VM's, and NaN are refused up front.
    for (args, says) in [
        (vec!["run", "--memory-mib", "17592186044544"], "--memory-mib"),
        (vec!["run", "--memory-mib", "8194"], "--memory-mib"),
        (vec!["run", "--memory-mib", "1025"], "--memory-mib must be even"),
        (
            vec!["run", "--dma-rate", "8", "--dma-mib", "4000"],
            "--dma-mib 4000 does not fit",
        ),
        (vec!["run", "--vcpus", "64"], "--vcpus"),
        (vec!["run", "--vcpus", "0"], "--vcpus"),
        (vec!["run", "--rate", "nan"], "--rate"),
        (vec!["run", "--rate", "inf"], "--rate"),
        (vec!["demo", "--max-bandwidth-mib", "nan"], "--max-bandwidth-mib"),
        (vec!["demo", "--max-bandwidth-mib=-1"], "--max-bandwidth-mib"),
        (vec!["demo", "--peer-timeout", "0"], "--peer-timeout"),
        (vec!["demo", "--channels", "65"], "--channels"),
        (vec!["demo", "--devices", "4"], "--devices"),
        (vec!["demo", "--devices", "2", "--no-accel"], "--no-accel"),
        (vec!["demo", "--content", "mixed:101"], "--content"),
        (vec!["demo", "--content", "zeros"], "--content"),
        (vec!["demo", "--verify", "sometimes"], "--verify"),
        (vec!["demo", "--verify", "gate", "--no-verify"], "--no-verify"),
        (vec!["demo", "--viommu", "sometimes"], "--viommu"),
        (
            vec!["demo", "--viommu", "nested", "--devices", "2"],
            "--viommu is modelled for one accelerator",
        ),
        (
            vec!["demo", "--viommu", "shadow", "--dma-rate", "8"],
            "--dma-rate runs the accel-client",
        ),
        (
            vec!["migrate", "--to", "h:1", "--max-iterations", "0"],
            "--max-iterations",
        ),
        (
            vec!["receive", "--listen", "127.0.0.1:0", "--peer-timeout", "nan"],
            "--peer-timeout",
        ),
    ] {
        let out = Command::new(BIN).args(&args).output_within(LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} is a usage error: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `demo --json` on a small guest with `extra` options: the summary, after checking that the
/// migration completed and was verified.
fn verified_demo(extra: &[&str]) -> Value {
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
        ])
        .args(["--warmup-ms", "300"])
        .args(extra)
        .output_within(LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["livemig"]["verified"], true, "{}", v["livemig"]["verify-detail"]);
    v
}

#[test]
fn demo_json_reports_a_verified_migration() {
    vmm::need_kvm!();
    let v = verified_demo(&[]);
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
    assert_eq!(v["livemig"]["devices"], 1);
}

/// `--viommu`: each design migrates verified, the guest remapping throughout, and the
/// guest's vIOMMU client runs on at the destination without an error.
#[test]
fn demo_with_each_viommu_is_verified() {
    vmm::need_kvm!();
    for design in ["nested", "shadow"] {
        let v = verified_demo(&["--viommu", design, "--vcpus", "2"]);
        assert!(v["livemig"]["device-dirty-pages"].as_u64().unwrap() > 0, "{design}");
        assert!(v["livemig"]["dest-jobs-after"].as_u64() > v["livemig"]["dest-jobs-before"].as_u64());
    }
}

/// `bench viommu`, one short run: the table has the three designs and every column.
#[test]
fn bench_viommu_prints_its_table() {
    vmm::need_kvm!();
    let out = Command::new(BIN)
        .args([
            "bench",
            "viommu",
            "--runs",
            "1",
            "--memory-mib",
            "64",
            "--warmup-ms",
            "200",
        ])
        .output_within(LIMIT);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in ["| off |", "| nested |", "| shadow |"] {
        assert!(s.contains(row), "{row} in\n{s}");
    }
    assert!(s.contains("IOTLB misses") && s.contains("÷ memcpy"), "{s}");
}

#[test]
fn demo_with_two_devices_and_random_content_is_verified() {
    vmm::need_kvm!();
    let v = verified_demo(&[
        "--devices",
        "2",
        "--vcpus",
        "2",
        "--shared-domain",
        "--content",
        "random",
    ]);
    assert_eq!(v["livemig"]["devices"], 2);
    // 128 MiB of random pages do not compress: at least that much crossed the wire.
    let sent = v["ram"]["transferred"].as_u64().unwrap();
    assert!(
        sent >= 128 << 20,
        "{sent} bytes on the wire for 128 MiB of random pages"
    );
}

/// The DMA writer knob: two devices, each copying into its half of a 16 MiB set at 32 MiB/s,
/// beside the dirtier. The migration is verified, the IOMMU saw the device's pages, and the
/// rate the guest achieved is reported (a loaded machine may fall short of the rate asked,
/// never by half).
#[test]
fn demo_with_a_dma_writer_reports_the_rate_it_achieved() {
    vmm::need_kvm!();
    let v = verified_demo(&["--devices", "2", "--vcpus", "2", "--dma-rate", "64", "--dma-mib", "16"]);
    let achieved = v["livemig"]["guest-dma-write-mib-s"].as_f64().unwrap();
    assert!((32.0..=70.0).contains(&achieved), "asked 64 MiB/s, achieved {achieved}");
    assert!(v["livemig"]["device-dirty-pages"].as_u64().unwrap() >= 16 << 8);
    let cpu = v["livemig"]["guest-cpu-write-mib-s"].as_f64().unwrap();
    assert!(
        (32.0..=70.0).contains(&cpu),
        "asked 64 MiB/s of the dirtier, achieved {cpu}"
    );
}

#[test]
fn a_dma_rate_without_a_device_is_refused() {
    let out = Command::new(BIN)
        .args(["demo", "--devices", "0", "--dma-rate", "10"])
        .output_within(LIMIT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dma-rate needs an accelerator"), "{err}");
}

#[test]
fn killed_destination_leaves_the_source_running_then_a_second_migration_succeeds() {
    vmm::need_kvm!();
    let sock = format!("/tmp/livemig-cli-test-{}.sock", std::process::id());
    let mut src = Kid(Command::new(BIN)
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
    assert_eq!(i["livemig"]["outcome"], "completed", "{i}");

    // Handed over: the source holds the paused guest (QEMU's postmigrate) until released.
    let st = ctl.ret("query-status", json!({}));
    assert_eq!(st["status"], "postmigrate", "{st}");
    assert_eq!(st["running"], false);
    assert_eq!(st["destination"], "running");
    let r = ctl.cmd("cont", json!({}));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("run it twice"),
        "cont without force is refused while the destination runs the guest: {r}"
    );
    let r = ctl.cmd("migrate", json!({ "uri": "127.0.0.1:1" }));
    assert!(r["error"]["desc"].as_str().unwrap().contains("postmigrate"), "{r}");
    let r = ctl.cmd("migrate-cancel", json!({}));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("no migration is running"),
        "{r}"
    );
    assert_eq!(ctl.ret("quit", json!({})), json!({}));
    assert!(
        src.wait_for(Duration::from_secs(10)).is_some(),
        "quit releases the guest and exits"
    );
    assert!(!std::path::Path::new(&sock).exists(), "its socket is removed");
}

/// A tiny sweep, really run: two modes at two DMA rates and two connection counts on a small
/// guest. The CSV has the documented columns and one row per migration, the JSON parses, and
/// every chart exists as PNG and SVG.
#[test]
fn a_tiny_sweep_writes_its_csv_json_and_charts() {
    vmm::need_kvm!();
    let dir = std::env::temp_dir().join(format!("livemig-sweep-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(BIN)
        .args(["bench", "sweep", "--out"])
        .arg(&dir)
        .args(["--modes", "iommu,none", "--dma-rates", "32,0", "--cpu-rates", "16"])
        .args([
            "--sizes",
            "128",
            "--contents",
            "random",
            "--channels",
            "1,2",
            "--runs",
            "1",
        ])
        .args(["--ws-mib", "32", "--dma-mib", "8", "--warmup-ms", "100"])
        .output_within(LIMIT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[5/5]"), "progress for every migration: {err}");
    let csv = std::fs::read_to_string(dir.join("sweep.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "mode,dma_mib_s,cpu_mib_s,mem_mib,content,channels,run,downtime_ms,total_ms,wire_mib,\
         precopy_throughput_mib_s,raw_tcp_mib_s,fresh_ram_tcp_mib_s,iterations,switchover,device_dirty_pages,dma_achieved_mib_s,\
         cpu_achieved_mib_s,final_pages,verified,blackout_ms"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // iommu and none at 32 and 0 MiB/s, and iommu with 2 connections.
    assert_eq!(rows.len(), 5, "{csv}");
    for r in &rows {
        assert_eq!(r.len(), 21, "{r:?}");
        assert_eq!(r[19], "yes", "every migration verified: {r:?}");
        for (i, what) in [(7, "downtime"), (11, "raw TCP"), (12, "fresh-RAM TCP")] {
            assert!(r[i].parse::<f64>().unwrap() > 0.0, "{what}: {r:?}");
        }
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(v["migrations"].as_array().unwrap().len(), 5);
    for chart in [
        "downtime_vs_dma",
        "total_vs_dma",
        "wire_vs_dma",
        "downtime_vs_size",
        "throughput_vs_channels",
    ] {
        let png = std::fs::read(dir.join(format!("{chart}.png"))).unwrap();
        assert_eq!(&png[..4], b"\x89PNG", "{chart}");
        let svg = std::fs::read_to_string(dir.join(format!("{chart}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
    }
    assert!(std::fs::read_to_string(dir.join("summary.md"))
        .unwrap()
        .contains("÷ raw TCP"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bound on the processes these tests run: one that does not exit in time is killed and
/// the test fails saying so, rather than hanging CI.
#[test]
#[should_panic(expected = "did not exit within")]
fn a_child_that_outlives_its_bound_fails_the_test() {
    Command::new("sleep")
        .arg("30")
        .output_within(Duration::from_millis(300));
}
