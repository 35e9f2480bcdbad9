#!/usr/bin/env python3
"""Whether the sparsity controllers land on the target without calibration.

The setting of issue #26: the tiny wav2vec2 of
``speechbrain_spg.data.architectures.tiny_model_folder()``, target 0.65 and
the lobe's defaults, one Adam (lr 1e-3) over all lobe parameters, a fixed
batch of 2 x 4000 random samples (drawn from the seed), 1500 steps, then
``hard_prune()`` WITHOUT calibration. Two settings: the sparsity term alone
(``alone``), and with a task loss that pulls against pruning (``task``:
``--task-scale`` x the mean squared difference to the dense model's output on
the batch). Each controller (``lagrangian``: the old two-multiplier
regulariser; ``projection``: the default) runs each setting once per seed.

Printed per run: the hard sparsity after ``hard_prune()``, the largest
|soft sparsity - scheduled target| after the ramp over the logged steps
(every ``--log-interval``), and the lowest-highest per-matrix sparsity. The
figure (``--plot``, by default ``benchmarks/sparsity_controller.png``) draws
soft and hard sparsity against the schedule, one panel per setting, for the
first seed. A few minutes on one CPU core.

``--step-time N`` instead times training steps of the tiny demo's setting
(``recipes/LibriSpeech/spg``'s shipped tiny wav2vec2, ``tiny_spg.yaml``'s
lobe options, head and three Adams; a batch of 8 x 3 s of random audio, CTC
loss on random labels): N steps after 5 untimed ones, for each controller in
turn (the order alternates), ``--rounds`` times, and prints the milliseconds
per step and their ratio.

Usage:
    python benchmarks/sparsity_controller.py
    python benchmarks/sparsity_controller.py --seeds 0 1 2 --ramp-steps 500
    python benchmarks/sparsity_controller.py --step-time 30 --rounds 3

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import pathlib
import time

import torch
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

from speechbrain_spg.data.architectures import tiny_model_folder
from speechbrain_spg.lobes import SPGWav2Vec2, flushes_subnormals, spg_lobe
from speechbrain_spg.options import CONTROLLERS

SETTINGS = ("alone", "task")
PLOT = pathlib.Path(__file__).resolve().parent / "sparsity_controller.png"
TINY_DEMO = PLOT.parents[1] / "recipes/LibriSpeech/spg/pretrained/tiny_w2v2/hf"


def largest_gap(trace, after):
    """Largest |soft sparsity - target| over the trace points after a step.

    Arguments
    ---------
    trace : list of dict
        Points with ``step``, ``soft`` and ``target``.
    after : int
        Points at or before this step are left out (the ramp).

    Returns
    -------
    float
        NaN if no point is left.

    Example
    -------
    >>> points = [{"step": s, "soft": v, "target": 0.5}
    ...           for s, v in [(10, 0.1), (20, 0.52), (30, 0.49)]]
    >>> round(largest_gap(points, 15), 3)
    0.02
    """
    gaps = [abs(p["soft"] - p["target"]) for p in trace if p["step"] > after]
    return max(gaps) if gaps else float("nan")


def run(controller, setting, seed, args):
    """Trains one lobe in one setting; returns its trace and final report.

    Arguments
    ---------
    controller : str
        ``sparsity_controller`` of the lobe.
    setting : str
        ``"alone"`` or ``"task"``.
    seed : int
        Seeds torch and the batch.
    args : argparse.Namespace
        ``steps``, ``lr``, ``target``, ``ramp_steps``, ``task_scale``,
        ``log_interval``.

    Returns
    -------
    trace : list of dict
        ``step``, ``soft``, ``hard``, ``target`` every ``log_interval``.
    report : speechbrain_spg.sparsity.SparsityReport
        After ``hard_prune()`` (no calibration).
    """
    source = tiny_model_folder("wav2vec2")
    torch.manual_seed(seed)
    lobe = SPGWav2Vec2(
        source,
        save_path="",
        target_sparsity=args.target,
        ramp_steps=args.ramp_steps,
        sparsity_controller=controller,
    ).train()
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(seed))
    if setting == "task":
        with torch.no_grad():
            reference = Wav2Vec2(source, save_path="").eval()(wav)
    optimizer = torch.optim.Adam(lobe.parameters(), lr=args.lr)
    trace = []
    for step in range(1, args.steps + 1):
        out = lobe(wav)
        loss = lobe.sparsity_loss()
        if setting == "task":
            loss = loss + args.task_scale * (out - reference).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.log_interval == 0 or step == args.steps:
            with torch.no_grad():
                trace.append(
                    {
                        "step": step,
                        "soft": lobe.soft_sparsity().item(),
                        "hard": lobe.hard_sparsity(),
                        "target": lobe.regularizer.target_at(step),
                    }
                )
    return trace, lobe.hard_prune()


def plot(traces, out_png):
    """Soft and hard sparsity against the schedule, one panel per setting.

    Arguments
    ---------
    traces : dict
        (controller, setting) -> trace (see ``run``).
    out_png : str
        Where the figure goes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    colours = {"lagrangian": "tab:red", "projection": "tab:blue"}
    for index, setting in enumerate(SETTINGS):
        axes = figure.add_subplot(1, 2, index + 1)
        for (controller, name), trace in traces.items():
            if name != setting:
                continue
            steps = [p["step"] for p in trace]
            for kind, style in (("soft", "-"), ("hard", ":")):
                axes.plot(
                    steps,
                    [p[kind] for p in trace],
                    style,
                    color=colours[controller],
                    label=f"{controller}: {kind}",
                )
        axes.plot(steps, [p["target"] for p in trace], "k--", lw=1)
        axes.set_title(f"setting: {setting}")
        axes.set_xlabel("optimiser step")
        axes.set_ylabel("sparsity of the gated weights (-- schedule)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    FigureCanvasAgg(figure)
    figure.savefig(out_png, format="png", dpi=110, bbox_inches="tight")


def step_time(controller, steps, warmup=5):
    """Seconds per training step in the tiny demo's setting (module doc).

    Arguments
    ---------
    controller : str
        ``sparsity_controller`` of the lobe.
    steps, warmup : int
        Timed steps, after ``warmup`` untimed ones.

    Returns
    -------
    float
    """
    torch.manual_seed(0)
    lobe = spg_lobe(
        str(TINY_DEMO),
        target_sparsity=0.65,
        ramp_steps=100,
        sparsity_controller=controller,
        output_norm=True,
        freeze_feature_extractor=True,
    ).train()
    head = torch.nn.Sequential(
        torch.nn.Linear(192, 192), torch.nn.Linear(192, 31)
    )
    gate = [lobe.gate.threshold_param, lobe.regularizer.multiplier_param]
    ssl = [p for p in lobe.parameters() if all(p is not g for g in gate)]
    groups = ((head.parameters(), 5e-4), (ssl, 2e-4), (gate, 0.02))
    optimizers = [torch.optim.Adam(params, lr) for params, lr in groups]
    generator = torch.Generator().manual_seed(1)
    wav = torch.randn(8, 48000, generator=generator)
    labels = torch.randint(3, 31, (8, 30), generator=generator)

    def step():
        log_probs = torch.log_softmax(head(lobe(wav)), -1).transpose(0, 1)
        lengths = torch.full((8,), log_probs.shape[0])
        loss = torch.nn.functional.ctc_loss(
            log_probs, labels, lengths, torch.full((8,), 30)
        )
        loss = loss + lobe.sparsity_loss()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    """Runs every controller, setting and seed; prints and plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", type=float, default=0.65)
    parser.add_argument("--ramp-steps", type=int, default=0)
    parser.add_argument("--task-scale", type=float, default=10.0)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--plot", default=str(PLOT))
    parser.add_argument("--step-time", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    was_on = flushes_subnormals()
    torch.set_flush_denormal(True)  # as the recipe's train.py
    try:
        return measure(args)
    finally:
        torch.set_flush_denormal(was_on)


def measure(args):
    """What ``main`` runs, with the parsed arguments.

    Arguments
    ---------
    args : argparse.Namespace

    Returns
    -------
    list of tuple or None
        (controller, setting, seed, hard, max gap) per run; None with
        ``--step-time``.
    """
    if args.step_time:
        for index in range(args.rounds):
            order = args.controllers[:: -1 if index % 2 else 1]  # alternate
            times = {c: step_time(c, args.step_time) for c in order}
            ratio = times["projection"] / times["lagrangian"]
            print(
                f"round {index + 1}: "
                + ", ".join(f"{c} {t * 1e3:.1f} ms" for c, t in times.items())
                + f", projection / lagrangian {ratio:.4f}",
                flush=True,
            )
        return None
    print(
        f"{'controller':>10} {'setting':>7} {'seed':>4} {'hard':>7} "
        f"{'max |soft - target|':>19} {'layers':>11}"
    )
    traces, rows = {}, []
    for controller in args.controllers:
        for setting in SETTINGS:
            for seed in args.seeds:
                trace, report = run(controller, setting, seed, args)
                traces.setdefault((controller, setting), trace)
                layers = [layer.hard for layer in report.layers]
                gap = largest_gap(trace, args.ramp_steps)
                rows.append((controller, setting, seed, report.hard, gap))
                print(
                    f"{controller:>10} {setting:>7} {seed:>4} "
                    f"{report.hard:>7.4f} {gap:>19.4f} "
                    f"{min(layers):>5.3f}-{max(layers):.3f}",
                    flush=True,
                )
    plot(traces, args.plot)
    print(f"traces: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
