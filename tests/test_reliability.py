"""Reliability: interruption, bad data, bad configuration, numerics, export.

What happens when things go wrong, one section per failure mode:

1. a recipe run killed with SIGKILL in the middle of an epoch and started
   again with the same command ends exactly as an uninterrupted run;
2. bad audio and transcripts are skipped and counted, never fatal in the
   middle of an epoch;
3. every bad SPG or recipe hyperparameter fails when the YAML is loaded,
   with one message that names the key and the allowed values;
4. the gates stay finite at extreme temperatures and thresholds, training
   under bfloat16 / float16 autocast stays finite, and a batch with a
   non-finite loss is skipped without touching the thresholds;
5. an interrupted export leaves the previous export (or nothing) behind, and
   a tampered export is refused.

The recipe runs (section 1 and 2 share them) use ``train.py`` on a tiny
LibriSpeech tree of noise FLAC files with a tiny random wav2vec2 (the
``wav2vec2_source`` fixture of ``conftest.py``, dropout and LayerDrop on).
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import speechbrain as sb
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from transformers import BertConfig

from conftest import RECIPE_DIR, read_json, recipe_env
from speechbrain_spg.checkpointing import (
    Counter,
    RandomState,
    Stopwatch,
    TrainingTrace,
)
from speechbrain_spg.export import (
    COMPACT_FILE,
    MANIFEST,
    CompactExportError,
    CompactWav2Vec2,
    export_compact,
    load_compact,
    read_manifest,
)
from speechbrain_spg.gate import hard_mask
from speechbrain_spg.kernels import soft_zero_counts
from speechbrain_spg.layers import SelfPinchingGate
from speechbrain_spg.lobes import SPGWav2Vec2
from speechbrain_spg.options import SPGOptions
from speechbrain_spg.tools.recipe import (
    refuse_data_parallel,
)

TINY_YAML = RECIPE_DIR / "hparams" / "tiny_spg.yaml"
RUN_TIMEOUT_S = 600
RATE = 16000
GATE_IMPLS = ("reference", "fused", "compiled")

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def yaml_overrides(source, out, **extra):
    """HyperPyYAML overrides that make tiny_spg.yaml load offline."""
    return {
        "ssl_source": str(source),
        "ssl_dim": 32,
        "init_from": None,
        "synthetic_corpus": None,
        "output_folder": str(out),
        **extra,
    }


def load_tiny_yaml(overrides):
    """Loads (and instantiates) tiny_spg.yaml."""
    with open(TINY_YAML, encoding="utf-8") as fin:
        return load_hyperpyyaml(fin, overrides)


def write_noise(path, seconds, rate=RATE, seed=0, fmt="FLAC"):
    """Writes mono noise; returns the path."""
    frames = int(round(seconds * rate))
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, frames)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, noise.astype("float32"), rate, format=fmt)
    return path


def add_utterance(data, split, utt_id, text, seconds=0.6, **audio):
    """Adds a noise FLAC and its transcript line; returns the audio path."""
    speaker, chapter, _ = utt_id.split("-")
    folder = os.path.join(data, split, speaker, chapter)
    path = os.path.join(folder, f"{utt_id}.flac")
    seed = int(utt_id.replace("-", ""))
    if seconds == 0:
        # libsndfile writes no FLAC without samples: a header-only WAV
        # under the .flac name is a readable file of length zero.
        os.makedirs(folder, exist_ok=True)
        soundfile.write(path, np.zeros(0, "float32"), RATE, format="WAV")
    else:
        write_noise(path, seconds, seed=seed, **audio)
    with open(
        os.path.join(folder, f"{speaker}-{chapter}.trans.txt"),
        "a",
        encoding="utf-8",
    ) as f:
        f.write(f"{utt_id} {text}\n")
    return path


def truncate(path):
    """Cuts a FLAC file in half: its header still announces every sample.

    This is what an interrupted download or extraction leaves: reading the
    header succeeds, decoding fails part-way (``flac decoder lost sync``).
    """
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


#: Bad utterances of the training split: id -> (reason, text, audio args).
BAD_TRAIN = {
    "7-1-0000": ("unreadable_audio", "CUT OFF", {"seconds": 1.0}),
    "7-1-0001": ("zero_length_audio", "NOTHING", {"seconds": 0}),
    "7-1-0002": ("too_short", "HI", {"seconds": 0.05}),
    "7-1-0003": ("wrong_sample_rate", "PHONE", {"rate": 8000}),
    "7-1-0004": ("bad_characters", "ROOM 101", {}),
    "7-1-0005": ("too_long", "LONG ONE", {"seconds": 2.5}),
}
MAX_DURATION = 2.0
TRAIN_GOOD = 5


def build_corpus(root):
    """A LibriSpeech tree: good noise utterances plus one of each bad kind.

    Training split: 5 good utterances and the 6 of ``BAD_TRAIN``; dev and
    test splits: 2 good utterances and one truncated FLAC each.
    """
    data = str(root / "LibriSpeech")
    words = ["A B", "AN OX", "IT IS", "GO ON", "SO BE IT"]
    for i in range(TRAIN_GOOD):
        add_utterance(
            data, "train-clean-100", f"1-1-000{i}", words[i], 0.5 + 0.1 * i
        )
    for utt_id, (reason, text, audio) in BAD_TRAIN.items():
        path = add_utterance(data, "train-clean-100", utt_id, text, **audio)
        if reason == "unreadable_audio":
            truncate(path)
    for split, speaker in (("dev-clean", 2), ("test-clean", 3)):
        for i, text in enumerate(["AB", "OX IT"]):
            add_utterance(data, split, f"{speaker}-1-000{i}", text, 0.6)
        truncate(add_utterance(data, split, f"{speaker}-1-0009", "CUT", 1.0))
    return data


def recipe_command(source, data, out):
    """2 epochs of batch 2 with a checkpoint after every step."""
    return [
        sys.executable,
        "train.py",
        str(TINY_YAML),
        f"--output_folder={out}",
        "--init_from=null",
        f"--ssl_source={source}",
        "--synthetic_corpus=null",
        f"--data_folder={data}",
        "--evaluate_initial_model=False",
        "--ssl_dim=32",
        "--number_of_epochs=2",
        "--batch_size=2",
        "--ckpt_interval_steps=1",
        "--log_interval=1",
        f"--max_duration={MAX_DURATION}",
        "--test_splits=[test-clean]",
    ]


def start(command, log_path):
    """Starts a recipe run in the recipe folder, output into a file."""
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(
        command,
        cwd=RECIPE_DIR,
        env=recipe_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process.log = log
    return process


def finish(process, log_path):
    """Waits for a run; returns its output, failing if it failed."""
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        process.log.close()
    output = Path(log_path).read_text(encoding="utf-8")
    assert process.returncode == 0, output[-6000:]
    return output


def complete_checkpoints(save_folder):
    """``{folder: meta}`` of the checkpoints train.py finished writing.

    Folders deleted while they are read (the run keeps only the newest
    intra-epoch checkpoint) are left out.
    """
    found = {}
    for folder in sorted(Path(save_folder).glob("CKPT+*")):
        if not (folder / "complete.ckpt").is_file():
            continue
        try:
            with open(folder / "CKPT.yaml", encoding="utf-8") as f:
                found[folder] = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
    return found


def kill_at_second_intra_epoch_checkpoint(process, save_folder, log_path):
    """SIGKILLs a run once its 2nd intra-epoch checkpoint is complete."""
    seen = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(seen) < 2:
        assert process.poll() is None, (
            "the run ended before it could be killed:\n"
            + Path(log_path).read_text(encoding="utf-8")[-4000:]
        )
        assert time.monotonic() < deadline, "no intra-epoch checkpoint"
        for folder, meta in complete_checkpoints(save_folder).items():
            if meta and not meta.get("end-of-epoch", True):
                seen.add(folder.name)
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.log.close()
    return process.returncode


# --------------------------------------------------------------------------
# 1 + 2. Recipe runs: uninterrupted, killed, resumed (bad data in all)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_runs(wav2vec2_source, tmp_path_factory):
    """An uninterrupted run and a SIGKILLed + restarted one, same command.

    The two first runs go in parallel (one thread each). Returns a dict
    with the output folders, the outputs, the killed run's return code
    and the checkpoint the restart must resume from.
    """
    root = tmp_path_factory.mktemp("reliability_runs")
    data = build_corpus(root)
    reference_out, resumed_out = root / "reference", root / "resumed"
    reference = start(
        recipe_command(wav2vec2_source, data, reference_out),
        root / "reference.txt",
    )
    command = recipe_command(wav2vec2_source, data, resumed_out)
    processes = [reference, start(command, root / "killed.txt")]
    try:
        killed_rc = kill_at_second_intra_epoch_checkpoint(
            processes[1], resumed_out / "save", root / "killed.txt"
        )
        saved = complete_checkpoints(resumed_out / "save")
        resume_from = max(saved, key=lambda folder: saved[folder]["unixtime"])
        processes.append(start(command, root / "resumed.txt"))
        resumed_output = finish(processes[2], root / "resumed.txt")
        reference_output = finish(reference, root / "reference.txt")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.log.close()
    return {
        "data": data,
        "reference": reference_out,
        "reference_output": reference_output,
        "resumed": resumed_out,
        "resumed_output": resumed_output,
        "killed_rc": killed_rc,
        "resume_from": resume_from,
        "resume_meta": saved[resume_from],
    }


def test_bad_audio_and_transcripts_are_skipped_and_counted(recipe_runs):
    out = recipe_runs["reference"]
    summary = read_json(out / "summary.json")  # the run went to the end
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    train_report = summary["data_preparation"]["train-clean-100"]
    skipped = dict.fromkeys(train_report["skipped"], 0)
    for reason, _, _ in BAD_TRAIN.values():
        skipped[reason] += 1
    assert train_report == {
        "total": TRAIN_GOOD + len(BAD_TRAIN),
        "kept": TRAIN_GOOD,
        "skipped": skipped,
    }
    for split in ("dev-clean", "test-clean"):
        report = summary["data_preparation"][split]
        assert (report["total"], report["kept"]) == (3, 2)
        assert report["skipped"]["unreadable_audio"] == 1
    assert summary["skipped_nonfinite_batches"] == 0
    # The truncated test file is not evaluated; the two good ones are.
    with open(out / "hyps_test-clean.jsonl", encoding="utf-8") as f:
        evaluated = [json.loads(line)["id"] for line in f]
    assert evaluated == ["3-1-0000", "3-1-0001"]
    log = (out / "log.txt").read_text(encoding="utf-8")
    assert (
        "train-clean-100: kept 5 of 11 utterances (0.00 h); skipped 6 "
        "(bad_characters=1, unreadable_audio=1, zero_length_audio=1, "
        "wrong_sample_rate=1, too_short=1, too_long=1)."
    ) in log
    truncated = os.path.join(
        recipe_runs["data"], "train-clean-100", "7", "1", "7-1-0000.flac"
    )
    assert f"Skipping {truncated}: unreadable_audio: cannot read it" in log


def test_sigkill_mid_epoch_then_same_command_matches_uninterrupted_run(
    recipe_runs,
):
    assert recipe_runs["killed_rc"] == -signal.SIGKILL
    meta = recipe_runs["resume_meta"]
    assert meta["end-of-epoch"] is False  # killed inside an epoch
    loads = re.findall(
        r"Loading a checkpoint from (\S+)", recipe_runs["resumed_output"]
    )
    assert loads[0] == str(recipe_runs["resume_from"])
    reference = read_json(recipe_runs["reference"] / "summary.json")
    resumed = read_json(recipe_runs["resumed"] / "summary.json")
    thresholds = [
        [layer["threshold"] for layer in summary["sparsity"]["layers"]]
        for summary in (reference, resumed)
    ]
    assert thresholds[1] == pytest.approx(thresholds[0], abs=1e-6, rel=0)
    for key in ("hard_sparsity", "model_sparsity"):
        assert resumed["sparsity"][key] == reference["sparsity"][key]
    assert resumed["wer"] == reference["wer"]
    assert resumed["cer"] == reference["cer"]
    # The trace is checkpointed too: one point per step, none twice.
    steps = [point["step"] for point in resumed["trace"]]
    assert steps == [point["step"] for point in reference["trace"]]
    assert steps == list(range(1, 7))  # 2 epochs x 3 batches of <= 2
    for ours, theirs in zip(resumed["trace"], reference["trace"]):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    for ours, theirs in zip(resumed["history"], reference["history"]):
        ours, theirs = dict(ours), dict(theirs)
        assert ours.pop("elapsed_s") > 0 and theirs.pop("elapsed_s") > 0
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    # The compression clock goes on across the restart.
    elapsed = [row["elapsed_s"] for row in resumed["history"]]
    assert elapsed == sorted(elapsed)
    assert resumed["wall_time_s"] >= elapsed[-1]


# --------------------------------------------------------------------------
# 3. Bad configuration: one message naming the key and the allowed values
# --------------------------------------------------------------------------

NUMBER_IN_0_1 = "target_sparsity: must be a number in [0, 1), got {}."
POSITIVE = "{}: must be a finite number > 0, got {}."
NON_NEGATIVE_INT = "{}: must be a non-negative integer, got {}."

#: (YAML overrides, the whole message or its start ending in "...").
BAD_SPG_VALUES = [
    (
        {"granularity": "rows"},
        "granularity: must be one of 'weight', 'structured', got 'rows'.",
    ),
    ({"target_sparsity": 1.5}, NUMBER_IN_0_1.format("1.5")),
    ({"target_sparsity": "high"}, NUMBER_IN_0_1.format("'high'")),
    ({"target_sparsity": True}, NUMBER_IN_0_1.format("True")),
    ({"tau_scale": 0.0}, POSITIVE.format("tau_scale", "0.0")),
    ({"tau_scale": True}, POSITIVE.format("tau_scale", "True")),
    ({"tau_scale": float("nan")}, POSITIVE.format("tau_scale", "nan")),
    (
        {"threshold_init": -0.1},
        "threshold_init: must be a finite number >= 0, got -0.1.",
    ),
    (
        {"threshold_init": "0.05"},
        "threshold_init: must be a finite number >= 0, got '0.05'.",
    ),
    ({"warmup_steps": -1}, NON_NEGATIVE_INT.format("warmup_steps", "-1")),
    ({"ramp_steps": 2.5}, NON_NEGATIVE_INT.format("ramp_steps", "2.5")),
    ({"ramp_steps": False}, NON_NEGATIVE_INT.format("ramp_steps", "False")),
    (
        {"tie": "layer"},
        "tie: must be one of 'linear', 'block', 'global', got 'layer'.",
    ),
    (
        {"target_scope": "all"},
        "target_scope: must be one of 'gated', 'model', got 'all'.",
    ),
    (
        {"target_sparsity": 0.95, "target_scope": "model"},
        "target_sparsity: removing 0.95 of all ...",
    ),
    (
        {"ssl": {"gate_impl": "cuda"}},
        "gate_impl: must be one of 'fused', 'compiled', 'reference', got "
        "'cuda'.",
    ),
    ({"ssl": {"gate_lr_scale": True}}, POSITIVE.format("gate_lr_scale", True)),
    (
        {"ssl": {"sparsity_damping": -5}},
        "sparsity_damping: must be a finite number >= 0, got -5.",
    ),
    (
        {"ssl": {"inject_sparsity_loss": 1}},
        "inject_sparsity_loss: must be true or false, got 1.",
    ),
    (
        {"ssl": {"recompute_gated_weights": "yes"}},
        "recompute_gated_weights: must be true or false, got 'yes'.",
    ),
    (
        {"ssl": {"prune_modules": "(q_proj"}},
        "prune_modules: '(q_proj' is not a valid regular expression "
        "(missing ), unterminated subpattern at position 0).",
    ),
    (
        {"ssl": {"prune_modules": ""}},
        "prune_modules: must be a non-empty regular expression string, got ''.",
    ),
    (
        {"ssl": {"prune_modules": "lm_head"}},
        "prune_modules: the regex 'lm_head' matches none of the 13 nn.Linear "
        "modules of the model (e.g. ...",
    ),
    (
        {"ssl": {"target_sparsty": 0.5}},
        "target_sparsty: unknown option; did you mean 'target_sparsity'? SPG "
        "options: gate_impl, gate_lr_scale, granularity, inject_sparsity_loss, "
        "prune_modules, ramp_steps, recompute_gated_weights, "
        "sparsity_controller, sparsity_damping, target_scope, "
        "target_sparsity, tau_scale, threshold_init, tie, warmup_steps.",
    ),
    (
        {"ssl": {"sparsity_controller": "pid"}},
        "sparsity_controller: must be one of 'projection', 'lagrangian', "
        "got 'pid'.",
    ),
    (
        {"ssl": {"freeze": True}},
        "freeze: an SPG lobe must be trainable (its thresholds learn); set "
        "freeze: False (freeze_feature_extractor: True keeps the CNN front "
        "end fixed).",
    ),
]


def assert_one_message(error, expected):
    """``error`` says exactly ``expected`` (or starts with it), unchained."""
    message = str(error)
    if expected.endswith("..."):
        assert message.startswith(expected[:-3]), message
    else:
        assert message == expected
    # One message: no other exception shown above it in the traceback.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.mark.parametrize(
    "overrides, expected",
    BAD_SPG_VALUES,
    ids=[json.dumps(o, default=str) for o, _ in BAD_SPG_VALUES],
)
def test_bad_spg_value_fails_when_the_yaml_is_loaded(
    overrides, expected, wav2vec2_source, tmp_path
):
    with pytest.raises(ValueError) as error:
        load_tiny_yaml(yaml_overrides(wav2vec2_source, tmp_path, **overrides))
    assert_one_message(error.value, expected)


def test_unsupported_source_architecture_fails_when_the_yaml_is_loaded(
    tmp_path,
):
    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(bert)
    with pytest.raises(ValueError) as error:
        load_tiny_yaml(yaml_overrides(bert, tmp_path / "out"))
    assert_one_message(
        error.value,
        f"source: '{bert}' is a 'bert' model; SPG lobes support 'wav2vec2', "
        "'hubert', 'wavlm'.",
    )


def test_every_spg_option_is_covered_by_a_bad_value():
    options = {field for field in SPGOptions.__dataclass_fields__}
    covered = set()
    for overrides, _ in BAD_SPG_VALUES:
        covered.update(overrides.get("ssl", overrides))
    assert options <= covered


@pytest.fixture(scope="module")
def tiny_hparams(wav2vec2_source, tmp_path_factory):
    """tiny_spg.yaml, loaded once."""
    out = tmp_path_factory.mktemp("tiny_hparams")
    return load_tiny_yaml(yaml_overrides(wav2vec2_source, out))


@pytest.mark.parametrize(
    "key, bad, allowed",
    [
        ("method", "spgg", "spg, ump, dense"),
        ("decoder", "rnnt", "ctc, ctc_attention"),
        ("token_type", "word", "char, bpe"),
        ("test_search", "viterbi", "greedy, beam"),
        ("sorting", "ascend", "ascending, descending, random"),
        ("method", None, "spg, ump, dense"),
    ],
)
def test_bad_recipe_value_is_refused(
    key, bad, allowed, tiny_hparams, train_module
):
    path = str(TINY_YAML)
    train_module.check_hparams(tiny_hparams, path)  # the YAML itself is fine
    with pytest.raises(ValueError) as error:
        train_module.check_hparams({**tiny_hparams, key: bad}, path)
    assert_one_message(
        error.value, f"{path}: {key} must be one of {allowed}; got {bad!r}."
    )


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "10"])
def test_bad_log_interval_is_refused(bad, tiny_hparams, train_module):
    path = str(TINY_YAML)
    with pytest.raises(ValueError) as error:
        train_module.check_hparams({**tiny_hparams, "log_interval": bad}, path)
    assert_one_message(
        error.value,
        f"{path}: log_interval must be a positive integer (training steps "
        f"between two points of the trace); got {bad!r}.",
    )


@pytest.mark.parametrize(
    "method, backend, gpus, refused",
    [
        ("spg", True, 2, True),
        ("spg", True, 1, False),  # DataParallel copies nothing then
        ("spg", False, 4, False),
        ("ump", True, 2, False),
        ("dense", True, 2, False),
    ],
)
def test_data_parallel_is_refused_for_spg_on_several_gpus(
    method, backend, gpus, refused
):
    run_opts = {"data_parallel_backend": backend}
    hparams = {"method": method}
    if not refused:
        refuse_data_parallel(hparams, run_opts, gpus, "a.yaml")
        return
    with pytest.raises(ValueError) as error:
        refuse_data_parallel(hparams, run_opts, gpus, "a.yaml")
    assert_one_message(
        error.value,
        "a.yaml: --data_parallel_backend on 2 GPUs cannot train "
        "self-pinching gates (DataParallel's copies of the gated layers "
        "would all read the thresholds of the first GPU). Use DDP instead: "
        "torchrun --nproc_per_node=2 train.py a.yaml",
    )


#: Runs train.py as ``python train.py ...`` does, on a machine that shows
#: two GPUs to ``torch.cuda.device_count``.
TWO_GPU_RUN = """
import runpy, sys, torch
torch.cuda.device_count = lambda: 2
sys.path.insert(0, ".")
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_recipe_refuses_data_parallel_before_any_work(
    wav2vec2_source, tmp_path
):
    out = tmp_path / "run"
    command = recipe_command(wav2vec2_source, "unused", out)
    command[1:2] = ["-c", TWO_GPU_RUN, "train.py"]
    result = subprocess.run(
        [*command, "--data_parallel_backend"],
        cwd=RECIPE_DIR,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode != 0
    assert "ValueError: " in result.stderr
    assert "--data_parallel_backend on 2 GPUs cannot train" in result.stderr
    # Before the experiment folder and the data: only the empty checkpoint
    # folder that loading the YAML makes.
    assert [p.name for p in out.rglob("*")] == ["save"]
    assert not any((out / "save").iterdir())


def test_method_and_lobe_must_agree(tiny_hparams, train_module):
    path = str(TINY_YAML)
    with pytest.raises(ValueError) as error:
        train_module.check_hparams({**tiny_hparams, "method": "dense"}, path)
    assert_one_message(
        error.value,
        f"{path}: method 'dense' expects a plain SpeechBrain lobe as `ssl`.",
    )


# --------------------------------------------------------------------------
# 4. Numerical safety
# --------------------------------------------------------------------------

#: name -> (weight std, threshold in units of the weight std, tau_scale)
EXTREME_GATES = {
    "tiny_tau": (0.02, 0.7, 1e-6),
    "negative_threshold": (0.02, -0.7, 0.02),
    "negative_threshold_tiny_tau": (0.02, -0.7, 1e-6),
    "all_pruned": (0.02, 1e3, 0.02),
    "all_pruned_tiny_tau": (0.02, -1e3, 1e-6),
    "none_pruned": (0.02, 0.0, 0.02),
    "none_pruned_tiny_tau": (0.02, 0.0, 1e-6),
    "all_zero_weights": (0.0, 0.7, 0.02),
    "all_zero_weights_tiny_tau": (0.0, 0.7, 1e-6),
}


def gate_outputs(impl, std, threshold, tau_scale, seed=0):
    """Gated weight, soft-zero count and gradients of W and t, one matrix.

    The loss is a random projection of the gated weight plus the soft-zero
    count (the sparsity regulariser's input), so both backward paths run.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(48, 40, generator=generator) * std).requires_grad_()
    gate = SelfPinchingGate(
        weight.detach().std().reshape(1), [0], tau_scale, 1.0, impl=impl
    )
    with torch.no_grad():
        gate.threshold_param.fill_(threshold)
    gated = gate(0, weight)
    recorded = gate.recorded_soft_zeros(1)
    if recorded:
        soft_zeros = recorded[0].reshape(1)
    else:  # reference path: separate soft-zero count
        soft_zeros = soft_zero_counts(
            [weight], gate.thresholds(), gate.taus(), "reference"
        )
    projection = torch.randn(gated.shape, generator=generator)
    ((gated * projection).sum() + soft_zeros.sum()).backward()
    return {
        "weight": weight.detach(),
        "gated": gated.detach(),
        "soft_zeros": soft_zeros.detach(),
        "grad_weight": weight.grad,
        "grad_threshold": gate.threshold_param.grad,
        "threshold": gate.thresholds().detach(),
    }


def check_extreme_gate(case, impl):
    """Finite outputs and gradients, and the masks the case implies."""
    std, threshold, tau_scale = EXTREME_GATES[case]
    out = gate_outputs(impl, std, threshold, tau_scale)
    for name in ("gated", "soft_zeros", "grad_weight", "grad_threshold"):
        assert torch.isfinite(out[name]).all(), f"{case}/{impl}: {name}"
    kept = hard_mask(out["weight"], out["threshold"][0])
    if abs(threshold) >= 1e3 or std == 0:
        assert not kept.any()
        assert torch.equal(out["gated"], torch.zeros_like(out["gated"]))
    if threshold == 0 and std > 0:
        assert kept.all()
        # A zero threshold has a zero gradient (it is a fixed point).
        assert out["grad_threshold"].abs().max() == 0


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", sorted(EXTREME_GATES))
def test_gate_is_finite_at_extremes(case, impl):
    check_extreme_gate(case, impl)


def test_compiled_gate_is_finite_at_extremes():
    """All the extreme cases through the ``torch.compile`` kernels (compiled
    once per process, then reused: ``dynamic=True``)."""
    for case in sorted(EXTREME_GATES):
        check_extreme_gate(case, "compiled")


@pytest.mark.parametrize("case", sorted(EXTREME_GATES))
def test_reference_and_fused_agree_at_extremes(case):
    reference = gate_outputs("reference", *EXTREME_GATES[case])
    fused = gate_outputs("fused", *EXTREME_GATES[case])
    for name in ("gated", "soft_zeros", "grad_weight", "grad_threshold"):
        torch.testing.assert_close(
            fused[name], reference[name], rtol=1e-4, atol=0
        )


def test_zero_threshold_init_warns_because_it_never_moves():
    """A zero threshold gets zero gradient: under the lagrangian controller
    training would never prune (the projection's offset step leaves zero:
    ``tests/test_lobes.py``)."""
    out = gate_outputs("fused", 0.02, 0.0, 0.02)
    assert float(out["grad_threshold"].abs().max()) == 0.0
    with pytest.warns(UserWarning, match=r"^threshold_init: 0 is a fixed"):
        SPGOptions(threshold_init=0, sparsity_controller="lagrangian")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_steps_under_autocast_stay_finite(dtype, wav2vec2_source):
    torch.manual_seed(0)
    lobe = SPGWav2Vec2(
        wav2vec2_source, save_path="", target_sparsity=0.5, tau_scale=1e-3
    )
    head = torch.nn.Linear(32, 8)
    optimizer = torch.optim.Adam(
        [*lobe.parameters(), *head.parameters()], lr=1e-2
    )
    wavs = torch.randn(2, 3200)
    targets = torch.tensor([[1, 2, 3], [4, 5, 0]])
    target_lens = torch.tensor([3, 2])
    start = lobe.gate.thresholds().detach().clone()
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            feats = lobe(wavs)
            logits = head(feats)
        assert logits.dtype == dtype
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        lengths = torch.full((2,), log_probs.shape[0])
        loss = torch.nn.functional.ctc_loss(
            log_probs, targets, lengths, target_lens
        )
        loss = loss + lobe.sparsity_loss()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        for param in (*lobe.parameters(), *head.parameters()):
            if param.grad is not None:
                assert torch.isfinite(param.grad).all()
        optimizer.step()
    thresholds = lobe.gate.thresholds().detach()
    assert torch.isfinite(thresholds).all()
    assert not torch.equal(thresholds, start)


@pytest.fixture
def asr_brain(wav2vec2_source, tmp_path, train_module):
    """The recipe's ASR Brain built from tiny_spg.yaml, ready to fit."""
    hparams = load_tiny_yaml(yaml_overrides(wav2vec2_source, tmp_path))
    brain = train_module.ASR(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts={"device": "cpu"},
        checkpointer=hparams["checkpointer"],
    )
    brain.history, brain.trace = [], TrainingTrace()
    brain.skipped_nonfinite, brain.stopwatch = Counter(), Stopwatch()
    brain.on_fit_start()
    brain.modules.train()
    return brain


def training_batch():
    """A padded batch of two utterances as the recipe's pipelines give it."""
    rows = []
    for i, length in enumerate((3200, 2400)):
        tokens = torch.tensor([5 + i, 6, 7])
        rows.append(
            {
                "id": f"utt{i}",
                "sig": torch.randn(length),
                "wrd": "ABC",
                "tokens": tokens,
                "tokens_bos": torch.cat([torch.tensor([1]), tokens]),
                "tokens_eos": torch.cat([tokens, torch.tensor([2])]),
            }
        )
    return PaddedBatch(rows)


def test_non_finite_loss_batch_is_skipped_and_counted(asr_brain):
    brain = asr_brain
    state = {
        name: value.detach().clone()
        for name, value in brain.modules.state_dict().items()
    }
    batch = training_batch()
    real_objectives = brain.compute_objectives

    def nan_objectives(predictions, batch, stage):
        return real_objectives(predictions, batch, stage) * float("nan")

    brain.compute_objectives = nan_objectives
    loss = brain.fit_batch(batch)
    assert float(loss) == 0.0
    assert brain.skipped_nonfinite.value == 1
    assert brain.optimizer_step == 0
    # Everything is left unchanged, the gate's schedule step included, but
    # the thresholds: the projection controller moved them in the forward
    # pass (its step for this schedule step, which the next batch reuses).
    for name, value in brain.modules.state_dict().items():
        if name != "ssl.gate.threshold_param":
            assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in brain.modules.parameters())
    # The next finite batch trains as usual (thresholds move).
    del brain.compute_objectives
    loss = brain.fit_batch(batch)
    assert torch.isfinite(loss)
    assert brain.skipped_nonfinite.value == 1 and brain.optimizer_step == 1
    moved = brain.modules.state_dict()["ssl.gate.threshold_param"]
    assert not torch.equal(moved, state["ssl.gate.threshold_param"])
    # The count is checkpointed: a restarted run reports every skip.
    brain.checkpointer.save_checkpoint()
    brain.skipped_nonfinite.value = 0
    brain.checkpointer.recover_if_possible()
    assert brain.skipped_nonfinite.value == 1


RANK_SCRIPT = """
import sys, torch
from speechbrain_spg.tools.recipe import nonfinite_on_any_rank
rank, init_file = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group(
    "gloo", init_method="file://" + init_file, rank=rank, world_size=2
)
decisions = []
for bad_rank in (None, 1, 0):
    loss = torch.tensor(float("nan") if rank == bad_rank else 1.5)
    decisions.append(nonfinite_on_any_rank(loss))
print("decisions", decisions)
# The recipe's skip with a DDP-wrapped model: NaN on rank 1 in the first
# batch, finite everywhere in the second; no rank may wait for the others.
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
steps = 0
for batch in range(2):
    x = torch.full((2, 4), float(rank + 1))
    loss = model(x).pow(2).mean()
    if batch == 0 and rank == 1:
        loss = loss * float("nan")
    if nonfinite_on_any_rank(loss):
        optimizer.zero_grad(set_to_none=True)
        continue
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    steps += 1
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
torch.distributed.all_gather(gathered, flat)
print("steps", steps, "equal", torch.equal(gathered[0], gathered[1]))
# As train.py does: without a barrier gloo may abort a rank at exit.
del model
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_every_ddp_rank_skips_a_batch_non_finite_on_one_rank(tmp_path):
    """Under DDP a loss that is NaN on one process only makes every process
    skip the batch (a lone skip would hang the others' all-reduce); with a
    DDP-wrapped model the ranks then train on and stay identical."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    init_file = tmp_path / "init"
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                str(rank),
                init_file,
            ],
            env=recipe_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            pytest.fail("the two processes did not finish: a rank hangs")
    for process, output in zip(ranks, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "decisions [False, True, True]" in output, output[-3000:]
        assert "steps 1 equal True" in output, output[-3000:]


# --------------------------------------------------------------------------
# 5. Export integrity
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_lobe(tiny_sources):
    """A hard-pruned tiny wav2vec2 SPG lobe."""
    lobe = SPGWav2Vec2(
        tiny_sources["wav2vec2"], save_path="", threshold_init=0.9
    )
    lobe.hard_prune()
    return lobe.eval()


def folder_digest(folder):
    """Relative path -> bytes of every file below ``folder``."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


class Interrupted(Exception):
    """Stands for a crash in the middle of an export."""


def fail_after_partial_write(monkeypatch, error=Interrupted):
    """Makes the compact file's writer write half a file, then fail."""
    import speechbrain_spg.export as export

    def partial_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise error("killed while writing")

    monkeypatch.setattr(export, "save_file", partial_save_file)


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_failed_export_into_new_folder_leaves_nothing(
    error, pruned_lobe, tmp_path, monkeypatch
):
    fail_after_partial_write(monkeypatch, error)
    with pytest.raises(error, match="killed while writing"):
        export_compact(pruned_lobe, tmp_path / "compact")
    assert os.listdir(tmp_path) == []  # no folder, no .tmp- leftover


def test_failed_overwrite_keeps_the_previous_export(
    pruned_lobe, tmp_path, monkeypatch
):
    target = tmp_path / "compact"
    export_compact(pruned_lobe, target)
    before = folder_digest(target)
    fail_after_partial_write(monkeypatch)
    with pytest.raises(Interrupted):
        export_compact(pruned_lobe, target, overwrite=True)
    assert os.listdir(tmp_path) == ["compact"]
    assert folder_digest(target) == before
    read_manifest(target)  # still verifies
    monkeypatch.undo()
    export_compact(pruned_lobe, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["compact"]


#: A process that starts an export over an existing one and is SIGKILLed
#: after the compact file is half written.
KILLED_EXPORT = """
import os, signal, sys
import speechbrain_spg.export as export
from speechbrain_spg.lobes import SPGWav2Vec2

def half_then_die(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\0" * 100)
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

lobe = SPGWav2Vec2(sys.argv[1], save_path="", threshold_init=0.9)
lobe.hard_prune()
export.save_file = half_then_die
export.export_compact(lobe, sys.argv[2], overwrite=True)
"""


def test_sigkilled_export_keeps_the_previous_export(
    pruned_lobe, tiny_sources, tmp_path
):
    target = tmp_path / "compact"
    export_compact(pruned_lobe, target)
    before = folder_digest(target)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_EXPORT)]
        + [str(tiny_sources["wav2vec2"]), str(target)],
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert folder_digest(target) == before
    assert load_compact(target) is not None
    # A SIGKILL cannot clean up: the hidden temporary folder stays, and a
    # new export next to it works.
    leftovers = [name for name in os.listdir(tmp_path) if name != "compact"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".compact.tmp-")
    export_compact(pruned_lobe, target, overwrite=True)
    read_manifest(target)


def test_export_refuses_a_file_as_target(pruned_lobe, tmp_path):
    target = tmp_path / "compact"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        export_compact(pruned_lobe, target, overwrite=True)
    assert target.read_text() == "not a folder"


def test_export_into_empty_existing_folder_needs_no_overwrite(
    pruned_lobe, tmp_path
):
    target = tmp_path / "compact"
    target.mkdir()
    export_compact(pruned_lobe, target)
    assert sorted(os.listdir(target)) == [COMPACT_FILE, MANIFEST]


def fresh_export(lobe, target, dense_hf):
    """Exports ``lobe`` (compact only, or with ``hf/``); returns the folder
    and its parsed manifest."""
    export_compact(lobe, target, dense_hf=dense_hf)
    return target, json.loads((target / MANIFEST).read_text())


@pytest.fixture
def export_copy(pruned_lobe, tmp_path):
    """A fresh compact-only export (the default) and its parsed manifest."""
    return fresh_export(pruned_lobe, tmp_path / "compact", dense_hf=False)


#: (dense_hf, a file the loaders verify), in both layouts of an export.
LOADED_FILES = [
    (False, COMPACT_FILE),
    (True, COMPACT_FILE),
    (True, "hf/config.json"),
    (True, "hf/model.safetensors"),
]
LOADED_IDS = [
    "compact_only",
    "dense_hf-compact",
    "dense_hf-config",
    "dense_hf-weights",
]


def write_manifest(folder, manifest):
    """Replaces the manifest of an export."""
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


@pytest.mark.parametrize("dense_hf, changed", LOADED_FILES, ids=LOADED_IDS)
def test_changed_file_is_refused_by_both_loaders(
    dense_hf, changed, pruned_lobe, tmp_path
):
    """A flipped bit in any file of either layout (including ``hf/``, which
    neither loader reads any more: its checksum is still verified)."""
    folder, _ = fresh_export(pruned_lobe, tmp_path / "compact", dense_hf)
    target = folder / changed
    data = bytearray(target.read_bytes())
    data[-8] ^= 0x40
    target.write_bytes(bytes(data))
    pattern = (
        "^"
        + re.escape(f"{target}: sha256 ")
        + r"[0-9a-f]{64} does not match the manifest \([0-9a-f]{64}\); the "
        r"file was modified or corrupted\. Export again\.$"
    )
    with pytest.raises(CompactExportError, match=pattern):
        load_compact(folder)
    with pytest.raises(CompactExportError, match=pattern):
        CompactWav2Vec2(str(folder))
    with pytest.raises(CompactExportError, match=pattern):
        read_manifest(folder)


@pytest.mark.parametrize("dense_hf, removed", LOADED_FILES, ids=LOADED_IDS)
def test_missing_listed_file_is_refused(
    dense_hf, removed, pruned_lobe, tmp_path
):
    folder, _ = fresh_export(pruned_lobe, tmp_path / "compact", dense_hf)
    os.remove(folder / removed)
    message = f"{folder / removed}: listed in the manifest but missing."
    for load in (load_compact, lambda f: CompactWav2Vec2(str(f))):
        with pytest.raises(CompactExportError) as error:
            load(folder)
        assert str(error.value) == message


@pytest.mark.parametrize("dense_hf, removed", LOADED_FILES, ids=LOADED_IDS)
def test_manifest_without_a_loaded_files_checksum_is_refused(
    dense_hf, removed, pruned_lobe, tmp_path
):
    folder, manifest = fresh_export(pruned_lobe, tmp_path / "compact", dense_hf)
    del manifest["files"][removed]
    write_manifest(folder, manifest)
    with pytest.raises(CompactExportError) as error:
        load_compact(folder)
    assert str(error.value) == (
        f"{folder / MANIFEST}: ['{removed}'] not listed under 'files', so "
        "their checksums cannot be verified; the manifest was edited or "
        "files were added. Export again."
    )


@pytest.mark.parametrize(
    "dense_hf, added",
    [(True, "hf/pytorch_model.bin"), (False, "hf/model.safetensors")],
    ids=["dense_hf", "compact_only"],
)
def test_file_added_to_hf_folder_is_refused(
    dense_hf, added, pruned_lobe, tmp_path
):
    """Weights slipped into ``hf/`` (next to a dense folder, or as a new one
    in a compact-only export) are not covered by the manifest: refused."""
    folder, _ = fresh_export(pruned_lobe, tmp_path / "compact", dense_hf)
    (folder / "hf").mkdir(exist_ok=True)
    torch.save({}, folder / added)
    message = (
        f"{folder / MANIFEST}: ['{added}'] not listed under 'files', so their "
        "checksums cannot be verified; the manifest was edited or files were "
        "added. Export again."
    )
    for load in (load_compact, lambda f: CompactWav2Vec2(str(f))):
        with pytest.raises(CompactExportError) as error:
            load(folder)
        assert str(error.value) == message


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m.pop("sparse_shapes"),
            "{manifest}: the keys ['sparse_shapes'] are missing; the manifest "
            "was edited or truncated. Export again.",
        ),
        (
            lambda m: m.update(format_version=1),
            "{manifest}: format_version 1 is not supported (expected 2); "
            "export the model again with this version of speechbrain-spg.",
        ),
        (
            lambda m: m.update(model_type="bert"),
            "source: '{folder}' is a 'bert' model; SPG lobes support "
            "'wav2vec2', 'hubert', 'wavlm'.",
        ),
    ],
    ids=["missing_key", "format_version", "model_type"],
)
def test_edited_manifest_is_refused(edit, message, export_copy):
    folder, manifest = export_copy
    edit(manifest)
    write_manifest(folder, manifest)
    with pytest.raises(CompactExportError) as error:
        load_compact(folder)
    assert str(error.value) == message.format(
        manifest=folder / MANIFEST, folder=folder
    )


def test_truncated_manifest_is_refused(export_copy):
    folder, _ = export_copy
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(CompactExportError, match=r": unreadable \("):
        load_compact(folder)


# --------------------------------------------------------------------------
# Recoverables used by the recipe
# --------------------------------------------------------------------------


def test_random_state_and_trace_round_trip_through_a_checkpointer(tmp_path):
    checkpointer = sb.utils.checkpoints.Checkpointer(tmp_path)
    trace = TrainingTrace()
    checkpointer.add_recoverable("rng", RandomState())
    checkpointer.add_recoverable("trace", trace)
    trace.append({"step": 1, "hard_sparsity": 0.25})
    checkpointer.save_checkpoint()
    expected = (torch.rand(3), np.random.rand(), trace.records[:])
    trace.append({"step": 2, "hard_sparsity": 0.5})
    torch.rand(5)
    checkpointer.recover_if_possible()
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand() == expected[1]
    assert trace.records == expected[2]


#: Two processes with different RNG streams save and restore their states.
DDP_RECOVERABLES = """
import json, sys
import torch
import torch.distributed as dist
from speechbrain_spg.checkpointing import RandomState, TrainingTrace

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
torch.manual_seed(100 + rank)
RandomState().save(f"{out}/rng.ckpt")
trace = TrainingTrace()
trace.append({"rank": rank})
trace.save(f"{out}/trace.ckpt")
dist.barrier()
expected = torch.rand(3).tolist()
torch.rand(7)
RandomState().load(f"{out}/rng.ckpt")
restored = TrainingTrace()
restored.load(f"{out}/trace.ckpt")
result = {"expected": expected, "got": torch.rand(3).tolist(),
          "trace": restored.records}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_recoverables_under_ddp_keep_each_processs_rng(tmp_path):
    script = tmp_path / "ddp_recoverables.py"
    script.write_text(textwrap.dedent(DDP_RECOVERABLES), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
        ],
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read_json(tmp_path / f"rank{rank}.json") for rank in (0, 1)]
    for rank in ranks:
        assert rank["got"] == rank["expected"]
        assert rank["trace"] == [{"rank": 0}]  # the main process's records
    assert ranks[0]["expected"] != ranks[1]["expected"]
