#!/usr/bin/env bash
# The whole test suite: set-up, build, then every test inside a loopback-only
# network namespace: the lab's own self-test (Python) and cargo's tests
# (unit, property, crash-injection, and engine-against-the-lab).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
cargo test --no-run --quiet
in_loopback_namespace .lab/venv/bin/python tests/lab/test_lab.py
in_loopback_namespace env CARGO_NET_OFFLINE=true cargo test --quiet "$@"
