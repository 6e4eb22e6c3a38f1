//! `livemig bench net`: the same guest migrated per device-tracking mode over loopback and
//! over links between two network namespaces shaped with `tc tbf` (`docs/network.md`), with
//! the link's raw TCP throughput measured in the same run. Optionally through the impairing
//! relay (latency, jitter) in the source's namespace.

use crate::bench::fmt_ratio;
use crate::bench_control::{PollStats, Pollers};
use crate::children::{connect_control, livemig_in, spawn_listening, vm_args, Children, Sockets};
use crate::control::MigrateArgs;
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Context, Result};
use netlab::{Shape, Side, TwoHosts};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

pub struct Args {
    pub vm: VmOpts,
    pub links: Vec<String>,
    pub modes: Vec<String>,
    pub mig: MigrateArgs,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    pub warmup_ms: u64,
    /// MiB sent to measure each link's raw TCP throughput.
    pub probe_mib: u64,
}

/// `loopback` (no namespaces), or a rate: `1gbit`, `10gbit`, `500mbit`.
pub fn parse_link(s: &str) -> Result<Option<Shape>, String> {
    if s == "loopback" {
        return Ok(None);
    }
    let (num, mult) = if let Some(n) = s.strip_suffix("gbit") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix("mbit") {
        (n, 1.0)
    } else {
        return Err(format!("'{s}': a link is loopback or a rate such as 1gbit or 500mbit"));
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * mult >= 1.0 && v * mult <= 100_000.0 => {
            Ok(Some(Shape { mbit: v * mult }))
        }
        _ => Err(format!("'{s}': the rate must be from 1mbit to 100gbit")),
    }
}

type At<'a> = Option<(&'a TwoHosts, Side)>;

fn at(h: Option<&TwoHosts>, side: Side) -> At<'_> {
    h.map(|h| (h, side))
}

fn dest_ip(h: Option<&TwoHosts>) -> &str {
    h.map_or("127.0.0.1", |h| h.addr(Side::Dest))
}

/// Raw TCP from the source's side to the destination's, in bytes/s.
fn raw_tcp(h: Option<&TwoHosts>, mib: u64) -> Result<f64> {
    let mut kids = Children::default();
    let mut l = livemig_in(at(h, Side::Dest))?;
    l.args(["net-probe", "listen", &format!("{}:0", dest_ip(h))]);
    let (addr, _) = spawn_listening(l, &mut kids, "probe listener")?;
    let out = livemig_in(at(h, Side::Source))?
        .args(["net-probe", "send", &addr, "--mib", &mib.to_string()])
        .output()
        .context("running the probe sender")?;
    if !out.status.success() {
        bail!(
            "the probe sender failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes-per-second="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("unexpected probe output: {text}"))
}

/// One migration of a fresh guest, in child processes: from the source's side to the
/// destination's (loopback without `hosts`).
pub(crate) struct Once<'a> {
    pub hosts: Option<&'a TwoHosts>,
    pub vm: &'a VmOpts,
    pub mig: &'a MigrateArgs,
    pub mode: &'a str,
    /// Through the impairing relay: one-way latency and jitter in milliseconds.
    pub relay: Option<(f64, f64)>,
    pub warmup_ms: u64,
    /// Makes the control socket's path unique within this process.
    pub n: usize,
    /// Clients polling `query-migrate` on the source's socket throughout: how many, how often.
    pub pollers: Option<(usize, Duration)>,
}

/// Runs `o`: the final `query-migrate`, and what the pollers saw.
pub(crate) fn migrate_once(o: &Once<'_>) -> Result<(Value, Option<PollStats>)> {
    let h = o.hosts;
    let sock = PathBuf::from(format!("/tmp/livemig-bench-{}-{}.sock", std::process::id(), o.n));
    // Declared before the children, so removed after them.
    let _sockets = Sockets(vec![sock.clone()]);
    let mut kids = Children::default();
    let mut d = livemig_in(at(h, Side::Dest))?;
    let listen = format!("{}:0", dest_ip(h));
    d.args(["receive", "--listen", &listen, "--exit-after-ms", "300"])
        .args(["--peer-timeout", &format!("{}", o.mig.peer_timeout as f64 / 1000.0)])
        .stderr(Stdio::null());
    let (mut uri, _) = spawn_listening(d, &mut kids, "destination")?;
    if let Some((latency, jitter)) = o.relay {
        let mut p = livemig_in(at(h, Side::Source))?;
        let (latency, jitter) = (latency.to_string(), jitter.to_string());
        p.args(["proxy", "--listen", "127.0.0.1:0", "--to", &uri])
            .args(["--latency-ms", &latency, "--jitter-ms", &jitter])
            .stderr(Stdio::null());
        uri = spawn_listening(p, &mut kids, "impairing relay")?.0;
    }
    let src = livemig_in(at(h, Side::Source))?
        .arg("run")
        .args(vm_args(o.vm))
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the source VM process")?;
    kids.0.push(src);
    let i = kids.0.len() - 1;
    let mut c = connect_control(&sock, &mut kids.0[i], "source VM")?;
    std::thread::sleep(Duration::from_millis(o.warmup_ms));
    let pollers = o
        .pollers
        .map(|(k, every)| Pollers::start(&sock, k, every))
        .transpose()?;
    let args = MigrateArgs {
        uri,
        mode: o.mode.to_string(),
        ..o.mig.clone()
    };
    c.execute("migrate", serde_json::to_value(&args)?)?;
    let info = crate::summary::follow(&mut c, false);
    let src_pid = kids.0[i].id();
    let polled = pollers.map(|p| p.stop(crate::bench_control::threads_cpu(src_pid, "ctl-client")));
    let _ = c.execute("quit", json!({}));
    // Let it go on its own (its socket removed, its VM torn down) before the next one starts.
    let t = std::time::Instant::now();
    while matches!(kids.0[i].try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((info?, polled))
}

fn u(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or(0)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    path.split('.').fold(v, |v, k| &v[k]).as_str().unwrap_or("")
}

pub fn run(a: &Args) -> Result<()> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("bench net needs KVM: {e}"))?;
    a.vm.validate()?;
    let links: Vec<(String, Option<Shape>)> = a
        .links
        .iter()
        .map(|l| parse_link(l).map(|s| (l.clone(), s)).map_err(|e| anyhow!(e)))
        .collect::<Result<_>>()?;
    if links.iter().any(|l| l.1.is_some()) {
        netlab::available().map_err(|e| anyhow!("shaped links need network namespaces (root and iproute2): {e}"))?;
    }
    let mut rows = Vec::new();
    let mut n = 0;
    for (name, shape) in &links {
        let hosts = shape.map(|s| TwoHosts::create(Some(s))).transpose()?;
        let raw = raw_tcp(hosts.as_ref(), a.probe_mib)?;
        tracing::info!("[bench net] {name}: raw TCP {:.0} MiB/s", raw / 1048576.0);
        for mode in &a.modes {
            n += 1;
            let once = Once {
                hosts: hosts.as_ref(),
                vm: &a.vm,
                mig: &a.mig,
                mode,
                relay: (a.latency_ms > 0.0 || a.jitter_ms > 0.0).then_some((a.latency_ms, a.jitter_ms)),
                warmup_ms: a.warmup_ms,
                n,
                pollers: None,
            };
            let (info, _) = migrate_once(&once).with_context(|| format!("{name}, mode {mode}"))?;
            tracing::info!(
                "[bench net] {name} {mode}: {}, {} iterations, downtime {:.1} ms, total {} ms",
                s(&info, "status"),
                u(&info, "ram.iteration-count"),
                u(&info, "downtime-us") as f64 / 1e3,
                u(&info, "total-time")
            );
            rows.push((name.clone(), raw, mode.clone(), info));
        }
    }
    println!(
        "\nOne migration per cell: {} MiB guest, dirtier at {} MiB/s, accelerator {}; compression {}; downtime limit {} ms, \
         at most {} iterations{}.\n",
        a.vm.memory_mib,
        a.vm.rate,
        if a.vm.device_count() == 0 { "off" } else { "busy" },
        if a.mig.compress { "on" } else { "off" },
        a.mig.downtime_limit,
        a.mig.max_iterations,
        if a.latency_ms > 0.0 || a.jitter_ms > 0.0 {
            format!(
                "; through the relay, {} ms ± {} ms each way",
                a.latency_ms, a.jitter_ms
            )
        } else {
            String::new()
        }
    );
    println!("| link | raw TCP | mode | status | iterations | switchover | downtime | ÷ iommu | total time | sent |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (link, raw, mode, info) in &rows {
        let base = rows
            .iter()
            .find(|r| &r.0 == link && r.2 == "iommu")
            .map(|r| u(&r.3, "downtime-us"));
        let dt = u(info, "downtime-us");
        println!(
            "| {link} | {:.0} MiB/s | {mode} | {} | {} | {} | {:.1} ms | {} | {:.2} s | {:.0} MiB |",
            raw / 1048576.0,
            s(info, "status"),
            u(info, "ram.iteration-count"),
            s(info, "livemig.switchover-reason"),
            dt as f64 / 1e3,
            match base {
                Some(b) if b > 0 && dt > 0 => fmt_ratio(dt as f64 / b as f64),
                _ => "–".into(),
            },
            u(info, "total-time") as f64 / 1e3,
            u(info, "ram.transferred") as f64 / 1048576.0,
        );
    }
    Ok(())
}

/// `livemig net-probe listen ADDR`: counts the bytes of one connection, then exits.
pub fn probe_listen(addr: &str) -> Result<()> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    out!("listening on {}", l.local_addr()?);
    let _ = std::io::stdout().flush();
    let (mut s, _) = l.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            k => n += k as u64,
        }
    }
    out!("received {n} bytes");
    Ok(())
}

/// `livemig net-probe send ADDR --mib N`: sends N MiB and prints the rate, counted until the
/// listener has read everything (it closes its end after the last byte).
pub fn probe_send(addr: &str, mib: u64) -> Result<()> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse().with_context(|| format!("'{addr}'"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let buf = vec![0x5au8; 1 << 20];
    let t = std::time::Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let _ = s.read(&mut [0u8; 1]);
    let rate = (mib << 20) as f64 / t.elapsed().as_secs_f64();
    out!("sent {mib} MiB bytes-per-second={rate:.0}");
    Ok(())
}
