#!/usr/bin/env python3
"""How closely the sparsity regulariser holds the target during training.

Runs the out-of-the-box recipe (``recipes/LibriSpeech/spg``,
``hparams/tiny_spg.yaml``: the shipped tiny wav2vec2, synthetic corpus,
2 epochs) once per value of ``sparsity_damping`` and reads each run's
training trace (soft and hard sparsity every ``log_interval`` steps). For
the steps after ``--settle-step`` (the ramp to the target ends at step 100)
it prints the mean, standard deviation and largest absolute value of the
gap between soft sparsity and target, then the hard sparsity training left
(before the final calibration), the calibration factor, the range of the
per-layer sparsities (lowest-highest matrix, after calibration) and the test
WERs, and draws the traces in one figure (``--plot``, by default
``benchmarks/sparsity_controller.png``). The runs go to
``recipes/LibriSpeech/spg/results/sparsity_controller/damping_<D>`` (with the
``--recipe-args`` in the name when given); each takes about 5 minutes on 2
CPU cores.

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
import re
import statistics
import subprocess
import sys

RECIPE = pathlib.Path(__file__).resolve().parents[1] / "recipes/LibriSpeech/spg"


#: Overrides the benchmark sets itself.
RESERVED_ARGS = ("--sparsity_damping", "--output_folder")


def run_folder(out, damping, recipe_args=()):
    """Output folder of the run with ``damping`` and ``recipe_args``.

    Arguments
    ---------
    out : str
        Folder of all runs.
    damping : float
        The run's ``sparsity_damping``.
    recipe_args : list of str
        Further ``train.py`` overrides: part of the name, so that runs with
        other settings are never taken for these.

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> run_folder("runs", 100.0).as_posix()
    'runs/damping_100'
    >>> run_folder("runs", 0.0, ["--lr_gate", "0.005"]).as_posix()
    'runs/damping_0_lr_gate_0.005'
    """
    name = "_".join([f"damping_{damping:g}", *recipe_args])
    name = "".join(c if c.isalnum() or c in "._=" else "_" for c in name)
    return pathlib.Path(out) / re.sub("_+", "_", name)


def check_recipe_args(recipe_args):
    """Refuses overrides the benchmark sets itself.

    Arguments
    ---------
    recipe_args : list of str
        Further ``train.py`` overrides.

    Example
    -------
    >>> check_recipe_args(["--lr_gate", "0.005"])
    >>> check_recipe_args(["--sparsity_damping=3"])
    Traceback (most recent call last):
      ...
    ValueError: --recipe-args: --sparsity_damping is set by the benchmark (use --dampings / --out).
    """
    for arg in recipe_args:
        key = arg.split("=", 1)[0]
        if key in RESERVED_ARGS:
            raise ValueError(
                f"--recipe-args: {key} is set by the benchmark (use "
                "--dampings / --out)."
            )


def train(folder, damping, recipe_args, threads):
    """Runs (or resumes) the tiny recipe with ``damping`` into ``folder``.

    Arguments
    ---------
    folder : pathlib.Path
        Output folder of the run.
    damping : float
        ``sparsity_damping`` of the run.
    recipe_args : list of str
        Further ``train.py`` overrides.
    threads : int
        ``OMP_NUM_THREADS`` of the run (0: the machine's default).

    Returns
    -------
    dict
        The run's ``summary.json``.
    """
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
    if subprocess.run(command, cwd=RECIPE, env=env).returncode != 0:
        raise SystemExit(
            f"the recipe run for damping {damping:g} failed (command above); "
            f"its log: {folder / 'log.txt'}. Run this benchmark again to "
            "resume it from its last checkpoint."
        )
    return read_summary(folder)


def read_summary(folder):
    """The ``summary.json`` of a finished run.

    Arguments
    ---------
    folder : pathlib.Path
        Output folder of the run.

    Returns
    -------
    dict
    """
    path = folder / "summary.json"
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: the run in {folder} did not finish (run "
            "this benchmark again to resume it)."
        )
    return json.loads(path.read_text())


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
    """Soft sparsity and target against the step, one line per run.

    Arguments
    ---------
    summaries : dict
        Damping -> the run's ``summary.json``.
    out_png : str
        Where the figure goes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    axes = figure.add_subplot()
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
    FigureCanvasAgg(figure)
    figure.savefig(out_png, format="png", dpi=120, bbox_inches="tight")


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
    try:
        check_recipe_args(args.recipe_args)
    except ValueError as error:
        parser.error(str(error))
    summaries = {}
    for damping in args.dampings:
        folder = run_folder(args.out, damping, args.recipe_args)
        if (folder / "summary.json").exists():
            summaries[damping] = read_summary(folder)
        else:
            summaries[damping] = train(
                folder, damping, args.recipe_args, args.threads
            )
    print(
        f"\ngap = soft sparsity - target, trace points after step "
        f"{args.settle_step}"
    )
    print(
        f"{'damping':>8} {'mean gap':>9} {'sd':>7} {'max |gap|':>9} "
        f"{'hard trained':>12} {'calibration':>11} {'layers':>11} "
        f"{'WER clean':>9} {'WER other':>9}"
    )
    largest = {}
    for damping, summary in summaries.items():
        mean, sd, worst = gap_statistics(summary["trace"], args.settle_step)
        largest[damping] = worst
        sparsity = summary["sparsity"]
        wer = summary.get("wer", {})
        factor = sparsity.get("calibration_factor")
        layers = [layer["sparsity"] for layer in sparsity["layers"]]
        print(
            f"{damping:>8g} {mean:>+9.4f} {sd:>7.4f} {worst:>9.4f} "
            f"{sparsity['hard_sparsity_trained']:>12.4f} "
            f"{'-' if factor is None else f'{factor:.4f}':>11} "
            f"{f'{min(layers):.2f}-{max(layers):.2f}':>11} "
            f"{wer.get('test-clean', float('nan')):>9.2f} "
            f"{wer.get('test-other', float('nan')):>9.2f}"
        )
    plot(summaries, args.plot)
    print(f"traces: {os.path.relpath(args.plot)}")
    print(
        f"largest sparsity gap after step {args.settle_step}: "
        + ", ".join(f"damping {d:g} {g:.4f}" for d, g in largest.items())
    )


if __name__ == "__main__":
    main()
