#!/usr/bin/env bash
# Installs s3s-fs, the S3-compatible server the shared store's tests run on loopback (a small
# server over a directory, from the s3s project), unless it is already there. About two
# minutes on a 2-core machine. 0.14.1: later versions need a newer rustc than this toolchain.
set -euo pipefail
if command -v s3s-fs >/dev/null || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
    exit 0
fi
echo "installing: s3s-fs"
cargo install --quiet s3s-fs@0.14.1 --features binary --locked
