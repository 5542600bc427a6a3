#!/usr/bin/env bash
# Real SGLang 0.5.23 for the engine tests: its own venv, built from the registry with pinned versions.
#
#   scripts/engines/sglang.sh      # builds or reuses the venv; the last line printed is its python
#
# The venv is ${TRB_ENGINES_DIR:-$HOME/.cache/trb-distill/engines}/sglang-0.5.23 (6.1 GB, 3.2 GB of it the
# CUDA libraries torch 2.14.1 links against; a cold build took 7 min 50 s on 2 cores shared with other
# jobs, most of it downloading and unpacking torch and those libraries). A stamp in it
# records the pins and this recipe, so a second run exits at once. A venv without a matching stamp (an
# older recipe, an interrupted build, one made by hand) is removed and built again.
#
# How SGLang runs on a CPU here (tests/engines/sglang_engine.py starts it):
#  - `sglang==0.5.23` is installed --no-deps: its requirements name CUDA-only packages (flashinfer,
#    sglang-kernel, deep-gemm, tilelang, ...). What it imports on its CPU path is pinned below instead.
#  - torch 2.14.1 + torchvision 0.29.1 (the registry's CUDA builds; they import and run on a CPU, and
#    torch cannot load without the nvidia-* libraries they pull in). torch 2.13's CPU build fails
#    importing torchvision.
#  - `sgl_kernel` is not installed: the registry has only CUDA builds of it. The server runs with the
#    import stand-in tests/engines/sgl_kernel_standin on its PYTHONPATH (see its docstring).
# Set PYTHON to choose the interpreter the venv is made from (default python3; it must be CPython 3.11:
# the sglang 0.5.23 wheel is cp311).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
standin=$repo/tests/engines/sgl_kernel_standin
engines=${TRB_ENGINES_DIR:-$HOME/.cache/trb-distill/engines}
venv=$engines/sglang-0.5.23
py=$venv/bin/python
stamp=$venv/.trb-engine-stamp

log() { echo "sglang.sh: $*" >&2; }

# `pip freeze` of a working venv (CPython 3.11, x86_64), less sglang itself.
pins=$(cat <<'EOF'
# torch and what it pulls in (CUDA builds; the nvidia-* libraries are needed to import torch at all)
torch==2.14.1
torchvision==0.29.1
cuda-bindings==13.5.0
cuda-pathfinder==1.9.1
cuda-toolkit==13.0.3.0
filelock==4.3.2
fsspec==2026.9.0
Jinja2==3.1.6
MarkupSafe==3.0.4
mpmath==1.3.0
networkx==3.6.1
numpy==2.4.6
nvidia-cublas==13.1.1.3
nvidia-cuda-cupti==13.0.85
nvidia-cuda-nvrtc==13.0.88
nvidia-cuda-runtime==13.0.96
nvidia-cudnn-cu13==9.24.0.43
nvidia-cufft==12.0.0.61
nvidia-cufile==1.15.1.6
nvidia-curand==10.4.0.35
nvidia-cusolver==12.0.4.66
nvidia-cusparse==12.6.3.3
nvidia-cusparselt-cu13==0.8.1
nvidia-nccl-cu13==2.30.7
nvidia-nvjitlink==13.5.37
nvidia-nvshmem-cu13==3.4.5
nvidia-nvtx==13.0.85
pillow==13.0.0
setuptools==84.2.1
sympy==1.14.0
triton==3.8.0
typing_extensions==4.16.0
# SGLang 0.5.23's own requirements that its server imports on a CPU (versions as its metadata pins them
# where it does), and dill, jsonschema, which it imports without declaring them
aiohttp==3.14.5
apache-tvm-ffi==0.1.11
blobfile==3.0.0
compressed-tensors==0.18.0
dill==0.4.1
distro==1.9.0
easydict==1.14
einops==0.8.2
fastapi==0.165.0
gguf==0.19.0
interegular==0.3.3
ipython==9.19.1
jsonschema==4.26.0
llguidance==1.9.1
msgspec==0.23.0
ninja==1.13.2
openai==2.8.0
openai-harmony==0.0.4
orjson==3.13.0
packaging==26.4
partial-json-parser==0.2.1.1.post7
prometheus_client==0.26.0
psutil==7.2.2
pybase64==1.5.1
pydantic==2.14.4
python-dateutil==2.9.0.post0
python-multipart==0.0.34
pyzmq==27.3.0
regex==2026.12.2
requests==2.34.2
scipy==1.17.1
sentencepiece==0.2.1
setproctitle==1.3.8
soundfile==0.13.1
tiktoken==0.14.0
tokenizers==0.23.2
tqdm==4.70.1
transformers==5.19.0
uvicorn==0.55.0
uvloop==0.23.0
watchfiles==1.3.0
xgrammar==0.2.7
xxhash==4.1.0
zstandard==0.25.0
# their dependencies
aiohappyeyeballs==2.7.1
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
asttokens==3.0.2
attrs==26.1.0
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
executing==2.3.0
frozenlist==1.8.0
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpx==0.29.0
huggingface_hub==1.33.0
idna==3.21
ipython_pygments_lexers==1.1.1
jedi==0.20.1
jiter==0.19.0
jsonschema-specifications==2025.9.1
loguru==0.7.3
lxml==6.2.1
markdown-it-py==4.3.0
matplotlib-inline==0.2.2
mdurl==0.1.2
multidict==7.2.1
opentelemetry-api==1.45.3
parso==0.8.7
pexpect==4.9.0
prompt_toolkit==3.0.53
propcache==0.5.4
ptyprocess==0.7.0
pure_eval==0.2.4
pycparser==3.12
pycryptodomex==3.24.2
pydantic_core==2.50.5
Pygments==2.21.0
PyYAML==6.0.4
referencing==0.37.0
rich==15.0.0
rpds-py==2026.9.1
safetensors==0.8.0
shellingham==1.5.4
six==1.17.0
sniffio==1.3.1
stack-data==0.6.3
starlette==1.10.0
traitlets==5.16.1
typer==0.29.2
typing-inspection==0.4.5
urllib3==2.8.0
wcwidth==0.9.5
yarl==1.25.1
EOF
)
pip_version=26.3

# What the stamp must say for the venv to be reused: the pins and the recipe of this script.
want="sglang==0.5.23 recipe=1 pip=$pip_version pins=$(printf '%s\n' "$pins" | sha256sum | cut -d' ' -f1)"

reuse() { [[ -x $py && -f $stamp && "$(cat "$stamp")" == "$want" ]]; }

if reuse; then
  log "reusing $venv"
  echo "$py"
  exit 0
fi

mkdir -p "$engines"
# One build at a time (two test runs may start together); the second reuses the first's venv.
exec 9>"$engines/sglang-0.5.23.lock"
flock 9
if reuse; then
  log "reusing $venv (built meanwhile)"
  echo "$py"
  exit 0
fi

python=${PYTHON:-python3}
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $pyver != 3.11 ]]; then
  log "$python is Python $pyver; the sglang 0.5.23 wheel and these pins are for CPython 3.11 (set PYTHON)"
  exit 1
fi

started=$SECONDS
if [[ -e $venv ]]; then
  log "removing $venv (no matching stamp: an older recipe or an interrupted build)"
  rm -rf "$venv"
fi
log "creating $venv"
"$python" -m venv "$venv"
# pip's "Location ... is ignored" lines (an extra index that lacks a package) are noise here.
pip() {
  "$py" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
pip install --quiet "pip==$pip_version"

pinfile=$(mktemp)
trap 'rm -f "$pinfile"' EXIT
printf '%s\n' "$pins" > "$pinfile"
log "installing torch 2.14.1 and SGLang's requirements, pinned (a cold build takes several minutes)"
pip install --quiet -r "$pinfile"
log "installing sglang==0.5.23 --no-deps"
pip install --quiet --no-deps sglang==0.5.23

log "checking that the venv holds exactly the pins"
"$py" -I - "$pinfile" <<'EOF'
import re
import sys
from importlib.metadata import distributions

def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

want = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, version = line.split("==", 1)
        want[canon(name)] = version
want["sglang"] = "0.5.23"
have = {canon(d.metadata["Name"]): d.version for d in distributions()}
for tool in ("pip", "wheel"):
    have.pop(tool, None)
bad = [f"{n}: {have.get(n, 'missing')} != {v}" for n, v in sorted(want.items()) if have.get(n) != v]
bad += [f"{n} {v}: not pinned" for n, v in sorted(have.items()) if n not in want]
if bad:
    sys.exit("sglang.sh: the venv does not match the pins:\n  " + "\n  ".join(bad))
EOF

log "checking that SGLang's CPU path imports (with the sgl_kernel stand-in)"
SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=$standin "$py" -W ignore -c '
import sglang, torch, transformers
assert sglang.__version__ == "0.5.23", sglang.__version__
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
import sglang.launch_server, sglang.srt.managers.scheduler, sglang.srt.mem_cache.allocation
print("sglang", sglang.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
' >&2

echo "$want" > "$stamp"
log "built in $((SECONDS - started)) s, $(du -sh "$venv" | cut -f1)"
echo "$py"
