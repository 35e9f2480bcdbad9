#!/usr/bin/env python3
"""SPG vs UMP vs dense on the synthetic corpus, through the recipe itself.

Starting from the shipped tiny dense model, runs with the same number of
epochs, the same data and the same schedule:

- dense: fine-tuning continued without gates (``tiny_dense.yaml``);
- UMP at each target: uniform magnitude pruning, fixed masks, fine-tuning
  (``tiny_ump.yaml``);
- SPG at each target: one-pass compression (``tiny_spg.yaml``);
- structured UMP and structured SPG at each structured target (whole heads
  and feed-forward units: ``tiny_ump_structured.yaml``,
  ``tiny_spg_structured.yaml``);

then ``python -m speechbrain_spg.evaluation.compare`` over all of them (WER per split,
MAPSSWE against dense, compression wall time, plots). The Markdown table and
plots go to ``benchmarks/synthetic_study/`` (structured runs:
``benchmarks/synthetic_study_structured/``), and the study's sections of
``benchmarks/RESULTS.md`` are rewritten with them, the command, the machine
and the date. The structured section has one table: WER, MAPSSWE against
dense and against structured UMP at the same target, and the CPU latency of
every exported model (batch 1 x 10 s, the models alternating:
``inference_speed.alternating_latency``). An empty ``--targets`` (or
``--structured-targets``) skips those runs and leaves their section as it is.

Usage (from the repository root):
    python benchmarks/synthetic_study.py --epochs 4 --targets 0.5 0.65 0.765 \
        --structured-targets 0.25 0.5

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
from inference_speed import alternating_latency
from transformers import AutoModel

from speechbrain_spg.evaluation import compare
from speechbrain_spg.evaluation.compare import (
    compression_time,
    final_dev_wer,
    load_run,
    time_to_reach,
)
from speechbrain_spg.evaluation.significance import compare_hypothesis_files
from speechbrain_spg.export import load_compact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "LibriSpeech", "spg")
OUT = os.path.join(ROOT, "benchmarks", "synthetic_study")
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
OUT_STRUCTURED = os.path.join(ROOT, "benchmarks", "synthetic_study_structured")
BEGIN = "<!-- synthetic-study:begin -->"
END = "<!-- synthetic-study:end -->"
STRUCTURED_BEGIN = "<!-- structured-study:begin -->"
STRUCTURED_END = "<!-- structured-study:end -->"
SPLITS = ("test-clean", "test-other")


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


def spg_vs_ump(runs, target, split):
    """SPG against UMP at one target: (Markdown row, better, time goal).

    The time goal compares SPG's clock at the first epoch whose dev WER is
    at most UMP's final dev WER (with the hard sparsity at the target,
    within 0.005) with UMP's compression time (``compression_time``).
    """
    ump, spg = runs.get(f"ump_{target}"), runs.get(f"spg_{target}")
    if ump is None or spg is None:
        return f"| {target} | run missing | | | | | | | | |", False, False
    wer_spg, wer_ump = spg.summary["wer"][split], ump.summary["wer"][split]
    test = compare_hypothesis_files(
        compare.hypotheses_file(spg.path, split),
        compare.hypotheses_file(ump.path, split),
    )
    ump_dev, ump_time = final_dev_wer(ump), compression_time(ump)
    reached = None
    if ump_dev is not None:
        reached = time_to_reach(spg, ump_dev, min_sparsity=target - 0.005)
    when, ratio, time_goal = "never", "-", False
    if reached is not None and ump_time:
        epoch, seconds = reached
        when = f"epoch {epoch}, {seconds:.1f} s"
        ratio = f"{seconds / ump_time:.2f}"
        time_goal = seconds / ump_time <= 0.75
    better = wer_spg < wer_ump
    row = (
        f"| {target} | {wer_spg:.2f} | {wer_ump:.2f} "
        f"| {test.mapsswe.p_value:.3g} | {yes_no(better)} "
        f"| {_number(ump_dev, '.2f')} | {_number(ump_time, '.1f')} "
        f"| {when} | {ratio} | {yes_no(time_goal)} |"
    )
    return row, better, time_goal


def _number(value, spec):
    """A formatted number, or ``n/a``."""
    return "n/a" if value is None else format(value, spec)


def goals_markdown(runs, targets, split="test-clean"):
    """The issue's three goals, checked on the finished runs."""
    lines = ["### Goals, checked on these runs", ""]
    if "spg_0.65" in runs and "dense" in runs:
        spg = runs["spg_0.65"]
        test = compare_hypothesis_files(
            compare.hypotheses_file(spg.path, split),
            compare.hypotheses_file(runs["dense"].path, split),
        )
        ok = test.mapsswe.p_value > 0.05 or test.bootstrap.delta < 0
        lines += [
            f"- SPG at 0.65 vs dense on {split}: WER "
            f"{spg.summary['wer'][split]:.2f} vs "
            f"{runs['dense'].summary['wer'][split]:.2f}, MAPSSWE p = "
            f"{test.mapsswe.p_value:.3g}; not significantly worse "
            f"(p > 0.05, or better): **{yes_no(ok)}**",
        ]
    results = [spg_vs_ump(runs, target, split) for target in targets]
    lines += [
        f"- SPG better than UMP ({split} WER) at every target: "
        f"**{yes_no(all(better for _, better, _ in results))}**",
        "- SPG's time to reach UMP's final dev WER <= 0.75x UMP's "
        f"compression time at every target: "
        f"**{yes_no(all(goal for _, _, goal in results))}**",
        "",
        f"Per target ({split} WER; p: MAPSSWE of SPG against UMP; UMP's "
        "compression time: its clock at the end of its last epoch, pruning "
        "and fine-tuning with validation; SPG reaches it: the first epoch "
        "whose dev WER is at most UMP's final dev WER, with a hard sparsity "
        "of at least the target minus 0.005 (more pruned than the target "
        "counts). The dev WER during training is "
        "that of the soft-gated model; the test WERs are those of the "
        "exported hard-pruned model. Resolution: one epoch):",
        "",
        "| Target | SPG WER | UMP WER | p | SPG better | UMP final dev WER "
        "| UMP compression time (s) | SPG reaches it | Time ratio "
        "| <= 0.75 |",
        "| ---: | ---: | ---: | ---: | :---: | ---: | ---: | --- | ---: "
        "| :---: |",
        *(row for row, _, _ in results),
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


def write_results_section(
    markdown,
    argv,
    goals,
    markers=(BEGIN, END),
    title="Synthetic study: SPG vs UMP vs dense",
):
    """Replaces one of the study's sections of benchmarks/RESULTS.md."""
    begin, end = markers
    section = "\n".join(
        [
            begin,
            f"## {title} (generated, not typed)",
            "",
            f"Command: `python benchmarks/synthetic_study.py {' '.join(argv)}`  ",
            f"Machine: {machine()}  ",
            f"Date: {datetime.date.today().isoformat()}",
            "",
            markdown.strip(),
            "",
            goals,
            end,
        ]
    )
    text = ""
    if os.path.isfile(RESULTS):
        with open(RESULTS, encoding="utf-8") as f:
            text = f.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(RESULTS, "w", encoding="utf-8") as f:
        f.write(text)


def only_wer_plots(markdown, folder):
    """The comparison's Markdown with its WER plots, and one line pointing
    to the per-run plots (sparsity per layer, training curves) in
    ``benchmarks/<folder>/``, so that the results page stays short."""
    lines = markdown.splitlines()
    plots = [line for line in lines if line.startswith("![")]
    kept = [line for line in lines if not line.startswith("![")]
    wer = [line for line in plots if line.startswith("![wer_vs_ratio")]
    note = f"Per-run plots (sparsity per layer, training curves): `benchmarks/{folder}/`."
    return "\n".join([*kept, *wer, note] if plots else kept)


def p_value(run, other, split):
    """MAPSSWE p-value of two runs' hypotheses on one split."""
    test = compare_hypothesis_files(
        compare.hypotheses_file(run.path, split),
        compare.hypotheses_file(other.path, split),
    )
    return test.mapsswe.p_value


def exported_model(run):
    """The model a run exported: ``compact/`` (pruned) or ``hf/`` (dense)."""
    compact = os.path.join(run.path, "compact")
    if os.path.isdir(compact):
        return load_compact(compact)
    return AutoModel.from_pretrained(os.path.join(run.path, "hf")).eval()


def stored_params(run):
    """Parameters the run's export holds (its manifest; dense: all)."""
    manifest = os.path.join(run.path, "compact", "spg_manifest.json")
    if not os.path.isfile(manifest):
        return run.summary["params"]["total"]
    with open(manifest, encoding="utf-8") as f:
        return json.load(f)["params"]["nonzero"]


def latencies(runs, rounds, seconds=10.0):
    """CPU latency (median seconds) of every run's exported model on batch
    1 x ``seconds`` of audio, the models alternating in every round."""
    models = {name: exported_model(run) for name, run in runs.items()}
    wav = torch.randn(
        1, int(seconds * 16000), generator=torch.Generator().manual_seed(0)
    )
    return alternating_latency(models, wav, rounds)


def structured_markdown(runs, targets, rounds):
    """The structured study's table and goals, from its finished runs."""
    dense = runs["dense"]
    names = ["dense"] + [
        f"{method}_structured_{t}" for t in targets for method in ("ump", "spg")
    ]
    present = {name: runs[name] for name in names if name in runs}
    seconds = latencies(present, rounds)
    header = ["System", "Removed (gated)", "Params stored"]
    for split in SPLITS:
        header += [f"WER {split}", "p vs dense", "p vs structured UMP"]
    header += ["CPU latency (s)", "Latency / dense"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| --- | ---: | ---: |"
        + " ---: | ---: | ---: |" * len(SPLITS)
        + " ---: | ---: |",
    ]
    for name, run in present.items():
        sparsity = run.summary.get("sparsity", {}).get("hard_sparsity", 0.0)
        cells = [name, f"{sparsity:.4f}", f"{stored_params(run):,}"]
        ump = (
            present.get(name.replace("spg_", "ump_"))
            if "spg_" in name
            else None
        )
        for split in SPLITS:
            cells.append(f"{run.summary['wer'][split]:.2f}")
            cells.append(
                "-" if run is dense else f"{p_value(run, dense, split):.3g}"
            )
            cells.append(
                "-" if ump is None else f"{p_value(run, ump, split):.3g}"
            )
        cells += [
            f"{seconds[name]:.3f}",
            f"{seconds[name] / seconds['dense']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    notes = (
        "Removed: fraction of the gated encoder weights removed (whole heads "
        "and feed-forward units); params stored: parameters of the exported, "
        "shrunk model. p: two-sided MAPSSWE on test utterances. Latency: "
        "median CPU forward pass of the exported model on 1 x 10 s of audio, "
        f"the models alternating, {rounds} rounds, CPU threads: "
        f"{torch.get_num_threads()}."
    )
    goals = ["### Goals, checked on these runs", ""]
    split = "test-clean"
    better = []
    for target in targets:
        spg, ump = (
            present.get(f"spg_structured_{target}"),
            present.get(f"ump_structured_{target}"),
        )
        if spg is None or ump is None:
            continue
        wer_spg, wer_ump = spg.summary["wer"][split], ump.summary["wer"][split]
        better.append(wer_spg < wer_ump)
        goals.append(
            f"- Structured SPG vs structured UMP at {target} ({split}): WER "
            f"{wer_spg:.2f} vs {wer_ump:.2f}, p = {p_value(spg, ump, split):.3g}; "
            f"better: **{yes_no(wer_spg < wer_ump)}**"
        )
    lowest = present.get(f"spg_structured_{min(targets)}")
    if lowest is not None:
        p = p_value(lowest, dense, split)
        worse = lowest.summary["wer"][split] > dense.summary["wer"][split]
        goals.append(
            f"- Structured SPG at {min(targets)} vs dense ({split}): WER "
            f"{lowest.summary['wer'][split]:.2f} vs {dense.summary['wer'][split]:.2f}, "
            f"p = {p:.3g}; not significantly worse: "
            f"**{yes_no(p > 0.05 or not worse)}**"
        )
    goals.append(
        f"- Structured SPG better than structured UMP at every target: "
        f"**{yes_no(bool(better) and all(better))}**"
    )
    return table + "\n\n" + notes, "\n".join(goals)


def main(argv=None):
    """Runs the study; returns the comparison's written paths."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--targets", type=float, nargs="*", default=[0.5, 0.65, 0.765]
    )
    parser.add_argument(
        "--structured-targets", type=float, nargs="*", default=[0.25, 0.5]
    )
    parser.add_argument(
        "--latency-rounds",
        type=int,
        default=5,
        help="rounds of the exported models' CPU latency (structured table)",
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
    structured = [runs[0]]
    for target in args.structured_targets:
        for method in ("ump", "spg"):
            structured.append(
                run(
                    f"tiny_{method}_structured.yaml",
                    f"{args.runs}/{method}_structured_{target}",
                    [*common, f"--target_sparsity={target}"],
                )
            )
    written = []
    if args.structured_targets:
        written += compare.main(
            [*structured, "--baseline", runs[0], "--out", OUT_STRUCTURED]
        )
        loaded = {os.path.basename(path): load_run(path) for path in structured}
        table, goals = structured_markdown(
            loaded, args.structured_targets, args.latency_rounds
        )
        plots = [
            f"![wer_vs_ratio_{split}](synthetic_study_structured/wer_vs_ratio_{split}.png)"
            for split in SPLITS
        ]
        print(table, goals, sep="\n\n")
        write_results_section(
            only_wer_plots(
                table + "\n\n" + "\n".join(plots), "synthetic_study_structured"
            ),
            argv,
            goals,
            (STRUCTURED_BEGIN, STRUCTURED_END),
            "Synthetic study: structured SPG vs structured UMP vs dense",
        )
    if not args.targets:
        return written
    for target in args.targets:
        for method in ("ump", "spg"):
            runs.append(
                run(
                    f"tiny_{method}.yaml",
                    f"{args.runs}/{method}_{target}",
                    [*common, f"--target_sparsity={target}"],
                )
            )
    written += compare.main([*runs, "--baseline", runs[0], "--out", OUT])
    with open(os.path.join(OUT, "comparison.md"), encoding="utf-8") as f:
        markdown = f.read()
    markdown = markdown.replace("](", "](synthetic_study/")
    if markdown.startswith("# "):  # the section has a heading of its own
        markdown = markdown.split("\n", 1)[1]
    markdown = only_wer_plots(markdown, "synthetic_study")
    loaded = {os.path.basename(path): load_run(path) for path in runs}
    goals = goals_markdown(loaded, args.targets)
    print(goals)
    write_results_section(markdown, argv, goals)
    return written


if __name__ == "__main__":
    main()
