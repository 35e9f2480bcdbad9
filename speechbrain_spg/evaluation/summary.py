"""The end of a compression run: prune, export, evaluate the export, report.

Whatever the recipe, an SPG run ends the same way. The gates are turned into
fixed masks (``hard_prune``), the encoder is exported as a compact model and
loaded back from disk, so that every reported error rate is the one of the
files a user gets; each test split's scores and hypotheses are written next
to the export; and ``summary.json`` records what was compressed, how much
and how well (``compare`` reads it), with ``summary.txt`` holding the table
printed at the end. The functions here are those steps:

* ``prune_and_export`` and ``load_export``: hard pruning, export, reload;
* ``params_summary`` and ``gather_from_ranks``: what the summary counts;
* ``evaluate_splits`` and ``write_split_results``: error rates per split,
  ``wer_<split>.txt`` and ``hyps_<split>.jsonl``;
* ``format_table`` and ``write_summary``: the summary files and table.

Authors
 * speechbrain-spg developers 2026
"""

import json
import os

import torch
from speechbrain.utils.distributed import if_main_process, run_on_main
from speechbrain.utils.logger import get_logger

from speechbrain_spg.evaluation.compare import SUMMARY_FILE
from speechbrain_spg.export import CompactWav2Vec2, export_compact

logger = get_logger(__name__)

TABLE_FILE = "summary.txt"


def params_summary(module):
    """Total and nonzero parameter counts of a model.

    Arguments
    ---------
    module : torch.nn.Module
        The (SSL) model.

    Returns
    -------
    dict
        ``{"total": int, "nonzero": int}``.

    Example
    -------
    >>> layer = torch.nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight[0].zero_()
    >>> params_summary(layer)
    {'total': 10, 'nonzero': 6}
    """
    params = list(module.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "nonzero": int(sum(int((p != 0).sum()) for p in params)),
    }


def gather_from_ranks(value):
    """``value`` from every process, in rank order ([value] without DDP).

    The hard sparsity is recorded for every rank: DDP keeps weights and
    thresholds identical, so the values must agree, and a warning says so
    when they do not.

    Arguments
    ---------
    value : object
        A picklable value of this process.

    Returns
    -------
    list
        One value per process.

    Example
    -------
    >>> gather_from_ranks(0.65)
    [0.65]
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        logger.warning("The processes disagree on a value: %s", values)
    return values


def prune_and_export(lobe, folder, calibrate=False, write=None):
    """Hard-prunes an SPG lobe and exports it as a compact model.

    The export is written by the main process (over a previous one, which
    a restarted run finds there); the sparsity figures are those every
    process computed.

    Arguments
    ---------
    lobe : speechbrain_spg.lobes.SPGLobeMixin
        The trained lobe; pruned in place.
    folder : str or os.PathLike
        The export folder (see ``speechbrain_spg.export.export_compact``).
    calibrate : bool
        Scale all thresholds by one factor so that the hard sparsity is the
        target exactly (see ``hard_prune``).
    write : callable, optional
        ``write(lobe, folder)`` writes the export (default: the compact model
        alone; ``tools.inference.recipe_folder_writer``: an inference folder).

    Returns
    -------
    dict
        The ``sparsity`` part of ``summary.json``: targets, the hard
        sparsity after pruning and where training left it, per rank, of
        the whole model, the calibration factor and every layer's sparsity
        and threshold.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(
    ...     tiny_model_folder("wav2vec2"), save_path="", target_sparsity=0.5
    ... )
    >>> folder = os.path.join(tempfile.mkdtemp(), "compact")
    >>> sparsity = prune_and_export(lobe, folder, calibrate=True)
    >>> lobe.is_pruned, round(sparsity["hard_sparsity"], 2)
    (True, 0.5)
    >>> len(sparsity["layers"]), sorted(os.listdir(folder))[-1]
    (12, 'spg_manifest.json')
    """
    trained = lobe.hard_sparsity()
    report = lobe.hard_prune(calibrate=calibrate)
    if write is None:
        run_on_main(
            export_compact, args=[lobe, folder], kwargs={"overwrite": True}
        )
    else:
        run_on_main(write, args=[lobe, folder])
    return {
        "target_sparsity": lobe.spg_options.target_sparsity,
        "target_scope": lobe.spg_options.target_scope,
        "gated_target": lobe.gated_target,
        "hard_sparsity": report.hard,
        # Where training left it, before any calibration.
        "hard_sparsity_trained": trained,
        "hard_sparsity_per_rank": gather_from_ranks(report.hard),
        "model_sparsity": report.model_sparsity,
        "calibration_factor": getattr(lobe, "calibration_factor", None),
        "calibration_offset": getattr(lobe, "calibration_offset", None),
        "layers": [
            {
                "name": layer.name,
                "sparsity": layer.hard,
                "threshold": layer.threshold,
            }
            for layer in report.layers
        ],
    }


def load_export(folder, lobe, device="cpu"):
    """The compact export loaded back, as a frozen lobe in place of ``lobe``.

    Arguments
    ---------
    folder : str or os.PathLike
        The folder ``prune_and_export`` wrote.
    lobe : speechbrain_spg.lobes.SPGLobeMixin
        The lobe it was exported from (for ``output_norm``).
    device : str or torch.device
        Where the loaded model goes.

    Returns
    -------
    speechbrain_spg.export.CompactWav2Vec2
        The export, with the checksums of its files verified.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> folder = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = prune_and_export(lobe, folder)
    >>> exported = load_export(folder, lobe)
    >>> wav = torch.randn(1, 4000)
    >>> torch.allclose(exported(wav), lobe.eval()(wav), atol=1e-5)
    True
    """
    return CompactWav2Vec2(
        str(folder), output_norm=lobe.output_norm, freeze=True
    ).to(device)


def write_split_results(out_dir, split, wer_metric, hypotheses):
    """Writes the scores and hypotheses of one evaluated split.

    ``wer_<split>.txt`` holds SpeechBrain's error-rate report;
    ``hyps_<split>.jsonl`` one ``{"id", "ref", "hyp"}`` line per utterance,
    sorted by ID (what ``compare`` tests significance on). Written by the
    main process.

    Arguments
    ---------
    out_dir : str or os.PathLike
        Output folder (created if needed).
    split : str
        The split's name.
    wer_metric : speechbrain.utils.metric_stats.ErrorRateStats
        The word error rate statistics of the split.
    hypotheses : list of dict
        ``{"id": str, "ref": str, "hyp": str}`` per utterance.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.metric_stats import ErrorRateStats
    >>> wer = ErrorRateStats()
    >>> wer.append(["u1"], [["A", "CAT"]], [["A", "HAT"]])
    >>> out = tempfile.mkdtemp()
    >>> rows = [{"id": "u1", "ref": "A HAT", "hyp": "A CAT"}]
    >>> write_split_results(out, "test-clean", wer, rows)
    >>> sorted(os.listdir(out))
    ['hyps_test-clean.jsonl', 'wer_test-clean.txt']
    >>> open(os.path.join(out, "hyps_test-clean.jsonl")).read()
    '{"id": "u1", "ref": "A HAT", "hyp": "A CAT"}\\n'
    """
    if not if_main_process():
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"wer_{split}.txt"), "w") as f:
        wer_metric.write_stats(f)
    with open(os.path.join(out_dir, f"hyps_{split}.jsonl"), "w") as f:
        for row in sorted(hypotheses, key=lambda r: r["id"]):
            f.write(json.dumps(row) + "\n")


def evaluate_splits(evaluate, test_sets, out_dir):
    """WER and CER of every test split, in the order given.

    Arguments
    ---------
    evaluate : callable
        ``evaluate(name, dataset, out_dir)`` evaluates one split, writes its
        files (``write_split_results``) and returns ``{"WER": float,
        "CER": float}``, e.g. a ``Brain`` method.
    test_sets : dict
        Split name -> dataset.
    out_dir : str or os.PathLike
        Where ``evaluate`` writes.

    Returns
    -------
    dict
        ``{"wer": {split: percent}, "cer": {split: percent}}``, as
        ``summary.json`` holds them.

    Example
    -------
    >>> def evaluate(name, dataset, out_dir):
    ...     return {"WER": 10.0 * len(dataset), "CER": 1.0 * len(dataset)}
    >>> sets = {"test-clean": [1, 2], "test-other": [3]}
    >>> evaluate_splits(evaluate, sets, "out")
    {'wer': {'test-clean': 20.0, 'test-other': 10.0}, 'cer': {'test-clean': 2.0, 'test-other': 1.0}}
    """
    rates = {"wer": {}, "cer": {}}
    for name, dataset in test_sets.items():
        result = evaluate(name, dataset, out_dir)
        rates["wer"][name], rates["cer"][name] = result["WER"], result["CER"]
    return rates


def _system_row(name, params, ratio, wer, cer, splits):
    """One row of the table: parameter counts, ratio, WER/CER per split."""
    return (
        name,
        str(params["total"]),
        str(params["nonzero"]),
        ratio,
        *(f"{wer[s]:.2f}/{cer[s]:.2f}" for s in splits),
    )


def format_table(summary):
    """Dense start vs compressed model, as a plain-text table.

    Arguments
    ---------
    summary : dict
        The contents of ``summary.json`` (``method``, ``params``,
        ``compression_ratio``, ``wer``, ``cer``, ``wall_time_s``; optionally
        ``dense_reference`` and ``sparsity``).

    Returns
    -------
    str
        The table, a note on its columns, the hard sparsity against its
        target (gated runs) and the compression wall time.

    Example
    -------
    >>> summary = {
    ...     "method": "spg",
    ...     "params": {"total": 100, "nonzero": 40},
    ...     "compression_ratio": 2.5,
    ...     "wer": {"test-clean": 12.345},
    ...     "cer": {"test-clean": 4.5},
    ...     "wall_time_s": 61.23,
    ... }
    >>> print(format_table(summary))
    system  params  nonzero  ratio  test-clean
    ------------------------------------------
    spg     100     40       2.50   12.35/4.50
    (test columns: WER/CER in %)
    compression wall time: 61.2 s
    """
    splits = list(summary["wer"])
    rows = [("system", "params", "nonzero", "ratio", *splits)]
    dense = summary.get("dense_reference")
    if dense:
        rows.append(
            _system_row(
                "dense (start)",
                dense["params"],
                "1.00",
                dense["wer"],
                dense["cer"],
                splits,
            )
        )
    rows.append(
        _system_row(
            summary["method"],
            summary["params"],
            f"{summary['compression_ratio']:.2f}",
            summary["wer"],
            summary["cer"],
            splits,
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    text = "\n".join(lines)
    text += "\n(test columns: WER/CER in %)"
    if "hard_sparsity" in summary.get("sparsity", {}):
        text += (
            f"\nhard sparsity of gated weights: "
            f"{summary['sparsity']['hard_sparsity']:.4f} (target "
            f"{summary['sparsity']['gated_target']:.4f})"
        )
    text += f"\ncompression wall time: {summary['wall_time_s']:.1f} s"
    return text


def write_summary(out_dir, summary):
    """Writes ``summary.json`` and ``summary.txt``; prints the table.

    Only the main process writes and prints.

    Arguments
    ---------
    out_dir : str or os.PathLike
        The run's output folder.
    summary : dict
        What ``format_table`` reads, and anything else JSON can hold.

    Returns
    -------
    str or None
        The table (None on other processes).

    Example
    -------
    >>> import tempfile
    >>> summary = {
    ...     "method": "dense",
    ...     "params": {"total": 10, "nonzero": 10},
    ...     "compression_ratio": 1.0,
    ...     "wer": {"dev": 20.0},
    ...     "cer": {"dev": 8.0},
    ...     "wall_time_s": 3.0,
    ... }
    >>> out = tempfile.mkdtemp()
    >>> table = write_summary(out, summary)  # doctest: +ELLIPSIS
    system  params  nonzero  ratio  dev...
    >>> sorted(os.listdir(out))
    ['summary.json', 'summary.txt']
    >>> json.load(open(os.path.join(out, "summary.json"))) == summary
    True
    """
    if not if_main_process():
        return None
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    table = format_table(summary)
    print(table)
    with open(os.path.join(out_dir, TABLE_FILE), "w") as f:
        f.write(table + "\n")
    return table
