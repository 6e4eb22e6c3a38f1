//! Two hosts on one machine, for migrations that cross a real network stack: two network
//! namespaces joined by a veth pair, each end shaped with `tc tbf` to a chosen rate, created
//! with iproute2 and removed when the [`TwoHosts`] is dropped, also when a test panics
//! (`docs/network.md`).
//!
//! Needs root (CAP_NET_ADMIN) and iproute2's `ip` and `tc`. Namespaces are named after the
//! creating process, so ones left behind by a process that was killed are removed by the
//! next [`TwoHosts::create`].

#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum NetlabError {
    #[error("`{cmd}` could not run: {err} (is iproute2 installed?)")]
    Spawn { cmd: String, err: std::io::Error },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("a link rate must be a positive number of Mbit/s, not {0}")]
    BadRate(f64),
}

/// The prefix of every namespace this crate makes: `lmig<pid>x<n><side>`.
const PREFIX: &str = "lmig";

/// Each end of the pair, by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Dest,
}

impl Side {
    fn letter(self) -> char {
        match self {
            Side::Source => 's',
            Side::Dest => 'd',
        }
    }
}

/// Runs `ip`/`tc` with `args`; its stdout, or why it failed.
fn run(prog: &str, args: &[&str]) -> Result<String, NetlabError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| NetlabError::Spawn { cmd: cmd.clone(), err })?;
    if !out.status.success() {
        return Err(NetlabError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process can make namespaces: `Err` says why not.
pub fn available() -> Result<(), NetlabError> {
    run("ip", &["netns", "list"])?;
    run("tc", &["-V"])?;
    // Creating one is the only real test of the privilege.
    // Unique among this process's tests, and outside `of_process`'s `lmig<pid>x` names.
    let probe = format!(
        "{PREFIX}{}p{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    run("ip", &["netns", "add", &probe])?;
    run("ip", &["netns", "del", &probe]).map(|_| ())
}

/// Skips the calling test, saying so on a line of its own, when network namespaces cannot
/// be made here; fails it instead where they must work (`LIVEMIG_REQUIRE_NETNS`, which
/// `ci.sh` sets when it runs as root).
#[macro_export]
macro_rules! need_netns {
    () => {
        if let Err(why) = $crate::available() {
            if std::env::var_os("LIVEMIG_REQUIRE_NETNS").is_some() {
                panic!("network namespaces are required here (LIVEMIG_REQUIRE_NETNS): {why}");
            }
            $crate::report_skip(&why.to_string());
            return;
        }
    };
}

/// Says, on a line of its own past the test harness's capture, that the running test
/// skipped for want of network namespaces; `ci.sh` counts these lines.
pub fn report_skip(why: &str) {
    use std::io::Write as _;
    let t = std::thread::current();
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED (needs network namespaces): {}: {why}",
        t.name().unwrap_or("a test")
    );
}

fn base36(mut v: u64) -> String {
    let mut d = Vec::new();
    loop {
        d.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    d.reverse();
    String::from_utf8(d).unwrap_or_default()
}

/// Removes namespaces of ours whose creating process is gone.
fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if pid.is_empty() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::info!(name, "removing a namespace left by process {pid}");
        let _ = run("ip", &["netns", "del", name]);
    }
}

/// A link's shaping: `tc qdisc … tbf` on both ends' egress.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub mbit: f64,
}

impl Shape {
    /// The tbf arguments: the bucket holds at least one timer tick of traffic at the rate
    /// (a kernel at HZ=250 refills every 4 ms; smaller buckets cap the rate below what was
    /// asked), and the queue holds 20 ms of it.
    fn tbf_args(self) -> Vec<String> {
        let bytes_per_s = self.mbit * 1e6 / 8.0;
        let burst = ((bytes_per_s / 250.0) as u64).max(64 << 10);
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}kbit", (self.mbit * 1000.0) as u64),
            "burst".into(),
            burst.to_string(),
            "latency".into(),
            "20ms".into(),
        ]
    }
}

/// Two namespaces, a veth pair between them, addresses and (optionally) shaping.
pub struct TwoHosts {
    names: [String; 2],
    veths: [String; 2],
    addrs: [String; 2],
    shape: Option<Shape>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TwoHosts {
    /// Makes the pair: source at 10.77.0.1, destination at 10.77.0.2 (each namespace is a
    /// separate stack, so every pair can use the same addresses).
    pub fn create(shape: Option<Shape>) -> Result<TwoHosts, NetlabError> {
        if let Some(s) = shape {
            if !(s.mbit.is_finite() && s.mbit > 0.0) {
                return Err(NetlabError::BadRate(s.mbit));
            }
        }
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = |side: Side| format!("{PREFIX}{pid}x{n}{}", side.letter());
        // Interface names are at most 15 bytes: "lm", the pid in base 36 (at most 5 digits),
        // "v", the counter in base 36 modulo 36^6 (at most 6), and the side.
        let veth = |side: Side| {
            format!(
                "lm{}v{}{}",
                base36(pid as u64),
                base36(n as u64 % 36u64.pow(6)),
                side.letter()
            )
        };
        let h = TwoHosts {
            names: [name(Side::Source), name(Side::Dest)],
            veths: [veth(Side::Source), veth(Side::Dest)],
            addrs: ["10.77.0.1".into(), "10.77.0.2".into()],
            shape,
        };
        // From here on, Drop removes whatever was made.
        for ns in &h.names {
            run("ip", &["netns", "add", ns])?;
        }
        h.add_link()?;
        for ns in &h.names {
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    /// The veth pair, its addresses and its shaping (again after a [`cut`](Self::cut)).
    pub fn add_link(&self) -> Result<(), NetlabError> {
        let [s, d] = &self.veths;
        // Made inside the namespaces, so no end is ever left in the host's own namespace.
        run(
            "ip",
            &[
                "-n",
                &self.names[0],
                "link",
                "add",
                s,
                "type",
                "veth",
                "peer",
                "name",
                d,
                "netns",
                &self.names[1],
            ],
        )?;
        for i in 0..2 {
            let (ns, dev) = (&self.names[i], &self.veths[i]);
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{}/24", self.addrs[i]), "dev", dev],
            )?;
            if let Some(shape) = self.shape {
                let mut a: Vec<String> = ["-n", ns, "qdisc", "replace", "dev", dev, "root"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                a.extend(shape.tbf_args());
                run("tc", &a.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    pub fn addr(&self, side: Side) -> &str {
        &self.addrs[side as usize]
    }

    pub fn namespace(&self, side: Side) -> &str {
        &self.names[side as usize]
    }

    /// `program` to run inside `side`'s namespace (`ip netns exec`, which execs it: the
    /// child is the program itself).
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(side)]).arg(program);
        c
    }

    /// Takes the link down (both ends) or up again: packets are dropped meanwhile, sockets
    /// stay open.
    pub fn set_link(&self, up: bool) -> Result<(), NetlabError> {
        for i in 0..2 {
            let state = if up { "up" } else { "down" };
            run("ip", &["-n", &self.names[i], "link", "set", &self.veths[i], state])?;
        }
        Ok(())
    }

    /// Removes the veth pair: the cable pulled out. [`add_link`](Self::add_link) plugs it
    /// back.
    pub fn cut(&self) -> Result<(), NetlabError> {
        run("ip", &["-n", &self.names[0], "link", "del", &self.veths[0]]).map(|_| ())
    }

    /// The qdisc on `side`'s end, as `tc` shows it.
    pub fn qdisc(&self, side: Side) -> Result<String, NetlabError> {
        let i = side as usize;
        run("tc", &["-n", &self.names[i], "qdisc", "show", "dev", &self.veths[i]])
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the pair, and with it the other end.
        for ns in &self.names {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                tracing::warn!("removing namespace {ns}: {e}");
            }
        }
    }
}

/// The namespaces process `pid` made that exist now (for tests that check the cleanup).
pub fn of_process(pid: u32) -> Vec<String> {
    let mine = format!("{PREFIX}{pid}x");
    list().into_iter().filter(|n| n.starts_with(&mine)).collect()
}

/// Every network namespace's name.
pub fn list() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_in_fifteen_bytes() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // The largest pid Linux allows, and the largest counter.
        let longest = format!("lm{}v{}s", base36(4_194_304), base36(u32::MAX as u64 % 36u64.pow(6)));
        assert!(longest.len() <= 15, "{longest}");
    }

    #[test]
    fn a_bucket_holds_a_tick_of_traffic() {
        let a = Shape { mbit: 1000.0 }.tbf_args();
        assert_eq!(a, ["tbf", "rate", "1000000kbit", "burst", "500000", "latency", "20ms"]);
        let a = Shape { mbit: 10.0 }.tbf_args();
        assert_eq!(a[4], (64u64 << 10).to_string(), "never below 64 KiB");
    }
}
