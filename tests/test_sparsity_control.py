"""Tests of sparsity control: the Lagrangian regulariser, drop-in training,
target scopes (the projection controller: ``test_controller.py``)."""

import re

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_spg.lobes import SPGWav2Vec2
from speechbrain_spg.options import gated_target
from speechbrain_spg.sparsity import (
    AuxiliaryLossInjection,
    GradientReversal,
    LagrangianSparsityRegularizer,
    scheduled_target,
)

WAV2VEC2_BASE_PARAMS = 94_371_712
WAV2VEC2_BASE_GATED = 84_934_656
TOLERANCE = 0.005


def _optimise_regularizer_only(lobe, steps=1000, lr=0.02):
    """Adam over the thresholds and multipliers on the Lagrangian term alone."""
    optimizer = torch.optim.Adam(
        [lobe.gate.threshold_param, lobe.regularizer.multiplier_param], lr=lr
    )
    for _ in range(steps):
        loss = lobe.sparsity_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lobe.gate.step += 1
    return lobe.hard_sparsity()


@pytest.mark.parametrize(
    ("target", "tie"),
    [
        (0.5, "linear"),
        (0.65, "linear"),
        (0.765, "linear"),
        (0.65, "block"),
        (0.765, "global"),
    ],
)
def test_regularizer_alone_reaches_target(target, tie, wav2vec2_source):
    lobe = SPGWav2Vec2(
        wav2vec2_source, save_path="", target_sparsity=target, tie=tie
    )
    hard = _optimise_regularizer_only(lobe)
    assert abs(hard - target) <= TOLERANCE
    assert abs(lobe.soft_sparsity().item() - target) <= TOLERANCE
    # Nothing but the thresholds moved: the weights are untouched.
    assert lobe.sparsity_report().removed_params == round(
        hard * lobe.gated_params
    )


# --------------------------------------------------------- building blocks


def test_scheduled_target_warmup_and_ramp():
    values = [
        scheduled_target(step, 0.8, 10, 20) for step in (0, 9, 10, 20, 30, 99)
    ]
    assert values == [0.0, 0.0, 0.0, 0.4, 0.8, 0.8]
    assert scheduled_target(5, 0.8) == 0.8
    regularizer = LagrangianSparsityRegularizer(
        0.8, warmup_steps=10, ramp_steps=20
    )
    assert regularizer.target_at(20) == pytest.approx(0.4)


def test_one_minimising_step_raises_the_lagrangian():
    """Multipliers ascend (gradient reversal) while the optimiser minimises."""
    regularizer = LagrangianSparsityRegularizer(0.5)
    regularizer.multiplier_param.data.fill_(0.3)
    soft = torch.tensor(0.2)  # below the target
    before = regularizer(soft, step=0).item()
    optimizer = torch.optim.SGD(regularizer.parameters(), lr=0.1)
    regularizer(soft, step=0).backward()
    optimizer.step()
    after = regularizer(soft, step=0).item()
    assert after > before
    assert regularizer.multiplier_param[0].item() < 0.3  # lambda_1 * gap grows


def test_damping_adds_a_fixed_quadratic_term():
    """``damping`` adds ``damping * gap^2``; the multipliers' gradients and
    the value at the target are unchanged."""
    plain = LagrangianSparsityRegularizer(0.5)
    damped = LagrangianSparsityRegularizer(0.5, damping=40.0)
    for regularizer in (plain, damped):
        regularizer.multiplier_param.data = torch.tensor([0.3, 2.0])
    soft = [torch.tensor(0.2, requires_grad=True) for _ in range(2)]
    values = [reg(s, step=0) for reg, s in zip((plain, damped), soft)]
    assert values[1].item() - values[0].item() == pytest.approx(40 * 0.09)
    for value in values:
        value.backward()
    assert torch.equal(
        plain.multiplier_param.grad, damped.multiplier_param.grad
    )
    # d/ds of 40 * (s - 0.5)^2 at s = 0.2.
    assert soft[1].grad.item() - soft[0].grad.item() == pytest.approx(-24.0)
    assert damped(torch.tensor(0.5), step=0).item() == pytest.approx(
        plain(torch.tensor(0.5), step=0).item()
    )
    for bad in (-1.0, float("inf"), float("nan"), True, "100", None):
        message = (
            f"sparsity_damping: must be a finite number >= 0, got {bad!r}."
        )
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            LagrangianSparsityRegularizer(0.5, damping=bad)


def _sparsity_against_a_task_pull(source, damping, steps=250, ramp=50):
    """Thresholds and multipliers under Adam (lr 0.02), the regulariser
    against a task loss that pulls every threshold down (a constant force
    per matrix, as a task that resists pruning): the gaps between soft
    sparsity and scheduled target after each step."""
    lobe = SPGWav2Vec2(
        source,
        save_path="",
        target_sparsity=0.65,
        ramp_steps=ramp,
        sparsity_damping=damping,
        sparsity_controller="lagrangian",
    )
    thresholds = lobe.gate.threshold_param
    pull = torch.linspace(0.01, 0.05, thresholds.numel())
    optimizer = torch.optim.Adam(
        [thresholds, lobe.regularizer.multiplier_param], lr=0.02
    )
    gaps = []
    for _ in range(steps):
        loss = lobe.sparsity_loss() + (pull * thresholds).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lobe.gate.advance()
        with torch.no_grad():
            target = lobe.regularizer.target_at(lobe.gate.step_count)
            gaps.append(lobe.soft_sparsity().item() - target)
    return gaps


def test_damping_removes_the_overshoot_after_the_ramp(wav2vec2_source):
    """Without damping, the multiplier built up during the ramp carries the
    sparsity far past the target; with it, the sparsity stays near."""
    ramp = 50
    undamped = _sparsity_against_a_task_pull(wav2vec2_source, 0.0, ramp=ramp)
    damped = _sparsity_against_a_task_pull(wav2vec2_source, 100.0, ramp=ramp)
    settled = slice(ramp + 50, None)
    assert max(map(abs, undamped[settled])) > 0.1
    assert max(map(abs, damped[settled])) < 0.02
    assert abs(damped[-1]) <= TOLERANCE


def test_gradient_reversal_and_injection():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (GradientReversal.apply(x) * torch.tensor([3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [-3.0, -4.0]

    weight = torch.tensor(2.0, requires_grad=True)
    features = torch.tensor([1.0, -1.0], requires_grad=True)
    out = AuxiliaryLossInjection.apply(features * weight, 7 * weight)
    assert torch.equal(out, features * weight)
    out.pow(2).sum().backward()
    injected = weight.grad.clone()
    weight.grad = None
    ((features * weight).pow(2).sum() + 7 * weight).backward()
    assert torch.equal(injected, weight.grad)


def test_injected_loss_gives_the_gradients_of_the_summed_loss(wav2vec2_source):
    def build(inject):
        torch.manual_seed(0)
        lobe = SPGWav2Vec2(
            wav2vec2_source,
            save_path="",
            threshold_init=0.5,
            target_sparsity=0.7,
            inject_sparsity_loss=inject,
            sparsity_controller="lagrangian",
        )
        lobe.regularizer.multiplier_param.data.fill_(0.5)
        return lobe.train()

    wav = torch.randn(2, 2000, generator=torch.Generator().manual_seed(1))
    injected, summed = build(True), build(False)
    torch.manual_seed(2)  # same dropout masks in both forward passes
    injected(wav).pow(2).mean().backward()
    torch.manual_seed(2)
    loss = summed(wav).pow(2).mean()
    (loss + summed.sparsity_loss()).backward()
    for (name, a), (_, b) in zip(
        injected.named_parameters(), summed.named_parameters()
    ):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    assert injected.gate.threshold_param.grad.abs().sum() > 0
    assert injected.regularizer.multiplier_param.grad.abs().sum() > 0


def test_no_injection_in_eval_or_after_pruning(wav2vec2_source):
    lobe = SPGWav2Vec2(
        wav2vec2_source, save_path="", inject_sparsity_loss=True
    ).eval()
    lobe(torch.randn(1, 2000)).sum().backward()
    assert lobe.regularizer.multiplier_param.grad is None
    lobe.train()
    lobe.hard_prune()
    lobe(torch.randn(1, 2000)).sum().backward()
    assert lobe.regularizer.multiplier_param.grad is None


# ------------------------------------------------------------ target scope


def test_model_scope_target_for_wav2vec2_base():
    converted = gated_target(
        0.765, "model", WAV2VEC2_BASE_PARAMS, WAV2VEC2_BASE_GATED
    )
    assert converted == pytest.approx(0.85, abs=1e-5)
    assert gated_target(0.765, "gated", 1, 1) == 0.765
    message = (
        "target_sparsity: removing 0.95 of all 94371712 parameters needs "
        "1.0556 of the 84934656 gated weights; with target_scope 'model' the "
        "target must stay below 0.9 (gated / total). Lower target_sparsity or "
        "gate more modules (prune_modules)."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        gated_target(0.95, "model", WAV2VEC2_BASE_PARAMS, WAV2VEC2_BASE_GATED)


def test_model_scope_target_on_a_lobe(wav2vec2_source):
    lobe = SPGWav2Vec2(
        wav2vec2_source,
        save_path="",
        target_sparsity=0.4,
        target_scope="model",
    )
    expected = 0.4 * lobe.total_params / lobe.gated_params
    assert (lobe.total_params, lobe.gated_params) == (28272, 16384)
    assert lobe.gated_target == pytest.approx(expected)
    assert lobe.regularizer.target == pytest.approx(expected)
    assert lobe.sparsity_report().target == pytest.approx(expected)
    _optimise_regularizer_only(lobe)
    report = lobe.sparsity_report()
    tolerance = TOLERANCE * lobe.gated_params / lobe.total_params
    assert abs(report.model_sparsity - 0.4) <= tolerance


def test_unreachable_model_scope_target_is_refused(wav2vec2_source):
    message = (
        "target_sparsity: removing 0.6 of all 28272 parameters needs 1.0354 "
        "of the 16384 gated weights; with target_scope 'model' the target "
        "must stay below 0.5795 (gated / total)."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SPGWav2Vec2(
            wav2vec2_source,
            save_path="",
            target_sparsity=0.6,
            target_scope="model",
        )


# ------------------------------------------------------- drop-in training

# One Adam over every parameter, SpeechBrain's default gradient clipping
# and the lobe's defaults: the projection controller needs no tuning (the
# Lagrangian needed gate_lr_scale 500, tau_scale 0.005, no clipping and 600
# steps to end near the target). The target ramps up over 50 of 100 steps.
DROP_IN = {"lr": 1e-4, "ramp_steps": 50, "steps": 100, "utterances": 2}

DROP_IN_YAML = """
source: !PLACEHOLDER
lr: !PLACEHOLDER
ramp_steps: !PLACEHOLDER
wav2vec2: !new:speechbrain_spg.lobes.SPGWav2Vec2
    source: !ref <source>
    save_path: ""
    target_sparsity: 0.5
    inject_sparsity_loss: True
    ramp_steps: !ref <ramp_steps>
head: !new:torch.nn.Linear
    in_features: 32
    out_features: 6
modules:
    wav2vec2: !ref <wav2vec2>
    head: !ref <head>
opt_class: !name:torch.optim.Adam
    lr: !ref <lr>
"""


class CTCBrain(sb.Brain):
    """A plain CTC recipe: it knows nothing about SPG."""

    def on_fit_start(self):
        super().on_fit_start()
        self.train_losses = []

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_losses.append(stage_loss)

    def compute_forward(self, batch, stage):
        wavs, wav_lens = batch.sig
        features = self.modules.wav2vec2(wavs, wav_lens)
        logits = self.modules.head(features)
        return torch.log_softmax(logits, dim=-1), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        return sb.nnet.losses.ctc_loss(
            log_probs, tokens, wav_lens, token_lens, blank_index=0
        )


def _random_ctc_dataset(count, seconds=0.5, vocabulary=6, seed=0):
    """Random waveforms with random short label sequences (no blank)."""
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for index in range(count):
        length = int(torch.randint(2, 6, (1,), generator=generator))
        data[f"utt{index}"] = {
            "wav": torch.randn(int(16000 * seconds), generator=generator),
            "labels": torch.randint(
                1, vocabulary, (length,), generator=generator
            ),
        }
    dataset = DynamicItemDataset(data)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return wav

    @sb.utils.data_pipeline.takes("labels")
    @sb.utils.data_pipeline.provides("tokens")
    def label_pipeline(labels):
        return labels

    dataset.add_dynamic_item(audio_pipeline)
    dataset.add_dynamic_item(label_pipeline)
    dataset.set_output_keys(["id", "sig", "tokens"])
    return dataset


@pytest.fixture
def single_thread():
    """Runs a test on one CPU thread (bit-reproducible, and faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_drop_in_training_reaches_the_target(
    wav2vec2_source, single_thread, seed
):
    torch.manual_seed(seed)
    hparams = load_hyperpyyaml(
        DROP_IN_YAML,
        {
            "source": wav2vec2_source,
            "lr": DROP_IN["lr"],
            "ramp_steps": DROP_IN["ramp_steps"],
        },
    )
    brain = CTCBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=None,
    )
    lobe = hparams["wav2vec2"]
    dataset = _random_ctc_dataset(DROP_IN["utterances"], seed=seed)
    brain.fit(
        range(DROP_IN["steps"]),
        dataset,
        train_loader_kwargs={"batch_size": DROP_IN["utterances"]},
    )
    assert int(lobe.gate.step) == DROP_IN["steps"]
    assert len(brain.optimizer.param_groups) == 1
    optimised = {id(p) for p in brain.optimizer.param_groups[0]["params"]}
    assert id(lobe.gate.threshold_param) in optimised
    hard = lobe.hard_prune().hard  # no calibration
    assert abs(hard - 0.5) <= TOLERANCE, f"hard sparsity {hard:.4f}"
    # The CTC loss was optimised too.
    assert brain.train_losses[-1] < brain.train_losses[0]
