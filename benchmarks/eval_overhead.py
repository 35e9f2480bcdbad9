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

from speechbrain_spg.data.architectures import hub_config, save_random_model  # noqa: E402
from speechbrain_spg.layers import GatedLinear  # noqa: E402


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


def alternate(time_one, pairs):
    """Times the two lobes in ``pairs`` alternating pairs (``pass_order``).

    Arguments
    ---------
    time_one : callable
        ``time_one(name)``: seconds of one pass of lobe ``"dense"`` or
        ``"spg"``.
    pairs : int
        Number of pairs.

    Returns
    -------
    times : dict
        The seconds of each lobe, in order.
    ratios : list of float
        ``spg / dense`` of each pair.

    Example
    -------
    >>> seconds = {"dense": 2.0, "spg": 3.0}
    >>> alternate(seconds.get, 2)
    ({'dense': [2.0, 2.0], 'spg': [3.0, 3.0]}, [1.5, 1.5])
    """
    times = {"dense": [], "spg": []}
    for pair in range(pairs):
        for name in pass_order(pair):
            times[name].append(time_one(name))
    ratios = [s / d for s, d in zip(times["spg"], times["dense"])]
    return times, ratios


def add_pair_arguments(parser, pairs, warmup):
    """``--models``, ``--pairs`` and ``--warmup`` (defaults ``pairs`` and
    ``warmup``), shared by the benchmarks that alternate two lobes."""
    parser.add_argument(
        "--models", nargs="+", default=list(gate_overhead.MODELS)
    )
    parser.add_argument("--pairs", type=int, default=pairs)
    parser.add_argument("--warmup", type=int, default=warmup)


def check_pairs(parser, args):
    """Refuses fewer than two pairs (no quartiles)."""
    if args.pairs < 2:
        parser.error(f"--pairs must be at least 2, got {args.pairs}")


def print_pairs(hub_id, times, ratios, unit, note=None):
    """Prints one model's median times and per-pair ratio statistics;
    returns the median ratio.

    Arguments
    ---------
    hub_id : str
        The model.
    times : dict
        Seconds of each lobe (``alternate``).
    ratios : list of float
        Per-pair ratios.
    unit : str
        What one timing is (``"pass"``, ``"step"``).
    note : str, optional
        A line printed between the times and the ratio statistics.

    Returns
    -------
    float
        The median of ``ratios``.
    """
    low, median, high = quartiles(ratios)
    print(
        f"\n{hub_id} (random weights): dense "
        f"{statistics.median(times['dense']):.4f} s, spg "
        f"{statistics.median(times['spg']):.4f} s per {unit} (medians)"
        + (f"\n  {note}" if note else "")
        + f"\n  spg/dense per pair: median {median:.3f}, quartiles "
        f"{low:.3f}-{high:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
    )
    return median


def print_ratio_line(label, medians):
    """The last line: ``LABEL ratio spg/dense: MODEL R, MODEL R``."""
    ratios = ", ".join(f"{hub_id} {r:.3f}" for hub_id, r in medians.items())
    print(f"{label} ratio spg/dense: {ratios}")


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
    return alternate(
        lambda name: timed_pass(lobes[name], wav, autocast, args.device),
        args.pairs,
    )


def main(argv=None):
    """Measures every model and prints the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gate_overhead.add_batch_arguments(parser)
    add_pair_arguments(parser, pairs=40, warmup=3)
    args = parser.parse_args(argv)
    check_pairs(parser, args)
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
            medians[hub_id] = print_pairs(hub_id, times, ratios, "pass")
    print_ratio_line("eval-time", medians)


if __name__ == "__main__":
    main()
