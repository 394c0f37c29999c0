#!/usr/bin/env bash
# Runs the pinned buf (https://buf.build) on the API protos: `scripts/buf.sh lint`,
# `scripts/buf.sh breaking --against ...`, or any other buf command. Installs buf
# from npm into .tools/ the first time (needs node and npm); later runs start at once.
# Arguments are passed to buf unchanged, run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: bump deliberately, lint findings can change between releases.
BUF_VERSION=1.75.0
TOOLS=.tools
BUF="$TOOLS/node_modules/.bin/buf"

if ! { [ -x "$BUF" ] && [ "$("$BUF" --version 2>/dev/null)" = "$BUF_VERSION" ]; }; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "scripts/buf.sh: npm is needed to install buf (apt-get install -y nodejs npm)" >&2
    exit 1
  fi
  echo "scripts/buf.sh: installing @bufbuild/buf@$BUF_VERSION into $TOOLS/" >&2
  npm install --prefix "$TOOLS" --no-save --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >&2
fi

exec "$BUF" "$@"
