#!/usr/bin/env bash
# The whole test suite: set-up, build, then every test inside a loopback-only
# network namespace: the lab's own self-test (Python) and cargo's tests
# (unit, property, crash-injection, and engine-against-the-lab). After a
# full run, the IAM policy is checked against every EC2 action the suite's
# labs were called with.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh
cargo test --no-run --quiet
in_loopback_namespace .lab/venv/bin/python tests/lab/test_lab.py
export ACODE_EC2_ACTIONS_LOG="$PWD/target/lab-actions"
rm -rf "$ACODE_EC2_ACTIONS_LOG"
in_loopback_namespace env CARGO_NET_OFFLINE=true cargo test --quiet "$@"
if [ $# -eq 0 ]; then
    in_loopback_namespace env CARGO_NET_OFFLINE=true cargo test --quiet --test integration \
        -- --ignored the_iam_policy_grants_exactly_the_actions_the_suite_called
fi
