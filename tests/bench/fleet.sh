#!/usr/bin/env bash
# tests/bench/fleet.sh — fleet benchmark: `imagectl deploy --provider proxmox` of 10 VMs against
# 1 VM on fakepve with realistic task times, side by side in one run (see
# tests/it/fleet_pve/bench.rs for the timing model). Goal: 10 VMs in <= 2x the time of 1 VM.
#
# Environment: BENCH_BOOT_SECS (emulated guest boot, default 30), BENCH_ROUNDS (default 2),
# FAKEPVE_PYTHON (default .venv/bin/python with fakepve[crypto]).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo test --quiet -p imagectl-tests --test it fleet_pve_bench -- --ignored --nocapture 2>&1 |
    grep -E '^FLEET-BENCH|^test result|panicked'
