#!/usr/bin/env bash
# warmstart GPU check: the GPU tests, then the engine benchmark; a short table last.
#
# For a GPU machine that has Python 3.12 with PyTorch (CUDA), grpcio, onnx and CPU
# onnxruntime, and no network. It installs nothing from the network: the other wheels it
# needs travel with the working tree in the git-ignored .whl/ folder, made beforehand on
# a machine with network by (pins = the versions the project is developed against):
#
#   python -m pip download --dest .whl --only-binary=:all: --no-deps \
#     --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     protobuf==7.36.2 safetensors==0.8.0 prometheus-client==0.26.0 grpcio==1.85.3 \
#     grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3 \
#     googleapis-common-protos==1.76.0 onnxscript==0.7.2 onnx-ir==1.1.0 ml-dtypes==0.6.0 \
#     pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pytest-timeout==2.4.0 \
#     typing-extensions==4.16.0 pygments==2.21.0 onnx==1.23.2
#
# Only the wheels whose distribution is missing or too old are installed, with
# `pip install --no-index --no-deps --target <out>/site`, and that folder goes first on
# PYTHONPATH: nothing is written into the machine's Python. (grpcio and onnx are there for
# a machine whose grpcio is older than the generated code's 1.85.1, or whose onnx is older
# than onnxscript's 1.17; protobuf must be >= 7.35.1.) About 20 MB in all.
#
# Usage (from the repository root):
#   bash bench/gpu_check.sh [--artifact DIR] [--out DIR] [--cpu-dry-run]
#
#   --artifact DIR   an exported artifact <repo>/<name>/<version> to benchmark (carry it
#                    along, e.g. models/ml100k/1); default: build one (synthetic data of
#                    MovieLens-100K's size, ~1 min)
#   --out DIR        where the logs and bench.json go (default: $OUT when set, else a new
#                    temporary directory); the wheels' site folder and a built artifact go
#                    to a scratch directory beside it, so that DIR holds a handful of files
#   --steps LIST     comma-separated steps to run, of tests,bench,breakdown,load (default
#                    all): the GPU tests, the engine benchmark, the CUDA-graph engine's time
#                    breakdown (bench/graph_breakdown.py), the gRPC load benchmark on the
#                    torch engine (bench/load.py)
#   --cpu-dry-run    no GPU needed: every step runs on CPU and the CUDA parts are skipped
#                    with a message (the GPU tests report their skip reason)
#
# Environment: PYTHON (default python3); GPU_CHECK_DEADLINE_S (default 540): the whole
# check stops itself after that many seconds.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
ARTIFACT=""
OUT_DIR="${OUT:-}"
DRY_RUN=0
STEPS="tests,bench,breakdown,load"
while [ $# -gt 0 ]; do
  case "$1" in
    --artifact) ARTIFACT="$2"; shift 2 ;;
    --artifact=*) ARTIFACT="${1#*=}"; shift ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    --steps=*) STEPS="${1#*=}"; shift ;;
    --cpu-dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for step in ${STEPS//,/ }; do
  case "$step" in tests|bench|breakdown|load) ;; *) echo "gpu_check: unknown step $step (tests, bench, breakdown, load)" >&2; exit 2 ;; esac
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }
[ -n "$OUT_DIR" ] || OUT_DIR="$(mktemp -d /tmp/warmstart-gpu-check.XXXXXX)"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SCRATCH="$(mktemp -d /tmp/warmstart-gpu-scratch.XXXXXX)"
cd "$ROOT"

STARTED=$(date +%s)
DEADLINE=$((STARTED + ${GPU_CHECK_DEADLINE_S:-540}))
# Seconds a phase may take: its own limit, or what is left of the deadline if less.
limit() {
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 10 ]; then echo "gpu_check: out of time before $2" >&2; exit 124; fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
phase() { echo; echo "== $* ($(( $(date +%s) - STARTED )) s)"; }

phase "python and devices"
"$PYTHON" - "$DRY_RUN" <<'EOF'
import sys
import torch

dry_run = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
elif dry_run:
    print("CPU dry run: the CUDA parts are skipped (GPU tests report their skip reason, the benchmark runs the CPU engines)")
else:
    sys.exit("gpu_check: torch sees no CUDA device; run with --cpu-dry-run to check the CPU paths")
EOF

phase "wheels from .whl/ (only what is missing or too old)"
SITE="$SCRATCH/site"
NEEDED="$("$PYTHON" - <<'EOF'
from importlib import metadata

# distribution, least version, wheel file prefix; then who must come along when it does.
REQUIRED = [
    ("protobuf", "7.35.1", "protobuf-"),
    ("grpcio", "1.85.1", "grpcio-"),
    ("grpcio-health-checking", "1.66", "grpcio_health_checking-"),
    ("grpcio-reflection", "1.66", "grpcio_reflection-"),
    ("grpcio-status", "1.66", "grpcio_status-"),
    ("googleapis-common-protos", "1.63", "googleapis_common_protos-"),
    ("safetensors", "0.4", "safetensors-"),
    ("prometheus-client", "0.20", "prometheus_client-"),
    ("onnxscript", "0.3", "onnxscript-"),
    ("onnx-ir", "0.1", "onnx_ir-"),
    ("ml-dtypes", "0.5", "ml_dtypes-"),
    ("packaging", "22", "packaging-"),
    ("typing-extensions", "4.12", "typing_extensions-"),
    ("onnx", "1.17", "onnx-"),
    ("pytest", "8", "pytest-"),
    ("pygments", "2.15", "pygments-"),
    ("pluggy", "1.5", "pluggy-"),
    ("iniconfig", "1", "iniconfig-"),
    ("pytest-timeout", "2.3", "pytest_timeout-"),
]
# Generated protobuf / gRPC code checks the runtime it imports: new runtimes bring new code.
COMPANIONS = {
    "protobuf": ["googleapis-common-protos", "grpcio-health-checking", "grpcio-reflection", "grpcio-status"],
    "grpcio": ["grpcio-health-checking", "grpcio-reflection", "grpcio-status"],
}


def version_tuple(text):
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


needed = []
for dist, least, prefix in REQUIRED:
    try:
        ok = version_tuple(metadata.version(dist)) >= version_tuple(least)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        needed.append(dist)
for dist in list(needed):
    for companion in COMPANIONS.get(dist, []):
        if companion not in needed:
            needed.append(companion)
prefixes = {d: p for d, _, p in REQUIRED}
print(" ".join(prefixes[d] for d in needed))
EOF
)"
if [ -z "$NEEDED" ]; then
  echo "nothing to install: every needed distribution is present and new enough"
else
  WHEELS=()
  for prefix in $NEEDED; do
    # The wheel named by prefix (grpcio- does not match grpcio_status-: wheel names use underscores).
    match=$(ls "$ROOT"/.whl/"$prefix"[0-9]*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$match" ]; then
      echo "gpu_check: needs a ${prefix%-} wheel in .whl/ (no network here); make .whl/ with the pip download command in this script's header" >&2
      exit 3
    fi
    WHEELS+=("$match")
  done
  echo "installing into $SITE: ${WHEELS[*]##*/}"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${WHEELS[@]}"
fi
export PYTHONPATH="$SITE:$ROOT:$ROOT/protos${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import google.protobuf, grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, grpc_status, safetensors, prometheus_client, onnxscript, pytest, onnxruntime, warmstart.v1.recommender_pb2_grpc; print('imports ok: protobuf', google.protobuf.__version__, '| grpcio', grpc.__version__, '| onnxruntime', onnxruntime.__version__)"

phase "artifact"
if [ -z "$ARTIFACT" ]; then
  echo "building one (synthetic data of MovieLens-100K's size, factors 16, 40 meta-steps) ..."
  ARTIFACT="$(timeout "$(limit 240 'the artifact build')" "$PYTHON" -c "
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
from bench.engine import build_artifact
print(build_artifact(Path(sys.argv[1])))
" "$SCRATCH/models" | tail -n 1)"
fi
echo "artifact: $ARTIFACT"

TESTS_RC=skipped BENCH_RC=skipped BREAKDOWN_RC=skipped LOAD_RC=skipped
if want tests; then
  phase "GPU tests (engine equivalence on CUDA against the CPU reference, graph replays with fresh inputs, poisoned outputs)"
  TESTS_RC=0
  timeout "$(limit 240 'the tests')" "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/service/test_gpu_engine.py \
    "tests/service/test_engines.py::test_gpu_engines_agree_with_cpu" \
    "tests/service/test_engines.py::test_onnxruntime_and_torch_agree" \
    2>&1 | tee "$OUT_DIR/tests.log" || TESTS_RC=$?
fi

if want bench; then
  phase "engine benchmark"
  if [ "$DRY_RUN" = 1 ]; then
    BENCH_ARGS=(--device cpu --batches 1,64,256 --supports 10 --queries 100,1000 --repeat 2 --min-time-s 0.05 --cpu-roofline)
    echo "CPU dry run: CUDA engines, GPU memory and the GPU roofline are skipped (no CUDA device); the CPU roofline stands in"
  else
    BENCH_ARGS=(--batches 1,8,64,256,1024 --supports 10 --queries 100,1000 --repeat 3 --min-time-s 0.2 --precisions fp32,tf32,bf16)
  fi
  BENCH_RC=0
  timeout "$(limit 300 'the benchmark')" "$PYTHON" bench/engine.py --artifact "$ARTIFACT" --naive-users 16 --no-memory \
    --json "$OUT_DIR/bench.json" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT_DIR/bench.log" || BENCH_RC=$?
fi

if want breakdown; then
  phase "CUDA-graph engine: where the time goes (staging, copies, replay; kernels per call)"
  BREAKDOWN_ARGS=(); [ "$DRY_RUN" = 1 ] && BREAKDOWN_ARGS=(--repeats 5 --cells 1x10x100,64x10x100)
  BREAKDOWN_RC=0
  timeout "$(limit 90 'the breakdown')" "$PYTHON" bench/graph_breakdown.py --artifact "$ARTIFACT" "${BREAKDOWN_ARGS[@]}" \
    2>&1 | tee "$OUT_DIR/breakdown.log" || BREAKDOWN_RC=$?
fi

LOAD_DEVICE=cuda; [ "$DRY_RUN" = 1 ] && LOAD_DEVICE=cpu
if want load; then
  phase "gRPC service on the torch engine (CUDA graphs on a GPU): Recommend load against the empty-RPC ceiling"
  if [ $((DEADLINE - $(date +%s))) -lt 60 ]; then
    echo "not run: under 60 s left before the deadline"; LOAD_RC="not run (out of time)"
  else
    LOAD_RC=0
    timeout "$(limit 120 'the load benchmark')" "$PYTHON" bench/load.py --artifact "$ARTIFACT" --duration-s 3 --warmup-s 1 \
      --clients 1,8,32 --server-arg=--engine=torch --server-arg=--device=$LOAD_DEVICE \
      2>&1 | tee "$OUT_DIR/load.log" || LOAD_RC=$?
  fi
fi

phase "summary"
TEST_SUMMARY="$(grep -E ' (passed|failed|error)' "$OUT_DIR/tests.log" 2>/dev/null | tail -n 1 || true)"
echo "tests: ${TEST_SUMMARY:-no summary line} (exit $TESTS_RC)"
echo "engine benchmark: exit $BENCH_RC (bench.log)"
echo "graph breakdown: exit $BREAKDOWN_RC (breakdown.log)"
echo "gRPC load, torch engine on $LOAD_DEVICE: exit $LOAD_RC (load.log)"
echo "logs in $OUT_DIR"
[ "$DRY_RUN" = 1 ] && echo "CPU dry run: no CUDA part ran"
if [ -f "$OUT_DIR/breakdown.log" ] && [ "$BREAKDOWN_RC" = 0 ]; then
  grep -A 20 "^CUDA-graph engine time" "$OUT_DIR/breakdown.log"
fi
if [ -f "$OUT_DIR/load.log" ] && [ "$LOAD_RC" = 0 ]; then
  grep -E "clients: Recommend / ceiling" "$OUT_DIR/load.log" || true
fi
if [ -f "$OUT_DIR/bench.json" ] && [ "$BENCH_RC" = 0 ]; then
  "$PYTHON" bench/engine.py --summary-only "$OUT_DIR/bench.json"
fi
echo "gpu_check finished in $(( $(date +%s) - STARTED )) s"
for rc in "$TESTS_RC" "$BENCH_RC" "$BREAKDOWN_RC" "$LOAD_RC"; do
  [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1
done
