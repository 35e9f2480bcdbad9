"""Where a compression run stands: the training trace and its history.

A recipe that trains SPG gates records, every few steps, a point of the
training trace (losses, hard and soft sparsity, the scheduled target) and,
after every epoch, one row of history (losses, error rates, sparsity, the
compression clock). ``summary.json`` keeps both, ``compare`` plots them, and
a TensorBoard logger chosen as the recipe's ``train_logger`` shows the trace
as it is written. The functions here are those pieces, for any recipe built
on SpeechBrain's ``Brain``:

* ``trace_point`` and ``epoch_sparsity`` read the numbers off an SPG lobe;
* ``log_trace_point`` and ``log_test_stats`` send them to a train logger
  (TensorBoard needs numbers: the test split goes into the statistic's name);
* ``read_history``, ``save_history`` and ``history_clock`` keep the per-epoch
  rows in ``history.json`` across restarts.

Authors
 * speechbrain-spg developers 2026
"""

import json
import os

import torch
from speechbrain.utils.distributed import if_main_process
from speechbrain.utils.train_logger import TensorboardLogger

#: File, in the checkpoint folder, with one row per finished epoch.
HISTORY_FILE = "history.json"


def trace_point(lobe, step, task_loss, sparsity_loss=0.0):
    """One point of the training trace of an SPG lobe.

    Arguments
    ---------
    lobe : speechbrain_spg.lobes.SPGLobeMixin
        The gated SSL lobe being trained.
    step : int
        Optimiser steps so far (the x axis of the trace).
    task_loss : float or torch.Tensor
        The last task loss (CTC, or CTC + attention).
    sparsity_loss : float or torch.Tensor
        The last sparsity loss (0 while the recipe adds none).

    Returns
    -------
    dict
        ``step``, ``task_loss``, ``sparsity_loss``, ``hard_sparsity``,
        ``soft_sparsity`` and ``target`` (the scheduled sparsity at the
        gate's step), plain Python numbers.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> point = trace_point(lobe, 10, torch.tensor(2.5))
    >>> list(point)
    ['step', 'task_loss', 'sparsity_loss', 'hard_sparsity', 'soft_sparsity', 'target']
    >>> point["step"], point["task_loss"], point["sparsity_loss"]
    (10, 2.5, 0.0)
    """
    point = {
        "step": int(step),
        "task_loss": float(task_loss),
        "sparsity_loss": float(sparsity_loss),
        "hard_sparsity": lobe.hard_sparsity(),
    }
    with torch.no_grad():
        point["soft_sparsity"] = float(lobe.soft_sparsity())
    point["target"] = lobe.regularizer.target_at(lobe.gate.step_count)
    return point


def epoch_sparsity(lobe):
    """The sparsity statistics logged after each epoch.

    Arguments
    ---------
    lobe : speechbrain_spg.lobes.SPGLobeMixin
        The gated SSL lobe being trained.

    Returns
    -------
    stats : dict
        ``hard_sparsity``, ``soft_sparsity`` and ``target``, rounded to
        5 decimals (they go into the train log).
    report : speechbrain_spg.sparsity.SparsityReport
        The per-layer report they come from (for the log).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> stats, report = epoch_sparsity(lobe)
    >>> sorted(stats), stats["hard_sparsity"] == round(report.hard, 5)
    (['hard_sparsity', 'soft_sparsity', 'target'], True)
    """
    report = lobe.sparsity_report()
    stats = {
        "hard_sparsity": round(report.hard, 5),
        "soft_sparsity": round(report.soft, 5),
        "target": round(lobe.regularizer.target_at(lobe.gate.step_count), 5),
    }
    return stats, report


def _tensorboard_writer(train_logger):
    """The ``SummaryWriter`` of a TensorBoard logger (None elsewhere)."""
    if isinstance(train_logger, TensorboardLogger):
        return train_logger.writer  # None on processes other than the main
    return None


def log_trace_point(train_logger, point):
    """Sends a trace point to a TensorBoard train logger, at its step.

    SpeechBrain's ``TensorboardLogger.log_stats`` numbers the values it
    receives by call; the trace is plotted against the optimiser step
    instead, as ``trace/<name>``. Other loggers write per-epoch lines only:
    they get nothing here (the trace is in ``summary.json``).

    Arguments
    ---------
    train_logger : speechbrain.utils.train_logger.TrainLogger
        The recipe's ``train_logger``.
    point : dict
        A point of ``trace_point`` (``step`` and numbers).

    Returns
    -------
    bool
        Whether the point was written.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.train_logger import FileTrainLogger
    >>> folder = tempfile.mkdtemp()
    >>> point = {"step": 3, "task_loss": 2.5, "hard_sparsity": 0.25}
    >>> log_trace_point(TensorboardLogger(folder), point)
    True
    >>> log_trace_point(FileTrainLogger(folder + "/log.txt"), point)
    False
    """
    writer = _tensorboard_writer(train_logger)
    if writer is None:
        return False
    for name, value in point.items():
        if name != "step":
            writer.add_scalar(f"trace/{name}", value, point["step"])
    writer.flush()
    return True


def log_test_stats(train_logger, split, stats):
    """Logs the statistics of one test split.

    Text loggers get the split as a ``split`` field of the line; TensorBoard
    plots numbers only, so there the split goes into the statistic's name
    (``WER_test-clean/test``).

    Arguments
    ---------
    train_logger : speechbrain.utils.train_logger.TrainLogger
        The recipe's ``train_logger``.
    split : str
        The test split's name.
    stats : dict
        Statistic name -> number (loss, WER, CER).

    Example
    -------
    >>> import os, tempfile
    >>> from speechbrain.utils.train_logger import FileTrainLogger
    >>> path = os.path.join(tempfile.mkdtemp(), "log.txt")
    >>> log_test_stats(FileTrainLogger(path), "test-clean", {"WER": 12.5})
    >>> print(open(path).read().strip())
    split: test-clean - test WER: 12.50
    """
    if isinstance(train_logger, TensorboardLogger):
        named = {f"{name}_{split}": value for name, value in stats.items()}
        train_logger.log_stats(stats_meta={}, test_stats=named)
    else:
        train_logger.log_stats(stats_meta={"split": split}, test_stats=stats)


def read_history(folder):
    """The rows of ``history.json`` in ``folder`` ([] before any epoch).

    Arguments
    ---------
    folder : str or os.PathLike
        The run's checkpoint folder.

    Returns
    -------
    list of dict
        One row per finished epoch.

    Example
    -------
    >>> import tempfile
    >>> read_history(tempfile.mkdtemp())
    []
    """
    path = os.path.join(folder, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_history(folder, rows):
    """Merges this process's rows into ``history.json``; returns them all.

    Called after every epoch, so that a run killed later keeps the rows of
    the epochs it finished; after a restart the file holds the epochs of
    the runs before. A row replaces the saved one of the same epoch. Only
    the main process reads and writes the file (the others return
    ``rows``).

    Arguments
    ---------
    folder : str or os.PathLike
        The run's checkpoint folder.
    rows : list of dict
        This run's rows, each with an ``epoch``.

    Returns
    -------
    list of dict
        Every row, those of earlier runs first.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> save_history(folder, [{"epoch": 1, "dev_WER": 40.0}])
    [{'epoch': 1, 'dev_WER': 40.0}]
    >>> save_history(folder, [{"epoch": 2, "dev_WER": 30.0}])
    [{'epoch': 1, 'dev_WER': 40.0}, {'epoch': 2, 'dev_WER': 30.0}]
    """
    if not if_main_process():
        return rows
    seen = {row["epoch"] for row in rows}
    merged = [r for r in read_history(folder) if r["epoch"] not in seen]
    merged += rows
    with open(os.path.join(folder, HISTORY_FILE), "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
    return merged


def history_clock(folder, up_to_epoch=None):
    """The compression clock of the last epoch in ``history.json``.

    A checkpoint written before the clock itself was checkpointed resumes
    from here.

    Arguments
    ---------
    folder : str or os.PathLike
        The run's checkpoint folder.
    up_to_epoch : int, optional
        Only epochs up to this one count (the checkpoint's epoch).

    Returns
    -------
    float
        ``elapsed_s`` of that epoch; 0 without a history or a clock.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> history_clock(folder)
    0.0
    >>> rows = [{"epoch": 1, "elapsed_s": 100.0}, {"epoch": 2, "elapsed_s": 210.5}]
    >>> _ = save_history(folder, rows)
    >>> history_clock(folder), history_clock(folder, up_to_epoch=1)
    (210.5, 100.0)
    """
    rows = read_history(folder)
    last = up_to_epoch if up_to_epoch is not None else float("inf")
    clocks = [r.get("elapsed_s", 0.0) for r in rows if r["epoch"] <= last]
    return max(clocks, default=0.0)
