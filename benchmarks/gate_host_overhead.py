#!/usr/bin/env python3
"""Host time the gates add per gated matrix and training step.

On a GPU the fused gate's kernels are cheap (an H100 was busy 98 ms of a
HuBERT-large SPG step against 90 ms dense), but the host work around them
(small threshold operations, autograd nodes, compiled-kernel calls) is
paid once per gated matrix and step, and that made the step 1.86x the dense
one (see ``benchmarks/RESULTS.md``). This benchmark isolates that cost: a
chain of ``--matrices`` tiny linear layers (16 x 16, so the arithmetic is
negligible) trained one step at a time

- as plain ``nn.Linear`` layers (dense),
- through the compiled gate one matrix at a time (``per_matrix``),
- through the compiled gate with the matrices gated six per call
  (``per_block``: one transformer block's worth, ``gates.pregated_weights``;
  on CUDA one launch of the hand-written Triton kernels per call,
  ``triton_gate``),
- the same with the ``torch.compile`` batch kernels instead of Triton's
  (``per_block_no_triton``; on CPU the same as ``per_block``),
- with the lobes' default number of matrices per call
  (``lobe_default``, ``gates.matrices_per_call``: all of them in one call
  with the Triton kernels on one GPU, else per block),

and prints the median step time and the extra time per gated matrix over
dense. ``--simulate-triton`` (CPU only) measures on a CPU the host work of
the GPU path: the Triton kernels are taken as supported and their launches
replaced by no-ops, and the backward recomputes the mask as on CUDA, so
``per_block`` and ``lobe_default`` time everything but the kernels (whose
sums are then left unset: the loss values mean nothing, only the times).
``--modes`` measures some of them only (dense always): on a GPU the
``per_matrix`` and ``per_block_no_triton`` modes compile ``torch.compile``
kernels first, which took longer than the 30 s a GPU run gave this
benchmark. The last line reads ``host time per gated matrix over dense:
per-matrix P us, per block B us, lobe default L us`` (the measured ones of
these three).

Usage:
    python benchmarks/gate_host_overhead.py
    python benchmarks/gate_host_overhead.py --device cuda
    python benchmarks/gate_host_overhead.py --simulate-triton
    python benchmarks/gate_host_overhead.py --device cuda --modes per_block lobe_default

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import contextlib
import statistics
import time
import types
from unittest import mock

import torch

from speechbrain_spg import fused_gate, triton_gate
from speechbrain_spg.gates import (
    MATRICES_PER_CALL,
    GatedLinear,
    SelfPinchingGate,
    pregated_weights,
)

MODES = (
    "dense",
    "per_matrix",
    "per_block",
    "per_block_no_triton",
    "lobe_default",
)
#: The modes of the last line, and their names there.
SUMMARY = (
    ("per_matrix", "per-matrix"),
    ("per_block", "per block"),
    ("lobe_default", "lobe default"),
)


def build(mode, count, device):
    """The layers of a mode and their gate (None for dense)."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(16, 16).to(device) for _ in range(count)]
    if mode == "dense":
        return linears, None
    gate = SelfPinchingGate(
        torch.full((count,), 0.1),
        list(range(count)),
        0.05,
        0.5,
        impl="compiled",
    ).to(device)
    return [
        GatedLinear(layer, gate, i) for i, layer in enumerate(linears)
    ], gate


def step_time(mode, args):
    """Median wall time of one training step of the chain."""
    layers, gate = build(mode, args.matrices, args.device)
    x = torch.randn(4, 16, device=args.device, requires_grad=True)

    def step():
        context = contextlib.nullcontext()
        if gate is not None:
            gate.soft_zeros.clear()
            if mode != "per_matrix":
                chunk = None if mode == "lobe_default" else MATRICES_PER_CALL
                context = pregated_weights(
                    gate, layers, chunk=chunk, enabled=True
                )
        with context:
            h = x
            for layer in layers:
                h = layer(h)
        loss = h.sum()
        if gate is not None:
            # As the lobes' sparsity term: the counts of a call that gated
            # every matrix are taken whole.
            zeros = gate.recorded_soft_zero_vector(args.matrices)
            if zeros is None:
                zeros = torch.stack(list(gate.soft_zeros.values()))
            loss = loss + 1e-3 * zeros.sum()
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _NoLaunch:
    """A Triton kernel whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def simulated_triton():
    """Patches under which the Triton path runs on CPU tensors, every launch
    a no-op, with the mask recomputed in the backward as on CUDA."""
    kernels = types.SimpleNamespace(
        SLOTS=6,
        BLOCK=1024,
        gate_forward_kernel=_NoLaunch(),
        gate_backward_kernel=_NoLaunch(),
    )
    stack = contextlib.ExitStack()
    stack.enter_context(
        mock.patch.object(triton_gate, "_kernels", lambda: kernels)
    )
    stack.enter_context(
        mock.patch.object(triton_gate, "supports", lambda weights: True)
    )
    stack.enter_context(
        mock.patch.object(fused_gate, "default_recompute_mask", lambda w: True)
    )
    return stack


def main(argv=None):
    """Prints step times and the host time per gated matrix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--matrices",
        type=int,
        default=144,
        help="gated matrices (144: HuBERT-large, 72: wav2vec2-base)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--simulate-triton",
        action="store_true",
        help="CPU: the Triton path with no-op launches (its host work only)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="modes to measure (dense always: the others are read against "
        "it); default: all",
    )
    args = parser.parse_args(argv)
    if args.simulate_triton and args.device != "cpu":
        parser.error("--simulate-triton is for --device cpu")
    modes = [mode for mode in MODES if mode == "dense" or mode in args.modes]
    print(
        f"device {args.device}"
        f"{' (Triton simulated: no-op launches)' if args.simulate_triton else ''}"
        f", {args.matrices} matrices of 16 x 16, "
        f"median of {args.steps} steps after {args.warmup} warm-up, "
        f"{torch.get_num_threads()} CPU threads"
    )
    times = {}
    for mode in modes:
        with contextlib.ExitStack() as stack:
            if args.simulate_triton:
                stack.enter_context(simulated_triton())
            if mode == "per_block_no_triton":
                stack.enter_context(
                    mock.patch.object(triton_gate, "supports", lambda w: False)
                )
            times[mode] = step_time(mode, args)
    extra = {
        mode: (times[mode] - times["dense"]) / args.matrices * 1e6
        for mode in modes
    }
    for mode in modes:
        print(
            f"{mode:>19}: {times[mode] * 1e3:8.2f} ms per step, "
            f"{extra[mode]:7.1f} us per gated matrix over dense"
        )
    summary = [
        f"{label} {extra[mode]:.1f} us"
        for mode, label in SUMMARY
        if mode in extra
    ]
    print("host time per gated matrix over dense: " + ", ".join(summary))


if __name__ == "__main__":
    main()
