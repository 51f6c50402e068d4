#!/usr/bin/env bash
# Runs every test regmirror has: formatting and lints, unit and integration tests, the
# end-to-end tests with real parts (Debian's docker-registry as the origin; skopeo, podman,
# containerd's ctr, dockerd and curl as clients; s3s-fs as the shared store's S3 server), then
# every fuzz target for a bounded time (tests/fuzz.sh). Installs the Debian packages and the
# S3 server those need first, only when they are missing.
# Needs root (or sudo) for the installs and the daemons. Every test binary runs to its end
# (a failure does not hide later ones), and one line sums them up.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install_packages.sh docker-registry skopeo podman containerd docker.io prometheus chromium systemd curl
tests/install_s3_server.sh

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --quiet --no-fail-fast -- --include-ignored 2>&1 | tee "$log" || status=$?
awk '/^test result:/ {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
            if ($(i + 1) ~ /^ignored/) ignored += $i
        }
     }
     END { printf "tests: %d passed, %d failed, %d ignored\n", passed, failed, ignored }' "$log"
[ "$status" -eq 0 ] || exit "$status"
tests/fuzz.sh
