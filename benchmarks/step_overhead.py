#!/usr/bin/env python3
"""Training-step cost of an SPG lobe vs the dense lobe, in one process.

``gate_overhead.py`` measures each variant in a process of its own (which
its peak-memory figure needs). On a shared CPU, steps of separate processes
differ by up to 10% from run to run, more than the effects worth measuring
now. This benchmark builds the dense lobe and the SPG lobe of the same
random-weight model in ONE process, each with its CTC head and Adam
optimiser, and times their training steps (those of ``gate_overhead.py``)
alternately, dense-SPG then SPG-dense, so that both see the same machine
state. It prints the median of the per-pair ratios and their interquartile
range, and the median number of minor page faults per step of each lobe
(Unix): memory the allocator gave back to the system and takes again is
zeroed by the kernel, which a CPU step pays for. Subnormal results are
flushed to zero, as in the recipe (``gate_overhead.flush_subnormals``). The
last line reads
``step-time ratio spg/dense: MODEL R, MODEL R``.

``--variant`` picks the SPG variant among those of ``gate_overhead.py``
(default ``compiled``); a variant that patches the gate for its process
(e.g. ``compiled_recompute_gated``) changes only the SPG lobe, so
comparing two variants takes two runs, each against its own dense steps.
Both models are in memory at once: about 10 GB for HuBERT-large.

Usage:
    python benchmarks/step_overhead.py --device cpu
    python benchmarks/step_overhead.py --device cuda

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gate_overhead  # noqa: E402 - the benchmark next to this file
from eval_overhead import (  # noqa: E402
    add_pair_arguments,
    alternate,
    check_pairs,
    print_pairs,
    print_ratio_line,
)

from speechbrain_spg.data.architectures import hub_config, save_random_model  # noqa: E402


def timed_step(setup, device):
    """Seconds of one training step of a ``gate_overhead.training_setup``
    (forward, losses, backward, Adam step, gradients cleared)."""
    lobe, head, optimizer, wav, targets, autocast = setup
    gate_overhead.synchronize(device)
    start = time.perf_counter()
    gate_overhead.step_fn(
        lobe, head, optimizer, wav, targets, autocast, "after-step"
    )
    gate_overhead.synchronize(device)
    return time.perf_counter() - start


def minor_faults():
    """Minor page faults of this process so far (None without ``resource``)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(source, args):
    """Alternating training steps of the dense and SPG lobes of one model;
    returns their times, the per-pair ratios and the minor page faults of
    each timed step."""
    setups = {
        "dense": gate_overhead.training_setup("dense", source, args),
        "spg": gate_overhead.training_setup(args.variant, source, args),
    }
    for setup in setups.values():
        for _ in range(args.warmup):
            timed_step(setup, args.device)
    faults = {"dense": [], "spg": []}

    def step(name):
        before = minor_faults()
        seconds = timed_step(setups[name], args.device)
        if before is not None:
            faults[name].append(minor_faults() - before)
        return seconds

    times, ratios = alternate(step, args.pairs)
    return times, ratios, faults


def fault_note(faults):
    """The page-fault line of one model (None without counts)."""
    if not faults["dense"]:
        return None
    return (
        "minor page faults per step (medians): "
        f"dense {statistics.median(faults['dense']):.0f}, "
        f"spg {statistics.median(faults['spg']):.0f}"
    )


def main(argv=None):
    """Measures every model and prints the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gate_overhead.add_batch_arguments(parser)
    add_pair_arguments(parser, pairs=20, warmup=2)
    parser.add_argument(
        "--variant",
        default="compiled",
        help="SPG variant of gate_overhead.py (default: compiled)",
    )
    args = parser.parse_args(argv)
    check_pairs(parser, args)
    if args.variant == "dense":
        parser.error("--variant must be an SPG variant, got 'dense'")
    gate_overhead.quiet()
    gate_overhead.resolve_batch(args)
    gpu = args.device == "cuda"
    print(
        f"device {args.device}, batch {args.batch} x {args.seconds} s"
        f"{' (bf16 autocast)' if gpu else ''}, SPG variant {args.variant}, "
        f"{args.pairs} alternating pairs of training steps after "
        f"{args.warmup} warm-up steps each, one process; "
        f"{torch.get_num_threads()} CPU threads"
    )
    medians = {}
    with (
        gate_overhead.flush_subnormals(),
        tempfile.TemporaryDirectory() as work,
    ):
        for hub_id in args.models:
            source = save_random_model(hub_config(hub_id), f"{work}/{hub_id}")
            times, ratios, faults = measure(source, args)
            medians[hub_id] = print_pairs(
                hub_id, times, ratios, "step", fault_note(faults)
            )
    print_ratio_line("step-time", medians)


if __name__ == "__main__":
    main()
