"""Tests of the SPG lobes: structure, configuration, reports, checkpoints."""

import copy
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from speechbrain.utils.checkpoints import Checkpointer
from transformers import AutoModel, BertConfig

from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.data.architectures import build_model, hub_config
from speechbrain_spg.layers import GatedLinear
from speechbrain_spg.lobes import (
    SPGHuBERT,
    SPGWav2Vec2,
    SPGWavLM,
    install_gates,
    x86_cpu,
)
from speechbrain_spg.options import DEFAULT_PRUNE_MODULES, SPGOptions

LOBES = {"wav2vec2": SPGWav2Vec2, "hubert": SPGHuBERT, "wavlm": SPGWavLM}

WAV2VEC2_BASE_PARAMS = 94_371_712
WAV2VEC2_BASE_GATED = 84_934_656
HUBERT_LARGE_PARAMS = 315_438_720
HUBERT_LARGE_GATED = 301_989_888


def _meta_model(hub_id):
    """A full-size architecture on the meta device (no memory, no download)."""
    with torch.device("meta"):
        return build_model(hub_config(hub_id))


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _wave(seed=0, batch=2, samples=4000):
    return torch.randn(
        batch, samples, generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------- full size


def test_wav2vec2_base_parameter_and_gated_counts():
    model = _meta_model("facebook/wav2vec2-base")
    assert _count(model) == WAV2VEC2_BASE_PARAMS
    assert round(_count(model) / 1e6, 1) == 94.4
    gate, names = install_gates(model, SPGOptions())
    assert len(names) == 72 and gate.num_groups == 72
    assert all(re.search(DEFAULT_PRUNE_MODULES, name) for name in names)
    for layer in range(12):
        prefix = f"encoder.layers.{layer}."
        assert sum(name.startswith(prefix) for name in names) == 6
    gated = [model.get_submodule(name) for name in names]
    assert all(isinstance(module, GatedLinear) for module in gated)
    assert sum(module.weight.numel() for module in gated) == WAV2VEC2_BASE_GATED
    # The gated layers share the parameters: the count is unchanged.
    assert _count(model) == WAV2VEC2_BASE_PARAMS


@pytest.mark.parametrize(
    ("tie", "groups"), [("linear", 72), ("block", 12), ("global", 1)]
)
def test_wav2vec2_base_tie_modes(tie, groups):
    model = _meta_model("facebook/wav2vec2-base")
    gate, names = install_gates(model, SPGOptions(tie=tie))
    assert gate.num_groups == groups
    assert len(names) == 72


def test_hubert_large_parameter_and_gated_counts():
    model = _meta_model("facebook/hubert-large-ll60k")
    total = _count(model)
    assert total == HUBERT_LARGE_PARAMS
    assert 315.4e6 <= total < 315.5e6
    gate, names = install_gates(model, SPGOptions(tie="block"))
    assert len(names) == 144 and gate.num_groups == 24
    gated = sum(model.get_submodule(name).weight.numel() for name in names)
    assert (
        gated == HUBERT_LARGE_GATED == 24 * (4 * 1024 * 1024 + 2 * 4096 * 1024)
    )


# ---------------------------------------------------------------- tiny lobes


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_tiny_lobe_structure(model_type, tiny_sources):
    lobe = LOBES[model_type](tiny_sources[model_type], save_path="")
    assert len(lobe.gated_names) == 12 and lobe.gate.num_groups == 12
    assert lobe.gated_params == 2 * (4 * 32 * 32 + 2 * 32 * 64) == 16384
    assert lobe.total_params == _count(lobe.model)
    # State-dict keys of the HuggingFace model are unchanged by the gates.
    reference = AutoModel.from_pretrained(tiny_sources[model_type])
    assert set(lobe.model.state_dict()) == set(reference.state_dict())


def test_training_forward_looks_up_no_layer_by_name(
    wav2vec2_source, monkeypatch
):
    """The gated layers are found once, at construction: by name, the
    lookups cost about 1 ms of host time per wav2vec2-base step."""
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="").train()
    layers = lobe.gated_layers()
    assert layers == [lobe.model.get_submodule(n) for n in lobe.gated_names]

    def refuse(self, name):
        raise AssertionError(f"looked up {name!r} by name")

    monkeypatch.setattr(torch.nn.Module, "get_submodule", refuse)
    (lobe(_wave(samples=2000)).sum() + lobe.sparsity_loss()).backward()
    # (LayerDrop may skip a block: its matrices get no weight gradient.)
    assert any(layer.weight.grad is not None for layer in layers)
    assert lobe.gate.threshold_param.grad.abs().sum() > 0


def test_data_parallel_copies_of_a_lobe_refuse_to_run(wav2vec2_source):
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="")
    # What torch.nn.DataParallel makes for every device in each step.
    replica = lobe._replicate_for_data_parallel()
    for mode in (True, False):
        with pytest.raises(RuntimeError) as error:
            replica.train(mode)(_wave(samples=2000))
        assert str(error.value).startswith(
            "SPGWav2Vec2 cannot run under torch.nn.DataParallel on several "
            "devices: the copies of its gated layers would all read the gate "
            "(thresholds) of the first device."
        )
    assert lobe(_wave(samples=2000)).shape[0] == 2  # the lobe itself runs


def test_a_copied_lobe_gates_its_own_layers(wav2vec2_source):
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="", threshold_init=0.9)
    before = [layer.weight.detach().clone() for layer in lobe.gated_layers()]
    twin = copy.deepcopy(lobe)
    mine = twin.gated_layers()
    assert mine == [twin.model.get_submodule(n) for n in twin.gated_names]
    assert not any(a is b for a, b in zip(mine, lobe.gated_layers()))
    # Pruning the copy (through its layers) leaves the original as it was.
    twin.hard_prune()
    assert all(layer.mask is not None for layer in mine)
    assert not lobe.is_pruned
    assert all(layer.mask is None for layer in lobe.gated_layers())
    after = [layer.weight for layer in lobe.gated_layers()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("model_type", sorted(LOBES))
def test_gated_forward_uses_the_gated_weights(model_type, tiny_sources):
    """The lobe computes the plain model with every W replaced by W * M."""
    lobe = LOBES[model_type](
        tiny_sources[model_type], save_path="", threshold_init=0.9
    ).eval()
    wav = _wave(seed=1)
    state = lobe.model.state_dict()
    with torch.no_grad():
        for name, layer in zip(lobe.gated_names, lobe.gated_layers()):
            assert not torch.allclose(layer.effective_weight(), layer.weight)
            state[f"{name}.weight"] = layer.effective_weight()
        reference = AutoModel.from_config(lobe.model.config).eval()
        reference.load_state_dict(state)
        expected = reference(F.layer_norm(wav, wav.shape[1:])).last_hidden_state
        ungated = AutoModel.from_pretrained(tiny_sources[model_type]).eval()
        raw = ungated(F.layer_norm(wav, wav.shape[1:])).last_hidden_state
        out = lobe(wav)
    assert (out - expected).abs().max().item() < 1e-5
    assert (out - raw).abs().max().item() > 1e-3


def test_every_gated_matrix_changes_the_output(wavlm_source):
    # WavLM's attention reads q/k/v/out_proj.weight directly; each threshold
    # must still act on the forward pass.
    lobe = SPGWavLM(wavlm_source, save_path="", threshold_init=0.0).eval()
    wav = _wave(seed=2, batch=1)
    with torch.no_grad():
        base = lobe(wav)
        for index, name in enumerate(lobe.gated_names):
            lobe.gate.threshold_param[index] = 10.0
            change = (lobe(wav) - base).abs().max().item()
            lobe.gate.threshold_param[index] = 0.0
            assert change > 1e-5, name


def test_step_counter_counts_training_forwards_only(wav2vec2_source):
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="")
    wav = _wave(samples=2000)
    lobe.train()
    lobe(wav)
    lobe(wav)
    with torch.no_grad():
        lobe(wav)
    lobe.eval()
    lobe(wav)
    assert int(lobe.gate.step) == 2


# ------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target_sparsity": 1.0},
            r"target_sparsity: must be a number in [0, 1), got 1.0.",
        ),
        (
            {"target_sparsity": -0.1},
            r"target_sparsity: must be a number in [0, 1), got -0.1.",
        ),
        (
            {"target_sparsity": "x"},
            r"target_sparsity: must be a number in [0, 1), got 'x'.",
        ),
        (
            {"tie": "layer"},
            r"tie: must be one of 'linear', 'block', 'global', got 'layer'.",
        ),
        (
            {"prune_modules": "(abc"},
            r"prune_modules: '(abc' is not a valid regular expression "
            r"(missing ), unterminated subpattern at position 0).",
        ),
        (
            {"prune_modules": "no_such_layer"},
            r"prune_modules: the regex 'no_such_layer' matches none of the 13 "
            r"nn.Linear modules of the model (e.g. feature_projection.projection,"
            r" encoder.layers.0.attention.k_proj,",
        ),
        ({"tau_scale": 0}, r"tau_scale: must be a finite number > 0, got 0."),
        (
            {"tau_scale": -0.5},
            r"tau_scale: must be a finite number > 0, got -0.5.",
        ),
        (
            {"freeze": True},
            r"freeze: an SPG lobe must be trainable (its thresholds learn); "
            r"set freeze: False",
        ),
        (
            {"target_scope": "everything"},
            r"target_scope: must be one of 'gated', 'model', got 'everything'.",
        ),
        (
            {"inject_sparsity_loss": "yes"},
            r"inject_sparsity_loss: must be true or false, got 'yes'.",
        ),
        (
            {"recompute_gated_weights": 1},
            r"recompute_gated_weights: must be true or false, got 1.",
        ),
        (
            {"gate_lr_scale": 0},
            r"gate_lr_scale: must be a finite number > 0, got 0.",
        ),
        (
            {"sparsity_damping": -1.0},
            r"sparsity_damping: must be a finite number >= 0, got -1.0.",
        ),
    ],
)
def test_bad_configuration_fails_at_construction(
    kwargs, message, wav2vec2_source
):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SPGWav2Vec2(wav2vec2_source, save_path="", **kwargs)


def test_unsupported_architecture_is_refused(tmp_path):
    folder = tmp_path / "bert"
    BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(folder)
    message = (
        f"source: '{folder}' is a 'bert' model; SPG lobes support "
        "'wav2vec2', 'hubert', 'wavlm'."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SPGWav2Vec2(str(folder), save_path="")


# ---------------------------------------------------------------- reports


def test_sparsity_report_counts_and_table(wav2vec2_source):
    lobe = SPGWav2Vec2(
        wav2vec2_source, save_path="", threshold_init=0.8, target_sparsity=0.6
    )
    report = lobe.sparsity_report()
    assert [layer.name for layer in report.layers] == lobe.gated_names
    per_layer_zeros = [
        round(layer.hard * layer.numel) for layer in report.layers
    ]
    assert per_layer_zeros == lobe.hard_zero_counts().tolist()
    assert report.removed_params == sum(per_layer_zeros)
    assert report.gated_params == sum(layer.numel for layer in report.layers)
    assert report.total_params == lobe.total_params
    assert report.hard == report.removed_params / report.gated_params
    assert report.model_sparsity == report.removed_params / report.total_params
    assert report.nonzero_params == report.total_params - report.removed_params
    assert report.target == 0.6
    # Threshold 0.8 std on Gaussian-initialised weights: about 58% removed.
    assert 0.5 < report.hard < 0.65
    assert abs(report.soft - report.hard) < 0.02
    for index in range(len(lobe.gated_names)):
        threshold = lobe.gate.thresholds()[index].item()
        assert report.layers[index].threshold == pytest.approx(threshold)
        assert report.layers[index].group == index

    as_dict = json.loads(json.dumps(report.as_dict()))
    assert len(as_dict["layers"]) == 12
    assert as_dict["removed_params"] == report.removed_params
    assert as_dict["model_sparsity"] == pytest.approx(report.model_sparsity)
    assert as_dict["compression_ratio"] == pytest.approx(
        report.total_params / report.nonzero_params
    )

    lines = report.table().splitlines()
    assert len(lines) == 1 + 12 + 1
    assert lines[0].split() == [
        "layer",
        "group",
        "numel",
        "hard",
        "soft",
        "threshold",
    ]
    for line, layer in zip(lines[1:-1], report.layers):
        fields = line.split()
        assert fields[0] == layer.name
        assert int(fields[2]) == layer.numel
        assert float(fields[3]) == pytest.approx(layer.hard, abs=1e-4)
    assert (
        f"{report.nonzero_params}/{report.total_params} params kept"
        in lines[-1]
    )
    assert str(report) == report.table()

    # Hard pruning removes exactly the weights the report counted.
    pruned = lobe.hard_prune()
    assert lobe.is_pruned
    assert pruned.removed_params == report.removed_params
    zeros = sum(int((layer.weight == 0).sum()) for layer in lobe.gated_layers())
    assert zeros == report.removed_params


def test_calibrated_pruning_hits_the_target(wav2vec2_source):
    lobe = SPGWav2Vec2(
        wav2vec2_source, save_path="", threshold_init=0.3, target_sparsity=0.7
    )
    report = lobe.hard_prune(calibrate=True)
    assert abs(report.hard - 0.7) <= 2 / lobe.gated_params
    assert lobe.calibration_factor > 1


def test_calibration_refuses_zero_thresholds(wav2vec2_source):
    """No common factor moves a zero threshold: a clear error, not a
    factor of 1e38 that prunes everything."""
    with pytest.warns(UserWarning, match="threshold_init: 0 is a fixed point"):
        lobe = SPGWav2Vec2(
            wav2vec2_source,
            save_path="",
            threshold_init=0.0,
            sparsity_controller="lagrangian",
        )
    with pytest.raises(
        ValueError, match=r"zero or not finite .*threshold_init"
    ):
        lobe.hard_prune(calibrate=True)
    assert not lobe.is_pruned


def test_projection_moves_zero_thresholds(wav2vec2_source):
    """The projection controller's offset step leaves a zero threshold (its
    count's slope vanishes there, so it takes its largest step): no
    warning, and the first training step prunes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="threshold_init")
        lobe = SPGWav2Vec2(
            wav2vec2_source, save_path="", threshold_init=0.0, ramp_steps=0
        )
    lobe.train()(_wave(seed=4))
    assert float(lobe.gate.thresholds().abs().min()) > 0


def test_eval_cache_follows_threshold_and_weight_updates(wav2vec2_source):
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="", threshold_init=0.5)
    wav = _wave(seed=3)
    lobe.eval()
    with torch.no_grad():
        before = lobe(wav)
    optimizer = torch.optim.Adam(lobe.parameters(), lr=0.05)
    lobe.train()
    (lobe(wav).pow(2).mean() + lobe.sparsity_loss()).backward()
    optimizer.step()
    lobe.eval()
    with torch.no_grad():
        cached = lobe(wav)
        for layer in lobe.gated_layers():
            layer._cache = None
        fresh = lobe(wav)
    assert not torch.allclose(before, cached, atol=1e-4)
    assert torch.equal(cached, fresh)


def test_uniform_magnitude_prune_is_uniform_and_stays_pruned(wav2vec2_source):
    lobe = SPGWav2Vec2(wav2vec2_source, save_path="", target_sparsity=0.65)
    report = uniform_magnitude_prune(lobe)
    assert lobe.is_pruned
    for layer in report.layers:
        assert layer.hard == round(0.65 * layer.numel) / layer.numel
    assert abs(report.hard - 0.65) < 1e-3
    masks = [layer.mask.clone() for layer in lobe.gated_layers()]
    optimizer = torch.optim.Adam(lobe.parameters(), lr=0.01)
    lobe.train()
    for _ in range(2):
        lobe(_wave(seed=4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer, mask in zip(lobe.gated_layers(), masks):
        assert torch.equal(layer.mask, mask)
        assert (layer.weight[~mask] == 0).all()
        assert (layer.weight[mask] != 0).all()
    after = lobe.sparsity_report()
    assert after.removed_params == report.removed_params
    # Binary masks: the soft sparsity is the hard one, per layer too.
    assert after.soft == after.hard
    assert all(layer.soft == layer.hard for layer in after.layers)


# ------------------------------------------------------------ checkpoints


def _train_steps(lobe, optimizer, steps, seed=5):
    lobe.train()
    for step in range(steps):
        loss = lobe(_wave(seed=seed + step)).pow(2).mean()
        if not lobe.is_pruned:
            loss = loss + lobe.sparsity_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_checkpoint_round_trip(wav2vec2_source, tmp_path):
    def build():
        return SPGWav2Vec2(
            wav2vec2_source,
            save_path="",
            threshold_init=0.6,
            target_sparsity=0.7,
            sparsity_controller="lagrangian",  # multipliers that learn
        )

    lobe = build()
    optimizer = torch.optim.Adam(lobe.parameters(), lr=0.01)
    _train_steps(lobe, optimizer, 3)
    assert int(lobe.gate.step) == 3
    assert lobe.regularizer.multipliers().abs().sum() > 0

    Checkpointer(
        tmp_path / "soft", recoverables={"lobe": lobe}
    ).save_checkpoint()
    fresh = build()
    assert not torch.equal(
        fresh.gate.threshold_param, lobe.gate.threshold_param
    )
    Checkpointer(
        tmp_path / "soft", recoverables={"lobe": fresh}
    ).recover_if_possible()
    assert torch.equal(fresh.gate.threshold_param, lobe.gate.threshold_param)
    assert torch.equal(
        fresh.regularizer.multiplier_param, lobe.regularizer.multiplier_param
    )
    assert int(fresh.gate.step) == 3
    assert not fresh.is_pruned
    assert all(layer.mask is None for layer in fresh.gated_layers())
    _assert_same_state(lobe, fresh)


def test_pruned_checkpoint_round_trip_keeps_masks(wav2vec2_source, tmp_path):
    def build():
        return SPGWav2Vec2(wav2vec2_source, save_path="", threshold_init=0.7)

    lobe = build()
    optimizer = torch.optim.Adam(lobe.parameters(), lr=0.01)
    _train_steps(lobe, optimizer, 2)
    lobe.hard_prune()
    masks = [layer.mask.clone() for layer in lobe.gated_layers()]
    # Fine-tuning goes on with the same optimiser: its momentum still pushes
    # the pruned weights, which must nevertheless be saved as zeros.
    _train_steps(lobe, optimizer, 1)
    for layer, mask in zip(lobe.gated_layers(), masks):
        assert torch.equal(layer.mask, mask)
    assert any(
        (layer.weight[~layer.mask] != 0).any() for layer in lobe.gated_layers()
    )

    Checkpointer(
        tmp_path / "pruned", recoverables={"lobe": lobe}
    ).save_checkpoint()
    fresh = build()
    Checkpointer(
        tmp_path / "pruned", recoverables={"lobe": fresh}
    ).recover_if_possible()
    assert fresh.is_pruned
    for layer, mask in zip(fresh.gated_layers(), masks):
        assert torch.equal(layer.mask, mask)
    assert torch.equal(fresh.gate.threshold_param, lobe.gate.threshold_param)
    assert int(fresh.gate.step) == int(lobe.gate.step) == 3
    _assert_same_state(lobe, fresh)
    wav = _wave(seed=9)
    lobe.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(lobe(wav), fresh(wav), atol=1e-6)
    assert fresh.sparsity_report().removed_params == sum(
        int((~mask).sum()) for mask in masks
    )


@pytest.mark.skipif(
    not x86_cpu(), reason="flush-to-zero is an x86 (SSE/AVX) mode"
)
def test_cpu_training_without_flush_to_zero_warns_once(wav2vec2_source):
    def first_steps(flush):
        lobe = SPGWav2Vec2(str(wav2vec2_source), save_path="").train()
        torch.set_flush_denormal(flush)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(2):
                    lobe(torch.randn(1, 4000)).sum().backward()
        finally:
            torch.set_flush_denormal(False)
        return [str(w.message) for w in caught if "subnormal" in str(w.message)]

    messages = first_steps(flush=False)
    assert len(messages) == 1  # checked on the first training step only
    assert "torch.set_flush_denormal(True)" in messages[0]
    assert first_steps(flush=True) == []
