#!/usr/bin/env bash
# The test command: installs what the suite needs when it is missing, then runs it.
#
# Tools the tests run besides cargo: redis-server (the Redis half of the suite), promtool (the
# metrics test), chromium (the dashboard test), curl and jq (the README test), python3 with venv
# (the contract test's schemathesis). Missing ones come from Debian's packages: apt-get as root,
# else through sudo; on any other system the script names what to install and stops.
# With everything present it only checks and runs the tests.
set -euo pipefail
cd "$(dirname "$0")"

have() { command -v "$1" >/dev/null 2>&1; }

if ! have cargo; then
  echo "test.sh: cargo is missing: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

missing=() # Debian package names
have redis-server || missing+=(redis-server)
have promtool || missing+=(prometheus)
have chromium || missing+=(chromium)
have curl || missing+=(curl)
have jq || missing+=(jq)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if have apt-get && [ "$(id -u)" -eq 0 ]; then
    root=()
  elif have apt-get && have sudo && sudo -n true 2>/dev/null; then
    root=(sudo)
  else
    echo "test.sh: missing tools: install the Debian packages ${missing[*]}" \
      "(apt-get install ${missing[*]}, or your system's equivalents)" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}"
  "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== cargo test"
# The suite starts its own private redis-server processes and ltmc servers.
cargo test --locked

echo "== contract"
bash tests/contract.sh
