//! Logging: the `tracing` events of livemig and its crates go to stderr, as text or as JSON
//! lines (`--log-format`), filtered by `RUST_LOG`. Stdout carries only a command's output
//! (the `listening on` line, summaries, tables, `--json`), so that it can be parsed.

use std::io::IsTerminal;
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

/// How log events are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line, with `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level.
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The filter when `RUST_LOG` is unset or empty: livemig's own crates at info, the
/// libraries it uses at warn.
pub const DEFAULT_FILTER: &str =
    "warn,livemig=info,migration=info,faults=info,vmm=info,accel=info,vfio=info,iommu=info,iommufd=info,netlab=info";

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the process's subscriber. Called once, after the command line is parsed.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((s, e))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
    if let Some((s, e)) = bad {
        tracing::warn!(rust_log = %s, error = %e, "RUST_LOG is not a valid filter; using the default");
    }
}

/// The arguments that give a child `livemig` this process's log format (its stderr is often
/// this process's own).
pub fn child_args() -> [&'static str; 2] {
    ["--log-format", FORMAT.get().copied().unwrap_or_default().name()]
}
