#!/usr/bin/env python3
"""Inference latency of a structured vs an unstructured export vs dense.

What it measures, per model (each built from its configuration with random
weights, no download, and saved as a dense HuggingFace folder): two exports
that remove the SAME fraction of the gated weights (``--sparsity``) by
uniform magnitude pruning (``uniform_magnitude_prune``) and are written by
``export_compact``:

- ``unstructured``: an SPG lobe with ``granularity: weight``; the export
  stores a bitmask and the kept values, and ``load_compact`` rebuilds the
  dense shapes (pruned weights zero): no fewer operations;
- ``structured``: ``granularity: structured`` (whole attention heads and
  feed-forward units); the export holds physically smaller matrices
  (``speechbrain_spg.shrink``), so a forward pass does fewer operations.

The three models (the dense folder through ``AutoModel.from_pretrained``, the
exports through ``load_compact``) are timed in one process, with PyTorch's
default number of threads, under ``torch.inference_mode()``: one forward
pass of a random waveform (``--batch`` x ``--seconds`` of 16 kHz audio,
normalised as the feature extractor does, fixed seed). After one warm-up
pass each, every round times each model once (round-robin, the starting
model rotating from round to round so that none always follows the same
one), and the median per model is reported. Per model it prints a table:
median latency (seconds, ratio to dense, and the range of the per-round
ratios), weights in memory (bytes of the loaded model's parameters and
buffers, ratio to dense) and file size (the whole folder, ratio to the
dense folder). Before timing, it checks once that each export computes what
its pruned lobe computes (the largest absolute difference of the encoder
output, printed; about 1e-5 expected), so that a wrong shrink cannot give a
fast but wrong number.

Why the latency cannot fall as much as the weights: only the transformer
encoder's attention and feed-forward matrices are gated. The convolutional
front end (``feature_extractor``, which runs on every audio sample), the
feature projection, the convolutional positional embedding and the layer
norms are not pruned, and the attention's time-by-time products shrink only
with the number of kept heads, so at 50% of the gated weights removed the
structured model's latency stays well above 0.5x dense: on a CPU, with 10 s
of audio, the front end alone takes about a third of a dense pass of
wav2vec2-base and of HuBERT-large (whose front end has layer norms), so
halving the attention and feed-forward time gives about 0.7x.

The LAST line printed is ``inference latency ratio structured/dense: R``
for the FIRST model of ``--models`` (wav2vec2-base by default); with several
models, each model's own ratio line is printed after its table, and the
first model's line is repeated at the end.

``alternating_latency(models, inputs, rounds)`` (name -> callable, to name
-> median seconds) is the reusable timing loop, e.g. for the synthetic
study's exported models.

Usage:
    python benchmarks/inference_speed.py
    python benchmarks/inference_speed.py --device cuda
    python benchmarks/inference_speed.py --models facebook/wav2vec2-base \
        --sparsity 0.65 --rounds 20

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModel

from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.data.architectures import hub_config, save_random_model
from speechbrain_spg.export import export_compact, load_compact
from speechbrain_spg.lobes import spg_lobe

#: The three models compared, in table order.
VARIANTS = ("dense", "unstructured", "structured")
#: Variant -> lobe granularity of its export.
GRANULARITY = {"unstructured": "weight", "structured": "structured"}
#: Chosen so that the default run (wav2vec2-base and HuBERT-large, 10 s)
#: takes under 10 minutes on a 2-core CPU.
DEFAULT_ROUNDS = 10


def log(message):
    """A progress message, on stderr."""
    print(message, file=sys.stderr, flush=True)


def folder_bytes(folder):
    """Total size of the files below ``folder``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def weight_bytes(model):
    """Bytes of a model's parameters and buffers (each counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def synchronize(device):
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(name, function, inputs):
    """Wall time of ``function(inputs)``, the device synchronised around it.

    Arguments
    ---------
    name : str
        The model's name (unused here; lets a test record the order).
    function : callable
        Runs the model on ``inputs``.
    inputs : torch.Tensor
        Its input; its device is synchronised.

    Returns
    -------
    float
        Seconds.
    """
    synchronize(inputs.device)
    start = time.perf_counter()
    function(inputs)
    synchronize(inputs.device)
    return time.perf_counter() - start


def alternating_times(models, inputs, rounds, warmup=1):
    """Per-round wall times of models timed in alternation.

    After ``warmup`` untimed passes of each model, every round runs each
    model once, round-robin; round ``r`` starts at model ``r mod n`` (the
    order rotates, so that no model always follows the same one). Runs
    under ``torch.inference_mode()``.

    Arguments
    ---------
    models : dict
        Name -> callable taking ``inputs``.
    inputs : torch.Tensor
        The input of every pass.
    rounds : int
        Timed passes of each model.
    warmup : int
        Untimed passes of each model first.

    Returns
    -------
    dict
        Name -> list of ``rounds`` seconds, in round order.

    Example
    -------
    >>> times = alternating_times({"a": torch.exp, "b": torch.sin},
    ...                           torch.ones(4), rounds=3)
    >>> {name: len(t) for name, t in times.items()}
    {'a': 3, 'b': 3}
    """
    names = list(models)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                timed_pass(name, models[name], inputs)
        for r in range(rounds):
            start = r % len(names)
            for name in names[start:] + names[:start]:
                times[name].append(timed_pass(name, models[name], inputs))
    return times


def alternating_latency(models, inputs, rounds, warmup=1):
    """Median wall time of each model, the models timed in alternation.

    Arguments
    ---------
    models, inputs, rounds, warmup
        As ``alternating_times``.

    Returns
    -------
    dict
        Name -> median seconds of one call.

    Example
    -------
    >>> medians = alternating_latency({"a": torch.exp, "b": torch.sin},
    ...                               torch.ones(4), rounds=3)
    >>> sorted(medians), all(t > 0 for t in medians.values())
    (['a', 'b'], True)
    """
    times = alternating_times(models, inputs, rounds, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def encoder_output(model, inputs):
    """The last hidden state of a HuggingFace SSL model."""
    return model(inputs).last_hidden_state


def build_exports(source, sparsity, work, inputs, device):
    """Writes both exports of ``source`` and checks each against its lobe.

    Arguments
    ---------
    source : str
        The dense HuggingFace folder.
    sparsity : float
        Fraction of the gated weights (structured: of every sub-layer's
        heads and units) removed by uniform magnitude pruning.
    work : str
        Folder for the exports.
    inputs : torch.Tensor
        Normalised waveforms for the check.
    device : torch.device
        Where the check runs.

    Returns
    -------
    dict
        Variant -> (export folder, gated sparsity written in its manifest,
        max abs difference between the loaded export's and the pruned
        lobe's outputs on ``inputs``).
    """
    exports = {}
    for variant, granularity in GRANULARITY.items():
        start = time.perf_counter()
        lobe = spg_lobe(source, save_path="", granularity=granularity)
        uniform_magnitude_prune(lobe, sparsity)
        folder = os.path.join(work, variant)
        manifest = export_compact(lobe, folder)
        lobe = lobe.to(device).eval()
        model = load_compact(folder).to(device)
        with torch.inference_mode():
            expected = encoder_output(lobe.model, inputs)
            difference = (encoder_output(model, inputs) - expected).abs()
        exports[variant] = (
            folder,
            manifest["sparsity"]["gated"],
            difference.max().item(),
        )
        del lobe, model, expected, difference
        gc.collect()
        log(
            f"  {variant}: pruned, exported and checked in "
            f"{time.perf_counter() - start:.1f} s"
        )
    return exports


def measure(hub_id, args, work, device):
    """Rows (dense, unstructured, structured) for one model."""
    log(f"{hub_id}: building (random weights) and exporting")
    start = time.perf_counter()
    source = save_random_model(hub_config(hub_id), os.path.join(work, "dense"))
    generator = torch.Generator().manual_seed(args.seed)
    wav = torch.randn(
        args.batch, int(args.seconds * 16000), generator=generator
    )
    inputs = torch.nn.functional.layer_norm(wav, wav.shape[1:]).to(device)
    exports = build_exports(source, args.sparsity, work, inputs, device)
    models = {"dense": AutoModel.from_pretrained(source).eval().to(device)}
    for variant, (folder, _, _) in exports.items():
        models[variant] = load_compact(folder).to(device)
    log(
        f"{hub_id}: ready in {time.perf_counter() - start:.1f} s; timing "
        f"{args.rounds} rounds"
    )
    start = time.perf_counter()
    times = alternating_times(models, inputs, args.rounds)
    log(f"{hub_id}: timed in {time.perf_counter() - start:.1f} s")
    folders = {"dense": source}
    folders.update({v: folder for v, (folder, _, _) in exports.items()})
    rows = []
    for variant in VARIANTS:
        ratios = [t / d for t, d in zip(times[variant], times["dense"])]
        rows.append(
            {
                "model": hub_id,
                "variant": variant,
                "gated_sparsity": (
                    0.0 if variant == "dense" else exports[variant][1]
                ),
                "max_abs_diff": (
                    None if variant == "dense" else exports[variant][2]
                ),
                "attn": models[variant].config._attn_implementation,
                "latency_s": statistics.median(times[variant]),
                "round_ratios": (min(ratios), max(ratios)),
                "times_s": times[variant],
                "weight_bytes": weight_bytes(models[variant]),
                "file_bytes": folder_bytes(folders[variant]),
            }
        )
    dense = rows[0]
    for row in rows:
        row["latency_ratio"] = row["latency_s"] / dense["latency_s"]
        row["weight_ratio"] = row["weight_bytes"] / dense["weight_bytes"]
        row["file_ratio"] = row["file_bytes"] / dense["file_bytes"]
    del models
    gc.collect()
    return rows


def ratio_line(rows):
    """The summary line of one model's rows."""
    ratio = next(r for r in rows if r["variant"] == "structured")
    return (
        f"inference latency ratio structured/dense: "
        f"{ratio['latency_ratio']:.3f}"
    )


def print_rows(rows):
    """One model's table, its equivalence checks and its ratio line."""
    attention = sorted({r["attn"] for r in rows})
    print(
        f"\nmodel: {rows[0]['model']} (random weights, built from its "
        f"config; attention {'/'.join(attention)})"
    )
    print(
        f"{'variant':<13} {'gated sp.':>9} {'latency s':>9} {'/dense':>6} "
        f"{'rounds/dense':>12} {'weights MB':>10} {'/dense':>6} "
        f"{'files MB':>8} {'/dense':>6}"
    )
    for r in rows:
        low, high = r["round_ratios"]
        print(
            f"{r['variant']:<13} {r['gated_sparsity']:>9.4f} "
            f"{r['latency_s']:>9.3f} {r['latency_ratio']:>6.3f} "
            f"{f'{low:.3f}-{high:.3f}':>12} "
            f"{r['weight_bytes'] / 1e6:>10.1f} {r['weight_ratio']:>6.3f} "
            f"{r['file_bytes'] / 1e6:>8.1f} {r['file_ratio']:>6.3f}"
        )
    for r in rows[1:]:
        print(
            f"check: {r['variant']} export vs its pruned lobe, max abs diff "
            f"{r['max_abs_diff']:.2e}"
        )
    print(ratio_line(rows))


def main(argv=None):
    """Runs the benchmark, prints the tables and returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["facebook/wav2vec2-base", "facebook/hubert-large-ll60k"],
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch "
        f"{args.batch} x {args.seconds:g} s of 16 kHz audio, gated sparsity "
        f"{args.sparsity:g} (uniform magnitude pruning), median of "
        f"{args.rounds} alternating rounds after 1 warm-up pass each, "
        "torch.inference_mode()"
    )
    tables = []
    for hub_id in args.models:
        with tempfile.TemporaryDirectory() as work:
            rows = measure(hub_id, args, work, device)
        print_rows(rows)
        tables.append(rows)
    if len(tables) > 1:  # the first model's line last
        print(f"\nfirst model, {args.models[0]}:")
        print(ratio_line(tables[0]))
    return [row for rows in tables for row in rows]


if __name__ == "__main__":
    main()
