#!/usr/bin/env bash
# Fuzz smoke run for CI (.ci/run calls it): builds every cargo-fuzz target with the nightly
# toolchain, makes the seed corpora (fuzz/seeds.sh), and runs each target for a short time
# with -rss_limit_mb=1024 -timeout=2, so a crash, an out-of-memory or a hang on the seeds or on
# what libFuzzer finds in a few seconds fails CI. Prints one summary line per target. Exits
# non-zero on any finding (its input is under fuzz/artifacts/<target>/).
#
# The long coverage runs are not this: see FUZZING.md. The regression replay of every past
# find runs on stable in the ordinary `cargo test` (formats/tests/regression.rs).
#
# Environment:
#   FUZZ_SMOKE_SECONDS      seconds per target (default 20)
#   FUZZ_SMOKE_TARGETS      space-separated subset of targets (default: all)
#   FUZZ_SMOKE_INSTALL=0    do not install cargo-fuzz when it is missing (default: install;
#                           about 1.5-3 minutes on 2 cores, see FUZZING.md)
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz=$root/fuzz
secs=${FUZZ_SMOKE_SECONDS:-20}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz-smoke: NOT RUN: no nightly toolchain (cargo +nightly); the regression replay still runs in cargo test"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    if [ "${FUZZ_SMOKE_INSTALL:-1}" = 0 ]; then
        echo "fuzz-smoke: NOT RUN: cargo-fuzz is missing and FUZZ_SMOKE_INSTALL=0"
        exit 0
    fi
    echo "fuzz-smoke: installing cargo-fuzz from crates.io"
    # An install failure is the environment, not the code: report it and skip.
    cargo install --locked cargo-fuzz || { echo "fuzz-smoke: NOT RUN: cargo-fuzz install failed" >&2; exit 0; }
fi

cd "$fuzz" || exit 2
targets=${FUZZ_SMOKE_TARGETS:-$(cargo +nightly fuzz list)}

echo "fuzz-smoke: $(cargo +nightly fuzz --version), $(rustc +nightly --version)"
start=$SECONDS
cargo +nightly fuzz build || { echo "fuzz-smoke: build failed" >&2; exit 2; }
echo "fuzz-smoke: built all targets in $((SECONDS - start)) s"

start=$SECONDS
./seeds.sh >/dev/null || { echo "fuzz-smoke: seeds.sh failed" >&2; exit 2; }
echo "fuzz-smoke: made seed corpora in $((SECONDS - start)) s"

# ASan holds freed memory in a 256 MiB quarantine by default, which counts toward the RSS
# limit: with glimpse's allocations of up to 224 MiB per input, the check and reader targets
# reached 900+ MB of RSS in 40 s and would fail a longer run on memory that is already free.
# 64 MiB still catches use-after-free of recent allocations (measured: 635 MB instead of 927).
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=64}
bin=$fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
logs=$fuzz/target/smoke-logs
mkdir -p "$logs"
failed=0
for t in $targets; do
    # Inputs bigger than max_len are cut when loaded. 1 MiB holds every format's metadata in
    # the seeds except VHDX, whose qemu-made metadata ends at 4 MiB.
    case $t in
        vhdx) max_len=4194304 ;;
        *) max_len=1048576 ;;
    esac
    mkdir -p "artifacts/$t"
    "$bin/$t" "corpus/$t" -rss_limit_mb=1024 -timeout=2 -max_total_time="$secs" -max_len="$max_len" \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$logs/$t.log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$logs/$t.log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        status=ok
    else
        status="FAILED (exit $rc)"
        failed=1
    fi
    printf 'fuzz-smoke: %-18s %-16s %ss execs=%s %s rss=%sMB\n' "$t" "$status" "$secs" "${execs:-?}" "${cov:-cov: ? ft: ?}" "${rss:-?}"
    if [ "$rc" -ne 0 ]; then
        # The line after "panicked at" is the panic message.
        grep -E -A1 'ERROR: libFuzzer|panicked at|SUMMARY|Test unit written to' "$logs/$t.log" | grep -v '^--$' | head -8 | sed 's/^/    /'
    fi
done
exit $failed
