#!/usr/bin/env bash
# Prefetch over a distant upstream: an origin (Debian's docker-registry) behind nginx limiting
# each connection to RATE (default 10m, bytes per second: a far-away CDN, where one connection
# does not get the whole link), an image of LAYERS x LAYER_MIB random layers (default 10 x 32),
# and a cold pull of it by skopeo, and by a client asking for three blobs at a time (dockerd),
# through regmirror with cache.prefetch_downloads = 4 and = 0, and straight from the limited
# origin; ROUNDS rounds (default 2). Prints wall times in ms. Installs what it drives when
# missing; builds regmirror in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
benches/install.sh docker-registry nginx-light curl skopeo python3
bin="$PWD/target/release/regmirror"
rounds=${ROUNDS:-2} layers=${LAYERS:-10} layer_mib=${LAYER_MIB:-32} rate=${RATE:-10m}

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do curl -sf -o /dev/null "$1" && return; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

origin_port=$(free_port) limited_port=$(free_port) mirror_port=$(free_port)
cat >"$work/origin.yml" <<EOF
version: 0.1
storage: { filesystem: { rootdirectory: $work/origin } }
http: { addr: 127.0.0.1:$origin_port }
log: { level: error }
EOF
docker-registry serve "$work/origin.yml" >"$work/origin.log" 2>&1 &
pids+=($!)
mkdir -p "$work/nginx"
# Workers run as root (when the bench does) to write their buffers under the private work dir.
cat >"$work/nginx.conf" <<EOF
user root;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  server {
    listen 127.0.0.1:$limited_port;
    location / {
      proxy_pass http://127.0.0.1:$origin_port;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      limit_rate $rate;
    }
  }
}
EOF
nginx -c "$work/nginx.conf"
wait_up "http://127.0.0.1:$origin_port/v2/"
wait_up "http://127.0.0.1:$limited_port/v2/"

# The image: an OCI layout of random layers, pushed with skopeo.
python3 - "$work/layout" "$layers" "$layer_mib" <<'EOF'
import hashlib, json, os, sys
root, count, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(f"{root}/blobs/sha256")
def put(data):
    digest = hashlib.sha256(data).hexdigest()
    open(f"{root}/blobs/sha256/{digest}", "wb").write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}
layers = [dict(put(os.urandom(mib << 20)), mediaType="application/vnd.oci.image.layer.v1.tar") for _ in range(count)]
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": dict(put(config), mediaType="application/vnd.oci.image.config.v1+json"),
                       "layers": layers}).encode()
entry = dict(put(manifest), mediaType="application/vnd.oci.image.manifest.v1+json",
             annotations={"org.opencontainers.image.ref.name": "1"})
json.dump({"schemaVersion": 2, "manifests": [entry]}, open(f"{root}/index.json", "w"))
open(f"{root}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:1" "docker://127.0.0.1:$origin_port/bench/prefetch:1"
accept="application/vnd.oci.image.manifest.v1+json"
blobs=$(curl -sf -H "Accept: $accept" "http://127.0.0.1:$origin_port/v2/bench/prefetch/manifests/1" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print("\n".join([m["config"]["digest"]]+[l["digest"] for l in m["layers"]]))')

skopeo_pull() {
    rm -rf "$work/pulled"
    local start
    start=$(date +%s%N)
    skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$1/bench/prefetch:1" "dir:$work/pulled"
    ms_since "$start"
}
three_at_a_time() {
    local start
    start=$(date +%s%N)
    curl -sf -o /dev/null -H "Accept: $accept" "http://127.0.0.1:$1/v2/bench/prefetch/manifests/1"
    echo "$blobs" | xargs -P3 -I{} curl -sf -o /dev/null "http://127.0.0.1:$1/v2/bench/prefetch/blobs/{}"
    ms_since "$start"
}
with_mirror() { # prefetch_downloads, client function
    rm -rf "$work/cache"
    cat >"$work/mirror.toml" <<EOF
[server]
listen = "127.0.0.1:$mirror_port"
[cache]
dir = "$work/cache"
prefetch_downloads = $1
[[registry]]
name = "docker.io"
default = true
[[registry.upstream]]
url = "http://127.0.0.1:$limited_port"
EOF
    "$bin" serve --config "$work/mirror.toml" 2>"$work/mirror.log" &
    local pid=$!
    wait_up "http://127.0.0.1:$mirror_port/healthz"
    "$2" "$mirror_port"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "$layers x $layer_mib MiB image, upstream limited to $rate per connection (wall ms)"
printf '%-8s %-18s %12s %12s %12s\n' round client prefetch-4 prefetch-off direct
for round in $(seq "$rounds"); do
    for client in skopeo_pull three_at_a_time; do
        on=$(with_mirror 4 "$client")
        off=$(with_mirror 0 "$client")
        direct=$("$client" "$limited_port")
        printf '%-8s %-18s %12s %12s %12s\n' "$round" "$client" "$on" "$off" "$direct"
    done
done
