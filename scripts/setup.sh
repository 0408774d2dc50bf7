#!/usr/bin/env bash
# Installs what acode-ec2's lab, tests and demo need; safe to run again.
#   - Debian openssh-server (the lab's real sshd) and iproute2 (loopback-only namespaces)
#   - a Python venv in .lab/venv with the lab's pinned moto (tests/lab/requirements.txt)
#   - cargo dependencies (cargo fetch)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v unshare >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python=${PYTHON:-python3}
stamp=.lab/venv/.requirements.sha256
want=$(sha256sum tests/lab/requirements.txt | cut -d' ' -f1)
if [ ! -x .lab/venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: creating .lab/venv with the pinned moto"
    rm -rf .lab/venv
    mkdir -p .lab
    "$python" -m venv .lab/venv
    .lab/venv/bin/pip install --quiet --disable-pip-version-check -r tests/lab/requirements.txt
    echo "$want" > "$stamp"
fi

cargo fetch --quiet
