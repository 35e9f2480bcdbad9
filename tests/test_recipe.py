"""End-to-end tests of the LibriSpeech SPG recipe and of every shipped YAML.

Nothing is downloaded: the full-size YAMLs are instantiated on local folders
that hold their architectures with random weights (``save_random_model`` of
``hub_config``), and ``train.py`` runs on a tiny synthetic corpus in the
LibriSpeech layout with a tiny random wav2vec2. Recipe runs go through a
subprocess, as a user would start them (``python train.py <yaml> ...``,
``torchrun ...``), with one epoch of a few utterances each.

The tiny SSL model of the runs is ``TINY_OVERRIDES`` with a 160-sample hop
(100 frames per second instead of 800: ten times cheaper, and closer to the
320-sample hop of the real models) and no LayerDrop (as the shipped tiny
model, see ``tiny_w2v2_dense.yaml``).
"""

import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ruamel.yaml
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio
from speechbrain.integrations.huggingface.hubert import HuBERT
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.metric_stats import ErrorRateStats

from conftest import (
    RECIPE_DIR,
    REPO,
    assert_png,
    parse_markdown_table,
    read_json,
    recipe_env,
)
from speechbrain_spg.data.architectures import (
    TINY_OVERRIDES,
    build_config,
    hub_config,
    save_random_model,
)
from speechbrain_spg.evaluation import compare
from speechbrain_spg.evaluation.summary import format_table
from speechbrain_spg.export import (
    COMPACT_FILE,
    MANIFEST,
    load_compact,
    read_manifest,
)
from speechbrain_spg.lobes import SPGHuBERT, SPGWav2Vec2, SPGWavLM, x86_cpu
from speechbrain_spg.tools.inference import load_asr
from speechbrain_spg.tools.trace import history_clock, save_history

FRAGMENT_DIR = REPO / "hparams"

WAV2VEC2_BASE = "facebook/wav2vec2-base"
HUBERT_LARGE = "facebook/hubert-large-ll60k"
WAVLM_BASE_PLUS = "microsoft/wavlm-base-plus"

#: All parameters of the three architectures (HF ``*Model`` classes).
TOTAL_PARAMS = {
    WAV2VEC2_BASE: 94_371_712,
    HUBERT_LARGE: 315_438_720,
    WAVLM_BASE_PLUS: 94_381_936,
}

#: YAML -> (architecture, lobe class, target_sparsity, target_scope).
FULL_SIZE_YAMLS = {
    "wav2vec2_base_spg.yaml": (WAV2VEC2_BASE, SPGWav2Vec2, 0.65, "model"),
    "wav2vec2_base_spg_4x.yaml": (WAV2VEC2_BASE, SPGWav2Vec2, 0.765, "model"),
    "wav2vec2_base_ump.yaml": (WAV2VEC2_BASE, SPGWav2Vec2, 0.65, "model"),
    "wav2vec2_base_dense.yaml": (WAV2VEC2_BASE, Wav2Vec2, None, None),
    "hubert_large_spg.yaml": (HUBERT_LARGE, SPGHuBERT, 0.60, "model"),
    "hubert_large_ump.yaml": (HUBERT_LARGE, SPGHuBERT, 0.60, "model"),
    "hubert_large_dense.yaml": (HUBERT_LARGE, HuBERT, None, None),
    "wav2vec2_base_spg_structured.yaml": (
        WAV2VEC2_BASE,
        SPGWav2Vec2,
        0.5,
        "gated",
    ),
    "wav2vec2_base_ump_structured.yaml": (
        WAV2VEC2_BASE,
        SPGWav2Vec2,
        0.5,
        "gated",
    ),
    "hubert_large_spg_structured.yaml": (HUBERT_LARGE, SPGHuBERT, 0.5, "gated"),
    "hubert_large_ump_structured.yaml": (HUBERT_LARGE, SPGHuBERT, 0.5, "gated"),
}

#: Gated targets the full-size YAMLs must end up with (model scope converted).
EXPECTED_GATED_TARGETS = {
    "wav2vec2_base_spg.yaml": 0.72222,
    "wav2vec2_base_spg_4x.yaml": 0.85000,
    "wav2vec2_base_ump.yaml": 0.72222,
    "hubert_large_spg.yaml": 0.62672,
    "hubert_large_ump.yaml": 0.62672,
    "wav2vec2_base_spg_structured.yaml": 0.5,
    "wav2vec2_base_ump_structured.yaml": 0.5,
    "hubert_large_spg_structured.yaml": 0.5,
    "hubert_large_ump_structured.yaml": 0.5,
}

#: Tiny YAML -> (method, lobe class).
TINY_YAMLS = {
    "tiny_spg.yaml": ("spg", SPGWav2Vec2),
    "tiny_spg_ctc_att.yaml": ("spg", SPGWav2Vec2),
    "tiny_ump.yaml": ("ump", SPGWav2Vec2),
    "tiny_spg_structured.yaml": ("spg", SPGWav2Vec2),
    "tiny_ump_structured.yaml": ("ump", SPGWav2Vec2),
    "tiny_w2v2_dense.yaml": ("dense", Wav2Vec2),
    "tiny_dense.yaml": ("dense", Wav2Vec2),
}

#: Drop-in fragment -> (architecture, lobe class, target_sparsity).
FRAGMENTS = {
    "spg_wav2vec2_base.yaml": (WAV2VEC2_BASE, SPGWav2Vec2, 0.65),
    "spg_hubert_large.yaml": (HUBERT_LARGE, SPGHuBERT, 0.60),
    "spg_wavlm_base_plus.yaml": (WAVLM_BASE_PLUS, SPGWavLM, 0.65),
}

#: The shared SPG lobe block, and the YAMLs (recipe's, then the drop-in
#: fragments) using it.
SHARED_BLOCK = FRAGMENT_DIR / "spg_lobe.yaml"
SHARED_BLOCK_USERS = {
    "tiny_spg.yaml",
    "tiny_spg_ctc_att.yaml",
    "tiny_ump.yaml",
    "wav2vec2_base_spg.yaml",
    "wav2vec2_base_spg_4x.yaml",
    "wav2vec2_base_ump.yaml",
    "hubert_large_spg.yaml",
    "hubert_large_ump.yaml",
    "tiny_spg_structured.yaml",
    "tiny_ump_structured.yaml",
    "wav2vec2_base_spg_structured.yaml",
    "wav2vec2_base_ump_structured.yaml",
    "hubert_large_spg_structured.yaml",
    "hubert_large_ump_structured.yaml",
    "spg_wav2vec2_base.yaml",
    "spg_hubert_large.yaml",
    "spg_wavlm_base_plus.yaml",
}

#: SentencePiece vocabulary small enough for the few training sentences.
BPE_VOCAB = 30
TINY_SSL_DIM = 32
#: Size of the synthetic corpus, and its training utterances at that size.
CORPUS_HOURS = 0.003
TRAIN_UTTERANCES = 5
RUN_TIMEOUT_S = 300


def gated_params_of(config):
    """Weights of the q/k/v/out and feed-forward matrices of every block."""
    hidden, inner = config.hidden_size, config.intermediate_size
    per_block = 4 * hidden * hidden + 2 * hidden * inner
    return config.num_hidden_layers * per_block


def load_yaml(path, overrides):
    """Loads (and instantiates) a YAML file with HyperPyYAML."""
    with open(path, encoding="utf-8") as fin:
        return load_hyperpyyaml(fin, overrides)


# --------------------------------------------------------------------------
# Session fixtures: random full-size architectures, tiny model, tiny corpus
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def full_size_dir(tmp_path_factory):
    """Yields a function: hub id -> folder of that architecture (random).

    Each folder is written once per session (HuBERT-large is ~1.3 GB) and
    deleted at the end of the session.
    """
    root = tmp_path_factory.mktemp("full_size_models")
    folders = {}

    def folder(hub_id):
        if hub_id not in folders:
            path = root / hub_id.replace("/", "__")
            folders[hub_id] = save_random_model(hub_config(hub_id), path)
        return folders[hub_id]

    yield folder
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def recipe_ssl_source(tmp_path_factory):
    """Tiny random wav2vec2 for recipe runs (100 frames/s, no LayerDrop)."""
    config = build_config(
        "wav2vec2",
        **{
            **TINY_OVERRIDES,
            "conv_kernel": (10, 16),
            "conv_stride": (10, 16),
            "layerdrop": 0.0,
        },
    )
    return save_random_model(config, tmp_path_factory.mktemp("recipe_ssl"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """LibriSpeech-layout tree of short eSpeak NG utterances."""
    from speechbrain_spg.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    summary = generate_corpus(out, hours=CORPUS_HOURS, seed=11, progress=False)
    assert (
        summary["splits"]["train-clean-100"]["utterances"] == TRAIN_UTTERANCES
    )
    return str(out / "LibriSpeech")


# --------------------------------------------------------------------------
# 1. YAML files
# --------------------------------------------------------------------------


def test_every_shipped_yaml_is_covered():
    recipe = {p.name for p in (RECIPE_DIR / "hparams").glob("*.yaml")}
    fragments = {p.name for p in FRAGMENT_DIR.glob("*.yaml")}
    assert recipe == set(FULL_SIZE_YAMLS) | set(TINY_YAMLS)
    assert fragments == set(FRAGMENTS) | {SHARED_BLOCK.name}


#: Lines of the knobs' explanations, which only the shared block holds.
KNOB_EXPLANATIONS = (
    "fixed quadratic term of the sparsity regulariser",
    "the backward pass computes the gated weights",
    "the final pruning scales all thresholds by one factor",
)


def test_every_spg_yaml_takes_the_lobe_from_the_shared_block():
    """Every SPG and UMP YAML of the recipe, and every drop-in fragment,
    builds its lobe by including the one shared SPG block (whose lobe
    follows the model's architecture), passes it only knobs the block
    explains (top-level keys of the YAML, so that the command line can set
    them), and repeats none of the explanations."""
    text = SHARED_BLOCK.read_text(encoding="utf-8")
    with open(SHARED_BLOCK, encoding="utf-8") as fin:
        root = ruamel.yaml.YAML().load(fin)
    assert root.tag.value == "!apply:speechbrain_spg.lobes.spg_lobe"
    explained = text
    assert all(line in explained for line in KNOB_EXPLANATIONS)
    including = set()
    recipe_yamls = sorted((RECIPE_DIR / "hparams").glob("*.yaml"))
    fragments = [FRAGMENT_DIR / name for name in sorted(FRAGMENTS)]
    for path in recipe_yamls + fragments:
        yaml_text = path.read_text(encoding="utf-8")
        assert not any(line in yaml_text for line in KNOB_EXPLANATIONS)
        with open(path, encoding="utf-8") as fin:
            raw = ruamel.yaml.YAML().load(fin)
        lobe = raw["ssl"] if path.parent != FRAGMENT_DIR else raw["lobe"]
        include = os.path.relpath(SHARED_BLOCK, path.parent)
        tag = getattr(lobe, "tag", None)
        if tag is None or tag.value != f"!include:{include}":
            continue
        including.add(path.name)
        for knob, value in lobe.items():
            if knob in ("source", "save_path"):
                continue
            explains = rf"^# (\w+, )*{knob}[,:]"
            assert re.search(explains, explained, re.MULTILINE), knob
            if knob in ("freeze", "inject_sparsity_loss"):  # fixed values
                continue
            assert value.value == f"<{knob}>", (path.name, knob)
            assert knob in raw, (path.name, knob)
    assert including == SHARED_BLOCK_USERS
    assert "output_norm: True" in text


def test_recipe_readme_lists_every_yaml_with_its_method():
    """The recipe folder's README has one table row per YAML, naming the
    method the YAML sets."""
    readme = (RECIPE_DIR / "README.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `([\w.]+\.yaml)` \| [^|]+ \| (\w+) \|", readme, re.M
    )
    methods = {}
    for path in (RECIPE_DIR / "hparams").glob("*.yaml"):
        with open(path, encoding="utf-8") as fin:
            methods[path.name] = ruamel.yaml.YAML().load(fin)["method"]
    assert dict(rows) == methods


@pytest.mark.parametrize("name", sorted(FULL_SIZE_YAMLS))
def test_full_size_yaml_needs_data_folder(name):
    path = RECIPE_DIR / "hparams" / name
    with open(path, encoding="utf-8") as fin:
        with pytest.raises(ValueError, match="'data_folder' is a !PLACEHOLDER"):
            resolve_references(fin, {"ssl_source": "unused"})
    with open(path, encoding="utf-8") as fin:
        raw = ruamel.yaml.YAML().load(fin)
    assert raw["ssl_source"] == FULL_SIZE_YAMLS[name][0]


#: The SPG recipe YAMLs (method spg).
SPG_YAMLS = sorted(
    [name for name in FULL_SIZE_YAMLS if "_spg" in name]
    + [name for name, (method, _) in TINY_YAMLS.items() if method == "spg"]
)


@pytest.mark.parametrize("name", SPG_YAMLS)
def test_spg_yaml_takes_the_lobe_knobs_from_the_command_line(name):
    """The README's knobs ``--gate_impl`` and ``--recompute_gated_weights``
    are top-level keys of every SPG YAML, passed on to the lobe (the
    recipe refuses an override of a key the YAML lacks: KeyError)."""
    path = RECIPE_DIR / "hparams" / name
    overrides = {
        "gate_impl": "reference",
        "recompute_gated_weights": True,
        "data_folder": "unused",
        "ssl_source": "unused",
    }
    with open(path, encoding="utf-8") as fin:
        resolved = resolve_references(
            fin, overrides, overrides_must_match=True
        ).getvalue()
    lobe = ruamel.yaml.YAML().load(resolved)["ssl"]
    assert lobe.tag.value == "!apply:speechbrain_spg.lobes.spg_lobe"
    assert lobe["gate_impl"] == "reference"
    assert lobe["recompute_gated_weights"] is True


@pytest.mark.parametrize("name", sorted(FULL_SIZE_YAMLS))
def test_full_size_yaml_instantiates(
    name, full_size_dir, tmp_path, train_module
):
    hub_id, lobe_class, target, scope = FULL_SIZE_YAMLS[name]
    source = full_size_dir(hub_id)
    path = RECIPE_DIR / "hparams" / name
    hparams = load_yaml(
        path,
        {
            "ssl_source": source,
            "data_folder": "unused",
            "output_folder": str(tmp_path / "out"),
        },
    )
    train_module.check_hparams(hparams, str(path))
    lobe = hparams["ssl"]
    assert type(lobe) is lobe_class
    assert set(hparams["modules"]) == {"ssl", "enc", "ctc_lin"}
    assert hparams["ssl_dim"] == hub_config(hub_id).hidden_size
    assert hparams["decoder"] == "ctc" and hparams["token_type"] == "char"
    total = sum(p.numel() for p in lobe.model.parameters())
    assert total == TOTAL_PARAMS[hub_id]
    if lobe_class in (Wav2Vec2, HuBERT):
        assert hparams["method"] == "dense"
        assert all(p.requires_grad for p in lobe.model.encoder.parameters()), (
            "dense fine-tuning must train the encoder (freeze: False)"
        )
        return
    gated = gated_params_of(hub_config(hub_id))
    assert lobe.gated_params == gated
    assert lobe.spg_options.target_sparsity == target
    assert lobe.spg_options.target_scope == scope
    assert lobe.spg_options.inject_sparsity_loss is False
    # Long GPU runs take the compiled gate kernels (UMP never gates).
    expected_impl = "compiled" if hparams["method"] == "spg" else "fused"
    assert lobe.spg_options.gate_impl == expected_impl
    ratio = TOTAL_PARAMS[hub_id] / gated if scope == "model" else 1.0
    assert lobe.gated_target == pytest.approx(target * ratio, rel=1e-12)
    assert lobe.gated_target == pytest.approx(
        EXPECTED_GATED_TARGETS[name], abs=1e-5
    )
    structured = "structured" in name
    assert lobe.structured == structured
    assert len(lobe.gate.sublayers if structured else lobe.gated_names) == (
        2 * hub_config(hub_id).num_hidden_layers * (1 if structured else 3)
    )


@pytest.mark.parametrize("name", sorted(TINY_YAMLS))
def test_tiny_yaml_instantiates(
    name, recipe_ssl_source, tmp_path, train_module
):
    method, lobe_class = TINY_YAMLS[name]
    path = RECIPE_DIR / "hparams" / name
    overrides = {
        "ssl_source": recipe_ssl_source,
        "ssl_dim": TINY_SSL_DIM,
        "synthetic_corpus": None,
        "init_from": None,
        "output_folder": str(tmp_path / "out"),
    }
    hparams = load_yaml(path, overrides)
    train_module.check_hparams(hparams, str(path))
    assert hparams["method"] == method
    assert type(hparams["ssl"]) is lobe_class
    assert hparams["ssl"].model.config.hidden_size == TINY_SSL_DIM
    if hparams["decoder"] == "ctc_attention":
        assert {"emb", "dec", "seq_lin"} <= set(hparams["modules"])


def test_tiny_dense_yaml_creates_its_random_model(tmp_path):
    """As shipped, tiny_w2v2_dense.yaml writes its own random wav2vec2."""
    out = tmp_path / "dense"
    hparams = load_yaml(
        RECIPE_DIR / "hparams" / "tiny_w2v2_dense.yaml",
        {"output_folder": str(out)},
    )
    init = out / "save" / "random_init"
    assert hparams["ssl_source"] == str(init)
    assert sorted(os.listdir(init)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    with open(init / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["hidden_size"] == hparams["ssl_dim"] == 192
    assert config["layerdrop"] == 0.0
    assert type(hparams["ssl"]) is Wav2Vec2


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_dropin_fragment_instantiates(name, full_size_dir, tmp_path):
    hub_id, lobe_class, target = FRAGMENTS[name]
    hparams = load_yaml(
        FRAGMENT_DIR / name,
        {"source": full_size_dir(hub_id), "save_path": str(tmp_path)},
    )
    lobe = hparams["lobe"]
    assert type(lobe) is lobe_class
    assert lobe.spg_options.inject_sparsity_loss is True
    assert lobe.spg_options.target_sparsity == target
    assert lobe.spg_options.target_scope == "model"
    assert lobe.spg_options.gate_impl == "compiled"
    gated = gated_params_of(hub_config(hub_id))
    assert lobe.gated_params == gated
    assert lobe.gated_target == pytest.approx(
        target * TOTAL_PARAMS[hub_id] / gated, rel=1e-12
    )
    assert all(p.requires_grad for p in lobe.model.encoder.parameters())


def test_dropin_fragment_through_include(full_size_dir, tmp_path):
    """The usage the fragment's header documents, in a recipe's YAML.

    HyperPyYAML joins an ``!include:`` path to the folder of the including
    file (or to the working directory for a YAML string), so an absolute
    path works from anywhere.
    """
    fragment = FRAGMENT_DIR / "spg_wav2vec2_base.yaml"
    recipe_yaml = f"""
wav2vec2_hub: {full_size_dir(WAV2VEC2_BASE)}
wav2vec2_folder: {tmp_path / "wav2vec2_checkpoint"}
spg: !include:{fragment}
    source: !ref <wav2vec2_hub>
    save_path: !ref <wav2vec2_folder>
    target_sparsity: 0.5
wav2vec2: !ref <spg[lobe]>
model_opt_class: !name:torch.optim.Adam
    lr: 0.0001
"""
    hparams = load_hyperpyyaml(recipe_yaml)
    lobe = hparams["wav2vec2"]
    assert lobe is hparams["spg"]["lobe"]
    assert type(lobe) is SPGWav2Vec2
    assert lobe.source == str(full_size_dir(WAV2VEC2_BASE))
    assert lobe.spg_options.inject_sparsity_loss is True
    assert lobe.spg_options.target_sparsity == 0.5
    assert lobe.gated_target == pytest.approx(
        0.5 * TOTAL_PARAMS[WAV2VEC2_BASE] / gated_params_of(lobe.model.config)
    )
    # The recipe's single optimiser also moves thresholds and multipliers.
    optimizer = hparams["model_opt_class"](lobe.parameters())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(lobe.gate.threshold_param) in optimized
    assert id(lobe.regularizer.multiplier_param) in optimized


# --------------------------------------------------------------------------
# Helpers of the recipe runs
# --------------------------------------------------------------------------


def tiny_overrides(source, corpus, out, epochs=1, batch_size=4):
    """Command-line overrides of a tiny YAML for the test corpus and model."""
    return [
        f"--output_folder={out}",
        "--init_from=null",
        f"--ssl_source={source}",
        "--synthetic_corpus=null",
        f"--data_folder={corpus}",
        "--evaluate_initial_model=False",
        f"--ssl_dim={TINY_SSL_DIM}",
        f"--number_of_epochs={epochs}",
        f"--batch_size={batch_size}",
    ]


def run_command(args):
    """Runs a command in the recipe folder; returns its combined output.

    The command gets a process group of its own, killed as a whole on
    timeout (torchrun's workers would otherwise outlive it).
    """
    process = subprocess.Popen(
        args,
        cwd=RECIPE_DIR,
        env=recipe_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"{' '.join(map(str, args))} still ran after {RUN_TIMEOUT_S} s:"
            f"\n{output[-6000:]}"
        )
    assert process.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{output[-6000:]}"
    )
    return output


def read_csv_column(path, column):
    """ID -> value of one column of a SpeechBrain CSV file."""
    with open(path, encoding="utf-8", newline="") as f:
        return {row["ID"]: row[column] for row in csv.DictReader(f)}


def parse_wer_file(path):
    """(WER %, errors, reference words, sentences) from ``wer_<split>.txt``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    wer = re.search(r"%WER ([\d.]+) \[ (\d+) / (\d+),", text)
    scored = re.search(r"Scored (\d+) sentences", text)
    assert wer and scored, f"unexpected format of {path}:\n{text[:500]}"
    return (
        float(wer.group(1)),
        int(wer.group(2)),
        int(wer.group(3)),
        int(scored.group(1)),
    )


def check_test_outputs(out, splits):
    """Checks wer/hyps files of every split against summary.json."""
    summary = read_json(out / "summary.json")
    assert set(summary["wer"]) == set(summary["cer"]) == set(splits)
    for split in splits:
        refs = read_csv_column(out / "save" / f"{split}.csv", "wrd")
        with open(out / f"hyps_{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert [row["id"] for row in rows] == sorted(refs)
        assert all(row["ref"] == refs[row["id"]] for row in rows)
        assert all(set(row) == {"id", "ref", "hyp"} for row in rows)
        wer, errors, words, sentences = parse_wer_file(out / f"wer_{split}.txt")
        assert sentences == len(rows)
        assert words == sum(len(row["ref"].split()) for row in rows)
        assert wer == pytest.approx(100 * errors / words, abs=0.005)
        assert summary["wer"][split] == pytest.approx(wer, abs=0.005)
    return summary


SUMMARY_KEYS = {
    "method",
    "system",
    "source",
    "decoder",
    "token_type",
    "epochs",
    "history",
    "trace",
    "skipped_nonfinite_batches",
    "wall_time_s",
    "params",
    "compression_ratio",
    "wer",
    "cer",
}


def check_gated_outputs(out, summary):
    """compact/ export and the sparsity part of summary.json."""
    sparsity = summary["sparsity"]
    assert set(sparsity) == {
        "target_sparsity",
        "target_scope",
        "gated_target",
        "hard_sparsity",
        "hard_sparsity_trained",
        "hard_sparsity_per_rank",
        "model_sparsity",
        "calibration_factor",
        "calibration_offset",
        "layers",
    }
    # 2 blocks x (q, k, v, out, intermediate, output) of the tiny model.
    assert len(sparsity["layers"]) == 12
    manifest = read_manifest(out / "compact")  # verifies the checksums
    assert manifest["sparsity"]["gated"] == pytest.approx(
        sparsity["hard_sparsity"], abs=1e-12
    )
    assert sparsity["hard_sparsity_per_rank"] == [sparsity["hard_sparsity"]]
    exported = set(os.listdir(out / "compact"))
    assert {COMPACT_FILE, MANIFEST} <= exported
    assert COMPACT_FILE in manifest["files"]
    dense = [rel for rel in manifest["files"] if rel.startswith("hf/")]
    extra = RUNS[out.name][2] if out.name in RUNS else []
    if "--export_dense_hf=True" in extra:  # on request, checksummed
        assert "hf/model.safetensors" in dense
    else:  # compact-only by default (export_dense_hf: False)
        assert "hf" not in exported and not dense
    assert manifest["dtype"] == (
        "float16" if "--export_dtype=float16" in extra else "float32"
    )
    assert not (out / "hf").exists()
    return sparsity


#: Run name -> (YAML, token type, extra overrides, test splits).
#: The short SPG runs end in their ramp; these tests check the recipe's
#: calibration to the target (the projection controller: test_controller.py).
CALIBRATE = "--calibrate=True"

RUNS = {
    "spg_ctc_char": (
        "tiny_spg.yaml",
        "char",
        [CALIBRATE],
        ["test-clean", "test-other"],
    ),
    "spg_ctc_attention_bpe": (
        "tiny_spg_ctc_att.yaml",
        "bpe",
        [
            CALIBRATE,
            "--token_type=bpe",
            f"--output_neurons={BPE_VOCAB}",
            "--beam_size=2",
            # An untrained decoder never emits <eos>: stop it early.
            "--test_searcher={max_decode_ratio: 0.05}",
            "--export_dense_hf=True",
        ],
        ["test-clean"],
    ),
    "ump_ctc_beam_char": (
        "tiny_ump.yaml",
        "char",
        [
            "--test_search=beam",
            "--test_beam_search={beam_size: 2}",
            "--export_dtype=float16",
        ],
        ["test-clean"],
    ),
    "spg_structured_ctc_char": (
        "tiny_spg_structured.yaml",
        "char",
        [],
        ["test-clean"],
    ),
    "ump_structured_ctc_char": (
        "tiny_ump_structured.yaml",
        "char",
        [],
        ["test-clean"],
    ),
    "dense_ctc_bpe": (
        "tiny_w2v2_dense.yaml",
        "bpe",
        ["--token_type=bpe", f"--output_neurons={BPE_VOCAB}"],
        ["test-clean"],
    ),
}


# --------------------------------------------------------------------------
# 2. train.py end to end
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def recipe_runs(recipe_ssl_source, tiny_corpus, tmp_path_factory):
    """Run name (a key of ``RUNS``) -> its output folder, run once."""
    root = tmp_path_factory.mktemp("recipe_runs")
    finished = {}

    def get(run):
        if run not in finished:
            yaml_name, _, extra, splits = RUNS[run]
            out = root / run
            splits_override = "[" + ", ".join(splits) + "]"
            output = run_command(
                [
                    sys.executable,
                    "train.py",
                    f"hparams/{yaml_name}",
                    *tiny_overrides(recipe_ssl_source, tiny_corpus, out),
                    f"--test_splits={splits_override}",
                    *extra,
                ]
            )
            (root / f"{run}.log").write_text(output, encoding="utf-8")
            finished[run] = out
        return finished[run]

    return get


def run_log(out):
    """What a run of the ``recipe_runs`` fixture printed."""
    return (out.parent / f"{out.name}.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("run", sorted(RUNS))
def test_recipe_runs_end_to_end(run, recipe_ssl_source, recipe_runs):
    yaml_name, token_type, extra, splits = RUNS[run]
    source_file = Path(recipe_ssl_source) / "model.safetensors"
    source_mtime = source_file.stat().st_mtime_ns
    out = recipe_runs(run)
    summary = check_test_outputs(out, splits)
    method = TINY_YAMLS[yaml_name][0]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["method"] == method
    assert summary["source"] == recipe_ssl_source
    assert summary["skipped_nonfinite_batches"] == 0
    assert [row["epoch"] for row in summary["history"]] == [1]
    # The compression clock of the epoch, within the run's wall time.
    elapsed = summary["history"][0]["elapsed_s"]
    assert 0 < elapsed <= summary["wall_time_s"]
    assert summary["compression_ratio"] == pytest.approx(
        summary["params"]["total"] / summary["params"]["nonzero"]
    )
    assert summary["token_type"] == token_type
    assert summary["decoder"] == (
        "ctc_attention" if yaml_name == "tiny_spg_ctc_att.yaml" else "ctc"
    )
    tokenizer_file = {"bpe": "tokenizer.model", "char": "label_encoder.txt"}
    assert (out / tokenizer_file[token_type]).is_file()
    assert (out / "head.ckpt").is_file()
    assert source_file.stat().st_mtime_ns == source_mtime
    if method == "dense":
        assert "sparsity" not in summary and not (out / "compact").exists()
        assert (out / "hf" / "model.safetensors").is_file()
        return
    sparsity = check_gated_outputs(out, summary)
    structured = "structured" in yaml_name
    target = 0.5 if structured else 0.65
    assert sparsity["target_scope"] == "gated"
    assert sparsity["gated_target"] == sparsity["target_sparsity"] == target
    if structured:
        check_structured_export(out / "compact", sparsity)
    if method == "ump":
        # Every gated matrix loses the same fraction, before training.
        assert {
            round(layer["sparsity"], 2) for layer in sparsity["layers"]
        } == {target}
        assert sparsity["hard_sparsity"] == pytest.approx(target, abs=1e-3)
        assert sparsity["hard_sparsity_trained"] == sparsity["hard_sparsity"]
        assert sparsity["calibration_factor"] is None
    else:
        # One epoch of a few utterances on a random model stays below the
        # target; the final pruning calibrates to it (--calibrate=True).
        assert 0 <= sparsity["hard_sparsity_trained"] < 0.6
        # Structured: a head of the tiny model is 1/8 of the gated weights
        # and a unit 1/256; calibration stops at a unit's crossing.
        bound = 1 / 256 if structured else 1e-3
        assert sparsity["hard_sparsity"] == pytest.approx(target, abs=bound)
        if structured:  # shifted by one offset instead of scaled
            assert sparsity["calibration_factor"] is None
            assert isinstance(sparsity["calibration_offset"], float)
        else:
            assert sparsity["calibration_factor"] > 0
            assert sparsity["calibration_offset"] is None


def check_structured_export(folder, sparsity):
    """A structured run's export holds the smaller matrices its manifest
    lists, and every gated matrix lost whole units."""
    manifest = json.loads((folder / "spg_manifest.json").read_text("utf-8"))
    assert manifest["spg"]["granularity"] == "structured"
    assert manifest["sparse_shapes"] == {}
    structure = manifest["structure"]
    model = load_compact(folder)
    for i, layer in enumerate(model.encoder.layers):
        heads = len(structure["attention_heads"][i])
        head_dim = TINY_SSL_DIM // model.config.num_attention_heads
        assert layer.attention.q_proj.weight.shape == (
            heads * head_dim,
            TINY_SSL_DIM,
        )
        units = structure["intermediate_sizes"][i]
        assert layer.feed_forward.output_dense.weight.shape == (
            TINY_SSL_DIM,
            units,
        )
    stored = sum(p.numel() for p in model.parameters())
    assert stored == manifest["params"]["nonzero"] < manifest["params"]["total"]
    removed_weights = sum(
        layer["sparsity"] * layer["numel"] for layer in manifest["layers"]
    )
    assert removed_weights == pytest.approx(
        sparsity["hard_sparsity"] * manifest["params"]["gated"]
    )


#: A tqdm progress bar as it appears in a captured output ("100%|###| 2/2").
PROGRESS_BAR = re.compile(r"\d+%\|")


def test_noprogressbar_hides_every_progress_bar(
    recipe_ssl_source, tiny_corpus, recipe_runs, tmp_path
):
    """SpeechBrain's --noprogressbar holds for every stage: training,
    validation, the test splits (which once forced theirs on) and the model
    loading, while a run without it shows them."""
    assert PROGRESS_BAR.search(run_log(recipe_runs("spg_ctc_char")))
    out = tmp_path / "quiet"
    output = run_command(
        [
            sys.executable,
            "train.py",
            "hparams/tiny_spg.yaml",
            *tiny_overrides(recipe_ssl_source, tiny_corpus, out),
            "--test_splits=[test-clean]",
            "--noprogressbar",
        ]
    )
    assert not PROGRESS_BAR.search(output), output[-3000:]
    assert "it/s]" not in output and "s/it]" not in output
    check_test_outputs(out, ["test-clean"])


def test_debug_run_is_short_and_keeps_no_checkpoint(
    recipe_ssl_source, tiny_corpus, tmp_path
):
    """--debug (SpeechBrain's smoke run): one batch per stage and one epoch
    of three, checkpoints and history in a temporary folder, and a summary
    marked as such; the output folder gets every other file as usual."""
    out = tmp_path / "debug"
    output = run_command(
        [
            sys.executable,
            "train.py",
            "hparams/tiny_spg.yaml",
            CALIBRATE,
            *tiny_overrides(
                recipe_ssl_source, tiny_corpus, out, epochs=3, batch_size=2
            ),
            "--test_splits=[test-clean]",
            "--log_interval=1",
            "--test_batch_size=1",
            "--debug",
            "--debug_batches=1",
            "--debug_epochs=1",
        ]
    )
    assert "switching checkpointer output to temporary directory" in output
    summary = read_json(out / "summary.json")
    assert summary["debug"] is True
    assert [row["epoch"] for row in summary["history"]] == [1]
    assert [point["step"] for point in summary["trace"]] == [1]
    assert summary["sparsity"]["hard_sparsity"] == pytest.approx(0.65, abs=1e-3)
    # One test batch of one utterance was evaluated.
    with open(out / "hyps_test-clean.jsonl", encoding="utf-8") as f:
        assert len(f.readlines()) == 1
    assert not list((out / "save").glob("CKPT+*"))
    assert not (out / "save" / "history.json").exists()
    assert (out / "compact" / "spg_manifest.json").is_file()


def read_tensorboard_scalars(folder):
    """Tag -> [(step, value)] of every scalar in a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_logger_gets_the_sparsity_trace(
    recipe_ssl_source, tiny_corpus, tmp_path
):
    """With TensorBoard as the YAML's train_logger, the event files hold
    every point of the training trace at its optimiser step (as
    summary.json), the per-epoch statistics and each test split's."""
    pytest.importorskip("tensorboard")
    out, board = tmp_path / "tb", tmp_path / "tb" / "tensorboard"
    logger = "!new:speechbrain.utils.train_logger.TensorboardLogger"
    run_command(
        [
            sys.executable,
            "train.py",
            "hparams/tiny_spg.yaml",
            *tiny_overrides(recipe_ssl_source, tiny_corpus, out, batch_size=1),
            "--test_splits=[test-clean]",
            "--log_interval=2",
            f"--train_logger={logger} [{board}]",
        ]
    )
    assert list(board.glob("events.out.tfevents.*"))
    assert not (out / "train_log.txt").exists()
    scalars = read_tensorboard_scalars(board)
    summary = read_json(out / "summary.json")
    trace = summary["trace"]
    steps = list(range(2, TRAIN_UTTERANCES + 1, 2))  # batch size 1
    assert [point["step"] for point in trace] == steps
    for name in (
        "task_loss",
        "sparsity_loss",
        "hard_sparsity",
        "soft_sparsity",
        "target",
    ):
        logged = scalars[f"trace/{name}"]
        assert [step for step, _ in logged] == steps
        assert [value for _, value in logged] == pytest.approx(
            [point[name] for point in trace], rel=1e-6, abs=1e-7
        )
    row = summary["history"][0]
    assert scalars["hard_sparsity"] == [
        (1, pytest.approx(row["hard_sparsity"]))
    ]
    assert scalars["WER/valid"] == [(1, pytest.approx(row["dev_WER"]))]
    assert scalars["WER_test-clean/test"] == [
        (1, pytest.approx(summary["wer"]["test-clean"]))
    ]


def test_compare_over_recipe_runs(recipe_runs, tmp_path):
    """``compare`` on real recipe outputs: table = summary.json, PNGs."""
    names = ["dense_ctc_bpe", "ump_ctc_beam_char", "spg_ctc_char"]
    folders = [recipe_runs(name) for name in names]
    out = tmp_path / "report"
    written = compare.main(
        [*map(str, folders), "--baseline", str(folders[0]), "--out", str(out)]
    )
    table = parse_markdown_table((out / "comparison.md").read_text("utf-8"))
    summaries = [read_json(folder / "summary.json") for folder in folders]
    assert [row["Method"] for row in table] == ["dense", "ump", "spg"]
    baseline_wer = summaries[0]["wer"]["test-clean"]
    for row, summary in zip(table, summaries, strict=True):
        assert row["System"] == summary["system"]
        assert row["Params"] == f"{summary['params']['total']:,}"
        assert row["Nonzero"] == f"{summary['params']['nonzero']:,}"
        assert row["Ratio"] == f"{summary['compression_ratio']:.2f}x"
        assert row["Wall time (s)"] == f"{summary['wall_time_s']:.1f}"
        for split in ("test-clean", "test-other"):
            wer = summary["wer"].get(split)
            assert row[f"WER {split}"] == ("-" if wer is None else f"{wer:.2f}")
        if summary["method"] != "dense":
            delta = summary["wer"]["test-clean"] - baseline_wer
            assert row["ΔWER test-clean"] == f"{delta:+.2f}"
            assert row["p test-clean"] != "-"
            assert row["Significant test-clean"] in {"yes", "no"}
        # Only the SPG run was tested on test-other; the baseline was not.
        assert row["p test-other"] == "-"
    images = sorted(os.path.basename(path) for path in written[1:])
    assert images == sorted(
        [
            "wer_vs_ratio_test-clean.png",
            "wer_vs_ratio_test-other.png",
            f"layer_sparsity_{summaries[1]['system']}.png",
            f"layer_sparsity_{summaries[2]['system']}.png",
            *(f"training_{s['system']}.png" for s in summaries),
        ]
    )
    for path in written[1:]:
        assert_png(path)


# --------------------------------------------------------------------------
# 3. Distributed data parallel on CPU
# --------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_name", ["tiny_spg.yaml", "tiny_ump.yaml"])
def test_torchrun_two_processes_agree_on_sparsity(
    yaml_name, recipe_ssl_source, tiny_corpus, tmp_path
):
    out = tmp_path / "ddp"
    output = run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            f"hparams/{yaml_name}",
            CALIBRATE,
            "--distributed_backend=gloo",
            *tiny_overrides(recipe_ssl_source, tiny_corpus, out, batch_size=2),
            "--test_splits=[test-clean]",
        ]
    )
    assert "disagree" not in output
    summary = check_test_outputs(out, ["test-clean"])
    sparsity = summary["sparsity"]
    per_rank = sparsity["hard_sparsity_per_rank"]
    assert len(per_rank) == 2
    assert per_rank[0] == per_rank[1] == sparsity["hard_sparsity"]
    # UMP by construction, SPG through the final calibration.
    assert sparsity["hard_sparsity"] == pytest.approx(0.65, abs=1e-3)


# --------------------------------------------------------------------------
# 4. Kill and resume
# --------------------------------------------------------------------------


def list_checkpoints(save_folder):
    """SpeechBrain checkpoints of a save folder, oldest first."""
    checkpoints = Checkpointer(save_folder).list_checkpoints()
    return sorted(checkpoints, key=lambda ckpt: ckpt.meta["unixtime"])


def is_complete(checkpoint):
    """Whether train.py finished writing the checkpoint."""
    return "complete" in checkpoint.paramfiles


def read_checkpoint_state(checkpoint):
    """Epoch counter, optimiser steps and SPG gate state of a checkpoint."""
    with open(checkpoint.paramfiles["brain"], encoding="utf-8") as f:
        brain = yaml.safe_load(f)
    with open(checkpoint.paramfiles["counter"], encoding="utf-8") as f:
        epoch = int(f.read())
    ssl = torch.load(checkpoint.paramfiles["ssl"], map_location="cpu")
    return {
        "epoch": epoch,
        "optimizer_step": brain["optimizer_step"],
        "gate_step": int(ssl["gate.step"]),
        "threshold_param": ssl["gate.threshold_param"],
        "ssl_state": ssl,
    }


def fake_interrupted_checkpoint(save_folder, after):
    """A checkpoint folder as a run killed while saving leaves it."""
    path = Path(save_folder) / "CKPT+9999-12-31+23-59-59+00"
    path.mkdir()
    meta = {**after.meta, "unixtime": after.meta["unixtime"] + 0.5}
    with open(path / "CKPT.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(meta, f)
    return path


def thresholds_of(ssl_state, source):
    """Per-matrix thresholds of an SPG lobe holding a saved state."""
    lobe = SPGWav2Vec2(source, save_path="", target_sparsity=0.65)
    lobe.load_state_dict(ssl_state)
    return [layer.threshold for layer in lobe.sparsity_report().layers]


def wait_for_checkpoint(process, save_folder, log_file, predicate):
    """Waits until a complete checkpoint satisfying ``predicate`` exists.

    The run deletes old checkpoints meanwhile: a folder that vanishes while
    it is read is skipped.
    """
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        assert process.poll() is None, (
            "the run ended before the checkpoint to kill it at:\n"
            + log_file.read_text()[-4000:]
        )
        assert time.monotonic() < deadline, "no such checkpoint was written"
        if glob.glob(str(Path(save_folder) / "CKPT+*" / "complete.ckpt")):
            try:
                found = [
                    c
                    for c in list_checkpoints(save_folder)
                    if is_complete(c) and predicate(c)
                ]
            except (FileNotFoundError, KeyError, TypeError):
                found = []
            if found:
                return found[-1]
        time.sleep(0.02)


def in_epoch_two(checkpoint):
    """An intra-epoch checkpoint of the second epoch."""
    with open(checkpoint.paramfiles["counter"], encoding="utf-8") as f:
        return int(f.read()) == 2 and not checkpoint.meta["end-of-epoch"]


def test_sigkill_then_restart_resumes(recipe_ssl_source, tiny_corpus, tmp_path):
    out = tmp_path / "resume"
    save = out / "save"
    epochs = 3
    steps = epochs * TRAIN_UTTERANCES  # batch size 1
    command = [
        sys.executable,
        "train.py",
        "hparams/tiny_spg.yaml",
        CALIBRATE,
        *tiny_overrides(
            recipe_ssl_source, tiny_corpus, out, epochs=epochs, batch_size=1
        ),
        "--ckpt_interval_steps=1",
        "--log_interval=1",
        "--test_splits=[test-clean]",
    ]
    # First run: SIGKILL once epoch 2 has an intra-epoch checkpoint.
    log_file = tmp_path / "killed_run.txt"
    with open(log_file, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            cwd=RECIPE_DIR,
            env=recipe_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_checkpoint(process, save, log_file, in_epoch_two)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    saved_ckpt = [c for c in list_checkpoints(save) if is_complete(c)][-1]
    saved = read_checkpoint_state(saved_ckpt)
    assert saved["epoch"] == 2
    first_epoch = TRAIN_UTTERANCES
    assert first_epoch < saved["optimizer_step"] <= 2 * first_epoch
    assert saved["gate_step"] == saved["optimizer_step"]
    # A newer folder with only CKPT.yaml: what a kill while saving leaves.
    interrupted = fake_interrupted_checkpoint(save, saved_ckpt)

    # Restart with the same command: resumes from the saved checkpoint.
    output = run_command(command)
    assert f"Ignoring {interrupted}" in output
    loads = re.findall(r"Loading a checkpoint from (\S+)", output)
    assert loads[0] == str(saved_ckpt.path)
    summary = read_json(out / "summary.json")
    # No step is done twice and none is skipped after the restart (steps
    # before it are in the trace only if the trace itself is checkpointed).
    trace_steps = [point["step"] for point in summary["trace"]]
    resumed = list(range(saved["optimizer_step"] + 1, steps + 1))
    assert trace_steps[-len(resumed) :] == resumed
    assert trace_steps == sorted(set(trace_steps))
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3]
    final_ckpt = [c for c in list_checkpoints(save) if is_complete(c)][-1]
    final = read_checkpoint_state(final_ckpt)
    assert final["epoch"] == epochs
    assert final["optimizer_step"] == final["gate_step"] == steps

    # Same command once more: nothing left to train; the thresholds it
    # evaluates with are those of the last checkpoint's ssl.ckpt.
    output = run_command(command)
    assert re.findall(r"Loading a checkpoint from (\S+)", output)[0] == str(
        final_ckpt.path
    )
    assert "Going into epoch" not in output
    rerun = read_json(out / "summary.json")
    assert all(point["step"] <= steps for point in rerun["trace"])
    # Times the one factor of the final calibration (--calibrate=True).
    factor = rerun["sparsity"]["calibration_factor"]
    assert factor == summary["sparsity"]["calibration_factor"] > 0
    expected = [
        factor * threshold
        for threshold in thresholds_of(final["ssl_state"], recipe_ssl_source)
    ]
    reported = [layer["threshold"] for layer in rerun["sparsity"]["layers"]]
    assert reported == pytest.approx(expected, rel=1e-6)
    assert reported == pytest.approx(
        [layer["threshold"] for layer in summary["sparsity"]["layers"]],
        rel=1e-6,
    )


def test_history_clock_resumes_old_checkpoints(tmp_path):
    """A checkpoint without the stopwatch (written by an older train.py)
    resumes the clock from the history of the epochs it covers."""
    assert history_clock(str(tmp_path)) == 0.0
    rows = [
        {"epoch": 1, "elapsed_s": 100.0},
        {"epoch": 2, "elapsed_s": 210.5},
        {"epoch": 3},
    ]
    (tmp_path / "history.json").write_text(json.dumps(rows))
    assert history_clock(str(tmp_path)) == 210.5
    assert history_clock(str(tmp_path), up_to_epoch=1) == 100.0


def test_history_rows_of_a_restarted_epoch_replace_the_saved_ones(tmp_path):
    """An epoch finished again after a restart (the run stopped before its
    checkpoint) keeps one row, the new one; earlier epochs stay."""
    save_history(tmp_path, [{"epoch": 1, "dev_WER": 50.0}])
    save_history(tmp_path, [{"epoch": 1, "dev_WER": 50.0}, {"epoch": 2}])
    rows = save_history(tmp_path, [{"epoch": 2, "dev_WER": 40.0}])
    assert rows == [
        {"epoch": 1, "dev_WER": 50.0},
        {"epoch": 2, "dev_WER": 40.0},
    ]
    assert read_json(tmp_path / "history.json") == rows


def test_summary_table_of_a_compressed_run():
    """The table the demo prints: the dense start and the compressed model,
    WER/CER per split with two decimals, the hard sparsity against the
    gated target and the compression wall time."""
    summary = {
        "method": "spg",
        "params": {"total": 2068480, "nonzero": 918323},
        "compression_ratio": 2068480 / 918323,
        "wer": {"test-clean": 32.7004, "test-other": 54.6977},
        "cer": {"test-clean": 7.9037, "test-other": 15.1069},
        "sparsity": {"hard_sparsity": 0.6500001, "gated_target": 0.65},
        "wall_time_s": 502.66,
        "dense_reference": {
            "params": {"total": 2068480, "nonzero": 2068480},
            "wer": {"test-clean": 30.1544, "test-other": 52.9302},
            "cer": {"test-clean": 7.3405, "test-other": 14.7203},
        },
    }
    assert format_table(summary).splitlines() == [
        "system         params   nonzero  ratio  test-clean  test-other ",
        "---------------------------------------------------------------",
        "dense (start)  2068480  2068480  1.00   30.15/7.34  52.93/14.72",
        "spg            2068480  918323   2.25   32.70/7.90  54.70/15.11",
        "(test columns: WER/CER in %)",
        "hard sparsity of gated weights: 0.6500 (target 0.6500)",
        "compression wall time: 502.7 s",
    ]


FLUSH_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import train
if sys.argv[2] == "flush":
    train.flush_subnormals()
torch.set_num_threads(2)
# Every product is 1e-42 and every sum of 512 of them 5e-40: subnormal.
a = torch.full((1024, 512), 1e-21)
print(int((a @ a.T != 0).sum()))
"""


@pytest.mark.skipif(
    not x86_cpu(), reason="flush-to-zero is an x86 (SSE/AVX) mode"
)
def test_recipe_flushes_subnormals_in_every_cpu_thread():
    # Set first, the mode reaches the threads PyTorch starts afterwards:
    # a two-thread product of subnormal results comes out all zero.
    def nonzero(mode):
        out = subprocess.run(
            [sys.executable, "-c", FLUSH_PROBE, str(RECIPE_DIR), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.split()[-1])

    assert nonzero("keep") == 1024 * 1024
    assert nonzero("flush") == 0


# --------------------------------------------------------------------------
# 3. The inference folder a gated run writes
# --------------------------------------------------------------------------


def read_split(out, split):
    """(ids, wav paths, refs, recipe hypotheses) in the recipe's test order:
    its test loader sorts the split's CSV by duration, ascending."""
    with open(out / "save" / f"{split}.csv", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: float(row["duration"]))
    with open(out / f"hyps_{split}.jsonl", encoding="utf-8") as f:
        hyps = {row["id"]: row["hyp"] for row in map(json.loads, f)}
    return rows, hyps


def word_error_rate(refs, hyps):
    """WER in percent of parallel lists of transcripts."""
    stats = ErrorRateStats()
    stats.append(
        list(range(len(refs))),
        predict=[h.split() for h in hyps],
        target=[r.split() for r in refs],
    )
    return stats.summarize("error_rate")


def transcribe_in_batches(asr, rows, batch_size):
    """Transcripts of ``rows`` in batches padded as the recipe pads them."""
    words = []
    for start in range(0, len(rows), batch_size):
        batch = PaddedBatch(
            [
                {"sig": read_audio(row["wav"])}
                for row in rows[start : start + batch_size]
            ]
        )
        found, _ = asr.transcribe_batch(*batch.sig)
        words += [" ".join(str(text).split()) for text in found]
    return words


@pytest.mark.parametrize(
    "run",
    [
        "spg_ctc_char",
        "spg_ctc_attention_bpe",
        "ump_ctc_beam_char",
        "spg_structured_ctc_char",
    ],
)
def test_inference_folder_transcribes_like_the_recipe(
    run, recipe_runs, tmp_path
):
    out = recipe_runs(run)
    folder = out / "compact"
    asr = load_asr(folder, savedir=tmp_path / "savedir")
    attention = run == "spg_ctc_attention_bpe"
    assert type(asr).__name__ == (
        "EncoderDecoderASR" if attention else "EncoderASR"
    )
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows, recipe_hyps = read_split(out, "test-clean")
    refs = [row["wrd"] for row in rows]
    batched = transcribe_in_batches(asr, rows, batch_size=16)  # the YAML's
    # The recipe's batches: the same hypotheses, so the same WER.
    assert batched == [" ".join(recipe_hyps[row["ID"]].split()) for row in rows]
    wer = word_error_rate(refs, batched)
    assert wer == pytest.approx(summary["wer"]["test-clean"], abs=1e-9)
    # One file at a time: the longest utterance of each batch was not
    # padded, and gets the same transcript; the others were, so their
    # features differ slightly (the convolutions and normalisations see
    # zeros), which can change a few characters (measured on the demo:
    # benchmarks/RESULTS.md).
    longest = [
        min(start + 15, len(rows) - 1) for start in range(0, len(rows), 16)
    ]
    for i in longest:
        single = " ".join(asr.transcribe_file(rows[i]["wav"]).split())
        assert single == batched[i]
    # The model card reports this run, and the log says how to use it.
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"| test-clean | {summary['wer']['test-clean']:.2f} |" in card
    assert card.count("| encoder.layers.") == 12
    assert (
        f"python -m speechbrain_spg.transcribe {folder} AUDIO.wav"
        in run_log(out)
    )
