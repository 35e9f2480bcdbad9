#!/usr/bin/env python3
"""Host time an SPG lobe adds to a training step, on the real module tree.

``gate_host_overhead.py`` times the gate on a chain of linear layers; a lobe
adds work of its own in every step (finding its gated layers, the sparsity
term, the thresholds' optimiser update, ...), which that chain does not
see: looking the 72 gated layers of wav2vec2-base up by name cost about
1.1 ms per step on this project's CPU before the lobes kept them. This
benchmark builds the lobes of wav2vec2-base and HuBERT-large with their
real number of blocks and module names but the unit tests' tiny width
(hidden size 32, no LayerDrop), so the arithmetic is negligible and a step
costs mostly host time, and times training steps of the dense and the SPG
lobe (compiled gate) alternately in one process (``step_overhead.py``'s
steps). It prints the median per-pair difference SPG - dense, per step and
per gated matrix.

- ``--device cuda``: the GPU path as it runs (hand-written Triton kernels,
  all matrices in one call, bf16 autocast); with kernels this small the
  GPU waits on the host, so the difference is mostly the host time the
  gates add on that machine.
- ``--device cpu --simulate-triton``: the same path on a CPU, the Triton
  launches replaced by no-ops (``gate_host_overhead.simulated_triton``),
  the matrices gated in one call as on one GPU, under bf16 autocast.
- ``--device cpu``: the CPU path (C kernels, one matrix per call, float32).

The last line reads
``host time per training step over dense: MODEL D ms, MODEL D ms``.

Usage:
    python benchmarks/lobe_host_overhead.py --device cpu --simulate-triton
    python benchmarks/lobe_host_overhead.py --device cuda

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gate_host_overhead  # noqa: E402 - the benchmarks next to this file
import gate_overhead  # noqa: E402
from eval_overhead import add_pair_arguments, alternate, check_pairs  # noqa: E402
from step_overhead import timed_step  # noqa: E402

from speechbrain_spg import gates  # noqa: E402
from speechbrain_spg.data.architectures import (  # noqa: E402
    HUB_CONFIGS,
    TINY_OVERRIDES,
    build_config,
    hub_config,
    save_random_model,
)


def tiny_width_config(hub_id):
    """``hub_id``'s architecture at the unit tests' tiny width.

    Arguments
    ---------
    hub_id : str
        A key of ``architectures.HUB_CONFIGS``.

    Returns
    -------
    transformers.PretrainedConfig
        The hub model's number of blocks, layer-norm order and front-end
        normalisation, with ``TINY_OVERRIDES``' sizes and no LayerDrop
        (every block runs in every step).

    Example
    -------
    >>> config = tiny_width_config("facebook/hubert-large-ll60k")
    >>> config.num_hidden_layers, config.hidden_size, config.layerdrop
    (24, 32, 0.0)
    >>> config.do_stable_layer_norm
    True
    """
    blocks = hub_config(hub_id).num_hidden_layers  # (unknown id: ValueError)
    model_type, overrides = HUB_CONFIGS[hub_id]
    return build_config(
        model_type,
        **{
            **overrides,
            **TINY_OVERRIDES,
            "num_hidden_layers": blocks,
            "layerdrop": 0.0,
        },
    )


def gpu_path_on_cpu():
    """Patches under which an SPG lobe on a CPU takes the GPU path: Triton
    launches as no-ops, all matrices gated in one call."""
    stack = contextlib.ExitStack()
    stack.enter_context(gate_host_overhead.simulated_triton())
    stack.enter_context(
        mock.patch.object(gates, "default_pregating", lambda weight: True)
    )
    return stack


def bf16_autocast(device):
    """A bf16 autocast region of ``device``, as the GPU recipes train."""
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


def measure(source, args):
    """Alternating training steps of the tiny-width dense and SPG lobes;
    returns their times (``alternate``) and the number of gated
    matrices."""
    setups = {
        name: list(gate_overhead.training_setup(variant, source, args))
        for name, variant in (("dense", "dense"), ("spg", "compiled"))
    }
    if args.simulate_triton:
        for setup in setups.values():
            setup[5] = bf16_autocast("cpu")
    for setup in setups.values():
        for _ in range(args.warmup):
            timed_step(setup, args.device)
    times, _ = alternate(
        lambda name: timed_step(setups[name], args.device), args.pairs
    )
    return times, len(setups["spg"][0].gated_names)


def print_model(hub_id, matrices, times):
    """Prints one model's step times and the per-pair differences; returns
    the median difference in seconds."""
    differences = [s - d for s, d in zip(times["spg"], times["dense"])]
    low, median, high = statistics.quantiles(differences, n=4)
    print(
        f"\n{hub_id} at tiny width ({matrices} gated matrices): dense "
        f"{statistics.median(times['dense']) * 1e3:.2f} ms, spg "
        f"{statistics.median(times['spg']) * 1e3:.2f} ms per step (medians)"
        f"\n  spg - dense per pair: median {median * 1e3:.2f} ms "
        f"(quartiles {low * 1e3:.2f} to {high * 1e3:.2f}), "
        f"{median / matrices * 1e6:.1f} us per gated matrix"
    )
    return median


def main(argv=None):
    """Measures every model and prints the host time the gates add."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    add_pair_arguments(parser, pairs=40, warmup=5)
    parser.add_argument(
        "--simulate-triton",
        action="store_true",
        help="CPU: the GPU path with no-op Triton launches, under bf16 "
        "autocast",
    )
    args = parser.parse_args(argv)
    check_pairs(parser, args)
    unknown = [hub_id for hub_id in args.models if hub_id not in HUB_CONFIGS]
    if unknown:
        parser.error(
            f"--models: no stored configuration for {unknown}; known: "
            f"{sorted(HUB_CONFIGS)}"
        )
    if args.simulate_triton and args.device != "cpu":
        parser.error("--simulate-triton is for --device cpu")
    # One short utterance: the work of a step hardly depends on it.
    args.batch, args.seconds = 1, 0.2
    gate_overhead.quiet()
    path = (
        "Triton simulated: no-op launches, bf16 autocast"
        if args.simulate_triton
        else "bf16 autocast"
        if args.device == "cuda"
        else "float32"
    )
    print(
        f"device {args.device} ({path}), tiny width, batch 1 x 0.2 s, "
        f"{args.pairs} alternating pairs of training steps after "
        f"{args.warmup} warm-up steps each, one process; "
        f"{torch.get_num_threads()} CPU threads"
    )
    medians = {}
    with (
        gate_overhead.flush_subnormals(),
        tempfile.TemporaryDirectory() as work,
        gpu_path_on_cpu() if args.simulate_triton else contextlib.nullcontext(),
    ):
        for hub_id in args.models:
            config = tiny_width_config(hub_id)
            source = save_random_model(config, f"{work}/{hub_id}")
            times, matrices = measure(source, args)
            medians[hub_id] = print_model(hub_id, matrices, times)
    print(
        "host time per training step over dense: "
        + ", ".join(f"{h} {m * 1e3:.2f} ms" for h, m in medians.items())
    )


if __name__ == "__main__":
    main()
