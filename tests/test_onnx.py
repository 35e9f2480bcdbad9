"""Tests of ``python -m speechbrain_spg.export_onnx`` and ``transcribe
--onnx``: the exported model's log-probabilities against PyTorch's (padded
batches, several lengths: dynamic axes), int8 quantisation, structured
exports (smaller matrices; WavLM's shrunk attention is custom code), the
transcripts against PyTorch's, and the message without the optional extra.

The tests that run ONNX Runtime skip where ``onnx`` / ``onnxruntime`` are not
installed (the optional extra ``speechbrain-spg[onnx]``, which the ``test``
extra includes); the missing-extra tests run everywhere.
"""

import os
import shutil
import subprocess
import sys

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from test_structured_export import pruned_structured_lobe

from speechbrain_spg import export_onnx, transcribe
from speechbrain_spg.data.architectures import tiny_inference_folder
from speechbrain_spg.export import read_manifest
from speechbrain_spg.tools.inference import load_asr

REASON = "optional extra speechbrain-spg[onnx] (onnx, onnxruntime) missing"
#: ONNX Runtime (float32) against PyTorch, log-probabilities.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ort():
    """onnxruntime, or the test skips (with onnx, the export needs both)."""
    pytest.importorskip("onnx", reason=REASON)
    return pytest.importorskip("onnxruntime", reason=REASON)


@pytest.fixture(scope="module")
def folder(inference_folder):
    """The tiny CTC inference folder (``conftest.build_inference_folder``)."""
    return str(inference_folder)


@pytest.fixture(scope="module")
def asr(folder, tmp_path_factory):
    """The folder with PyTorch (SpeechBrain's ``EncoderASR``)."""
    return load_asr(folder, savedir=tmp_path_factory.mktemp("savedir"))


@pytest.fixture(scope="module")
def exported(ort, folder, tmp_path_factory):
    """The folder exported by the command, float32 and int8."""
    work = tmp_path_factory.mktemp("onnx")
    paths = {"float32": str(work / "model.onnx")}
    assert export_onnx.main([folder, paths["float32"]]) == 0
    paths["int8"] = str(work / "model.int8.onnx")
    assert export_onnx.main([folder, paths["int8"], "--int8"]) == 0
    return paths


def _probes():
    """A padded batch of two different lengths, and one of another length
    (other than the export's probes)."""
    generator = torch.Generator().manual_seed(11)
    wav = torch.randn(2, 9000, generator=generator) * 0.1
    wav[1, 4321:] = 0
    lens = torch.tensor([1.0, 4321 / 9000])
    other = torch.randn(1, 23456, generator=generator) * 0.1
    return [(wav, lens), (other, torch.ones(1))]


def _onnx_log_probs(session, wav, lens):
    feeds = {"wav": wav.numpy(), "wav_lens": lens.numpy()}
    return session.run(None, feeds)[0]


def _max_diff_to_pytorch(ort, path, asr):
    """Largest |ONNX Runtime - PyTorch| over the probes, and the shapes."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diff, shapes = 0.0, []
    for wav, lens in _probes():
        got = _onnx_log_probs(session, wav, lens)
        with torch.no_grad():
            expected = asr.encode_batch(wav, lens).numpy()
        assert got.shape == expected.shape
        shapes.append(got.shape)
        diff = max(diff, float(np.abs(got - expected).max()))
    return diff, shapes


def test_export_matches_pytorch(ort, folder, asr, exported, capsys):
    """float32: within 1e-4 of PyTorch on a padded batch of two lengths and
    a batch of one of a third length (dynamic batch, samples and frames);
    the metadata says how to decode."""
    diff, shapes = _max_diff_to_pytorch(ort, exported["float32"], asr)
    print(f"float32 ONNX vs PyTorch: max abs diff {diff:.3g}")
    assert diff < TOLERANCE
    assert shapes == [(2, 448, 29), (1, 1171, 29)]
    metadata = export_onnx.read_metadata(exported["float32"])
    assert metadata["format"] == export_onnx.FORMAT
    expected = {
        "blank_index": "0",
        "vocab_size": "29",
        "sample_rate": "16000",
        "min_samples": "45",
        "samples_per_frame": "20",
        "frame_rate": "800",
        "tokenizer_file": "label_encoder.txt",
        "token_type": "char",
        "decoding": "greedy",
        "model_type": "wav2vec2",
        "structured": "false",
        "precision": "float32",
        "exporter": "torchscript",
        "opset": "17",
    }
    assert {k: metadata[k] for k in expected} == expected
    session = ort.InferenceSession(exported["float32"])
    assert [i.name for i in session.get_inputs()] == ["wav", "wav_lens"]
    assert [o.name for o in session.get_outputs()] == ["log_probs"]
    assert session.get_inputs()[0].shape == ["batch", "samples"]
    assert session.get_outputs()[0].shape == ["batch", "frames", 29]


def test_int8_runs_and_mostly_agrees(ort, folder, exported):
    """int8 (``quantize_dynamic`` of the matrix products): integer matrix
    products in the graph, a smaller file, transcripts produced; greedy labels agree with float32 on
    most frames (reported)."""
    import onnx

    ops = {node.op_type for node in onnx.load(exported["int8"]).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert "ConvInteger" not in ops  # the convolutions stay float32
    assert os.path.getsize(exported["int8"]) < os.path.getsize(
        exported["float32"]
    )
    assert export_onnx.read_metadata(exported["int8"])["precision"] == "int8"
    fp32 = export_onnx.OnnxASR(exported["float32"], folder)
    int8 = export_onnx.OnnxASR(exported["int8"], folder)
    agree, frames, same_texts, texts, pairs = 0, 0, 0, 0, []
    for wav, lens in _probes():
        a, b = fp32.log_probs(wav, lens), int8.log_probs(wav, lens)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        frames += a.shape[0] * a.shape[1]
        text_a, _ = fp32.transcribe_batch(wav, lens)
        text_b, _ = int8.transcribe_batch(wav, lens)
        assert all(text_b) and len(text_b) == len(text_a)
        same_texts += sum(x == y for x, y in zip(text_a, text_b))
        texts += len(text_a)
        pairs += list(zip(text_a, text_b))
    cer = jiwer.cer([a for a, _ in pairs], [b for _, b in pairs])
    print(
        f"int8 vs float32: {agree / frames:.1%} of frames with the same "
        f"label, {same_texts}/{texts} identical transcripts, character "
        f"error rate of int8 against float32 {cer:.1%}"
    )
    assert agree / frames > 0.9


def _structured_folder(model_type, work):
    """A tiny CTC inference folder of a structured lobe whose first block
    lost every head, the second half its heads, every feed-forward a random
    half of its units (``tests/test_structured_export.py``'s lobe)."""
    lobe, _ = pruned_structured_lobe(model_type)
    return str(tiny_inference_folder(work, lobe=lobe))


@pytest.mark.parametrize("model_type", ["wav2vec2", "hubert", "wavlm"])
def test_structured_export_matches_pytorch(ort, model_type, tmp_path):
    """A structured folder (a block without attention, smaller matrices;
    WavLM's shrunk attention is speechbrain-spg's own code) exports with its
    smaller matrices and matches PyTorch."""
    import onnx

    folder = _structured_folder(model_type, tmp_path)
    out = str(tmp_path / "structured.onnx")
    result = export_onnx.export_onnx(folder, out)
    assert result["structured"] == "true"
    assert result["model_type"] == model_type
    assert result["max_abs_diff"] < TOLERANCE
    asr = load_asr(folder, savedir=tmp_path / "savedir")
    diff, shapes = _max_diff_to_pytorch(ort, out, asr)
    print(f"structured {model_type} ONNX vs PyTorch: max abs diff {diff:.3g}")
    assert diff < TOLERANCE
    assert shapes == [(2, 448, 29), (1, 1171, 29)]  # blank + 28 characters
    # stored: the feed-forward matrices of the kept units (transposed for
    # MatMul), the kept head of block 1 (q, k, v: 32 x 16), no full-size
    # feed-forward (32 x 64) nor attention (32 x 32) matrix
    sizes = [tuple(init.dims) for init in onnx.load(out).graph.initializer]
    ffn = read_manifest(folder)["structure"]["intermediate_sizes"]
    assert 0 < min(ffn) and max(ffn) < 64
    assert all((32, n) in sizes and (n, 32) in sizes for n in ffn)
    assert sizes.count((32, 16)) >= 3
    assert (32, 64) not in sizes and (32, 32) not in sizes


def test_dynamo_exporter(ort, folder, asr, tmp_path):
    """``--dynamo`` (the ``torch.export`` exporter, opset 18) gives the same
    log-probabilities; ``--opset 17`` with it is refused."""
    pytest.importorskip("onnxscript", reason=REASON + " (onnxscript)")
    out = str(tmp_path / "dynamo.onnx")
    assert export_onnx.main([folder, out, "--dynamo"]) == 0
    diff, _ = _max_diff_to_pytorch(ort, out, asr)
    assert diff < TOLERANCE
    metadata = export_onnx.read_metadata(out)
    assert (metadata["exporter"], metadata["opset"]) == ("dynamo", "18")
    with pytest.raises(ValueError, match="opset 18 or newer"):
        export_onnx.export_onnx(folder, out, opset=17, dynamo=True)


def _write(path, samples, rate=16000, seed=0):
    data = np.random.RandomState(seed).randn(samples) * 0.1
    soundfile.write(str(path), data, rate)
    return str(path)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Audio files of several lengths and rates, a too-short and a missing
    one."""
    work = tmp_path_factory.mktemp("audio")
    return {
        "a": _write(work / "a.wav", 16000, seed=1),
        "b": _write(work / "b.wav", 6400, 8000, seed=2),
        "c": _write(work / "c.flac", 4800, seed=3),
        "d": _write(work / "d.wav", 2400, seed=4),
        "short": _write(work / "short.wav", 44, seed=5),
        "missing": str(work / "missing.wav"),
    }


def _run(capsys, *argv):
    code = transcribe.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_transcribe_onnx_prints_the_pytorch_transcripts(
    capsys, folder, exported, audio, batch_size
):
    """``--onnx`` prints what PyTorch prints (alone and in padded batches),
    with the same per-file errors and exit code."""
    paths = [audio[k] for k in ("d", "a", "short", "b", "missing", "c")]
    args = [folder, *paths, "--batch-size", batch_size]
    code, out, err = _run(capsys, *args)
    assert code == 1 and len(out) == 4 and len(err) == 2
    assert any(line.split("\t")[1] for line in out)
    assert _run(capsys, *args, "--onnx", exported["float32"]) == (
        code,
        out,
        err,
    )
    code8, out8, err8 = _run(capsys, *args, "--onnx", exported["int8"])
    assert (code8, err8) == (code, err)
    assert [line.split("\t")[0] for line in out8] == [
        line.split("\t")[0] for line in out
    ]


def test_transcribe_onnx_refusals(capsys, folder, exported, audio, tmp_path):
    """Exit code 2 and one line: no such model, not a model, a folder
    whose tokenizer is not the exported one, a folder without one."""
    missing = tmp_path / "missing.onnx"
    code, out, err = _run(capsys, folder, audio["a"], "--onnx", missing)
    assert (code, out, len(err)) == (2, [], 1)
    assert "no such ONNX file" in err[0] and "export_onnx" in err[0]

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, out, err = _run(capsys, folder, audio["a"], "--onnx", junk)
    assert (code, out, len(err)) == (2, [], 1)
    assert "not a readable ONNX model" in err[0]

    other = tmp_path / "other"
    other.mkdir()
    (other / "label_encoder.txt").write_text("'A' => 0\n")
    code, out, err = _run(
        capsys, other, audio["a"], "--onnx", exported["float32"]
    )
    assert (code, out, len(err)) == (2, [], 1)
    assert "is not the tokenizer" in err[0]

    os.remove(other / "label_encoder.txt")
    code, out, err = _run(
        capsys, other, audio["a"], "--onnx", exported["float32"]
    )
    assert (code, out, len(err)) == (2, [], 1)
    assert "label_encoder.txt: missing" in err[0]


def test_export_refusals(ort, folder, capsys, tmp_path):
    """Exit code 2 and one line naming what is wrong: a folder that is not
    an inference folder, a joint CTC/attention folder, an output folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_onnx.main([str(empty), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not an SPG inference folder" in err[0]

    joint = tmp_path / "joint"
    shutil.copytree(folder, joint)
    hparams = joint / "hyperparams.yaml"
    hparams.write_text(
        hparams.read_text().replace(
            "asr_interface: EncoderASR", "asr_interface: EncoderDecoderASR"
        )
    )
    assert export_onnx.main([str(joint), str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "CTC folders (EncoderASR) only" in err[0]

    assert export_onnx.main([folder, str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is a folder" in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_missing_extra_in_process(monkeypatch, capsys, folder, tmp_path):
    """Without onnx and onnxruntime (simulated): one line naming them and
    the extra to install, exit code 2, nothing written."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "model.onnx"
    assert export_onnx.main([folder, str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert captured.err.splitlines() == [
        "speechbrain_spg.export_onnx needs the optional packages onnx, "
        "onnxruntime, which are not installed: pip install "
        "speechbrain-spg[onnx]"
    ]


def test_missing_extra_entry_point(folder, tmp_path):
    """``python -m speechbrain_spg.export_onnx`` in a fresh process where
    neither onnx nor onnxruntime can be imported (simulated): exit status
    2, the install hint, no traceback."""
    code = (
        "import runpy, sys\n"
        "sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
        f"sys.argv = ['export_onnx', {folder!r}, 'model.onnx']\n"
        "runpy.run_module('speechbrain_spg.export_onnx', run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "speechbrain_spg.export_onnx needs the optional packages onnx, "
        "onnxruntime, which are not installed: pip install "
        "speechbrain-spg[onnx]"
    ]
    assert not (tmp_path / "model.onnx").exists()
