#!/usr/bin/env bash
# Runs every check and test of the project (README command 2; CI runs exactly this).
#
#   1. set-up (scripts/setup.sh: apt packages, Rust toolchain; fast when already done)
#   2. cargo fmt --check
#   3. clippy, -D warnings: host crates; the kernel for x86_64-unknown-none; the kernel's host
#      library tests
#   4. host unit tests: every host crate, and the kernel's library on the host
#   5. kernel + disk images (qemu-run.sh --build-only)
#   6. end-to-end tests: real nodes under QEMU (SVM) and Bochs (VMX): every test binary of the
#      tests crate (tests/tests/*.rs: e2e.rs, vms.rs, ...), then the benchmark figures they
#      wrote to target/bench/. Four benchmarks run alone after the others, so no other emulator
#      competes for the cores: the Linux network baseline (tests/tests/baseline.rs; its report
#      compares with the figures of net.rs), our live-migration benchmark (migration.rs
#      migration_benchmark), then QEMU's own live migration (qemu_migration.rs) throttled to the
#      stream throughput ours measured, then the disk benchmark (disk_bench.rs: the guest's
#      4 KiB disk throughput next to the host's through the iSCSI initiator, same tgtd)
#
# Usage: ./run-tests.sh [--no-e2e] [-- <extra arguments for the e2e test binaries, e.g. a filter>]
# Every step runs even when an earlier one failed (except those that need its output); the exit
# status is non-zero if any step failed. Works unattended: CI=true, no stdin, as root, from a
# fresh clone. E2E_THREADS (default 2) sets how many end-to-end tests run at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

RUN_E2E=1
E2E_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-e2e)
            RUN_E2E=0
            shift
            ;;
        --)
            shift
            E2E_ARGS=("$@")
            break
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run-tests: unknown option $1 (see --help)" >&2
            exit 2
            ;;
    esac
done

START=$SECONDS
STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED=0
LOG_DIR="$(mktemp -d)"
trap 'rm -rf "$LOG_DIR"' EXIT
TEST_LOG="$LOG_DIR/cargo-test.log"
: >"$TEST_LOG"

# step NAME command...: runs one step with a header, records its result and time.
step() {
    local name="$1"
    shift
    local t0=$SECONDS rc=0
    echo
    echo "==> [$((SECONDS - START))s] $name"
    echo "    \$ $*"
    "$@" </dev/null || rc=$?
    local dt=$((SECONDS - t0))
    STEP_NAMES+=("$name")
    STEP_TIMES+=("$dt")
    if ((rc == 0)); then
        STEP_RESULTS+=("ok")
        echo "<== $name: ok (${dt}s)"
    else
        STEP_RESULTS+=("FAILED (exit $rc)")
        FAILED=$((FAILED + 1))
        echo "<== $name: FAILED with exit status $rc (${dt}s)"
    fi
    return $rc
}

skip() {
    STEP_NAMES+=("$1")
    STEP_TIMES+=(0)
    STEP_RESULTS+=("skipped ($2)")
    echo
    echo "==> $1: skipped ($2)"
}

# cargo test, with its output also kept for the closing count.
cargo_test() {
    local rc=0
    cargo test "$@" 2>&1 | tee -a "$TEST_LOG" || rc=$?
    return "$rc"
}

echo "run-tests: $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $ROOT (CI=${CI:-})"

SETUP_OK=1
step "set-up" scripts/setup.sh || SETUP_OK=0
if ((!SETUP_OK)); then
    echo "run-tests: set-up failed; the remaining steps need it" >&2
else
    step "format" cargo fmt --all --check -- --color never || true
    step "clippy (host crates)" cargo clippy --workspace --exclude kernel --all-targets -- -D warnings || true
    step "clippy (kernel, x86_64-unknown-none)" cargo clippy -p kernel --target x86_64-unknown-none -- -D warnings || true
    step "clippy (kernel library, host tests)" cargo clippy -p kernel --lib --tests -- -D warnings || true
    step "unit tests (host crates)" cargo_test --workspace --exclude kernel || true
    step "unit tests (kernel library on the host)" cargo_test -p kernel --lib || true
    IMAGES_OK=1
    step "kernel and images" ./qemu-run.sh --build-only || IMAGES_OK=0
    if ((!RUN_E2E)); then
        skip "end-to-end tests" "--no-e2e"
    elif ((!IMAGES_OK)); then
        skip "end-to-end tests" "no images"
    else
        # Old run directories of failed tests and old figures are from earlier runs: start clean.
        rm -rf "$TARGET_DIR/e2e" "$TARGET_DIR/bench"
        # The images are built: the harness must not build again. Every test binary of the tests
        # crate (--test '*'), each run even if an earlier one failed (--no-fail-fast); 2 tests at
        # a time (2 cores; idle QEMU nodes halt, Bochs always spins). Bounded: the harness bounds
        # every wait, and this bounds the whole.
        step "end-to-end tests" env HV_E2E_NO_BUILD=1 E2E_LOG="$TEST_LOG" E2E_THREADS="${E2E_THREADS:-2}" \
            timeout -k 30 2400 bash -c 'set -o pipefail
                cargo test -p tests --test "*" --no-fail-fast -- --include-ignored \
                    --test-threads "$E2E_THREADS" --skip linux_baseline --skip migration_benchmark \
                    --skip qemu_migration_baseline --skip disk_benchmark "$@" 2>&1 | tee -a "$E2E_LOG"' e2e "${E2E_ARGS[@]}" || true
        # The Linux network baseline (tests/tests/baseline.rs) alone, after net.rs: its report puts
        # the figures net.rs just wrote to target/bench/net-bench.txt next to Linux's.
        step "Linux network baseline" env HV_E2E_NO_BUILD=1 E2E_LOG="$TEST_LOG" \
            timeout -k 30 300 bash -c 'set -o pipefail
                cargo test -p tests --test baseline -- --include-ignored "$@" 2>&1 | tee -a "$E2E_LOG"' \
            baseline "${E2E_ARGS[@]}" || true
        step "live migration benchmark" env HV_E2E_NO_BUILD=1 E2E_LOG="$TEST_LOG" \
            timeout -k 30 600 bash -c 'set -o pipefail
                cargo test -p tests --test migration migration_benchmark -- --include-ignored "$@" 2>&1 | tee -a "$E2E_LOG"' \
            migration-bench "${E2E_ARGS[@]}" || true
        # QEMU's reference migration gets the stream throughput ours reached (default 20 MB/s).
        MIGRATION_MBPS="$(sed -n 's/^reference_bandwidth_mbps=//p' "$TARGET_DIR/bench/migration.txt" 2>/dev/null || true)"
        step "QEMU live migration baseline" env HV_E2E_NO_BUILD=1 E2E_LOG="$TEST_LOG" \
            HV_MIGRATION_BANDWIDTH_MBPS="${MIGRATION_MBPS:-20}" timeout -k 30 600 bash -c 'set -o pipefail
                cargo test -p tests --test qemu_migration -- --include-ignored "$@" 2>&1 | tee -a "$E2E_LOG"' \
            qemu-migration "${E2E_ARGS[@]}" || true
        # The disk benchmark: the guest's 4 KiB throughput and the host initiator's against the
        # same tgtd, in one run (target/bench/disk.txt). --release: the host's initiator must be
        # optimized like the kernel's, or the reference measures the debug build.
        step "disk benchmark" env HV_E2E_NO_BUILD=1 E2E_LOG="$TEST_LOG" \
            timeout -k 30 900 bash -c 'set -o pipefail
                cargo test --release -p tests --test disk_bench disk_benchmark -- --include-ignored "$@" 2>&1 | tee -a "$E2E_LOG"' \
            disk-bench "${E2E_ARGS[@]}" || true
        # Figures printed by benchmark-style tests (e.g. vms.rs bench_verify_in_vm_vs_native).
        for f in "$TARGET_DIR"/bench/*.txt; do
            [[ -f "$f" ]] || continue
            echo "run-tests: benchmark figures from ${f#"$ROOT"/}:"
            sed 's/^/    /' "$f"
        done
        if [[ -d "$TARGET_DIR/e2e" ]] && [[ -n "$(ls -A "$TARGET_DIR/e2e" 2>/dev/null)" ]]; then
            echo "run-tests: logs of failed end-to-end tests are kept in $TARGET_DIR/e2e/"
        fi
    fi
fi

# Summary
passed=0
failed=0
while read -r p f; do
    passed=$((passed + p))
    failed=$((failed + f))
done < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$TEST_LOG")

echo
echo "================================ summary ================================"
for i in "${!STEP_NAMES[@]}"; do
    printf '  %-44s %-22s %5ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}"
done
total=$((SECONDS - START))
printf '  total time: %dm%02ds\n' $((total / 60)) $((total % 60))
if ((FAILED > 0)); then
    echo "run-tests: $FAILED step(s) FAILED"
else
    echo "run-tests: every step passed"
fi
echo "tests: $passed passed, $failed failed"
((FAILED == 0))
