#!/usr/bin/env bash
# Large layers, one client: installs what it drives (Debian's docker-registry, nginx, curl) when
# missing, builds regmirror in release mode, then runs benches/large.rs. ROUNDS (default 5) and
# SIZES_MIB (default 512,2048,4096), SUBJECTS (a comma list) and MEMORY (warm or cold: the free
# memory each cold fill writes into) tune it; BASELINE=path/to/another/regmirror adds it as the
# subject `baseline` (name it in SUBJECTS) for a paired A/B of a change.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install.sh docker-registry nginx-light curl
exec cargo bench --quiet --bench large
