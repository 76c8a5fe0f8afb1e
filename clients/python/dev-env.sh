#!/usr/bin/env bash
# Create, or bring up to date, a virtualenv at VENV_DIR holding the exact packages the
# client's tests need (requirements-test.txt). Idempotent: a venv made from the same list is
# left alone. Python: $CORRAL_PYTHON, else python3 (Debian's needs python3-venv).
set -euo pipefail
venv=${1:?usage: dev-env.sh VENV_DIR}
here=$(cd "$(dirname "$0")" && pwd)
req="$here/requirements-test.txt"
python=${CORRAL_PYTHON:-python3}
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$venv/requirements-test.txt"; then
  exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
cp "$req" "$venv/requirements-test.txt"
