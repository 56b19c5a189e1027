#!/usr/bin/env bash
# tests/bench/upload.sh — upload benchmark of `imagectl publish` against fakepve.
#
# Uploads a 1 GiB qcow2 (random data, so nothing is sparse or compressible) to the harness in
# tests/fakepve/harness.py over TLS (pinned certificate), ROUNDS times, alternating with
# `curl -F` of the same file to the same endpoint. Reports imagectl's peak RSS (goal <= 64 MiB)
# and its upload throughput against curl's (goal >= 0.9x), as medians.
#
# Environment: FAKEPVE_PYTHON (default .venv/bin/python with fakepve[crypto] installed),
# IMAGECTL_BIN (default: target/release/imagectl, built if missing), SIZE_MIB (1024), ROUNDS (3).
# Needs qemu-img, curl, sha256sum and GNU time (/usr/bin/time).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
py=${FAKEPVE_PYTHON:-$root/.venv/bin/python}
bin=${IMAGECTL_BIN:-}
size_mib=${SIZE_MIB:-1024}
rounds=${ROUNDS:-3}

if [ -z "$bin" ]; then
    bin=${CARGO_TARGET_DIR:-$root/target}/release/imagectl
    [ -x "$bin" ] || cargo build --release --quiet -p imagectl --manifest-path "$root/Cargo.toml"
fi
for tool in qemu-img curl sha256sum /usr/bin/time "$py"; do
    command -v "$tool" >/dev/null || { echo "upload.sh: $tool is missing" >&2; exit 2; }
done

work=$(mktemp -d)
harness_pid=
cleanup() {
    exec 3>&- 2>/dev/null || true
    [ -n "$harness_pid" ] && kill "$harness_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The harness exits when its stdin closes: hold a FIFO open on fd 3.
mkfifo "$work/stdin"
"$py" "$root/tests/fakepve/harness.py" <"$work/stdin" >"$work/hello" 2>"$work/harness.log" &
harness_pid=$!
exec 3>"$work/stdin"
for _ in $(seq 100); do [ -s "$work/hello" ] && break; sleep 0.1; done
field() { "$py" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/hello" "$1"; }
port=$(field port)
token=$(field token)
fingerprint=$(field fingerprint)
ca=$(field ca_file)
endpoint="https://127.0.0.1:$port"

echo "preparing a ${size_mib} MiB qcow2 of random data" >&2
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/bench.qcow2"
rm "$work/disk.raw"
bytes=$(stat -c %s "$work/bench.qcow2")
sha=$(sha256sum "$work/bench.qcow2" | cut -d' ' -f1)
manifest() {
    cat >"$work/bench.manifest.json" <<EOF
{"format":1,"name":"bench","version":"$1","image":"bench.qcow2","sha256":"$sha","size":$bytes,
 "virtual_size":$bytes,"spec_hash":"bench","lock_hash":"bench","inputs_hash":"bench","profiles":[],
 "boot_modes":["bios"],"kernel":"-","root_fs_uuid":"-","source_date_epoch":0,"packages":[],
 "artifacts":[],"hygiene_removed":{},"layer_cached":false,"stage_seconds":{},"build_seconds":0,
 "built_at":"2025-01-01T00:00:00Z","imagectl_version":"bench"}
EOF
}
# curl reads the token from a header file, so it is not on its command line either.
printf 'Authorization: PVEAPIToken=%s\n' "$token" >"$work/auth"
chmod 600 "$work/auth"

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
: >"$work/imagectl.rate"; : >"$work/imagectl.rss"; : >"$work/curl.rate"; : >"$work/curl.rss"
for round in $(seq "$rounds"); do
    manifest "r$round"
    PROXMOX_VE_ENDPOINT=$endpoint PROXMOX_VE_API_TOKEN=$token PROXMOX_VE_FINGERPRINT=$fingerprint \
        /usr/bin/time -f '%M' -o "$work/time" \
        "$bin" publish "$work/bench.qcow2" --node pve1 -q -o json >"$work/out.json"
    cat "$work/time" >>"$work/imagectl.rss"
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print(r['uploaded_bytes']/r['upload_seconds'])" \
        "$work/out.json" >>"$work/imagectl.rate"
    /usr/bin/time -f '%M' -o "$work/time" \
        curl -sS --fail --cacert "$ca" -H @"$work/auth" \
        -F content=import -F checksum-algorithm=sha256 -F checksum="$sha" \
        -F "filename=@$work/bench.qcow2;filename=curl-$round.qcow2" \
        -o /dev/null -w '%{time_total}\n' "$endpoint/api2/json/nodes/pve1/storage/local/upload" >"$work/curl.time"
    cat "$work/time" >>"$work/curl.rss"
    awk -v b="$bytes" '{print b/$1}' "$work/curl.time" >>"$work/curl.rate"
    echo "round $round: imagectl $(tail -1 "$work/imagectl.rate" | awk '{printf "%.0f", $1/1048576}') MiB/s," \
         "curl $(tail -1 "$work/curl.rate" | awk '{printf "%.0f", $1/1048576}') MiB/s" >&2
done

i_rate=$(median <"$work/imagectl.rate")
c_rate=$(median <"$work/curl.rate")
i_rss=$(sort -g "$work/imagectl.rss" | tail -1)
c_rss=$(sort -g "$work/curl.rss" | tail -1)
awk -v ir="$i_rate" -v cr="$c_rate" -v irss="$i_rss" -v crss="$c_rss" -v mib="$size_mib" -v n="$rounds" \
    -v cores="$(nproc)" -v date="$(date -u +%Y-%m-%d)" 'BEGIN {
    ratio = ir / cr
    printf "upload benchmark %s, %d cores, %d MiB qcow2 (random data), %d rounds, medians\n", date, cores, mib, n
    printf "imagectl publish: %.0f MiB/s, peak RSS %.1f MiB (goal <= 64 MiB: %s)\n", ir/1048576, irss/1024, (irss <= 65536 ? "met" : "MISSED")
    printf "curl -F:          %.0f MiB/s, peak RSS %.1f MiB\n", cr/1048576, crss/1024
    printf "ratio imagectl/curl: %.2f (goal >= 0.9: %s)\n", ratio, (ratio >= 0.9 ? "met" : "MISSED")
}'
