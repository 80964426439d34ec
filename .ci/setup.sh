#!/usr/bin/env bash
# Creates .venv with the pinned dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
# opencv-python needs libGL and glib on a headless Debian machine; nftables is for the impaired-network bench/tests;
# chromium is for the browser-viewer test (tests/test_viewer.py); docker-compose validates docker-compose.yml
# (`docker compose config`; this machine has the docker client but no engine and no compose v2 plugin).
# coturn (turnserver) is for the relayed-call test (tests/test_ice_servers.py; it skips without it).
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in libgl1 libglib2.0-0 nftables iproute2 chromium docker-compose coturn; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -c "import torch, aiortc, av, cv2; print('venv ok: torch', torch.__version__, 'aiortc', aiortc.__version__)"
