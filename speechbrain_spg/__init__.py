"""speechbrain-spg: one-pass compression of speech foundation models.

Sparsity-aware self-pinching gates (SPG) multiply every pruned weight matrix
``W`` by a soft mask computed from ``W`` itself,
``M = sigmoid((W^2 - t^2) / (2 * tau))``, with one learnable threshold ``t``
per tie group. A Lagrangian regulariser drives the expected sparsity to a
target, and a final hard pruning stage writes a compact model.
"""

__version__ = "0.1.0"
