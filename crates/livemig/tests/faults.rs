//! The switchover fault matrix in CI: every (step, action, direction) cell once (220), through
//! `livemig faults`, and the same checks shown to fail against a destination that breaks the
//! protocol on purpose.

mod common;
use common::{OutputWithin, BIN};
use std::process::Command;
use std::time::Duration;

#[test]
fn every_cell_keeps_every_promise() {
    vmm::need_kvm!();
    let out = Command::new(BIN)
        .args(["faults", "--trials", "1"])
        .output_within(Duration::from_secs(1200));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    for l in stderr.lines().filter(|l| l.contains("FAILED")) {
        println!("{l}");
    }
    assert!(out.status.success(), "a case broke a promise (see above)");
    assert!(
        stdout.contains("220 cases:") && stdout.contains("0 split brain(s); 0 case(s) broke a promise"),
        "{stdout}"
    );
    // One progress event per case, logged as "[n/220] step action dir: ...".
    assert_eq!(
        stderr.lines().filter(|l| l.contains("/220] ")).count(),
        220,
        "one line per case"
    );
}

/// A destination that resumes without the source's commit (the old protocol) must be caught.
#[test]
fn a_destination_that_does_not_wait_for_the_commit_is_caught() {
    vmm::need_kvm!();
    let out = Command::new(BIN)
        .args([
            "faults",
            "--steps",
            "after-vcpu,after-ready",
            "--actions",
            "drop,cut",
            "--dirs",
            "to-source",
            "--sabotage-resume-before-commit",
        ])
        .output_within(Duration::from_secs(1200));
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.lines().filter(|l| l.contains("split brain")).count() >= 3,
        "the split brains are reported"
    );
}
