#!/usr/bin/env bash
# Prepare a fresh clone, for one of two purposes:
#   scripts/setup.sh demo   what `make demo` needs: ffmpeg, and .venv with hlsvault
#   scripts/setup.sh test   (the default) also its dev tools, redis-server, chromium and npm for
#                           the test suite, and hls.js (the ops app's preview player uses it too)
# Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose="${1:-test}"
case "$purpose" in
  demo|test) ;;
  *) echo "setup: usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

need_apt=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ "$purpose" = test ]; then
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  # The browser tests drive Debian's chromium with Playwright, which never downloads a browser.
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
  # The test suite checks the lane library (below) on every x86-64 machine with AES-NI.
  command -v "${CC:-cc}" >/dev/null 2>&1 || need_apt+=(gcc)
fi

if ((${#need_apt[@]})); then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; }; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing ${need_apt[*]} with apt-get"
    # apt's chatter (debconf notes included) goes to a log, shown only when it fails.
    apt_log=$(mktemp -t hlsvault-apt.XXXXXX)
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        $SUDO apt-get install -y -qq "${need_apt[@]}"; } >"$apt_log" 2>&1; then
      tail -40 "$apt_log" >&2
      echo "setup: apt-get install ${need_apt[*]} failed; the full log is in $apt_log" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "setup: missing ${need_apt[*]}; install them with your package manager" >&2
    echo "       (Debian/Ubuntu: sudo apt-get install -y ${need_apt[*]}; macOS: brew install ${need_apt[*]})" >&2
    exit 1
  fi
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: hlsvault needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ "$purpose" = test ]; then
  stamp=.venv/.hlsvault-dev-installed what="hlsvault and its dev tools" target='.[dev]'
else
  stamp=.venv/.hlsvault-installed what="hlsvault" target='.'
fi
# The dev install includes everything the plain one does.
if [ "$purpose" = demo ] && [ -f .venv/.hlsvault-dev-installed ] \
    && [ ! pyproject.toml -nt .venv/.hlsvault-dev-installed ]; then
  stamp=.venv/.hlsvault-dev-installed
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing $what into .venv"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$target"; } >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "setup: pip install failed; the full log is in $log" >&2
    exit 1
  fi
  touch "$stamp"
fi

# The lane library: AES-128-CBC of several segments side by side on one core (pipeline/aes.py
# loads it; without it, or on a CPU without AES-NI, the slower system libcrypto is used).
lanes=pipeline/libcbclanes.so
if [ ! -f "$lanes" ] || [ pipeline/cbclanes.c -nt "$lanes" ]; then
  case "$(uname -m)" in
    x86_64|amd64)
      if command -v "${CC:-cc}" >/dev/null 2>&1; then
        echo "setup: building $lanes"
        "${CC:-cc}" -O2 -shared -fPIC -o "$lanes.tmp" pipeline/cbclanes.c
        mv "$lanes.tmp" "$lanes"
      else
        echo "setup: no C compiler (cc): segments will be encrypted by the system libcrypto," \
             "one at a time; install gcc and run this again for the faster backend" >&2
      fi ;;
    *) echo "setup: $lanes is x86-64 only (AES-NI); the system libcrypto encrypts here" ;;
  esac
fi

[ "$purpose" = test ] || exit 0

# hls.js, pinned by dashboard/static/package-lock.json: the ops app serves it to its preview
# player, and the browser tests' player page loads the same file.
player=dashboard/static
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: npm is missing; the ops app's preview player and the browser tests load hls.js from npm" >&2
  echo "       install Node.js 18 or newer with npm (Debian/Ubuntu: sudo apt-get install -y npm)" >&2
  exit 1
fi
npm_stamp=$player/node_modules/.hlsvault-installed
if [ ! -f "$npm_stamp" ] || [ $player/package.json -nt "$npm_stamp" ] \
    || [ $player/package-lock.json -nt "$npm_stamp" ]; then
  echo "setup: installing hls.js into $player/node_modules"
  log=.venv/npm-ci.log
  if ! npm ci --prefix "$player" --no-audit --no-fund --loglevel=error >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "setup: npm ci failed; the full log is in $log" >&2
    exit 1
  fi
  touch "$npm_stamp"
fi
