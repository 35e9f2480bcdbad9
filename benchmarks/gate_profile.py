#!/usr/bin/env python3
"""Where the time of an SPG training step goes, next to the dense step.

Profiles a few training steps (the step of ``gate_overhead.py``: forward,
CTC + sparsity loss, backward, Adam step) of one model for each variant and
prints, per step:

- the wall time,
- the device's busy time (the union of its kernels' intervals) and the
  number of kernels launched (CUDA only), which tell whether the step is
  bound by the GPU or by the host launching work,
- the operations with the most self time (device time on CUDA, CPU time
  on CPU).

A step whose wall time exceeds the device's busy time waits on the host
(Python, autograd, kernel launches); one where they match is bound by the
kernels themselves. Subnormal results are flushed to zero, as in the
recipe (``gate_overhead.flush_subnormals``).

Usage:
    python benchmarks/gate_profile.py --device cuda
    python benchmarks/gate_profile.py --device cpu --models facebook/wav2vec2-base

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import gate_overhead  # noqa: E402 - the benchmark next to this file

from speechbrain_spg.data.architectures import hub_config, save_random_model  # noqa: E402


def busy_time_us(intervals):
    """Length of the union of ``(start, end)`` intervals.

    Arguments
    ---------
    intervals : list of tuple
        Start and end times.

    Returns
    -------
    float
        Total time covered by at least one interval.

    Example
    -------
    >>> busy_time_us([(0, 4), (2, 6), (10, 11)])
    7
    """
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def kernel_intervals(prof):
    """``(start, end)`` in microseconds of every device kernel profiled."""
    return [
        (event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
    ]


def profile_variant(variant, source, args):
    """Prints the profile of ``args.steps`` steps of one variant."""
    device = args.device
    lobe, head, optimizer, wav, targets, autocast = (
        gate_overhead.training_setup(variant, source, args)
    )

    def step():
        gate_overhead.step_fn(
            lobe, head, optimizer, wav, targets, autocast, "after-step"
        )

    for _ in range(args.warmup):
        step()
    gate_overhead.synchronize(device)
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        gate_overhead.synchronize(device)
        wall = (time.perf_counter() - start) / args.steps
    kernels = kernel_intervals(prof)
    busy = busy_time_us(kernels) / 1e3 / args.steps
    print(
        f"\n== {variant}: {wall * 1e3:.1f} ms per step (wall, profiled), "
        f"device busy {busy:.1f} ms, {len(kernels) / args.steps:.0f} kernels"
    )
    sort = (
        "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    )
    print(
        prof.key_averages().table(
            sort_by=sort, row_limit=args.top, max_name_column_width=70
        )
    )


def main(argv=None):
    """Profiles every model x variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gate_overhead.add_batch_arguments(parser)
    parser.add_argument(
        "--models", nargs="+", default=["facebook/hubert-large-ll60k"]
    )
    parser.add_argument("--variants", nargs="+", default=["dense", "compiled"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    args = parser.parse_args(argv)
    gate_overhead.quiet()
    gate_overhead.resolve_batch(args)
    print(
        f"device {args.device}, batch {args.batch} x {args.seconds} s, "
        f"{args.steps} profiled steps after {args.warmup} warm-up"
    )
    with (
        gate_overhead.flush_subnormals(),
        tempfile.TemporaryDirectory() as work,
    ):
        for hub_id in args.models:
            source = save_random_model(hub_config(hub_id), f"{work}/{hub_id}")
            print(f"\n{hub_id} (random weights)")
            for variant in args.variants:
                profile_variant(variant, source, args)


if __name__ == "__main__":
    main()
