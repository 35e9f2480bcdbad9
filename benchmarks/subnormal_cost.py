#!/usr/bin/env python3
"""What subnormal numbers cost a trained SPG lobe's training step on a CPU.

A lobe whose gates have pinched most of its weights holds, without care,
subnormal numbers (below 1.2e-38 in float32) in two places: gated weights
``W * M`` of small pinched weights, and the gradients that flow back
through an almost fully pinched matrix. x86 CPUs compute with them through
a slow microcode path. The gate now returns no subnormal gated weight
(``fused_gate.flush_subnormal``), and the recipe flushes subnormal results
to zero (``torch.set_flush_denormal(True)``, ``flush_subnormals`` in
``train.py``). This benchmark measures both, in ONE process, on one thread
(so ``torch.set_flush_denormal`` covers every thread that computes), in
rounds that alternate:

- ``dense``: the dense lobe of the same model, flush-to-zero on;
- ``spg``: the SPG lobe of a recipe run's checkpoint, flush-to-zero on (the
  recipe), against ``dense``;
- ``dense, no flush-to-zero`` and ``spg, no flush-to-zero``: both without
  it (a training loop that does not set it);
- ``spg, subnormal gated weights``: also without flushing the gated weights
  (the gate before this was fixed), against ``dense, no flush-to-zero``.

Each step is forward, CTC-free loss (mean square of the output plus the
sparsity loss) and backward, on random audio. It also prints the share of
subnormal gated weights with and without the gate's flush, and one matrix
product (952 x 192 by 192 x 192, the shape of the tiny model's attention
projections) with normal and with subnormal results. The last line reads
``step-time ratio vs dense: spg S, no flush-to-zero N, subnormal gated
weights W``.

It needs a checkpoint of an SPG run of the tiny model: run the demo first
(``cd recipes/LibriSpeech/spg && python train.py hparams/tiny_spg.yaml``) or
pass ``--checkpoint`` (an ``ssl.ckpt`` or a folder searched for the newest).

Usage:
    python benchmarks/subnormal_cost.py
    python benchmarks/subnormal_cost.py --checkpoint PATH --rounds 5

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

sys.path.insert(0, str(Path(__file__).parent))
import gate_overhead  # noqa: E402 - the benchmark next to this file

from speechbrain_spg import fused_gate  # noqa: E402
from speechbrain_spg.lobes import SPGWav2Vec2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "LibriSpeech" / "spg"
SOURCE = RECIPE / "pretrained" / "tiny_w2v2" / "hf"
DEFAULT_RUNS = RECIPE / "results" / "tiny_spg"
TINY = torch.finfo(torch.float32).tiny


def newest_checkpoint(path):
    """``path`` if it is a file, else the newest ``ssl.ckpt`` under it.

    Arguments
    ---------
    path : str or Path
        An ``ssl.ckpt`` file or a folder holding recipe runs.

    Returns
    -------
    Path

    Example
    -------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> newest_checkpoint(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    FileNotFoundError: no CKPT+*/ssl.ckpt under ...: run the SPG demo first ...
    """
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(
        path.glob("**/CKPT+*/ssl.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not found:
        raise FileNotFoundError(
            f"no CKPT+*/ssl.ckpt under {path}: run the SPG demo first (cd "
            f"{RECIPE} && python train.py hparams/tiny_spg.yaml) or pass "
            "--checkpoint."
        )
    return found[-1]


def subnormal_share(tensors):
    """Fraction of the elements of ``tensors`` that are subnormal.

    Arguments
    ---------
    tensors : iterable of torch.Tensor
        Float32 tensors.

    Returns
    -------
    float

    Example
    -------
    >>> subnormal_share([torch.tensor([1e-39, 0.0, 1.0, -1e-40])])
    0.5
    """
    count = total = 0
    for x in tensors:
        a = x.detach().abs()
        count += int(((a > 0) & (a < TINY)).sum())
        total += a.numel()
    return count / total


def gated_weights(lobe):
    """The gated weights ``W * M`` of every gated matrix (no gradient)."""
    with torch.no_grad():
        return [layer.effective_weight() for layer in lobe.gated_layers()]


def no_weight_flush():
    """A context in which the gate returns subnormal gated weights again."""
    return mock.patch.object(fused_gate, "flush_subnormal", lambda x: x)


def step_seconds(lobe, wav, steps):
    """Median seconds of ``steps`` training steps (the first one dropped)."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = lobe(wav).pow(2).mean()
        if isinstance(lobe, SPGWav2Vec2):
            loss = loss + lobe.sparsity_loss()
        loss.backward()
        lobe.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def product_seconds(scale, repeats=5):
    """Median seconds of a 952 x 192 by 192 x 192 product of normal
    numbers times ``scale`` each (1e-21: every result is subnormal)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(952, 192, generator=gen) * scale
    b = torch.randn(192, 192, generator=gen) * scale
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    """Runs the benchmark; returns the medians (seconds) per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_RUNS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.4)
    args = parser.parse_args(argv)
    checkpoint = newest_checkpoint(args.checkpoint)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    common = dict(save_path="", output_norm=True, freeze=False)
    dense = Wav2Vec2(str(SOURCE), apply_spec_augment=False, **common).train()
    spg = SPGWav2Vec2(str(SOURCE), apply_spec_augment=False, **common).train()
    state = torch.load(checkpoint, map_location="cpu")
    if "gate.threshold_param" not in state:
        sys.exit(
            f"{checkpoint}: not an SPG lobe's checkpoint (no gate thresholds)."
        )
    spg.load_state_dict(state)
    if spg.is_pruned:
        sys.exit(
            f"{checkpoint}: the gates are hard-pruned; take a training checkpoint."
        )
    print(f"checkpoint: {checkpoint}")
    print(f"hard sparsity of the gated weights: {spg.hard_sparsity():.4f}")
    print(f"subnormal gated weights: {subnormal_share(gated_weights(spg)):.4%}")
    with no_weight_flush():
        share = subnormal_share(gated_weights(spg))
    print(f"subnormal gated weights without the gate's flush: {share:.4%}")

    wav = torch.randn(args.batch, int(args.seconds * 16000))
    # name: (lobe, flush-to-zero, gate patch, the dense row it is
    # compared with: the same flush-to-zero setting)
    variants = {
        "dense": (dense, True, contextlib.nullcontext, "dense"),
        "spg": (spg, True, contextlib.nullcontext, "dense"),
        "dense, no flush-to-zero": (
            dense,
            False,
            contextlib.nullcontext,
            "dense, no flush-to-zero",
        ),
        "spg, no flush-to-zero": (
            spg,
            False,
            contextlib.nullcontext,
            "dense, no flush-to-zero",
        ),
        "spg, subnormal gated weights": (
            spg,
            False,
            no_weight_flush,
            "dense, no flush-to-zero",
        ),
    }
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (lobe, ftz, patch, _) in variants.items():
            with gate_overhead.flush_subnormals(ftz), patch():
                times[name].append(step_seconds(lobe, wav, args.steps))
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {
        name: medians[name] / medians[variant[3]]
        for name, variant in variants.items()
    }
    print(f"\ntraining step, {args.batch} x {args.seconds} s, one thread:")
    for name, values in times.items():
        rounds = " ".join(f"{v * 1e3:.0f}" for v in values)
        print(
            f"  {name:30s} {medians[name] * 1e3:7.1f} ms ({rounds})  "
            f"{ratios[name]:.3f}x {variants[name][3]}"
        )
    normal = product_seconds(1.0)
    subnormal = product_seconds(1e-21)
    with gate_overhead.flush_subnormals(True):
        flushed = product_seconds(1e-21)
    print(
        f"\n952x192 @ 192x192: normal results {normal * 1e3:.2f} ms, subnormal "
        f"results {subnormal * 1e3:.2f} ms ({subnormal / normal:.0f}x), with "
        f"flush-to-zero {flushed * 1e3:.2f} ms"
    )
    print(
        f"step-time ratio vs dense: spg {ratios['spg']:.3f}, no flush-to-zero "
        f"{ratios['spg, no flush-to-zero']:.3f}, subnormal gated weights "
        f"{ratios['spg, subnormal gated weights']:.3f}"
    )
    return ratios


if __name__ == "__main__":
    main()
