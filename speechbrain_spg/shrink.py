"""Physically shrinking an SSL encoder to its kept heads and feed-forward units.

Structured pruning removes whole attention heads and feed-forward units, but a
zeroed head still costs its matrices' memory and time. ``shrink_model``
replaces every transformer block's ``q/k/v/out_proj`` and
``intermediate_dense/output_dense`` by smaller ``nn.Linear`` modules holding
only the kept rows and columns, so that the shrunk model computes what the
zeroed one does (within float rounding) with fewer parameters and operations.

Three cases need more than smaller matrices:

- a block left with no head (or no unit) cannot reshape a 0-sized
  projection: its module's class is swapped for a subclass that returns what
  the zeroed block gives, ``out_proj.bias`` (``output_dense.bias``) at every
  frame; the 0-sized linears stay, so the state dict keys do not change;
- WavLM runs its attention with ``F.multi_head_attention_forward``, which
  needs every head, and shares one relative position bias of all heads with
  every block: ``ShrunkWavLMAttention`` computes the kept heads' attention
  itself and passes the full bias on;
- a shrunk checkpoint has smaller tensors than its configuration says: build
  the model on the meta device, shrink it with the same lists (the kept
  heads and the unit counts that ``block_sizes`` gives; which units were kept
  does not matter there) and ``load_state_dict(state, strict=True,
  assign=True)``.

Authors
 * speechbrain-spg developers 2026
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

#: (mixin, original class) -> the subclass that a module's class is swapped to.
_SWAPPED = {}
#: Argument name -> the configuration field that bounds its indices.
_BOUNDS = {
    "kept_heads": "num_attention_heads",
    "kept_units": "intermediate_size",
}


def shrink_model(model, kept_heads, kept_units):
    """Shrinks, in place, every encoder block to its kept heads and units.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A ``Wav2Vec2Model``, ``HubertModel`` or ``WavLMModel`` (any encoder
        variant, ``do_stable_layer_norm`` included), not shrunk yet, with real
        or meta-device tensors (``index_select`` works on both, and keeps
        dtype, device and ``requires_grad``).
    kept_heads : list of list of int
        One list per encoder layer: the kept head indices, strictly
        increasing, in the original numbering (``0 .. num_attention_heads -
        1``). An empty list removes the layer's attention.
    kept_units : list of (list of int or range or torch.Tensor)
        One per encoder layer: the kept feed-forward units, strictly
        increasing (``0 .. intermediate_size - 1``). An empty one removes
        the layer's feed-forward.

    Returns
    -------
    transformers.PreTrainedModel
        ``model`` itself.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wav2vec2", **TINY_OVERRIDES)).eval()
    >>> model = shrink_model(model, [[1], []], [range(40), [3, 7]])
    >>> tuple(model.encoder.layers[0].attention.q_proj.weight.shape)
    (16, 32)
    >>> tuple(model.encoder.layers[1].feed_forward.output_dense.weight.shape)
    (32, 2)
    >>> model(torch.randn(1, 4000)).last_hidden_state.shape
    torch.Size([1, 198, 32])
    """
    layers, config = _encoder_layers(model), model.config
    heads = _checked("kept_heads", kept_heads, config, len(layers))
    units = _checked("kept_units", kept_units, config, len(layers))
    for i, layer in enumerate(layers):
        if hasattr(layer.attention, "kept_heads"):
            raise ValueError(
                f"model.encoder.layers[{i}] is already shrunk; shrink_model "
                "takes an unshrunk model (the kept indices count its "
                "original heads and units)."
            )
    for layer, layer_heads, layer_units in zip(layers, heads, units):
        _shrink_attention(layer.attention, layer_heads)
        _shrink_feed_forward(layer.feed_forward, layer_units)
    return model


def block_sizes(model):
    """The kept heads and the feed-forward size of every encoder block.

    With the model's configuration, this is all it takes to rebuild the
    shrunk architecture (on the meta device) before loading its state dict.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A wav2vec2, HuBERT or WavLM model, shrunk or not.

    Returns
    -------
    heads : list of list of int
        Kept head indices of each layer, in the original numbering.
    units : list of int
        Intermediate (feed-forward) size of each layer.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("hubert", **TINY_OVERRIDES))
    >>> block_sizes(model)
    ([[0, 1], [0, 1]], [64, 64])
    >>> block_sizes(shrink_model(model, [[0, 1], [1]], [range(64), [5]]))
    ([[0, 1], [1]], [64, 1])
    """
    layers = _encoder_layers(model)
    every = range(model.config.num_attention_heads)
    heads = [
        list(getattr(layer.attention, "kept_heads", every)) for layer in layers
    ]
    units = [
        layer.feed_forward.intermediate_dense.out_features for layer in layers
    ]
    return heads, units


def unused_parameters(model):
    """The parameters of a shrunk model that no forward pass uses: the
    0-sized matrices of emptied blocks, and the head gate of a WavLM block
    left without heads. Training must freeze them (DDP waits for a gradient
    of every trainable parameter).

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A shrunk (or unshrunk) model.

    Returns
    -------
    list of str
        Parameter names.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wavlm", **TINY_OVERRIDES))
    >>> unused = unused_parameters(shrink_model(model, [[], [0]], [[0], [0]]))
    >>> sorted(name.split("attention.")[1] for name in unused)[:3]
    ['gru_rel_pos_const', 'gru_rel_pos_linear.bias', 'gru_rel_pos_linear.weight']
    """
    unused = [name for name, p in model.named_parameters() if p.numel() == 0]
    for name, module in model.named_modules():
        if isinstance(module, ShrunkWavLMAttention) and not module.kept_heads:
            gate = ("gru_rel_pos_const", "gru_rel_pos_linear")
            unused += [
                f"{name}.{key}"
                for key, _ in module.named_parameters()
                if key.startswith(gate)
            ]
    return unused


class HeadlessAttention:
    """Mixin for the attention of a block whose heads were all removed.

    With every head zeroed, attention gives ``out_proj.bias`` at every frame;
    the 0-sized projections cannot even be reshaped into heads, so this
    returns the bias directly. ``shrink_model`` swaps the class of a
    wav2vec2 / HuBERT attention module to a subclass of this mixin and of
    its own class (so ``isinstance`` checks and the state dict keys stay).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wav2vec2", **TINY_OVERRIDES))
    >>> attention = shrink_model(model, [[0], []], [[0], [0]]
    ...     ).encoder.layers[1].attention
    >>> type(attention).__name__
    'HeadlessWav2Vec2Attention'
    >>> output, weights = attention(torch.randn(2, 5, 32))
    >>> torch.equal(output[1, 4], attention.out_proj.bias), weights
    (True, None)
    """

    def forward(self, hidden_states, *args, **kwargs):
        """What the zeroed heads give, in the attention's return form.

        Arguments
        ---------
        hidden_states : torch.Tensor
            (batch, time, hidden) input; only its shape is used.
        *args, **kwargs
            The attention's other arguments (mask, ...), unused.

        Returns
        -------
        output : torch.Tensor
            ``out_proj.bias`` at every frame, (batch, time, hidden).
        weights : None
            No attention weights.
        """
        return _bias_at_every_frame(self.out_proj, hidden_states), None


class UnitlessFeedForward:
    """Mixin for the feed-forward of a block whose units were all removed.

    With every unit zeroed, the feed-forward gives ``output_dense.bias`` at
    every frame (``gelu(0) = 0``): this returns it, after the output dropout,
    without running the 0-sized linears. ``shrink_model`` swaps a
    feed-forward module's class to a subclass of this mixin and of its own.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wavlm", **TINY_OVERRIDES)).eval()
    >>> ff = shrink_model(model, [[0], [0]], [[], [1]]
    ...     ).encoder.layers[0].feed_forward
    >>> type(ff).__name__
    'UnitlessWavLMFeedForward'
    >>> torch.equal(ff(torch.randn(3, 32))[2], ff.output_dense.bias)
    True
    """

    def forward(self, hidden_states):
        """What the zeroed units give.

        Arguments
        ---------
        hidden_states : torch.Tensor
            (..., hidden) input; only its shape is used.

        Returns
        -------
        torch.Tensor
            ``output_dropout(output_dense.bias)`` at every frame.
        """
        bias = _bias_at_every_frame(self.output_dense, hidden_states)
        return self.output_dropout(bias)


class ShrunkWavLMAttention(WavLMAttention):
    """WavLM attention over its kept heads only (``kept_heads``, a list).

    ``WavLMAttention`` calls ``F.multi_head_attention_forward``, which needs
    all heads; this computes the kept heads' attention as that function
    does: scaled dot product plus the gated relative position bias, padded
    keys at ``-inf``, softmax, dropout while training, ``out_proj``. The
    relative position bias of all heads (``rel_attn_embed``, first block) is
    passed on in full, since later blocks keep other heads; each block gates
    its kept heads' bias from their chunks of its input
    (``gru_rel_pos_linear`` and ``gru_rel_pos_const`` stay full size). A
    block with no head returns ``out_proj.bias`` and still passes the bias.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wavlm", **TINY_OVERRIDES)).eval()
    >>> attention = shrink_model(model, [[1], [0, 1]], [[0], [0]]
    ...     ).encoder.layers[0].attention
    >>> type(attention).__name__, attention.kept_heads
    ('ShrunkWavLMAttention', [1])
    >>> output, weights, bias = attention(torch.randn(3, 5, 32))
    >>> output.shape, weights.shape, bias.shape  # bias: 3 x 2 heads
    (torch.Size([3, 5, 32]), torch.Size([3, 1, 5, 5]), torch.Size([6, 5, 5]))
    """

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        index=0,
        **kwargs,
    ):
        """Attention of the kept heads, as ``WavLMAttention.forward``.

        Arguments
        ---------
        hidden_states : torch.Tensor
            (batch, time, hidden) input.
        attention_mask : torch.Tensor, optional
            (batch, time), 1 on real frames, 0 on padding.
        position_bias : torch.Tensor, optional
            (batch * num_attention_heads, time, time) bias of every head from
            the first block; computed here when None (first block).
        index : int
            Block index (unused, as in WavLM).
        **kwargs
            Other arguments of the encoder layer, unused.

        Returns
        -------
        output : torch.Tensor
            (batch, time, hidden).
        weights : torch.Tensor or None
            (batch, kept heads, time, time); None without a head.
        position_bias : torch.Tensor
            The bias of every head, for the next blocks.
        """
        batch, time, _ = hidden_states.shape
        every = self.gru_rel_pos_const.shape[1]
        if position_bias is None:  # first block: the bias of every head
            position_bias = self.compute_bias(time, time).unsqueeze(0)
            position_bias = position_bias.repeat(batch, 1, 1, 1)
            position_bias = position_bias.view(batch * every, time, time)
        if not self.kept_heads:
            output = _bias_at_every_frame(self.out_proj, hidden_states)
            return output, None, position_bias
        kept = torch.tensor(self.kept_heads, device=hidden_states.device)

        # Gate of each kept head's bias, from that head's chunk of the input.
        chunks = hidden_states.view(batch, time, every, self.head_dim)
        chunks = chunks.index_select(2, kept).transpose(1, 2)
        projected = self.gru_rel_pos_linear(chunks)
        projected = projected.view(*chunks.shape[:-1], 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(projected).chunk(2, dim=-1)
        const = self.gru_rel_pos_const.index_select(1, kept)
        gate = gate_a * (gate_b * const - 1.0) + 2.0
        bias = position_bias.view(batch, every, time, time)
        scores = gate * bias.index_select(1, kept)

        def split(linear):  # (batch, kept heads, time, head_dim)
            projection = linear(hidden_states)
            projection = projection.view(batch, time, -1, self.head_dim)
            return projection.transpose(1, 2)

        query = split(self.q_proj) * self.scaling
        scores = scores + query @ split(self.k_proj).transpose(-1, -2)
        if attention_mask is not None:
            padded = attention_mask.ne(1)[:, None, None, :]
            scores = scores.masked_fill(padded, float("-inf"))
        weights = F.dropout(
            scores.softmax(dim=-1), p=self.dropout, training=self.training
        )
        output = (weights @ split(self.v_proj)).transpose(1, 2)
        output = self.out_proj(output.reshape(batch, time, -1))
        return output, weights, position_bias


def _encoder_layers(model):
    """The ``encoder.layers`` of a model (or of its base model)."""
    base = getattr(model, "base_model", model)
    try:
        return base.encoder.layers
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no encoder.layers; expected a "
            "Wav2Vec2Model, HubertModel or WavLMModel."
        ) from None


def _checked(name, lists, config, num_layers):
    """Per-layer index lists as lists of int, checked against the model."""
    field = _BOUNDS[name]
    size = getattr(config, field)
    if len(lists) != num_layers:
        raise ValueError(
            f"{name} has {len(lists)} entries; expected one per encoder "
            f"layer, and the model has {num_layers} layers."
        )
    checked = []
    for i, kept in enumerate(lists):
        if isinstance(kept, torch.Tensor):
            kept = kept.tolist()
        values = [int(value) for value in kept]
        outside = [value for value in values if not 0 <= value < size]
        if outside:
            raise ValueError(
                f"{name}[{i}] holds index {outside[0]}, outside the allowed "
                f"range 0..{size - 1} ({field}={size})."
            )
        if values != sorted(set(values)):
            raise ValueError(
                f"{name}[{i}] must be strictly increasing (sorted, no "
                "repeated index)."
            )
        checked.append(values)
    return checked


def _shrink_attention(attention, kept):
    """Keeps the rows of q/k/v and the columns of out_proj of ``kept``."""
    head_dim = attention.head_dim
    heads = torch.tensor(kept, dtype=torch.long)[:, None]
    index = (heads * head_dim + torch.arange(head_dim)).flatten()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attention, name, _selected(getattr(attention, name), index, 0))
    attention.out_proj = _selected(attention.out_proj, index, 1)
    attention.kept_heads = list(kept)
    attention.num_heads = len(kept)
    if isinstance(attention, WavLMAttention):
        attention.__class__ = ShrunkWavLMAttention
    elif not kept:
        _swap_class(attention, HeadlessAttention, "Headless")


def _shrink_feed_forward(feed_forward, kept):
    """Keeps the rows of intermediate_dense, columns of output_dense."""
    index = torch.tensor(kept, dtype=torch.long)
    feed_forward.intermediate_dense = _selected(
        feed_forward.intermediate_dense, index, 0
    )
    feed_forward.output_dense = _selected(feed_forward.output_dense, index, 1)
    if not kept:
        _swap_class(feed_forward, UnitlessFeedForward, "Unitless")


@torch.no_grad()
def _selected(linear, index, dim):
    """A new ``nn.Linear`` with the rows (dim 0) or columns (dim 1) kept."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index)
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.index_select(0, index)
    # Built 1 x 1 on meta (no initialisation, no warning about 0-sized
    # tensors), then given the selected tensors.
    new = nn.Linear(1, 1, bias=bias is not None, device="meta")
    new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    new.weight = nn.Parameter(weight, linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, linear.bias.requires_grad)
    return new.train(linear.training)


def _swap_class(module, mixin, prefix):
    """Makes ``module`` an instance of a subclass of ``mixin`` and its class."""
    base = type(module)
    if (mixin, base) not in _SWAPPED:
        _SWAPPED[mixin, base] = type(
            prefix + base.__name__, (mixin, base), {"__module__": __name__}
        )
    module.__class__ = _SWAPPED[mixin, base]


def _bias_at_every_frame(linear, hidden_states):
    """``linear.bias`` (zeros without one) at every frame of the input."""
    shape = (*hidden_states.shape[:-1], linear.out_features)
    if linear.bias is None:
        return hidden_states.new_zeros(shape)
    return linear.bias.expand(shape).contiguous()
