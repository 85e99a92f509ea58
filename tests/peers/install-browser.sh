#!/usr/bin/env bash
# Installs what the console's browser tests need; idempotent:
#   - Debian's chromium and chromium-driver (a real headless Chromium driven over WebDriver),
#   - axe-core from npm into $PEERS_DIR/browser (the accessibility check injected into pages).
#
#   bash tests/peers/install-browser.sh      # or PEERS_DIR=/elsewhere bash ...
#
# Anything that cannot be installed is an error: the browser tests never skip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
peers="${PEERS_DIR:-${FLOTILLA_PEERS_DIR:-$repo/.peers}}"
npm="${NPM:-npm}"

die() { echo "tests/peers/install-browser.sh: ERROR: $*" >&2; exit 1; }
log() { echo "tests/peers/install-browser.sh: $*" >&2; }

# ---- Chromium and its WebDriver ------------------------------------------------------------
packages=(chromium chromium-driver fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  log "chromium packages up to date"
else
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo; install by hand: ${missing[*]}"
    sudo=(sudo -n)
  fi
  log "installing ${missing[*]}"
  start=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq >&2 || die "apt-get update failed"
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
  log "chromium packages installed in $((SECONDS - start)) s"
fi
chromium="${FLOTILLA_CHROMIUM:-/usr/bin/chromium}"
driver="${FLOTILLA_CHROMEDRIVER:-/usr/bin/chromedriver}"
"$chromium" --version >/dev/null 2>&1 || die "$chromium --version fails: $("$chromium" --version 2>&1 | head -3)"
"$driver" --version >/dev/null 2>&1 || die "$driver --version fails: $("$driver" --version 2>&1 | head -3)"

# ---- axe-core ------------------------------------------------------------------------------
command -v "$npm" >/dev/null 2>&1 || die "'$npm' not found: npm is required to install axe-core"
mkdir -p "$peers"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$peers/.install-browser.lock"
  flock 9
fi
dir="$peers/browser"
stamp="$(cat "$here/browser/package.json" "$here/browser/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [[ -f "$dir/.flotilla-stamp" && "$(cat "$dir/.flotilla-stamp")" == "$stamp" \
      && -f "$dir/node_modules/axe-core/axe.min.js" ]]; then
  log "axe-core up to date ($dir)"
else
  log "installing axe-core into $dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$here/browser/package.json" "$here/browser/package-lock.json" "$dir/"
  "$npm" ci --prefix "$dir" --ignore-scripts --no-audit --no-fund --loglevel=error >&2 \
    || die "npm ci for axe-core failed"
  [[ -f "$dir/node_modules/axe-core/axe.min.js" ]] || die "axe-core installed without axe.min.js"
  echo "$stamp" > "$dir/.flotilla-stamp"
fi
log "browser test peers ready: $("$chromium" --version), axe-core in $dir"
