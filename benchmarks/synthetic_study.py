#!/usr/bin/env python3
"""SPG vs UMP vs dense on the synthetic corpus, through the recipe itself.

Starting from the shipped tiny dense model, runs with the same number of
epochs, the same data and the same schedule:

- dense: fine-tuning continued without gates (``tiny_dense.yaml``);
- UMP at each target: uniform magnitude pruning, fixed masks, fine-tuning
  (``tiny_ump.yaml``);
- SPG at each target: one-pass compression (``tiny_spg.yaml``);

then ``python -m speechbrain_spg.compare`` over all of them (WER per split,
MAPSSWE against dense, compression wall time, plots). The Markdown table and
plots go to ``benchmarks/synthetic_study/``, and the study's section of
``benchmarks/RESULTS.md`` is rewritten with them, the command, the machine
and the date.

Usage (from the repository root):
    python benchmarks/synthetic_study.py --epochs 4 --targets 0.5 0.65 0.765

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

from speechbrain_spg import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "LibriSpeech", "spg")
OUT = os.path.join(ROOT, "benchmarks", "synthetic_study")
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
BEGIN = "<!-- synthetic-study:begin -->"
END = "<!-- synthetic-study:end -->"


def run(yaml, output, extra):
    """Runs the recipe once (skipped if its summary already exists)."""
    if os.path.isfile(os.path.join(output, "summary.json")):
        print(f"reusing {output}")
        return output
    command = [
        sys.executable,
        "train.py",
        f"hparams/{yaml}",
        f"--output_folder={output}",
        *extra,
    ]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=RECIPE, check=True)
    return output


def machine():
    """One line describing where the study ran."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU only, {os.cpu_count()} cores"
    )
    return f"{platform.platform()}, {device}, torch {torch.__version__}"


def write_results_section(markdown, argv):
    """Replaces the study's section of benchmarks/RESULTS.md."""
    section = "\n".join(
        [
            BEGIN,
            "## Synthetic study: SPG vs UMP vs dense (generated, not typed)",
            "",
            f"Command: `python benchmarks/synthetic_study.py {' '.join(argv)}`  ",
            f"Machine: {machine()}  ",
            f"Date: {datetime.date.today().isoformat()}",
            "",
            markdown.strip(),
            END,
        ]
    )
    text = ""
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(RESULTS, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None):
    """Runs the study; returns the comparison's written paths."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.5, 0.65, 0.765]
    )
    parser.add_argument(
        "--runs", default=os.path.join(RECIPE, "results", "synthetic_study")
    )
    args = parser.parse_args(argv)
    common = [
        f"--number_of_epochs={args.epochs}",
        "--evaluate_initial_model=False",
    ]
    runs = [run("tiny_dense.yaml", f"{args.runs}/dense", common)]
    for target in args.targets:
        for method in ("ump", "spg"):
            runs.append(
                run(
                    f"tiny_{method}.yaml",
                    f"{args.runs}/{method}_{target}",
                    [*common, f"--target_sparsity={target}"],
                )
            )
    written = compare.main([*runs, "--baseline", runs[0], "--out", OUT])
    with open(os.path.join(OUT, "comparison.md"), encoding="utf-8") as f:
        markdown = f.read()
    markdown = markdown.replace("](", "](synthetic_study/")
    write_results_section(markdown, argv)
    return written


if __name__ == "__main__":
    main()
