#!/usr/bin/env bash
# Coverage-guided fuzzing of livemig's parsers with AFL++ (through cargo-afl, stable Rust).
#
#   fuzz/run.sh --list               the targets, one per line
#   fuzz/run.sh TARGET SECONDS       fuzz one target for SECONDS
#   fuzz/run.sh --all SECONDS        every target, SECONDS in total split evenly (CI: --all 56)
#   fuzz/run.sh --execs N TARGET     fuzz one target until N executions (the long run),
#                                    with a progress line every minute
#
# Each run prints executions, edges, coverage and crashes. Installs cargo-afl (and builds its
# AFL++) if missing. Starts from the committed seeds in fuzz/corpus/TARGET; findings go to
# fuzz/out/TARGET (not committed). Exits 1 if a crash or a hang was found, naming the files;
# a crash's input belongs in fuzz/regressions/TARGET/ once fixed. Design and the long run's
# figures: docs/fuzzing.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"

targets() { cargo run -q --release -p fuzzing --bin fuzz-targets -- --list; }
usage() {
    echo "usage: fuzz/run.sh --list | TARGET SECONDS | --all SECONDS | --execs N TARGET" >&2
    exit 2
}
number() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }
# Not `grep -q`: it stops reading at the first match, and the lister then dies on a closed pipe.
known() { targets | grep -x -- "$1" >/dev/null || { echo "no fuzz target '$1'; fuzz/run.sh --list names them" >&2; exit 2; }; }

if [ "${1:-}" = "--list" ] && [ $# -eq 1 ]; then
    targets
    exit 0
fi
[ $# -eq 3 ] && [ "$1" = "--execs" ] && number "$2" && known "$3" && mode=execs
[ $# -eq 2 ] && [ "$1" = "--all" ] && number "$2" && mode=all
[ $# -eq 2 ] && [ "$1" != "--all" ] && [ "$1" != "--execs" ] && number "$2" && known "$1" && mode=one
[ -n "${mode:-}" ] || usage

if ! cargo afl --version >/dev/null 2>&1; then
    echo "== installing cargo-afl (AFL++ for stable Rust)"
    cargo install cargo-afl --locked --version 0.18.2
fi
# `afl-fuzz -h` exits 1 even when it is there, so look for its banner instead.
banner="$(cargo afl fuzz -h 2>&1 || true)"
if [[ "$banner" != *"based on afl"* ]]; then
    echo "== building AFL++"
    cargo afl config --build --force
fi

echo "== building the instrumented driver (fuzz/)"
(cd "$here" && cargo afl build --release --locked -q)
bin="$here/target/release/livemig-fuzz"

# Not a tuned fuzzing host: no CPU governor, no core_pattern, maybe no terminal.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
# (AFL_SKIP_BIN_CHECK must stay unset: set to anything, even 0, it turns the fork server
# check off and every seed then "results in a timeout".)
export AFL_NO_AFFINITY=1

stat() { sed -n "s/^$1 *: *//p" "$2" 2>/dev/null; }

# One line of figures; the rate is the run's average, not AFL++'s last-second sample.
report() {
    local t="$1" s="$2"
    local execs secs
    execs="$(stat execs_done "$s")"
    secs="$(stat run_time "$s")"
    printf '%-14s %12s execs in %5s s (%6s/s)  %5s edges (%s of the map)  crashes %s  hangs %s\n' \
        "$t" "$execs" "$secs" "$((execs / (secs > 0 ? secs : 1)))" "$(stat edges_found "$s")" \
        "$(stat bitmap_cvg "$s")" "$(stat saved_crashes "$s")" "$(stat saved_hangs "$s")"
}

# run_one TARGET -V SECONDS | run_one TARGET -E EXECS
run_one() {
    local t="$1" flag="$2" n="$3"
    local corpus="$here/corpus/$t" out="$here/out/$t"
    if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus")" ]; then
        echo "$t: no seeds in $corpus" >&2
        return 1
    fi
    rm -rf "$out"
    mkdir -p "$out"
    # The outer timeout only guards a wedged fuzzer: -V and -E end the run themselves. A
    # long run is given 1 ms per execution, several times what the slowest target needs.
    local guard=$((n + 60))
    [ "$flag" = -E ] && guard=$((n / 1000 + 600))
    local s="$out/default/fuzzer_stats"
    local ticker=""
    if [ "$flag" = -E ]; then
        (while sleep 60; do [ -f "$s" ] && report "$t" "$s"; done) &
        ticker=$!
    fi
    local ok=1
    timeout --kill-after=10 "$guard" \
        cargo afl fuzz "$flag" "$n" -t 1000 -i "$corpus" -o "$out" -- "$bin" "$t" >"$out/log" 2>&1 || ok=0
    [ -z "$ticker" ] || kill "$ticker" 2>/dev/null || true
    if [ $ok = 0 ] || [ ! -f "$s" ]; then
        echo "$t: afl-fuzz failed; its output:" >&2
        tail -30 "$out/log" >&2
        return 1
    fi
    report "$t" "$s"
    if [ "$(stat saved_crashes "$s")" != 0 ] || [ "$(stat saved_hangs "$s")" != 0 ]; then
        echo "$t: reproduce with: cargo run --release -p fuzzing --bin fuzz-targets -- $t FILE" >&2
        ls "$out"/default/crashes/id* "$out"/default/hangs/id* 2>/dev/null >&2 || true
        return 1
    fi
}

case $mode in
one) run_one "$1" -V "$2" ;;
execs) run_one "$3" -E "$2" ;;
all)
    mapfile -t all < <(targets)
    each=$(($2 / ${#all[@]}))
    [ "$each" -gt 0 ] || each=1
    echo "== fuzzing ${#all[@]} targets, ${each} s each"
    start=$SECONDS
    failed=0
    for t in "${all[@]}"; do
        run_one "$t" -V "$each" || failed=1
    done
    echo "== fuzzed ${#all[@]} targets in $((SECONDS - start)) s (wall, with AFL++'s start-up)"
    exit $failed
    ;;
esac
