"""int8 compact exports: per-row quantisation, export, loading and reuse.

The quantisation is checked against its definition (every value within half
its row's scale, in exact arithmetic; empty rows; one-value rows); the
``int8`` export of both layouts (bitmask + kept values, and structured
smaller matrices) against the float32 export of the same lobe; the model
with PyTorch's dynamically quantised linears against the dequantised one.
"""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.data.architectures import build_model, hub_config
from speechbrain_spg.export import (
    COMPACT_FILE,
    CompactExportError,
    CompactWav2Vec2,
    export_compact,
    ideal_compact_bytes,
    load_compact,
    unpack_mask,
)
from speechbrain_spg.lobes import spg_lobe
from speechbrain_spg.options import SPGOptions
from speechbrain_spg.quantize import (
    SCHEME,
    dequantize_matrix,
    dequantize_rows,
    dynamic_int8_linear,
    int8_matrix,
    quantize_matrix,
    quantize_rows,
    rows_of_mask,
)
from speechbrain_spg.tools.finish import parse_arguments

# ------------------------------------------------------------ quantisation


def _exact_errors(weight, q, scales, rows):
    """|w - q * scale| and scale / 2 in float64, where both are exact
    (q * scale: 8 bits times 24; the difference of two close values)."""
    exact = q.double() * scales.double()[rows]
    return (weight.double() - exact).abs(), scales.double()[rows] / 2


def _random_matrix(seed, shape=(48, 40)):
    """Rows of very different magnitudes, and a random mask."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    weight *= 10.0 ** torch.randint(-4, 4, (shape[0], 1), generator=generator)
    mask = torch.rand(shape, generator=generator) < 0.35
    return weight, mask


@pytest.mark.parametrize("seed", range(4))
def test_every_value_is_within_half_its_row_scale(seed):
    weight, mask = _random_matrix(seed)
    for kept in (None, mask):
        q, scales = quantize_matrix(weight, kept)
        kept = torch.ones_like(mask) if kept is None else kept
        values, rows = weight[kept], rows_of_mask(kept)
        error, bound = _exact_errors(values, q.reshape(-1), scales, rows)
        assert bool((error <= bound).all())  # exactly, no tolerance
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        # Each row's largest kept magnitude is stored as +-127.
        dense = q if q.dim() == 2 else int8_matrix(q, kept)
        peaks = dense.abs().amax(dim=1)[kept.any(dim=1)]
        assert peaks.tolist() == [127] * len(peaks)
        # Dequantised float32 values: the exact products, rounded once.
        deq = dequantize_rows(q.reshape(-1), scales, rows)
        assert torch.equal(
            deq, (q.reshape(-1).double() * scales.double()[rows]).float()
        )


def test_zero_rows_get_scale_one_and_stay_zero():
    weight = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [1e-44, 0.0, 0.0]]
    )
    q, scales = quantize_matrix(weight)
    # Row 0 has no nonzero value; row 2's scale would be 0 in float32.
    assert scales.tolist()[0] == 1.0 and scales.tolist()[2] == 1.0
    assert q[0].tolist() == [0, 0, 0] and q[2].tolist() == [0, 0, 0]
    assert scales[1].item() == pytest.approx(2.0 / 127)
    deq = dequantize_matrix(q, scales)
    assert deq[0].tolist() == [0.0, 0.0, 0.0] and deq[2].tolist() == [0.0] * 3
    # A row with no kept value at all (sparse form).
    mask = torch.tensor([[False] * 3, [True, True, False], [False] * 3])
    q, scales = quantize_matrix(weight, mask)
    assert q.tolist() == [64, -127] and scales[[0, 2]].tolist() == [1.0, 1.0]
    assert torch.equal(dequantize_matrix(q, scales, mask)[0], torch.zeros(3))


def test_a_row_with_one_value_is_stored_exactly_at_127():
    values = torch.tensor([0.3, -7.25, 1e-3])
    rows = torch.tensor([0, 1, 2])
    q, scales = quantize_rows(values, rows, 3)
    assert q.tolist() == [127, -127, 127]
    error, bound = _exact_errors(values, q, scales, rows)
    # Only the float32 rounding of max|w| / 127 is left (about 1e-7).
    assert bool((error <= bound).all())
    assert bool((error <= 1e-6 * values.abs().double()).all())


def test_sparse_and_dense_forms_agree():
    weight, mask = _random_matrix(7)
    q, scales = quantize_matrix(weight, mask)
    dense_q, dense_scales = quantize_matrix(weight * mask)
    assert torch.equal(int8_matrix(q, mask), dense_q)
    # Rows without a kept value differ only in being all zero: scale 1.
    assert torch.equal(scales, dense_scales)
    assert torch.equal(
        dequantize_matrix(q, scales, mask),
        dequantize_matrix(dense_q, dense_scales),
    )


def test_dynamic_linear_holds_the_stored_int8_values():
    weight, mask = _random_matrix(3, shape=(24, 16))
    q, scales = quantize_matrix(weight, mask)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(2))
    dense_q = int8_matrix(q, mask)
    linear = dynamic_int8_linear(dense_q, scales, bias)
    stored = linear.weight()
    assert torch.equal(stored.int_repr(), dense_q)
    assert torch.equal(stored.q_per_channel_scales(), scales.double())
    assert stored.q_per_channel_axis() == 0
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, dequantize_matrix(q, scales, mask), bias)
    output = linear(x)
    assert output.shape == (5, 7, 24) and output.dtype == torch.float32
    # Only the inputs are quantised at run time (per batch, 7 bits on x86):
    # 0.7% to 1.5% of the largest output on such matrices (measured).
    error = (output - expected).abs().max() / expected.abs().max()
    assert 0 < error < 3e-2


# ------------------------------------------------------------------ export

CASES = [
    ("wav2vec2", "weight"),
    ("wav2vec2", "structured"),
    ("hubert", "weight"),
    ("wavlm", "weight"),
    ("wavlm", "structured"),
]


def _lobe(source, granularity):
    """A tiny lobe pruned by uniform magnitude (65% of every gated matrix),
    or structured with block 0's heads all removed and half of every
    feed-forward (so that 0-sized linears are exported too)."""
    if granularity == "weight":
        lobe = spg_lobe(source, target_sparsity=0.65)
        uniform_magnitude_prune(lobe)
        return lobe.eval()
    lobe = spg_lobe(source, granularity="structured")
    units = []
    for sub in lobe.gate.sublayers:
        kept = torch.arange(sub.units) % 2 == 0
        if sub.name.endswith("layers.0.attention"):
            kept = torch.zeros(sub.units, dtype=torch.bool)
        units.append(kept)
    layers = lobe.gated_layers()
    lobe.apply_masks(lobe.gate.weight_masks(units, layers))
    return lobe.eval()


@pytest.fixture(scope="module")
def exported(tiny_sources, tmp_path_factory):
    """(model type, granularity) -> (lobe, dtype -> (folder, manifest))."""
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for model_type, granularity in CASES:
        lobe = _lobe(tiny_sources[model_type], granularity)
        folders = {}
        for dtype in ("float32", "float16", "int8"):
            folder = root / f"{model_type}_{granularity}_{dtype}"
            folders[dtype] = (folder, export_compact(lobe, folder, dtype=dtype))
        out[model_type, granularity] = (lobe, folders)
    return out


def _wave():
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(3))
    return F.layer_norm(wav, wav.shape[1:])


def _hidden(model, wav):
    with torch.no_grad():
        return model(wav).last_hidden_state


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_int8_file_layout_and_manifest(case, exported):
    lobe, folders = exported[case]
    folder, manifest = folders["int8"]
    gated = {f"{name}.weight" for name in lobe.gated_names}
    assert manifest["dtype"] == "int8"
    quantization = manifest["quantization"]
    assert quantization["scheme"] == SCHEME == "int8 symmetric per output row"
    assert quantization["scale_dtype"] == "float32"
    assert quantization["matrices"] == len(gated) == 12
    assert folders["float16"][1]["quantization"] is None
    tensors = load_file(folder / COMPACT_FILE)
    for key in gated:
        q, scales = tensors[f"{key}::int8"], tensors[f"{key}::scales"]
        assert q.dtype == torch.int8 and scales.dtype == torch.float32
        assert f"{key}::values" not in tensors and key not in tensors
        assert (f"{key}::mask" in tensors) == (case[1] == "weight")
        assert bool((scales > 0).all()) and q.abs().le(127).all()
    others = [
        k for k in tensors if "::" not in k and tensors[k].is_floating_point()
    ]
    assert others and all(tensors[k].dtype == torch.float16 for k in others)
    # Smaller than float16, and close to the ideal size (the header of
    # these tiny files is a few kB).
    sizes = {
        dtype: os.path.getsize(path / COMPACT_FILE)
        for dtype, (path, _) in folders.items()
    }
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    assert manifest["ideal_compact_bytes"] < sizes["int8"]
    assert manifest["params"] == folders["float32"][1]["params"]


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_int8_export_dequantises_within_half_a_scale(case, exported):
    lobe, folders = exported[case]
    exact = dict(load_compact(folders["float32"][0]).state_dict())
    folder, manifest = folders["int8"]
    model = load_compact(folder)
    state = dict(model.state_dict())
    tensors = load_file(folder / COMPACT_FILE)
    assert next(model.parameters()).dtype == torch.float32
    for name in lobe.gated_names:
        key = f"{name}.weight"
        weight, reference = state[key], exact[key]
        q = _stored_int8(tensors, key, manifest)
        scales = tensors[f"{key}::scales"]
        assert weight.shape == reference.shape == q.shape
        assert torch.equal(weight, dequantize_matrix(q, scales))
        rows = torch.arange(q.shape[0])[:, None].expand(q.shape)
        error, bound = _exact_errors(reference, q, scales, rows)
        assert bool((error <= bound).all()), key
        if case[1] == "weight":  # pruned weights are still exactly zero
            assert bool((weight[reference == 0] == 0).all())
    # The ungated tensors: float16 rounding.
    for key, tensor in exact.items():
        if key.removesuffix(".weight") not in lobe.gated_names:
            assert torch.equal(state[key], tensor.half().float()), key


def _stored_int8(tensors, key, manifest):
    """The dense int8 matrix a compact file stores for ``key``."""
    q = tensors[f"{key}::int8"]
    if f"{key}::mask" not in tensors:  # structured: the whole matrix
        return q
    shape = manifest["sparse_shapes"][key]
    return int8_matrix(q, unpack_mask(tensors[f"{key}::mask"], shape))


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_int8_outputs_close_to_the_float_export(case, exported):
    _, folders = exported[case]
    wav = _wave()
    reference = _hidden(load_compact(folders["float32"][0]), wav)
    int8 = _hidden(load_compact(folders["int8"][0]), wav)
    half = _hidden(load_compact(folders["float16"][0]), wav)
    # Measured (outputs up to 3.6): int8 2.4e-3 to 3.6e-3 from float32,
    # as float16 (2.5e-3 to 3.5e-3), whose rounding of the ungated tensors
    # dominates; int8 is within 2e-4 to 4e-4 of float16.
    assert 0 < (int8 - reference).abs().max() < 1e-2
    assert (int8 - half).abs().max() < 2e-3


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_int8_linears_replace_exactly_the_gated_linears(case, exported):
    lobe, folders = exported[case]
    folder, manifest = folders["int8"]
    model = load_compact(folder, int8_linears=True)
    float_model = load_compact(folder)
    tensors = load_file(folder / COMPACT_FILE)
    quantised = {
        name
        for name, module in model.named_modules()
        if isinstance(module, DynamicInt8Linear)
    }
    # Every gated linear but the 0-sized ones of structured block 0.
    nonempty = {
        name
        for name in lobe.gated_names
        if float_model.get_submodule(name).weight.numel()
    }
    assert quantised == nonempty
    assert len(quantised) == (12 if case[1] == "weight" else 8)
    # Every other linear (feature projection, WavLM's gate) stays float.
    floats = [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and module.weight.numel()
    ]
    assert floats and not set(floats) & set(lobe.gated_names)
    for name in quantised:  # the stored values, not re-quantised
        key = f"{name}.weight"
        weight = model.get_submodule(name).weight()
        q = _stored_int8(tensors, key, manifest)
        scales = tensors[f"{key}::scales"]
        assert torch.equal(weight.int_repr(), q)
        assert torch.equal(weight.q_per_channel_scales().float(), scales)
    wav = _wave()
    dequantised = _hidden(load_compact(folder), wav)
    dynamic = _hidden(model, wav)
    # Measured: 0.9e-3 to 1.2e-3 (outputs up to 3.6; mean 2.5e-4 of the
    # mean magnitude): the activations' run-time quantisation.
    assert 0 < (dynamic - dequantised).abs().max() < 5e-3


def test_wavlm_attention_over_every_head_computes_wavlm_attention(exported):
    """``int8_linears`` swaps WavLM's attention (it reads the projection
    weights itself) for ``ShrunkWavLMAttention`` over every head: with
    float linears, the same output."""
    from speechbrain_spg.shrink import ShrunkWavLMAttention

    model = load_compact(exported["wavlm", "weight"][1]["int8"][0])
    wav = _wave()
    expected = _hidden(model, wav)
    for layer in model.encoder.layers:
        layer.attention.kept_heads = list(range(layer.attention.num_heads))
        layer.attention.__class__ = ShrunkWavLMAttention
    torch.testing.assert_close(_hidden(model, wav), expected)


def test_int8_linears_needs_an_int8_export(exported):
    folder = exported["wav2vec2", "weight"][1]["float16"][0]
    with pytest.raises(ValueError, match="int8_linears needs an int8 export"):
        load_compact(folder, int8_linears=True)


@pytest.mark.parametrize("int8_linears", [False, True])
def test_tampered_int8_export_is_refused(exported, tmp_path, int8_linears):
    source = exported["wavlm", "structured"][1]["int8"][0]
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(source):
        data = (source / name).read_bytes()
        if name == COMPACT_FILE:  # one int8 value changed
            data = data[:-1] + bytes([data[-1] ^ 1])
        (folder / name).write_bytes(data)
    with pytest.raises(CompactExportError, match="sha256 .* does not match"):
        load_compact(folder, int8_linears=int8_linears)
    with pytest.raises(CompactExportError, match="sha256 .* does not match"):
        CompactWav2Vec2(str(folder))


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_compact_lobe_loads_int8_from_the_folder_and_the_config(case, exported):
    lobe, folders = exported[case]
    folder, manifest = folders["int8"]
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(5))
    expected = _hidden(load_compact(folder), F.layer_norm(wav, wav.shape[1:]))
    from_folder = CompactWav2Vec2(str(folder), freeze=True).eval()
    from_config = CompactWav2Vec2(config=manifest["config"])
    from_config.load_weights(folder / COMPACT_FILE)
    with torch.no_grad():
        torch.testing.assert_close(from_folder(wav), expected)
        assert torch.equal(from_config.eval()(wav), from_folder(wav))
    # keep_sparsity: the unstructured masks come from the int8 file.
    masks = [
        buffer
        for name, buffer in from_config.named_buffers()
        if name.startswith("sparsity_mask")
    ]
    assert len(masks) == (12 if case[1] == "weight" else 0)
    kept = sum(int(mask.sum()) for mask in masks)
    params = manifest["params"]
    assert kept == (params["gated"] - params["removed"]) * (case[1] == "weight")


def test_finish_accepts_int8():
    args, _ = parse_arguments(["train.yaml", "--export_dtype", "int8"])
    assert args.export_dtype == "int8"


def test_full_size_wav2vec2_base_int8_ideal_size():
    """Ideal int8 compact size of wav2vec2-base, 65% of every gated matrix
    cut: kept values 1 byte, 1 bit per gated weight, a float32 scale per
    row, the ungated tensors in float16."""
    with torch.device("meta"):
        model = build_model(hub_config("facebook/wav2vec2-base"))
    state = model.state_dict()
    pattern = re.compile(SPGOptions().prune_modules)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.search(name):
            shape = module.weight.shape
            mask = torch.zeros(shape, dtype=torch.bool)
            mask.view(-1)[: shape.numel() - round(0.65 * shape.numel())] = True
            masks[f"{name}.weight"] = mask
    total = sum(tensor.numel() for tensor in state.values())
    gated = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.sum()) for mask in masks.values())
    rows = sum(mask.shape[0] for mask in masks.values())
    assert (total, gated, kept, rows) == (
        94_371_712,
        84_934_656,
        29_727_120,
        82_944,
    )
    int8 = ideal_compact_bytes(state, masks, "int8")
    assert int8 == 2 * (total - gated) + kept + gated // 8 + 4 * rows
    assert int8 == 59_549_840  # what a real export at 65% (UMP) records
    assert 0.157 < int8 / (4 * total) < 0.158  # 0.1578x dense float32
    # The float16 ungated tensors alone are 5% of dense float32.
    assert 0.0499 < 2 * (total - gated) / (4 * total) < 0.0501


def test_int8_inference_folder_loads_through_the_pretrainer(
    inference_folder, wav2vec2_source, tmp_path
):
    """An inference folder whose compact file is int8: SpeechBrain's
    ``EncoderASR`` loads it (``CompactWav2Vec2`` from its configuration,
    weights through the Pretrainer and ``load_weights``)."""
    from speechbrain.inference.ASR import EncoderASR

    from speechbrain_spg.lobes import SPGWav2Vec2

    torch.manual_seed(0)  # the lobe of ``build_inference_folder``
    lobe = SPGWav2Vec2(str(wav2vec2_source), save_path="", target_sparsity=0.65)
    lobe.hard_prune()
    extra = {
        name: str(inference_folder / name)
        for name in ("head.ckpt", "hyperparams.yaml", "label_encoder.txt")
    }
    out = tmp_path / "int8"
    export_compact(lobe, out, dtype="int8", extra_files=extra)
    wav = torch.randn(2, 4000, generator=torch.Generator().manual_seed(6))
    lengths = torch.ones(2)
    encoded = {}
    for name, folder in (("float32", inference_folder), ("int8", out)):
        asr = EncoderASR.from_hparams(
            source=str(folder), savedir=str(tmp_path / f"saved_{name}")
        )
        with torch.no_grad():
            encoded[name] = asr.encode_batch(wav, lengths)
        assert len(asr.transcribe_batch(wav, lengths)[0]) == 2
    # Log-probabilities of a random head (down to -4.8): 8.7e-4 measured.
    error = (encoded["int8"] - encoded["float32"]).abs().max()
    assert 0 < error < 1e-2
