#!/usr/bin/env python3
"""Evaluation-mode cost of an SPG lobe vs the dense lobe, in one process.

In evaluation mode (no gradients) every gated layer computes its gated
weight once and keeps it until the weight or the thresholds change, so
validation and test passes should cost what a dense model's cost.
``gate_overhead.py`` measures each variant in a process of its own, after
its training steps; passes of separate processes differ by several percent
on a shared CPU. This benchmark builds the dense lobe and the SPG lobe
(compiled gate) of the same random-weight model in ONE process and times
their evaluation passes alternately, dense-SPG then SPG-dense, so that both
see the same machine state. It prints the median of the per-pair ratios and
their interquartile range. The last line reads
``eval-time ratio spg/dense: MODEL R, MODEL R``.

Usage:
    python benchmarks/eval_overhead.py --device cpu
    python benchmarks/eval_overhead.py --device cuda

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gate_overhead  # noqa: E402 - the benchmark next to this file

from speechbrain_spg.architectures import hub_config, save_random_model  # noqa: E402
from speechbrain_spg.gates import GatedLinear  # noqa: E402


def pass_order(pair):
    """Which lobe runs first in pair ``pair``: they take turns.

    Arguments
    ---------
    pair : int
        Index of the pair of passes.

    Returns
    -------
    tuple of str
        ``("dense", "spg")`` for even pairs, ``("spg", "dense")`` for odd.

    Example
    -------
    >>> [pass_order(i) for i in range(2)]
    [('dense', 'spg'), ('spg', 'dense')]
    """
    return ("dense", "spg") if pair % 2 == 0 else ("spg", "dense")


def quartiles(values):
    """First quartile, median and third quartile of ``values``.

    Arguments
    ---------
    values : list of float
        At least two values.

    Returns
    -------
    tuple of float

    Example
    -------
    >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (1.5, 3.0, 4.5)
    """
    low, median, high = statistics.quantiles(values, n=4)
    return low, median, high


def cached_layers(lobe):
    """How many gated layers of ``lobe`` hold a cached weight, and of how
    many."""
    layers = [m for m in lobe.modules() if isinstance(m, GatedLinear)]
    return sum(m._cache is not None for m in layers), len(layers)


def timed_pass(lobe, wav, autocast, device):
    """Seconds of one evaluation pass, in its own autocast region (as
    SpeechBrain enters one per batch)."""
    gate_overhead.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        lobe(wav)
    gate_overhead.synchronize(device)
    return time.perf_counter() - start


def measure(source, args):
    """Alternating evaluation passes of the dense and SPG lobes of one
    model; returns their times and the per-pair ratios."""
    lobes = {}
    for name, variant in (("dense", "dense"), ("spg", "compiled")):
        lobe, _, _, wav, _, autocast = gate_overhead.training_setup(
            variant, source, args
        )
        lobes[name] = lobe.eval()
    for lobe in lobes.values():
        for _ in range(args.warmup):
            timed_pass(lobe, wav, autocast, args.device)
    cached, total = cached_layers(lobes["spg"])
    if cached != total:
        raise RuntimeError(
            f"only {cached} of {total} gated layers cached their weight "
            "after the warm-up passes: the evaluation cache is not in use"
        )
    times = {"dense": [], "spg": []}
    for pair in range(args.pairs):
        for name in pass_order(pair):
            times[name].append(
                timed_pass(lobes[name], wav, autocast, args.device)
            )
    ratios = [s / d for s, d in zip(times["spg"], times["dense"])]
    return times, ratios


def main(argv=None):
    """Measures every model and prints the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gate_overhead.add_batch_arguments(parser)
    parser.add_argument(
        "--models", nargs="+", default=list(gate_overhead.MODELS)
    )
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error(f"--pairs must be at least 2, got {args.pairs}")
    gate_overhead.quiet()
    gate_overhead.resolve_batch(args)
    gpu = args.device == "cuda"
    print(
        f"device {args.device}, batch {args.batch} x {args.seconds} s"
        f"{' (bf16 autocast)' if gpu else ''}, {args.pairs} alternating "
        f"pairs of evaluation passes after {args.warmup} warm-up passes "
        f"each, one process; {torch.get_num_threads()} CPU threads"
    )
    medians = {}
    with tempfile.TemporaryDirectory() as work:
        for hub_id in args.models:
            source = save_random_model(hub_config(hub_id), f"{work}/{hub_id}")
            times, ratios = measure(source, args)
            low, median, high = quartiles(ratios)
            medians[hub_id] = median
            print(
                f"\n{hub_id} (random weights): dense "
                f"{statistics.median(times['dense']):.4f} s, spg "
                f"{statistics.median(times['spg']):.4f} s per pass (medians)"
                f"\n  spg/dense per pair: median {median:.3f}, quartiles "
                f"{low:.3f}-{high:.3f}, range {min(ratios):.3f}-"
                f"{max(ratios):.3f}"
            )
    ratios = ", ".join(f"{hub_id} {r:.3f}" for hub_id, r in medians.items())
    print(f"eval-time ratio spg/dense: {ratios}")


if __name__ == "__main__":
    main()
