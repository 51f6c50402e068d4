#!/usr/bin/env bash
# The side-by-side load bench: installs what it drives (Debian's docker-registry, nginx, wrk,
# curl, skopeo) when missing, builds regmirror in release mode, then runs benches/load.rs, which
# prints a table of medians and ratios. ROUNDS, SIZES_MIB (default 512,2048), LAYERS, LAYER_MIB
# and WRK_SECONDS tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for package in docker-registry nginx-light wrk curl skopeo; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --quiet
exec cargo bench --quiet --bench load
