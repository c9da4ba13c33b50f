#!/usr/bin/env bash
# The whole test suite: formatting, lints, Rust tests, and end-to-end tests with the official
# OpenAI Python client (installed into a local venv, .venv/).
set -euo pipefail
cd "$(dirname "$0")/.."
# A fresh clone gains nothing from incremental compilation, and its caches double the disk a
# build takes.
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p qoe-router --all-targets --features tokenizer --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== cargo test (--features tokenizer)"
cargo test -p qoe-router --features tokenizer --locked --lib --test tokenizer
echo "== end-to-end (openai client)"
cargo build --locked --bin qoe-router
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
# The https test makes its certificates with the openssl command (Debian's `openssl`).
if ! command -v openssl >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq openssl) >/dev/null 2>&1 \
    || echo "openssl could not be installed: the https end-to-end test will be skipped"
fi
QOE_ROUTER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/qoe-router" .venv/bin/python -m pytest -q tests/e2e
