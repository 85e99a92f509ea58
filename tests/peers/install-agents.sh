#!/usr/bin/env bash
# Installs the Debian packages that the real agents in ../shared/tools need (Fluent Bit 5.1.1's
# shared libraries, Debian's Ruby and the gems Fluentd 1.18.0 loads); idempotent.
#
#   bash tests/peers/install-agents.sh      # or FLOTILLA_REAL_AGENTS_DIR=/elsewhere bash ...
#
# Without the agents' folder (a clone without ../shared) there is nothing to install: the
# supervisor's real-agent tests then report themselves skipped, by name. With it, a package
# that cannot be installed is an error, and so is an agent that still cannot run afterwards.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tools="${FLOTILLA_REAL_AGENTS_DIR:-$repo/../shared/tools}"

die() { echo "tests/peers/install-agents.sh: ERROR: $*" >&2; exit 1; }
log() { echo "tests/peers/install-agents.sh: $*" >&2; }

if [[ ! -d "$tools" ]]; then
  log "$tools not found: the real-agent tests will be reported as skipped"
  exit 0
fi

# The lists are the ones in tools/fluent-bit-5.1.1/README.md and tools/fluentd-1.18.0/README.md.
packages=(
  libyaml-0-2 libsqlite3-0 libssl3
  ruby ruby-msgpack ruby-yajl ruby-cool.io ruby-http-parser.rb ruby-sigdump ruby-tzinfo
  ruby-strptime ruby-webrick
)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  log "agent packages up to date"
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
  log "agent packages installed in $((SECONDS - start)) s"
fi

# Each agent present must run now: a missing library must fail here, loudly, not later.
if [[ -e "$tools/fluent-bit-5.1.1/fluent-bit" ]]; then
  "$tools/fluent-bit-5.1.1/fluent-bit" -V >/dev/null 2>&1 \
    || die "$tools/fluent-bit-5.1.1/fluent-bit -V fails: $("$tools/fluent-bit-5.1.1/fluent-bit" -V 2>&1 | head -3)"
fi
if [[ -e "$tools/fluentd-1.18.0/fluentd" ]]; then
  "$tools/fluentd-1.18.0/fluentd" --version >/dev/null 2>&1 \
    || die "$tools/fluentd-1.18.0/fluentd --version fails: $("$tools/fluentd-1.18.0/fluentd" --version 2>&1 | head -3)"
fi
log "real agents ready in $tools"
