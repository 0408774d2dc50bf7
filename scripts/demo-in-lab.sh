#!/usr/bin/env bash
# Runs inside the loopback-only namespace (see demo.sh): lab up, provision,
# status, teardown, lab down.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
work=.lab/demo
rm -rf "$work" && mkdir -p "$work"

# The lab stops when its stdin closes: feed it from a pipe we own.
mkfifo "$work/lab.stdin"
.lab/venv/bin/python tests/lab/acode_lab.py --state-dir "$work/lab" \
    --boot-delay-s 2 --status-ok-delay-s 2 --console-lag-s 3 --terminate-delay-s 1 \
    < "$work/lab.stdin" > "$work/lab.ready" &
lab_pid=$!
exec 9> "$work/lab.stdin"
stop_lab() { exec 9>&-; wait "$lab_pid" 2>/dev/null || true; }
trap stop_lab EXIT

for _ in $(seq 1 120); do
    [ -s "$work/lab.ready" ] && break
    kill -0 "$lab_pid" 2>/dev/null || { echo "demo: the lab exited early; see $work/lab/lab.log" >&2; exit 1; }
    sleep 0.5
done
[ -s "$work/lab.ready" ] || { echo "demo: the lab did not start" >&2; exit 1; }

lab() { .lab/venv/bin/python -c "import json,sys; print(json.load(open('$work/lab.ready'))$1)"; }
export AWS_ENDPOINT_URL_EC2=$(lab "['ec2_endpoint']")
export ACODE_EC2_STATE_DB=$PWD/$work/state.db
cat > "$work/ec2-target.yaml" <<YAML
ec2Target:
  amiId: $(lab "['ami_id']")
  instanceType: t3.micro
  subnetId: $(lab "['subnets']['us-east-1a']")
  failoverSubnetIds: [$(lab "['subnets']['us-east-1b']")]
  securityGroupIds: [$(lab "['security_group_id']")]
  keyPair:
    mode: temporary
    keyType: ed25519
  useSpot: true
  pollInterval: 500ms
  tags:
    purpose: demo
  ssh:
    user: $(lab "['ssh_user']")
    endpointOverride: 127.0.0.1:$(lab "['sshd_port']")
    retryInterval: 1s
    hostKeyVerification: console
YAML

cli=target/debug/acode-ec2
echo "== acode-ec2 provision --config $work/ec2-target.yaml"
$cli provision --config "$work/ec2-target.yaml"
session=$($cli status --json | .lab/venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["session_id"])')
echo "== acode-ec2 status --json"
$cli status "$session" --json
echo "== acode-ec2 sessions"
$cli sessions
echo "== acode-ec2 teardown $session"
$cli teardown "$session"
$cli status "$session"
