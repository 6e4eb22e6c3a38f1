//! The fault matrix: one live migration per (step, action, direction) through the proxy,
//! with a real destination process (`livemig receive`, so it can be killed) and the source
//! in this process, and after each the checks a migration tool must pass whatever happened:
//!
//! * at most one side ran the guest after the pause (no split brain);
//! * the guest is never lost: the source runs it, or holds it paused and resumable, or the
//!   destination runs it;
//! * no wait ran past its timeout (the source's `migrate` returned, and a destination that
//!   did not run the guest exited, within bounds);
//! * nothing panicked;
//! * the destination never resumed from a stream the proxy damaged before the commit.

use crate::proxy::{Action, Dir, Fault, Fired, Proxy, Step};
use migration::{DestState, DeviceTracking, MigrationControl, Outcome, SourceOptions, VerifyMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{layout, AccelSetup, DeviceSet, DirtyLogMode, Pattern, Program, Vm, VmConfig};

/// How the matrix runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `livemig` binary (its `receive` is the destination).
    pub bin: PathBuf,
    /// Both sides' peer timeout.
    pub peer_timeout: Duration,
    pub mem_mib: u64,
    /// Test-only: destinations that resume without the commit (`receive`'s hidden flag),
    /// to show the checks catch a split brain.
    pub sabotage_resume_before_commit: bool,
}

/// One trial.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub fault: Fault,
    pub verify: String,
    pub fired: Fired,
    pub outcome: Outcome,
    /// What the source knows of the destination.
    pub destination: DestState,
    pub dest_resumed: bool,
    /// The destination still runs the guest at the end.
    pub dest_running: bool,
    pub dest_exit: Option<i32>,
    /// The longest the source's guest stayed paused before it ran again (rolled back).
    pub source_paused_ms: u64,
    pub seconds: f64,
    /// Broken promises; empty when the case passed.
    pub violations: Vec<String>,
    /// What the destination printed, when a promise was broken.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dest_log: Vec<String>,
}

/// The destination process and what it printed, with when.
struct Dest {
    child: Arc<Mutex<Child>>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    addr: String,
}

fn spawn_dest(cfg: &Config) -> Result<Dest, String> {
    let mut c = Command::new(&cfg.bin)
        .args(["receive", "--listen", "127.0.0.1:0", "--peer-timeout"])
        .arg(format!("{}", cfg.peer_timeout.as_secs_f64()))
        .args(
            cfg.sabotage_resume_before_commit
                .then_some("--sabotage-resume-before-commit"),
        )
        // `livemig` children die with the process that started them, even if it is killed.
        .env("LIVEMIG_PARENT_PID", std::process::id().to_string())
        // Its info events are what this reads (`Dest::said`): whatever RUST_LOG the matrix
        // runs under, the destination logs them.
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cfg.bin.display()))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let out = c.stdout.take().ok_or("no stdout")?;
    let err = c.stderr.take().ok_or("no stderr")?;
    let l1 = lines.clone();
    std::thread::spawn(move || {
        for (i, l) in BufReader::new(out).lines().map_while(Result::ok).enumerate() {
            if i == 0 {
                let _ = tx.send(l.clone());
            }
            l1.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), l));
        }
    });
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            l2.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), l));
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the destination did not start listening".to_string())?;
    let addr = first
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected destination output: {first}"))?
        .to_string();
    Ok(Dest {
        child: Arc::new(Mutex::new(c)),
        lines,
        addr,
    })
}

impl Dest {
    fn said(&self, what: &str) -> bool {
        self.when(what).is_some()
    }
    /// When it first printed a line containing `what`.
    fn when(&self, what: &str) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| l.1.contains(what))
            .map(|l| l.0)
    }
    fn exit(&self) -> Option<i32> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match c.try_wait() {
            Ok(Some(s)) => Some(s.code().unwrap_or(-1)),
            _ => None,
        }
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A small busy source: the dirtier and the accel-client, both running.
fn source_vm(mem_mib: u64) -> Result<Arc<Vm>, String> {
    let vm = Vm::new(VmConfig {
        mem_mib,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup::default()),
    })
    .map_err(|e| format!("source VM: {e}"))?;
    let mut p = Program::dirtier(layout::WORKSET_BASE, 4096, 16.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).map_err(|e| e.to_string())?;
    vm.resume().map_err(|e| e.to_string())?;
    Ok(Arc::new(vm))
}

/// Whether the proxy damaged the source's stream before the destination could have taken
/// the commit: the destination must then never resume.
fn damaged_before_commit(f: &Fault, fired: &Fired) -> bool {
    if f.dir != Dir::ToDest || !fired.altered || matches!(f.action, Action::Cut | Action::Stall | Action::Kill) {
        return false;
    }
    if fired.frame.as_deref() == Some("Commit") {
        // The commit damaged is no commit; duplicated or overtaken, it arrived intact first.
        return matches!(
            f.action,
            Action::Flip | Action::Truncate | Action::Drop | Action::Garbage
        );
    }
    f.step < Step::AfterCommit
}

/// Runs one trial.
pub fn run_case(cfg: &Config, fault: Fault) -> Case {
    let t0 = Instant::now();
    let verify = if fault.step == Step::AfterConfirm {
        VerifyMode::Audit
    } else {
        VerifyMode::Gate
    };
    let mut case = Case {
        fault,
        verify: verify.to_string(),
        fired: Fired::default(),
        outcome: Outcome::None,
        destination: DestState::None,
        dest_resumed: false,
        dest_running: false,
        dest_exit: None,
        source_paused_ms: 0,
        seconds: 0.0,
        violations: Vec::new(),
        dest_log: Vec::new(),
    };
    let dest = match spawn_dest(cfg) {
        Ok(d) => d,
        Err(e) => {
            case.violations.push(format!("setup: {e}"));
            return case;
        }
    };
    let pid = dest.child.lock().unwrap_or_else(|e| e.into_inner()).id();
    let proxy = match Proxy::start(dest.addr.clone(), fault, pid, cfg.peer_timeout * 3 / 2) {
        Ok(p) => p,
        Err(e) => {
            case.violations.push(format!("setup: proxy: {e}"));
            return case;
        }
    };
    let vm = match source_vm(cfg.mem_mib) {
        Ok(v) => v,
        Err(e) => {
            case.violations.push(format!("setup: {e}"));
            return case;
        }
    };
    std::thread::sleep(Duration::from_millis(50));
    let opts = SourceOptions {
        mode: DeviceTracking::Iommu,
        // Never converges: three iterations, then the switchover, every time.
        downtime_limit: Duration::ZERO,
        max_iterations: 3,
        verify,
        peer_timeout: cfg.peer_timeout,
        ..Default::default()
    };
    let ctl = Arc::new(MigrationControl::default());
    let (v2, c2, to) = (vm.clone(), ctl.clone(), proxy.addr.clone());
    let src = std::thread::spawn(move || migration::migrate(&v2, &to, &opts, &c2));
    // The longest stretch the source's guest is paused, for a migration that rolls back.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (v3, w3) = (vm.clone(), watching.clone());
    let paused = std::thread::spawn(move || {
        let (mut since, mut longest) = (None::<Instant>, Duration::ZERO);
        while w3.load(std::sync::atomic::Ordering::Acquire) {
            match (v3.running(), since) {
                (false, None) => since = Some(Instant::now()),
                (true, Some(t)) => {
                    longest = longest.max(t.elapsed());
                    since = None;
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        longest
    });
    // Every wait of the source is bounded by the peer timeout; a handful of them in a row,
    // plus hashing and a busy host, must fit in this.
    let deadline = cfg.peer_timeout * 6 + Duration::from_secs(15);
    while !src.is_finished() && t0.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let src_done = Instant::now();
    if !src.is_finished() {
        case.violations.push(format!(
            "hang: the source's migrate did not return within {:.0} s",
            deadline.as_secs_f64()
        ));
        proxy.stop();
        // Give it the chance to end before the VM goes; it is abandoned otherwise.
        std::thread::sleep(cfg.peer_timeout * 2);
    } else if src.join().is_err() {
        case.violations.push("panic: the source's migrate panicked".into());
    }
    watching.store(false, std::sync::atomic::Ordering::Release);
    case.source_paused_ms = paused.join().map(|d| d.as_millis() as u64).unwrap_or(0);
    let info = ctl.snapshot();
    case.outcome = info.livemig.outcome;
    case.destination = info.livemig.destination;
    // A destination without the guest must give up within its own timeouts. One that never
    // accepted the migration (a damaged handshake) has turned the connection away once its
    // first frame's wait (at most one peer timeout here) is over, and goes on listening.
    let dl = Instant::now() + cfg.peer_timeout * 3 + Duration::from_secs(5);
    let never = Instant::now() + cfg.peer_timeout + Duration::from_secs(1);
    while dest.exit().is_none()
        && !dest.said("guest running on the destination")
        && Instant::now() < dl
        && (dest.said("incoming migration") || Instant::now() < never)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    if dest.exit().is_none() && dest.said("guest running on the destination") {
        // It runs, or will discard after its checks: let those finish.
        std::thread::sleep(Duration::from_millis(500));
    }
    case.dest_resumed = dest.said("guest running on the destination");
    case.dest_exit = dest.exit();
    case.dest_running = case.dest_resumed && case.dest_exit.is_none();
    proxy.stop();
    case.fired = proxy.fired();
    let source_runs = vm.running();
    let v = &mut case.violations;
    if dest.said("panicked") {
        v.push("panic: the destination panicked".into());
    }
    // A destination that never accepted a migration (its first connection was damaged
    // before the handshake completed) rightly goes on waiting for one.
    if !case.dest_resumed && case.dest_exit.is_none() && dest.said("incoming migration") {
        v.push("the destination neither ran the guest nor gave up within its timeouts".into());
    }
    if case.dest_exit == Some(0) {
        v.push("the destination exited 0".into());
    }
    if case.dest_resumed && source_runs {
        v.push("split brain: both sides ran the guest".into());
    }
    match case.outcome {
        Outcome::RolledBack if !source_runs => v.push("lost: rolled back, but the source does not run".into()),
        Outcome::Completed | Outcome::Held if source_runs => v.push("the source resumed after it committed".into()),
        Outcome::None => v.push("the migration has no outcome".into()),
        _ => {}
    }
    // A failed switchover gives the guest back within one wait on the destination and the
    // rollback: the blackout of a failure is bounded too.
    let bound = cfg.peer_timeout * 2 + Duration::from_secs(1);
    if case.outcome == Outcome::RolledBack && case.source_paused_ms > bound.as_millis() as u64 {
        v.push(format!(
            "the source's guest stayed paused {} ms before rolling back (bound {} ms)",
            case.source_paused_ms,
            bound.as_millis()
        ));
    }
    // The source gives up on the destination only after it can no longer resume (it takes a
    // commit only within half the peer timeout of `Ready`): a resume after the source gave up
    // is one an operator's forced `cont` would run twice.
    if let Some(t) = dest.when("guest running on the destination") {
        if case.outcome == Outcome::Held && t > src_done + Duration::from_millis(100) {
            v.push(format!(
                "the destination resumed {} ms after the source gave up on it",
                (t - src_done).as_millis()
            ));
        }
    }
    if case.destination == DestState::Running && !case.dest_resumed {
        v.push("the source believes the destination runs the guest; it never resumed".into());
    }
    if case.destination == DestState::Discarded && case.dest_running {
        v.push("the source believes the destination discarded the guest; it runs".into());
    }
    if damaged_before_commit(&fault, &case.fired) && case.dest_resumed {
        v.push("the destination resumed from a damaged stream".into());
    }
    if !case.violations.is_empty() {
        case.dest_log = dest
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, l)| format!("+{:.3} s {l}", t.duration_since(t0).as_secs_f64()))
            .collect();
    }
    case.seconds = t0.elapsed().as_secs_f64();
    case
}

/// Every cell of `steps × actions × dirs`, `trials` times each; `progress` sees each case.
pub fn run_matrix(
    cfg: &Config,
    steps: &[Step],
    actions: &[Action],
    dirs: &[Dir],
    trials: u32,
    progress: &mut dyn FnMut(&Case),
) -> Vec<Case> {
    let mut out = Vec::new();
    // Each case's seed, the same from run to run.
    let mut seeds = SmallRng::seed_from_u64(0x5eed);
    for &step in steps {
        for &action in actions {
            for &dir in dirs {
                for _ in 0..trials {
                    let c = run_case(
                        cfg,
                        Fault {
                            step,
                            dir,
                            action,
                            seed: seeds.random(),
                        },
                    );
                    progress(&c);
                    out.push(c);
                }
            }
        }
    }
    out
}
