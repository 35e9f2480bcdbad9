"""Tests of the compact export: equivalence, size, and refusal of bad folders."""

import json
import math
import os
import re
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from speechbrain.integrations.huggingface.hubert import HuBERT
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.integrations.huggingface.wavlm import WavLM
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.parameter_transfer import Pretrainer
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
    """Model type -> (hard-pruned lobe in eval mode, compact-only export
    folder, its manifest, export folder with ``hf/`` too)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for model_type, lobe_class in LOBES.items():
        lobe = lobe_class(
            tiny_sources[model_type], save_path="", threshold_init=0.9
        )
        lobe.hard_prune()
        lobe.eval()
        path, dense = root / model_type, root / f"{model_type}_dense_hf"
        manifest = export_compact(lobe, path)
        export_compact(lobe, dense, dense_hf=True)
        out[model_type] = (lobe, path, manifest, dense)
    return out


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_export_outputs_match_every_loader(model_type, exports, tmp_path):
    lobe, path, manifest, dense = exports[model_type]
    assert 0.55 < manifest["sparsity"]["gated"] < 0.7
    assert manifest["model_type"] == model_type
    # Compact-only by default; the dense HuggingFace folder on request.
    assert sorted(os.listdir(path)) == [COMPACT_FILE, MANIFEST]
    assert sorted(os.listdir(dense)) == [COMPACT_FILE, "hf", MANIFEST]
    assert sorted(os.listdir(dense / "hf")) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    wav = _wave(seed=1)
    normalised = F.layer_norm(wav, wav.shape[1:])
    with torch.no_grad():
        expected = lobe(wav)
        stock = STOCK_LOBES[model_type](
            source=str(dense / "hf"), save_path=str(tmp_path)
        ).eval()
        hf = AutoModel.from_pretrained(dense / "hf").eval()
        compact_model = load_compact(path)
        compact_lobe = CompactWav2Vec2(str(path)).eval()
        outputs = {
            "speechbrain": stock(wav),
            "transformers": hf(normalised).last_hidden_state,
            "load_compact": compact_model(normalised).last_hidden_state,
            "load_compact dense_hf": load_compact(dense)(
                normalised
            ).last_hidden_state,
            "CompactWav2Vec2": compact_lobe(wav),
            "CompactWav2Vec2 dense_hf": CompactWav2Vec2(str(dense)).eval()(wav),
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
    lobe, path, manifest, dense = exports["wav2vec2"]
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
    assert manifest["feature_extractor"] == lobe.feature_extractor.to_dict()
    assert manifest["feature_extractor"]["do_normalize"] is True
    assert list(manifest["files"]) == [COMPACT_FILE]
    dense_files = json.loads((dense / MANIFEST).read_text())["files"]
    assert sorted(dense_files) == [
        COMPACT_FILE,
        "hf/config.json",
        "hf/model.safetensors",
        "hf/preprocessor_config.json",
    ]
    # The compact file does not depend on the dense folder written beside it
    # (same tensors; not always the same bytes: safetensors writes the
    # metadata's keys in a random order).
    ours, theirs = (
        load_file(path / COMPACT_FILE),
        load_file(dense / COMPACT_FILE),
    )
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
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
    # Compact-only shipping: the whole folder (compact file and manifest)
    # is within 5% of the ideal size.
    files = sorted(os.listdir(tmp_path / dtype))
    assert files == [COMPACT_FILE, MANIFEST]
    folder = sum(os.path.getsize(tmp_path / dtype / name) for name in files)
    assert folder <= 1.05 * ideal
    assert folder < 0.6 * width * medium_lobe.total_params  # < 0.6x dense
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
    assert sorted(os.listdir(target)) == [COMPACT_FILE, MANIFEST]
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
            f"{copy}: tensors do not match the wav2vec2 architecture "
            "(missing [], unexpected [], wrong shape ["
        )
        + r"'encoder\.layer_norm\.bias'"
    )
    with pytest.raises(CompactExportError, match=pattern):
        load_compact(copy, verify=False)
    # The checksums hold (the manifest is not among its own files): the
    # architecture check refuses it with verification on too, in both loaders.
    with pytest.raises(CompactExportError, match=pattern):
        load_compact(copy)
    with pytest.raises(CompactExportError, match=pattern):
        CompactWav2Vec2(str(copy))


def test_load_compact_refuses_folder_without_manifest(tmp_path):
    with pytest.raises(
        CompactExportError, match="is not a speechbrain-spg export"
    ):
        load_compact(tmp_path)


# ------------------------------------------------------- float16 round trip


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_float16_export_round_trip(model_type, exports, tmp_path):
    lobe, path, _, _ = exports[model_type]
    manifest = export_compact(lobe, tmp_path / "fp16", dtype="float16")
    assert manifest["dtype"] == "float16"
    fp32 = (path / COMPACT_FILE).stat().st_size
    assert (tmp_path / "fp16" / COMPACT_FILE).stat().st_size < 0.6 * fp32
    wav = _wave(seed=2)
    with torch.no_grad():
        expected = lobe(wav)
        loaded = CompactWav2Vec2(str(tmp_path / "fp16")).eval()(wav)
        model = load_compact(tmp_path / "fp16")
        plain = model(F.layer_norm(wav, wav.shape[1:])).last_hidden_state
    assert next(model.parameters()).dtype == torch.float32
    for output in (loaded, plain):
        error = (output - expected).abs().max().item()
        # Weights rounded to 11 significant bits: 2.6e-3 to 3.4e-3 on these
        # models (outputs up to 3.5).
        assert 0 < error <= 1e-2
    # Pruned weights are still exactly zero, kept ones within fp16 rounding.
    state = dict(model.state_dict())
    for name, layer in zip(lobe.gated_names, lobe.gated_layers()):
        weight, mask = state[f"{name}.weight"], layer.mask
        assert torch.equal(weight == 0, ~mask)
        assert torch.equal(weight, layer.weight.detach().half().float() * mask)


def test_export_refuses_an_unknown_dtype(exports, tmp_path):
    with pytest.raises(ValueError) as error:
        export_compact(exports["wav2vec2"][0], tmp_path / "x", dtype="bf16")
    assert str(error.value) == (
        "export_compact: dtype must be one of ['float16', 'float32', 'int8'], got "
        "'bf16' (the recipe key: export_dtype)."
    )
    assert not (tmp_path / "x").exists()


def test_extra_files_are_copied_and_checksummed(exports, tmp_path):
    lobe = exports["wav2vec2"][0]
    head = tmp_path / "head.ckpt"
    head.write_bytes(b"head weights")
    out = tmp_path / "export"
    manifest = export_compact(lobe, out, extra_files={"head.ckpt": head})
    assert sorted(os.listdir(out)) == [COMPACT_FILE, "head.ckpt", MANIFEST]
    assert (out / "head.ckpt").read_bytes() == b"head weights"
    assert sorted(manifest["files"]) == [COMPACT_FILE, "head.ckpt"]
    load_compact(out)
    (out / "head.ckpt").write_bytes(b"other weights")
    with pytest.raises(CompactExportError, match=r"head\.ckpt: sha256 "):
        load_compact(out)


# ------------------------------------------- keep_sparsity: fine-tuning


def _pruned_weights(lobe, manifest):
    """Key -> weight of every pruned matrix of a CompactWav2Vec2."""
    params = dict(lobe.model.named_parameters())
    return {key: params[key] for key in manifest["sparse_shapes"]}


def _fine_tune(lobe, optimizer_class, steps, **options):
    """``steps`` steps of a linear head's cross-entropy on noise."""
    torch.manual_seed(0)
    hidden = lobe.module.config if hasattr(lobe, "module") else lobe.config
    head = torch.nn.Linear(hidden.hidden_size, 8)
    params = [p for p in lobe.parameters() if p.requires_grad]
    optimizer = optimizer_class(params + list(head.parameters()), **options)
    wav = _wave(seed=3)
    for _ in range(steps):
        logits = head(lobe(wav))
        labels = torch.arange(logits.shape[1]).remainder(8).expand(2, -1)
        loss = F.cross_entropy(logits.transpose(1, 2), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


@pytest.mark.parametrize(
    "optimizer_class, options",
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
    ids=["adam", "adamw"],
)
def test_keep_sparsity_holds_every_pruned_weight_at_zero(
    optimizer_class, options, exports
):
    _, path, manifest, _ = exports["wav2vec2"]
    lobe = CompactWav2Vec2(str(path))
    assert lobe.keep_sparsity and lobe.training
    before = {
        key: weight.detach().clone()
        for key, weight in _pruned_weights(lobe, manifest).items()
    }
    loss = _fine_tune(lobe, optimizer_class, 50, **options)
    assert torch.isfinite(loss)
    removed = 0
    for key, weight in _pruned_weights(lobe, manifest).items():
        zeros = before[key] == 0
        # Exactly the same zeros, and kept weights moved.
        assert torch.equal(weight == 0, zeros), key
        kept_changed = (weight != before[key])[~zeros].float().mean().item()
        assert kept_changed > 0.9, key
        removed += int(zeros.sum())
    assert removed == manifest["params"]["removed"]


def test_without_keep_sparsity_fine_tuning_fills_the_zeros(exports):
    _, path, manifest, _ = exports["wav2vec2"]
    lobe = CompactWav2Vec2(str(path), keep_sparsity=False)
    assert list(lobe.buffers()) == []
    _fine_tune(lobe, torch.optim.Adam, 5, lr=1e-2)
    zeros = sum(
        int((w == 0).sum()) for w in _pruned_weights(lobe, manifest).values()
    )
    assert manifest["params"]["removed"] > 10_000
    assert zeros < 0.01 * manifest["params"]["removed"]


def test_frozen_lobe_has_no_trainable_weights_and_no_masks(exports):
    lobe = CompactWav2Vec2(str(exports["wav2vec2"][1]), freeze=True)
    assert lobe.keep_sparsity is False
    assert not any(p.requires_grad for p in lobe.parameters())
    assert list(lobe.buffers()) == []


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_keep_sparsity_every_parameter_gets_a_gradient(model_type, exports):
    """No unused parameter (DDP's default expects none): the pruned weights
    get a gradient that is zero where they are, the SpecAugment embedding is
    not trained when SpecAugment is off."""
    _, path, manifest, _ = exports[model_type]
    lobe = CompactWav2Vec2(str(path))
    # LayerDrop skips whole layers at random: off here (with it on, DDP
    # needs find_unused_parameters=True, with or without sparsity).
    lobe.config.layerdrop = 0.0
    masks = dict(zip(sorted(manifest["sparse_shapes"]), lobe.buffers()))
    assert len(masks) == len(manifest["sparse_shapes"]) == 12
    assert all(mask.dtype == torch.bool for mask in masks.values())
    assert "sparsity_mask_0" not in lobe.state_dict()  # not persistent
    lobe(_wave()).pow(2).mean().backward()
    trainable = [n for n, p in lobe.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in lobe.named_parameters() if p.grad is None]
    assert no_grad == ["model.masked_spec_embed"]
    assert "model.masked_spec_embed" not in trainable
    for key, weight in _pruned_weights(lobe, manifest).items():
        assert not weight.grad[weight == 0].any(), key
        assert (weight.grad[weight != 0] != 0).float().mean() > 0.9, key


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keep_sparsity_under_ddp_without_unused_parameter_detection(exports):
    _, path, manifest, _ = exports["wav2vec2"]
    lobe = CompactWav2Vec2(str(path))
    lobe.config.layerdrop = 0.0  # see the test above
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
    )
    try:
        model = torch.nn.parallel.DistributedDataParallel(
            lobe, find_unused_parameters=False
        )
        loss = _fine_tune(model, torch.optim.Adam, 4, lr=1e-2)
    finally:
        torch.distributed.destroy_process_group()
    assert torch.isfinite(loss)
    zeros = sum(
        int((w == 0).sum()) for w in _pruned_weights(lobe, manifest).values()
    )
    assert zeros == manifest["params"]["removed"]


# ------------------------------------- SpeechBrain Checkpointer / Pretrainer


def test_lobe_is_a_checkpointer_recoverable(exports, tmp_path):
    _, path, manifest, _ = exports["wav2vec2"]
    lobe = CompactWav2Vec2(str(path))
    checkpointer = Checkpointer(tmp_path / "save", recoverables={"ssl": lobe})
    checkpointer.save_checkpoint()
    saved = {k: v.clone() for k, v in lobe.model.state_dict().items()}
    _fine_tune(lobe, torch.optim.Adam, 3, lr=1e-2)
    changed = lobe.model.state_dict()
    assert any(not torch.equal(saved[k], changed[k]) for k in saved)
    assert checkpointer.recover_if_possible() is not None
    state = lobe.model.state_dict()
    assert sorted(state) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # The masks are still installed after recovery.
    _fine_tune(lobe, torch.optim.Adam, 3, lr=1e-2)
    zeros = sum(
        int((w == 0).sum()) for w in _pruned_weights(lobe, manifest).values()
    )
    assert zeros == manifest["params"]["removed"]


def test_config_mode_gets_its_weights_from_the_pretrainer(exports, tmp_path):
    _, path, manifest, _ = exports["wav2vec2"]
    lobe = CompactWav2Vec2(config=manifest["config"])
    # No weights yet (HuggingFace makes the SpecAugment embedding with
    # torch.Tensor(), which ignores the meta device).
    real = [name for name, p in lobe.named_parameters() if not p.is_meta]
    assert real == ["model.masked_spec_embed"]
    pretrainer = Pretrainer(
        collect_in=tmp_path / "collected",
        loadables={"ssl": lobe},
        paths={"ssl": str(path / COMPACT_FILE)},
    )
    pretrainer.collect_files()
    pretrainer.load_collected()
    assert not any(p.is_meta for p in lobe.parameters())
    reference = CompactWav2Vec2(str(path)).eval()
    wav = _wave(seed=4)
    with torch.no_grad():
        assert torch.equal(lobe.eval()(wav), reference(wav))
    # keep_sparsity: the masks of the compact file are installed.
    masks = dict(zip(sorted(manifest["sparse_shapes"]), lobe.buffers()))
    weights = _pruned_weights(lobe, manifest)
    assert sorted(masks) == sorted(weights) and len(masks) == 12
    for key, weight in weights.items():
        assert torch.equal(masks[key], weight != 0), key
    lobe.train()
    _fine_tune(lobe, torch.optim.Adam, 5, lr=1e-2)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == manifest["params"]["removed"]


def test_lobe_needs_exactly_one_of_source_and_config(exports):
    message = (
        "CompactWav2Vec2: give either source (an export folder) or config "
        "(a model configuration), not both or neither."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        CompactWav2Vec2()
    _, path, manifest, _ = exports["wav2vec2"]
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        CompactWav2Vec2(str(path), config=manifest["config"])
