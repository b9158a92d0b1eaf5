#!/usr/bin/env bash
# The GPU measurements still pending after session 2, one stage per device call (each ends < 9 min).
# Run from the repository root on the GPU machine with `.whl/` carried (diffusers, cache-dit, torchao,
# importlib_metadata wheels); every stage writes its files under $OUT (at most 8 files per call).
#
#   OUT=$OUT bash scripts/gpu_pending.sh quant      # issue 6: torchao peers, FLUX width, batch 1, fused-bias fp8
#   OUT=$OUT bash scripts/gpu_pending.sh tokens     # issue 7/4: token methods after the full-context fix
#   OUT=$OUT bash scripts/gpu_pending.sh caching    # issue 4: never-skip overhead rows, 25-step image rows
#   OUT=$OUT bash scripts/gpu_pending.sh dense      # issue 2: fused-QKV + max-autotune rows at batch 32
#   OUT=$OUT bash scripts/gpu_pending.sh cudatests  # CUDA-only unit tests (quant formats incl. fp8 fused bias)
set -uo pipefail
STAGE="${1:?usage: OUT=DIR $0 quant|tokens|caching|dense|cudatests}"
OUT="${OUT:?set OUT}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error
case "$STAGE" in
  quant)
    python3 benchmarks/quantization.py --samples 64 --calib-seeds 8 --dit-batches 64,1 --flux-batch 2 \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/quantization.json" --plot "$OUT/quantization.png" ;;
  tokens)
    python3 benchmarks/tokens.py --models reference-video --methods region_adaptive --out "$OUT/tokens_video.json" \
      --budget-s 200 --hard-limit-s 220
    python3 benchmarks/caching.py --models reference-video --steps 50 --video-batches 1 --ours motion_cache \
      --no-sweep --stages video --budget-s 200 --hard-limit-s 220 --out "$OUT/caching_motion.json" ;;
  caching)
    python3 benchmarks/caching.py --models reference-image --steps 25,50 --image-batches 64 --stages overhead,image \
      --ours erta_cache,step_cache --budget-s 500 --hard-limit-s 530 --out "$OUT/caching_more.json" \
      --plot "$OUT/caching_more.png" ;;
  dense)
    python3 benchmarks/dense_baseline.py --batches 32 --variants fused_qkv --out "$OUT/dense_more.json" ;;
  cudatests)
    python3 -m pytest tests/test_quant_formats.py tests/test_ptq.py -q 2>&1 | tee "$OUT/cudatests.log" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
