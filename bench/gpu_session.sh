#!/usr/bin/env bash
# One GPU session's benchmarks, in one command, for a lent machine that reaches no registry.
#
# Why one script: a lent GPU machine starts bare, has no package registry and
# a few minutes of device time, so everything it needs travels with the
# checkout and runs in a single call. It installs the wheels the image lacks
# (diffusers, SQLAlchemy, alembic, Mako, cryptography, cffi, faiss-cpu,
# insightface, platformdirs) from .gpu-wheels/ with --no-index --no-deps
# (transformers, huggingface_hub and tokenizers stay the image's: the locked
# transformers would need huggingface_hub 2.x and its HTTP stack as well),
# prints the versions and nvidia-smi, then runs the GPU benchmarks in priority
# order, each under its own timeout and all under one deadline, so a failing
# or slow bench costs only itself:
#
#   1. bench_generate.py --full-size   (ComposePipeline vs plain SDXL, fp16, 1024x1024, 30 steps;
#      PhotoMaker, StoryMaker, FaceID and InstantID with 1 and 4 identities)
#   2. bench_id_encoders.py --device cuda --dtype float16
#   3. bench_personalize.py --device cuda --dtype bfloat16
#
# It writes to $OUT (at most 8 files): session.log (install, versions,
# nvidia-smi, one line per bench), generate.log, id_encoders.log,
# personalize.log and summary.json (exit status and seconds per bench).
#
# Preparing .gpu-wheels (ignored through .git/info/exclude, never committed),
# on a machine with a registry, from the repository root:
#
#   pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .gpu-wheels $(bench/gpu_session.sh --print-wheels)
#   mkdir -p .gpu-wheels/manifests && cp ../shared/reference/manifests/base_models.json \
#       .gpu-wheels/manifests/
#
# Then, on the device (carry .gpu-wheels): OUT=... bash bench/gpu_session.sh
#
# A CPU rehearsal (no GPU; everything but CUDA, tiny sizes), in a venv with the image's
# versions; GPU_SESSION_FIND_LINKS holds the compiled wheels built for its Python:
#   GPU_SESSION_SMOKE=1 PYTHON=/tmp/venv/bin/python GPU_SESSION_FIND_LINKS=/tmp/wheels311 \
#       OUT=/tmp/out bash bench/gpu_session.sh
# Knobs: PYTHON (default python3), GPU_SESSION_BUDGET (seconds for the whole
# script, default 400), GPU_SESSION_SITE (install target, default /tmp/idvault-site),
# GPU_SESSION_FIND_LINKS (extra wheel folder, e.g. same versions for another Python).

set -u

# The locked versions (constraints.txt) of what the image lacks and the benches import.
WHEELS="diffusers==0.42.1 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 cryptography==51.0.1
cffi==2.1.1 pycparser==3.12 faiss-cpu==1.15.1 insightface==2.1 platformdirs==4.14.9"
if [ "${1:-}" = "--print-wheels" ]; then echo $WHEELS; exit 0; fi

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${GPU_SESSION_SITE:-/tmp/idvault-site}
BUDGET=${GPU_SESSION_BUDGET:-400}
SMOKE=${GPU_SESSION_SMOKE:-0}
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export IDVAULT_REFERENCE_MANIFESTS=$ROOT/.gpu-wheels/manifests  # bench_personalize reads it
SUMMARY=()

say() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

# run_bench NAME CAP_SECONDS CMD...: the bench's output to $OUT/NAME.log; never fails the script.
run_bench() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 30 ]; then
        say "$name: skipped, ${left}s left of the ${BUDGET}s budget"
        SUMMARY+=("{\"bench\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true}")
        return
    fi
    say "$name: timeout ${limit}s: $*"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    say "$name: rc $rc after ${took}s$([ $rc = 124 ] && echo ' (TIMED OUT)'); last lines:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    SUMMARY+=("{\"bench\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"timeout\": $limit}")
}

say "idvault GPU session: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
    "budget ${BUDGET}s, smoke $SMOKE"
say "install into $SITE: $WHEELS"
# shellcheck disable=SC2086  # WHEELS is a list of requirements
timeout 180 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" --find-links "$ROOT/.gpu-wheels" \
    ${GPU_SESSION_FIND_LINKS:+--find-links "$GPU_SESSION_FIND_LINKS"} $WHEELS >>"$LOG" 2>&1 \
    || say "pip install FAILED (the benches run anyway; their logs will say what is missing)"

timeout 120 "$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, os, platform, sys, time
t = time.perf_counter()
import torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; import torch "
      f"{time.perf_counter() - t:.1f} s")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
else:
    print("no CUDA device visible")
for name in ("transformers", "huggingface_hub", "tokenizers", "diffusers", "accelerate",
             "peft", "safetensors", "numpy", "scipy", "scikit-image", "pillow",
             "opencv-python-headless", "onnx", "onnxruntime", "onnxruntime-gpu",
             "sqlalchemy", "alembic", "cryptography", "faiss-cpu", "insightface",
             "platformdirs", "torchvision", "kernels"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
t = time.perf_counter()
# The benches' import chain, before any of them spends time: a failure shows here first.
for mod in ("vault.vault", "encoders.id.photomaker", "encoders.id.storymaker",
            "generators.compose", "generators.standins.full_size_sdxl",
            "encoders.fitting.core", "diffusers"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - report every failing module
        print(f"IMPORT FAILED {mod}: {type(exc).__name__}: {exc}")
print(f"import chain {time.perf_counter() - t:.1f} s")
import onnxruntime
print("onnxruntime providers", onnxruntime.get_available_providers())
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi >>"$LOG" 2>&1
else
    say "nvidia-smi: not found"
fi
say "environment done"

MANIFESTS=$ROOT/.gpu-wheels/manifests
if [ "$SMOKE" = 1 ]; then
    # Every code path but CUDA, at tiny sizes; the full-size model on the CPU is a separate,
    # slower rehearsal (bench_generate.py's docstring).
    run_bench generate 600 "$PY" bench/bench_generate.py --manifests "$MANIFESTS" \
        --size 64x64 --steps 2 --rounds 2 --time-budget 60
    run_bench id_encoders 600 "$PY" bench/bench_id_encoders.py --iters 1 --batches 1,2 \
        --only photomaker
    run_bench personalize 900 "$PY" bench/bench_personalize.py --steps 1 --size 64 \
        --only lidb
else
    # Setup (checkpoints written on the CPU, the model built on the GPU) then 6 variants x
    # (warm-up + up to 5 rounds); --time-budget starts no round that would end past 210 s.
    # The adapters (issue 15) ride in the same run: one model build, one plain baseline.
    run_bench generate 270 "$PY" bench/bench_generate.py --full-size --manifests "$MANIFESTS" \
        --variants photomaker-x1,photomaker-x4,storymaker-x1,faceid-x1,faceid-x4,instantid-x1,instantid-x4 \
        --time-budget 210
    run_bench id_encoders 75 "$PY" bench/bench_id_encoders.py --device cuda --dtype float16 \
        --iters 5
    run_bench personalize 90 "$PY" bench/bench_personalize.py --device cuda --dtype bfloat16 \
        --steps 3
fi

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm \
        --format=csv >>"$LOG" 2>&1
fi
(IFS=,; echo "[${SUMMARY[*]}]") >"$OUT/summary.json"
say "done in ${SECONDS}s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
