#!/usr/bin/env bash
# The side-by-side load bench: installs what it drives (Debian's docker-registry, nginx, wrk,
# curl, skopeo) when missing, builds regmirror in release mode, then runs benches/load.rs, which
# prints a table of medians and ratios. ROUNDS, SIZES_MIB (default 512,2048), LAYERS, LAYER_MIB
# and WRK_SECONDS tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install.sh docker-registry nginx-light wrk curl skopeo
exec cargo bench --quiet --bench load
