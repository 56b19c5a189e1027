#!/usr/bin/env bash
# Drift and fetch benchmark, measured side by side in one run (medians of ROUNDS):
#
#   cold    = `imagectl build --no-cache` of the offline profile, every pin served by the .deb cache
#   drift   = the same, with one pin the mirror no longer serves (the lock names a version that
#             does not exist): the mirror is asked, the pin re-resolved, the layer bootstrapped
#   fetch   = `imagectl fetch --locked --into EMPTY` (the mirror's indexes, every .deb, sha256 checks)
#   apt     = apt-get update + apt-get download of the same packages into an empty directory, with
#             a private configuration of the same sources
#
# Goals (issue "Builds that survive a moving Debian mirror"): drift/cold <= 1.10; fetch/apt <= 1.2.
# Usage: tests/bench/drift.sh [ROUNDS]   (as root, after tools/setup-host.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
cargo build --release -q -p imagectl -p imagectl-agent
bin=$PWD/target/release/imagectl
agent=$PWD/target/release/imagectl-agent
work=$(mktemp -d /var/tmp/imagectl-drift-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
spec=image-specs/gitlab-runner.yaml
cache=$work/cache
now() { date +%s.%N; }
build() { "$bin" build "$spec" --profile offline --quiet --output json --cache-dir "$cache" \
  --agent-binary "$agent" --out "$work/out" "$@"; }

# A lock of today, and every .deb in the cache, outside the measurement.
build --lock "$work/base.lock" > /dev/null
pkgs=$(python3 - "$work/base.lock" <<'PY'
import sys, tomllib
lock = tomllib.load(open(sys.argv[1], "rb"))
print(" ".join(f"{p['name']}={p['version']}" for p in lock["package"] if p["name"] != "gitlab-runner"))
PY
)
drifted() {
  python3 - "$work/base.lock" "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r'(name = "netbase"\nversion = ")([^"]+)"', r'\g<1>\g<2>+gone1"', text)
open(sys.argv[2], "w").write(text)
PY
}
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
security=$(awk '/^URIs:/ && /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
apt_baseline() {
  local d=$1; mkdir -p "$d"/{lists/partial,archives/partial,parts,src.d,prefs.d,dl}
  : > "$d/status"
  {
    echo "deb $mirror bookworm main"; echo "deb $mirror bookworm-updates main"
    [ -n "$security" ] && echo "deb $security bookworm-security main"
    echo "deb $mirror bullseye main"
  } > "$d/sources.list"
  cat > "$d/apt.conf" <<CONF
Dir::State "$d/"; Dir::State::Lists "$d/lists"; Dir::State::status "$d/status";
Dir::Cache "$d/"; Dir::Cache::Archives "$d/archives"; Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
Dir::Etc::SourceList "$d/sources.list"; Dir::Etc::SourceParts "$d/src.d"; Dir::Etc::Parts "$d/parts";
Dir::Etc::Preferences "$d/prefs"; Dir::Etc::PreferencesParts "$d/prefs.d";
APT::Architecture "amd64"; APT::Architectures { "amd64"; }; APT::Sandbox::User "root";
Acquire::Languages "none"; Debug::NoLocking "true";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
CONF
  APT_CONFIG=$d/apt.conf apt-get -q update > /dev/null
  # shellcheck disable=SC2086
  (cd "$d/dl" && APT_CONFIG=$d/apt.conf apt-get -q download $pkgs > /dev/null)
}

median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.1f}")' "$@"; }
cold=(); drift=(); fetch=(); apt=()
for r in $(seq "$rounds"); do
  cp "$work/base.lock" "$work/cold.lock"
  t0=$(now); build --no-cache --lock "$work/cold.lock" > /dev/null; t1=$(now)
  drifted "$work/drift.lock"
  t2=$(now); build --no-cache --lock "$work/drift.lock" > "$work/drift.json"; t3=$(now)
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["drift"]; assert len(d)==1, d' "$work/drift.json"
  rm -rf "$work/fetched"
  t4=$(now); "$bin" fetch "$spec" --profile offline --locked --lock "$work/base.lock" --into "$work/fetched" --quiet > /dev/null; t5=$(now)
  rm -rf "$work/apt"
  t6=$(now); apt_baseline "$work/apt"; t7=$(now)
  cold+=("$(echo "$t1 - $t0" | bc)"); drift+=("$(echo "$t3 - $t2" | bc)")
  fetch+=("$(echo "$t5 - $t4" | bc)"); apt+=("$(echo "$t7 - $t6" | bc)")
  echo "round $r: cold ${cold[-1]} s, drift ${drift[-1]} s, fetch ${fetch[-1]} s, apt ${apt[-1]} s"
done
mc=$(median "${cold[@]}"); md=$(median "${drift[@]}"); mf=$(median "${fetch[@]}"); ma=$(median "${apt[@]}")
echo "medians of $rounds: cold $mc s, drift $md s (ratio $(echo "scale=2; $md / $mc" | bc), goal <= 1.10)"
echo "                 fetch $mf s, apt $ma s (ratio $(echo "scale=2; $mf / $ma" | bc), goal <= 1.2)"
echo "packages: $(wc -w <<< "$pkgs"), $(du -sh "$work/fetched/debs" | cut -f1) of .debs; $(date -u +%F)"
