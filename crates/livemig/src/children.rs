//! The child processes of `demo` and `soak`: started so that they die with their parent,
//! killed if the parent fails half-way, and the two handshakes with them (the address a
//! listening child prints first, and its control socket appearing).

use crate::control::Client;
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Kills the children that are still running when dropped.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

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

/// `livemig` itself, for a child that dies with this process (`crate::PARENT_ENV`) and logs
/// in its format.
pub fn livemig() -> Result<Command> {
    livemig_in(None)
}

/// The same, inside one side's network namespace when `at` names one (`ip netns exec` execs
/// livemig, so the child is still this process's child).
pub fn livemig_in(at: Option<(&netlab::TwoHosts, netlab::Side)>) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the livemig binary")?;
    let mut c = match at {
        Some((h, side)) => h.command(side, exe),
        None => Command::new(exe),
    };
    c.env(crate::PARENT_ENV, std::process::id().to_string())
        .args(crate::logging::child_args());
    Ok(c)
}

/// The command-line form of `o`, for `livemig run`.
pub fn vm_args(o: &VmOpts) -> Vec<String> {
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
    } else {
        a.extend(["--devices".into(), o.devices.to_string()]);
    }
    if o.shared_domain {
        a.push("--shared-domain".into());
    }
    a.extend(["--content".into(), o.content.to_string()]);
    a.extend(["--dma-rate".into(), o.dma_rate.to_string()]);
    a.extend(["--dma-mib".into(), o.dma_mib.to_string()]);
    if o.fill_ram {
        a.push("--fill-ram".into());
    }
    if o.iommu_4k {
        a.push("--iommu-4k".into());
    }
    a.extend(["--viommu".into(), o.viommu.name().into()]);
    a
}

/// Starts `cmd`, a child whose first line on stdout is `listening on ADDR`. Returns ADDR and
/// a thread collecting the rest of its output (which ends when the child does).
pub fn spawn_listening(mut cmd: Command, kids: &mut Children, what: &str) -> Result<(String, JoinHandle<Vec<String>>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {what} process"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the {what}"))?;
    kids.0.push(child);
    let mut lines = BufReader::new(out).lines();
    let first = lines
        .next()
        .ok_or_else(|| anyhow!("the {what} process exited before listening"))??;
    let addr = first
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("unexpected output from the {what}: {first}"))?
        .to_string();
    Ok((addr, std::thread::spawn(move || lines.map_while(Result::ok).collect())))
}

/// Connects to the control socket of child `kid` once it opens, within 30 s.
pub fn connect_control(sock: &Path, kid: &mut Child, what: &str) -> Result<Client> {
    let t = Instant::now();
    loop {
        if let Ok(c) = Client::connect(sock) {
            return Ok(c);
        }
        if let Some(st) = kid.try_wait()? {
            bail!("the {what} process exited ({st}) before opening its control socket");
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the {what} process did not open {} within 30 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Control socket paths of children, removed (with their lock files) after the children
/// are gone, however they ended.
pub struct Sockets(pub Vec<PathBuf>);

impl Drop for Sockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let mut lock = p.clone().into_os_string();
            lock.push(".lock");
            let _ = std::fs::remove_file(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        vm: VmOpts,
    }

    /// A child started with `vm_args(o)` builds the same VM as `o`: every option is passed on.
    #[test]
    fn vm_args_forward_every_option() {
        let o = Wrap::parse_from([
            "x",
            "--memory-mib",
            "2048",
            "--vcpus",
            "3",
            "--rate",
            "12.5",
            "--ws-mib",
            "100",
            "--pattern",
            "hotcold",
            "--dirty-log",
            "bitmap",
            "--ring-entries",
            "4096",
            "--devices",
            "2",
            "--shared-domain",
            "--content",
            "mixed:30",
            "--dma-rate",
            "7",
            "--dma-mib",
            "9",
            "--fill-ram",
            "--iommu-format",
            "amd-v1",
            "--iommu-4k",
            "--viommu",
            "shadow",
        ])
        .vm;
        let back = Wrap::parse_from(std::iter::once("x".to_string()).chain(vm_args(&o))).vm;
        assert_eq!(format!("{o:?}"), format!("{back:?}"));
        let none = Wrap::parse_from(["x", "--no-accel"]).vm;
        let back = Wrap::parse_from(std::iter::once("x".to_string()).chain(vm_args(&none))).vm;
        assert_eq!(back.device_count(), 0);
    }
}
