"""Tests of ``python -m speechbrain_spg.transcribe``: output, batching,
per-file errors, wrong folders and the module entry point, on a tiny
inference folder with random weights (the transcripts are arbitrary strings:
the command is compared with SpeechBrain's own ``transcribe_file`` and
``transcribe_batch``)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from speechbrain.dataio.preprocess import AudioNormalizer

from speechbrain_spg import transcribe
from speechbrain_spg.tools.inference import (
    load_asr,
)

#: The tiny model's convolutions (kernels 10, 8; strides 5, 4) need 45
#: samples for one frame.
MIN_SAMPLES = 45


@pytest.fixture(scope="module")
def folder(inference_folder):
    """A tiny CTC inference folder (random weights, 65% of gated weights
    pruned; ``conftest.build_inference_folder``)."""
    return str(inference_folder)


@pytest.fixture(scope="module")
def asr(folder, tmp_path_factory):
    """The folder, loaded once as SpeechBrain's ``EncoderASR`` (reference
    transcripts)."""
    return load_asr(folder, savedir=tmp_path_factory.mktemp("savedir"))


def _write(path, samples, rate=16000, channels=1, seed=0, silent=False):
    """Writes noise (or silence) and returns the path as a string."""
    shape = (samples, channels) if channels > 1 else (samples,)
    data = np.random.RandomState(seed).randn(*shape) * 0.1
    soundfile.write(str(path), data * (not silent), rate)
    return str(path)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Audio files of several rates, lengths and formats."""
    work = tmp_path_factory.mktemp("audio")
    files = {
        "a": _write(work / "a.wav", 16000, seed=1),  # 1.0 s
        "b": _write(work / "b.flac", 26460, 44100, channels=2, seed=2),
        "c": _write(work / "c.wav", 6400, 8000, seed=3),  # 0.8 s
        "d": _write(work / "d.wav", 4800, seed=4),  # 0.3 s
        "e": _write(work / "e.flac", 11200, seed=5),  # 0.7 s
        "f": _write(work / "f.wav", 2400, seed=6),  # 0.15 s
        "silence": _write(work / "silence.wav", 8000, silent=True),
        "short": _write(work / "short.wav", MIN_SAMPLES - 1, seed=7),
        "shortest": _write(work / "shortest.wav", MIN_SAMPLES, seed=8),
        "no_samples": _write(work / "no_samples.wav", 0),
        "missing": str(work / "missing.wav"),
    }
    files["corrupt"] = str(work / "corrupt.wav")
    with open(files["corrupt"], "wb") as fout:
        fout.write(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 20)
    files["zero_bytes"] = str(work / "zero_bytes.flac")
    open(files["zero_bytes"], "wb").close()
    return files


def _run(capsys, folder, *args):
    """``main`` on the arguments: exit code, stdout lines, stderr lines."""
    code = transcribe.main([folder, *map(str, args)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def _expected(asr, path):
    return " ".join(asr.transcribe_file(path).split())


def test_output_equals_transcribe_file_one_at_a_time(
    capsys, folder, asr, audio
):
    """``--batch-size 1``: no padding, exactly ``transcribe_file``'s
    transcripts (8 kHz mono, 44.1 kHz stereo flac, 16 kHz), in input order,
    ``path<TAB>transcript``."""
    paths = [audio[k] for k in ("c", "a", "b", "d")]
    code, out, err = _run(capsys, folder, *paths, "--batch-size", "1")
    assert (code, err) == (0, [])
    assert out == [f"{path}\t{_expected(asr, path)}" for path in paths]
    assert all(line.count("\t") == 1 for line in out)
    assert any(line.split("\t")[1] for line in out)  # not all empty
    # resampled to 16 kHz, downmixed: 0.6 s of 44.1 kHz stereo
    wav = transcribe.read_audio(audio["b"], asr.audio_normalizer)
    assert wav.shape == (9600,)


def test_batches_are_speechbrain_batches(capsys, folder, asr, audio):
    """``--batch-size 3``: files sorted by length (longest first) and
    zero-padded; each line is SpeechBrain's ``transcribe_batch`` of that
    batch, and the longest file of each batch (no padding) gets exactly its
    ``transcribe_file`` transcript."""
    paths = [audio[k] for k in ("d", "a", "f", "c", "e", "b", "silence")]
    code, out, err = _run(capsys, folder, *paths, "--batch-size", "3")
    assert (code, err) == (0, [])
    assert [line.split("\t")[0] for line in out] == paths
    got = dict(line.split("\t") for line in out)
    by_length = ["a", "c", "e", "b", "silence", "d", "f"]  # 1.0 s ... 0.15 s
    for start in range(0, len(by_length), 3):
        group = [audio[k] for k in by_length[start : start + 3]]
        wavs = [transcribe.read_audio(p, asr.audio_normalizer) for p in group]
        assert [len(w) for w in wavs] == sorted(map(len, wavs), reverse=True)
        texts, _ = asr.transcribe_batch(*transcribe.pad_batch(wavs))
        assert [got[p] for p in group] == [" ".join(t.split()) for t in texts]
        assert got[group[0]] == _expected(asr, group[0])


def test_padding_adds_at_most_trailing_tokens(folder, asr, audio):
    """Why a padded file can differ from ``transcribe_file``: besides
    ``normalize_wav`` (the lobe normalises the padded waveform as a whole),
    the CTC decoder takes round(relative length * frames) frames, which can
    include a padding frame or two: without ``normalize_wav`` a padded
    file's transcript starts with its single-file transcript."""
    paths = [audio[k] for k in ("a", "c", "e", "d", "f")]
    ssl = asr.mods.encoder.ssl
    assert ssl.normalize_wav
    ssl.normalize_wav = False
    try:
        single = transcribe.transcribe_files(asr, paths, batch_size=1)
        batched = transcribe.transcribe_files(asr, paths, batch_size=5)
    finally:
        ssl.normalize_wav = True
    assert batched[0] == single[0]  # the longest: no padding
    for (_, alone, _), (_, padded, _) in zip(single, batched):
        assert padded.replace(" ", "").startswith(alone.replace(" ", ""))


def test_directories_expand_to_sorted_audio_files(capsys, folder, tmp_path):
    """A directory becomes every .wav/.flac below it, sorted, in place of
    the directory on the command line; other files are ignored."""
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    inside = [
        _write(tmp_path / "dir" / "sub" / "x.flac", 3000, seed=1),
        _write(tmp_path / "dir" / "y.WAV", 3000, seed=2),
        _write(tmp_path / "dir" / "z.wav", 3000, seed=3),
    ]
    (tmp_path / "dir" / "notes.txt").write_text("not audio")
    first = _write(tmp_path / "first.wav", 3000, seed=4)
    last = _write(tmp_path / "last.flac", 3000, seed=5)
    code, out, err = _run(capsys, folder, first, tmp_path / "dir", last)
    assert (code, err) == (0, [])
    assert [line.split("\t")[0] for line in out] == [first, *inside, last]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("missing", "no such file"),
        ("corrupt", "cannot read audio"),
        ("no_samples", "empty audio (no samples)"),
        ("zero_bytes", "empty file (0 bytes)"),
        ("short", f"too short: {MIN_SAMPLES - 1} samples"),
    ],
)
def test_a_bad_file_is_one_error_line(capsys, folder, audio, bad, reason):
    """One stderr line names the file and why; the other files (before and
    after it, in the same batch) are transcribed as without it; exit code
    1."""
    good = [audio["c"], audio["f"]]
    _, without, _ = _run(capsys, folder, *good)
    code, out, err = _run(capsys, folder, good[0], audio[bad], good[1])
    assert code == 1
    assert out == without and [line.split("\t")[0] for line in out] == good
    assert len(err) == 1
    assert err[0].startswith(f"{audio[bad]}: error: {reason}")


def test_minimum_length_and_all_errors_at_once(capsys, folder, asr, audio):
    """The shortest accepted file (45 samples, from the config's kernels and
    strides) is transcribed, one sample less is refused even when padding in
    a batch would hide it; every bad file gets its own line, in input
    order."""
    assert transcribe.model_min_samples(asr) == MIN_SAMPLES
    bad = ["short", "missing", "corrupt", "no_samples", "zero_bytes"]
    paths = [audio["a"], *(audio[k] for k in bad), audio["shortest"]]
    code, out, err = _run(capsys, folder, "--device", "cpu", *paths)
    assert code == 1
    assert [line.split("\t")[0] for line in out] == [
        audio["a"],
        audio["shortest"],
    ]
    assert [line.split(": error: ")[0] for line in err] == [
        audio[k] for k in bad
    ]


def test_silence_is_transcribed(capsys, folder, asr, audio):
    """All-zero samples are audio: a (possibly empty) transcript, exit 0."""
    code, out, err = _run(capsys, folder, audio["silence"])
    assert (code, err) == (0, [])
    assert out == [f"{audio['silence']}\t{_expected(asr, audio['silence'])}"]


def test_model_errors_fall_back_to_one_file_at_a_time(audio):
    """A batch the model refuses is retried file by file: only the file it
    refuses alone is reported."""

    class Asr:
        mods = torch.nn.ModuleDict()
        audio_normalizer = AudioNormalizer(16000)

        def transcribe_batch(self, wavs, wav_lens):
            lengths = (wav_lens * wavs.shape[1]).round().int().tolist()
            if 4800 in lengths:
                raise RuntimeError("refused\nover two lines")
            return [str(n) for n in lengths], None

    paths = [audio["a"], audio["d"], audio["f"]]
    results = transcribe.transcribe_files(Asr(), paths, batch_size=3)
    assert results == [
        (audio["a"], "16000", None),
        (audio["d"], None, "the model failed: refused over two lines"),
        (audio["f"], "2400", None),
    ]


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, folder, audio):
    """Many files on a terminal: a tqdm bar on stderr; none with
    ``--noprogressbar`` (nor when stderr is not a terminal: the other
    tests)."""
    files = [audio["f"]] * transcribe.PROGRESS_MIN_FILES
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = _run(capsys, folder, *files, "--batch-size", "16")
    assert code == 0 and len(out) == len(files)
    assert f"{len(files)}/{len(files)}" in "\n".join(err)
    code, out, err = _run(capsys, folder, *files, "--noprogressbar")
    assert (code, len(out), err) == (0, len(files), [])


def test_wrong_folder_names_what_is_missing(capsys, folder, audio, tmp_path):
    """Exit code 2 with one stderr line naming the missing files, nothing
    transcribed."""
    needed = [
        "hyperparams.yaml",
        "spg_manifest.json",
        "compact.safetensors",
        "head.ckpt",
        "label_encoder.txt or tokenizer.model",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(capsys, str(empty), audio["a"])
    assert (code, out, len(err)) == (2, [], 1)
    assert "not an SPG inference folder" in err[0]
    assert all(name in err[0] for name in needed)

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("hyperparams.yaml", "head.ckpt", "label_encoder.txt"):
        shutil.copy(os.path.join(folder, name), partial)
    code, out, err = _run(capsys, str(partial), audio["a"])
    assert (code, out, len(err)) == (2, [], 1)
    missing = err[0].split("missing ")[1]
    assert "spg_manifest.json" in missing and "compact.safetensors" in missing
    assert "hyperparams.yaml" not in missing and "head.ckpt" not in missing

    code, out, err = _run(capsys, str(tmp_path / "nowhere"), audio["a"])
    assert (code, out, len(err)) == (2, [], 1)
    assert "no such folder" in err[0]


def test_module_entry_point(folder, asr, audio, tmp_path):
    """``python -m speechbrain_spg.transcribe`` in a fresh process (from
    another directory): stdout, one error line, exit code, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "speechbrain_spg.transcribe",
            folder,
            audio["b"],
            audio["missing"],
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        f"{audio['b']}\t{_expected(asr, audio['b'])}"
    ]
    assert run.stderr.splitlines() == [
        f"{audio['missing']}: error: no such file"
    ]


def test_onnx_option_without_the_extra(capsys, monkeypatch, folder, audio):
    """``--onnx`` where onnxruntime cannot be imported (simulated): one
    stderr line naming the extra to install, exit code 2, nothing
    transcribed (``tests/test_onnx.py`` runs the option itself)."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = _run(capsys, folder, audio["a"], "--onnx", "model.onnx")
    assert (code, out) == (2, [])
    assert err == [
        "transcribe --onnx needs the optional package onnxruntime, which is "
        "not installed: pip install speechbrain-spg[onnx]"
    ]


def test_min_samples_of_an_onnx_model():
    """A model that states its ``min_samples`` (``export_onnx.OnnxASR``,
    from the ONNX metadata) is not searched for a configuration."""

    class OnnxLike:
        min_samples = 400

    assert transcribe.model_min_samples(OnnxLike()) == 400
