//! `livemig run`: a VM with its guest programs running, controlled through a unix socket.

use crate::control::{parse_request, MigrateArgs};
use crate::vmopts::VmOpts;
use anyhow::{Context, Result};
use migration::{MigrationControl, Status};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::Vm;

struct Server {
    vm: Mutex<Option<Arc<Vm>>>,
    mig: Arc<MigrationControl>,
    migrating: AtomicBool,
    /// A client saw the completed migration: the process can end.
    delivered: AtomicBool,
    quit: AtomicBool,
}

pub fn run(opts: &VmOpts, control: &Path) -> Result<()> {
    let vm = Arc::new(opts.build()?);
    vm.resume()?;
    if control.exists() {
        std::fs::remove_file(control).with_context(|| format!("removing the stale socket {}", control.display()))?;
    }
    let l = UnixListener::bind(control).with_context(|| format!("binding the control socket {}", control.display()))?;
    l.set_nonblocking(true)?;
    out!(
        "VM running: {} MiB, {} vCPU(s), dirtier at {} MiB/s{}; control socket {}",
        opts.memory_mib,
        opts.vcpus,
        opts.rate,
        if opts.no_accel { "" } else { ", accelerator busy" },
        control.display()
    );
    let srv = Arc::new(Server {
        vm: Mutex::new(Some(vm)),
        mig: Arc::new(MigrationControl::default()),
        migrating: AtomicBool::new(false),
        delivered: AtomicBool::new(false),
        quit: AtomicBool::new(false),
    });
    while !srv.quit.load(Ordering::Acquire) && !srv.delivered.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let srv = srv.clone();
                std::thread::spawn(move || serve(&srv, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    }
    // Let the last reply reach its client, and the migration thread shut the VM down.
    std::thread::sleep(Duration::from_millis(100));
    while srv.migrating.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(control);
    let moved = srv.vm.lock().unwrap_or_else(|e| e.into_inner()).is_none();
    out!(
        "{}",
        if moved {
            "the VM moved to the destination; source shut down"
        } else {
            "quit"
        }
    );
    Ok(())
}

fn serve(srv: &Arc<Server>, s: UnixStream) {
    let _ = s.set_nonblocking(false);
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match parse_request(&line).and_then(|(cmd, args)| handle(srv, &cmd, args)) {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({ "error": { "class": "GenericError", "desc": e } }),
        };
        if writeln!(w, "{reply}").is_err() {
            return;
        }
    }
}

fn handle(srv: &Arc<Server>, cmd: &str, args: Value) -> Result<Value, String> {
    let vm = srv.vm.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match cmd {
        "query-status" => Ok(match &vm {
            None => json!({ "status": "postmigrate", "running": false }),
            Some(vm) => {
                let c = vm.counters(0);
                let migrating = srv.migrating.load(Ordering::Acquire);
                json!({
                    "status": if migrating { "inmigrate" } else { "running" },
                    "running": vm.vcpu_stopped().is_none(),
                    "pages-written": c.pages_written,
                    "jobs-completed": c.jobs_completed,
                    "guest-errors": c.errors,
                })
            }
        }),
        "migrate" => {
            let a: MigrateArgs = serde_json::from_value(args).map_err(|e| format!("bad arguments: {e}"))?;
            let opts = a.options().map_err(|e| e.to_string())?;
            let vm = vm.ok_or("the VM has already moved")?;
            if srv.migrating.swap(true, Ordering::AcqRel) {
                return Err("a migration is already running".into());
            }
            // A query right after this reply must see the new migration, not the last one.
            *srv.mig.info.lock().unwrap_or_else(|e| e.into_inner()) = migration::MigrationInfo {
                status: Status::Setup,
                ..Default::default()
            };
            let srv2 = srv.clone();
            std::thread::spawn(move || {
                let r = migration::migrate(&vm, &a.uri, &opts, &srv2.mig);
                if r.is_ok() {
                    // The source shuts down: its vCPUs and devices stop for good.
                    srv2.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                srv2.migrating.store(false, Ordering::Release);
            });
            Ok(json!({}))
        }
        "query-migrate" => {
            let info = srv.mig.snapshot();
            let v = serde_json::to_value(&info).map_err(|e| e.to_string())?;
            if info.status == Status::Completed {
                srv.delivered.store(true, Ordering::Release);
            }
            Ok(v)
        }
        "migrate-cancel" => {
            srv.mig.cancel.store(true, Ordering::Release);
            Ok(json!({}))
        }
        "quit" => {
            srv.quit.store(true, Ordering::Release);
            Ok(json!({}))
        }
        other => Err(format!("unknown command '{other}'")),
    }
}
