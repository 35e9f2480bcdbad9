"""Baselines to compare SPG against.

Uniform magnitude pruning (UMP) is the two-stage baseline of the paper: the
same fraction of the smallest-magnitude weights is removed from EVERY gated
matrix at once (``granularity: structured``: the same fraction of the heads
and feed-forward units with the smallest scores from every sub-layer), the
masks are fixed, and the model is fine-tuned. It reuses
the SPG lobe (same modules, same export) with its gates replaced by fixed
masks, so both methods go through the same recipe and the same exporter.

Authors
 * speechbrain-spg developers 2026
"""

import torch


def magnitude_mask(weight, sparsity):
    """Keeps the largest-magnitude weights, removing a given fraction.

    Arguments
    ---------
    weight : torch.Tensor
        A weight matrix.
    sparsity : float
        Fraction of its weights to remove, in [0, 1).

    Returns
    -------
    torch.Tensor
        Boolean mask, ``True`` where kept; exactly
        ``round(sparsity * numel)`` entries are ``False``.

    Example
    -------
    >>> magnitude_mask(torch.tensor([0.1, -3.0, 0.5, -0.2]), 0.5)
    tensor([False,  True,  True, False])
    """
    count = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if count > 0:
        order = weight.detach().abs().reshape(-1).argsort()
        mask[order[:count]] = False
    return mask.reshape(weight.shape)


def uniform_magnitude_prune(lobe, sparsity=None):
    """Applies uniform magnitude pruning to an SPG lobe (fixed masks).

    Arguments
    ---------
    lobe : SPGLobeMixin
        An SPG lobe; its gates are replaced by fixed magnitude masks, and it
        then fine-tunes like a pruned SPG lobe (pruned weights stay zero).
    sparsity : float, optional
        Fraction removed from every gated matrix; default the lobe's gated
        target (``target_scope: model`` is already converted).

    Returns
    -------
    SparsityReport
        Sparsity after pruning.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> src = tiny_model_folder("wav2vec2")
    >>> lobe = SPGWav2Vec2(src, save_path="", target_sparsity=0.65)
    >>> report = uniform_magnitude_prune(lobe)
    >>> round(report.hard, 3), {round(layer.hard, 2) for layer in report.layers}
    (0.65, {0.65})
    """
    sparsity = lobe.gated_target if sparsity is None else sparsity
    layers = lobe.gated_layers()
    if lobe.structured:
        masks = structured_magnitude_masks(lobe.gate, layers, sparsity)
    else:
        masks = [magnitude_mask(layer.weight, sparsity) for layer in layers]
    lobe.apply_masks(masks)
    return lobe.sparsity_report()


def structured_magnitude_masks(gate, layers, sparsity):
    """Structured UMP: in every sub-layer, the same fraction of its heads
    (or feed-forward units) with the smallest scores is removed.

    Arguments
    ---------
    gate : speechbrain_spg.structured.StructuredGate
        The structured gate (its sub-layers and their scores).
    layers : list of nn.Linear
        The gated matrices, in gate order.
    sparsity : float
        Fraction of the units of every sub-layer to remove (rounded to
        whole units).

    Returns
    -------
    list of torch.Tensor
        Boolean weight masks, one per gated matrix.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGHuBERT
    >>> lobe = SPGHuBERT(tiny_model_folder("hubert"), granularity="structured")
    >>> layers = lobe.gated_layers()
    >>> masks = structured_magnitude_masks(lobe.gate, layers, 0.5)
    >>> [int(m.any(dim=1).sum()) for m in masks[:5]]  # kept rows: q/k/v, out, FF in
    [16, 16, 16, 32, 32]
    """
    squares = gate.all_squares()
    units = [magnitude_mask(square, sparsity) for square in squares]
    return gate.weight_masks(units, layers)
