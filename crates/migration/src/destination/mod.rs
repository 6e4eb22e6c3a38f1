//! The destination: builds a VM of the announced shape, receives pages into its memory
//! (checked against the memory map before any write), feeds device data to RESUMING streams,
//! and once the stream is complete validates the device state, loads the vCPUs and tells the
//! source it is ready. It resumes the guest only on the source's `Commit`
//! (`docs/protocol.md`, "Switchover"); without it, it discards the VM.

mod accept;
mod build;
mod finish;
mod stream;

use crate::error::{MigError, WireError};
use crate::frame::{FrameWriter, Kind};
use crate::msg::{self, Hello, Report, Role, CAP_LZ4, CAP_PSK, CAP_VERIFY, VERSION};
use crate::session;
use crate::transport::psk::Dir;
use crate::transport::Conn;
use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::time::Duration;
use vmm::Vm;

/// How the destination behaves.
#[derive(Clone, Debug)]
pub struct DestOptions {
    /// This host's device identity, when it differs from the source's (`dev_id`): the
    /// devices' own compatibility check then refuses the migration during pre-copy.
    pub dev_id: Option<u32>,
    /// With verification, how long the guest runs before its progress is checked.
    pub progress_check: Duration,
    /// The longest the destination waits on the source: for the next bytes of a
    /// connection, for the page connections, and for the commit.
    pub peer_timeout: Duration,
    /// Plain TCP, TLS or a pre-shared key; the source must use the same.
    pub security: crate::transport::Security,
    /// Test-only: resume as soon as ready, without waiting for the source's commit (the
    /// protocol's one safety rule broken on purpose, so the fault matrix can show it sees
    /// the split brain that follows).
    #[doc(hidden)]
    pub sabotage_resume_before_commit: bool,
    /// Called with the VM the moment the guest runs here, before the source is told: a
    /// process that reports its own state (`livemig run --incoming`) then never says "no
    /// guest here" about a guest the source believes is here. `receive` still has checks to
    /// run after it (progress, audit) before it returns.
    pub on_running: Option<OnRunning>,
}

/// What [`OnRunning`] calls.
pub type RunningHook = dyn Fn(&Arc<Vm>) + Send + Sync;

/// See [`DestOptions::on_running`].
#[derive(Clone)]
pub struct OnRunning(pub Arc<RunningHook>);

impl std::fmt::Debug for OnRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRunning(..)")
    }
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            dev_id: None,
            progress_check: Duration::from_millis(300),
            peer_timeout: Duration::from_secs(10),
            security: crate::transport::Security::Plain,
            sabotage_resume_before_commit: false,
            on_running: None,
        }
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default)]
pub struct DestReport {
    pub iterations: u32,
    pub pages_received: u64,
    pub device_bytes: u64,
    /// From the source's `Switchover` frame to the vCPUs running, on this host's clock.
    pub resume_time: Duration,
    /// What this side sent in its `Report`.
    pub report: Option<Report>,
    /// With audit: why the comparison could not be made (the connection was lost after the
    /// guest resumed). The guest runs on, unverified.
    pub unverified: Option<String>,
}

/// A migrated, running VM.
pub struct Incoming {
    pub vm: Arc<Vm>,
    pub report: DestReport,
}

/// The control connection's writer (the destination's side of the return path).
pub(crate) struct Ctl {
    pub w: FrameWriter<Conn>,
}

impl Ctl {
    pub fn send(&mut self, k: Kind, p: &[u8]) -> Result<(), MigError> {
        self.w.send(k, p).map_err(|e| MigError::Wire(e.into()))
    }
}

pub(crate) fn unexpected(k: Kind, expected: &'static str) -> MigError {
    MigError::Wire(WireError::Unexpected { found: k, expected })
}

pub(crate) fn io(e: std::io::Error) -> MigError {
    MigError::Wire(e.into())
}

/// Waits for one incoming migration on `listener` and runs it to the end, reporting its
/// progress as `tracing` events. `Ok`: the guest runs here. `Err`: it never ran here, or it
/// failed verification and was stopped; either way this side's VM is gone.
pub fn receive(listener: &TcpListener, opts: &DestOptions) -> Result<Incoming, MigError> {
    let opened = accept::wait_for_source(listener, opts)?;
    let control = opened.control.try_clone().map_err(io)?;
    tracing::info!(peer = %opened.peer, "incoming migration");
    let mut ctl = Ctl {
        w: FrameWriter::new(control.try_clone().map_err(io)?),
    };
    let res = run(listener, &control, &mut ctl, opened, opts).map_err(|e| match (control.transport_error(), e) {
        // A record that failed its authentication ends the session; say so rather than
        // "connection closed".
        (Some(why), MigError::Wire(w)) => {
            MigError::Transport(format!("the TLS session with the source failed: {why} ({w})"))
        }
        (_, e) => e,
    });
    if let Err(e) = &res {
        // Best effort: the source learns why, then both ends close. After a commit this
        // frame means "discarded".
        let _ = ctl.send(Kind::Error, &msg::encode_str(&e.chain()));
        let _ = control.shutdown(Shutdown::Both);
    }
    res
}

fn run(
    listener: &TcpListener,
    control: &Conn,
    ctl: &mut Ctl,
    opened: accept::Opened,
    opts: &DestOptions,
) -> Result<Incoming, MigError> {
    let (mut r, hello) = (opened.reader, opened.hello);
    let nonce = session::nonce();
    let psk = opts.security.psk();
    let mine = Hello {
        version: VERSION,
        role: Role::Control,
        nonce,
        caps: CAP_LZ4 | CAP_VERIFY | if psk.is_some() { CAP_PSK } else { 0 },
    }
    .encode();
    ctl.send(Kind::Hello, &mine)?;
    let key = session::key(hello.nonce, nonce);
    r.set_key(key);
    ctl.w.set_key(key);
    let keys = psk.map(|p| p.session(&opened.hello_bytes, &mine));
    r.set_mac(keys.as_ref().map(|k| k.key(Dir::ToDest, 0)));
    ctl.w.set_mac(keys.as_ref().map(|k| k.key(Dir::ToSource, 0)));
    if control.authenticated() {
        r.trust_transport();
        ctl.w.trust_transport();
    }
    let f = r.expect()?;
    if f.kind != Kind::Config {
        return Err(unexpected(f.kind, "Config"));
    }
    let cfg = msg::VmConfigMsg::decode(&f.payload)?;
    build::check_config(&cfg)?;
    let vm = Arc::new(build::build_vm(&cfg, opts)?);
    tracing::info!(
        mem_mib = cfg.mem_mib,
        vcpus = cfg.vcpus,
        devices = vm.devices().len(),
        channels = cfg.channels,
        verify = %cfg.verify,
        transport = opts.security.name(),
        "built the VM; receiving"
    );
    let received = stream::receive_stream(
        listener,
        control,
        ctl,
        &mut r,
        &cfg,
        &vm,
        stream::Session {
            nonce: hello.nonce,
            key,
            keys: keys.as_ref(),
        },
        opts,
    )?;
    let talk = finish::Talk {
        ctl,
        r: &mut r,
        cfg: &cfg,
        opts,
    };
    finish::finish(control, talk, vm, received)
}
