#!/usr/bin/env bash
# The engines side by side on one NVIDIA GPU, in under 8 minutes, installs included:
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu
#
# Installs the project, PyPI's CUDA build of torch (the test extra's pins) and open_clip into its own
# venv, then tries mlx[cuda]. Runs each row in its own worker process under a time limit: the torch
# engine's and open_clip's train steps (fp32, amp_bf16), the torch engine's inference, and the MLX
# engine's train steps and inference on CUDA. A row that fails, hangs or finds no GPU is a failed row
# in the table, never the end of the run. Writes OUT_DIR/gpu.json and gpu.md and prints the markdown.
# CI never runs this (no GPU there); tests/test_gpu_script.py checks it on the CPU.
#
# Settings (environment):
#   GPU_BENCH_SIZE=b32|tiny     the worker's model size (b32: the built-in vit-b32, random weights)
#   GPU_BENCH_BATCH=256  GPU_BENCH_STEPS=5  GPU_BENCH_WARMUP=2
#   GPU_BENCH_DEVICE=cuda       the torch rows' device; GPU_BENCH_MLX_DEVICE=gpu the MLX train rows'
#   GPU_BENCH_BUDGET_S=450      the whole run's time; rows left without time are recorded as skipped
#   GPU_BENCH_ROW_LIMIT_S       a cap on every row's own time limit (the plan gives 100 s, MLX 150 s)
#   GPU_BENCH_VENV=.venv-gpu    GPU_BENCH_MLX_EXTRA=cuda (cuda12 | cuda13: MLX's other CUDA builds)
#   GPU_BENCH_SKIP_INSTALL=1    use GPU_BENCH_PYTHON (default: python on PATH) as it is
#   GPU_BENCH_CPU=1             a smoke run without a GPU: skip the install, tiny model, batch 16,
#                               1 + 2 steps, every row on the CPU (MLX too)

set -euo pipefail

START=$SECONDS
OUT_ARG=${1:-benchmarks/results/gpu}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
cd "$OLDPWD"  # OUT_DIR is relative to where the script was called from
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
cd "$ROOT"
REPORT="$ROOT/benchmarks/gpu_report.py"  # by path: stdlib only, runs even if the install failed

if [[ ${GPU_BENCH_CPU:-0} == 1 ]]; then
  : "${GPU_BENCH_SKIP_INSTALL:=1}" "${GPU_BENCH_SIZE:=tiny}" "${GPU_BENCH_BATCH:=16}" "${GPU_BENCH_STEPS:=2}"
  : "${GPU_BENCH_WARMUP:=1}" "${GPU_BENCH_DEVICE:=cpu}" "${GPU_BENCH_MLX_DEVICE:=cpu}"
fi
SIZE=${GPU_BENCH_SIZE:-b32}
BATCH=${GPU_BENCH_BATCH:-256}
STEPS=${GPU_BENCH_STEPS:-5}
WARMUP=${GPU_BENCH_WARMUP:-2}
DEVICE=${GPU_BENCH_DEVICE:-cuda}
MLX_DEVICE=${GPU_BENCH_MLX_DEVICE:-gpu}
BUDGET_S=${GPU_BENCH_BUDGET_S:-450}
ROW_LIMIT_S=${GPU_BENCH_ROW_LIMIT_S:-600}
VENV=${GPU_BENCH_VENV:-.venv-gpu}
MLX_EXTRA=${GPU_BENCH_MLX_EXTRA:-cuda}
REPORT_RESERVE_S=10  # kept back from the rows for writing the report
MIN_ROW_S=15         # a row given less could not even import torch

log() { printf '[%4ds] %s\n' $((SECONDS - START)) "$*"; }
left_s() { echo $((START + BUDGET_S - SECONDS - REPORT_RESERVE_S)); }
last_line() { { grep -v '^[[:space:]]*$' "$1" 2>/dev/null || true; } | tail -n 1 | cut -c1-300; }
first_error() {  # pip's or uv's first error line in a log (their last lines are hints), else its last line
  local said
  # pip's "dependency resolver does not currently take into account" ERROR comes with installs that worked.
  said=$(grep -E '^ *ERROR: ' "$1" 2>/dev/null | grep -v 'dependency resolver' | head -n 1 | sed 's/^ *//' |
         cut -c1-300) || true
  if [[ -z $said ]]; then said=$(grep -E -m 1 '^error: ' "$1" 2>/dev/null | cut -c1-300) || true; fi
  echo "${said:-$(last_line "$1")}"
}

rm -f "$OUT"/rows.tsv "$OUT"/gpu.json "$OUT"/gpu.md "$OUT"/install*.log
rm -rf "$OUT/rows"
mkdir -p "$OUT/rows"
exec > >(tee "$OUT/gpu.log") 2>&1

GPU_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)
GPU_LINE=${GPU_LINE:-"no GPU found (nvidia-smi missing or failed)"}
log "GPU: $GPU_LINE"

# --- install -----------------------------------------------------------------------------------
INSTALL_ERROR=""
UV=""
pip_install() {  # uv when it installed (several times faster on the CUDA wheels), else pip
  if [[ -n $UV ]] && "$UV" pip install --python "$PY" "$@"; then return 0; fi
  "$PY" -m pip install --disable-pip-version-check "$@"
}
pip_uninstall() { "$PY" -m pip uninstall --disable-pip-version-check -y "$@" > /dev/null 2>&1 || true; }
reinstall_no_deps() {  # rewrites the files another wheel with the same paths overwrote or removed
  if [[ -n $UV ]] && "$UV" pip install --python "$PY" --reinstall --no-deps "$@"; then return 0; fi
  "$PY" -m pip install --disable-pip-version-check --force-reinstall --no-deps "$@"
}

if [[ ${GPU_BENCH_SKIP_INSTALL:-0} == 1 ]]; then
  PY=$(command -v "${GPU_BENCH_PYTHON:-python}")
  log "install skipped: $PY"
else
  BASE_PY=${GPU_BENCH_BASE_PYTHON:-python3}
  if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    INSTALL_ERROR="$BASE_PY is older than Python 3.11 (set GPU_BENCH_BASE_PYTHON)"
  else
    if [[ ! -x $VENV/bin/python ]]; then "$BASE_PY" -m venv "$VENV"; fi
    echo '*' > "$VENV/.gitignore"  # what Python 3.13's venv writes: git never lists the venv
    PY=$(cd "$VENV/bin" && pwd)/python
    if "$PY" -m pip install -q --disable-pip-version-check uv > "$OUT/install-uv.log" 2>&1; then
      UV=$(dirname "$PY")/uv
    fi
    export UV PY
    export -f pip_install pip_uninstall reinstall_no_deps
    PINS=$("$PY" "$REPORT" pins pyproject.toml) || PINS=""
    if [[ -z $PINS ]]; then
      INSTALL_ERROR="no torch stack pins read from pyproject.toml's test extra"
    else
      log "installing the project and" $PINS "with ${UV:+uv}${UV:-pip} ..."
      # shellcheck disable=SC2086  # one requirement a word, none with spaces
      if ! timeout 300 bash -c 'pip_install -e . "$@"' _ $PINS >> "$OUT/install.log" 2>&1; then
        INSTALL_ERROR="install failed (install.log): $(first_error "$OUT/install.log")"
      fi
    fi
  fi
fi
PY=${PY:-python3}
if [[ -n $INSTALL_ERROR ]]; then log "$INSTALL_ERROR"; fi

TORCH_LINE=$("$PY" -c 'import torch; print(f"{torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")' 2> /dev/null) || TORCH_LINE="not importable"
log "torch: $TORCH_LINE"
GIT=$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null) || GIT=unknown

# The weights every row starts from, written once before the first row times anything.
MODEL=$("$PY" -c "from mlx_clip.api import resolve; from mlx_clip.benchmarks.worker import SIZES
resolve(SIZES['$SIZE']); print(SIZES['$SIZE'])" 2>> "$OUT/install.log") || MODEL=$SIZE
"$PY" "$REPORT" plan "$OUT" --size "$SIZE" --model "$MODEL" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" \
  --device "$DEVICE" --mlx-device "$MLX_DEVICE"

# --- mlx[cuda]: installed when the first MLX row comes, after the torch rows -----------------------
MLX_STATUS=""
mlx_probe() {  # "ok: ..." where MLX runs on a CUDA GPU, else why not (the error's last line)
  local said
  said=$("$PY" - 2>&1 <<'PYTHON'
import mlx.core as mx
if not mx.cuda.is_available():
    raise SystemExit("mx.cuda.is_available() is False")
mx.eval(mx.ones((64, 64), stream=mx.gpu) @ mx.ones((64, 64), stream=mx.gpu))
print(f"ok: mlx {mx.__version__}, {mx.device_info(mx.gpu).get('device_name', 'GPU')}")
PYTHON
) || true
  printf '%s\n' "$said" | { grep -v '^[[:space:]]*$' || true; } | tail -n 1 | cut -c1-300
}
install_mlx_cuda() {
  local version package limit
  version=$("$PY" -c 'import importlib.metadata as m; print(m.version("mlx"))' 2> /dev/null) || version=""
  limit=$(left_s)
  if (( limit > 150 )); then limit=150; fi
  if [[ -z $version ]]; then MLX_STATUS="install skipped: no mlx installed to match"; return 0; fi
  if (( limit < 30 )); then MLX_STATUS="install skipped: out of time"; return 0; fi
  package=mlx-cuda-12
  if [[ $MLX_EXTRA == cuda13 ]]; then package=mlx-cuda-13; fi
  log "installing mlx[$MLX_EXTRA]==$version (limit $limit s) ..."
  # mlx-cpu and mlx-cuda-* both ship mlx/lib/libmlx.so: uninstalling mlx-cpu deletes the file, so
  # the CUDA wheel is written again after it.
  if timeout "$limit" bash -c 'pip_install "mlx[$1]==$2" && pip_uninstall mlx-cpu && reinstall_no_deps "$3==$2"' \
       _ "$MLX_EXTRA" "$version" "$package" > "$OUT/install-mlx.log" 2>&1; then
    MLX_STATUS=$(mlx_probe)
  else
    MLX_STATUS="install failed (install-mlx.log): $(first_error "$OUT/install-mlx.log")"
  fi
  if [[ $MLX_STATUS != ok:* ]]; then  # the CPU build back, as `pip install -e .` left it
    pip_uninstall "$package"
    reinstall_no_deps "mlx-cpu==$version" >> "$OUT/install-mlx.log" 2>&1 || true
  fi
}
ensure_mlx_cuda() {
  if [[ -n $MLX_STATUS ]]; then return 0; fi
  if [[ $MLX_DEVICE != gpu ]]; then MLX_STATUS="not used: the MLX rows run on $MLX_DEVICE"; return 0; fi
  if [[ ${GPU_BENCH_SKIP_INSTALL:-0} == 1 ]]; then MLX_STATUS=$(mlx_probe); else install_mlx_cuda; fi
  if [[ $MLX_STATUS != ok:* ]]; then MLX_STATUS="unavailable: ${MLX_STATUS:-no message}"; fi
  log "mlx[cuda]: $MLX_STATUS"
}

# --- rows ----------------------------------------------------------------------------------------
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/rows.tsv"; }
skip() { echo "$3" > "$OUT/$2.err"; record "$1" skipped 0 "$2"; log "$1: skipped ($3)"; }
index=0
while IFS=$'\t' read -r -u 3 name task args limit needs_mlx; do
  index=$((index + 1))
  stem=$(printf 'rows/%02d' "$index")
  if [[ -n $INSTALL_ERROR ]]; then skip "$name" "$stem" "$INSTALL_ERROR"; continue; fi
  if [[ $needs_mlx == 1 ]]; then
    ensure_mlx_cuda
    if [[ $MLX_DEVICE == gpu && $MLX_STATUS != ok:* ]]; then skip "$name" "$stem" "mlx[cuda] $MLX_STATUS"; continue; fi
  fi
  left=$(left_s)
  if (( left < MIN_ROW_S )); then skip "$name" "$stem" "out of time: $left s of the $BUDGET_S s budget left"; continue; fi
  if (( limit > left )); then limit=$left; fi
  if (( limit > ROW_LIMIT_S )); then limit=$ROW_LIMIT_S; fi
  log "$name (limit $limit s) ..."
  began=$SECONDS
  status=0
  timeout --kill-after=10 "$limit" "$PY" -m mlx_clip.benchmarks.worker "$task" "$args" \
    < /dev/null > "$OUT/$stem.out" 2> "$OUT/$stem.err" || status=$?
  record "$name" "$status" $((SECONDS - began)) "$stem"
  case $status in
    0) ;;
    124 | 137) log "$name: timed out after $limit s" ;;
    *) log "$name: failed (exit $status): $(last_line "$OUT/$stem.err")" ;;
  esac
done 3< "$OUT/plan.tsv"
if [[ -z $MLX_STATUS ]]; then MLX_STATUS="not reached"; fi

"$PY" "$REPORT" report "$OUT" --gpu "$GPU_LINE" --torch "$TORCH_LINE" --mlx-cuda "$MLX_STATUS" --git "$GIT" \
  --seconds $((SECONDS - START))
log "wrote $OUT/gpu.json and $OUT/gpu.md"
[[ -z $INSTALL_ERROR ]]
