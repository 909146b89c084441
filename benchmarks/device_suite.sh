#!/usr/bin/env bash
# The GPU suite as device-machine commands (one command may run 10 minutes at most, so the suite is in parts).
# Usage on the device machine, from the repo root, with the .whl wheels carried:
#   bash benchmarks/device_suite.sh e2e          # workload W: qsparse, Inductor, eager, Flex+fp8 (~580 s at 480p)
#   bash benchmarks/device_suite.sh e2e2         # torchao fp8 and the CUDA-graph qsparse row (~250 s + compile)
#   bash benchmarks/device_suite.sh e2e720       # Wan-1.3B 720p: qsparse, Inductor, eager, torchao fp8 (not yet run)
#   bash benchmarks/device_suite.sh e2e720flex   # Wan-1.3B 720p: Flex+fp8 alone (its compile took 269 s at 480p)
#   bash benchmarks/device_suite.sh hunyuan      # hunyuan-scaled: qsparse, Inductor, eager, torchao fp8 (not yet run)
#   bash benchmarks/device_suite.sh hunyuanflex  # hunyuan-scaled: Flex+fp8 alone (three block graphs with Flex:
#                                                # dual-stream, single-stream, its stride recompile; if it passes
#                                                # 580 s, a rerun on the still-warm machine should find Inductor's
#                                                # cache in /tmp)
#   bash benchmarks/device_suite.sh cachemem     # the qsparse row with the residual cache in fp8 (order 2, then
#                                                # order 1): peak memory vs the bf16 cache's 7.8 GiB (not yet run)
#   bash benchmarks/device_suite.sh bytes        # byte accounting of the reuse step's kernels (two qsparse compiles)
#   bash benchmarks/device_suite.sh generation   # whole 50-step CFG videos at workload W (bench_generation.py), in
#                                                # parts that each stay under 580 s, rows appended to one
#                                                # generation.json (GEN_PARTS="1 2 3 4 5" picks parts; default all five:
#                                                # run each as its own device command), then fidelity of the same rows
#                                                # on the reference DiT (FID_PARTS) into fidelity.json, then the Pareto
#                                                # plot when both JSONs are there. Estimates from the per-forward
#                                                # numbers (not yet run): part 1 Inductor + Flex+fp8 ~350 s, part 2
#                                                # Flex+fp8 with FBC / MagCache / TaylorSeer ~400 s, part 3 cache-dit +
#                                                # qsparse + qsparse with FBC ~450 s, part 4 (issue #16's rows with
#                                                # fewer refreshes, MagCache and 8-bit attention) ~500-580 s (Flex +
#                                                # fp8's cold compile took 104-200 s), part 5 (the equal-PSNR pair: Flex
#                                                # at 75% vs qsparse at 15%, same MagCache skips; seven rows, in
#                                                # priority order) ~560 s with each Flex mask's cold compile (~130-190
#                                                # s: Flex recompiled for a second mask on the H100);
#                                                # fidelity parts ~300 s each (3, 4: part 4's rows). Parts 1 and 4
#                                                # overlap in Flex + fp8 (a baseline reruns in every process that
#                                                # compares with it).
#   bash benchmarks/device_suite.sh tests        # every @gpu test, JOBS files at a time, FILE_LIMIT s each
#   bash benchmarks/device_suite.sh attn8        # 8-bit attention: bench rows beside SDPA and Flex at 15% and dense,
#                                                # the refresh rows, the 8-bit config sweep, then its @gpu tests
#                                                # (not yet run; budget 170 s bench + 240 s tests; ATTN8_TESTS=0: the
#                                                # bench alone, to share a command with another part)
#   bash benchmarks/device_suite.sh refresh      # issue #16 item 3: a refresh's O_dense from the complement tiles +
#                                                # lse merge vs the old dense attention, bf16 and int8_fp8, at workload
#                                                # W's 1x12x32,760x128 and density 0.15 (rows refresh_*), then the
#                                                # refresh's @gpu tests (not yet run; estimate < 120 s bench,
#                                                # < 180 s tests)
#   bash benchmarks/device_suite.sh attn8fid     # 8-bit attention's fidelity on the reference DiT at its trained size
#                                                # (16 x 64 x 64): qsparse eval rows attn_int8 / ssar1 / ssar1_int8,
#                                                # 4 seeds, 16 steps, then calibration's attention_precision stage
#                                                # (per-layer, per-third SQNR; plan.json to $OUT). Not yet run;
#                                                # estimate < 300 s + < 240 s
#   bash benchmarks/device_suite.sh membound     # issue #19's fused norm/rope/quant kernels and the FFN-down GELU +
#                                                # fp8 quantization vs Inductor at workload W (bench_membound.py, < 2
#                                                # min) and their @gpu tests (act_quant and ln_modulate_quant were
#                                                # rewritten on 2026-12-08 and are not yet run on a GPU: run this
#                                                # before timing anything that uses them)
#   bash benchmarks/device_suite.sh calib        # issue #22: calibrate() on workload W (random bf16 weights),
#                                                # seconds and peak GPU memory per stage (bench_calibration.py), JSON
#                                                # after every stage: CALIB_PARTS="h100 24gib" (default both, one
#                                                # command): the h100 setting (4 candidates, 2 kept, msad_steps 4;
#                                                # estimate ~340 s, limit 380 s) then the 24 GiB setting (capped at
#                                                # 24 GiB, 1 sample, 4 M-element attention chunks, MSAD on 3 blocks;
#                                                # estimate ~80 s, limit 170 s). Not yet run.
#   bash benchmarks/device_suite.sh ablation-calib  # issue #22: the ablation's two plans on the reference DiT at
#                                                # 16 x 64 x 64 (qsparse calibrate reference, held-out seeds 4, 5):
#                                                # plan/ and plan_talora/ into $PLANS (default /tmp/qsparse-ablation,
#                                                # so later ablation parts on the same warm machine find them; copies
#                                                # come back in $OUT/plan*/). Estimate ~320 s, limit 560 s. Not yet run.
#   bash benchmarks/device_suite.sh ablation     # FIDELITY.md's ablation at the trained size (bench_ablation.py: 4
#                                                # seeds, 50 steps, guidance 1 and 5, PSNR / SSIM / block SQNR and the
#                                                # share of dense layer-steps per row), rows appended to one
#                                                # ablation.json; ABL_PARTS="1 2 3" (default all; run each as its own
#                                                # device command): 1 w4a8, sparse (= static local window), naive,
#                                                # msad, ssar1 ~215 s; 2 ssar2, lowrank, talora, plan ~200 s; 3 peers
#                                                # flex-fp8 + topk ~180 s (Flex's compile). Each reruns dense (~10 s).
#                                                # Parts 1 (msad, ssar1) and 2 need ablation-calib's plans. Not yet run.
# Results land in $OUT; partial results survive a time limit (JSON after every row, test lines as they come).
# The not-yet-run parts' times are estimates from the 480p run (BENCHMARKS.md), not measurements.
set -u
OUT=${OUT:-/tmp/qsparse-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# e2e WORKLOAD ROWS JSON LINES [SECONDS [MORE ARGS]]: one bench_e2e.py run under the command limit (580 s unless
# given), profiled, its last LINES lines shown.
e2e() {
  timeout "${5:-580}" python3 benchmarks/bench_e2e.py --workload "$1" --rows "$2" --out "$OUT/$3" --profile "$OUT/prof" \
      "${@:6}" 2>&1 | grep -v Warning | tail -"$4"
}
case "${1:-e2e}" in
  e2e) e2e "${WORKLOAD:-wan-1.3b-480p}" qsparse,inductor,eager,flex-fp8 e2e.json 20 ;;
  e2e2) e2e "${WORKLOAD:-wan-1.3b-480p}" fp8,qsparse-cudagraphs e2e2.json 12 ;;
  e2e720) e2e wan-1.3b-720p qsparse,inductor,eager,fp8 e2e_720p.json 16 ;;
  e2e720flex) e2e wan-1.3b-720p flex-fp8 e2e_720p_flex.json 8 ;;
  hunyuan) e2e hunyuan-scaled qsparse,inductor,eager,fp8 e2e_hunyuan.json 16 ;;
  hunyuanflex) e2e hunyuan-scaled flex-fp8 e2e_hunyuan_flex.json 8 ;;
  cachemem)
    e2e wan-1.3b-480p qsparse e2e_cache_fp8_order2.json 8 290 --cache '{"storage": "fp8_e4m3"}'
    e2e wan-1.3b-480p qsparse e2e_cache_fp8_order1.json 8 290 --cache '{"storage": "fp8_e4m3", "order": 1}' ;;
  bytes) timeout "${LIMIT:-400}" python3 benchmarks/byte_accounting.py --out "$OUT/byte_accounting.json" 2>&1 \
      | grep -v Warning | tail -70 ;;
  generation)
    # One row's failure is recorded in the JSON and the next row runs; a part past its limit keeps the rows it
    # finished (the JSON is rewritten after every row). cache-dit comes from its carried wheel (.whl/, installed above).
    gen() {  # gen PART ROWS [MORE ARGS]; GEN_LOG=1 keeps the whole log in $OUT (8 files at most come back)
      local log=/dev/null
      [ -n "${GEN_LOG:-}" ] && log="$OUT/gen_$1.log"
      timeout "${PART_LIMIT:-580}" python3 benchmarks/bench_generation.py --rows "$2" --append \
          --row-budget "${ROW_BUDGET:-420}" --warmup-steps "${WARMUP_STEPS:-12}" "${@:3}" 2>&1 | tee "$log" \
          | grep -v Warning | grep -E "^\||^- |^[a-z].*: " | tail -40
      echo "generation part $1: exit ${PIPESTATUS[0]}"
    }
    # The CPU fidelity runs whose MagCache calibrations the MagCache rows of parts 4-5 replay (--mag-ratios).
    CPU_FID=docs/fidelity/generation_cpu
    MAG_RATIOS=""
    for f in ${MAG_RATIO_FILES-$CPU_FID/fidelity_part4_50steps.json $CPU_FID/fidelity_flex_local3d_50steps.json
               $CPU_FID/fidelity_mag_sweep_50steps.json $CPU_FID/fidelity_mag_sweep2_50steps.json
               $CPU_FID/fidelity_mag_sweep3_50steps.json $CPU_FID/fidelity_flex_density_mag_50steps.json
               $CPU_FID/fidelity_order1_50steps.json $CPU_FID/fidelity_refresh_steps_50steps.json}; do
      MAG_RATIOS="$MAG_RATIOS --mag-ratios $f"
    done
    FAST_MAG="+mag[threshold=1.0,max_skip=20,retention=0.05]"  # the CPU curve's fastest MagCache settings
    PART4="flex-fp8,qsparse[first=1,every=10],qsparse[first=1,every=10,graphs=1],qsparse[first=1,every=10]+mag"
    PART4="$PART4,flex-fp8+mag,qsparse,qsparse[first=1,every=10,attn=int8_fp8]"
    PART4="$PART4,qsparse[first=1,every=25]+mag[threshold=0.5,max_skip=10,retention=0.1]"
    PART5="qsparse[first=1,every=25,order=1]$FAST_MAG,flex-fp8[pattern=local3d,density=0.75]$FAST_MAG"
    PART5="$PART5,qsparse[steps=0:11:32,order=1]$FAST_MAG,qsparse[first=1,every=10]$FAST_MAG"
    PART5="$PART5,qsparse[first=1,every=25,order=1,graphs=1]$FAST_MAG"
    PART5="$PART5,qsparse[first=1,every=50,order=1]$FAST_MAG,flex-fp8[pattern=local3d]$FAST_MAG"
    for part in ${GEN_PARTS-1 2 3 4 5}; do
      case $part in
        1) gen 1 inductor,flex-fp8 --out "$OUT/generation.json" ;;
        2) gen 2 flex-fp8+fbc,flex-fp8+mag,flex-fp8+taylorseer --out "$OUT/generation.json" ;;
        3) gen 3 cache-dit,qsparse,qsparse+fbc --out "$OUT/generation.json" ;;
        # Part 4: qsparse's whole-video rows beside Flex + fp8 at 15% (one Flex compile, ~190 s cold; its MagCache row
        # reuses it): fewer refreshes without a step cache (issue #16's second goal), with regional CUDA graphs,
        # MagCache at diffusers' defaults, the default schedule, 8-bit attention; the order is the rows' priority (a
        # cut part loses the last; MagCache's fastest settings are part 5's). MagCache rows skip the steps of their
        # CPU fidelity rows (--mag-ratios: no calibration video).
        4) gen 4 "${GEN4_ROWS:-$PART4}" \
               $MAG_RATIOS --out "$OUT/generation.json" ;;
        # Part 5: the equal-PSNR comparison in one process - Flex + fp8 at 75% of qsparse's tiles (17.46 dB over CPU
        # seeds 0-3; Flex at 15% stays near 12) against qsparse at 15% refreshing at 2, 3 or 4 of the 6 steps each CFG
        # branch runs (17.40, 18.44, 18.73 dB), all with the same MagCache settings (12 forwards per video); then the
        # first with regional CUDA graphs, qsparse's one-refresh point, Flex at 15% local3d. qsparse's likeliest
        # winner comes first (Flex at 75% was measured alone in session 9), since a cut part loses its last rows.
        # FlexAttention recompiled for a second mask on the H100 (130 s; the guard was not logged), so each Flex row
        # here may cost a cold compile; TORCH_LOGS=recompiles (the full log is $OUT/gen_5.log) says why.
        5) TORCH_LOGS=recompiles GEN_LOG=1 gen 5 "${GEN5_ROWS:-$PART5}" \
               $MAG_RATIOS --out "$OUT/generation.json" ;;
      esac
    done
    # The reference DiT (16 x 64 x 64, 16,384 tokens), 4 seeds, the same steps and rows; each part reruns the dense
    # eager reference its PSNR / SSIM are measured against.
    for part in ${FID_PARTS-1 2 3 4}; do
      case $part in
        1) gen fid1 inductor,flex-fp8,flex-fp8+fbc,flex-fp8+mag --fidelity --out "$OUT/fidelity.json" ;;
        2) gen fid2 flex-fp8+taylorseer,cache-dit,qsparse,qsparse+fbc --fidelity --out "$OUT/fidelity.json" ;;
        # generation part 4's rows (each part reruns the eager reference)
        3) gen fid3 "flex-fp8,qsparse[first=1,every=10],qsparse,qsparse[first=1,every=10,attn=int8_fp8]" --fidelity \
               --out "$OUT/fidelity.json" ;;
        4) gen fid4 "flex-fp8+mag,qsparse[first=1,every=10]+mag,inductor" --fidelity --out "$OUT/fidelity.json" ;;
      esac
    done
    if [ -f "$OUT/generation.json" ] && [ -f "$OUT/fidelity.json" ]; then
      python3 -m qsparse_compiler.cli eval --pareto "$OUT/generation.json" --fidelity-json "$OUT/fidelity.json" \
          --out "$OUT" 2>&1 | grep -v Warning | tail -20
    fi ;;
  attn8fid)
    timeout 300 python3 -m qsparse_compiler.cli eval --out "$OUT/attn8_fidelity" --device cuda --steps 16 \
        --seeds 0,1,2,3 --variants attn_int8,ssar1,ssar1_int8 2>&1 | grep -v Warning | tail -30
    echo '{"attention_int8_min_sqnr_db": 32.0, "selection": "uniform", "num_samples": 3, "msad_steps": 0,
           "ssar_samples": 1, "ssar_steps": 6, "progress": false}' > /tmp/attn8_config.json
    timeout 240 python3 -m qsparse_compiler.cli calibrate reference --out /tmp/attn8_plan --device cuda --steps 16 \
        --seeds 0,1 --config /tmp/attn8_config.json 2>&1 | grep -v Warning | tail -20
    cp /tmp/attn8_plan/plan.json "$OUT/attn8_plan.json" ;;
  calib)
    # A part past its limit keeps the stages it finished (the JSON is rewritten after every stage; MSAD's per-block
    # fit extrapolates to all 30 blocks); STAGES picks a subset of selection,statistics,search,ssar,msad.
    for part in ${CALIB_PARTS-h100 24gib}; do
      case $part in
        h100) limit=${CALIB_LIMIT:-380} ;;
        24gib) limit=${CALIB24_LIMIT:-170} ;;
        *) echo "calib: unknown part $part; use h100 or 24gib" >&2; exit 2 ;;
      esac
      timeout "$limit" python3 benchmarks/bench_calibration.py --setting "$part" \
          --stages "${STAGES:-selection,statistics,search,ssar,msad}" --out "$OUT/calibration_$part.json" 2>&1 \
          | grep -v Warning | tail -45
      echo "calib part $part: exit ${PIPESTATUS[0]}"
    done ;;
  ablation-calib)
    plans=${PLANS:-/tmp/qsparse-ablation}
    timeout "${PART_LIMIT:-560}" python3 benchmarks/bench_ablation.py --calibrate --plans "$plans" \
        --out "$OUT/ablation_calibration.json" 2>&1 | grep -v Warning | tail -20
    echo "ablation-calib: exit ${PIPESTATUS[0]}"
    for name in plan plan_talora; do  # the plans come back too (4 files, < 16 MiB each): carry them as PLANS if
      if [ -f "$plans/$name/plan.json" ]; then  # the machine went cold before the ablation parts
        mkdir -p "$OUT/$name" && cp "$plans/$name/plan.json" "$plans/$name/plan.safetensors" "$OUT/$name/"
      fi
    done ;;
  ablation)
    # One row's failure is recorded in the JSON and the next row runs; a part past its limit keeps the rows it
    # finished (the JSON and ablation.md are rewritten after every row and guidance setting).
    for part in ${ABL_PARTS-1 2 3}; do
      case $part in
        1) rows=w4a8,sparse,naive,msad,ssar1 ;;
        2) rows=ssar2,lowrank,talora,plan ;;
        3) rows=flex-fp8,topk ;;
        *) echo "ablation: unknown part $part; use 1, 2 or 3" >&2; exit 2 ;;
      esac
      timeout "${PART_LIMIT:-560}" python3 benchmarks/bench_ablation.py --rows "$rows" --append \
          --plans "${PLANS:-/tmp/qsparse-ablation}" --out "$OUT/ablation.json" 2>&1 | grep -v Warning | tail -30
      echo "ablation part $part: exit ${PIPESTATUS[0]}"
    done ;;
  membound)
    timeout 240 python3 benchmarks/bench_membound.py --out "$OUT/membound.json" 2>&1 | grep -v Warning | tail -30
    timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_qk_norm_rope.py tests/kernels/test_ln_modulate_quant.py \
        tests/kernels/test_act_quant.py --tb=short -rA -p no:cacheprovider 2>&1 | tee "$OUT/membound_gpu_tests.txt" \
        | tail -15 ;;
  tests)
    # Files run side by side (Triton's compiles are CPU-bound; the tests are not timed), each under its own limit;
    # the per-file logs are joined into one file at the end ($OUT returns at most 8 files).
    mkdir -p /tmp/gpu_tests
    grep -rl "pytest.mark.gpu" tests --include=test_*.py | sort | xargs -P "${JOBS:-5}" -I{} sh -c \
      'timeout "${FILE_LIMIT:-420}" python3 -m pytest -q -m gpu "{}" --tb=short -rA -p no:cacheprovider \
          > "/tmp/gpu_tests/$(echo {} | tr / _).log" 2>&1; echo "{}: exit $?"'
    for log in /tmp/gpu_tests/*.log; do
      echo "== $log"; grep -E "^PASSED|^FAILED|^ERROR|^E |^[a-z_/]+\.py:[0-9]+: |passed|failed" "$log"
    done | tee "$OUT/gpu_tests.txt" | grep -E "^==|passed|failed|^FAILED|^ERROR|^E " ;;
  attn8)
    timeout 240 python3 benchmarks/bench_attention.py --int8 --int8-sweep --densities 0.15 1.0 --patterns random \
        --out "$OUT/attention_int8.json" 2>&1 | grep -v Warning | tee "$OUT/attn8_bench.txt" | tail -30
    [ "${ATTN8_TESTS:-1}" = 0 ] && exit 0  # the bench alone (another part follows in the same device command)
    timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_attention_int8_fp8.py \
        tests/kernels/test_attention_merge.py tests/ops/test_attention_int8_fp8_cuda.py --tb=short -rA -p no:cacheprovider 2>&1 | tail -40 \
        | tee "$OUT/attn8_tests.txt" ;;
  refresh)
    timeout 240 python3 benchmarks/bench_attention.py --int8 --shapes wan1.3b-480p --densities 0.15 --patterns random \
        --no-flex --out "$OUT/refresh_complement.json" 2>&1 | grep -v Warning | tee "$OUT/refresh_bench.txt" \
        | grep refresh
    timeout 300 python3 -m pytest -q -m gpu tests/kernels/test_attention_merge.py \
        tests/kernels/test_residual_cache_step.py tests/ops/test_attention_int8_fp8_cuda.py --tb=short -rA \
        -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/refresh_tests.txt" ;;
  *) echo "device_suite.sh: unknown part ${1}; use e2e, e2e2, e2e720, e2e720flex, hunyuan, hunyuanflex, cachemem," \
          "attn8, attn8fid, bytes, generation, membound, refresh, calib, ablation-calib, ablation" \
          "or tests" >&2
     exit 2 ;;
esac
