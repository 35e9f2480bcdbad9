"""Extra recoverables so that a resumed run continues exactly where it stopped.

SpeechBrain's ``Checkpointer`` saves modules, optimisers, schedulers and the
position in the data loader. A compression run also needs the random number
generators (dropout masks and augmentation after a restart are then the ones
an uninterrupted run would have drawn: ``RandomState``), the training trace,
a count of skipped batches and the compression clock (small JSON values:
``JsonRecoverable``), and a marker that a checkpoint was saved to the end
(``CheckpointComplete``), so that a run killed while saving resumes from the
one before it.

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


@register_checkpoint_hooks
class JsonRecoverable:
    """Base of the small recoverables below: a JSON value that the main
    process writes (under DDP every process holds the same one) and every
    process reads back. A subclass says what its value is (``state``) and
    how to take it back (``restore``).

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

    def state(self):
        """The JSON-serialisable value to save."""
        raise NotImplementedError

    def restore(self, value):
        """Takes back a saved value."""
        raise NotImplementedError

    @mark_as_saver
    def save(self, path):
        """Writes ``state()`` as JSON to ``path`` (main process only).

        Arguments
        ---------
        path : str
            Checkpoint file.
        """
        if if_main_process():
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.state(), f)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Reads the value of ``path`` back (``restore``).

        Arguments
        ---------
        path : str
            Checkpoint file.
        end_of_epoch : bool
            Unused (SpeechBrain passes it).
        """
        with open(path, encoding="utf-8") as f:
            self.restore(json.load(f))


class TrainingTrace(JsonRecoverable):
    """A list of JSON-serialisable records that survives restarts.

    Example
    -------
    >>> trace = TrainingTrace()
    >>> trace.append({"step": 10, "hard_sparsity": 0.3})
    >>> restored = TrainingTrace()
    >>> restored.restore(trace.state())
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

    def state(self):
        """The records."""
        return self.records

    def restore(self, value):
        """Takes the records back."""
        self.records = value


class Counter(JsonRecoverable):
    """An integer that survives restarts (e.g. batches skipped so far).

    Arguments
    ---------
    value : int
        The starting value.

    Example
    -------
    >>> Counter(3).state()
    {'value': 3}
    """

    def __init__(self, value=0):
        self.value = value

    def state(self):
        """The value."""
        return {"value": self.value}

    def restore(self, value):
        """Takes the value back."""
        self.value = int(value["value"])


class Stopwatch(JsonRecoverable):
    """Seconds of work that survive restarts.

    Counts from its creation; a checkpoint stores the seconds counted so
    far, and loading it continues from there (the time between that
    checkpoint and an interruption is work lost, not counted).

    Example
    -------
    >>> restarted = Stopwatch()
    >>> restarted.restore({"elapsed_s": 5.0})
    >>> restarted.elapsed() >= 5.0
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

    def state(self):
        """The seconds counted so far."""
        return {"elapsed_s": self.elapsed()}

    def restore(self, value):
        """Continues from the saved seconds."""
        self.offset = float(value["elapsed_s"])
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
    >>> before = checkpointer.save_checkpoint()
    >>> checkpointer.add_recoverable(COMPLETE_KEY, CheckpointComplete())
    >>> is_complete(before), is_complete(checkpointer.save_checkpoint())
    (False, True)
    """

    @mark_as_saver
    def save(self, path):
        """Writes the marker file (main process only; a plain text file, as
        checkpoints of earlier versions hold).

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
        """Nothing to restore: the file's presence is what counts.

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
    See ``CheckpointComplete``.
    """
    return COMPLETE_KEY in checkpoint.paramfiles
