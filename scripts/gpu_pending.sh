#!/usr/bin/env bash
# GPU measurement stages, one per device call (each ends < 9 min). Nothing is pending after session 8: every stage
# has run at least once (benchmarks/results/COMMANDS.md) and stays here to re-run.
# Run from the repository root on the GPU machine with `.whl/` carried (diffusers, cache-dit, torchao,
# importlib_metadata wheels); every stage writes its files under $OUT (at most 8 files per call).
#
#   OUT=$OUT bash scripts/gpu_pending.sh quant      # issue 6: int8 / int4-dequant speed at FLUX width, then DiT-XL/2 batch 64
#   OUT=$OUT bash scripts/gpu_pending.sh quantfid   # issue 6: GPTQ vs round-to-nearest fidelity rows in bf16
#   OUT=$OUT bash scripts/gpu_pending.sh fp8profile # issue 6: where ours vs torchao's fp8 step time goes (DiT-XL/2 b64)
#   OUT=$OUT bash scripts/gpu_pending.sh erta50     # issue 4: erta_cache max_consecutive 4 + guidance reuse vs MagCache, 50 steps, b64
#   OUT=$OUT bash scripts/gpu_pending.sh motion     # issue 4: MotionCache with idle steps, video batch 8 and 32, vs MagCache / TaylorSeer-lite
#   OUT=$OUT bash scripts/gpu_pending.sh overhead   # issue 4: the peers' never-skip overhead at batch 64 (ours: session 6 run 1)
#   OUT=$OUT bash scripts/gpu_pending.sh attention  # issue 7: S2O with remainder compensation at 32k
#   OUT=$OUT bash scripts/gpu_pending.sh memory     # issue 7: slicing peak with the math SDPA backend (480p) and at 720p (cuDNN)
#   OUT=$OUT bash scripts/gpu_pending.sh batchscan  # issue 4: full-model latency vs batch, to find the batch that fills the GPU
#   OUT=$OUT bash scripts/gpu_pending.sh channel    # issue 4: erta_cache per-channel correction vs scalar vs MagCache, image b1024, 25 + 50 steps
#   OUT=$OUT bash scripts/gpu_pending.sh channelvideo # issue 4: the same on video b32 vs TaylorSeer-lite, then the overhead stage
#   OUT=$OUT bash scripts/gpu_pending.sh cudatests  # CUDA-only unit tests (fp8 kernel, quant formats incl. int4 dequant)
set -uo pipefail
STAGE="${1:?usage: OUT=DIR $0 channel|channelvideo|erta50|motion|overhead|quant|quantfid|fp8profile|attention|memory|batchscan|cudatests}"
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
  erta50)
    G='{"erta_cache":[{"calibration_threshold":0.3,"calibration_max_consecutive":4},{"calibration_threshold":0.4,"calibration_max_consecutive":4},{"calibration_threshold":0.3,"calibration_max_consecutive":4,"calibration_guidance_threshold":0.1},{"calibration_threshold":0.4,"calibration_max_consecutive":4,"calibration_guidance_threshold":0.1},{"calibration_threshold":0.3,"calibration_guidance_threshold":0.1}]}'
    python3 benchmarks/caching.py --models reference-image --steps 50 --image-batches 64 --stages image --ours erta_cache \
      --ours-grid "$G" --peers magcache --budget-s 300 --hard-limit-s 330 --out "$OUT/caching_img50_g.json" --plot "$OUT/caching_img50_g.png" ;;
  motion)
    python3 benchmarks/caching.py --models reference-video --steps 50 --video-batches 8,32 --ours motion_cache \
      --peers magcache,taylorseer_lite --stages video --budget-s 400 --hard-limit-s 430 --out "$OUT/caching_motion_idle.json" \
      --plot "$OUT/caching_motion_idle.png" ;;
  overhead)
    python3 benchmarks/caching.py --stages overhead --overhead-batch 64 --overhead-steps 10 --overhead-repeats 9 \
      --peers magcache,dbcache,fbc --budget-s 300 --hard-limit-s 330 --out "$OUT/caching_overhead_peers.json" ;;
  attention)
    python3 benchmarks/attention.py --seq-lens 32768 --head-dims 128 --compensate both \
      --budget-s 500 --hard-limit-s 530 --out "$OUT/attention_comp.json" --plot "$OUT/attention_comp.png" ;;
  memory)
    python3 benchmarks/memory.py --models wan-1.3b --frames 21,13 --sdpa math --modes forward \
      --chunks 4096:4096,1024:1024 --repeats 1 --budget-s 140 --hard-limit-s 170 --out "$OUT/memory_math.json"
    python3 benchmarks/memory.py --models wan-1.3b --resolutions 720x1280 --frames 21 --sdpa default --modes forward \
      --chunks 4096:4096,1024:1024,4096:4096:plain --repeats 1 --budget-s 100 --hard-limit-s 120 --out "$OUT/memory_720p.json" ;;
  batchscan)
    python3 benchmarks/caching.py --models reference-image --steps 50 --image-batches 64,256,1024,2048 --stages image \
      --ours erta_cache --ours-grid '{"erta_cache": []}' --peers none --warmup 1 --repeats 2 \
      --budget-s 100 --hard-limit-s 120 --out "$OUT/batchscan.json" ;;
  channel)
    G='{"erta_cache":[{"calibration_threshold":0.25,"calibration_max_consecutive":5},{"calibration_threshold":0.3,"calibration_max_consecutive":4},{"calibration_threshold":0.3,"calibration_max_consecutive":6},{"calibration_threshold":0.35,"calibration_max_consecutive":5},{"calibration_threshold":0.25,"calibration_max_consecutive":5,"calibration_correction":"scalar"}]}'
    P='{"magcache":[{"threshold":0.12,"max_skip_steps":3},{"threshold":0.24,"max_skip_steps":3},{"threshold":0.24,"max_skip_steps":5}]}'
    python3 benchmarks/caching.py --models reference-image --steps 25,50 --image-batches 1024 --stages image --ours erta_cache \
      --ours-grid "$G" --peers magcache --peers-grid "$P" --warmup 1 --repeats 2 --budget-s 500 --hard-limit-s 540 \
      --out "$OUT/caching_img_channel.json" --plot "$OUT/caching_img_channel.png" ;;
  channelvideo)
    GV='{"erta_cache":[{"calibration_threshold":0.25,"calibration_max_consecutive":6},{"calibration_threshold":0.3,"calibration_max_consecutive":6},{"calibration_threshold":0.3,"calibration_max_consecutive":4},{"calibration_threshold":0.25,"calibration_max_consecutive":6,"calibration_correction":"scalar"}]}'
    PV='{"taylorseer_lite":[{"cache_interval":4},{"cache_interval":6}]}'
    python3 benchmarks/caching.py --models reference-video --steps 50 --video-batches 32 --stages video --ours erta_cache \
      --ours-grid "$GV" --peers taylorseer_lite --peers-grid "$PV" --repeats 3 --budget-s 250 --hard-limit-s 270 \
      --out "$OUT/caching_video_channel.json" --plot "$OUT/caching_video_channel.png"
    python3 benchmarks/caching.py --stages overhead --overhead-batch 64 --overhead-steps 10 --overhead-repeats 9 \
      --peers magcache,dbcache --budget-s 250 --hard-limit-s 280 --out "$OUT/caching_overhead_peers.json" ;;
  cudatests)
    python3 -m pytest tests/test_fp8_quant_kernel.py tests/test_quant_formats.py tests/test_ptq.py -q 2>&1 | tee "$OUT/cudatests.log" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
ls -la "$OUT"
