#!/usr/bin/env python3
"""Cost per weight of the fused gate's kernels, on FFN-sized matrices.

Times, on one thread (``--threads``), the ``torch.compile`` kernels of
``speechbrain_spg.fused_gate`` and, where they run, the hand-written C
kernels of ``speechbrain_spg.native_gate`` (the CPU default): the forward, the forward without the clip
of the sigmoid's argument (``SIGMOID_SATURATION``: what it saves), the
backward that recomputes the mask (CUDA default) and the backward that
reads it back from the gated weight (CPU default); next to two
yardsticks: an eager ATen sigmoid (arithmetic) and a copy (memory traffic:
one read per weight and one write into newly allocated memory, as the
forward reads the weight and writes its output; the backward from the
gated weight reads three values and writes one in place). Every timed run
passes over ``--matrices`` matrices of 3072 x 768 (an FFN matrix of
wav2vec2-base), more than the CPU caches hold, so data comes from memory as
in a training step (one matrix alone would be timed from the cache). The
weights are those of a fresh model (std 0.02, default threshold and
temperature). Denormals are not flushed, as in training. The backward
kernels write into the gradient buffers, as in training; these are
restored before each timed run, untimed. Prints nanoseconds per weight
(best of ``--repeats`` runs).

Usage:
    python benchmarks/gate_kernels.py
    python benchmarks/gate_kernels.py --threads 2

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import time

import torch

from speechbrain_spg import native_gate
from speechbrain_spg.fused_gate import compiled_kernels


def unclipped_forward(weight, threshold, tau):
    """The forward kernel's math without the clip of the sigmoid's
    argument."""
    x = (weight * weight - threshold * threshold) / (2 * tau)
    mask = torch.sigmoid(x)
    return weight * mask, mask.sum()


def best_ns_per_weight(fn, numel, repeats, setup=None):
    """Best wall time of ``fn()`` over ``repeats`` runs, per weight;
    ``setup()`` (untimed) runs before each."""
    setup = setup or (lambda: None)
    for _ in range(2):
        setup()
        fn()
    best = float("inf")
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / numel * 1e9


def native_cases(pairs, threshold, tau, zeros_grad, restore_grads):
    """The hand-written C kernels' cases (``native_gate``), as
    ``(run, setup)`` for ``(weight, gated weight, gradient)`` triples."""
    return {
        "native forward": (
            lambda: [
                native_gate.forward(w, threshold, tau) for w, _, _ in pairs
            ],
            None,
        ),
        "native backward, recompute": (
            lambda: [
                native_gate.backward(w, threshold, tau, g, zeros_grad)
                for w, _, g in pairs
            ],
            restore_grads,
        ),
        "native backward from gated": (
            lambda: [
                native_gate.backward_from_gated(
                    w, wm, threshold, tau, g, zeros_grad
                )
                for w, wm, g in pairs
            ],
            restore_grads,
        ),
    }


def main(argv=None):
    """Prints the per-weight cost of each kernel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--matrices",
        type=int,
        default=16,
        help="matrices per timed run (16: 151 MB of weights)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    std = 0.02
    weights = [torch.randn(3072, 768) * std for _ in range(args.matrices)]
    upstream = [torch.randn_like(weight) * 1e-3 for weight in weights]
    grads = [grad.clone() for grad in upstream]
    threshold = torch.tensor(0.05 * std)  # SPGOptions' defaults
    tau = torch.tensor(0.02 * std**2)
    zeros_grad = torch.tensor(1.0)
    kernels = compiled_kernels("cpu")
    unclipped = torch.compile(unclipped_forward, dynamic=True, fullgraph=True)
    gated = [kernels.forward(w, threshold, tau)[0] for w in weights]
    pairs = list(zip(weights, gated, grads))

    def restore_grads():
        for grad, original in zip(grads, upstream):
            grad.copy_(original)

    cases = {
        "forward": (
            lambda: [kernels.forward(w, threshold, tau) for w in weights],
            None,
        ),
        "forward, argument not clipped": (
            lambda: [unclipped(w, threshold, tau) for w in weights],
            None,
        ),
        "backward recomputing the mask": (
            lambda: [
                kernels.backward(w, threshold, tau, g, zeros_grad)
                for w, _, g in pairs
            ],
            restore_grads,
        ),
        "backward from the gated weight": (
            lambda: [
                kernels.backward_from_gated(
                    w, wm, threshold, tau, g, zeros_grad
                )
                for w, wm, g in pairs
            ],
            restore_grads,
        ),
    }
    if native_gate.available():
        cases |= native_cases(pairs, threshold, tau, zeros_grad, restore_grads)
    cases |= {
        "eager torch.sigmoid (yardstick)": (
            lambda: [torch.sigmoid(w) for w in weights],
            None,
        ),
        "copy (yardstick)": (lambda: [w.clone() for w in weights], None),
    }
    numel = sum(weight.numel() for weight in weights)
    print(
        f"{args.threads} thread(s), {args.matrices} matrices of "
        f"{tuple(weights[0].shape)} per run, compiled: {kernels.compiled}, "
        f"best of {args.repeats}"
    )
    for name, (fn, setup) in cases.items():
        cost = best_ns_per_weight(fn, numel, args.repeats, setup)
        print(f"{name:>32}: {cost:5.2f} ns per weight")


if __name__ == "__main__":
    main()
