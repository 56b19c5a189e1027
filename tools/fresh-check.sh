#!/usr/bin/env bash
# Runs both README commands as a new user would: in a clean clone of this checkout's HEAD, with an
# empty IMAGECTL_CACHE_DIR and no target/, and reports how long each took. Run it before calling
# a change done; it takes as long as the two commands together (about 40 minutes here).
#
# Usage: tools/fresh-check.sh [WORKDIR]   (as root; WORKDIR defaults to a new directory in /var/tmp)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/imagectl-fresh.XXXXXX)}
mkdir -p "$work"
rm -rf "$work/clone" "$work/cache"
git clone -q "$src" "$work/clone"
# The clone needs ../shared beside it, as CI lays it out.
if [ -d "$src/../shared" ] && [ ! -e "$work/shared" ]; then
  ln -s "$(cd "$src/../shared" && pwd)" "$work/shared"
fi
mkdir -p "$work/cache"
export IMAGECTL_CACHE_DIR=$work/cache
export CARGO_TARGET_DIR=$work/clone/target
cd "$work/clone"
status=0
for cmd in tools/run-main.sh tools/run-tests.sh; do
  start=$(date +%s)
  if "$cmd" > "$work/$(basename "$cmd" .sh).log" 2>&1; then result=green; else result=RED; status=1; fi
  echo "$cmd: $result in $(( $(date +%s) - start )) s (log: $work/$(basename "$cmd" .sh).log)"
done
echo "clean clone of $(git rev-parse --short HEAD), empty IMAGECTL_CACHE_DIR=$IMAGECTL_CACHE_DIR, $(date -u +%FT%TZ)"
exit $status
