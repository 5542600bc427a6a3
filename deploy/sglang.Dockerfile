# The GPU teacher image (docker-compose.yml, profile gpu; not built in CI): SGLang's image, which
# brings CUDA torch and the engine, plus this package for `trb-teacher serve --backend sglang` and a
# CUDA `trb-train`. The same image runs the engine (`python3 -m sglang.launch_server`).
#   docker build -f deploy/sglang.Dockerfile -t trb-distill/sglang:local .
ARG SGLANG_IMAGE=lmsysorg/sglang:latest
FROM ${SGLANG_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_DISABLE_TELEMETRY=1
# uid 1000 as in deploy/Dockerfile (--non-unique: the base image may have a user 1000 already), so that
# the teacher and trainer images can share the `trb-key` volume (/run/trb-key, 0700) and its 0600 key.
RUN useradd --create-home --non-unique --uid 1000 trb \
 && mkdir -p /runs /run/trb-key /home/trb/.cache/huggingface \
 && chown -R trb:trb /runs /run/trb-key /home/trb/.cache && chmod 700 /run/trb-key
WORKDIR /app
# Dependencies first: install the package from pyproject.toml with empty modules. SGLang's own
# torch and transformers already satisfy our lower bounds, so pip keeps them (no constraints here:
# the image's pins win).
COPY pyproject.toml ./
RUN mkdir shared decoders teacher_server student_trainer \
 && touch shared/__init__.py decoders/__init__.py teacher_server/__init__.py student_trainer/__init__.py \
 && python3 -m pip install . && python3 -m pip uninstall --yes trb-distill && rm -rf shared decoders teacher_server student_trainer build ./*.egg-info
COPY shared/ shared/
COPY decoders/ decoders/
COPY teacher_server/ teacher_server/
COPY student_trainer/ student_trainer/
RUN python3 -m pip install --no-deps . && rm -rf build ./*.egg-info
COPY recipes/ recipes/
USER trb
EXPOSE 8000 30000
ENTRYPOINT ["trb-teacher", "serve"]
