//! Read-and-clear-dirty on the walker's cursor: the harvest, alone or on every core, and
//! the naive per-IOVA walk kept as the benchmarks' baseline. A child of `walker` so that it
//! can use the cursor, whose table addresses only the walker may produce.

use super::*;
use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::Mutex;

/// Reports and (unless [`DIRTY_NO_CLEAR`]) resets the dirty leaves in `[start, end)`.
///
/// With `skip_unaccessed`, on formats whose table entries have an Accessed bit, subtrees whose
/// table entry has A clear are skipped: the hardware sets A on every level it walks before it
/// sets a leaf's D, so A clear means nothing below was written since A was last cleared.
///
/// Clearing A must not open a window where a walk that already read A=1 sets D after the leaf
/// was scanned, so a clearing harvest runs in phases, as software would on hardware:
/// 1. walk the non-leaf entries, clear A in those the range covers completely and collect the
///    parts of tables to scan (for a skipping walk, only below entries whose A was set);
/// 2. `drain()`: invalidate and wait for in-flight walks (each either finished its D update or
///    will re-set the A bits it finds clear);
/// 3. scan the collected parts for dirty leaves, on several threads when the range is large
///    ([`HarvestParallelism`]).
///
/// Without clearing A (no skip, or `DIRTY_NO_CLEAR`) nothing changes A and there is no drain.
pub(crate) fn read_and_clear_dirty<F: Format>(
    t: &Tables,
    range: std::ops::Range<u64>,
    flags: u32,
    skip_unaccessed: bool,
    par: HarvestParallelism,
    drain: &dyn Fn(),
    out: &mut DirtyBitmap<'_>,
) {
    let (start, end) = (range.start, range.end);
    let clear = flags & DIRTY_NO_CLEAR == 0;
    let skip = skip_unaccessed && F::TABLE_ACCESSED;
    let clear_a = skip && clear;
    let root = Level::<F>::root(t, start, end);
    let pages = (end.saturating_sub(start) >> PAGE_SHIFT) as usize;
    let threads = if pages >= par.min_entries { par.threads() } else { 1 };
    fn job_of<'t, F: Format>(j: Level<'t, F>, skip: bool, clear_a: bool, start: u64, end: u64) -> Vec<Level<'t, F>> {
        let mut w = Vec::new();
        collect(j, 0, skip, clear_a, start, end, &mut w);
        w
    }
    let job = |j| job_of(j, skip, clear_a, start, end);
    // With several threads, the levels above the 1 GiB tables are walked here (a few
    // entries) and the tables below are the threads' jobs; with one job or one thread,
    // everything is walked here.
    let mut work = Vec::new();
    collect(
        root,
        if threads > 1 { 1 } else { 0 },
        skip,
        clear_a,
        start,
        end,
        &mut work,
    );
    let per_job = par.tables_per_job.max(1);
    if threads > 1 && work.len() > per_job {
        // Jobs of a few 1 GiB tables: enough of them to balance the threads, few enough that
        // per-job costs stay small when most tables hold one dirty run.
        let jobs: Vec<Vec<_>> = work.chunks(per_job).map(<[_]>::to_vec).collect();
        let threads = threads.min(jobs.len());
        let restore = || restore_accessed(root);
        let pass = Pass { start, end, clear };
        return harvest_parallel(jobs, job, threads, clear_a.then_some(drain), &restore, pass, out);
    }
    if threads > 1 {
        work = work.into_iter().flat_map(job).collect();
    }
    if clear_a {
        drain();
    }
    let mut h = Harvest::new(start, end, clear, out);
    work.into_iter().for_each(|seg| h.scan(seg));
    h.flush();
}

/// What every thread of a parallel harvest needs to know of the request.
#[derive(Clone, Copy)]
struct Pass {
    start: u64,
    end: u64,
    clear: bool,
}

/// Sets A again in every table entry under `it`: after a failed collect, a subtree whose A
/// was cleared but whose leaves were never scanned must not be skipped by the next harvest.
fn restore_accessed<F: Format>(it: Level<'_, F>) {
    for s in it {
        if let Pte::Table { .. } = s.kind {
            let e = it.entry(s.idx);
            e.store(F::table_set_accessed(e.load(Ordering::Relaxed)), Ordering::Release);
            restore_accessed(it.descend(&s));
        }
    }
}

const WAIT: u8 = 0;
const SCAN: u8 = 1;
const ABORT: u8 = 2;

/// Sets a parallel harvest's phase to `ABORT` if the thread holding it unwinds, so that no
/// helper waits for a phase that will not come or scans on for a caller that is gone.
struct AbortOnUnwind<'a>(&'a AtomicU8);

impl Drop for AbortOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(ABORT, Ordering::Release);
        }
    }
}

/// Phases 1 to 3 on several threads, each taking jobs in turn (a slow thread takes fewer):
/// 1. each job (a few 1 GiB tables, or parts of tables above) is collected into a list of
///    parts to scan, clearing A below it;
/// 2. once every job is collected, this thread drains, and only then may anyone scan;
/// 3. each job's list is scanned. Reports must reach `out` in IOVA order and only this
///    thread holds `out`: a list this thread takes when every earlier one is reported is
///    scanned straight into `out`; any other is scanned into a buffer (coalesced runs), which
///    this thread replays in order as soon as it can, while the helpers go on scanning.
///
/// Nothing here can hang: phases are flags, not barriers, so a helper that could not be
/// started is simply absent; a panic in a job is caught, recorded and raised again here
/// after the threads are joined. A collect that panicked may have cleared A above leaves
/// nobody scanned, so then nothing is scanned, A is set again everywhere in the range (the
/// next harvest reads every leaf), and D stays as it was: nothing is lost.
fn harvest_parallel<'t, F: Format>(
    jobs: Vec<Vec<Level<'t, F>>>,
    job: impl Fn(Level<'t, F>) -> Vec<Level<'t, F>> + Sync,
    threads: usize,
    drain: Option<&dyn Fn()>,
    restore: &dyn Fn(),
    pass: Pass,
    out: &mut DirtyBitmap<'_>,
) {
    let n = jobs.len();
    if n == 0 {
        return;
    }
    let Pass { start, end, clear } = pass;
    let lists: Vec<Mutex<Vec<Level<'t, F>>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
    let slots: Vec<Mutex<Option<Scanned>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let (next_a, next_b, collected) = (AtomicUsize::new(0), AtomicUsize::new(1), AtomicUsize::new(0));
    let phase = AtomicU8::new(WAIT);
    let panic: Mutex<Option<Box<dyn std::any::Any + Send>>> = Mutex::new(None);
    let failed = |p: Box<dyn std::any::Any + Send>| {
        phase.store(ABORT, Ordering::Release);
        lock(&panic).get_or_insert(p);
    };
    let collect_jobs = || loop {
        let i = next_a.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            jobs[i].iter().flat_map(|&j| job(j)).collect::<Vec<_>>()
        }));
        match r {
            Ok(list) => *lock(&lists[i]) = list,
            Err(p) => failed(p),
        }
        collected.fetch_add(1, Ordering::AcqRel);
    };
    let scan_into = |i: usize, o: &mut DirtyBitmap<'_>| {
        let list = std::mem::take(&mut *lock(&lists[i]));
        let mut h = Harvest::new(start, end, clear, o);
        list.into_iter().for_each(|seg| h.scan(seg));
        h.flush();
    };
    let scan_buffered = |i: usize| {
        let (mut buf, mut gather) = (Buffered::default(), IotlbGather::new());
        scan_into(
            i,
            &mut DirtyBitmap {
                bitmap: Some(&mut buf),
                gather: Some(&mut gather),
            },
        );
        *lock(&slots[i]) = Some((buf, gather));
    };
    std::thread::scope(|sc| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        for k in 1..threads {
            let tx = tx.clone();
            let (phase, collect_jobs, scan_buffered, next_b, failed) =
                (&phase, &collect_jobs, &scan_buffered, &next_b, &failed);
            let helper = move || {
                collect_jobs();
                while phase.load(Ordering::Acquire) == WAIT {
                    std::thread::yield_now();
                }
                while phase.load(Ordering::Acquire) == SCAN {
                    let i = next_b.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scan_buffered(i))) {
                        failed(p);
                    }
                    let _ = tx.send(());
                }
            };
            // A helper the system will not start is one fewer: the jobs wait for whoever runs.
            let _ = std::thread::Builder::new()
                .name(format!("harvest-{k}"))
                .spawn_scoped(sc, helper);
        }
        drop(tx);
        let _abort = AbortOnUnwind(&phase);
        collect_jobs();
        while collected.load(Ordering::Acquire) < n {
            std::thread::yield_now();
        }
        if phase.load(Ordering::Acquire) == ABORT {
            restore();
            return;
        }
        if let Some(drain) = drain {
            drain();
        }
        phase.store(SCAN, Ordering::Release);
        // Job 0 is this thread's, so that reports can start straight away.
        scan_into(0, out);
        let mut reported = 1;
        while reported < n && phase.load(Ordering::Acquire) == SCAN {
            if let Some((buf, gather)) = lock(&slots[reported]).take() {
                if let Some(b) = out.bitmap.as_deref_mut() {
                    for r in buf.0 {
                        b.record_leaf(r[0], r[1], r[2], r[3]);
                    }
                }
                if let (Some(g), false) = (out.gather.as_deref_mut(), gather.is_empty()) {
                    g.add_range(gather.start, gather.end - gather.start);
                }
                reported += 1;
                continue;
            }
            let i = next_b.fetch_add(1, Ordering::Relaxed);
            if i == reported {
                scan_into(i, out);
                reported += 1;
            } else if i < n {
                scan_buffered(i);
            } else {
                // Wait for a helper's next job; bounded, so an aborted pass is seen.
                let _ = rx.recv_timeout(std::time::Duration::from_millis(10));
            }
        }
    });
    let raised = lock(&panic).take();
    if let Some(p) = raised {
        std::panic::resume_unwind(p);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while a slot was held is raised again by the scope; the slot itself holds
    // no half-made invariant.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A chunk scanned into a buffer: its reports and the range its cleaning made stale.
type Scanned = (Buffered, IotlbGather);

/// How a harvest spreads over the cores. The unit of parallel work is one 1 GiB table's part
/// of the range (the levels above are walked by the calling thread), so a range within one
/// 1 GiB table is scanned by one thread whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HarvestParallelism {
    /// Threads for a large harvest; 0 means one per core, at most eight.
    pub threads: usize,
    /// 4 KiB pages the requested range must span before a harvest uses several threads.
    pub min_entries: usize,
    /// 1 GiB tables per unit of parallel work; a harvest with no more than this many stays
    /// on one thread. Tests set 1 to run the parallel path on small ranges.
    pub tables_per_job: usize,
}

impl HarvestParallelism {
    /// The measured threshold (`livemig bench harvest --threshold`, docs/benchmarks.md): on
    /// this 2-core host starting and joining a helper costs 0.1–0.2 ms, and at 1 % dirt the
    /// cores win from 12 GiB of 4 KiB-mapped IOVA (0.78× one thread), where a harvest first
    /// has more than eight 1 GiB tables of work; up to 8 GiB one thread is as fast.
    pub const MIN_ENTRIES: usize = 1 << 21;

    /// One thread, always.
    pub const SERIAL: Self = Self {
        threads: 1,
        min_entries: usize::MAX,
        tables_per_job: 8,
    };

    /// Several threads whatever the size: for tests of the parallel path.
    pub const fn forced(threads: usize) -> Self {
        Self {
            threads,
            min_entries: 0,
            tables_per_job: 1,
        }
    }

    fn threads(&self) -> usize {
        match self.threads {
            0 => {
                // Asked once: the answer reads cgroup files, which costs tens of microseconds.
                static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
            }
            // Beyond this, threads only cost: the work is divided in 1 GiB tables.
            n => n.min(64),
        }
    }
}

impl Default for HarvestParallelism {
    fn default() -> Self {
        Self {
            threads: 0,
            min_entries: Self::MIN_ENTRIES,
            tables_per_job: 8,
        }
    }
}

/// What a helper thread found, replayed into the caller's recorder after the join.
#[derive(Default)]
struct Buffered(Vec<[u64; 4]>);

impl RecordDirty for Buffered {
    fn record(&mut self, iova: u64, len: u64) {
        self.0.push([iova, len, iova, len]);
    }
    fn record_leaf(&mut self, iova: u64, len: u64, leaf: u64, leaf_len: u64) {
        self.0.push([iova, len, leaf, leaf_len]);
    }
}

/// Phase 1: clears A in fully covered table entries (when `clear_a`) and lists, in IOVA order,
/// the parts of tables at any level to scan for leaves: runs of entries between the table
/// entries it descends into, descending through entries whose A was set (or all, without
/// `skip`).
#[allow(clippy::too_many_arguments)]
fn collect<'t, F: Format>(
    mut it: Level<'t, F>,
    stop: usize,
    skip: bool,
    clear_a: bool,
    start: u64,
    end: u64,
    work: &mut Vec<Level<'t, F>>,
) {
    if it.level <= stop {
        work.push(it);
        return;
    }
    let (lo, hi) = (it.lo, it.hi);
    let mut seg_lo = lo;
    loop {
        // Most table entries of a sparse harvest are untouched: pass them without a decode,
        // eight at a time where they are aligned (the 1 TiB clustered harvest reads 512 such
        // tables; one entry at a time they cost as much as the dirty leaves).
        if skip && it.idx & 7 == 0 && it.idx + 8 <= it.end {
            let block: [u64; 8] = std::array::from_fn(|j| it.table.load(it.idx + j));
            if F::untouched_tables(&block, it.level) {
                let iova = it.base + ((it.idx as u64) << level_shift(it.level));
                if iova > seg_lo {
                    work.push(it.narrow(seg_lo, iova));
                }
                seg_lo = (iova + 8 * span(it.level)).min(hi);
                it.idx += 8;
                continue;
            }
        }
        if skip && it.idx < it.end && F::untouched_table(it.table.load(it.idx), it.level) {
            let iova = it.base + ((it.idx as u64) << level_shift(it.level));
            if iova > seg_lo {
                work.push(it.narrow(seg_lo, iova));
            }
            seg_lo = (iova + span(it.level)).min(hi);
            it.idx += 1;
            continue;
        }
        let Some(s) = it.next() else { break };
        if !matches!(s.kind, Pte::Table { .. }) {
            continue;
        }
        if s.iova > seg_lo {
            work.push(it.narrow(seg_lo, s.iova));
        }
        seg_lo = s.end().min(hi);
        if !skip {
            collect(it.descend(&s), stop, skip, clear_a, start, end, work);
            continue;
        }
        let entry = it.entry(s.idx);
        let pte = entry.load(Ordering::Relaxed);
        if F::table_accessed(pte) {
            if clear_a && start <= s.iova && s.end() <= end {
                // A plain store, not a locked read-modify-write (measured: the lock prefix made
                // phase 1 of a 64 GiB harvest cost 1 ms). Hardware changes a table entry only
                // by setting A, which is set here, and software holds the structural lock, so
                // nothing can change between the load and the store. Ordering against
                // in-flight walks is the drain's: its SeqCst fence after this store, against
                // the fence each access makes after announcing itself, means either the drain
                // waits for the walk or the walk reads A clear and sets it again.
                entry.store(F::table_clear_accessed(pte), Ordering::Release);
            }
            collect(it.descend(&s), stop, skip, clear_a, start, end, work);
        }
    }
    if hi > seg_lo {
        work.push(it.narrow(seg_lo, hi));
    }
}

/// Phase 3 for one thread: scans leaves and reports them, whole leaves inside the range
/// coalesced into runs (a recorder sets a run's bits at once).
struct Harvest<'a, 'b> {
    start: u64,
    end: u64,
    clear: bool,
    out: &'a mut DirtyBitmap<'b>,
    /// Whole dirty leaves not yet reported.
    run: Run,
}

/// A run of adjacent whole dirty leaves, `[lo, hi)`; empty when `hi <= lo`.
#[derive(Clone, Copy, Default)]
struct Run {
    lo: u64,
    hi: u64,
}

impl Run {
    /// Adds `[iova, iova + len)`; returns the run it ends, if it does not extend it.
    #[inline(always)]
    fn extend(&mut self, iova: u64, len: u64) -> Option<Run> {
        if self.hi == iova && self.hi > self.lo {
            self.hi += len;
            return None;
        }
        let done = std::mem::replace(
            self,
            Run {
                lo: iova,
                hi: iova + len,
            },
        );
        (done.hi > done.lo).then_some(done)
    }
}

impl<'a, 'b> Harvest<'a, 'b> {
    fn new(start: u64, end: u64, clear: bool, out: &'a mut DirtyBitmap<'b>) -> Self {
        Self {
            start,
            end,
            clear,
            out,
            run: Run::default(),
        }
    }

    fn report(&mut self, r: Run) {
        self.out.record_leaf(r.lo, r.hi - r.lo, self.start, self.end);
    }

    /// Reports the pending run.
    fn flush(&mut self) {
        let r = std::mem::take(&mut self.run);
        if r.hi > r.lo {
            self.report(r);
        }
    }

    #[inline(always)]
    fn dirty_leaf(&mut self, iova: u64, len: u64) {
        if self.start <= iova && iova + len <= self.end {
            if let Some(done) = self.run.extend(iova, len) {
                self.report(done);
            }
        } else {
            // Part of the leaf lies outside: the recorder must hear its extent.
            self.flush();
            self.out.record_leaf(iova, len, self.start, self.end);
        }
    }

    /// Write-cleans one dirty entry. A plain store, as generic_pt's make_write_clean: hardware
    /// never changes an entry that is already dirty (A/AF are set with D), so no update can
    /// be lost; writes that still use a cached "dirty" state are ordered by the caller's IOTLB
    /// flush, which drains them.
    #[inline(always)]
    fn clean<F: Format>(&self, e: &AtomicU64, v: u64) {
        if self.clear {
            e.store(F::clean(v), Ordering::Relaxed);
        }
    }

    /// Scans the leaves a part of one table holds (tables below it are phase 1's business).
    fn scan<F: Format>(&mut self, it: Level<'_, F>) {
        if it.level == 0 {
            return self.scan_leaf_table(it);
        }
        for s in it {
            if matches!(s.kind, Pte::Leaf { .. }) {
                self.scan_leaf(&it, &s);
            }
        }
    }

    /// One leaf: any replica may carry the dirt.
    fn scan_leaf<F: Format>(&mut self, it: &Level<'_, F>, s: &Slot) {
        let mut dirty = false;
        for e in it.entries(s) {
            let v = e.load(Ordering::Relaxed);
            if F::is_dirty(v) {
                dirty = true;
                self.clean::<F>(e, v);
            }
        }
        if dirty {
            self.dirty_leaf(s.iova, s.len);
        }
    }

    /// The hot loop: a leaf table's 4 KiB entries, which need no decode. Blocks of eight are
    /// tested at once (most are clean at low dirt); a contiguous leaf falls back to the slot.
    #[inline(always)]
    fn scan_leaf_table<F: Format>(&mut self, mut it: Level<'_, F>) {
        let table = it.table;
        let (mut idx, mut end) = (it.idx, it.end);
        // A contiguous leaf the range cuts may carry its dirt in a replica outside the range,
        // which the loop below never reads: the edges go through the slot, which reads all.
        // Only a cut table has such edges (a leaf never straddles a table), so a whole table
        // skips the test and its read of the table's last line ahead of the stream.
        if idx > 0 && idx < end && F::is_contig(table.load(idx), 0) {
            let s = it.slot(idx);
            if s.idx < idx {
                self.scan_leaf(&it, &s);
                idx = s.idx + s.n;
            }
        }
        let mut tail = None;
        if end < ENTRIES && idx < end && F::is_contig(table.load(end - 1), 0) {
            let s = it.slot(end - 1);
            if s.idx + s.n > end {
                end = s.idx.max(idx);
                tail = Some(s);
            }
        }
        // The run of dirty pages lives in locals here (the hot path at high dirt): through
        // `self` every page would reload it, since `self.out` might alias it.
        let clear = self.clear;
        let base = it.base;
        let mut run = std::mem::take(&mut self.run);
        while idx < end {
            if idx & 7 == 0 && idx + 8 <= end {
                if F::none_dirty(&std::array::from_fn(|j| table.load(idx + j))) {
                    idx += 8;
                    continue;
                }
                // Read again (from L1) rather than kept: holding eight entries across the test
                // above spilled registers in the clean-block path, the hot one at low dirt.
                let block: [u64; 8] = std::array::from_fn(|j| table.load(idx + j));
                if block
                    .iter()
                    .fold(true, |all, &v| all & F::is_dirty(v) & !F::is_contig(v, 0))
                {
                    // Plain stores, as in `Harvest::clean`.
                    if clear {
                        for (j, &v) in block.iter().enumerate() {
                            table.entry(idx + j).store(F::clean(v), Ordering::Relaxed);
                        }
                    }
                    if let Some(done) = run.extend(base + ((idx as u64) << PAGE_SHIFT), 8 * PAGE_SIZE) {
                        self.report(done);
                    }
                    idx += 8;
                    continue;
                }
            }
            let e = table.entry(idx);
            let v = e.load(Ordering::Relaxed);
            if F::is_dirty(v) {
                if F::is_contig(v, 0) {
                    self.run = run;
                    it.skip_to(idx);
                    let s = it.next().expect("an entry in range");
                    self.scan_leaf(&it, &s);
                    idx = it.idx;
                    run = std::mem::take(&mut self.run);
                    continue;
                }
                if clear {
                    e.store(F::clean(v), Ordering::Relaxed);
                }
                if let Some(done) = run.extend(base + ((idx as u64) << PAGE_SHIFT), PAGE_SIZE) {
                    self.report(done);
                }
            }
            idx += 1;
        }
        self.run = run;
        if let Some(s) = tail {
            self.scan_leaf(&it, &s);
        }
    }
}

/// The Linux ≤ 6.x AMD and Intel algorithm, kept as the benchmark's naive baseline: for every
/// IOVA, walk from the root (`fetch_pte`), test-and-clear, advance by the leaf size.
pub(crate) fn read_and_clear_dirty_naive<F: Format>(
    t: &Tables,
    start: u64,
    end: u64,
    flags: u32,
    out: &mut DirtyBitmap<'_>,
) {
    // Written as the drivers write it (a table pointer and an index per level, no cursor),
    // so that the baseline costs what it costs in Linux.
    let clear = flags & DIRTY_NO_CLEAR == 0;
    let mut iova = start;
    while iova < end {
        let mut tp = t.root;
        let mut step = PAGE_SIZE;
        for level in (0..LEVELS).rev() {
            // SAFETY: `tp` is the root or was read from a present table entry while the
            // caller borrows `Tables` (the structural lock), so the arena has not reclaimed it.
            let table = unsafe { t.arena.table(tp) };
            let idx = index(iova, level);
            match F::decode(table.load(idx), level) {
                Pte::Empty => {
                    step = span(level) - (iova & (span(level) - 1));
                    break;
                }
                Pte::Table { pa } => tp = pa,
                Pte::Leaf { size_lg2, .. } => {
                    let n = num_contig(size_lg2, level);
                    let first = idx & !(n - 1);
                    let mut dirty = false;
                    for j in first..first + n {
                        let e = table.entry(j);
                        let v = e.load(Ordering::Acquire);
                        if F::is_dirty(v) {
                            dirty = true;
                            if clear {
                                let _ = e.compare_exchange(v, F::clean(v), Ordering::AcqRel, Ordering::Acquire);
                            }
                        }
                    }
                    let sz = 1u64 << size_lg2;
                    let lb = iova & !(sz - 1);
                    if dirty {
                        out.record_leaf(lb, sz, start, end);
                    }
                    step = lb + sz - iova;
                    break;
                }
            }
        }
        iova = iova.saturating_add(step);
    }
}
