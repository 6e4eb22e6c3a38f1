//! The arc function and `set_state` for every flag set and every (cur, new) pair.
//!
//! Oracles independent of the table: a breadth-first search over the single-step arcs a
//! driver with those flags implements (`docs/vfio.md#driver-arcs`), where PRE_COPY,
//! PRE_COPY_P2P, STOP_COPY and RESUMING never appear in the middle of a path; and, for all
//! three flags, the paths written out by hand from the arc table (`docs/vfio.md#arc-table`).

use iommu::errno::EINVAL;
use iommu::Errno;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use vfio::fsm::driver_arcs;
use vfio::*;
use MigState::*;

const FLAG_SETS: [MigFlags; 4] = MigFlags::DEFINED;

fn usable(s: MigState, f: MigFlags) -> bool {
    vfio::fsm::usable(s, f)
}

fn bfs(cur: MigState, new: MigState, f: MigFlags) -> Option<usize> {
    if !usable(cur, f) || !usable(new, f) {
        return None;
    }
    // STOP_COPY -> PRE_COPY(_P2P) is forbidden, by any path
    // (`docs/vfio.md#routing-multi-step-transitions`).
    if cur == StopCopy && matches!(new, PreCopy | PreCopyP2p) {
        return None;
    }
    let arcs = driver_arcs(f);
    let mut dist = std::collections::HashMap::from([(cur, 0usize)]);
    let mut q = VecDeque::from([cur]);
    while let Some(s) = q.pop_front() {
        if s == new {
            return Some(dist[&s]);
        }
        // Stream states only end a path, except inside one save session, where PRE_COPY and
        // PRE_COPY_P2P lead to each other and to STOP_COPY with the stream continuing
        // (`docs/vfio.md#transition-semantics`).
        let same_session = cur.is_precopy() && s.is_precopy() && matches!(new, PreCopy | PreCopyP2p | StopCopy);
        if s != cur && s.has_stream() && !same_session {
            continue;
        }
        for &(a, b) in &arcs {
            if a == s && !dist.contains_key(&b) {
                dist.insert(b, dist[&s] + 1);
                q.push_back(b);
            }
        }
    }
    None
}

type Arcs = Arc<Mutex<Vec<(MigState, MigState)>>>;

/// Records every arc the framework asks for. `leak` makes it (wrongly) open a save stream on
/// one more arc.
struct Recorder {
    flags: MigFlags,
    arcs: Arcs,
    state: MigState,
    leak: Option<(MigState, MigState)>,
}

impl Recorder {
    fn new(flags: MigFlags, leak: Option<(MigState, MigState)>) -> (Self, Arcs) {
        let arcs = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                flags,
                arcs: arcs.clone(),
                state: Running,
                leak,
            },
            arcs,
        )
    }
}

impl MigrationDriver for Recorder {
    fn migration_flags(&self) -> MigFlags {
        self.flags
    }
    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<StreamKind>, Errno> {
        assert_eq!(from, self.state, "the framework tracks the state");
        self.arcs.lock().unwrap().push((from, to));
        self.state = to;
        if self.leak == Some((from, to)) {
            return Ok(Some(StreamKind::Save));
        }
        Ok(match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => Some(StreamKind::Save),
            (Stop, Resuming) => Some(StreamKind::Resume),
            _ => None,
        })
    }
    fn save_read(&mut self, _: MigState, _: &mut [u8]) -> Result<usize, Errno> {
        Ok(0)
    }
    fn resume_write(&mut self, b: &[u8]) -> Result<usize, Errno> {
        Ok(b.len())
    }
    fn precopy_info(&mut self) -> PrecopyInfo {
        PrecopyInfo::default()
    }
    fn stop_copy_size(&mut self) -> Result<u64, Errno> {
        Ok(0)
    }
    fn reset(&mut self) {
        self.state = Running;
    }
}

/// Puts a fresh device in `cur` through the framework.
fn device_in(flags: MigFlags, cur: MigState) -> (MigrationDevice, Arcs) {
    let (rec, arcs) = Recorder::new(flags, None);
    let dev = MigrationDevice::new("rec", rec).unwrap();
    // STOP_COPY and RESUMING are reached from STOP; PRE_COPY_P2P from RUNNING_P2P.
    let route: &[MigState] = match cur {
        Running => &[],
        Stop => &[Stop],
        StopCopy => &[Stop, StopCopy],
        Resuming => &[Stop, Resuming],
        RunningP2p => &[RunningP2p],
        PreCopy => &[PreCopy],
        PreCopyP2p => &[RunningP2p, PreCopyP2p],
        Error => unreachable!(),
    };
    for &s in route {
        dev.set_state(s).unwrap();
    }
    assert_eq!(dev.get_state(), cur);
    arcs.lock().unwrap().clear();
    (dev, arcs)
}

#[test]
fn every_pair_for_every_flag_set() {
    let mut checked = 0;
    for f in FLAG_SETS {
        let allowed: HashSet<_> = driver_arcs(f).into_iter().collect();
        for cur in MigState::ALL.into_iter().filter(|s| *s != Error && usable(*s, f)) {
            for new in MigState::ALL {
                let (dev, arcs) = device_in(f, cur);
                let res = dev.set_state(new);
                let path = arcs.lock().unwrap().clone();
                match bfs(cur, new, f) {
                    None => {
                        assert_eq!(res.unwrap_err(), EINVAL, "{f}: {cur} -> {new} must fail");
                        assert!(path.is_empty(), "{f}: {cur} -> {new}: no arc on failure");
                        assert_eq!(dev.get_state(), cur, "{f}: {cur} -> {new}: state unchanged");
                    }
                    Some(len) => {
                        let stream = res.unwrap_or_else(|e| panic!("{f}: {cur} -> {new}: {e}"));
                        assert_eq!(path.len(), len, "{f}: {cur} -> {new}: shortest path, got {path:?}");
                        assert_eq!(dev.get_state(), new);
                        for a in &path {
                            assert!(allowed.contains(a), "{f}: {cur} -> {new} asked the driver for {a:?}");
                        }
                        for w in path.windows(2) {
                            assert_eq!(w[0].1, w[1].0, "contiguous path");
                            let mid = w[0].1;
                            assert!(
                                !mid.has_stream() || (cur.is_precopy() && mid.is_precopy()),
                                "{f}: {cur} -> {new} passes through {mid}"
                            );
                        }
                        let opens = matches!(
                            path.last(),
                            Some((Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) | (Stop, Resuming))
                        );
                        assert_eq!(
                            stream.is_some(),
                            opens,
                            "{f}: {cur} -> {new}: a stream exactly when the last arc opens one"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        8 * (4 + 5 + 5 + 7),
        "every usable start state against all 8 targets"
    );
}

#[test]
fn paths_with_all_three_flags_match_the_spec_table() {
    let f = MigFlags(7);
    // Written out by hand from the arc table in `docs/vfio.md#arc-table`:
    // (cur, new, path after cur).
    let want: &[(MigState, MigState, &[MigState])] = &[
        (Running, Stop, &[RunningP2p, Stop]),
        (Running, StopCopy, &[RunningP2p, Stop, StopCopy]),
        (Running, Resuming, &[RunningP2p, Stop, Resuming]),
        (Running, PreCopyP2p, &[RunningP2p, PreCopyP2p]),
        (Stop, Running, &[RunningP2p, Running]),
        (Stop, PreCopy, &[RunningP2p, Running, PreCopy]),
        (Stop, PreCopyP2p, &[RunningP2p, PreCopyP2p]),
        (StopCopy, Running, &[Stop, RunningP2p, Running]),
        (Resuming, Running, &[Stop, RunningP2p, Running]),
        (Resuming, PreCopy, &[Stop, RunningP2p, Running, PreCopy]),
        (RunningP2p, StopCopy, &[Stop, StopCopy]),
        (RunningP2p, PreCopy, &[Running, PreCopy]),
        (PreCopy, Stop, &[Running, RunningP2p, Stop]),
        (PreCopy, StopCopy, &[PreCopyP2p, StopCopy]),
        (PreCopy, RunningP2p, &[Running, RunningP2p]),
        (PreCopyP2p, Running, &[RunningP2p, Running]),
        (PreCopyP2p, StopCopy, &[StopCopy]),
        (PreCopyP2p, Resuming, &[RunningP2p, Stop, Resuming]),
    ];
    for &(cur, new, path) in want {
        let mut s = cur;
        let mut got = Vec::new();
        while s != new {
            s = next_state(s, new, f).unwrap();
            got.push(s);
        }
        assert_eq!(got, path, "{cur} -> {new}");
    }
    // The ERROR guard: these would spin forever in Linux without it.
    assert_eq!(next_state(StopCopy, PreCopy, f).unwrap_err(), EINVAL);
    assert_eq!(next_state(StopCopy, PreCopyP2p, f).unwrap_err(), EINVAL);
}

#[test]
fn driver_arcs_per_flag_set_are_the_spec_lists() {
    assert_eq!(driver_arcs(MigFlags::STOP_COPY).len(), 6);
    assert_eq!(driver_arcs(MigFlags(3)).len(), 8);
    assert_eq!(
        driver_arcs(MigFlags(5)).len(),
        9,
        "hisi_acc: + RUNNING<->PRE_COPY, PRE_COPY->STOP_COPY"
    );
    assert_eq!(driver_arcs(MigFlags(7)).len(), 15);
}

#[test]
fn a_stream_from_an_intermediate_arc_is_an_error() {
    let (leaky, _) = Recorder::new(MigFlags::STOP_COPY, Some((Running, Stop)));
    let dev = MigrationDevice::new("leaky", leaky).unwrap();
    assert_eq!(dev.set_state(StopCopy).unwrap_err(), EINVAL);
    assert_eq!(dev.get_state(), Stop, "left on the path");
}

#[test]
fn undefined_flag_sets_are_refused() {
    for f in [0, 2, 4, 6, 8] {
        assert_eq!(
            MigrationDevice::new("bad", Recorder::new(MigFlags(f), None).0).unwrap_err(),
            EINVAL,
            "flags {f}"
        );
    }
}
