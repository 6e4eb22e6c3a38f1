//! The control socket of `livemig run`: a unix socket carrying one JSON object per line,
//! QMP-shaped (`{"execute": "...", "arguments": {...}}` → `{"return": ...}` or
//! `{"error": {"desc": "..."}}`). Commands: `query-status`, `migrate`, `query-migrate`,
//! `migrate-cancel`, `cont`, `quit`.

use crate::security::SecFlags;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `"verify"`: a mode name, or the boolean older scripts send (`true`: the default mode,
/// gate; `false`: off).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum VerifyArg {
    Flag(bool),
    Mode(String),
}

impl VerifyArg {
    pub fn mode(&self) -> Result<migration::VerifyMode> {
        match self {
            VerifyArg::Flag(true) => Ok(migration::VerifyMode::Gate),
            VerifyArg::Flag(false) => Ok(migration::VerifyMode::Off),
            VerifyArg::Mode(m) => {
                migration::VerifyMode::parse(m).ok_or_else(|| anyhow!("unknown verify mode '{m}' (gate, audit, off)"))
            }
        }
    }
}

/// Arguments of `migrate`, with the CLI's defaults.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MigrateArgs {
    pub uri: String,
    pub mode: String,
    pub channels: u16,
    pub downtime_limit: u64,
    pub max_iterations: u32,
    pub auto_converge: bool,
    pub compress: bool,
    pub verify: VerifyArg,
    /// Wire bytes per second over all connections; 0 is unlimited (QEMU's max-bandwidth).
    pub max_bandwidth: u64,
    /// Milliseconds the source waits on a silent destination before it gives up.
    pub peer_timeout: u64,
    /// TLS credentials (all three) or a pre-shared key file, loaded when the migration
    /// starts; none of them: plain TCP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_hostname: Option<String>,
    pub psk_file: Option<PathBuf>,
}

impl Default for MigrateArgs {
    fn default() -> Self {
        Self {
            uri: String::new(),
            mode: "iommu".into(),
            channels: 0,
            downtime_limit: 300,
            max_iterations: 30,
            auto_converge: false,
            compress: true,
            verify: VerifyArg::Flag(true),
            max_bandwidth: 0,
            peer_timeout: 10_000,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_hostname: None,
            psk_file: None,
        }
    }
}

impl MigrateArgs {
    pub fn security(&self) -> SecFlags {
        SecFlags {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_hostname: self.tls_hostname.clone(),
            psk_file: self.psk_file.clone(),
        }
    }

    /// The same arguments with `sec`'s transport.
    pub fn with_security(self, sec: SecFlags) -> MigrateArgs {
        MigrateArgs {
            tls_cert: sec.tls_cert,
            tls_key: sec.tls_key,
            tls_ca: sec.tls_ca,
            tls_hostname: sec.tls_hostname,
            psk_file: sec.psk_file,
            ..self
        }
    }

    pub fn options(&self) -> Result<migration::SourceOptions> {
        let mode = migration::DeviceTracking::parse(&self.mode)
            .ok_or_else(|| anyhow!("unknown mode '{}' (iommu, device-log, none)", self.mode))?;
        if self.uri.is_empty() {
            bail!("migrate needs a destination uri (HOST:PORT)");
        }
        if self.max_iterations == 0 {
            bail!("max-iterations must be at least 1");
        }
        if self.channels > 64 {
            bail!("at most 64 page channels");
        }
        if !(100..=3_600_000).contains(&self.peer_timeout) {
            bail!("peer-timeout must be between 100 ms and one hour");
        }
        if self.max_bandwidth > 0 && self.max_bandwidth < 1 << 20 {
            bail!("max-bandwidth must be 0 (unlimited) or at least 1 MiB/s (1048576 bytes per second)");
        }
        if self.downtime_limit > 3_600_000 {
            bail!("downtime-limit must be at most one hour (in milliseconds)");
        }
        Ok(migration::SourceOptions {
            mode,
            channels: self.channels,
            downtime_limit: Duration::from_millis(self.downtime_limit),
            max_iterations: self.max_iterations,
            auto_converge: self.auto_converge,
            compress: self.compress,
            verify: self.verify.mode()?,
            max_bandwidth: (self.max_bandwidth > 0).then_some(self.max_bandwidth),
            peer_timeout: Duration::from_millis(self.peer_timeout),
            security: self.security().load()?,
            ..Default::default()
        })
    }
}

/// A client of the control socket.
pub struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to the control socket {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Runs a command; returns its `return` value or fails with its `error`.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut line = serde_json::to_string(&json!({ "execute": cmd, "arguments": args }))?;
        line.push('\n');
        self.w.write_all(line.as_bytes())?;
        let mut resp = String::new();
        if self.r.read_line(&mut resp)? == 0 {
            bail!("the control socket closed");
        }
        let v: Value = serde_json::from_str(&resp).context("malformed reply on the control socket")?;
        if let Some(e) = v.get("error") {
            bail!("{cmd}: {}", e.get("desc").and_then(Value::as_str).unwrap_or("error"));
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// Parses one request line into (command, arguments).
pub fn parse_request(line: &str) -> Result<(String, Value), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let cmd = v.get("execute").and_then(Value::as_str).ok_or("missing \"execute\"")?;
    Ok((cmd.to_string(), v.get("arguments").cloned().unwrap_or(json!({}))))
}

/// One command of the control socket, its arguments checked: everything a client sends is
/// turned into this before anything acts on it (and the fuzzer feeds this parser).
#[derive(Clone, Debug)]
pub enum Request {
    QueryStatus,
    Migrate(Box<MigrateArgs>),
    QueryMigrate,
    MigrateCancel,
    Cont {
        force: bool,
    },
    Quit {
        force: bool,
    },
    /// `--incoming` processes: drop a guest handed over, and wait for the next one.
    Release {
        force: bool,
    },
}

impl Request {
    pub fn parse(line: &str) -> Result<Request, String> {
        let (cmd, args) = parse_request(line)?;
        Ok(match cmd.as_str() {
            "query-status" => no_args(&args).map(|()| Request::QueryStatus)?,
            "query-migrate" => no_args(&args).map(|()| Request::QueryMigrate)?,
            "migrate-cancel" => no_args(&args).map(|()| Request::MigrateCancel)?,
            "migrate" => Request::Migrate(Box::new(
                serde_json::from_value(args).map_err(|e| format!("bad arguments: {e}"))?,
            )),
            "cont" => Request::Cont {
                force: flag(&args, "force")?,
            },
            "quit" => Request::Quit {
                force: flag(&args, "force")?,
            },
            "release" => Request::Release {
                force: flag(&args, "force")?,
            },
            other => {
                return Err(format!(
                "unknown command '{other}' (query-status, migrate, query-migrate, migrate-cancel, cont, quit, release)"
            ))
            }
        })
    }
}

fn no_args(args: &Value) -> Result<(), String> {
    match args.as_object() {
        Some(o) => match o.keys().next() {
            Some(k) => Err(format!("unknown argument '{k}'")),
            None => Ok(()),
        },
        None => Err("arguments must be an object".into()),
    }
}

/// A boolean argument (absent: false); anything but a boolean is refused.
fn flag(args: &Value, name: &str) -> Result<bool, String> {
    let Some(o) = args.as_object() else {
        return Err("arguments must be an object".into());
    };
    if let Some(k) = o.keys().find(|k| *k != name) {
        return Err(format!("unknown argument '{k}'"));
    }
    match o.get(name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("'{name}' must be true or false, not {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_arguments() {
        assert_eq!(
            parse_request(r#"{"execute":"query-status"}"#).unwrap().0,
            "query-status"
        );
        assert!(parse_request("{").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse_request(r#"{"arguments":{}}"#).unwrap_err(), "missing \"execute\"");
        let a: MigrateArgs = serde_json::from_value(json!({"uri": "127.0.0.1:1", "channels": 4})).unwrap();
        assert_eq!((a.channels, a.mode.as_str(), a.downtime_limit), (4, "iommu", 300));
        assert!(
            serde_json::from_value::<MigrateArgs>(json!({"uri": "x", "chanels": 4})).is_err(),
            "typos are refused"
        );
        let bad = MigrateArgs {
            uri: "h:1".into(),
            mode: "fast".into(),
            ..Default::default()
        };
        assert!(bad.options().unwrap_err().to_string().contains("unknown mode 'fast'"));
        // "verify": the booleans of older scripts, or a mode.
        for (v, want) in [
            (json!(true), "gate"),
            (json!(false), "off"),
            (json!("audit"), "audit"),
            (json!("gate"), "gate"),
        ] {
            let a: MigrateArgs = serde_json::from_value(json!({"uri": "h:1", "verify": v})).unwrap();
            assert_eq!(a.options().unwrap().verify.name(), want, "{v}");
        }
        let a: MigrateArgs = serde_json::from_value(json!({"uri": "h:1", "verify": "maybe"})).unwrap();
        assert!(a
            .options()
            .unwrap_err()
            .to_string()
            .contains("unknown verify mode 'maybe'"));
        assert!(serde_json::from_value::<MigrateArgs>(json!({"uri": "h:1", "verify": 3})).is_err());
    }

    #[test]
    fn requests_are_checked_before_anything_acts() {
        let p = |l: &str| Request::parse(l);
        assert!(matches!(p(r#"{"execute":"query-status"}"#), Ok(Request::QueryStatus)));
        assert!(matches!(
            p(r#"{"execute":"cont","arguments":{"force":true}}"#),
            Ok(Request::Cont { force: true })
        ));
        assert!(matches!(p(r#"{"execute":"quit"}"#), Ok(Request::Quit { force: false })));
        assert!(matches!(
            p(r#"{"execute":"migrate","arguments":{"uri":"h:1"}}"#),
            Ok(Request::Migrate(a)) if a.uri == "h:1"
        ));
        for (line, err) in [
            (
                r#"{"execute":"query-migrate","arguments":{"x":1}}"#,
                "unknown argument 'x'",
            ),
            (
                r#"{"execute":"migrate-cancel","arguments":[]}"#,
                "arguments must be an object",
            ),
            (
                r#"{"execute":"cont","arguments":{"force":"yes"}}"#,
                "'force' must be true or false, not \"yes\"",
            ),
            (
                r#"{"execute":"quit","arguments":{"forced":true}}"#,
                "unknown argument 'forced'",
            ),
            (r#"{"execute":"reboot"}"#, "unknown command 'reboot'"),
            (
                r#"{"execute":"migrate","arguments":{"uri":"h:1","chanels":4}}"#,
                "bad arguments",
            ),
        ] {
            let e = p(line).unwrap_err();
            assert!(e.contains(err), "{line}: {e}");
        }
    }
}
