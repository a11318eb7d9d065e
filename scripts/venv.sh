# Sourced by the scripts: make .venv hold exactly constraints.txt + this project (editable).
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
VENV=${OPPEN_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$VENV/.oppen-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing dependencies into $VENV (constraints.txt)"
  # torch first and alone: pinned, it takes the local CPU wheel instead of a multi-GB CUDA build.
  "$VENV/bin/pip" install -q -c constraints.txt torch
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
