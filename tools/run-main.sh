#!/usr/bin/env bash
# The main job on a fresh machine: set up the host, build imagectl, bake the golden image with the
# offline profile, and boot it in QEMU to check its services.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-host.sh
cargo build --release -p imagectl -p imagectl-agent
bin=target/release/imagectl
image=$("$bin" build image-specs/gitlab-runner.yaml --profile offline --output json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"])')
"$bin" inspect "$image"
"$bin" test "$image"
