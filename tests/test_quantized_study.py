"""Tests of ``tools.convert.convert_inference_folder`` (an int8 copy of a
float32 inference folder) and of ``benchmarks/quantized_study.py`` on a tiny
folder: the converted folder verifies and loads (``load_compact``,
``EncoderASR``, dynamic int8 linears), its weights are within half a scale
of the float32 ones, it holds what a direct int8 export of the lobe holds
(unstructured and structured), refusals; the study writes its hypotheses,
table and goal lines.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from conftest import REPO
from speechbrain_spg.data.architectures import tiny_model_folder
from speechbrain_spg.evaluation.significance import load_hypotheses
from speechbrain_spg.export import (
    COMPACT_FILE,
    CompactExportError,
    export_compact,
    load_compact,
    read_manifest,
)
from speechbrain_spg.lobes import SPGWav2Vec2, spg_lobe
from speechbrain_spg.quantize import QMAX
from speechbrain_spg.tools.convert import convert_inference_folder
from speechbrain_spg.tools.inference import load_asr

ONNX_REASON = "optional extra speechbrain-spg[onnx] (onnx, onnxruntime) missing"


@pytest.fixture(scope="module")
def converted(inference_folder, tmp_path_factory):
    """The tiny CTC inference folder (``conftest``) converted to int8."""
    dst = tmp_path_factory.mktemp("convert") / "compact_int8"
    manifest = convert_inference_folder(inference_folder, dst, "int8")
    return str(inference_folder), str(dst), manifest


def test_converted_folder_verifies_and_keeps_every_other_file(converted):
    src, dst, manifest = converted
    source = read_manifest(src)
    assert read_manifest(dst) == manifest  # every checksum verifies
    assert manifest["dtype"] == "int8" and source["dtype"] == "float32"
    quantization = manifest["quantization"]
    assert quantization["matrices"] == len(source["layers"])
    assert quantization["scheme"].startswith("int8 symmetric per output row")
    assert manifest["converted_from"]["dtype"] == "float32"
    assert (
        manifest["converted_from"]["compact_sha256"]
        == source["files"][COMPACT_FILE]
    )
    assert set(manifest["files"]) == set(source["files"])
    for rel, sha in source["files"].items():
        if rel != COMPACT_FILE:
            assert manifest["files"][rel] == sha
    assert manifest["files"][COMPACT_FILE] != source["files"][COMPACT_FILE]
    for key in ("config", "sparse_shapes", "layers", "sparsity", "params"):
        assert manifest[key] == source[key]
    assert manifest["ideal_compact_bytes"] < source["ideal_compact_bytes"]
    size = os.path.getsize(os.path.join(dst, COMPACT_FILE))
    assert size < os.path.getsize(os.path.join(src, COMPACT_FILE))


def test_converted_weights_are_within_half_a_scale(converted):
    src, dst, manifest = converted
    fp32 = load_compact(src).state_dict()
    int8 = load_compact(dst).state_dict()
    assert set(fp32) == set(int8)
    gated = {f"{layer['name']}.weight" for layer in manifest["layers"]}
    tensors = load_file(os.path.join(dst, COMPACT_FILE))
    for key, weight in fp32.items():
        if key in gated:
            scales = tensors[f"{key}::scales"]
            rows = weight.abs().max(dim=1).values
            expected = torch.where(rows > 0, rows / QMAX, torch.ones_like(rows))
            torch.testing.assert_close(scales, expected)
            err = (int8[key] - weight).abs()
            assert (err <= scales[:, None] / 2 + 1e-7).all(), key
            assert (int8[key][weight == 0] == 0).all(), key  # pruned: 0
        elif weight.is_floating_point():  # float16 storage
            torch.testing.assert_close(
                int8[key], weight.half().float(), rtol=0, atol=0
            )


def test_converted_folder_loads_as_an_inference_folder(converted, tmp_path):
    src, dst, _ = converted
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    lens = torch.ones(1)
    fp32 = load_asr(src, savedir=tmp_path / "a")
    int8 = load_asr(dst, savedir=tmp_path / "b")
    with torch.no_grad():
        a = fp32.encode_batch(wav, lens)
        b = int8.encode_batch(wav, lens)
        int8.mods.encoder.ssl.model = load_compact(dst, int8_linears=True)
        c = int8.encode_batch(wav, lens)
    assert a.shape == b.shape == c.shape
    assert (a - b).abs().max() < 0.5 and (a - c).abs().max() < 0.5
    assert not torch.equal(a, b)
    q_proj = int8.mods.encoder.ssl.model.encoder.layers[0].attention.q_proj
    assert (
        type(q_proj).__module__
        == "torch.ao.nn.quantized.dynamic.modules.linear"
    )


def _structured_lobe():
    """A tiny structured lobe without a random half of every sub-layer's
    heads / units (fixed masks)."""
    torch.manual_seed(0)
    lobe = spg_lobe(tiny_model_folder(), granularity="structured")
    generator = torch.Generator().manual_seed(0)
    units = [
        torch.rand(sub.units, generator=generator) < 0.5
        for sub in lobe.gate.sublayers
    ]
    lobe.apply_masks(lobe.gate.weight_masks(units, lobe.gated_layers()))
    return lobe.eval()


def _unstructured_lobe():
    torch.manual_seed(0)
    lobe = SPGWav2Vec2(tiny_model_folder(), save_path="", target_sparsity=0.65)
    lobe.hard_prune()
    return lobe.eval()


@pytest.mark.parametrize("make_lobe", [_unstructured_lobe, _structured_lobe])
def test_conversion_writes_what_an_int8_export_writes(make_lobe, tmp_path):
    lobe = make_lobe()
    export_compact(lobe, tmp_path / "fp32")
    direct = export_compact(lobe, tmp_path / "int8", dtype="int8")
    converted = convert_inference_folder(tmp_path / "fp32", tmp_path / "conv")
    a = load_file(str(tmp_path / "int8" / COMPACT_FILE))
    b = load_file(str(tmp_path / "conv" / COMPACT_FILE))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for key in ("dtype", "quantization", "ideal_compact_bytes", "structure"):
        assert converted[key] == direct[key], key
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = load_compact(tmp_path / "int8")(wav).last_hidden_state
        y = load_compact(tmp_path / "conv")(wav).last_hidden_state
        z = load_compact(tmp_path / "conv", int8_linears=True)(wav)
    assert torch.equal(x, y) and z.last_hidden_state.shape == x.shape


def test_conversion_refusals(converted, tmp_path):
    src, dst, _ = converted
    with pytest.raises(ValueError, match="float32 one"):
        convert_inference_folder(dst, tmp_path / "again")
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_inference_folder(src, tmp_path / "x", "int4")
    with pytest.raises(ValueError, match="source folder"):
        convert_inference_folder(src, src)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_inference_folder(src, taken)
    assert os.listdir(taken) == ["file"]
    convert_inference_folder(src, taken, "float16", overwrite=True)
    assert read_manifest(taken)["dtype"] == "float16"
    assert "file" not in os.listdir(taken)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    with open(tampered / COMPACT_FILE, "ab") as f:
        f.write(b" ")
    with pytest.raises(CompactExportError, match="sha256"):
        convert_inference_folder(tampered, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "quantized_study", REPO / "benchmarks" / "quantized_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(folder, work):
    """A run folder as the recipe leaves it: summary, ``compact/``, the
    test CSV files and the recipe's hypotheses."""
    run = work / "run"
    shutil.copytree(folder, run / "compact")
    (run / "save").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"sparsity": {}}))
    rng = np.random.RandomState(0)
    for s, split in enumerate(("test-clean", "test-other")):
        rows = []
        for i in range(3):
            path = work / f"{split}-{i}.wav"
            samples = 8000 + 2000 * i
            soundfile.write(str(path), rng.randn(samples) * 0.1, 16000)
            rows.append((f"{s}-{i}", samples / 16000, str(path), "A B C D"))
        with open(run / "save" / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
            for uid, duration, path, words in rows:
                writer.writerow([uid, duration, path, "1", words])
        with open(run / f"hyps_{split}.jsonl", "w") as f:
            for uid, _, _, words in rows:
                f.write(json.dumps({"id": uid, "ref": words, "hyp": words}))
                f.write("\n")
    return run


def test_quantized_study_on_a_tiny_folder(inference_folder, tmp_path, capsys):
    pytest.importorskip("onnx", reason=ONNX_REASON)
    pytest.importorskip("onnxruntime", reason=ONNX_REASON)
    study = _load_study()
    run = _fake_run(inference_folder, tmp_path)
    out = tmp_path / "study.md"
    try:  # the study flushes subnormals, as the recipe
        text = study.main(
            ["--run", str(run), "--out", str(out), "--batch-size", "2"]
        )
    finally:
        torch.set_flush_denormal(False)
    assert out.read_text() == text and text in capsys.readouterr().out
    names = [
        study.BASELINE,
        study.INT8,
        study.INT8_LINEARS,
        study.ONNX_FP32,
        study.ONNX_INT8,
    ]
    blocks = text.split("\n\n")
    table = next(b for b in blocks if b.startswith("| Variant |"))
    rows = table.splitlines()
    assert len(rows) == 2 + len(names) + 1  # header, variants, the recipe's
    logprob = next(b for b in blocks if b.startswith("| ONNX model |"))
    assert len(logprob.splitlines()) == 4  # header, float32, int8
    assert "against PyTorch in float64" in text
    for name in names:
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 + 3 * 2
        if name == study.BASELINE:
            assert cells[3] == "1.000"
            assert cells[5:7] == ["1", "0"] and cells[8:10] == ["1", "0"]
        folder = run / "quantized_study" / study._slug(name)
        for split in study.SPLITS:
            hyps = load_hypotheses(folder / f"hyps_{split}.jsonl")
            assert len(hyps) == 3
            assert all(ref == "A B C D" for ref, _ in hyps.values())
    assert read_manifest(run / "quantized_study" / "compact_int8")["dtype"] == (
        "int8"
    )
    goals = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(goals) == len(names) + 1  # 4 variants, 2 log-probabilities
    for goal in goals[-2:]:  # float32 ONNX vs PyTorch, alone and padded
        assert "log-probabilities within 0.0001" in goal
        assert goal.endswith("**met**")
    for line in ("Command: `OMP_NUM_THREADS=1 python", "Machine: ", "Commit: "):
        assert line in text


def test_quantized_study_refuses_a_run_without_an_export(tmp_path):
    study = _load_study()
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no compact export"):
        study.ensure_run(str(tmp_path))


def test_convert_command_writes_an_int8_folder(inference_folder, tmp_path):
    """``python -m speechbrain_spg.tools.convert`` as the README gives it:
    an int8 folder that loads; a missing folder: one line, status 2."""
    out = tmp_path / "int8"
    command = [sys.executable, "-m", "speechbrain_spg.tools.convert"]
    done = subprocess.run(
        [*command, str(inference_folder), str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert read_manifest(out)["dtype"] == "int8"
    missing = subprocess.run(
        [*command, str(tmp_path / "nothing"), str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ")
    assert len(missing.stderr.strip().splitlines()) == 1
