#!/usr/bin/env bash
# Runs every test regmirror has: formatting and lints, unit and integration tests, the
# end-to-end tests with real parts (Debian's docker-registry as the origin; skopeo, podman,
# containerd's ctr and dockerd as clients), then every fuzz target for a bounded time
# (tests/fuzz.sh). Installs the Debian packages those need first, only when they are missing. Needs root (or sudo) for the installs and the daemons.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install_packages.sh docker-registry skopeo podman containerd docker.io prometheus chromium systemd

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet -- --include-ignored
tests/fuzz.sh
