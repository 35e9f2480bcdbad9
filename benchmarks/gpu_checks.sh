#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent GPU machine
# (the `device` tool: 15 minutes per session; see benchmarks/RESULTS.md).
#
#   1. the CUDA cases of tests/test_kernels.py and tests/test_layers.py
#      (every backend against the reference formula on CUDA: outputs,
#      gradients, bf16 autocast, the Triton kernels, no device read-back
#      while gating);
#   2. python benchmarks/gate_overhead.py --device cuda --rounds 2 --steps 40
#      --eval-steps 40
#      (wav2vec2-base and HuBERT-large, batch 8 x 15 s, bf16 autocast) with
#      the variants dense and compiled (all matrices gated in one call of
#      the hand-written Triton kernels), each measured twice in separate
#      processes, 40 timed steps each: one short round cannot decide the
#      step-time goal;
#   3. python benchmarks/step_overhead.py --device cuda --pairs 40 (training
#      steps of the dense and SPG lobes, alternating, in one process);
#   4. python benchmarks/eval_overhead.py --device cuda --pairs 20
#      (evaluation passes of the dense and SPG lobes, alternating, in one
#      process).
# Most important first: a run cut short by the device's time limit keeps
# the step-time numbers. Budget about 7 minutes.
#
# The GPU image has torch, transformers and pytest but not SpeechBrain. On the
# CPU machine, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl speechbrain==1.1.2 \
#     hyperpyyaml==1.2.3 ruamel.yaml==0.18.17 ruamel.yaml.clib soundfile cffi \
#     pycparser
# then run this script with `.whl` carried (device tool: carry [".whl"],
# command `bash benchmarks/gpu_checks.sh`, timeout_s 590; a first start takes minutes).
# The steps' own timeouts add up to 520 s, so the script always reaches its
# last line within the device's 600 s per command.
# Logs go to $OUT (device tool) or ./gpu_checks_out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_checks_out}
mkdir -p "$out"
if ! python3 -c "import speechbrain" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$out/device.txt" 2>&1
python3 -c "import torch, transformers, triton; print(torch.__version__, \
transformers.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >> "$out/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_kernels.py tests/test_layers.py -k cuda 2>&1 \
    | grep -v DEBUG | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
timeout 240 python3 benchmarks/gate_overhead.py --device cuda --variants \
    dense compiled --rounds 2 --steps 40 --eval-steps 40 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/gate_overhead.txt"
bench=${PIPESTATUS[0]}
timeout 90 python3 benchmarks/step_overhead.py --device cuda --pairs 40 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/step_overhead.txt"
steps=${PIPESTATUS[0]}
timeout 40 python3 benchmarks/eval_overhead.py --device cuda --pairs 20 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/eval_overhead.txt"
evaluation=${PIPESTATUS[0]}
echo "tests exit $tests, gate_overhead exit $bench, step_overhead exit" \
    "$steps, eval_overhead exit $evaluation" | tee -a "$out/device.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$steps" -eq 0 ] \
    && [ "$evaluation" -eq 0 ]
