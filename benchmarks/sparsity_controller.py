#!/usr/bin/env python3
"""How closely the sparsity regulariser holds the target during training.

Runs the out-of-the-box recipe (``recipes/LibriSpeech/spg``,
``hparams/tiny_spg.yaml``: the shipped tiny wav2vec2, synthetic corpus,
2 epochs) once per value of ``sparsity_damping`` and reads each run's
training trace (soft and hard sparsity every ``log_interval`` steps). For
the steps after ``--settle-step`` (the ramp to the target ends at step 100)
it prints the mean, standard deviation and largest absolute value of the
gap between soft sparsity and target, then the hard sparsity training left
(before the final calibration), the calibration factor and the test WERs,
and draws the traces in one figure (``--plot``, by default
``benchmarks/sparsity_controller.png``). The runs go to
``recipes/LibriSpeech/spg/results/sparsity_controller/damping_<D>``; each
takes about 5 minutes on 2 CPU cores.

A run whose ``summary.json`` exists is read, not run again; an interrupted
one resumes from its last checkpoint (the recipe's own checkpoints). The
last line reads ``largest sparsity gap after step S: damping D1 G1, ...``.

Usage:
    python benchmarks/sparsity_controller.py
    python benchmarks/sparsity_controller.py --dampings 0 100 300
    python benchmarks/sparsity_controller.py --recipe-args --lr_gate 0.005

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

RECIPE = pathlib.Path(__file__).resolve().parents[1] / "recipes/LibriSpeech/spg"


def run_folder(out, damping):
    """Output folder of the run with ``damping``."""
    return pathlib.Path(out) / f"damping_{damping:g}"


def train(folder, damping, recipe_args, threads):
    """Runs (or resumes) the tiny recipe with ``damping`` into ``folder``."""
    command = [
        sys.executable,
        "train.py",
        "hparams/tiny_spg.yaml",
        "--sparsity_damping",
        repr(float(damping)),
        "--output_folder",
        str(folder.resolve()),
        "--evaluate_initial_model",
        "False",
        *recipe_args,
    ]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, cwd=RECIPE, env=env, check=True)


def gap_statistics(trace, settle_step):
    """Mean, standard deviation and largest absolute value of soft sparsity
    minus target over the trace points after ``settle_step``.

    Arguments
    ---------
    trace : list of dict
        The recipe's training trace (``step``, ``soft_sparsity``,
        ``target``).
    settle_step : int
        Points at or before this step are left out.

    Returns
    -------
    tuple of float
        (mean, standard deviation, largest absolute gap).

    Example
    -------
    >>> points = [{"step": s, "soft_sparsity": v, "target": 0.5}
    ...           for s, v in [(10, 0.1), (20, 0.52), (30, 0.49)]]
    >>> [round(x, 3) for x in gap_statistics(points, 15)]
    [0.005, 0.015, 0.02]
    """
    gaps = [
        point["soft_sparsity"] - point["target"]
        for point in trace
        if point["step"] > settle_step
    ]
    if not gaps:
        raise ValueError(
            f"the trace has no point after step {settle_step}: train longer "
            "or lower --settle-step."
        )
    return (
        statistics.mean(gaps),
        statistics.pstdev(gaps),
        max(abs(gap) for gap in gaps),
    )


def plot(summaries, out_png):
    """Soft sparsity and target against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    for damping, summary in summaries.items():
        trace = summary["trace"]
        axes.plot(
            [p["step"] for p in trace],
            [p["soft_sparsity"] for p in trace],
            label=f"sparsity_damping {damping:g}",
        )
    trace = next(iter(summaries.values()))["trace"]
    axes.plot(
        [p["step"] for p in trace],
        [p["target"] for p in trace],
        "k--",
        linewidth=1,
        label="scheduled target",
    )
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("soft sparsity of the gated weights")
    axes.set_title("Sparsity during one-pass SPG training (tiny model)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def main(argv=None):
    """Runs or reads the recipe runs and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0, 100])
    parser.add_argument(
        "--out",
        default=str(RECIPE / "results" / "sparsity_controller"),
        help="folder of the runs (one subfolder per damping)",
    )
    parser.add_argument(
        "--plot",
        default=str(
            RECIPE.parents[2] / "benchmarks" / "sparsity_controller.png"
        ),
        help="figure of the traces",
    )
    parser.add_argument("--settle-step", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs"
    )
    parser.add_argument(
        "--recipe-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="further train.py overrides, e.g. --lr_gate 0.005 (last)",
    )
    args = parser.parse_args(argv)
    summaries = {}
    for damping in args.dampings:
        folder = run_folder(args.out, damping)
        summary_file = folder / "summary.json"
        if not summary_file.exists():
            train(folder, damping, args.recipe_args, args.threads)
        summaries[damping] = json.loads(summary_file.read_text())
    print(
        f"\ngap = soft sparsity - target, trace points after step "
        f"{args.settle_step}"
    )
    print(
        f"{'damping':>8} {'mean gap':>9} {'sd':>7} {'max |gap|':>9} "
        f"{'hard trained':>12} {'calibration':>11} {'WER clean':>9} "
        f"{'WER other':>9}"
    )
    largest = {}
    for damping, summary in summaries.items():
        mean, sd, worst = gap_statistics(summary["trace"], args.settle_step)
        largest[damping] = worst
        sparsity = summary["sparsity"]
        wer = summary.get("wer", {})
        print(
            f"{damping:>8g} {mean:>+9.4f} {sd:>7.4f} {worst:>9.4f} "
            f"{sparsity['hard_sparsity_trained']:>12.4f} "
            f"{sparsity.get('calibration_factor') or 1.0:>11.4f} "
            f"{wer.get('test-clean', float('nan')):>9.2f} "
            f"{wer.get('test-other', float('nan')):>9.2f}"
        )
    plot(summaries, args.plot)
    print(f"traces: {args.plot}")
    print(
        f"largest sparsity gap after step {args.settle_step}: "
        + ", ".join(f"damping {d:g} {g:.4f}" for d, g in largest.items())
    )


if __name__ == "__main__":
    main()
