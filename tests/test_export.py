"""Tests of the compact export: equivalence, size, and refusal of bad folders."""

import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from speechbrain.integrations.huggingface.hubert import HuBERT
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.integrations.huggingface.wavlm import WavLM
from transformers import AutoModel

from speechbrain_spg.data.architectures import (
    TINY_OVERRIDES,
    build_config,
    build_model,
    hub_config,
    save_random_model,
)
from speechbrain_spg.export import (
    COMPACT_FILE,
    MANIFEST,
    CompactExportError,
    CompactWav2Vec2,
    export_compact,
    ideal_compact_bytes,
    load_compact,
    pack_mask,
    unpack_mask,
)
from speechbrain_spg.lobes import SPGHuBERT, SPGWav2Vec2, SPGWavLM
from speechbrain_spg.options import SPGOptions

LOBES = {"wav2vec2": SPGWav2Vec2, "hubert": SPGHuBERT, "wavlm": SPGWavLM}
STOCK_LOBES = {"wav2vec2": Wav2Vec2, "hubert": HuBERT, "wavlm": WavLM}


def _wave(seed=0, batch=2, samples=4000):
    return torch.randn(
        batch, samples, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module")
def exports(tiny_sources, tmp_path_factory):
    """Model type -> (hard-pruned lobe in eval mode, export folder, manifest)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for model_type, lobe_class in LOBES.items():
        lobe = lobe_class(
            tiny_sources[model_type], save_path="", threshold_init=0.9
        )
        lobe.hard_prune()
        lobe.eval()
        path = root / model_type
        manifest = export_compact(lobe, path)
        out[model_type] = (lobe, path, manifest)
    return out


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_export_outputs_match_every_loader(model_type, exports, tmp_path):
    lobe, path, manifest = exports[model_type]
    assert 0.55 < manifest["sparsity"]["gated"] < 0.7
    assert manifest["model_type"] == model_type
    wav = _wave(seed=1)
    normalised = F.layer_norm(wav, wav.shape[1:])
    with torch.no_grad():
        expected = lobe(wav)
        stock = STOCK_LOBES[model_type](
            source=str(path / "hf"), save_path=str(tmp_path)
        ).eval()
        hf = AutoModel.from_pretrained(path / "hf").eval()
        compact_model = load_compact(path)
        compact_lobe = CompactWav2Vec2(str(path)).eval()
        outputs = {
            "speechbrain": stock(wav),
            "transformers": hf(normalised).last_hidden_state,
            "load_compact": compact_model(normalised).last_hidden_state,
            "CompactWav2Vec2": compact_lobe(wav),
        }
    for name, output in outputs.items():
        assert output.shape == expected.shape, name
        assert (output - expected).abs().max().item() <= 1e-5, name
    # The zeros of the exported model are exactly the pruned weights.
    hf_state = hf.state_dict()
    zeros = sum(
        int((hf_state[f"{name}.weight"] == 0).sum())
        for name in lobe.gated_names
    )
    assert zeros == manifest["params"]["removed"]
    assert zeros == lobe.sparsity_report().removed_params
    assert compact_lobe.manifest == json.loads(json.dumps(manifest))


def test_manifest_contents(exports):
    lobe, path, manifest = exports["wav2vec2"]
    written = json.loads((path / MANIFEST).read_text())
    assert written == json.loads(json.dumps(manifest))
    assert manifest["params"] == {
        "total": lobe.total_params,
        "gated": lobe.gated_params,
        "removed": manifest["params"]["removed"],
        "nonzero": lobe.total_params - manifest["params"]["removed"],
    }
    assert [layer["name"] for layer in manifest["layers"]] == lobe.gated_names
    removed = sum(
        round(layer["sparsity"] * layer["numel"])
        for layer in manifest["layers"]
    )
    assert removed == manifest["params"]["removed"]
    assert manifest["sparsity"]["gated"] == removed / lobe.gated_params
    assert manifest["sparsity"]["model"] == removed / lobe.total_params
    assert COMPACT_FILE in manifest["files"]
    assert "hf/model.safetensors" in manifest["files"]
    assert "hf/config.json" in manifest["files"]
    assert set(manifest["sparse_shapes"]) == {
        f"{name}.weight" for name in lobe.gated_names
    }


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(numel):
    generator = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=generator) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(
        numel / 8
    )
    assert torch.equal(unpack_mask(packed, (numel,)), mask)


# ------------------------------------------------------------------ size


@pytest.fixture(scope="module")
def medium_lobe(tmp_path_factory):
    """A 3.2M-parameter wav2vec2 (hidden 256, 4 layers), pruned to ~60%."""
    overrides = dict(
        TINY_OVERRIDES,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_conv_pos_embedding_groups=16,
    )
    folder = tmp_path_factory.mktemp("medium")
    source = save_random_model(build_config("wav2vec2", **overrides), folder)
    lobe = SPGWav2Vec2(source, save_path="", threshold_init=0.85)
    lobe.hard_prune()
    return lobe


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compact_file_is_close_to_ideal_size(dtype, medium_lobe, tmp_path):
    assert medium_lobe.total_params == 3_232_272
    manifest = export_compact(medium_lobe, tmp_path / dtype, dtype=dtype)
    size = os.path.getsize(tmp_path / dtype / COMPACT_FILE)
    ideal = manifest["ideal_compact_bytes"]
    width = 4 if dtype == "float32" else 2
    removed = manifest["params"]["removed"]
    arithmetic = (
        medium_lobe.total_params - removed
    ) * width + medium_lobe.gated_params / 8
    assert abs(ideal - arithmetic) <= 1
    assert ideal <= size <= 1.02 * ideal
    # Exported values are exact in float32 and rounded in float16.
    model = load_compact(tmp_path / dtype)
    gated = medium_lobe.gated_layers()[0]
    exported = model.get_submodule(medium_lobe.gated_names[0]).weight
    error = (exported - gated.weight).abs().max().item()
    if dtype == "float32":
        assert error == 0
    else:
        assert 0 < error < 1e-3


def test_full_size_wav2vec2_base_ideal_compression():
    """Ideal compact size of wav2vec2-base with 65% of the gated weights cut."""
    with torch.device("meta"):
        model = build_model(hub_config("facebook/wav2vec2-base"))
    state = model.state_dict()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and re.search(SPGOptions().prune_modules, name)
    ]
    assert len(names) == 72
    masks = {}
    for name in names:
        shape = state[f"{name}.weight"].shape
        mask = torch.zeros(shape, dtype=torch.bool)
        kept = shape.numel() - round(0.65 * shape.numel())
        mask.view(-1)[:kept] = True
        masks[f"{name}.weight"] = mask
    total = sum(tensor.numel() for tensor in state.values())
    gated = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    assert (total, gated) == (94_371_712, 84_934_656)
    dense_fp32 = 4 * total

    fp32 = ideal_compact_bytes(state, masks, "float32")
    fp16 = ideal_compact_bytes(state, masks, "float16")
    assert fp32 == 4 * (total - gated) + 4 * kept + gated // 8
    assert fp16 == 2 * (total - gated) + 2 * kept + gated // 8
    assert kept == 29_727_120
    assert fp32 == 167_273_536
    assert fp16 == 88_945_184
    assert 0.443 < fp32 / dense_fp32 < 0.444  # 0.4431x of dense float32
    assert 0.235 < fp16 / dense_fp32 < 0.236  # 0.2356x of dense float32
    assert 0.471 < fp16 / (dense_fp32 / 2) < 0.472  # 0.4712x of float16


# ----------------------------------------------------- refusing bad folders


def test_export_refuses_non_empty_folder_without_overwrite(exports, tmp_path):
    lobe = exports["wav2vec2"][0]
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    message = (
        f"export_compact: {target} exists and is not empty; pass "
        "overwrite=True to replace it, or choose another folder."
    )
    with pytest.raises(FileExistsError, match="^" + re.escape(message) + "$"):
        export_compact(lobe, target)
    assert sorted(os.listdir(target)) == ["notes.txt"]

    manifest = export_compact(lobe, target, overwrite=True)
    assert sorted(os.listdir(target)) == [COMPACT_FILE, "hf", MANIFEST]
    assert (
        manifest["params"]["removed"] == lobe.sparsity_report().removed_params
    )
    # No temporary folder is left next to the export.
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_load_compact_refuses_tampered_file(exports, tmp_path):
    source = exports["wav2vec2"][1]
    copy = tmp_path / "tampered"
    shutil.copytree(source, copy)
    data = bytearray((copy / COMPACT_FILE).read_bytes())
    data[-1] ^= 0x01
    (copy / COMPACT_FILE).write_bytes(bytes(data))
    pattern = (
        re.escape(f"{copy / COMPACT_FILE}: sha256 ")
        + r"[0-9a-f]{64} does not match the manifest \([0-9a-f]{64}\); the "
        r"file was modified or corrupted\. Export again\.$"
    )
    with pytest.raises(CompactExportError, match=pattern):
        load_compact(copy)
    with pytest.raises(CompactExportError, match="sha256"):
        CompactWav2Vec2(str(copy))


def test_load_compact_refuses_manifest_of_another_architecture(
    exports, tmp_path
):
    source = exports["wav2vec2"][1]
    copy = tmp_path / "mismatch"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["config"]["hidden_size"] == 32
    manifest["config"]["hidden_size"] = 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    pattern = (
        re.escape(
            f"{copy}: tensors do not match the wav2vec2 architecture of the "
            "manifest (missing [], unexpected [], wrong shape ["
        )
        + r"'encoder\.layer_norm\.bias'"
    )
    with pytest.raises(CompactExportError, match=pattern):
        load_compact(copy, verify=False)


def test_load_compact_refuses_folder_without_manifest(tmp_path):
    with pytest.raises(
        CompactExportError, match="is not a speechbrain-spg export"
    ):
        load_compact(tmp_path)
