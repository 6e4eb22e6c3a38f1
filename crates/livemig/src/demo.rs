//! `livemig demo`: a destination process and a source VM process on loopback, a live
//! migration between them with a progress display, and its summary.

use crate::children::{connect_control, livemig, spawn_listening, vm_args, Children};
use crate::control::MigrateArgs;
use crate::security::{self, SecFlags};
use crate::vmopts::VmOpts;
use anyhow::{anyhow, Context, Result};
use migration::transport::throwaway;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// The demo's transport: plain TCP unless one of these is given.
pub struct Transport {
    /// Mutual TLS with throwaway credentials.
    pub tls: bool,
    pub psk_file: Option<PathBuf>,
}

/// A directory removed with everything in it when the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the throwaway credentials of demos that were killed before they could.
fn sweep_stale_credentials() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("livemig-demo-"))
            .and_then(|n| n.strip_suffix("-tls"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Each side's transport flags, and the directory of throwaway credentials to remove.
fn transport(t: &Transport) -> Result<(SecFlags, SecFlags, Option<TempDir>)> {
    if t.tls {
        sweep_stale_credentials();
        let dir = TempDir(std::env::temp_dir().join(format!("livemig-demo-{}-tls", std::process::id())));
        let f = throwaway::generate(&dir.0).map_err(|e| anyhow!("throwaway TLS credentials: {e}"))?;
        return Ok((
            security::throwaway_side(&f.source, &f.ca),
            security::throwaway_side(&f.dest, &f.ca),
            Some(dir),
        ));
    }
    let sec = SecFlags {
        psk_file: t.psk_file.clone(),
        ..Default::default()
    }
    .absolute()?;
    // Refused here rather than by both children.
    sec.load()?;
    Ok((sec.clone(), sec, None))
}

/// Runs the demo; its exit status is `livemig migrate`'s (0 only when the migration
/// completed, verified unless verification was turned off).
pub fn demo(vm: &VmOpts, mig: MigrateArgs, warmup_ms: u64, json: bool, how: Transport) -> Result<i32> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("the demo needs KVM: {e}"))?;
    vm.validate()?;
    vm.config()?;
    let (src_sec, dest_sec, _creds) = transport(&how)?;
    let mut kids = Children::default();

    // The destination picks a free port and says which on its first line.
    let mut dest = livemig()?;
    dest.args(["receive", "--listen", "127.0.0.1:0", "--exit-after-ms", "1000"])
        .args(["--peer-timeout", &format!("{}", mig.peer_timeout as f64 / 1000.0)])
        .args(dest_sec.cli_args());
    let (addr, dest_out) = spawn_listening(dest, &mut kids, "destination")?;
    tracing::info!(pid = kids.0[0].id(), %addr, "destination process listening");

    let sock = PathBuf::from(format!("/tmp/livemig-demo-{}.sock", std::process::id()));
    let src = livemig()?
        .arg("run")
        .args(vm_args(vm))
        .arg("--control")
        .arg(&sock)
        .stdout(if json { Stdio::null() } else { Stdio::inherit() })
        .spawn()
        .context("starting the source VM process")?;
    tracing::info!(pid = src.id(), "source VM process started");
    kids.0.push(src);
    let mut c = connect_control(&sock, &mut kids.0[1], "source VM")?;
    std::thread::sleep(Duration::from_millis(warmup_ms));
    let st = c.execute("query-status", serde_json::json!({}))?;
    tracing::info!(
        warmup_ms,
        pages_written = %st["pages-written"],
        jobs_completed = %st["jobs-completed"],
        mode = %mig.mode,
        transport = match (how.tls, &how.psk_file) {
            (true, _) => "mutual TLS with throwaway certificates",
            (_, Some(_)) => "frames authenticated by the pre-shared key",
            _ => "plain TCP",
        },
        "guest warmed up; migrating"
    );
    let mig = MigrateArgs { uri: addr, ..mig }.with_security(src_sec);
    c.execute("migrate", serde_json::to_value(&mig)?)?;
    let info = crate::summary::follow(&mut c, !json)?;
    // The source holds its paused copy after a handover until told otherwise; the demo is
    // done with it either way.
    let _ = c.execute("quit", serde_json::json!({}));
    for k in &mut kids.0 {
        let _ = k.wait();
    }
    let dest_lines = dest_out.join().unwrap_or_default();
    let code = match crate::exit_code(&info) {
        0 if info["livemig"]["verify"] != "off" && info["livemig"]["verified"] != true => 1,
        c => c,
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(code);
    }
    for l in &dest_lines {
        out!("[destination] {l}");
    }
    if code == 0 {
        out!("the VM moved to the destination; the source released its paused copy");
    }
    crate::summary::print(&info);
    Ok(code)
}
