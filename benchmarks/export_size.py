#!/usr/bin/env python3
"""Compact-only export vs dense HuggingFace folder: size and load time.

Builds an SSL architecture from its configuration with random weights (no
download), saves it as a dense HuggingFace folder (float32, and the same
weights in float16), wraps it in an SPG lobe, prunes it to each gated
sparsity (``calibrate_thresholds`` + ``hard_prune``) and exports it
compact-only (the default) in float32, float16 and int8 (the gated
matrices' kept values in int8 with one float32 scale per output row, the
other tensors in float16). Prints, per (sparsity, dtype):

- sizes: the dense folder in float32 and float16, the export folder (every
  file: ``compact.safetensors`` and the manifest), its ratio to the dense
  float32 folder and to the ideal compact size (``ideal_compact_bytes``:
  ungated tensors + kept values + one bit per gated weight);
- load times, best of ``--repeats``, the loaders alternating in every round:
  ``AutoModel.from_pretrained`` on the dense float32 folder,
  ``load_compact(verify=True)`` and ``CompactWav2Vec2(export)`` (both
  dequantise an int8 export to float32), and for the int8 export a fourth,
  ``load_compact(verify=True, int8_linears=True)`` (PyTorch's dynamic int8
  linears built from the stored int8 values); then the same loaders with a
  first forward pass on 1 s of audio (a dense load backed by a memory map
  may defer reading the weights to that pass).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/export_size.py

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import os
import tempfile
import time

import torch
from transformers import AutoModel

from speechbrain_spg.data.architectures import hub_config, save_random_model
from speechbrain_spg.export import CompactWav2Vec2, export_compact, load_compact
from speechbrain_spg.lobes import SPGWav2Vec2

#: The loaders timed for every export, in table order.
LOADERS = ("dense", "load_compact", "CompactWav2Vec2")
#: The loaders timed for an int8 export: also its dynamic int8 linears.
INT8_LOADERS = LOADERS + ("int8_linears",)
#: The exported dtypes, in table order.
DTYPES = ("float32", "float16", "int8")


def folder_bytes(folder):
    """Total size of the files below ``folder``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def loaders(dense, export, wav, int8=False):
    """Loader name -> (load, load + first forward pass), as callables;
    ``INT8_LOADERS`` with ``int8`` (an int8 export), else ``LOADERS``."""
    normalised = torch.nn.functional.layer_norm(wav, wav.shape[1:])

    def dense_load():
        return AutoModel.from_pretrained(dense).eval()

    def lobe_load():
        return CompactWav2Vec2(export, freeze=True)

    calls = {
        "dense": (dense_load, lambda m: m(normalised).last_hidden_state),
        "load_compact": (
            lambda: load_compact(export, verify=True),
            lambda m: m(normalised).last_hidden_state,
        ),
        "CompactWav2Vec2": (lobe_load, lambda m: m(wav)),
    }
    if int8:
        calls["int8_linears"] = (
            lambda: load_compact(export, verify=True, int8_linears=True),
            lambda m: m(normalised).last_hidden_state,
        )
    return {
        name: (load, lambda load=load, run=run: run(load()))
        for name, (load, run) in calls.items()
    }


def best_times(functions, repeats):
    """Name -> best wall time; every round calls each function once."""
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            with torch.no_grad():
                function()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(source, dense16, sparsity, work, repeats):
    """Rows (one per dtype) of sizes and load times at one sparsity."""
    lobe = SPGWav2Vec2(source, save_path="", target_sparsity=sparsity)
    lobe.calibrate_thresholds(sparsity)
    lobe.hard_prune()
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in DTYPES:
        out = os.path.join(work, f"compact_{sparsity}_{dtype}")
        manifest = export_compact(lobe, out, dtype=dtype)
        calls = loaders(source, out, wav, int8=dtype == "int8")
        load = best_times({k: v[0] for k, v in calls.items()}, repeats)
        forward = best_times({k: v[1] for k, v in calls.items()}, repeats)
        rows.append(
            {
                "sparsity": manifest["sparsity"]["gated"],
                "dtype": dtype,
                "dense_bytes": folder_bytes(source),
                "dense16_bytes": folder_bytes(dense16),
                "export_bytes": folder_bytes(out),
                "ideal_bytes": manifest["ideal_compact_bytes"],
                "load_s": load,
                "load_forward_s": forward,
            }
        )
    return rows


def print_rows(model, rows, repeats):
    """The two tables: sizes, then times (seconds) and their ratios."""
    print(f"model: {model} (random weights, built from its config)")
    print(
        f"{'sparsity':>8} {'dtype':>7} {'dense32 MB':>10} {'dense16 MB':>10} "
        f"{'export MB':>9} {'/dense32':>8} {'/ideal':>7}"
    )
    for r in rows:
        print(
            f"{r['sparsity']:>8.4f} {r['dtype']:>7} "
            f"{r['dense_bytes'] / 1e6:>10.1f} {r['dense16_bytes'] / 1e6:>10.1f} "
            f"{r['export_bytes'] / 1e6:>9.1f} "
            f"{r['export_bytes'] / r['dense_bytes']:>8.3f} "
            f"{r['export_bytes'] / r['ideal_bytes']:>7.4f}"
        )
    print(
        f"\nbest of {repeats}, seconds; ratio = / dense. load: "
        "dense | load_compact | CompactWav2Vec2\n  (int8 rows: these two "
        "dequantise, then | load_compact(int8_linears=True)); the same + "
        "forward on 1 s"
    )
    for r in rows:
        cells = []
        for key in ("load_s", "load_forward_s"):
            t = r[key]
            cells.append(
                " | ".join(
                    [f"{t['dense']:.3f}"]
                    + [
                        f"{t[name]:.3f} ({t[name] / t['dense']:.2f}x)"
                        for name in INT8_LOADERS[1:]
                        if name in t
                    ]
                )
            )
        print(f"{r['sparsity']:>8.4f} {r['dtype']:>7}  " + "   ".join(cells))


def main(argv=None):
    """Runs the benchmark, prints the tables and returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="facebook/wav2vec2-base")
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.5, 0.65, 0.85]
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        config = hub_config(args.model)
        source = save_random_model(config, f"{work}/dense")
        dense16 = f"{work}/dense16"
        AutoModel.from_pretrained(source).half().save_pretrained(dense16)
        for sparsity in args.sparsities:
            rows += measure(source, dense16, sparsity, work, args.repeats)
    print_rows(args.model, rows, args.repeats)
    return rows


if __name__ == "__main__":
    main()
