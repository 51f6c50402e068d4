#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing (with sudo unless root), then
# builds regmirror in release mode. Shared by the bench scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/install_packages.sh "$@"
cargo build --release --quiet
