"""Did compression cost accuracy, and was it worth it?

Compares the output folders of several recipe runs (a dense baseline and
compressed models) the way the paper does: parameter counts, compression
ratio, WER per test split, the WER change against a baseline, and whether
that change is statistically significant under the matched-pairs
sentence-segment word error test (MAPSSWE,
:func:`speechbrain_spg.evaluation.significance.mapsswe`), run on the per-utterance
hypotheses that the recipe writes.

A run folder holds ``summary.json`` (written by the recipe) and one
``hyps_<split>.jsonl`` per split in ``summary["wer"]``. From the command line::

    python -m speechbrain_spg.evaluation.compare RUN_DIR [RUN_DIR ...] \\
        [--baseline RUN_DIR] [--out DIR] [--alpha 0.05]

writes ``<out>/comparison.md`` (a Markdown table) and PNG plots: WER against
compression ratio per split, sparsity per gated layer and the training
curves of every run. Plots are drawn with matplotlib's Agg canvas, so no
display is needed.

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from speechbrain_spg.evaluation.significance import (
    compare_hypothesis_files,
    load_hypotheses,
)

SUMMARY_FILE = "summary.json"
DEFAULT_OUT = "comparison"
#: Keys of ``summary.json`` that a comparison needs.
_REQUIRED_KEYS = ("method", "params", "compression_ratio", "wer")
#: Written in place of a value that does not exist (baseline, missing split).
_MISSING = "-"


def hypotheses_file(run_dir, split):
    """Path of the hypotheses file of one split in a run folder.

    Arguments
    ---------
    run_dir : str or os.PathLike
        The run folder.
    split : str
        The test split, e.g. ``"test-clean"``.

    Returns
    -------
    str
        ``<run_dir>/hyps_<split>.jsonl``.

    Example
    -------
    >>> hypotheses_file("results/spg", "test-clean")
    'results/spg/hyps_test-clean.jsonl'
    """
    return os.path.join(os.fspath(run_dir), f"hyps_{split}.jsonl")


@dataclass(frozen=True)
class Run:
    """The results of one recipe run, as read by :func:`load_run`.

    Arguments
    ---------
    path : str
        The run folder.
    summary : dict
        The content of its ``summary.json``.
    hypotheses : dict
        Split -> (utterance id -> ``(ref, hyp)``), one entry per split in
        ``summary["wer"]``.

    Example
    -------
    >>> run = Run(
    ...     path="results/spg", summary={"method": "spg", "system": "spg-0.65"},
    ...     hypotheses={"test": {"u1": ("A B", "A B")}},
    ... )
    >>> run.name, run.method
    ('spg-0.65', 'spg')
    """

    path: str
    summary: dict
    hypotheses: dict

    @property
    def name(self):
        """``summary["system"]``, else the name of the run folder."""
        system = self.summary.get("system")
        if system:
            return str(system)
        return os.path.basename(os.path.normpath(self.path))

    @property
    def method(self):
        """``summary["method"]``: ``"spg"``, ``"ump"`` or ``"dense"``."""
        return self.summary.get("method")

    @property
    def splits(self):
        """The test splits with a WER, in summary order."""
        return list(self.summary.get("wer", {}))


def load_run(run_dir):
    """Reads ``summary.json`` and the hypotheses files of a run folder.

    Arguments
    ---------
    run_dir : str or os.PathLike
        Output folder of one recipe run.

    Returns
    -------
    Run
        The summary and, for every split in ``summary["wer"]``, the
        hypotheses of ``hyps_<split>.jsonl``.

    Raises
    ------
    FileNotFoundError
        If the folder, its ``summary.json`` or the hypotheses file of a split
        does not exist; the message names the missing file.
    ValueError
        If ``summary.json`` is not valid JSON, is not an object or lacks a
        key the comparison needs, or a hypotheses file is malformed.

    Example
    -------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _write_demo_run(folder, method="dense", errors=2)
    ...     run = load_run(folder)
    >>> run.method, run.splits, len(run.hypotheses["test"])
    ('dense', ['test'], 20)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     load_run(folder)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
     ...
    FileNotFoundError: ... has no summary.json: .../summary.json does not exist. ...
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"The run folder {run_dir} does not exist; pass the output "
            "folder of a recipe run (the one holding summary.json)."
        )
    summary = _read_summary(os.path.join(run_dir, SUMMARY_FILE))
    hypotheses = {}
    for split in summary["wer"]:
        path = hypotheses_file(run_dir, split)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist, but {SUMMARY_FILE} of {run_dir} "
                f"reports a WER on the split {split!r}; the significance "
                "test needs the per-utterance hypotheses the recipe writes "
                "after decoding. Copy the file back or rerun the evaluation."
            )
        hypotheses[split] = load_hypotheses(path)
    return Run(path=run_dir, summary=summary, hypotheses=hypotheses)


def final_dev_wer(run, key="dev_WER"):
    """The validation WER of a run's last finished epoch.

    Arguments
    ---------
    run : Run
        A loaded run.
    key : str
        The history column to read (default ``"dev_WER"``).

    Returns
    -------
    float or None
        The last epoch's value, or None without such a column.

    Example
    -------
    >>> run = Run("r", {"history": [{"dev_WER": 30.0}, {"dev_WER": 25.0}]}, {})
    >>> final_dev_wer(run)
    25.0
    """
    values = [
        row[key] for row in run.summary.get("history") or [] if key in row
    ]
    return values[-1] if values else None


def compression_time(run):
    """A run's compression clock at the end of its last finished epoch.

    Pruning (UMP), every training epoch and its validation; not the final
    hard pruning, export and test decoding that follow training.

    Arguments
    ---------
    run : Run
        A loaded run.

    Returns
    -------
    float or None
        ``elapsed_s`` of the last history row, or None without one.

    Example
    -------
    >>> run = Run("r", {"history": [{"elapsed_s": 10.0}, {"elapsed_s": 21.5}]}, {})
    >>> compression_time(run)
    21.5
    """
    history = run.summary.get("history") or []
    return history[-1].get("elapsed_s") if history else None


def time_to_reach(run, wer, min_sparsity=None, key="dev_WER"):
    """Compression seconds a run needed to first reach a validation WER.

    Reads the per-epoch history of ``summary.json``: the first epoch whose
    validation WER is at most ``wer`` (and whose hard sparsity is at least
    ``min_sparsity``, so that a gated run counts only once it is compressed)
    gives its ``elapsed_s``, the run's clock at the end of that epoch
    (training, validation and, for UMP, pruning; time lost to a restart is
    not counted). The resolution is one epoch.

    Arguments
    ---------
    run : Run
        A loaded run.
    wer : float
        The WER to reach, in percent (e.g. another run's final dev WER).
    min_sparsity : float, optional
        Epochs with a lower ``hard_sparsity`` do not count.
    key : str
        The history column compared with ``wer`` (default ``"dev_WER"``).

    Returns
    -------
    tuple or None
        ``(epoch, elapsed_s)`` of the first epoch that qualifies, or None
        if no epoch does (or the history has no ``elapsed_s``).

    Example
    -------
    >>> history = [
    ...     {"epoch": 1, "elapsed_s": 100.0, "dev_WER": 30.0, "hard_sparsity": 0.6},
    ...     {"epoch": 2, "elapsed_s": 200.0, "dev_WER": 24.0, "hard_sparsity": 0.65},
    ... ]
    >>> run = Run("r", {"history": history}, {})
    >>> time_to_reach(run, 30.0)
    (1, 100.0)
    >>> time_to_reach(run, 30.0, min_sparsity=0.645)
    (2, 200.0)
    >>> time_to_reach(run, 20.0) is None
    True
    """
    for row in run.summary.get("history") or []:
        if key not in row or "elapsed_s" not in row:
            continue
        if (
            min_sparsity is not None
            and row.get("hard_sparsity", 0.0) < min_sparsity
        ):
            continue
        if row[key] <= wer:
            return row["epoch"], row["elapsed_s"]
    return None


def _read_summary(path):
    """Loads and checks one ``summary.json``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.dirname(path)} has no {SUMMARY_FILE}: {path} does not "
            "exist. Pass the output folder of a finished recipe run."
        )
    with open(path, encoding="utf-8") as f:
        try:
            summary = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(summary, dict):
        raise ValueError(
            f"{path} must hold a JSON object, got {type(summary).__name__}."
        )
    for key in _REQUIRED_KEYS:
        if key not in summary:
            raise ValueError(
                f'{path} lacks the key "{key}"; it must be the summary '
                "written by the recipe at the end of a run."
            )
    params = summary["params"]
    if not isinstance(params, dict) or not {"total", "nonzero"} <= set(params):
        raise ValueError(
            f'{path}: "params" must be an object with the keys "total" and '
            f'"nonzero", got {params!r}.'
        )
    if not isinstance(summary["wer"], dict):
        raise ValueError(
            f'{path}: "wer" must map each test split to its WER, got '
            f"{summary['wer']!r}."
        )
    return summary


@dataclass(frozen=True)
class ComparisonRow:
    """One system of a comparison against a baseline.

    Per-split values are dicts keyed by split. Differences and tests are
    None for the baseline itself and for a split that the baseline or this
    run lacks.

    Arguments
    ---------
    system : str
        Name of the system (``summary["system"]``, else the folder name;
        disambiguated with the folder name when two runs share it).
    method : str
        ``summary["method"]``.
    path : str
        The run folder.
    is_baseline : bool
        Whether this row is the baseline.
    total_params : int
        Parameters of the SSL model.
    nonzero_params : int
        Parameters that are not zero.
    compression_ratio : float
        ``total_params / nonzero_params`` as reported by the run.
    wall_time_s : float or None
        Wall time of the run (training and compression), in seconds.
    wer : dict
        Split -> WER in percent, from the summary.
    delta_wer : dict
        Split -> ``WER - baseline WER`` in absolute percentage points.
    p_value : dict
        Split -> two-sided MAPSSWE p-value against the baseline.
    significant : dict
        Split -> whether ``p_value < alpha``.
    tests : dict
        Split -> the full
        :class:`speechbrain_spg.evaluation.significance.HypothesisComparison`
        (baseline as system A), which also holds a paired bootstrap.

    Example
    -------
    >>> row = ComparisonRow(
    ...     system="spg-0.65", method="spg", path="results/spg",
    ...     is_baseline=False, total_params=2_100_000,
    ...     nonzero_params=1_000_000, compression_ratio=2.1,
    ...     wall_time_s=123.4, wer={"test": 12.3}, delta_wer={"test": 0.4},
    ...     p_value={"test": 0.21}, significant={"test": False}, tests={},
    ... )
    >>> row.delta_wer["test"], row.significant["test"]
    (0.4, False)
    """

    system: str
    method: str
    path: str
    is_baseline: bool
    total_params: int
    nonzero_params: int
    compression_ratio: float
    wall_time_s: float | None
    wer: dict
    delta_wer: dict
    p_value: dict
    significant: dict
    tests: dict


def _same_folder(run_a, run_b):
    """Whether two runs were loaded from the same folder."""
    return os.path.realpath(run_a.path) == os.path.realpath(run_b.path)


def _unique(names):
    """Appends ``-2``, ``-3``, ... to repeated names."""
    seen = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def display_names(runs):
    """Names that tell the runs apart in tables, plots and file names.

    A name shared by several runs gets its folder name appended.

    Arguments
    ---------
    runs : list of Run
        The runs.

    Returns
    -------
    list of str
        One name per run.

    Example
    -------
    >>> runs = [
    ...     Run("out/a", {"system": "spg"}, {}),
    ...     Run("out/b", {"system": "spg"}, {}),
    ...     Run("out/dense", {}, {}),
    ... ]
    >>> display_names(runs)
    ['spg (a)', 'spg (b)', 'dense']
    """
    counts = Counter(run.name for run in runs)
    names = []
    for run in runs:
        name = run.name
        if counts[name] > 1:
            name = f"{name} ({os.path.basename(os.path.normpath(run.path))})"
        names.append(name)
    return _unique(names)


def ordered_splits(runs):
    """All test splits of the runs, in the order they first appear.

    Arguments
    ---------
    runs : list of Run
        The runs.

    Returns
    -------
    list of str
        The splits.

    Example
    -------
    >>> runs = [
    ...     Run("a", {"wer": {"test-clean": 3.0}}, {}),
    ...     Run("b", {"wer": {"test-other": 8.0, "test-clean": 3.5}}, {}),
    ... ]
    >>> ordered_splits(runs)
    ['test-clean', 'test-other']
    """
    splits = []
    for run in runs:
        splits.extend(split for split in run.splits if split not in splits)
    return splits


def compare_runs(runs, baseline, alpha=0.05):
    """Compares every run with a baseline, split by split.

    WERs come from the summaries; the significance of each difference comes
    from the MAPSSWE on the hypotheses files, with utterances matched by id
    (:func:`speechbrain_spg.evaluation.significance.compare_hypothesis_files`).

    Arguments
    ---------
    runs : list of Run
        The runs to compare (see :func:`load_run`).
    baseline : Run
        The reference system, usually the dense model. When it is not one of
        ``runs`` (same folder) it is added.
    alpha : float
        Significance level of the two-sided test.

    Returns
    -------
    list of ComparisonRow
        The baseline first, then the other runs in the given order.

    Raises
    ------
    ValueError
        If ``alpha`` is not in (0, 1), or the hypotheses of a split do not
        cover the same utterances with the same references as the baseline's.

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dense = os.path.join(folder, "dense")
    ...     spg = os.path.join(folder, "spg")
    ...     _write_demo_run(dense, method="dense", errors=1)
    ...     _write_demo_run(spg, method="spg", errors=12, ratio=3.0)
    ...     runs = [load_run(dense), load_run(spg)]
    ...     rows = compare_runs(runs, baseline=runs[0])
    >>> [(row.system, row.is_baseline) for row in rows]
    [('dense', True), ('spg', False)]
    >>> rows[0].p_value["test"] is None, round(rows[1].delta_wer["test"], 2)
    (True, 9.17)
    >>> rows[1].p_value["test"] < 0.05, rows[1].significant["test"]
    (True, True)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    others = [run for run in runs if not _same_folder(run, baseline)]
    ordered = [baseline, *others]
    names = display_names(ordered)
    return [
        _compare_one(run, name, baseline, run is baseline, alpha)
        for run, name in zip(ordered, names)
    ]


def _compare_one(run, name, baseline, is_baseline, alpha):
    """Builds the comparison row of one run."""
    summary = run.summary
    wer = {split: float(value) for split, value in summary["wer"].items()}
    delta_wer, p_value, significant, tests = {}, {}, {}, {}
    for split in run.splits:
        if is_baseline or split not in baseline.summary["wer"]:
            delta_wer[split] = p_value[split] = significant[split] = None
            continue
        delta_wer[split] = wer[split] - float(baseline.summary["wer"][split])
        comparison = compare_hypothesis_files(
            hypotheses_file(baseline.path, split),
            hypotheses_file(run.path, split),
            alpha=alpha,
        )
        tests[split] = comparison
        p_value[split] = comparison.mapsswe.p_value
        significant[split] = comparison.mapsswe.significant
    wall_time = summary.get("wall_time_s")
    return ComparisonRow(
        system=name,
        method=str(summary["method"]),
        path=run.path,
        is_baseline=is_baseline,
        total_params=int(summary["params"]["total"]),
        nonzero_params=int(summary["params"]["nonzero"]),
        compression_ratio=float(summary["compression_ratio"]),
        wall_time_s=None if wall_time is None else float(wall_time),
        wer=wer,
        delta_wer=delta_wer,
        p_value=p_value,
        significant=significant,
        tests=tests,
    )


def format_count(count):
    """Formats a parameter count as an integer with thousands separators.

    Arguments
    ---------
    count : int
        The count.

    Returns
    -------
    str
        E.g. ``"94,371,712"``.

    Example
    -------
    >>> format_count(2100000)
    '2,100,000'
    """
    return f"{int(count):,}"


def format_p_value(p_value):
    """Formats a p-value with 3 significant digits, ``-`` when absent.

    Arguments
    ---------
    p_value : float or None
        The p-value.

    Returns
    -------
    str
        The formatted value.

    Example
    -------
    >>> format_p_value(0.012345), format_p_value(1.0), format_p_value(None)
    ('0.0123', '1', '-')
    >>> format_p_value(3.14159e-7)
    '3.14e-07'
    """
    return _MISSING if p_value is None else f"{p_value:.3g}"


def _format_optional(value, spec):
    """Formats a number with ``spec``, or ``-`` when it is None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return format(value, spec)


def _format_significant(significant):
    """``yes``, ``no`` or ``-``."""
    if significant is None:
        return _MISSING
    return "yes" if significant else "no"


def _escape_cell(text):
    """Escapes the characters that would break a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows, splits):
    """Formats comparison rows as a GitHub Markdown table.

    Columns: system, method, total and nonzero parameters (integers with
    thousands separators), compression ratio, then for each split the WER
    (2 decimals), its change against the baseline (signed, 2 decimals), the
    MAPSSWE p-value (3 significant digits) and whether it is significant,
    and last the wall time in seconds. Values that do not exist (the
    baseline's own test, a split a run lacks) are ``-``.

    Arguments
    ---------
    rows : list of ComparisonRow
        Rows from :func:`compare_runs`.
    splits : list of str
        The splits to show, in order.

    Returns
    -------
    str
        The table, one line per row after the header and its separator,
        without a trailing newline.

    Example
    -------
    >>> row = ComparisonRow(
    ...     system="spg-0.65", method="spg", path="out/spg",
    ...     is_baseline=False, total_params=2100000, nonzero_params=1000000,
    ...     compression_ratio=2.1, wall_time_s=123.4, wer={"test": 12.345},
    ...     delta_wer={"test": 0.5}, p_value={"test": 0.0123456},
    ...     significant={"test": True}, tests={},
    ... )
    >>> print(markdown_table([row], ["test"]))  # doctest: +NORMALIZE_WHITESPACE
    | System | Method | Params | Nonzero | Ratio | WER test | ΔWER test | p test | Significant test | Wall time (s) |
    | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |
    | spg-0.65 | spg | 2,100,000 | 1,000,000 | 2.10x | 12.35 | +0.50 | 0.0123 | yes | 123.4 |
    """
    header = ["System", "Method", "Params", "Nonzero", "Ratio"]
    align = ["---", "---", "---:", "---:", "---:"]
    for split in splits:
        header += [
            f"WER {split}",
            f"ΔWER {split}",
            f"p {split}",
            f"Significant {split}",
        ]
        align += ["---:", "---:", "---:", ":---:"]
    header.append("Wall time (s)")
    align.append("---:")
    lines = [_table_line(header), _table_line(align)]
    lines.extend(_table_line(_row_cells(row, splits)) for row in rows)
    return "\n".join(lines)


def _table_line(cells):
    """One Markdown table line."""
    return "| " + " | ".join(_escape_cell(cell) for cell in cells) + " |"


def _row_cells(row, splits):
    """The formatted cells of one row."""
    cells = [
        row.system,
        row.method,
        format_count(row.total_params),
        format_count(row.nonzero_params),
        f"{row.compression_ratio:.2f}x",
    ]
    for split in splits:
        cells += [
            _format_optional(row.wer.get(split), ".2f"),
            _format_optional(row.delta_wer.get(split), "+.2f"),
            format_p_value(row.p_value.get(split)),
            _format_significant(row.significant.get(split)),
        ]
    cells.append(_format_optional(row.wall_time_s, ".1f"))
    return cells


def _save_figure(figure, out_png):
    """Writes a figure to a PNG through the Agg canvas; returns the path."""
    out_png = os.fspath(out_png)
    folder = os.path.dirname(out_png)
    if folder:
        os.makedirs(folder, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(out_png, format="png", dpi=100, bbox_inches="tight")
    return out_png


def plot_wer_vs_ratio(runs, out_png, split, labels=None):
    """Plots the WER of each run on one split against its compression ratio.

    Arguments
    ---------
    runs : list of Run
        The runs; those without a WER on ``split`` are left out.
    out_png : str or os.PathLike
        The PNG file to write (its folder is created).
    split : str
        The test split.
    labels : list of str, optional
        One label per run (default: :attr:`Run.name`).

    Returns
    -------
    str
        ``out_png``.

    Raises
    ------
    ValueError
        If no run has a WER on ``split``.

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     runs = [
    ...         Run("dense", {"method": "dense", "compression_ratio": 1.0,
    ...                       "wer": {"test": 10.0}}, {}),
    ...         Run("spg", {"method": "spg", "compression_ratio": 2.9,
    ...                     "wer": {"test": 11.5}}, {}),
    ...     ]
    ...     path = plot_wer_vs_ratio(runs, os.path.join(folder, "w.png"), "test")
    ...     os.path.getsize(path) > 1000
    True
    """
    labels = labels or [run.name for run in runs]
    points = [
        (run, label)
        for run, label in zip(runs, labels)
        if split in run.summary.get("wer", {})
    ]
    if not points:
        raise ValueError(
            f"No run has a WER on the split {split!r}; the splits found are "
            f"{ordered_splits(runs)}."
        )
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for method in sorted({str(run.method) for run, _ in points}):
        chosen = [(r, label) for r, label in points if str(r.method) == method]
        axes.scatter(
            [float(r.summary["compression_ratio"]) for r, _ in chosen],
            [float(r.summary["wer"][split]) for r, _ in chosen],
            label=method,
            s=40,
            zorder=3,
        )
    for run, label in points:
        axes.annotate(
            label,
            (
                float(run.summary["compression_ratio"]),
                float(run.summary["wer"][split]),
            ),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    axes.set_xlabel("compression ratio (total / nonzero parameters)")
    axes.set_ylabel(f"WER on {split} (%)")
    axes.set_title(f"WER vs compression ratio ({split})")
    axes.grid(True, alpha=0.3)
    axes.legend(title="method", fontsize=8)
    return _save_figure(figure, out_png)


def _short_layer_names(names):
    """Drops the dotted prefix that all layer names share."""
    split_names = [name.split(".") for name in names]
    common = 0
    shortest = min((len(parts) for parts in split_names), default=0)
    while (
        common < shortest - 1
        and len({parts[common] for parts in split_names}) == 1
    ):
        common += 1
    return [".".join(parts[common:]) for parts in split_names]


def plot_layer_sparsity(run, out_png):
    """Bar chart of the sparsity of each gated layer of an SPG or UMP run.

    The target sparsity of the gated layers
    (``summary["sparsity"]["gated_target"]``, else ``"target_sparsity"``)
    is drawn as a horizontal line, and the achieved sparsity over all gated
    layers as a dotted one.

    Arguments
    ---------
    run : Run
        A gated run (its summary has ``sparsity.layers``).
    out_png : str or os.PathLike
        The PNG file to write (its folder is created).

    Returns
    -------
    str
        ``out_png``.

    Raises
    ------
    ValueError
        If the summary has no per-layer sparsity (a dense run).

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _write_demo_run(folder, method="spg", errors=3)
    ...     path = os.path.join(folder, "layers.png")
    ...     path = plot_layer_sparsity(load_run(folder), path)
    ...     os.path.getsize(path) > 1000
    True
    """
    sparsity = run.summary.get("sparsity") or {}
    layers = sparsity.get("layers") or []
    if not layers:
        raise ValueError(
            f"{os.path.join(run.path, SUMMARY_FILE)} has no per-layer "
            'sparsity ("sparsity": {"layers": [...]}); only gated runs '
            "(spg, ump) have one."
        )
    names = _short_layer_names([str(layer["name"]) for layer in layers])
    values = [float(layer["sparsity"]) for layer in layers]
    figure = Figure(figsize=(max(6.0, 0.22 * len(layers) + 2), 4.5))
    axes = figure.subplots()
    positions = list(range(len(layers)))
    axes.bar(positions, values, color="tab:blue", label="layer sparsity")
    target = sparsity.get("gated_target", sparsity.get("target_sparsity"))
    if target is not None:
        axes.axhline(
            float(target), color="tab:red", label=f"target {float(target):.3f}"
        )
    achieved = sparsity.get("hard_sparsity")
    if achieved is not None:
        axes.axhline(
            float(achieved),
            color="black",
            linestyle=":",
            label=f"gated layers {float(achieved):.3f}",
        )
    axes.set_xticks(positions)
    axes.set_xticklabels(names, rotation=90, fontsize=6)
    axes.set_xlim(-0.7, len(layers) - 0.3)
    axes.set_ylim(0, 1)
    axes.set_ylabel("sparsity (fraction of zero weights)")
    axes.set_title(f"Sparsity per gated layer: {run.name}")
    axes.legend(fontsize=8, loc="lower right")
    return _save_figure(figure, out_png)


def _series(records, x_key, y_key):
    """The ``(x, y)`` lists of the records that hold both keys."""
    xs, ys = [], []
    for record in records:
        x, y = record.get(x_key), record.get(y_key)
        if x is None or y is None:
            continue
        xs.append(float(x))
        ys.append(float(y))
    return xs, ys


def _plot_curves(axes, records, x_key, keys):
    """Draws one line per key present in the records; returns the lines."""
    lines = []
    for key, style in keys:
        xs, ys = _series(records, x_key, key)
        if xs:
            lines += axes.plot(xs, ys, style, label=key, marker=".")
    return lines


def plot_training(run, out_png):
    """Plots sparsity and losses during training.

    The top panel shows the hard and soft sparsity and the (annealed)
    target, the bottom one the task loss (left axis) and the sparsity loss
    (right axis), all against the optimiser step of ``summary["trace"]``.
    When the trace is empty, the per-epoch ``summary["history"]`` is used
    instead (train and dev loss as task losses).

    Arguments
    ---------
    run : Run
        Any run with a trace or a history.
    out_png : str or os.PathLike
        The PNG file to write (its folder is created).

    Returns
    -------
    str
        ``out_png``.

    Raises
    ------
    ValueError
        If the summary has neither a trace nor a history.

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _write_demo_run(folder, method="spg", errors=3)
    ...     path = os.path.join(folder, "training.png")
    ...     path = plot_training(load_run(folder), path)
    ...     os.path.getsize(path) > 1000
    True
    """
    trace = run.summary.get("trace") or []
    history = run.summary.get("history") or []
    if trace:
        records, x_key, x_label = trace, "step", "optimiser step"
        losses = [("task_loss", "-")]
    elif history:
        records, x_key, x_label = history, "epoch", "epoch"
        losses = [("train_loss", "-"), ("dev_loss", "--")]
    else:
        raise ValueError(
            f"{os.path.join(run.path, SUMMARY_FILE)} has neither a training "
            'trace ("trace") nor a per-epoch history ("history") to plot.'
        )
    figure = Figure(figsize=(7, 6.5))
    top, bottom = figure.subplots(2, 1, sharex=True)
    sparsity_keys = [
        ("hard_sparsity", "-"),
        ("soft_sparsity", "--"),
        ("target", ":"),
    ]
    if _plot_curves(top, records, x_key, sparsity_keys):
        top.legend(fontsize=8)
    else:
        top.text(
            0.5,
            0.5,
            "no sparsity recorded",
            ha="center",
            transform=top.transAxes,
        )
    top.set_ylabel("sparsity")
    top.set_title(f"Training: {run.name} ({'trace' if trace else 'history'})")
    top.grid(True, alpha=0.3)
    lines = _plot_curves(bottom, records, x_key, losses)
    bottom.set_ylabel("task loss")
    if _series(records, x_key, "sparsity_loss")[0]:
        right = bottom.twinx()
        lines += _plot_curves(right, records, x_key, [("sparsity_loss", "C3-")])
        right.set_ylabel("sparsity loss")
    if lines:
        bottom.legend(lines, [line.get_label() for line in lines], fontsize=8)
    bottom.set_xlabel(x_label)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    return _save_figure(figure, out_png)


def file_stem(name):
    """Turns a system name into a safe piece of a file name.

    Arguments
    ---------
    name : str
        The system name.

    Returns
    -------
    str
        The name with every run of characters other than letters, digits,
        ``.``, ``_`` and ``-`` replaced by ``_``.

    Example
    -------
    >>> file_stem("spg 0.65 (run/2)")
    'spg_0.65_run_2'
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return stem or "run"


def choose_baseline(runs):
    """The default baseline: the first dense run, else the first run.

    Arguments
    ---------
    runs : list of Run
        The runs, at least one.

    Returns
    -------
    Run
        The baseline.

    Example
    -------
    >>> runs = [Run("a", {"method": "spg"}, {}), Run("b", {"method": "dense"}, {})]
    >>> choose_baseline(runs).path
    'b'
    """
    for run in runs:
        if run.method == "dense":
            return run
    return runs[0]


def _parse_args(argv):
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.evaluation.compare",
        description=(
            "Compare recipe runs against a baseline: parameters, compression "
            "ratio, WER, WER change and its MAPSSWE significance, plus plots."
        ),
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="output folder of a recipe run (holds summary.json)",
    )
    parser.add_argument(
        "--baseline",
        metavar="RUN_DIR",
        help="the reference run (default: the dense run, else the first)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for comparison.md and the plots (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance level of the two-sided MAPSSWE (default: 0.05)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must lie in (0, 1), got {args.alpha}.")
    return parser, args


def _load_runs(args):
    """Loads the runs and the baseline named on the command line."""
    runs = [load_run(run_dir) for run_dir in args.run_dirs]
    if args.baseline is None:
        return runs, choose_baseline(runs)
    baseline = load_run(args.baseline)
    for run in runs:
        if _same_folder(run, baseline):
            return runs, run
    return runs, baseline


def _markdown_document(table, command, baseline_row, alpha, images):
    """The text of ``comparison.md``."""
    lines = [
        "# Comparison of compressed runs",
        "",
        f"Command: `{command}`",
        "",
        f"Baseline: {baseline_row.system} (`{baseline_row.path}`). "
        f"Significance: two-sided MAPSSWE against the baseline on the "
        f"per-utterance hypotheses, alpha = {alpha:g}.",
        "",
        table,
        "",
        "ΔWER is the WER minus the baseline's WER, in absolute percentage "
        "points (positive: the system makes more errors). Ratio is total / "
        "nonzero parameters of the SSL model; wall time covers training and "
        "compression.",
        "",
    ]
    lines += [f"![{os.path.splitext(image)[0]}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def _write_plots(runs, names, splits, out):
    """Writes every plot that the runs support; returns the paths."""
    written = []
    for split in splits:
        path = os.path.join(out, f"wer_vs_ratio_{file_stem(split)}.png")
        written.append(plot_wer_vs_ratio(runs, path, split, labels=names))
    stems = _unique([file_stem(name) for name in names])
    for run, stem in zip(runs, stems):
        if (run.summary.get("sparsity") or {}).get("layers"):
            path = os.path.join(out, f"layer_sparsity_{stem}.png")
            written.append(plot_layer_sparsity(run, path))
    for run, stem in zip(runs, stems):
        if run.summary.get("trace") or run.summary.get("history"):
            path = os.path.join(out, f"training_{stem}.png")
            written.append(plot_training(run, path))
    return written


def main(argv=None):
    """Command line entry point: compares runs and writes the report.

    Writes ``<out>/comparison.md`` (the command, the baseline, alpha and the
    table), ``wer_vs_ratio_<split>.png`` for each split,
    ``layer_sparsity_<system>.png`` for each gated run and
    ``training_<system>.png`` for each run with a trace or history; prints
    the table and the written paths. A missing or malformed input stops the
    program with exit status 2 and a message naming the file.

    Arguments
    ---------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    list of str
        The written files, ``comparison.md`` first.

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     dense, spg = os.path.join(folder, "d"), os.path.join(folder, "s")
    ...     _write_demo_run(dense, method="dense", errors=1)
    ...     _write_demo_run(spg, method="spg", errors=2, ratio=2.5)
    ...     out = os.path.join(folder, "cmp")
    ...     written = main([spg, dense, "--out", out])  # doctest: +ELLIPSIS
    | System | Method | ...
    ...
    >>> [os.path.basename(path) for path in written]
    ['comparison.md', 'wer_vs_ratio_test.png', 'layer_sparsity_spg.png', 'training_spg.png']
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = _parse_args(argv)
    try:
        runs, baseline = _load_runs(args)
        rows = compare_runs(runs, baseline, alpha=args.alpha)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    ordered = [baseline, *(r for r in runs if not _same_folder(r, baseline))]
    splits = ordered_splits(ordered)
    table = markdown_table(rows, splits)
    os.makedirs(args.out, exist_ok=True)
    images = _write_plots(
        ordered, [row.system for row in rows], splits, args.out
    )
    report = os.path.join(args.out, "comparison.md")
    command = "python -m speechbrain_spg.evaluation.compare " + shlex.join(argv)
    document = _markdown_document(
        table,
        command,
        rows[0],
        args.alpha,
        [os.path.relpath(image, args.out) for image in images],
    )
    with open(report, "w", encoding="utf-8") as f:
        f.write(document)
    written = [report, *images]
    print(table)
    print()
    for path in written:
        print(f"Wrote {path}")
    return written


def _write_demo_run(run_dir, method, errors, ratio=1.0, num_utterances=20):
    """Writes a tiny run folder (split ``test``) for the examples.

    Utterance ``u<k>`` has the reference ``w<k>_0 ... w<k>_5``; the first
    ``errors`` utterances get one substituted word. Gated methods get a
    per-layer sparsity report and a training trace.
    """
    os.makedirs(run_dir, exist_ok=True)
    with open(hypotheses_file(run_dir, "test"), "w", encoding="utf-8") as f:
        for k in range(num_utterances):
            ref = [f"w{k}_{i}" for i in range(6)]
            hyp = ["oops", *ref[1:]] if k < errors else ref
            record = {"id": f"u{k:03d}", "ref": " ".join(ref)}
            f.write(json.dumps({**record, "hyp": " ".join(hyp)}) + "\n")
    total = 1_000_000
    summary = {
        "method": method,
        "system": method,
        "params": {"total": total, "nonzero": round(total / ratio)},
        "compression_ratio": ratio,
        "wer": {"test": 100 * errors / (6 * num_utterances)},
        "wall_time_s": 12.5,
        "history": [],
        "trace": [],
    }
    if method != "dense":
        summary["sparsity"] = {
            "gated_target": 1 - 1 / ratio,
            "hard_sparsity": 1 - 1 / ratio,
            "layers": [
                {
                    "name": f"encoder.layers.{i}.fc",
                    "sparsity": 0.5,
                    "threshold": 0.01,
                }
                for i in range(4)
            ],
        }
        summary["trace"] = [
            {
                "step": step,
                "task_loss": 50.0 / step,
                "sparsity_loss": 0.01,
                "hard_sparsity": 0.05 * step,
                "soft_sparsity": 0.05 * step,
                "target": 0.06 * step,
            }
            for step in range(1, 6)
        ]
    with open(os.path.join(run_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
