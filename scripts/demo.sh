#!/usr/bin/env bash
# The main job against the local lab: build the CLI, start the lab (moto +
# real sshd on loopback), provision an instance end to end with the live
# progress display, print its status, tear it down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet --bin acode-ec2
. scripts/env.sh
in_loopback_namespace scripts/demo-in-lab.sh
