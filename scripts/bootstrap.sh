# Sourced by scripts/run and scripts/test: make .venv with gatewayd installed (editable), on a fresh
# Debian / Raspberry Pi OS machine that has only python3. Re-installs only when pyproject.toml changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRA="${1:-}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "gatewayd setup: need root (or sudo) to run: $*" >&2; return 1; fi
}

apt_update_once() {
    # apt-get update once per boot of this script: a fresh machine has no package lists.
    if [ -z "${GATEWAYD_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq
        export GATEWAYD_APT_UPDATED=1
    fi
}

apt_install() {
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "gatewayd needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1)" >&2
    exit 1
fi

FRESH=""
if [ ! -x "$VENV/bin/python" ]; then
    FRESH=1
    echo "gatewayd setup: first run: making .venv and installing gatewayd into it; this takes a minute or two" \
        "(once; later runs start at once)..." >&2
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        # Debian splits venv/ensurepip out of python3.
        rm -rf "$VENV"
        apt_install python3-venv
        "$PY" -m venv "$VENV"
    fi
fi

STAMP="$VENV/.gatewayd-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)${EXTRA:+[$EXTRA]}"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
# The test install is a superset of the plain one: `run` after `test` must not reinstall.
if [ "$HAVE" != "$WANT" ] && ! { [ -z "$EXTRA" ] && [ "${HAVE%%\[*}" = "$WANT" ]; }; then
    [ -z "$FRESH" ] && echo "gatewayd setup: installing gatewayd${EXTRA:+ with its $EXTRA extras} into .venv" \
        "(pyproject.toml is new or changed); this takes a minute..." >&2
    # pip's and the build backend's chatter goes to a log, shown only if the install fails.
    PIPLOG="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off --upgrade pip &&
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off \
            -e "$ROOT${EXTRA:+[$EXTRA]}"; } >"$PIPLOG" 2>&1; then
        cat "$PIPLOG" >&2
        echo "gatewayd setup: installing into .venv failed (above; also in $PIPLOG)" >&2
        exit 1
    fi
    echo "gatewayd setup: done, .venv is ready" >&2
    echo "$WANT" > "$STAMP"
fi
