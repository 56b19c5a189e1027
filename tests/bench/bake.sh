#!/usr/bin/env bash
# Bake benchmark: imagectl against the floor pipeline done by hand, measured side by side in one run.
#
#   cold  = `imagectl build --no-cache` (rootfs layer rebuilt; .deb files come from the cache)
#   floor = mmdebstrap of the same sources and packages + mkfs.ext4 -d + qemu-img convert (zstd),
#           with the same .deb cache, done by hand
#   warm  = `imagectl build` after changing one file (the rootfs layer is reused)
#   size  = our qcow2 vs `qemu-img convert -c -o compression_type=zstd` of the same raw disk
#
# Goals (issue "Bake"): cold/floor <= 1.15; warm <= 20 s and <= 0.3 x cold; size ratio <= 1.0.
# Usage: tests/bench/bake.sh [ROUNDS]   (as root, after tools/setup-host.sh and a release build)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-1}
bin=$PWD/target/release/imagectl
agent=$PWD/target/release/imagectl-agent
[ -x "$bin" ] && [ -x "$agent" ] || cargo build --release -q -p imagectl -p imagectl-agent

work=$(mktemp -d /var/tmp/imagectl-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
# A private copy of the spec tree, so the warm round can change a file.
mkdir -p "$work/ws/tests"
cp -a image-specs cloud-init "$work/ws/"
cp -a tests/gitlab-runner-double "$work/ws/tests/"
# Resolve against what the mirror serves today, not the committed lock.
rm -f "$work"/ws/image-specs/*.lock
spec=$work/ws/image-specs/gitlab-runner.yaml
cache=${IMAGECTL_BENCH_CACHE:-/var/tmp/imagectl-bench-cache}
mkdir -p "$cache"

now() { date +%s.%N; }
build() { "$bin" build "$spec" --profile offline --quiet --output json --cache-dir "$cache" \
  --agent-binary "$agent" --out "$work/out" "$@"; }

# Warm the .deb cache and the lock once, outside the measurement.
build > /dev/null
plan=$("$bin" build "$spec" --profile offline --dry-run --output json --cache-dir "$cache" --out "$work/out")
suite=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["sources"][0].split()[2])' "$plan")
mapfile -t sources < <(python3 -c 'import json,sys; [print(s) for s in json.loads(sys.argv[1])["sources"]]' "$plan")
includes=$(python3 -c 'import json,sys; print(",".join(json.loads(sys.argv[1])["includes"]))' "$plan")
prefdir=$work/pref; mkdir -p "$prefdir"
printf 'Package: *\nPin: release n=bullseye\nPin-Priority: 100\n\nPackage: cadvisor\nPin: release n=bullseye\nPin-Priority: 990\n' > "$prefdir/p"
debcache=$cache/debs/$suite

floor() {
  local d=$work/floor; rm -rf "$d"; mkdir -p "$d"
  # The local .deb is built by hand too, as imagectl does.
  # dpkg runs inside the chroot, so the .deb must be at the same path inside (as imagectl does).
  local staged=/tmp/imagectl-bench-debs
  mkdir -p "$staged"
  dpkg-deb --root-owner-group -Zxz --build tests/gitlab-runner-double/pkg "$staged/double.deb" > /dev/null
  local incl=("--setup-hook=mkdir -p \"\$1\"$staged" "--setup-hook=copy-in $staged/double.deb $staged/"
              "--include=$staged/double.deb" "--customize-hook=rm -rf \"\$1\"$staged")
  mmdebstrap --quiet --variant=minbase --mode=root --skip=essential/unlink \
    --aptopt='APT::Install-Recommends "false"' --dpkgopt=force-unsafe-io \
    --setup-hook="mkdir -p \"\$1\"/etc/apt/preferences.d \"\$1\"/var/cache/apt/archives && cp $prefdir/p \"\$1\"/etc/apt/preferences.d/" \
    --setup-hook="sync-in $debcache /var/cache/apt/archives/" \
    --include="$includes" "${incl[@]}" "$suite" "$d/root.tar" "${sources[@]}" 2>/dev/null
  truncate -s 4G "$d/disk.raw"
  mkfs.ext4 -q -F -d "$d/root.tar" "$d/disk.raw"
  qemu-img convert -f raw -O qcow2 -c -m 8 -o compression_type=zstd "$d/disk.raw" "$d/floor.qcow2"
}

for r in $(seq 1 "$rounds"); do
  t0=$(now); floor; t1=$(now)
  cold_json=$(build --no-cache); t2=$(now)
  echo "# changed $(date)" >> "$work/ws/cloud-init/cadvisor.service"
  t3=$(now); warm_json=$(build); t4=$(now)
  image=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["image"])' "$warm_json")
  cached=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["layer_cached"])' "$warm_json")
  qemu-img convert -O raw "$image" "$work/ours.raw"
  qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$work/ours.raw" "$work/ref.qcow2"
  ours=$(stat -c %s "$image"); ref=$(stat -c %s "$work/ref.qcow2")
  python3 - "$t0" "$t1" "$t2" "$t3" "$t4" "$ours" "$ref" "$cached" <<'PY'
import sys
t0, t1, t2, t3, t4 = map(float, sys.argv[1:6]); ours, ref = int(sys.argv[6]), int(sys.argv[7])
floor, cold, warm = t1 - t0, t2 - t1, t4 - t3
print(f"floor pipeline      {floor:7.1f} s")
print(f"imagectl cold       {cold:7.1f} s   cold/floor = {cold/floor:.2f}   (goal <= 1.15)")
print(f"imagectl warm       {warm:7.1f} s   warm/cold  = {warm/cold:.2f}   (goal <= 20 s and <= 0.30; layer cached: {sys.argv[8]})")
print(f"qcow2 size          {ours/2**20:7.1f} MiB vs {ref/2**20:.1f} MiB plain zstd convert = {ours/ref:.3f}   (goal <= 1.0)")
PY
done
