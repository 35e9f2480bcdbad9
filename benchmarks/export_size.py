#!/usr/bin/env python3
"""Dense vs compact export: file size and load time at several sparsities.

Builds an SSL architecture from its configuration with random weights (no
download), wraps it in an SPG lobe, prunes it to each sparsity with
``calibrate_thresholds`` + ``hard_prune`` and exports it in float32 and
float16. Prints, measured side by side in one run, the size of the dense
HuggingFace ``model.safetensors``, of ``compact.safetensors`` and the ideal
compact size (dense tensors + kept values + one bit per gated weight), and the
time to load each (``AutoModel.from_pretrained`` on the dense folder vs
``load_compact``).

Usage:
    python benchmarks/export_size.py --model facebook/wav2vec2-base \
        --sparsities 0.5 0.65 0.85

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import os
import shutil
import tempfile
import time

from transformers import AutoModel

from speechbrain_spg.data.architectures import hub_config, save_random_model
from speechbrain_spg.export import export_compact, load_compact
from speechbrain_spg.lobes import SPGWav2Vec2


def timed(function, repeats=3):
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def measure(source, sparsity, dtype, work):
    """Exports one pruned copy; returns a dict of sizes and load times."""
    lobe = SPGWav2Vec2(source, save_path="", target_sparsity=sparsity)
    lobe.calibrate_thresholds(sparsity)
    lobe.hard_prune()
    out = os.path.join(work, f"compact_{sparsity}_{dtype}")
    manifest = export_compact(lobe, out, dtype=dtype)
    dense_file = os.path.join(source, "model.safetensors")
    compact_file = os.path.join(out, "compact.safetensors")
    row = {
        "sparsity": manifest["sparsity"]["gated"],
        "dtype": dtype,
        "dense_bytes": os.path.getsize(dense_file),
        "compact_bytes": os.path.getsize(compact_file),
        "ideal_bytes": manifest["ideal_compact_bytes"],
        "dense_load_s": timed(lambda: AutoModel.from_pretrained(source)),
        "compact_load_s": timed(lambda: load_compact(out)),
    }
    shutil.rmtree(out)
    return row


def main(argv=None):
    """Runs the benchmark and prints one row per (sparsity, dtype)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="facebook/wav2vec2-base")
    parser.add_argument(
        "--sparsities", type=float, nargs="+", default=[0.5, 0.65, 0.85]
    )
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        source = save_random_model(hub_config(args.model), f"{work}/dense")
        for sparsity in args.sparsities:
            for dtype in ("float32", "float16"):
                rows.append(measure(source, sparsity, dtype, work))
    header = (
        f"{'gated sparsity':>14} {'dtype':>8} {'dense MB':>9} "
        f"{'compact MB':>10} {'ratio':>6} {'vs ideal':>8} "
        f"{'dense load s':>12} {'compact load s':>14}"
    )
    print(f"model: {args.model} (random weights, built from its config)")
    print(header)
    for r in rows:
        print(
            f"{r['sparsity']:>14.4f} {r['dtype']:>8} "
            f"{r['dense_bytes'] / 1e6:>9.1f} {r['compact_bytes'] / 1e6:>10.1f} "
            f"{r['compact_bytes'] / r['dense_bytes']:>6.3f} "
            f"{r['compact_bytes'] / r['ideal_bytes']:>8.4f} "
            f"{r['dense_load_s']:>12.2f} {r['compact_load_s']:>14.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
