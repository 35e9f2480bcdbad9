#!/usr/bin/env python3
"""Cost per weight of the fused gate's kernels, on one weight matrix.

Times, on one thread (``--threads``) and one 3072 x 768 matrix (an FFN
matrix of wav2vec2-base), the compiled kernels of
``speechbrain_spg.fused_gate``: the forward, the backward that recomputes
the mask (CUDA default) and the backward that reads it back from the gated
weight (CPU default); next to two yardsticks on the same matrix: an eager
ATen sigmoid (arithmetic) and a copy (memory traffic: one read and one
write per weight, where the forward also reads one and writes one and the
backward from the gated weight reads three and writes one). Prints
nanoseconds per weight (best of ``--repeats`` runs). The backward kernels
write into the gradient buffer, as in training; repeated runs rewrite the
same buffer (denormals are flushed so that shrinking values cost nothing
extra).

Usage:
    python benchmarks/gate_kernels.py
    python benchmarks/gate_kernels.py --threads 2

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import time

import torch

from speechbrain_spg.fused_gate import compiled_kernels


def best_ns_per_weight(fn, numel, repeats):
    """Best wall time of ``fn()`` over ``repeats`` runs, per weight."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / numel * 1e9


def main(argv=None):
    """Prints the per-weight cost of each kernel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    weight = torch.randn(3072, 768) * 0.05
    grad = torch.randn_like(weight)
    threshold, tau = torch.tensor(0.03), torch.tensor(0.02 * 0.05**2)
    zeros_grad = torch.tensor(1.0)
    kernels = compiled_kernels("cpu")
    gated, _ = kernels.forward(weight, threshold, tau)
    cases = {
        "forward": lambda: kernels.forward(weight, threshold, tau),
        "backward recomputing the mask": lambda: kernels.backward(
            weight, threshold, tau, grad, zeros_grad
        ),
        "backward from the gated weight": lambda: kernels.backward_from_gated(
            weight, gated, threshold, tau, grad, zeros_grad
        ),
        "eager torch.sigmoid (yardstick)": lambda: torch.sigmoid(weight),
        "copy (yardstick)": lambda: weight.clone(),
    }
    print(
        f"{args.threads} thread(s), one {tuple(weight.shape)} matrix, "
        "compiled: "
        f"{kernels.compiled}, best of {args.repeats}"
    )
    for name, fn in cases.items():
        cost = best_ns_per_weight(fn, weight.numel(), args.repeats)
        print(f"{name:>32}: {cost:5.2f} ns per weight")


if __name__ == "__main__":
    main()
