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
HEAD_YAML = """\
ssl_dim: 32
dnn_neurons: 16
output_neurons: {labels}
enc: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <ssl_dim>
    n_neurons: !ref <dnn_neurons>
ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <dnn_neurons>
    n_neurons: !ref <output_neurons>
log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True
"""


def build_inference_folder(source, work):
    """A tiny CTC inference folder in ``work/compact``: the SPG lobe of
    ``source`` pruned to 65% (random weights), a random head and a
    character tokenizer (blank + LibriSpeech's alphabet)."""
    from speechbrain.nnet.linear import Linear

    from speechbrain_spg.lobes import SPGWav2Vec2
    from speechbrain_spg.tools.inference import (
        CharTokenizer,
        copied_definitions,
        inference_hparams,
        write_inference_folder,
    )

    torch.manual_seed(0)
    lobe = SPGWav2Vec2(str(source), save_path="", target_sparsity=0.65)
    lobe.hard_prune()
    tokenizer = CharTokenizer()
    tokenizer.insert_blank(index=0)
    tokenizer.update_from_iterable(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ' ", sequence_input=False
    )
    labels = str(work / "label_encoder.txt")
    tokenizer.save(labels)
    train_yaml = work / "train.yaml"
    train_yaml.write_text(HEAD_YAML.format(labels=len(tokenizer)))
    head = torch.nn.ModuleList(
        [
            Linear(input_size=32, n_neurons=16),
            Linear(input_size=16, n_neurons=len(tokenizer)),
        ]
    )
    keys = ["enc", "ctc_lin", "log_softmax"]
    text = inference_hparams(
        lobe,
        copied_definitions(train_yaml, {}, keys),
        ["enc", "ctc_lin"],
        keys,
        labels=len(tokenizer),
    )
    out = work / "compact"
    write_inference_folder(lobe, out, head, labels, text)
    return out


@pytest.fixture(scope="session")
def inference_folder(wav2vec2_source, tmp_path_factory):
    """A tiny CTC inference folder (see ``build_inference_folder``)."""
    return build_inference_folder(
        wav2vec2_source, tmp_path_factory.mktemp("inference")
    )
