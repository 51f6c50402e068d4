#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing (with sudo unless root), then
# builds regmirror in release mode. Shared by the bench scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --quiet
