#!/usr/bin/env bash
# The whole test suite: set up the host, check formatting and lints, run every test (unit,
# integration against the GitLab fake and fakepve, and the e2e tests that bake and boot images).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-host.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets --no-fail-fast
