#!/usr/bin/env bash
# Debian's nginx for the scale-out failover test (tests/e2e/test_scale_out.py). Idempotent.
# Only the binary is used: the test starts its own nginx on a loopback port with its own config.
# Usage: tests/e2e/install_nginx.sh   (run as root or with sudo for apt)
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx
fi
PATH="$PATH:/usr/sbin" nginx -v
