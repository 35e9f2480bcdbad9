#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent GPU machine
# (the `device` tool: 15 minutes per session; see benchmarks/RESULTS.md).
#
#   1. the CUDA cases of tests/test_fused_gate.py, tests/test_gates.py and
#      tests/test_triton_gate.py (fused, compiled and Triton gate vs the
#      reference on CUDA: outputs, gradients, bf16 autocast step, the cast
#      in the gate's kernel, no device read-back while gating);
#   2. python benchmarks/gate_overhead.py --device cuda --rounds 2 --steps 40
#      --eval-steps 40
#      (wav2vec2-base and HuBERT-large, batch 8 x 15 s, bf16 autocast) with
#      the variants dense and compiled (all matrices gated in one call of
#      the hand-written Triton kernels), each measured twice in separate
#      processes, 40 timed steps each (2 s of wav2vec2-base steps): its
#      rounds of 20 steps spread over 1.08-1.20 in run 4, so one short
#      round cannot decide its goal; the reference, per-matrix, per-block
#      and torch.compile-per-block paths were measured in earlier runs
#      (benchmarks/RESULTS.md);
#   3. python benchmarks/step_overhead.py --device cuda --pairs 40 (training
#      steps of the dense and SPG lobes, alternating, in one process; run 4
#      gave 1.039 for wav2vec2-base here against 1.140-1.157 from step 2);
#   4. python benchmarks/lobe_host_overhead.py --device cuda --pairs 20 (the
#      host time the gates add to a training step of the real lobes at tiny
#      width, where the GPU waits on the host: the lobes had looked up their
#      72-144 gated layers by name in every step until 2026-11-28, 1.1 ms of
#      host time per wav2vec2-base step on the CPU machine; it replaces
#      gate_host_overhead.py, whose chain of linear layers misses the lobes'
#      own work and which did not finish within run 4's 30 s);
#   5. python benchmarks/gate_profile.py --device cuda on wav2vec2-base,
#      dense and compiled: wall vs device-busy time per step, which tells
#      whether its SPG step waits on the host (HuBERT-large's was profiled in
#      run 3: its device was busy 2.4% longer than dense's);
#   6. python benchmarks/eval_overhead.py --device cuda --pairs 20
#      (evaluation passes of the dense and SPG lobes, alternating, in one
#      process).
# Most important first: a run cut short by the device's time limit keeps
# the step-time numbers. Run 3 (2026-11-27, H100) took 418 s with the
# steps of then (no step 4, a host-overhead chain benchmark instead) and
# three variants, one round, 20 steps, in step 2 (four processes per model
# now, with twice the steps); budget about 8 minutes.
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
# The steps' own timeouts add up to 550 s, so the script always reaches its
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
timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_fused_gate.py tests/test_gates.py tests/test_triton_gate.py \
    -k cuda 2>&1 | grep -v DEBUG | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}
timeout 240 python3 benchmarks/gate_overhead.py --device cuda --variants \
    dense compiled --rounds 2 --steps 40 --eval-steps 40 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/gate_overhead.txt"
bench=${PIPESTATUS[0]}
timeout 80 python3 benchmarks/step_overhead.py --device cuda --pairs 40 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/step_overhead.txt"
steps=${PIPESTATUS[0]}
timeout 40 python3 benchmarks/lobe_host_overhead.py --device cuda \
    --pairs 20 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/lobe_host_overhead.txt"
lobe_host=${PIPESTATUS[0]}
timeout 50 python3 benchmarks/gate_profile.py --device cuda \
    --models facebook/wav2vec2-base 2>&1 \
    > "$out/gate_profile.txt"
profile=$?
grep "^== " "$out/gate_profile.txt"
timeout 40 python3 benchmarks/eval_overhead.py --device cuda --pairs 20 2>&1 \
    | grep -v "feature extractor is frozen" | tee "$out/eval_overhead.txt"
evaluation=${PIPESTATUS[0]}
echo "tests exit $tests, gate_overhead exit $bench, step_overhead exit" \
    "$steps, lobe_host_overhead exit $lobe_host, gate_profile exit" \
    "$profile, eval_overhead exit $evaluation" | tee -a "$out/device.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$steps" -eq 0 ] \
    && [ "$lobe_host" -eq 0 ] && [ "$profile" -eq 0 ] && [ "$evaluation" -eq 0 ]
