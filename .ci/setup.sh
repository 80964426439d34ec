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
# nodejs/npm: the browser sender's pinned packages (package.json, package-lock.json -> node_modules/, served by the
# receiver at /send) and the tests that run its JavaScript (tests/test_web_protocol.py, tests/test_browser_sender.py).
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in libgl1 libglib2.0-0 nftables iproute2 chromium docker-compose coturn; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  command -v npm >/dev/null || missing="$missing nodejs npm"
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -c "import torch, aiortc, av, cv2; print('venv ok: torch', torch.__version__, 'aiortc', aiortc.__version__)"
# The browser sender's packages, exactly as locked (no install scripts: nothing is downloaded but the packages).
if command -v npm >/dev/null; then
  if ! cmp -s package-lock.json node_modules/.kpcast-installed-lock 2>/dev/null; then
    npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
    cp package-lock.json node_modules/.kpcast-installed-lock
  fi
else
  echo "npm not found: the browser sender (GET /send) and its tests need it" >&2
fi
# The shipped keypoint detector as ONNX, checked against PyTorch, where the receiver serves it from (cache/web/).
OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m models.fomm.export --weights models/weights/fomm_face256.pt --cache-dir cache/web
