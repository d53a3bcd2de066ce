# shellcheck shell=bash
# Sourced by the launch scripts: create or reuse .venv and install the project (+ extras) into it.
# Re-installs only when pyproject.toml or the extras change. Needs Python 3.10+ (set PYTHON=...).
tjax_venv() {
  local extras="$1" py="${PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: Python 3.10+ is required (found: $("$py" --version 2>&1)); set PYTHON=..." >&2
    return 2
  fi
  [ -x .venv/bin/python ] || "$py" -m venv .venv || return 2
  # shellcheck disable=SC1091
  . .venv/bin/activate
  local hash stamp
  hash="$({ sha1sum pyproject.toml 2>/dev/null || shasum pyproject.toml; } | cut -c1-12)"  # (macOS: shasum)
  stamp=".venv/.installed-$hash-${extras:-none}"
  # No extras asked for: any install of this pyproject.toml (with extras) will do.
  if [ -z "$extras" ] && compgen -G ".venv/.installed-$hash-*" >/dev/null; then return 0; fi
  if [ ! -f "$stamp" ]; then
    echo "installing transformer_jax${extras:+[$extras]} into .venv ..."
    python -m pip install -q --upgrade pip >/dev/null
    python -m pip install -q -e ".${extras:+[$extras]}" || return 2
    rm -f .venv/.installed-* && touch "$stamp"
  fi
}
