#!/usr/bin/env bash
# The browser tests (tests/browser) drive Debian's Chromium through Playwright; Playwright's own browser
# download does not work on these machines. Installs chromium with apt-get when missing (needs root).
# When it cannot, it says so and writes the reason to .venv/.no-chromium: the browser tests then skip with
# that reason in the pytest summary instead of failing (without the file a missing Chromium is a failure).
set -uo pipefail
MARKER="${VENV:-.venv}/.no-chromium"
CHROMIUM="${RMT_TEST_CHROMIUM:-/usr/bin/chromium}"
rm -f "$MARKER"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
give_up() {
    echo "ensure-chromium: $1" >&2
    echo "ensure-chromium: the browser tests will be SKIPPED (reason in $MARKER)." >&2
    mkdir -p "$(dirname "$MARKER")" && echo "$1" > "$MARKER"
    exit 0
}
if ! command -v apt-get >/dev/null; then
    give_up "no apt-get on this machine; install Chromium so that $CHROMIUM exists (or set RMT_TEST_CHROMIUM)"
fi
if [ "$(id -u)" != 0 ]; then
    give_up "Chromium is missing and installing it needs root: run 'sudo apt-get install -y chromium'"
fi
echo "ensure-chromium: installing chromium with apt-get (for the browser tests)..."
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
    give_up "'apt-get install chromium' failed (no package mirror reachable?)"
fi
[ -x "$CHROMIUM" ] || give_up "apt-get installed chromium but $CHROMIUM does not exist"
