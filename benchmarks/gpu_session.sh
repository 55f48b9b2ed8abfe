#!/usr/bin/env bash
# Every GPU check of the issue "Fused kernels" in one call of the device tool, so that a
# session that is lent a GPU (15 minutes of device time in all) spends it measuring:
#
#   make gpu-wheels        # here: Liger-Kernel, DeepSpeed, OmegaConf (+ deps) into .cache/wheels,
#                          # and the tiny test model into .cache/rlsys/models/tiny-llama
#   run  command="bash benchmarks/gpu_session.sh"
#        carry=[".cache/wheels", ".cache/rlsys/models/tiny-llama"]  timeout_s=570
#
# Seen on two H200 machines (2026-12-04): steps 2-4 took about 90 / 12 / 70 s on one, and about
# 110 / 34 / 157 s on the other (its host was slower: launch-bound rows ran up to 2x slower).
#
# On the device machine it uses that image's python3 (its torch and triton) and installs
# nothing but the carried wheels. Steps, each bounded and each run even if one before failed,
# the issue's figures first:
#   1. the machine: GPU, driver, torch / triton versions;
#   2. `benchmarks/kernels.py --gpu`: a 120 s sweep of each Triton kernel's candidate tiles
#      (`rlsys.kernels.tune`), then time and peak memory vs the naive torch path, Liger and
#      SDPA -> benchmarks/results/kernels_gpu.json, kernels.json, kernels_section.md;
#   3. the GPU kernel tests (`-m gpu --gpu`: Triton vs the float64 reference at full size);
#   4. the trainer and the native rollout engine on the GPU (`trainer.device`, `rollout.device`):
#      two GRPO / PPO steps on the tiny model equal the same steps on the CPU; the engine's
#      greedy decoding and logprobs equal the CPU engine's.
# Everything lands in $OUT (logs and the results files), which comes back with the reply.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/rlsys-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=/tmp/rlsys-triton-cache TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
status=0

echo "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if compgen -G ".cache/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --target /tmp/rlsys-wheels .cache/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/rlsys-wheels"
fi

echo "== 2. benchmarks/kernels.py --gpu"
timeout 240 "$PY" benchmarks/kernels.py --gpu --tune-s 120 2>&1 | tee "$OUT/kernels_gpu.txt" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1
cp benchmarks/results/kernels_gpu.json benchmarks/results/kernels.json \
  benchmarks/results/kernels_section.md benchmarks/results/kernels_gpu_table.md \
  benchmarks/results/kernels_gpu_partial.json "$OUT"/ 2>/dev/null

echo "== 3. GPU kernel tests"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider --gpu -m gpu \
  tests/unit/test_kernels_logprob.py tests/unit/test_kernels_attention.py \
  tests/unit/test_kernels_loss.py tests/unit/test_kernels_head_loss.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4. the trainer and the native engine on the GPU"
RLSYS_CACHE="$PWD/.cache/rlsys" timeout 220 "$PY" -m pytest -q -p no:cacheprovider --gpu -m gpu \
  tests/unit/test_devices.py tests/unit/test_native_engine.py 2>&1 | tee "$OUT/trainer_gpu.txt" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
