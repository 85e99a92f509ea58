#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs the OpAMP peers, then fmt, clippy and cargo test.
#
#   ./tests/run.sh [extra cargo test args, e.g. -- --nocapture]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

export FLOTILLA_PEERS_DIR="${FLOTILLA_PEERS_DIR:-$repo/.peers}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The real Fluent Bit and Fluentd for the supervisor's real-agent tests; those tests report
# themselves skipped, by name, when this folder does not exist (a clone without ../shared).
export FLOTILLA_REAL_AGENTS_DIR="${FLOTILLA_REAL_AGENTS_DIR:-$repo/../shared/tools}"

step() {
  local name="$1"; shift
  echo "==> $name" >&2
  local t0=$SECONDS
  "$@" || { echo "==> $name: FAILED" >&2; exit 1; }
  echo "==> $name: ok ($((SECONDS - t0)) s)" >&2
}

command -v cargo >/dev/null 2>&1 || { echo "tests/run.sh: ERROR: cargo not found (Rust toolchain required)" >&2; exit 1; }

# Third-party OpAMP clients used by the flotilla-e2e interop tests (no database server is needed: SQLite).
step "install peers" env PEERS_DIR="$FLOTILLA_PEERS_DIR" bash tests/peers/install.sh
# The real agents' Debian packages (Ruby and its gems for Fluentd, libyaml/libssl for Fluent Bit).
step "install real agents' packages" bash tests/peers/install-agents.sh
# Debian's Chromium and chromedriver, and axe-core, for the web console's browser tests.
step "install browser test peers" env PEERS_DIR="$FLOTILLA_PEERS_DIR" bash tests/peers/install-browser.sh
step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
# Feature-gated code that the default build does not compile: the supervisor's TLS and the
# MCP benchmark binary would otherwise rot unnoticed.
step "cargo clippy (supervisor tls)" cargo clippy -p flotilla-supervisor --features tls --all-targets -- -D warnings
step "cargo clippy (mcp bench)" cargo clippy -p flotilla-mcp --features bench --all-targets -- -D warnings
# `cargo test --workspace` builds the supervisor without its `tls` feature: its TLS unit tests
# and the end-to-end tests against the server's TLS (private CA, wss/https, mTLS) run here.
step "cargo test (supervisor tls)" cargo test -p flotilla-supervisor --features tls --lib --test e2e -- tls
# Last, so the output ends with cargo test's own summary lines.
echo "==> cargo test" >&2
exec cargo test --workspace "$@"
