//! `livemig faults`: the fault matrix (`faults` crate) with a progress line per case and
//! the tables of docs/faults.md.

use anyhow::{anyhow, Result};
use faults::{Action, Case, Config, Dir, Step};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Trials per cell.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub trials: u32,
    /// Steps, comma separated (default: all): bulk, iteration, switchover, after-pages,
    /// after-device, after-vcpu, after-ready, after-commit, after-confirm.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<String>,
    /// Actions, comma separated (default: all): cut, stall, kill, freeze, flip, truncate,
    /// duplicate, drop, reorder, garbage.
    #[arg(long, value_delimiter = ',')]
    pub actions: Vec<String>,
    /// Directions, comma separated (default: both): to-dest, to-source.
    #[arg(long, value_delimiter = ',')]
    pub dirs: Vec<String>,
    /// Both sides' peer timeout, in seconds.
    #[arg(long, default_value_t = 1.0, value_parser = crate::parse_timeout)]
    pub peer_timeout: f64,
    /// Guest RAM of each trial's VM, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(18..=1024))]
    pub memory_mib: u64,
    /// Print every case as JSON instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Test-only: run destinations that resume without the source's commit, to show the
    /// matrix catches the split brain.
    #[arg(long = "sabotage-resume-before-commit", hide = true)]
    pub sabotage: bool,
}

fn pick<T: Copy>(all: &[T], name: fn(T) -> &'static str, want: &[String], what: &str) -> Result<Vec<T>> {
    if want.is_empty() {
        return Ok(all.to_vec());
    }
    want.iter()
        .map(|w| {
            all.iter().copied().find(|x| name(*x) == w).ok_or_else(|| {
                anyhow!(
                    "unknown {what} '{w}' ({})",
                    all.iter().map(|x| name(*x)).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

/// One letter per case: what became of the guest.
fn letter(c: &Case) -> char {
    if !c.violations.is_empty() {
        return '✗';
    }
    match c.outcome {
        migration::Outcome::Completed => 'C',
        migration::Outcome::RolledBack => 'R',
        migration::Outcome::Held => 'H',
        migration::Outcome::None => '?',
    }
}

pub fn run(a: &Args) -> Result<i32> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("the fault matrix needs KVM: {e}"))?;
    let steps = pick(&Step::ALL, Step::name, &a.steps, "step")?;
    let actions = pick(&Action::ALL, Action::name, &a.actions, "action")?;
    let dirs = pick(&Dir::ALL, Dir::name, &a.dirs, "direction")?;
    let cfg = Config {
        bin: std::env::current_exe()?,
        peer_timeout: Duration::from_secs_f64(a.peer_timeout),
        mem_mib: a.memory_mib,
        sabotage_resume_before_commit: a.sabotage,
    };
    let total = steps.len() * actions.len() * dirs.len() * a.trials as usize;
    let mut n = 0;
    let cases = faults::run_matrix(&cfg, &steps, &actions, &dirs, a.trials, &mut |c| {
        n += 1;
        let line = format!(
            "[{n}/{total}] {} {} {}: {:?}, destination {} ({}) in {:.1} s{}",
            c.fault.step.name(),
            c.fault.action.name(),
            c.fault.dir.name(),
            c.outcome,
            if c.dest_running {
                "runs the guest"
            } else if c.dest_resumed {
                "ran it, then stopped"
            } else {
                "never ran it"
            },
            c.fired.frame.as_deref().unwrap_or("no frame hit"),
            c.seconds,
            if c.violations.is_empty() {
                String::new()
            } else {
                format!(" — FAILED: {}", c.violations.join("; "))
            }
        );
        if c.violations.is_empty() {
            tracing::info!("{line}");
        } else {
            tracing::error!("{line}");
        }
    });
    let failed: Vec<&Case> = cases.iter().filter(|c| !c.violations.is_empty()).collect();
    if a.json {
        out!("{}", serde_json::to_string_pretty(&cases)?);
    } else {
        print_tables(&cases, &steps, &actions, a.trials);
    }
    if failed.is_empty() {
        Ok(0)
    } else {
        tracing::error!(failed = failed.len(), cases = cases.len(), "cases broke a promise");
        Ok(1)
    }
}

fn print_tables(cases: &[Case], steps: &[Step], actions: &[Action], trials: u32) {
    let mut cell: BTreeMap<(Step, Action, Dir), Vec<&Case>> = BTreeMap::new();
    for c in cases {
        cell.entry((c.fault.step, c.fault.action, c.fault.dir))
            .or_default()
            .push(c);
    }
    let word = |v: &Vec<&Case>| v.iter().map(|c| letter(c)).collect::<String>();
    out!(
        "{} case(s) per cell; each cell: to-dest · to-source; C completed (the destination runs the guest), R rolled \
         back (the source runs it), H held (the source holds it paused and resumable, an operator decides), ✗ a broken \
         promise.\n",
        trials
    );
    out!(
        "| step | {} |",
        actions.iter().map(|a| a.name()).collect::<Vec<_>>().join(" | ")
    );
    out!("|---|{}", "---|".repeat(actions.len()));
    for s in steps {
        let row: Vec<String> = actions
            .iter()
            .map(|a| {
                let d = cell.get(&(*s, *a, Dir::ToDest)).map(word).unwrap_or_default();
                let u = cell.get(&(*s, *a, Dir::ToSource)).map(word).unwrap_or_default();
                format!("{d} · {u}")
            })
            .collect();
        out!("| {} | {} |", s.name(), row.join(" | "));
    }
    let n = cases.len();
    let count = |f: &dyn Fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    out!(
        "\n{n} cases: {} completed, {} rolled back, {} held; the destination ran the guest in {} ({} of them from a \
         damaged stream); {} split brain(s); {} case(s) broke a promise. Longest case {:.1} s.",
        count(&|c| c.outcome == migration::Outcome::Completed),
        count(&|c| c.outcome == migration::Outcome::RolledBack),
        count(&|c| c.outcome == migration::Outcome::Held),
        count(&|c| c.dest_resumed),
        count(&|c| c.violations.iter().any(|v| v.contains("damaged stream"))),
        count(&|c| c.violations.iter().any(|v| v.starts_with("split brain"))),
        count(&|c| !c.violations.is_empty()),
        cases.iter().map(|c| c.seconds).fold(0.0, f64::max),
    );
}
