#!/usr/bin/env bash
# Installs what the report test needs beyond pip: Debian's Chromium (the test drives it with Playwright's
# Python client via executable_path, so no browser download is ever attempted). No-op when already present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install Chromium with your package manager (the report test runs it headless)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
