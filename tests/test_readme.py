"""README.md's Python example runs as written.

The block under "Use SPG from Python" is taken from README.md, its hub id
replaced by a tiny local model (no downloads here), and executed in a
temporary folder: it must train, prune onto the target and export a compact
model that loads back. The blocks of "Deploy and reuse a compressed model"
run on a tiny inference folder (the YAML one: ``tests/test_dropin.py``).
"""

import contextlib
import io
import re
import subprocess
import sys
import warnings

import pytest
import soundfile
import torch

from conftest import REPO
from speechbrain_spg.export import load_compact

README = REPO / "README.md"
HEADING = "## Use SPG from Python (any training loop)"
SOURCE_LINE = 'source = "facebook/wav2vec2-base"'
DEPLOY_HEADING = "## Deploy and reuse a compressed model"
DEPLOY_FOLDER = "results/tiny_spg/1234/compact"


def readme_block(heading, language):
    """The first fenced ``language`` block after ``heading`` in README.md."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert heading in text, f"README.md has no section {heading!r}"
    section = text[text.index(heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


def python_example():
    """The Python block of the plain training loop."""
    return readme_block(HEADING, "python")


def test_examples_use_the_paths_the_test_replaces():
    assert python_example().count(SOURCE_LINE) == 1
    assert readme_block(DEPLOY_HEADING, "bash").count(DEPLOY_FOLDER) == 1
    assert readme_block(DEPLOY_HEADING, "python").count(DEPLOY_FOLDER) == 1


def test_python_example_trains_prunes_and_exports(
    wav2vec2_source, tmp_path, monkeypatch, capsys
):
    code = python_example().replace(
        SOURCE_LINE, f"source = {str(wav2vec2_source)!r}"
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, "README.md example", "exec"), namespace)
    finally:
        # The example flushes subnormals to zero; the other tests expect
        # PyTorch's default.
        torch.set_flush_denormal(False)
    # Nothing the example's own lines do draws a warning (e.g. float() of a
    # tensor that requires grad).
    assert [
        str(w.message) for w in caught if w.filename == "README.md example"
    ] == []
    printed = capsys.readouterr().out
    # Three training steps, each printing the soft sparsity.
    steps = re.findall(r"step (\d): soft sparsity (\d\.\d{3})", printed)
    assert [s for s, _ in steps] == ["0", "1", "2"]
    lobe = namespace["lobe"]
    assert lobe.gate.step_count == 3
    assert lobe.is_pruned
    # Calibrated onto the target: the hard sparsity of the gated weights.
    assert lobe.hard_sparsity() == pytest.approx(0.65, abs=0.005)
    manifest = namespace["manifest"]
    assert manifest["sparsity"]["gated"] == pytest.approx(0.65, abs=0.005)
    assert "gated sparsity 0.6" in printed
    # The export loads back and computes what the pruned lobe computes.
    model = load_compact(tmp_path / "compact_wav2vec2").eval()
    wav = torch.randn(1, 16000)
    lobe.eval()
    with torch.no_grad():
        expected = lobe.model(wav).last_hidden_state
        got = model(wav).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_deploy_examples_transcribe(inference_folder, tmp_path, monkeypatch):
    """The command and the Python lines of "Deploy": the same transcript of
    ``audio.wav`` (a file) and of ``more_audio/`` (a folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "more_audio").mkdir()
    generator = torch.Generator().manual_seed(0)
    for path in ("audio.wav", "more_audio/other.wav"):
        wav = 0.1 * torch.randn(16000, generator=generator)
        soundfile.write(path, wav.numpy(), 16000)
    command = readme_block(DEPLOY_HEADING, "bash").strip()
    command = command.replace(DEPLOY_FOLDER, str(inference_folder))
    assert command.startswith("python -m speechbrain_spg.transcribe ")
    done = subprocess.run(
        [sys.executable, *command.split()[1:]],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [path for path, _ in lines] == ["audio.wav", "more_audio/other.wav"]
    code = readme_block(DEPLOY_HEADING, "python").replace(
        DEPLOY_FOLDER, str(inference_folder)
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md deploy example", "exec"), {})
    assert printed.getvalue().split() == lines[0][1].split()


SMALLEST = "**Smallest files.**"


def test_smallest_file_commands_run(inference_folder, tmp_path, monkeypatch):
    """The ONNX lines of "Smallest files" (after the training command):
    the int8 ONNX model transcribes ``audio.wav``."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is absent")
    monkeypatch.chdir(tmp_path)
    wav = 0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(1))
    soundfile.write("audio.wav", wav.numpy(), 16000)
    lines = readme_block(SMALLEST, "bash").strip().splitlines()
    assert lines[0].startswith("python train.py hparams/tiny_spg.yaml")
    assert "--export_dtype=int8" in lines[0]
    for line in lines[1:]:
        command = line.replace(DEPLOY_FOLDER, str(inference_folder)).split()
        assert command[:2] == ["python", "-m"]
        done = subprocess.run(
            [sys.executable, *command[1:]], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    path, transcript = done.stdout.strip().split("\t")
    assert path == "audio.wav" and (tmp_path / "tiny.onnx").is_file()
