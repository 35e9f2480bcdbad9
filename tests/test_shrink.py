"""Physical shrinking of wav2vec2 / HuBERT / WavLM to kept heads and units:
equality with the zeroed model, sizes, meta rebuild, safetensors, bad input."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from speechbrain_spg.data.architectures import (
    TINY_OVERRIDES,
    build_config,
    build_model,
)
from speechbrain_spg.shrink import (
    HeadlessAttention,
    ShrunkWavLMAttention,
    UnitlessFeedForward,
    block_sizes,
    shrink_model,
)

HEADS, LAYERS, HEAD_DIM, HIDDEN, UNITS = 4, 3, 8, 32, 64
OVERRIDES = {
    **TINY_OVERRIDES,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
}
# (model_type, do_stable_layer_norm, attention implementation)
VARIANTS = [
    ("wav2vec2", False, "eager"),
    ("wav2vec2", False, "sdpa"),
    ("wav2vec2", True, "sdpa"),
    ("hubert", False, "sdpa"),
    ("hubert", True, "eager"),
    ("wavlm", False, "eager"),
    ("wavlm", True, "eager"),
]


def tiny(model_type, stable=False, attn="eager", seed=0):
    config = build_config(model_type, do_stable_layer_norm=stable, **OVERRIDES)
    config._attn_implementation = attn
    model = build_model(config, seed=seed).eval()
    # HF's initialisation gives zero biases, unit gate constants, a tiny
    # position bias and near-uniform attention: draw larger values, so that
    # a mistake on any path through the blocks shows in the outputs.
    with torch.no_grad():
        for name, parameter in model.encoder.layers.named_parameters():
            if "layer_norm" not in name:
                std = (
                    parameter.shape[-1] ** -0.5 if parameter.dim() == 2 else 0.5
                )
                parameter.normal_(0.0, std)
    return model


def random_kept(seed):
    """Random kept heads and units per layer (each non-empty here)."""
    generator = torch.Generator().manual_seed(seed)
    heads, units = [], []
    for _ in range(LAYERS):
        mask = torch.rand(HEADS, generator=generator) < 0.5
        mask[torch.randint(HEADS, (1,), generator=generator)] = True
        heads.append(mask.nonzero().flatten().tolist())
        count = int(torch.randint(1, UNITS, (1,), generator=generator))
        units.append(
            torch.randperm(UNITS, generator=generator)[:count].sort()[0]
        )
    return heads, units


def zeroed(model, kept_heads, kept_units):
    """A copy of the model with the removed heads and units set to 0."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads, units in zip(
            model.encoder.layers, kept_heads, kept_units
        ):
            rows = torch.ones(HEADS, HEAD_DIM, dtype=torch.bool)
            rows[list(heads)] = False
            rows = rows.flatten()
            attention = layer.attention
            for linear in (
                attention.q_proj,
                attention.k_proj,
                attention.v_proj,
            ):
                linear.weight[rows] = 0
                linear.bias[rows] = 0
            attention.out_proj.weight[:, rows] = 0
            removed = torch.ones(UNITS, dtype=torch.bool)
            removed[torch.as_tensor(list(units), dtype=torch.long)] = False
            feed_forward = layer.feed_forward
            feed_forward.intermediate_dense.weight[removed] = 0
            feed_forward.intermediate_dense.bias[removed] = 0
            feed_forward.output_dense.weight[:, removed] = 0
    return model


def padded_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    wav = torch.randn(2, 4000, generator=generator)
    mask = torch.ones(2, 4000, dtype=torch.long)
    mask[1, 2500:] = 0
    wav[1, 2500:] = 0
    return wav, mask


def assert_same_outputs(shrunk, reference, atol=1e-5):
    """Equal last and every hidden state, unpadded and padded."""
    wav, mask = padded_batch()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got = shrunk(wav, output_hidden_states=True, **kwargs)
            want = reference(wav, output_hidden_states=True, **kwargs)
            torch.testing.assert_close(
                got.last_hidden_state, want.last_hidden_state, rtol=0, atol=atol
            )
            assert len(got.hidden_states) == LAYERS + 1
            for g, w in zip(got.hidden_states, want.hidden_states):
                torch.testing.assert_close(g, w, rtol=0, atol=atol)


@pytest.mark.parametrize("model_type,stable,attn", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_zeroed_model(model_type, stable, attn, seed):
    model = tiny(model_type, stable, attn, seed)
    heads, units = random_kept(seed + 10)
    reference = zeroed(model, heads, units)
    shrink_model(model, heads, units)
    assert_same_outputs(model, reference)
    # The removed heads and units did change the output.
    wav, _ = padded_batch()
    with torch.no_grad():
        full = tiny(model_type, stable, attn, seed)(wav).last_hidden_state
        assert not torch.allclose(full, model(wav).last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("model_type,stable,attn", VARIANTS)
def test_layers_without_heads_or_units(model_type, stable, attn):
    model = tiny(model_type, stable, attn)
    heads = [[], [1, 3], [0, 1, 2, 3]]
    units = [range(UNITS), [], [2, 40]]
    reference = zeroed(model, heads, units)
    shrink_model(model, heads, units)
    layers = model.encoder.layers
    if model_type == "wavlm":
        assert isinstance(layers[0].attention, ShrunkWavLMAttention)
    else:
        assert isinstance(layers[0].attention, HeadlessAttention)
        assert not isinstance(layers[1].attention, HeadlessAttention)
    assert isinstance(layers[1].feed_forward, UnitlessFeedForward)
    assert not isinstance(layers[0].feed_forward, UnitlessFeedForward)
    assert_same_outputs(model, reference)


def test_wavlm_kept_heads_differ_per_layer():
    # Layer 0 has no head but must still give every later layer the full
    # position bias; the later layers gate different heads of it.
    model = tiny("wavlm")
    for heads in ([[], [3], [0, 2]], [[2], [0, 1, 3], []], [[1, 3], [], [3]]):
        units = [range(UNITS)] * LAYERS
        reference = zeroed(model, heads, units)
        shrunk = shrink_model(copy.deepcopy(model), heads, units)
        assert [a.attention.kept_heads for a in shrunk.encoder.layers] == heads
        assert_same_outputs(shrunk, reference)


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "wavlm"])
def test_shapes_and_block_sizes(model_type):
    model = tiny(model_type)
    before = sum(p.numel() for p in model.parameters())
    assert block_sizes(model) == ([list(range(HEADS))] * LAYERS, [UNITS] * 3)
    heads = [[0, 2], [], [1, 2, 3]]
    units = [torch.tensor([1, 5, 9]), [], range(UNITS)]
    shrink_model(model, heads, units)
    assert block_sizes(model) == (heads, [3, 0, UNITS])
    for layer, kept, size in zip(model.encoder.layers, heads, [3, 0, UNITS]):
        attention, feed_forward = layer.attention, layer.feed_forward
        width = len(kept) * HEAD_DIM
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
            assert linear.weight.shape == (width, HIDDEN)
            assert linear.bias.shape == (width,)
            assert (linear.in_features, linear.out_features) == (HIDDEN, width)
        assert attention.out_proj.weight.shape == (HIDDEN, width)
        assert attention.out_proj.bias.shape == (HIDDEN,)
        assert attention.num_heads == len(kept)
        assert feed_forward.intermediate_dense.weight.shape == (size, HIDDEN)
        assert feed_forward.intermediate_dense.bias.shape == (size,)
        assert feed_forward.output_dense.weight.shape == (HIDDEN, size)
    removed = sum(
        (4 - len(kept)) * HEAD_DIM * (3 * (HIDDEN + 1) + HIDDEN)
        for kept in heads
    ) + (UNITS - 3 + UNITS) * (2 * HIDDEN + 1)
    assert sum(p.numel() for p in model.parameters()) == before - removed


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "wavlm"])
def test_training_step_with_dropout(model_type):
    # Dropout on (attention weights, bias-only outputs) runs, and gradients
    # reach the kept weights and the biases of emptied blocks.
    model = tiny(model_type)
    model.config.layerdrop = 0.0
    shrink_model(model, [[], [1, 2], [3]], [[5], [], range(UNITS)])
    model.train()
    wav, mask = padded_batch()
    output = model(wav, attention_mask=mask).last_hidden_state
    output.square().mean().backward()
    layers = model.encoder.layers
    assert layers[0].attention.out_proj.bias.grad.abs().sum() > 0
    assert layers[1].feed_forward.output_dense.bias.grad.abs().sum() > 0
    assert layers[1].attention.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].attention.q_proj.weight.grad is None  # 0-sized, unused


def test_selected_tensors_keep_values_dtype_and_grad():
    model = tiny("hubert").double()
    original = copy.deepcopy(model.encoder.layers[0])
    model.encoder.layers[0].attention.k_proj.weight.requires_grad_(False)
    shrink_model(model, [[1, 3], [0], []], [[4, 7], [0], []])
    layer = model.encoder.layers[0]
    rows = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    torch.testing.assert_close(
        layer.attention.q_proj.weight, original.attention.q_proj.weight[rows]
    )
    torch.testing.assert_close(
        layer.attention.out_proj.weight,
        original.attention.out_proj.weight[:, rows],
    )
    torch.testing.assert_close(
        layer.feed_forward.output_dense.weight,
        original.feed_forward.output_dense.weight[:, [4, 7]],
    )
    assert layer.feed_forward.intermediate_dense.bias.dtype == torch.float64
    assert not layer.attention.k_proj.weight.requires_grad
    assert layer.attention.q_proj.weight.requires_grad
    # Gradients reach the kept weights and the biases of empty layers.
    model(torch.randn(1, 4000).double()).last_hidden_state.sum().backward()
    last = model.encoder.layers[2]
    assert layer.attention.q_proj.weight.grad.abs().sum() > 0
    assert last.attention.out_proj.bias.grad.abs().sum() > 0
    assert last.feed_forward.output_dense.bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "model_type,stable",
    [("wav2vec2", False), ("hubert", True), ("wavlm", False), ("wavlm", True)],
)
def test_meta_rebuild_loads_shrunk_state(model_type, stable, tmp_path):
    model = tiny(model_type, stable)
    heads, units = random_kept(3)
    heads[0], units[1] = [], []  # 0-sized tensors in the state dict
    shrink_model(model, heads, units)
    state = model.state_dict()
    assert state["encoder.layers.0.attention.q_proj.weight"].shape == (
        0,
        HIDDEN,
    )

    # The state dict, 0-sized tensors included, goes through safetensors.
    path = str(tmp_path / "shrunk.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = load_file(path)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key

    kept_heads, sizes = block_sizes(model)
    with torch.device("meta"):
        rebuilt = AutoModel.from_config(model.config)
    shrink_model(rebuilt, kept_heads, [range(n) for n in sizes])
    rebuilt.load_state_dict(loaded, strict=True, assign=True)
    rebuilt.eval()
    assert not any(p.is_meta for p in rebuilt.parameters())
    assert block_sizes(rebuilt) == (heads, [len(u) for u in units])
    assert_same_outputs(rebuilt, model, atol=1e-6)


def test_bad_input_is_rejected():
    model = tiny("wav2vec2")
    heads, units = [[0]] * LAYERS, [[0]] * LAYERS
    with pytest.raises(ValueError, match=r"kept_heads has 2 entries.*3 layers"):
        shrink_model(model, heads[:2], units)
    with pytest.raises(ValueError, match=r"kept_units has 4 entries.*3 layers"):
        shrink_model(model, heads, units + [[0]])
    with pytest.raises(
        ValueError,
        match=r"kept_heads\[1\] holds index 4, outside the allowed range "
        r"0\.\.3 \(num_attention_heads=4\)",
    ):
        shrink_model(model, [[0], [1, 4], [0]], units)
    with pytest.raises(ValueError, match=r"kept_units\[2\].*-1.*0\.\.63"):
        shrink_model(model, heads, [[0], [0], [-1, 2]])
    with pytest.raises(ValueError, match=r"kept_heads\[0\] must be strictly"):
        shrink_model(model, [[1, 0], [0], [0]], units)
    with pytest.raises(ValueError, match=r"kept_units\[0\] must be strictly"):
        shrink_model(model, heads, [[3, 3], [0], [0]])
    with pytest.raises(ValueError, match="no encoder.layers"):
        shrink_model(torch.nn.Linear(2, 2), heads, units)
    # Nothing was changed by the rejected calls; a second shrink is refused.
    assert block_sizes(model) == ([list(range(HEADS))] * LAYERS, [UNITS] * 3)
    shrink_model(model, heads, units)
    with pytest.raises(ValueError, match=r"layers\[0\] is already shrunk"):
        shrink_model(model, heads, units)
