#!/bin/sh
# Bounded fuzz run of every target: FUZZ_SECONDS each (default 30).
# Needs a nightly toolchain and cargo-fuzz (cargo install --locked cargo-fuzz).
# A crash leaves its input under fuzz/artifacts/<target>/ and fails the run.
set -eu
cd "$(dirname "$0")"
secs="${FUZZ_SECONDS:-30}"
for target in post_receive envelope glob agent_file; do
    echo "fuzzing $target for ${secs}s"
    nice -n 15 cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536
done
