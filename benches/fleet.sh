#!/usr/bin/env bash
# The fleet bench: installs what it drives (Debian's docker-registry, nginx, s3s-fs) when
# missing, builds regmirror in release mode, then runs benches/fleet.rs, which prints a table of
# medians and ratios. ROUNDS, CLIENTS, LAYERS and LAYER_MIB tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install.sh docker-registry nginx-light curl
tests/install_s3_server.sh
exec cargo bench --quiet --bench fleet
