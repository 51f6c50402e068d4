#!/usr/bin/env bash
# Large layers, one client: installs what it drives (Debian's docker-registry, nginx, curl) when
# missing, builds regmirror in release mode, then runs benches/large.rs. ROUNDS (default 5) and
# SIZES_MIB (default 512,2048) tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install.sh docker-registry nginx-light curl
exec cargo bench --quiet --bench large
