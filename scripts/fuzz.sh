#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: builds the libFuzzer
# targets in fuzz/ with sanitizer-coverage codegen flags (all `-C`, no
# nightly; see README "Fuzzing"), then runs each target for a bounded time
# on its committed corpus. A crash (a panic, a failed property, a timeout
# or running out of memory) fails the run and leaves its input in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (20) each
#   scripts/fuzz.sh names config    # just these
#   FUZZ_SECONDS=600 scripts/fuzz.sh upstream_stream
#
# New inputs that raise coverage go to fuzz/target/corpus/<target>/ (not
# committed); copy the ones worth keeping into fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-20}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sse_encoder upstream_stream token_extraction event_ids names config)
host=$(rustc -vV | sed -n 's/^host: //p')

# What cargo-fuzz passes, less `-Zsanitizer` (nightly only; Rust without
# `unsafe` needs no AddressSanitizer to find panics): the sancov pass with
# inline 8-bit counters, the PC table and comparison tracing, which is the
# coverage feedback libFuzzer needs. `--target` keeps these flags off build
# scripts and proc macros, which run in the compiler and have no libFuzzer
# to link against.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
# FUZZ_PROFILE=quick (the test command's) compiles faster and runs slower.
profile=${FUZZ_PROFILE:-release}
cargo build --profile "$profile" --locked --target "$host" "${bins[@]}"

for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "artifacts/$t"
    log="target/fuzz-$t.log"
    printf '==> fuzz %s for %ss\n' "$t" "$seconds"
    # The first corpus directory receives new inputs; the committed one is
    # only read. One job, so the two cores stay shared with the rest.
    if ! "target/$host/$profile/$t" "target/corpus/$t" "corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz: $t crashed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    printf 'fuzz: %s: %s runs in %ss, %s, corpus %s (%s committed), 0 crashes\n' "$t" "$execs" "$seconds" \
        "$cov" "$(ls "target/corpus/$t" | wc -l)" "$(ls "corpus/$t" | wc -l)"
done
