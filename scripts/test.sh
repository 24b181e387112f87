#!/bin/sh
# The whole test suite on a fresh machine: installs what is missing, checks
# formatting and lints, then runs every test (real Dovecot backends, real
# clients).
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads 4
