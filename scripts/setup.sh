#!/usr/bin/env bash
# Installs what moe-pilot needs on a Debian machine (as root) and builds the native engine.
# Idempotent: installs only what is missing. Without root or apt, it stops with a list of what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# docker-compose (Debian's, 1.29) only validates deploy/docker-compose.yml in the tests; no Docker engine is needed.
for p in cmake g++ make libopenblas-dev libgloo-dev nats-server docker-compose; do
  have_pkg "$p" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${need_pkgs[*]} (Debian: apt-get install ${need_pkgs[*]}, as root)" >&2
    exit 1
  fi
fi

command -v node >/dev/null || { echo "setup: Node.js 20+ is missing" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "setup: Node.js 20+ needed, found $(node --version)" >&2; exit 1; }

stamp=node_modules/.package-lock.json
# A node_modules that is a link (a worktree sharing another checkout's install) is that checkout's to update.
if [ -L node_modules ]; then
  [ -f "$stamp" ] || { echo "setup: node_modules links to an install without packages; run npm ci where it points" >&2; exit 1; }
elif [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

# Rebuild the engine only when a native source is newer than the addon.
addon=kernels/build/moepilot.node
if [ ! -f "$addon" ] || [ -n "$(find kernels scripts/build-native.sh -newer "$addon" \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name CMakeLists.txt -o -name '*.sh' \) -print -quit)" ]; then
  bash scripts/build-native.sh
fi
