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
from speechbrain_spg.compare import final_dev_wer, load_run, time_to_reach
from speechbrain_spg.significance import compare_hypothesis_files

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


def yes_no(flag):
    """``yes`` / ``NO`` for a goal table."""
    return "yes" if flag else "NO"


def spg_vs_ump_rows(runs, targets, split):
    """One Markdown row per target: SPG against UMP on accuracy and time.

    The time goal compares SPG's clock at the first epoch whose dev WER
    is at most UMP's final dev WER (with the hard sparsity at the target,
    within 0.005) with UMP's whole wall time (pruning, fine-tuning,
    validation, export).
    """
    rows = []
    for target in targets:
        ump, spg = runs[f"ump_{target}"], runs[f"spg_{target}"]
        test = compare_hypothesis_files(
            compare.hypotheses_file(spg.path, split),
            compare.hypotheses_file(ump.path, split),
        )
        ump_dev = final_dev_wer(ump)
        reached = time_to_reach(spg, ump_dev, min_sparsity=target - 0.005)
        ump_time = ump.summary["wall_time_s"]
        if reached is None:
            when, ratio, time_goal = "never", "-", False
        else:
            epoch, seconds = reached
            when = f"epoch {epoch}, {seconds:.1f} s"
            ratio = f"{seconds / ump_time:.2f}"
            time_goal = seconds / ump_time <= 0.75
        rows.append(
            f"| {target} | {spg.summary['wer'][split]:.2f} "
            f"| {ump.summary['wer'][split]:.2f} "
            f"| {test.mapsswe.p_value:.3g} "
            f"| {yes_no(spg.summary['wer'][split] < ump.summary['wer'][split])} "
            f"| {ump_dev:.2f} | {ump_time:.1f} | {when} | {ratio} "
            f"| {yes_no(time_goal)} |"
        )
    return rows


def goals_markdown(runs, targets, split="test-clean"):
    """The issue's three goals, checked on the finished runs."""
    lines = ["### Goals, checked on these runs", ""]
    if "spg_0.65" in runs:
        spg = runs["spg_0.65"]
        test = compare_hypothesis_files(
            compare.hypotheses_file(spg.path, split),
            compare.hypotheses_file(runs["dense"].path, split),
        )
        lines += [
            f"- SPG at 0.65 vs dense on {split}: WER "
            f"{spg.summary['wer'][split]:.2f} vs "
            f"{runs['dense'].summary['wer'][split]:.2f}, MAPSSWE p = "
            f"{test.mapsswe.p_value:.3g}; not significantly worse "
            f"(p > 0.05 or better): "
            f"**{yes_no(test.mapsswe.p_value > 0.05 or test.bootstrap.delta < 0)}**",
            "",
        ]
    lines += [
        f"SPG against UMP at each target ({split} WER; p: MAPSSWE SPG vs "
        "UMP; time: SPG's clock when its dev WER first reached UMP's final "
        "dev WER, over UMP's whole wall time, resolution one epoch):",
        "",
        "| Target | SPG WER | UMP WER | p | SPG better | UMP final dev WER "
        "| UMP wall time (s) | SPG reaches it | Time ratio | <= 0.75 |",
        "| ---: | ---: | ---: | ---: | :---: | ---: | ---: | --- | ---: | :---: |",
        *spg_vs_ump_rows(runs, targets, split),
    ]
    return "\n".join(lines)


def machine():
    """One line describing where the study ran."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU only, {os.cpu_count()} cores"
    )
    return f"{platform.platform()}, {device}, torch {torch.__version__}"


def write_results_section(markdown, argv, goals):
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
            "",
            goals,
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
    if markdown.startswith("# "):  # the section has a heading of its own
        markdown = markdown.split("\n", 1)[1]
    loaded = {os.path.basename(path): load_run(path) for path in runs}
    goals = goals_markdown(loaded, args.targets)
    print(goals)
    write_results_section(markdown, argv, goals)
    return written


if __name__ == "__main__":
    main()
