"""Extra recoverables so that a resumed run continues exactly where it stopped.

SpeechBrain's ``Checkpointer`` saves modules, optimisers, schedulers and the
position in the data loader. Two things a compression run also needs are
added here: the random number generators (dropout masks and augmentation
after a restart are then the ones an uninterrupted run would have drawn) and
the training trace (the sparsity / loss curve the plots are drawn from).
``CheckpointComplete`` marks a checkpoint saved to the end, so that a run
killed while saving resumes from the one before it.

Authors
 * speechbrain-spg developers 2026
"""

import functools
import json
import random
import time

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import (
    if_main_process,
    is_distributed_initialized,
)


def _rank_and_world_size():
    """``(rank, world size)`` of this process; ``(0, 1)`` without DDP."""
    if is_distributed_initialized():
        dist = torch.distributed
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@functools.partial(register_checkpoint_hooks, save_on_main_only=False)
class RandomState:
    """Saves and restores the torch, CUDA, numpy and Python RNG states.

    Add it to a ``Checkpointer``'s recoverables (``!new:`` in YAML). Under
    DDP every process calls ``save`` (registered with
    ``save_on_main_only=False``, so the gather in it runs on every rank):
    the states of all processes are gathered and the main process writes
    them, and each process restores its own (rank ``r`` takes state ``r``,
    or the main one's if the run was saved with fewer processes).

    Example
    -------
    >>> import tempfile, os
    >>> state = RandomState()
    >>> path = os.path.join(tempfile.mkdtemp(), "rng.ckpt")
    >>> state.save(path)
    >>> first = torch.rand(3)
    >>> state.load(path)
    >>> torch.equal(torch.rand(3), first)
    True
    """

    @mark_as_saver
    def save(self, path):
        """Writes the generator states to ``path``.

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        state = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        states = [state]
        _, world_size = _rank_and_world_size()
        if world_size > 1:
            states = [None] * world_size
            torch.distributed.all_gather_object(states, state)
        if if_main_process():
            torch.save({"ranks": states}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Restores the generator states from ``path``.

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """
        saved = torch.load(path, weights_only=False)
        states = saved["ranks"] if "ranks" in saved else [saved]
        rank, _ = _rank_and_world_size()
        state = states[rank] if rank < len(states) else states[0]
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _save_json_on_main(path, value):
    """Writes ``value`` as JSON, on the main process only (under DDP every
    process holds the same value and reads the one file back)."""
    if if_main_process():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f)


def _load_json(path):
    """Reads a JSON checkpoint file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@register_checkpoint_hooks
class TrainingTrace:
    """A list of JSON-serialisable records that survives restarts.

    Under DDP only the main process writes the file (its records are the
    ones the recipe reports); every process reads it back.

    Example
    -------
    >>> import tempfile, os
    >>> trace = TrainingTrace()
    >>> trace.append({"step": 10, "hard_sparsity": 0.3})
    >>> path = os.path.join(tempfile.mkdtemp(), "trace.ckpt")
    >>> trace.save(path)
    >>> restored = TrainingTrace()
    >>> restored.load(path)
    >>> restored.records
    [{'step': 10, 'hard_sparsity': 0.3}]
    """

    def __init__(self):
        self.records = []

    def append(self, record):
        """Adds one record.

        Arguments
        ---------
        record : dict
            JSON-serialisable values.
        """
        self.records.append(record)

    @mark_as_saver
    def save(self, path):
        """Writes the records as JSON.

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        _save_json_on_main(path, self.records)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Reads the records back.

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """
        self.records = _load_json(path)


@register_checkpoint_hooks
class Counter:
    """An integer that survives restarts (e.g. batches skipped so far).

    Arguments
    ---------
    value : int
        The starting value.

    Example
    -------
    >>> import tempfile, os
    >>> skipped = Counter()
    >>> skipped.value += 2
    >>> path = os.path.join(tempfile.mkdtemp(), "skipped.ckpt")
    >>> skipped.save(path)
    >>> restored = Counter()
    >>> restored.load(path)
    >>> restored.value
    2
    """

    def __init__(self, value=0):
        self.value = value

    @mark_as_saver
    def save(self, path):
        """Writes the value as JSON.

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        _save_json_on_main(path, {"value": self.value})

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Reads the value back.

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """
        self.value = int(_load_json(path)["value"])


@register_checkpoint_hooks
class Stopwatch:
    """Seconds of work that survive restarts.

    Counts from its creation; a checkpoint stores the seconds counted so
    far, and loading it continues from there (the time between that
    checkpoint and an interruption is work lost, not counted).

    Example
    -------
    >>> import tempfile, os
    >>> watch = Stopwatch()
    >>> path = os.path.join(tempfile.mkdtemp(), "clock.ckpt")
    >>> watch.save(path)
    >>> restarted = Stopwatch()
    >>> restarted.load(path)
    >>> restarted.elapsed() >= restarted.offset >= 0
    True
    """

    def __init__(self):
        self.offset = 0.0
        self.start = time.monotonic()

    def elapsed(self):
        """Seconds counted so far (this process and those before it).

        Returns
        -------
        float
            The seconds.
        """
        return self.offset + time.monotonic() - self.start

    @mark_as_saver
    def save(self, path):
        """Writes the seconds counted so far.

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        _save_json_on_main(path, {"elapsed_s": self.elapsed()})

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Continues from the seconds of a checkpoint.

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """
        self.offset = float(_load_json(path)["elapsed_s"])
        self.start = time.monotonic()


#: Name under which the recipe adds ``CheckpointComplete`` to a Checkpointer.
COMPLETE_KEY = "complete"


@register_checkpoint_hooks
class CheckpointComplete:
    """Added last to a Checkpointer: its file proves the checkpoint whole.

    SpeechBrain writes ``CKPT.yaml`` first and the parameter files after it,
    so a run killed while saving leaves a folder that looks like a checkpoint
    but cannot be loaded. Add this recoverable after all the others (as
    ``COMPLETE_KEY``) and resume only from checkpoints that hold its file
    (``is_complete``).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> checkpointer = Checkpointer(tempfile.mkdtemp())
    >>> checkpointer.add_recoverable("trace", TrainingTrace())
    >>> checkpointer.add_recoverable(COMPLETE_KEY, CheckpointComplete())
    >>> is_complete(checkpointer.save_checkpoint())
    True
    """

    @mark_as_saver
    def save(self, path):
        """Writes the marker file.

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        if if_main_process():
            with open(path, "w", encoding="utf-8") as f:
                f.write("complete\n")

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Nothing to restore.

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """


def is_complete(checkpoint):
    """Whether a checkpoint was saved to the end (``CheckpointComplete``).

    Arguments
    ---------
    checkpoint : speechbrain.utils.checkpoints.Checkpoint
        A checkpoint found by a Checkpointer.

    Returns
    -------
    bool
        True if it holds the ``CheckpointComplete`` file.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain.utils.checkpoints import Checkpointer
    >>> checkpointer = Checkpointer(tempfile.mkdtemp())
    >>> checkpointer.add_recoverable("trace", TrainingTrace())
    >>> is_complete(checkpointer.save_checkpoint())
    False
    """
    return COMPLETE_KEY in checkpoint.paramfiles
