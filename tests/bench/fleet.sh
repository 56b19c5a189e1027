#!/usr/bin/env bash
# tests/bench/fleet.sh — fleet benchmark: `imagectl deploy --provider proxmox` of N VMs against
# 1 VM on fakepve with realistic task times and deferred clone registration, side by side in one
# run, with the PVE API calls per VM (see tests/it/fleet_pve/bench.rs for the timing model).
# Goals: 10 VMs in <= 2x the time of 1 VM; 50 VMs in <= 2.5x, 0 failed clones, <= 25 calls per VM.
#
# Environment: BENCH_VMS (default 10), BENCH_BOOT_SECS (emulated guest boot, default 30),
# BENCH_ROUNDS (default 2),
# FAKEPVE_PYTHON (default .venv/bin/python with fakepve[crypto]).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo test --quiet -p imagectl-tests --test it fleet_pve_bench -- --ignored --nocapture 2>&1 |
    grep -E '^FLEET-BENCH|^test result|panicked'
