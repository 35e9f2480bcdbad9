"""Shared fixtures: tiny random wav2vec2 / HuBERT / WavLM folders, no network.

Every model the tests load is a local folder written by
``speechbrain_spg.data.architectures.save_random_model``; nothing is downloaded.
"""

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from speechbrain_spg.data.architectures import (  # noqa: E402
    TINY_OVERRIDES,
    build_config,
    save_random_model,
    tiny_inference_folder,
)

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "recipes" / "LibriSpeech" / "spg"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def device_reads(fn):
    """How many times ``fn`` reads a tensor value back to Python
    (``aten::_local_scalar_dense``: ``.item()``, ``int(t)``, indexing with a
    0-d tensor); on a GPU each is a synchronisation."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        fn()
    return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


def recipe_env():
    """Environment of a recipe subprocess: offline, one thread per process."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
    }


def read_json(path):
    """Contents of a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_markdown_table(text):
    """Rows of the first Markdown table in ``text`` as header -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, separator, *body = cells
    assert all(set(cell) <= set("-:") for cell in separator)
    return [dict(zip(header, row, strict=True)) for row in body]


def assert_png(path):
    """Checks that ``path`` is a PNG image of a real plot (not a stub)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])
    assert data[12:16] == b"IHDR"
    assert width > 200 and height > 200
    assert len(data) > 5000


@pytest.fixture(scope="session")
def train_module():
    """The recipe's train.py, imported under a private module name."""
    spec = importlib.util.spec_from_file_location(
        "spg_recipe_train", RECIPE_DIR / "train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    """Model type -> local folder of a tiny randomly initialised model."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        model_type: save_random_model(
            build_config(model_type, **TINY_OVERRIDES), root / model_type
        )
        for model_type in MODEL_TYPES
    }


@pytest.fixture(scope="session")
def wav2vec2_source(tiny_sources):
    """Folder of the tiny wav2vec2 model."""
    return tiny_sources["wav2vec2"]


@pytest.fixture(scope="session")
def hubert_source(tiny_sources):
    """Folder of the tiny HuBERT model."""
    return tiny_sources["hubert"]


@pytest.fixture(scope="session")
def wavlm_source(tiny_sources):
    """Folder of the tiny WavLM model."""
    return tiny_sources["wavlm"]


#: A training YAML's head, as the inference folder fixture copies it.
def build_inference_folder(source, work):
    """A tiny CTC inference folder in ``work/compact``
    (``data.architectures.tiny_inference_folder`` of ``source``)."""
    return tiny_inference_folder(work, source)


@pytest.fixture(scope="session")
def inference_folder(wav2vec2_source, tmp_path_factory):
    """A tiny CTC inference folder (see ``build_inference_folder``)."""
    return build_inference_folder(
        wav2vec2_source, tmp_path_factory.mktemp("inference")
    )
