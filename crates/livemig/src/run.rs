//! `livemig run`: a VM with its guest programs running, controlled through a unix socket.
//!
//! After a migration hands the guest over, this process keeps the paused guest, resumable,
//! in QEMU's `postmigrate`, until `quit` (or `--release-after`, for a confirmed handover):
//! a destination that dies at any point loses nothing, and `cont` runs the guest here again
//! (`docs/protocol.md`, "Who decides").

use crate::control::{MigrateArgs, Request};
use crate::ctlsock::ControlSocket;
use crate::vmopts::VmOpts;
use anyhow::Result;
use migration::{DestState, MigrationControl, Outcome};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::Vm;

/// Where the guest is, as this process sees it.
#[derive(Clone, Debug)]
enum Where {
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

struct Server {
    vm: Arc<Vm>,
    mig: Arc<MigrationControl>,
    at: Mutex<Where>,
    quit: AtomicBool,
    /// The migration thread, while one runs.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Server {
    fn at(&self) -> std::sync::MutexGuard<'_, Where> {
        self.at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn run(opts: &VmOpts, control: &Path, release_after: Option<Duration>) -> Result<()> {
    raise_fd_limit();
    // Claim the socket before building the VM: a refused path costs nothing.
    let sock = ControlSocket::bind(control)?;
    let vm = Arc::new(opts.build()?);
    vm.resume()?;
    out!(
        "VM running: {} MiB, {} vCPU(s), dirtier at {} MiB/s{}; control socket {}",
        opts.memory_mib,
        opts.vcpus,
        opts.rate,
        if opts.no_accel { "" } else { ", accelerator busy" },
        control.display()
    );
    let srv = Arc::new(Server {
        vm,
        mig: Arc::new(MigrationControl::default()),
        at: Mutex::new(Where::Here),
        quit: AtomicBool::new(false),
        thread: Mutex::new(None),
    });
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
    out!(
        "{}",
        if held {
            "quit: the paused guest held after the migration is released"
        } else {
            "quit"
        }
    );
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
fn release_when_confirmed(srv: &Server, after: Duration) {
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
            out!("--release-after: the destination confirmed the handover; releasing the guest held here");
            srv.quit.store(true, Ordering::Release);
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
    }
}

/// QEMU's run states: `running`, `finish-migrate` while the switchover has the guest paused,
/// `postmigrate` while this process holds a guest it handed over (or tried to).
fn status(srv: &Server) -> Value {
    let (mut pages, mut jobs, mut errors) = (0, 0, 0);
    for i in 0..srv.vm.vcpu_count() {
        let c = srv.vm.counters(i);
        pages += c.pages_written;
        jobs += c.jobs_completed;
        errors += c.errors;
    }
    let running = srv.vm.running();
    let mut v = json!({
        "running": running,
        "pages-written": pages,
        "jobs-completed": jobs,
        "guest-errors": errors,
    });
    match &*srv.at() {
        Where::Here => v["status"] = json!("running"),
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

fn migrate(srv: &Arc<Server>, a: MigrateArgs) -> Result<Value, String> {
    let opts = a.options().map_err(|e| e.to_string())?;
    {
        let mut at = srv.at();
        match &*at {
            Where::Migrating => return Err("a migration is already running".into()),
            Where::Held { .. } => {
                return Err(
                    "the guest was handed over and is held here (postmigrate): `quit` releases it, \
                            `cont` runs it here again"
                        .into(),
                )
            }
            Where::Here => {}
        }
        *at = Where::Migrating;
    }
    // Before the reply: a query right after it sees this migration, and a cancel right after
    // it is kept for it.
    srv.mig.begin();
    let s = srv.clone();
    let t = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let _ = migration::migrate(&s.vm, &a.uri, &opts, &s.mig);
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
        })
        .map_err(|e| format!("starting the migration: {e}"));
    match t {
        Ok(t) => {
            *srv.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            Ok(json!({}))
        }
        Err(e) => {
            *srv.at() = Where::Here;
            Err(e)
        }
    }
}

/// Runs a held guest here again. Safe without `force` only when the destination is known not
/// to run it (it said it discarded it).
fn cont(srv: &Server, force: bool) -> Result<Value, String> {
    let mut at = srv.at();
    match &*at {
        Where::Here => return Ok(json!({})),
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
    srv.vm
        .resume_devices()
        .map_err(|e| format!("devices to RUNNING: {e}"))?;
    srv.vm.resume().map_err(|e| format!("resuming the vCPUs: {e}"))?;
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
        } if !force => {
            return Err(
                "the guest held here may be its only copy (the destination discarded it, or may not run \
                        it): `cont` runs it here; quit with {\"force\": true} drops it"
                    .into(),
            )
        }
        _ => {}
    }
    srv.quit.store(true, Ordering::Release);
    Ok(json!({}))
}
