"""Structured exports: smaller matrices written, loaded and reused.

A structured lobe pruned with a block left without any head (and units
removed elsewhere) is exported; every way of loading it back (``load_compact``,
``CompactWav2Vec2`` from the folder, from a configuration through
``load_weights``, after ``save_weights``) must compute what the masked lobe
computes, with the smaller shapes its manifest lists.
"""

import json
import os

import pytest
import torch
from transformers import AutoModel

from speechbrain_spg.data.architectures import tiny_model_folder
from speechbrain_spg.export import (
    COMPACT_FILE,
    MANIFEST,
    CompactWav2Vec2,
    export_compact,
    load_compact,
    stored_structure,
)
from speechbrain_spg.lobes import spg_lobe
from speechbrain_spg.shrink import unused_parameters

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")


def pruned_structured_lobe(model_type, seed=0):
    """A tiny structured lobe whose first block lost every head, the second
    block half its heads, and every feed-forward a random half of its units
    (fixed masks, as after ``hard_prune``)."""
    lobe = spg_lobe(tiny_model_folder(model_type), granularity="structured")
    generator = torch.Generator().manual_seed(seed)
    units = []
    for sub in lobe.gate.sublayers:
        if sub.name.endswith("layers.0.attention"):
            kept = torch.zeros(sub.units, dtype=torch.bool)
        elif sub.name.endswith("attention"):
            kept = torch.arange(sub.units) % 2 == 1
        else:
            kept = torch.rand(sub.units, generator=generator) < 0.5
        units.append(kept)
    layers = lobe.gated_layers()
    lobe.apply_masks(lobe.gate.weight_masks(units, layers))
    with torch.no_grad():  # nonzero biases, so that a wrong bias shows
        for name, param in lobe.model.named_parameters():
            if name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        for layer in layers:  # the pruned biases stay zero
            if layer.bias_mask is not None:
                layer.bias.mul_(layer.bias_mask)
    return lobe.eval(), units


def padded_batch():
    """Two waveforms of different lengths and their attention mask."""
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(3))
    wav[1, 3000:] = 0
    mask = torch.ones(2, 4000, dtype=torch.long)
    mask[1, 3000:] = 0
    return wav, mask


def hidden(model, wav, mask=None):
    """Last hidden state of a HuggingFace model, without gradients."""
    with torch.no_grad():
        return model(wav, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_structured_export_loads_smaller_and_computes_the_masked_lobe(
    model_type, tmp_path
):
    lobe, units = pruned_structured_lobe(model_type)
    folder = tmp_path / "compact"
    manifest = export_compact(lobe, folder)
    structure = manifest["structure"]
    heads = model_type_heads = lobe.model.config.num_attention_heads
    assert structure["attention_heads"][0] == []
    assert structure["attention_heads"][1] == list(range(1, heads, 2))
    ffn = [
        int(u.sum())
        for u, s in zip(units, lobe.gate.sublayers)
        if "feed" in s.name
    ]
    assert structure["intermediate_sizes"] == ffn
    assert manifest["sparse_shapes"] == {}
    assert stored_structure(folder / COMPACT_FILE) == structure
    model = load_compact(folder)
    config = model.config
    head_dim = config.hidden_size // model_type_heads
    for i, layer in enumerate(model.encoder.layers):
        kept = len(structure["attention_heads"][i])
        attention = layer.attention
        assert attention.q_proj.weight.shape == (
            kept * head_dim,
            config.hidden_size,
        )
        assert attention.out_proj.weight.shape == (
            config.hidden_size,
            kept * head_dim,
        )
        size = structure["intermediate_sizes"][i]
        assert layer.feed_forward.intermediate_dense.weight.shape[0] == size
    stored = sum(p.numel() for p in model.parameters())
    assert stored == manifest["params"]["nonzero"] < manifest["params"]["total"]
    removed = sum(
        (~u).sum().item() * s.unit_params
        for u, s in zip(units, lobe.gate.sublayers)
    )
    assert manifest["sparsity"]["gated"] == pytest.approx(
        removed / lobe.gated_params
    )
    wav, mask = padded_batch()
    expected = hidden(lobe.model, wav, mask)
    torch.testing.assert_close(
        hidden(model, wav, mask), expected, atol=1e-5, rtol=0
    )
    # The manifest's checksums cover the smaller file.
    with open(folder / MANIFEST, encoding="utf-8") as f:
        assert COMPACT_FILE in json.load(f)["files"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_compact_lobe_reads_a_structured_export_every_way(model_type, tmp_path):
    """From the folder, from the configuration through the Pretrainer's
    ``load_weights`` (the inference folder's path), and from a checkpoint
    that ``save_weights`` wrote."""
    lobe, _ = pruned_structured_lobe(model_type, seed=1)
    folder = tmp_path / "compact"
    manifest = export_compact(lobe, folder)
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(5))
    expected = hidden(lobe.model, wav)
    from_folder = CompactWav2Vec2(folder, freeze=True)
    torch.testing.assert_close(
        hidden(from_folder.model, wav), expected, atol=1e-5, rtol=0
    )
    config = {"model_type": manifest["model_type"], **manifest["config"]}
    from_config = CompactWav2Vec2(config=config, freeze=True)
    from_config.load_weights(folder / COMPACT_FILE)
    torch.testing.assert_close(
        hidden(from_config.model, wav), expected, atol=1e-5, rtol=0
    )
    checkpoint = tmp_path / "ckpt.safetensors"
    from_folder.save_weights(checkpoint)
    reloaded = CompactWav2Vec2(config=config, freeze=True)
    reloaded.load_weights(checkpoint)
    torch.testing.assert_close(
        hidden(reloaded.model, wav), expected, atol=1e-5, rtol=0
    )
    # Fine-tuning the smaller model trains every parameter it has.
    trainable = CompactWav2Vec2(folder)
    trainable(wav).pow(2).mean().backward()
    params = dict(trainable.model.encoder.named_parameters())
    frozen = {name for name, p in params.items() if not p.requires_grad}
    assert frozen == {
        name.removeprefix("encoder.")
        for name in unused_parameters(trainable.model)
    }
    if model_type == "wavlm":  # the first block has no head left
        assert "layers.0.attention.gru_rel_pos_const" in frozen
    assert all(p.grad is not None for p in params.values() if p.requires_grad)


def test_structured_export_in_float16_and_with_the_dense_folder(tmp_path):
    lobe, _ = pruned_structured_lobe("wav2vec2", seed=2)
    export_compact(lobe, tmp_path / "fp32")
    manifest = export_compact(
        lobe, tmp_path / "fp16", dtype="float16", dense_hf=True
    )
    sizes = [
        os.path.getsize(tmp_path / name / COMPACT_FILE)
        for name in ("fp32", "fp16")
    ]
    assert sizes[1] < 0.6 * sizes[0]
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(7))
    expected = hidden(lobe.model, wav)
    half = load_compact(tmp_path / "fp16")
    torch.testing.assert_close(hidden(half, wav), expected, atol=5e-2, rtol=0)
    # hf/: the dense shapes, the removed units' weights and biases zero.
    dense = AutoModel.from_pretrained(tmp_path / "fp16" / "hf").eval()
    torch.testing.assert_close(hidden(dense, wav), expected, atol=1e-5, rtol=0)
    assert manifest["structure"]["attention_heads"][0] == []
