#!/usr/bin/env bash
# Train, evaluate and pack the shipped reference models + judges on one GPU (H100), in two runs
# of < 9 minutes each, from the repository root:
#
#   OUT=/some/dir bash scripts/train_reference_gpu.sh judge+image   # judge-image ~1 min, reference-image ~5 min, eval 1000 samples
#   OUT=/some/dir SKIP_JUDGE=1 bash scripts/train_reference_gpu.sh video   # reuse shipped judge-video, reference-video 7.25 min
#                                                    # (torch.compile, batch 128, lr 1e-3), eval 256 clips
#
# Each stage writes at most 6 files under $OUT (each well under 16 MiB):
#   judge+image: judge-image.tar  reference-image.tar  eval-image.json  reference-image-grid.png  logs-image.tar.gz
#   video:       judge-video.tar  reference-video.tar  eval-video.json  reference-video-grid.png
#                reference-video-grid.gif  logs-video.tar.gz
# Ship the weights with:   for t in judge-*.tar reference-*.tar; do tar -C src/diffspeed/weights -xf "$t"; done
# Weights are tarred right after each training, so a failure later in the stage still returns them.
#
# Every knob is an environment variable (defaults below). SKIP_JUDGE=1 reuses the judge already shipped in
# src/diffspeed/weights/judge-<kind> instead of training it (its minute can go to the model: IMAGE_MIN=6).
# A CPU smoke test:
#   DEVICE=cpu STEPS=20 JUDGE_STEPS=20 IMAGE_BATCH=8 VIDEO_BATCH=2 JUDGE_BATCH=16 VJUDGE_BATCH=4 \
#   IMAGE_SAMPLES=24 VIDEO_SAMPLES=8 EVAL_STEPS=3 HELDOUT_IMAGE=96 HELDOUT_VIDEO=32 PYTHON=.venv/bin/python \
#   OUT=/tmp/smoke bash scripts/train_reference_gpu.sh judge+image
set -uo pipefail

STAGE="${1:-}"
case "$STAGE" in
  judge+image|video) ;;
  *) echo "usage: OUT=DIR $0 judge+image|video" >&2; exit 2 ;;
esac
OUT="${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-/tmp/diffspeed_train}"
W="$WORK/weights"          # weights root: $W/<name>/
L="$WORK/logs-$STAGE"      # loss curves, histories, eval JSON, grids
# time budgets (minutes; training stops and the LR schedule anneals within them)
JUDGE_MIN="${JUDGE_MIN:-1}"
IMAGE_MIN="${IMAGE_MIN:-5}"
VIDEO_JUDGE_MIN="${VIDEO_JUDGE_MIN:-1}"
VIDEO_MIN="${VIDEO_MIN:-7.25}"      # with SKIP_JUDGE=1; use 5.75 when the judge is trained too
# step caps (the time budget normally binds first)
STEPS="${STEPS:-1000000}"
JUDGE_STEPS="${JUDGE_STEPS:-1000000}"
# batch sizes and learning rates
JUDGE_BATCH="${JUDGE_BATCH:-512}"
VJUDGE_BATCH="${VJUDGE_BATCH:-256}"
IMAGE_BATCH="${IMAGE_BATCH:-512}"
VIDEO_BATCH="${VIDEO_BATCH:-128}"   # more optimizer steps in the budget; samples/s is ~flat in batch
IMAGE_LR="${IMAGE_LR:-5e-4}"
VIDEO_LR="${VIDEO_LR:-1e-3}"         # 5e-4 was too slow (2.1k steps: junk); the image model needed 1e-3
JUDGE_LR="${JUDGE_LR:-2e-3}"
# evaluation
IMAGE_SAMPLES="${IMAGE_SAMPLES:-1000}"
VIDEO_SAMPLES="${VIDEO_SAMPLES:-256}"
EVAL_STEPS="${EVAL_STEPS:-25}"
GUIDANCE="${GUIDANCE:-4 2 1}"          # first value = the headline row and the grid
HELDOUT_IMAGE="${HELDOUT_IMAGE:-2400}"
HELDOUT_VIDEO="${HELDOUT_VIDEO:-800}"
SEED="${SEED:-0}"
SKIP_JUDGE="${SKIP_JUDGE:-0}"
COMPILE="${COMPILE:-0}"                # 1: torch.compile the image training forward (opt-in; falls back to eager)
VIDEO_COMPILE="${VIDEO_COMPILE:-1}"    # video: compile by default (fuses Wan's fp32 elementwise work; falls back to eager)

T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
FAILED=0
run() {  # run a command, report its time and status, remember failures
  local t=$(date +%s)
  stamp "start: $*"
  "$@"
  local rc=$?
  stamp "end (rc=$rc, $(( $(date +%s) - t ))s): $1 ${2:-} ${3:-} ${4:-}"
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}
judge_stage() {  # judge_stage <kind> <batch> <minutes> <heldout>: train the judge, or reuse the shipped one
  if [ "$SKIP_JUDGE" = "1" ]; then
    if [ -f "src/diffspeed/weights/judge-$1/model.safetensors" ]; then
      rm -rf "$W/judge-$1" && cp -r "src/diffspeed/weights/judge-$1" "$W/judge-$1"
      stamp "reusing the shipped judge-$1 (SKIP_JUDGE=1)"
      return 0
    fi
    echo "!!! SKIP_JUDGE=1 but src/diffspeed/weights/judge-$1 is missing: training it"
  fi
  run "${TRAIN[@]}" judge --kind "$1" --device "$DEVICE" --steps "$JUDGE_STEPS" --batch-size "$2" \
      --lr "$JUDGE_LR" --max-minutes "$3" --heldout "$4" --out "$W" --log-dir "$L" --seed "$SEED"
}
pack_weights() {  # tar <name> from the weights root into $OUT/<name>.tar
  if [ -d "$W/$1" ]; then
    tar -C "$W" -cf "$OUT/$1.tar" "$1" && stamp "packed $OUT/$1.tar ($(du -h "$OUT/$1.tar" | cut -f1))"
  else
    echo "!!! $W/$1 missing, nothing to pack"; FAILED=1
  fi
}

# ---- environment -------------------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:src"
else
  export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$W" "$L"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
"$PY" - <<'EOF'
import torch, diffusers
print(f"torch {torch.__version__} diffusers {diffusers.__version__} cuda {torch.cuda.is_available()}"
      + (f" {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
EOF
TRAIN=("$PY" -m diffspeed.train.cli)
COMPILE_ARGS=()
[ "$COMPILE" = "1" ] && COMPILE_ARGS=(--compile)
VCOMPILE_ARGS=()
[ "$VIDEO_COMPILE" = "1" ] && VCOMPILE_ARGS=(--compile)
[ -n "${VIDEO_INIT:-}" ] && VCOMPILE_ARGS+=(--init-from "$VIDEO_INIT")   # warm start (e.g. src/diffspeed/weights/reference-video)
GUIDANCE_ARGS=()
for g in $GUIDANCE; do GUIDANCE_ARGS+=(--guidance "$g"); done

# ---- stages ------------------------------------------------------------------------------------
if [ "$STAGE" = "judge+image" ]; then
  judge_stage image "$JUDGE_BATCH" "$JUDGE_MIN" "$HELDOUT_IMAGE"
  pack_weights judge-image
  run "${TRAIN[@]}" image --device "$DEVICE" --steps "$STEPS" --batch-size "$IMAGE_BATCH" --lr "$IMAGE_LR" \
      --max-minutes "$IMAGE_MIN" --out "$W" --log-dir "$L" --seed "$SEED" ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"}
  pack_weights reference-image
  run "${TRAIN[@]}" evaluate --model reference-image --samples "$IMAGE_SAMPLES" --steps "$EVAL_STEPS" \
      "${GUIDANCE_ARGS[@]}" --device "$DEVICE" --weights-dir "$W" --out-json "$L/eval-image.json" \
      --grid "$L/reference-image-grid.png"
  for f in eval-image.json reference-image-grid.png; do [ -f "$L/$f" ] && cp "$L/$f" "$OUT/$f"; done
  tar -C "$L" -czf "$OUT/logs-image.tar.gz" .
else
  judge_stage video "$VJUDGE_BATCH" "$VIDEO_JUDGE_MIN" "$HELDOUT_VIDEO"
  pack_weights judge-video
  run "${TRAIN[@]}" video --device "$DEVICE" --steps "$STEPS" --batch-size "$VIDEO_BATCH" --lr "$VIDEO_LR" \
      --max-minutes "$VIDEO_MIN" --out "$W" --log-dir "$L" --seed "$SEED" ${VCOMPILE_ARGS[@]+"${VCOMPILE_ARGS[@]}"}
  pack_weights reference-video
  run "${TRAIN[@]}" evaluate --model reference-video --samples "$VIDEO_SAMPLES" --steps "$EVAL_STEPS" \
      "${GUIDANCE_ARGS[@]}" --device "$DEVICE" --weights-dir "$W" --out-json "$L/eval-video.json" \
      --grid "$L/reference-video-grid.png"
  for f in eval-video.json reference-video-grid.png reference-video-grid.gif; do [ -f "$L/$f" ] && cp "$L/$f" "$OUT/$f"; done
  tar -C "$L" -czf "$OUT/logs-video.tar.gz" .
fi

stamp "stage $STAGE finished (failed=$FAILED); files in $OUT:"
ls -la "$OUT"
exit $FAILED
