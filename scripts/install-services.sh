#!/usr/bin/env bash
# Install the service binaries the integration tests start themselves (on free loopback ports):
# redis-server from Debian; the moto S3 server comes with the `test` extra; chromium (Debian) renders
# the docs site in tests/integration/test_docs_site.py.
set -euo pipefail
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"  # TLS test certificates
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"  # the docs site in a headless browser
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
  # Debian starts a system-wide instance on 6379; the tests use their own on free ports.
fi
redis-server --version
