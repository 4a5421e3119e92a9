# Sourced by scripts/serve, scripts/test, scripts/bench and scripts/loadtest: makes .venv
# (Python >= 3.11) with Sluice installed.
# The argument names the extras ("", test, loadtest); re-installs only when pyproject.toml changed
# since they were last installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLUICE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

find_python() {
    for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "sluice: Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python)"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        echo "sluice: installing python${ver}-venv" >&2
        apt_install "python${ver}-venv" || apt_install python3-venv || {
            echo "sluice: '$PY -m venv' failed; install your distribution's python3-venv package" >&2; exit 1; }
        "$PY" -m venv "$VENV"
    fi
fi

# One stamp per set of extras installed, newer than pyproject.toml while that install is current.
# A set is also there when one that includes it is: every install has the bare package, and
# `test` includes `loadtest`, so scripts/serve, scripts/test and scripts/loadtest share one venv.
case "$EXTRAS" in
    "") COVERED_BY=("" loadtest test) ;;
    loadtest) COVERED_BY=(loadtest test) ;;
    *) COVERED_BY=("$EXTRAS") ;;
esac
installed() {
    local extra stamp
    for extra in "${COVERED_BY[@]}"; do
        stamp="$VENV/.sluice-installed${extra:+-$extra}"
        if [ -f "$stamp" ] && ! [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then return 0; fi
    done
    return 1
}
STAMP="$VENV/.sluice-installed${EXTRAS:+-$EXTRAS}"
if ! installed; then
    echo "sluice: installing into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}" >&2
    touch "$STAMP"
fi
