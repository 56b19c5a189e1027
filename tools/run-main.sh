#!/usr/bin/env bash
# The main job on a fresh machine: set up the host, build imagectl, bake the golden image with the
# offline profile, and boot it in QEMU to check its services.
#
# The bake follows a private copy of the committed lock: pins the mirror still serves are kept,
# pins it stopped serving are re-resolved against what it serves today (one line each), and the
# committed lock is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-host.sh
cargo build --release -p imagectl -p imagectl-agent
bin=target/release/imagectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp image-specs/gitlab-runner.offline.lock "$work/offline.lock"
if ! "$bin" build image-specs/gitlab-runner.yaml --profile offline --lock "$work/offline.lock" \
  --output json > "$work/build.json"; then
  echo "run-main.sh: the bake failed; its error is above" >&2
  exit 1
fi
image=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["image"])' "$work/build.json")
"$bin" inspect "$image"
"$bin" test "$image"
