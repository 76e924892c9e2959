#!/usr/bin/env bash
# Headless Chromium + Playwright's Python package for the playground test (tests/service/test_playground.py).
# Idempotent. Debian's chromium is used through executable_path: never `playwright install`.
# Usage: tests/service/install_browser.sh [python]   (default: python3 on PATH; run as root or with sudo for apt)
set -euo pipefail
PYTHON="${1:-python3}"
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! command -v chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q playwright
fi
chromium --version
"$PYTHON" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
