#!/usr/bin/env bash
# Everything this project checks and times on a GPU, in stages that each fit one 10-minute device call.
#
#   bash bench/gpu_session.sh check     GPU test suite + a short run of every GPU code path (bugs first)
#   bash bench/gpu_session.sh measure   autotune (S16 stage 3 and 4, generation shape; it also times the
#                                       tensor-core kernels and records them where faster and equal in results)
#                                       + compare (all backends, with what the tuning chose)
#   bash bench/gpu_session.sh models    GPU tests of the fixes, compare fused/eager/compiled, model steps
#   bash bench/gpu_session.sh train     profile of a UniFormer-S16 step, trainer throughput, the tiny
#                                       motion models trained on the GPU (fused op)
#   bash bench/gpu_session.sh extra     the trainer's exit after --stop-after; FlexAttention at S16 stage 3
#   bash bench/gpu_session.sh reliability  inputs past 2**31 elements through the fused forward and backward
#                                       (bench/large_inputs.py, ~110 GB estimated), the trainer's exit after
#                                       --stop-after; the cuDNN version is in env-reliability.txt
#   bash bench/gpu_session.sh uniformer steps of EMIM-S16 and its twin at batch 8 with cudnn.benchmark on
#                                       (models-s16.json), the profile of one EMIM-S16 step, and the
#                                       trainer's own figure over 20 steps (issue 13: depthwise Conv3d layout)
#   bash bench/gpu_session.sh tensorcore  the opt-in tensor-core kernels: their GPU tests (bf16 included, which
#                                       the CPU interpreter cannot check), the kernel and differential tests with
#                                       both switches on, compare at S16 stage 3 and the generation shape with them
#   bash bench/gpu_session.sh variants  the causal and dilated op: GPU tests of the variants, compare
#                                       --direction prev / --dilation 2 at S16 stage 3, and the per-frame
#                                       streaming step's time and memory (bench/streaming.py)
#
# Logs and results go to $RESULTS (default bench/results/gpu-session), packed after every step into
# $OUT/results.tgz when $OUT is set (the device tool brings back only a few files). Wheels of packages the
# machine lacks (PyAV, a recent setuptools) are installed from .whl/ when that folder exists.
set -uo pipefail
export PYTHONUNBUFFERED=1
stage=${1:?usage: gpu_session.sh check|measure|models|train|extra|reliability|uniformer|variants|tensorcore}
RESULTS=${RESULTS:-bench/results/gpu-session}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}

pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results-$stage.tgz" --exclude='*.pt' -C "$RESULTS" . ; true; }
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $RESULTS/NAME.log, never abort
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name ($*)"
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "    rc=$rc in $((SECONDS - start)) s; last lines:"; tail -n 4 "$RESULTS/$name.log" | sed 's/^/    /'
  echo "$name rc=$rc $((SECONDS - start))s" >>"$RESULTS/steps.txt"
  pack
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$RESULTS/install.log" 2>&1 || { cat "$RESULTS/install.log"; exit 1; }
{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(),
'cuDNN', torch.backends.cudnn.version())"; } \
  >"$RESULTS/env-$stage.txt" 2>&1
cat "$RESULTS/env-$stage.txt" | tail -n 1

trainer_stop() {  # the trainer must exit promptly after --stop-after, loader workers included
  step trainer-stop 45 $PY -m emim_triton.train --dataset random --model emim_uniformer_xt --num-classes 10 \
    --batch-size 8 --epochs 1 --warmup-epochs 0 --stop-after 4 --num-workers 4 --run-dir "$RESULTS/trainer-stop" \
    --no-progress --log-every 1
}

case $stage in
check)
  step tests-gpu 420 $PY -m pytest -q -p no:cacheprovider -n 8 --maxfail 30 tests --ignore tests/test_aot_compile.py -rfEs
  step compare-smoke 120 $PY -m emim_triton.bench_cli compare --shape 2,4,14,14,5,64,7 --no-tune --rep-ms 20 --warmup-ms 5 \
    --json "$RESULTS/compare-smoke.json" --plot "$RESULTS/compare-smoke.png"
  step autotune-smoke 120 env EMIM_TRITON_CACHE=/tmp/emim-cache $PY -m emim_triton.bench_cli autotune \
    --shape 2,4,14,14,5,64,7 --max-configs 3 --rep-ms 10 --warmup-ms 5
  step models-smoke 150 $PY bench/models_gpu.py --steps 3 --warmup 2 --batch 2
  step bench-smoke 120 $PY -m pytest -q -p no:cacheprovider bench --benchmark-only --benchmark-max-time 0.05 -x
  ;;
measure)
  export EMIM_TRITON_CACHE=$RESULTS/cache
  step autotune-s16 170 $PY -m emim_triton.bench_cli autotune --model emim_uniformer_s16 --dtype bf16 --max-configs 10 \
    --write-defaults
  step autotune-gen 90 $PY -m emim_triton.bench_cli autotune --shape 2,16,64,64,8,64,7 --dtype bf16 --max-configs 8 \
    --write-defaults
  cp emim_triton/tuned/tuned_configs.json "$RESULTS/tuned_configs.json"; pack
  step compare 280 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --sweep 7,28 \
    --json "$RESULTS/compare.json" --csv "$RESULTS/compare.csv" --plot "$RESULTS/compare.png"
  ;;
models)
  step tests-gpu 90 $PY -m pytest -q -p no:cacheprovider -n 16 tests/test_kernels.py tests/test_convert.py \
    tests/test_models.py -k "low_precision or videomae or compile" -rfEs
  step compare 150 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,reference --sweep 7,28 \
    --json "$RESULTS/compare.json" --csv "$RESULTS/compare.csv" --plot "$RESULTS/compare.png"
  step compare-compiled 150 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,compiled \
    --shape 32,16,14,14,5,64,7 --json "$RESULTS/compare-compiled.json"
  step models 120 $PY bench/models_gpu.py --which videomae,uniformer --steps 4 --warmup 1 --json "$RESULTS/models.json"
  ;;
train)
  step profile-s16 60 $PY bench/profile_step.py uniformer_s16 --batch 8
  step trainer-s16 90 $PY -m emim_triton.train --dataset random --model emim_uniformer_s16 --num-classes 174 \
    --batch-size 8 --epochs 1 --warmup-epochs 0 --stop-after 10 --num-workers 4 --run-dir "$RESULTS/trainer-s16" \
    --no-progress --log-every 2
  step motion-gpu 240 $PY -m emim_triton.train.emim_vs_twin --data /tmp/motion --out "$RESULTS/motion-gpu" \
    -- --device cuda --attn-backend triton --num-workers 3
  ;;
extra)
  trainer_stop
  step compare-flex 95 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,flex \
    --shape 32,16,14,14,5,64,7 --json "$RESULTS/compare-flex.json"
  ;;
reliability)
  step large-inputs 300 $PY bench/large_inputs.py --json "$RESULTS/large-inputs.json"
  trainer_stop
  ;;
uniformer)
  step models-s16 200 $PY bench/models_gpu.py --which uniformer --batch 8 --steps 10 --warmup 3 \
    --json "$RESULTS/models-s16.json"
  step profile-emim-s16 90 $PY bench/profile_step.py emim_uniformer_s16 --batch 8 --rows 20
  step trainer-s16-20 150 $PY -m emim_triton.train --dataset random --model emim_uniformer_s16 --num-classes 174 \
    --batch-size 8 --epochs 1 --warmup-epochs 0 --stop-after 20 --num-workers 4 --run-dir "$RESULTS/trainer-s16-20" \
    --no-progress --log-every 2
  ;;
tensorcore)
  step tests-tensor-core 150 $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_forward_tensor_core.py \
    tests/test_backward_tensor_core.py tests/test_key_value_tensor_core.py tests/test_strategies.py -rfEs
  step tests-with-tensor-core 200 env EMIM_TRITON_FORWARD=tensor_core EMIM_TRITON_BACKWARD=tensor_core \
    $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_differential.py tests/test_variants_kernels.py -rfEs
  step compare-tensor-core 200 env EMIM_TRITON_FORWARD=tensor_core EMIM_TRITON_BACKWARD=tensor_core \
    $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,reference \
    --shape 32,16,14,14,5,64,7 --shape 2,16,64,64,8,64,7 --json "$RESULTS/compare-tensor-core.json"
  ;;
variants)
  step tests-variants 200 $PY -m pytest -q -p no:cacheprovider -n 8 tests/test_variants_kernels.py \
    tests/test_variants_reference.py tests/test_streaming.py -rfEs
  step compare-prev 120 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,reference \
    --shape 32,16,14,14,5,64,7 --direction prev --json "$RESULTS/compare-prev.json"
  step compare-dilated 120 $PY -m emim_triton.bench_cli compare --dtype bf16 --no-tune --backends fused,reference \
    --shape 2,16,64,64,8,64,7 --dilation 2 --json "$RESULTS/compare-dilated.json"
  step streaming 120 $PY bench/streaming.py --json "$RESULTS/streaming.json"
  ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
echo "=== done"; cat "$RESULTS/steps.txt"
