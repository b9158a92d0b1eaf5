#!/usr/bin/env bash
# The GPU measurements still pending after session 5, one stage per device call (each ends < 9 min).
# Run from the repository root on the GPU machine with `.whl/` carried (diffusers, cache-dit, torchao,
# importlib_metadata wheels); every stage writes its files under $OUT (at most 8 files per call).
#
#   OUT=$OUT bash scripts/gpu_pending.sh quant      # issue 6: int8 / int4-dequant speed at FLUX width, then DiT-XL/2 batch 64
#   OUT=$OUT bash scripts/gpu_pending.sh quantfid   # issue 6: GPTQ vs round-to-nearest fidelity rows in bf16
#   OUT=$OUT bash scripts/gpu_pending.sh fp8profile # issue 6: where ours vs torchao's fp8 step time goes (DiT-XL/2 b64)
#   OUT=$OUT bash scripts/gpu_pending.sh erta25     # issue 4: erta_cache with reuse-cost schedules vs MagCache, 25 steps, b64
#   OUT=$OUT bash scripts/gpu_pending.sh overhead   # issue 4: never-skip overhead at a GPU-bound batch (b8 eager was noise-limited)
#   OUT=$OUT bash scripts/gpu_pending.sh tokens     # issue 4: MotionCache at video batch 8
#   OUT=$OUT bash scripts/gpu_pending.sh attention  # issue 7: S2O with remainder compensation at 32k
#   OUT=$OUT bash scripts/gpu_pending.sh cudatests  # CUDA-only unit tests (fp8 kernel, quant formats incl. int4 dequant): run first after the session-5 review
set -uo pipefail
STAGE="${1:?usage: OUT=DIR $0 erta25|overhead|quant|quantfid|fp8profile|tokens|attention|cudatests}"
OUT="${OUT:?set OUT}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error
case "$STAGE" in
  quant)
    python3 benchmarks/quantization.py --stages speed --speed-models flux-width,dit-xl-2 --dit-batches 64 \
      --flux-batch 2 --configs "int8_w8a8 dynamic,int4_weight_only dequant" --budget-s 500 --hard-limit-s 530 \
      --out "$OUT/quant_speed.json" ;;
  fp8profile)
    python3 benchmarks/quantization.py --stages speed --speed-models dit-xl-2 --dit-batches 64 --configs fp8 --profile \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/quant_fp8_profile.json" ;;
  quantfid)
    python3 benchmarks/quantization.py --stages fidelity --samples 64 --calib-seeds 8 --configs "g32,g64,int8_w8a8 dynamic" \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/quant_gptq.json" ;;
  erta25)
    python3 benchmarks/caching.py --models reference-image --steps 25 --image-batches 64 --stages image \
      --ours erta_cache,step_cache --peers magcache --budget-s 500 --hard-limit-s 530 --out "$OUT/caching_erta25.json" ;;
  overhead)
    python3 benchmarks/caching.py --stages overhead --overhead-batch 64 --overhead-steps 10 --overhead-repeats 9 \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/caching_overhead_b64.json" ;;
  tokens)
    python3 benchmarks/caching.py --models reference-video --steps 50 --video-batches 8 --ours motion_cache \
      --stages video --budget-s 500 --hard-limit-s 530 --out "$OUT/caching_motion_b8.json" ;;
  attention)
    python3 benchmarks/attention.py --seq-lens 32768 --head-dims 128 --compensate both \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/attention_comp.json" --plot "$OUT/attention_comp.png" ;;
  cudatests)
    python3 -m pytest tests/test_fp8_quant_kernel.py tests/test_quant_formats.py tests/test_ptq.py -q 2>&1 | tee "$OUT/cudatests.log" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
