//! `livemig run`: a VM with its guest programs running, controlled through a unix socket.
//!
//! After a migration hands the guest over, this process keeps the paused guest, resumable,
//! in QEMU's `postmigrate`, until `quit` (or `--release-after`, for a confirmed handover):
//! a destination that dies at any point loses nothing, and `cont` runs the guest here again
//! (`docs/protocol.md`, "Who decides").
//!
//! With `--incoming` the process starts empty and takes its VM from a migration, as QEMU's
//! `-incoming` does. It can then send the guest on, and once a handover is confirmed,
//! `release` drops the held copy and the process waits on the same address for the next
//! guest: this is how `livemig soak` ping-pongs one VM between two long-lived processes
//! (`docs/soak.md`).

use crate::control::{MigrateArgs, Request};
use crate::ctlsock::ControlSocket;
use crate::vmopts::VmOpts;
use anyhow::Result;
use migration::{DestOptions, DestState, MigrationControl, Outcome};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::Vm;

/// Where the guest is, as this process sees it.
#[derive(Clone, Debug)]
enum Where {
    /// No guest here: waiting for one to migrate in (`--incoming`; QEMU's `inmigrate`).
    Waiting,
    /// A guest that migrated in runs here, and the destination's checks after the resume
    /// (its progress, an audit) are still going; it cannot be sent on yet.
    Arriving,
    /// It runs here (never migrated, or rolled back, or resumed with `cont`).
    Here,
    Migrating,
    /// Handed over or held after a failure past the commit: paused here, resumable.
    Held {
        outcome: Outcome,
        dest: DestState,
        reason: String,
        since: Instant,
    },
}

/// `--incoming`: where guests arrive, and how they are received.
pub struct Incoming {
    pub listen: String,
    pub opts: DestOptions,
    /// Test-only: leak something on every guest received, so the soak can show that its
    /// bounds catch a leak.
    pub sabotage_leak: Option<Leak>,
}

/// What `--sabotage-leak` leaks on every guest received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Leak {
    /// An open descriptor.
    Fd,
    /// A thread that never ends.
    Thread,
    /// 40 MiB of written heap.
    Memory,
}

impl Leak {
    fn leak(self) {
        match self {
            Leak::Fd => {
                if let Ok(f) = std::fs::File::open("/dev/null") {
                    std::mem::forget(f);
                }
            }
            Leak::Thread => {
                let _ = std::thread::Builder::new().name("leaked".into()).spawn(|| loop {
                    std::thread::park();
                });
            }
            Leak::Memory => {
                // black_box: an allocation nobody reads may be optimized away.
                std::hint::black_box(Vec::leak(vec![0x5au8; 40 << 20]));
            }
        }
    }
}

struct Server {
    /// The guest's VM while this process has one (running, migrating or held).
    vm: Mutex<Option<Arc<Vm>>>,
    /// `--incoming`: the listener that stays bound for the process's life, so every guest
    /// comes back to the same address.
    incoming: Option<(Arc<TcpListener>, DestOptions)>,
    sabotage_leak: Option<Leak>,
    /// Guests received so far.
    received: std::sync::atomic::AtomicU64,
    mig: Arc<MigrationControl>,
    at: Mutex<Where>,
    quit: AtomicBool,
    /// `quit` was accepted and waits for a migration's rollback: nothing new may start.
    quitting: AtomicBool,
    /// An `incoming` thread is receiving (changed only under the `at` lock).
    receiving: AtomicBool,
    /// The migration thread, while one runs.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Server {
    fn at(&self) -> std::sync::MutexGuard<'_, Where> {
        self.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm(&self) -> Result<Arc<Vm>, String> {
        self.vm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| "no guest here: this process is waiting for an incoming migration".to_string())
    }
}

pub fn run(opts: &VmOpts, control: &Path, release_after: Option<Duration>, incoming: Option<Incoming>) -> Result<()> {
    raise_fd_limit();
    // Claim the socket before building the VM: a refused path costs nothing.
    let sock = ControlSocket::bind(control)?;
    let (vm, at, incoming) = match incoming {
        None => {
            let vm = Arc::new(opts.build()?);
            vm.resume()?;
            tracing::info!(
                memory_mib = opts.memory_mib,
                vcpus = opts.vcpus,
                rate_mib_s = opts.rate,
                devices = opts.device_count(),
                control = %control.display(),
                "VM running"
            );
            (Some(vm), Where::Here, None)
        }
        Some(inc) => {
            let l = TcpListener::bind(&inc.listen).map_err(|e| anyhow::anyhow!("listening on {}: {e}", inc.listen))?;
            // The first line tells a parent process which port was chosen.
            out!("listening on {}", l.local_addr()?);
            tracing::info!(control = %control.display(), "waiting for an incoming guest");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            (None, Where::Waiting, Some((Arc::new(l), inc.opts, inc.sabotage_leak)))
        }
    };
    let srv = Arc::new(Server {
        vm: Mutex::new(vm),
        sabotage_leak: incoming.as_ref().and_then(|i| i.2),
        incoming: incoming.map(|i| (i.0, i.1)),
        received: Default::default(),
        mig: Arc::new(MigrationControl::default()),
        at: Mutex::new(at),
        quit: AtomicBool::new(false),
        quitting: AtomicBool::new(false),
        receiving: AtomicBool::new(false),
        thread: Mutex::new(None),
    });
    if srv.incoming.is_some() {
        wait_for_guest(&srv);
    }
    if let Some(after) = release_after {
        let s = srv.clone();
        std::thread::spawn(move || release_when_confirmed(&s, after));
    }
    let s2 = srv.clone();
    sock.serve(
        &srv.quit,
        Arc::new(move |line: &str| {
            let reply = match Request::parse(line).and_then(|r| handle(&s2, r)) {
                Ok(v) => json!({ "return": v }),
                Err(e) => json!({ "error": { "class": "GenericError", "desc": e } }),
            };
            reply.to_string()
        }),
    );
    // Let the last reply reach its client.
    std::thread::sleep(Duration::from_millis(50));
    let held = matches!(&*srv.at(), Where::Held { .. });
    // The guest's VM goes before the process does (its vCPU threads are joined).
    srv.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
    if held {
        tracing::info!("quit: the paused guest held after the migration is released");
    } else {
        tracing::info!("quit");
    }
    Ok(())
}

/// A process serving many control connections needs more descriptors than the usual soft
/// limit of 1024; take what the hard limit allows.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// `--release-after`: exit that long after a handover the destination confirmed.
fn release_when_confirmed(srv: &Arc<Server>, after: Duration) {
    while !srv.quit.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
        let due = match &*srv.at() {
            Where::Held {
                outcome: Outcome::Completed,
                since,
                ..
            } => since.elapsed() >= after,
            _ => false,
        };
        if due {
            tracing::info!("--release-after: the destination confirmed the handover; releasing the guest held here");
            if srv.incoming.is_some() {
                let _ = release(srv, false);
            } else {
                srv.quit.store(true, Ordering::Release);
            }
        }
    }
}

fn handle(srv: &Arc<Server>, r: Request) -> Result<Value, String> {
    match r {
        Request::QueryStatus => Ok(status(srv)),
        Request::Migrate(a) => migrate(srv, *a),
        Request::QueryMigrate => serde_json::to_value(srv.mig.snapshot()).map_err(|e| e.to_string()),
        Request::MigrateCancel => srv.mig.cancel().map(|()| json!({})).map_err(|e| e.to_string()),
        Request::Cont { force } => cont(srv, force),
        Request::Quit { force } => quit(srv, force),
        Request::Release { force } => release(srv, force),
    }
}

/// QEMU's run states: `running`, `finish-migrate` while the switchover has the guest paused,
/// `postmigrate` while this process holds a guest it handed over (or tried to).
fn status(srv: &Server) -> Value {
    let (mut pages, mut jobs, mut errors, mut running) = (0, 0, 0, false);
    if let Ok(vm) = srv.vm() {
        for i in 0..vm.vcpu_count() {
            let c = vm.programs().counters(i);
            pages += c.pages_written;
            jobs += c.jobs_completed;
            errors += c.errors;
        }
        running = vm.running();
    }
    let mut v = json!({
        "running": running,
        "pages-written": pages,
        "jobs-completed": jobs,
        "guest-errors": errors,
    });
    if let Some((l, _)) = &srv.incoming {
        v["incoming"] = json!(l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        v["guests-received"] = json!(srv.received.load(Ordering::Acquire));
    }
    match &*srv.at() {
        Where::Waiting => v["status"] = json!("inmigrate"),
        Where::Here => v["status"] = json!("running"),
        Where::Arriving => {
            v["status"] = json!("running");
            v["arriving"] = json!(true);
        }
        Where::Migrating => {
            let switching = srv.mig.snapshot().status == migration::Status::Device;
            v["status"] = json!(if switching { "finish-migrate" } else { "running" });
            v["migrating"] = json!(true);
        }
        Where::Held {
            outcome, dest, reason, ..
        } => {
            v["status"] = json!("postmigrate");
            v["outcome"] = json!(outcome);
            v["destination"] = json!(dest);
            v["reason"] = json!(reason);
            v["resumable"] = json!(true);
        }
    }
    v
}

const QUITTING: &str = "the process is quitting (a migration is being rolled back first)";
const WAITING: &str = "no guest here: this process is waiting for an incoming migration";

/// A migration whose status is already final (what `query-migrate` shows) may not have handed
/// the guest's state back yet: waits for its thread, which has only that left to do, so that a
/// command sent right after `query-migrate` said `failed` or `completed` (a retry, `cont`,
/// `quit`'s release) sees the state the status promised rather than "a migration is running".
fn settle_ended_migration(srv: &Server) {
    let ended = matches!(
        srv.mig.snapshot().status,
        migration::Status::Completed | migration::Status::Failed | migration::Status::Cancelled
    );
    if ended && matches!(*srv.at(), Where::Migrating) {
        let thread = srv.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn migrate(srv: &Arc<Server>, a: MigrateArgs) -> Result<Value, String> {
    let opts = a.options().map_err(|e| e.to_string())?;
    settle_ended_migration(srv);
    // The state stays locked until the migration thread's handle is stored, so a `quit`
    // that sees `Migrating` always finds the thread to wait for.
    let mut at = srv.at();
    if srv.quitting.load(Ordering::Acquire) {
        return Err(QUITTING.into());
    }
    match &*at {
        Where::Migrating => return Err("a migration is already running".into()),
        Where::Held { .. } => {
            return Err(
                "the guest was handed over and is held here (postmigrate): `quit` releases it, \
                        `cont` runs it here again"
                    .into(),
            )
        }
        Where::Waiting => return Err(WAITING.into()),
        Where::Arriving => {
            return Err(
                "the guest is still arriving here (the checks after its resume are running); try again in a moment"
                    .into(),
            )
        }
        Where::Here => {}
    }
    let vm = srv.vm()?;
    // Before the reply: a query right after it sees this migration, and a cancel right after
    // it is kept for it.
    srv.mig.begin();
    let s = srv.clone();
    let t = std::thread::Builder::new().name("migration".into()).spawn(move || {
        let _ = migration::migrate(&vm, &a.uri, &opts, &s.mig);
        drop(vm);
        let info = s.mig.snapshot();
        *s.at() = match info.livemig.outcome {
            Outcome::Completed | Outcome::Held => Where::Held {
                outcome: info.livemig.outcome,
                dest: info.livemig.destination,
                reason: match info.livemig.outcome {
                    Outcome::Completed => "handed over: the destination confirmed that it runs the guest".into(),
                    _ => info.error_desc.unwrap_or_default(),
                },
                since: Instant::now(),
            },
            _ => Where::Here,
        };
    });
    match t {
        Ok(t) => {
            *at = Where::Migrating;
            *srv.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            Ok(json!({}))
        }
        Err(e) => {
            let why = format!("starting the migration: {e}");
            // Whoever follows it sees it end, failed, with the guest untouched.
            srv.mig.abandon(&why);
            Err(why)
        }
    }
}

/// Runs a held guest here again. Safe without `force` only when the destination is known not
/// to run it (it said it discarded it).
fn cont(srv: &Server, force: bool) -> Result<Value, String> {
    settle_ended_migration(srv);
    let mut at = srv.at();
    if srv.quitting.load(Ordering::Acquire) {
        return Err(QUITTING.into());
    }
    match &*at {
        Where::Here | Where::Arriving => return Ok(json!({})),
        Where::Waiting => return Err(WAITING.into()),
        Where::Migrating => return Err("a migration is running: migrate-cancel it first".into()),
        Where::Held { dest, .. } => match dest {
            DestState::Discarded => {}
            _ if force => {}
            DestState::Running => {
                return Err(
                    "the destination confirmed that it runs the guest: resuming here too would run it \
                            twice. Stop the destination first, then cont with {\"force\": true}"
                        .into(),
                )
            }
            _ => {
                return Err(
                    "whether the destination runs the guest is unknown: check it (or stop it) first, then \
                            cont with {\"force\": true}"
                        .into(),
                )
            }
        },
    }
    let vm = srv.vm()?;
    vm.resume_devices().map_err(|e| format!("devices to RUNNING: {e}"))?;
    vm.resume().map_err(|e| format!("resuming the vCPUs: {e}"))?;
    *at = Where::Here;
    Ok(json!({}))
}

/// Ends the process, unless that would drop the only copy of the guest:
///
/// * running here, or handed over to a destination that confirmed it runs it: exits;
/// * migrating, before the commit: the migration is cancelled (the guest runs here again),
///   then the process exits, as asked;
/// * migrating, past the commit: refused until the outcome is known, since it decides
///   whether the guest held here is the only copy;
/// * holding a guest the destination discarded, or may not run: refused without
///   `{"force": true}`.
fn quit(srv: &Arc<Server>, force: bool) -> Result<Value, String> {
    match &*srv.at() {
        Where::Migrating => match srv.mig.cancel() {
            Ok(()) => {
                srv.quitting.store(true, Ordering::Release);
                let s = srv.clone();
                // Reply first; the wait for the rollback happens off the client's thread.
                std::thread::spawn(move || {
                    if let Some(t) = s.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        let _ = t.join();
                    }
                    s.quit.store(true, Ordering::Release);
                });
                return Ok(json!({}));
            }
            Err(_) => {
                return Err(
                    "the migration is past its commit: its outcome decides whether the guest held here is \
                            the only copy; wait until query-migrate ends, then quit or cont"
                        .into(),
                )
            }
        },
        Where::Held {
            dest: DestState::Discarded | DestState::Unknown | DestState::None | DestState::Ready,
            ..
        } if !force => return Err(format!("{MAY_BE_ONLY_COPY}; quit with {{\"force\": true}} drops it")),
        _ => {}
    }
    srv.quit.store(true, Ordering::Release);
    Ok(json!({}))
}

/// The message for dropping a held guest the destination may not run.
const MAY_BE_ONLY_COPY: &str =
    "the guest held here may be its only copy (the destination discarded it, or may not run \
                                it): `cont` runs it here";

/// `--incoming` only: drops a guest held here after a handover and waits for the next one on
/// the same address. Without `force`, only a handover the destination confirmed is released
/// (the same rule as `quit`).
fn release(srv: &Arc<Server>, force: bool) -> Result<Value, String> {
    if srv.incoming.is_none() {
        return Err("release is for processes started with --incoming; `quit` ends this one".into());
    }
    settle_ended_migration(srv);
    let mut at = srv.at();
    if srv.quitting.load(Ordering::Acquire) {
        return Err(QUITTING.into());
    }
    match &*at {
        Where::Waiting => {
            drop(at);
            // A receiver that could not be started is started now.
            wait_for_guest(srv);
            return Ok(json!({}));
        }
        Where::Here | Where::Arriving => return Err("the guest runs here: only a guest handed over is released".into()),
        Where::Migrating => return Err("a migration is running: wait until query-migrate ends".into()),
        Where::Held { dest, .. } if *dest != DestState::Running && !force => {
            return Err(format!("{MAY_BE_ONLY_COPY}; release with {{\"force\": true}} drops it"))
        }
        Where::Held { .. } => {}
    }
    // The migration thread has ended (the state left Migrating): join it so that its last
    // reference to the VM is gone before the VM is.
    if let Some(t) = srv.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = t.join();
    }
    srv.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
    *at = Where::Waiting;
    drop(at);
    tracing::info!("released the guest held here; waiting for the next one");
    wait_for_guest(srv);
    Ok(json!({}))
}

/// Receives the next guest on the `--incoming` listener, off the control socket's threads,
/// unless a receiver already runs or a guest is here. A migration that fails leaves this
/// process empty and waiting again.
fn wait_for_guest(srv: &Arc<Server>) {
    {
        let at = srv.at();
        if !matches!(*at, Where::Waiting) || srv.receiving.swap(true, Ordering::AcqRel) {
            return;
        }
    }
    let s = srv.clone();
    let spawned = std::thread::Builder::new().name("incoming".into()).spawn(move || {
        if let Some((l, opts)) = &s.incoming {
            receive_loop(&s, l, opts);
        }
        s.receiving.store(false, Ordering::Release);
    });
    if let Err(e) = spawned {
        srv.receiving.store(false, Ordering::Release);
        tracing::error!(error = %e, "cannot start the receiving thread; `release` retries");
    }
}

fn receive_loop(s: &Arc<Server>, l: &TcpListener, opts: &DestOptions) {
    while !s.quit.load(Ordering::Acquire) {
        // The guest is published here the moment it runs, before the source hears of it.
        let mut opts = opts.clone();
        let s2 = s.clone();
        opts.on_running = Some(migration::OnRunning(Arc::new(move |vm: &Arc<Vm>| {
            let mut at = s2.at();
            *s2.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.clone());
            *at = Where::Arriving;
        })));
        let got = tracing::info_span!("incoming").in_scope(|| migration::receive(l, &opts));
        drop(opts);
        match got {
            Ok(inc) => {
                let n = s.received.fetch_add(1, Ordering::AcqRel) + 1;
                if let Some(leak) = s.sabotage_leak {
                    leak.leak();
                }
                let r = &inc.report;
                let resume_ms = r.resume_time.as_secs_f64() * 1e3;
                match &r.unverified {
                    None => tracing::info!(
                        guest = n,
                        pages = r.pages_received,
                        device_bytes = r.device_bytes,
                        iterations = r.iterations,
                        resume_ms,
                        "guest received; running"
                    ),
                    Some(why) => tracing::warn!(
                        guest = n,
                        pages = r.pages_received,
                        device_bytes = r.device_bytes,
                        iterations = r.iterations,
                        resume_ms,
                        "guest received; running UNVERIFIED: {why}"
                    ),
                }
                let mut at = s.at();
                *s.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(inc.vm);
                *at = Where::Here;
                // Under the lock: a `release` that sees Waiting again later starts a new one.
                s.receiving.store(false, Ordering::Release);
                return;
            }
            Err(e) => {
                // A guest that ran here and then failed its checks was stopped: forget it.
                let mut at = s.at();
                if matches!(*at, Where::Arriving) {
                    s.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
                    *at = Where::Waiting;
                }
                drop(at);
                tracing::warn!(
                    error = %e.chain(),
                    "no guest runs here; waiting for the next attempt"
                );
            }
        }
    }
}
