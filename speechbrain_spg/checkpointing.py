"""Extra recoverables so that a resumed run continues exactly where it stopped.

SpeechBrain's ``Checkpointer`` saves modules, optimisers, schedulers and the
position in the data loader. Two things a compression run also needs are
added here: the random number generators (dropout masks and augmentation
after a restart are then the ones an uninterrupted run would have drawn) and
the training trace (the sparsity / loss curve the plots are drawn from).

Authors
 * speechbrain-spg developers 2026
"""

import json
import random

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)


@register_checkpoint_hooks
class RandomState:
    """Saves and restores the torch, CUDA, numpy and Python RNG states.

    Add it to a ``Checkpointer``'s recoverables (``!new:`` in YAML).

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
        torch.save(state, path)

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
        state = torch.load(path, weights_only=False)
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@register_checkpoint_hooks
class TrainingTrace:
    """A list of JSON-serialisable records that survives restarts.

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
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.records, f)

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
        with open(path, encoding="utf-8") as f:
            self.records = json.load(f)
