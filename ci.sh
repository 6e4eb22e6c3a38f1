#!/usr/bin/env bash
# Installs what is missing, then runs every check and test of the workspace:
# formatting, clippy with -D warnings, all tests (unit, property, integration, KVM, TCP), and
# a one-minute smoke of every fuzz target under AFL++ (fuzz/run.sh, docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '\n== %s\n' "$*"; }

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v make >/dev/null 2>&1 || need_apt+=(make) # AFL++ is built from source by cargo-afl
# ip and tc make the two-host tests' network namespaces, veth pair and shaped links.
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || need_apt+=(iproute2)
# The sweep's charts need a TrueType font for their text (crates/livemig/src/sweep_charts.rs).
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed; install a stable Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "installing $comp"
        rustup component add "$comp"
    fi
done

# Tests that need KVM must run for real wherever /dev/kvm exists, and the two-host tests
# wherever we are root (network namespaces need CAP_NET_ADMIN).
if [ -e /dev/kvm ]; then
    export LIVEMIG_REQUIRE_KVM=1
fi
if [ "$(id -u)" = 0 ]; then
    export LIVEMIG_REQUIRE_NETNS=1
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test (release: the KVM, stress and TCP tests are timing-sensitive)"
# The tests that need KVM say so on a line of their own when they skip (vmm::need_kvm!);
# count them so a skip never reads as a pass.
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --release 2>&1 | tee "$test_log"
skipped="$(grep -c '^SKIPPED (needs KVM)' "$test_log" || true)"
skipped_net="$(grep -c '^SKIPPED (needs network namespaces)' "$test_log" || true)"
if [ "$skipped" -gt 0 ] || [ "$skipped_net" -gt 0 ]; then
    log "$skipped test(s) SKIPPED for want of /dev/kvm, $skipped_net for want of network namespaces (names above)"
else
    log "no test skipped"
fi

log "benchmarks build"
cargo build --workspace --release --benches

log "the README's first command resolves to livemig"
cargo run --release -q -- --version

log "fuzz smoke: every target under AFL++, 56 s in total (installs cargo-afl if missing)"
./fuzz/run.sh --all 56

log "all checks passed"
