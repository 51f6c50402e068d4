#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS each, default 15) from the
# committed seed corpus (fuzz/corpus/<target>), and prints how many inputs each one ran.
# New corpus entries go to target/fuzz-corpus, never into the repository. A crash fails the run
# and leaves the input in fuzz/artifacts/<target>/ (add it to the seed corpus once fixed).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-15}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2 --quiet
fi
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo fuzz build --sanitizer none --debug-assertions

summary=()
for target in $(cargo fuzz list); do
    corpus="target/fuzz-corpus/$target"
    mkdir -p "$corpus"
    log="target/fuzz-corpus/$target.log"
    if ! cargo fuzz run --sanitizer none --debug-assertions "$target" "$corpus" "fuzz/corpus/$target" \
        -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $target failed" >&2
        exit 1
    fi
    summary+=("$(printf '%-18s %s' "$target" "$(grep -m1 '^Done' "$log")")")
done
printf 'fuzzing, %s s per target:\n' "$seconds"
printf '  %s\n' "${summary[@]}"
