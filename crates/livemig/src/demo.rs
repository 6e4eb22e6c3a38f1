//! `livemig demo`: a destination process and a source VM process on loopback, a live
//! migration between them with a progress display, and its summary.

use crate::control::{Client, MigrateArgs};
use crate::security::{self, SecFlags};
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Context, Result};
use migration::transport::throwaway;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the children if the demo fails half-way.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn vm_args(o: &VmOpts) -> Vec<String> {
    let mut a = vec![
        "--memory-mib".into(),
        o.memory_mib.to_string(),
        "--vcpus".into(),
        o.vcpus.to_string(),
        "--rate".into(),
        o.rate.to_string(),
        "--dirty-log".into(),
        o.dirty_log.clone(),
        "--ring-entries".into(),
        o.ring_entries.to_string(),
        "--iommu-format".into(),
        o.iommu_format.name().into(),
        "--pattern".into(),
        match o.pattern {
            vmm::Pattern::Sequential => "sequential",
            vmm::Pattern::Uniform => "uniform",
            vmm::Pattern::HotCold { .. } => "hotcold",
        }
        .into(),
    ];
    if let Some(ws) = o.ws_mib {
        a.extend(["--ws-mib".into(), ws.to_string()]);
    }
    if o.no_accel {
        a.push("--no-accel".into());
    }
    if o.iommu_4k {
        a.push("--iommu-4k".into());
    }
    a
}

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
    let exe = std::env::current_exe().context("finding the livemig binary")?;
    let mut kids = Children(Vec::new());
    let say = |m: &str| {
        if !json {
            println!("{m}");
        }
    };

    // The destination picks a free port and says which on its first line.
    let mut dest = Command::new(&exe)
        .env(crate::PARENT_ENV, std::process::id().to_string())
        .args(["receive", "--listen", "127.0.0.1:0", "--exit-after-ms", "1000"])
        .args(["--peer-timeout", &format!("{}", mig.peer_timeout as f64 / 1000.0)])
        .args(dest_sec.cli_args())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the destination process")?;
    let out = dest
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the destination"))?;
    kids.0.push(dest);
    let mut lines = BufReader::new(out).lines();
    let first = lines.next().ok_or_else(|| anyhow!("the destination exited"))??;
    let addr = first
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("unexpected destination output: {first}"))?
        .to_string();
    say(&format!("destination process {} listening on {addr}", kids.0[0].id()));
    let dest_out = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let sock = PathBuf::from(format!("/tmp/livemig-demo-{}.sock", std::process::id()));
    let src = Command::new(&exe)
        .env(crate::PARENT_ENV, std::process::id().to_string())
        .arg("run")
        .args(vm_args(vm))
        .arg("--control")
        .arg(&sock)
        .stdout(if json { Stdio::null() } else { Stdio::inherit() })
        .spawn()
        .context("starting the source VM process")?;
    say(&format!("source VM process {}", src.id()));
    kids.0.push(src);
    let t = std::time::Instant::now();
    let mut c = loop {
        if let Ok(c) = Client::connect(&sock) {
            break c;
        }
        if let Some(st) = kids.0[1].try_wait()? {
            bail!("the source VM process exited ({st}) before opening its control socket");
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the source VM process did not open {} within 30 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(warmup_ms));
    let st = c.execute("query-status", serde_json::json!({}))?;
    say(&format!(
        "guest warmed up for {warmup_ms} ms: {} pages written, {} accel jobs completed; migrating (mode {}, {})",
        st["pages-written"],
        st["jobs-completed"],
        mig.mode,
        match (how.tls, &how.psk_file) {
            (true, _) => "mutual TLS with throwaway certificates",
            (_, Some(_)) => "frames authenticated by the pre-shared key",
            _ => "plain TCP",
        }
    ));
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
