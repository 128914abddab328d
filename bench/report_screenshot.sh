#!/usr/bin/env bash
# Renders a cdd-ray report (report.html of a run, summary.html of a grid) in headless Chromium and
# writes a PNG screenshot: the check that the self-contained page shows in a real browser.
# Chromium is a Debian package (apt-get install chromium).
#   bash bench/report_screenshot.sh RUN_DIR/report.html [out.png]
set -euo pipefail
page=$(realpath "$1")
out=${2:-${page%.html}.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# the flags keep Chromium off the network (this machine has none) and off any GPU
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1300,2400 --screenshot="$out" "file://$page" 2>/dev/null
echo "screenshot: $out"
