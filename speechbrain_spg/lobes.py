"""SpeechBrain lobes of wav2vec2, HuBERT and WavLM with self-pinching gates.

The selected linear layers become ``GatedLinear`` layers sharing their
weights (same state-dict keys); each training forward pass first runs the
sparsity controller (``project_thresholds``); ``inject_sparsity_loss``
attaches the sparsity term to the output, for recipes that minimise only
their task loss.

Authors
 * speechbrain-spg developers 2026
"""

import contextlib
import difflib
import math
import re
import warnings

import torch
from speechbrain.integrations.huggingface.hubert import HuBERT
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.integrations.huggingface.wavlm import WavLM
from torch import nn
from transformers import AutoConfig
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from speechbrain_spg.gate import hard_mask
from speechbrain_spg.kernels import EAGER, select_kernels, soft_zero_counts
from speechbrain_spg.kernels.chunks import pregated_weights
from speechbrain_spg.layers import GatedLinear, SelfPinchingGate, group_indices
from speechbrain_spg.options import SPGOptions, check_model_type, gated_target
from speechbrain_spg.sparsity import (
    AuxiliaryLossInjection,
    LagrangianSparsityRegularizer,
    LayerSparsity,
    SparsityReport,
    hard_zero_counts,
    offset_step,
    project_out,
)
from speechbrain_spg.structured import install_structured


def find_prunable_linears(model, pattern):
    """The ``nn.Linear`` modules whose name matches a regex, in definition
    order (if none does, a ``ValueError`` that names some).

    Arguments
    ---------
    model : nn.Module
    pattern : str
        Searched (``re.search``) in each module name.

    Returns
    -------
    list of (str, nn.Linear)

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> [name for name, _ in find_prunable_linears(net, r"^2$")]
    ['2']
    """
    regex, modules = re.compile(pattern), model.named_modules()
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    found = [(name, module) for name, module in linears if regex.search(name)]
    if not found:
        examples = ", ".join(name for name, _ in linears[:6])
        raise ValueError(
            f"prune_modules: the regex {pattern!r} matches none of the "
            f"{len(linears)} nn.Linear modules of the model (e.g. {examples})."
        )
    return found


def install_gates(model, options):
    """Replaces (in place) the selected linear layers of ``model`` by
    ``GatedLinear`` ones, and WavLM attention by ``GatedWavLMAttention``.

    Arguments
    ---------
    model : nn.Module
    options : SPGOptions

    Returns
    -------
    gate : SelfPinchingGate
    names : list of str
        Names of the gated modules, in gate order.

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> gate, names = install_gates(net, SPGOptions(prune_modules=r"\\d"))
    >>> names, type(net[1]).__name__, gate.num_groups
    (['0', '1'], 'GatedLinear', 2)
    """
    found = find_prunable_linears(model, options.prune_modules)
    names = [name for name, _ in found]
    if options.granularity == "structured":
        gate = install_structured(
            model, found, lambda subs: group_indices(subs, options.tie), options
        )
        _gate_wavlm_attention(model)
        return gate, names
    scales = torch.stack([m.weight.detach().float().std() for _, m in found])
    gate = SelfPinchingGate(
        scales.clamp_min(torch.finfo(torch.float32).tiny),
        group_indices(names, options.tie),
        options.tau_scale,
        options.threshold_init,
        lr_scale=options.gate_lr_scale,
        impl=options.gate_impl,
        recompute_gated=options.recompute_gated_weights,
    )
    for index, (name, linear) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GatedLinear(linear, gate, index))
    _gate_wavlm_attention(model)
    return gate, names


def _gate_wavlm_attention(model):
    """WavLM attention reads its projections' tensors: it gets the gated ones."""
    for module in model.modules():
        if type(module) is WavLMAttention:
            module.__class__ = GatedWavLMAttention


@contextlib.contextmanager
def effective_weights(*layers):
    """Inside the block, the ``GatedLinear`` layers' ``weight`` (and
    ``bias``) are the gated ones, for code that reads them instead of
    calling the layers (WavLM attention).

    Arguments
    ---------
    *layers : nn.Module

    Example
    -------
    >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 100.0)  # pinches all
    >>> layer = nn.Linear(2, 2); gated = GatedLinear(layer, gate, 0)
    >>> with effective_weights(gated):
    ...     bool((gated.weight.abs() < 1e-6).all())
    True
    >>> gated.weight is layer.weight
    True
    """
    gated = [layer for layer in layers if isinstance(layer, GatedLinear)]
    originals = [dict(layer._parameters) for layer in gated]
    effective = [
        (layer.effective_weight(), layer.effective_bias()) for layer in gated
    ]
    try:
        for layer, (weight, bias) in zip(gated, effective):
            layer._parameters["weight"] = weight
            layer._parameters["bias"] = bias
        yield
    finally:
        for layer, parameters in zip(gated, originals):
            layer._parameters.update(parameters)


def refuse_misspelled_options(kwargs, option_names):
    """Refuses keyword arguments like misspelled SPG options, which
    HuggingFace would reject only after loading the model, and obscurely.

    Arguments
    ---------
    kwargs : dict
        Keyword arguments given to the lobe.
    option_names : iterable of str

    Example
    -------
    >>> refuse_misspelled_options({"output_norm": True}, ["tie", "tau_scale"])
    >>> refuse_misspelled_options({"tau_scal": 0.1}, ["tie", "tau_scale"])
    Traceback (most recent call last):
      ...
    ValueError: tau_scal: unknown option; did you mean 'tau_scale'? SPG options: tau_scale, tie.
    """
    names = sorted(option_names)
    for key in kwargs:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
        if key not in names and close:
            raise ValueError(
                f"{key}: unknown option; did you mean {close[0]!r}? SPG "
                f"options: {', '.join(names)}."
            )


def x86_cpu():
    """Whether PyTorch runs on an x86 CPU (SSE / AVX), where subnormal
    floats are slow and ``torch.set_flush_denormal`` applies.

    Returns
    -------
    bool

    Example
    -------
    >>> isinstance(x86_cpu(), bool)
    True
    """
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


def flushes_subnormals():
    """Whether this thread flushes subnormal results to zero
    (``torch.set_flush_denormal(True)``): 1e-30 * 1e-10 gives 0.

    Returns
    -------
    bool

    Example
    -------
    >>> torch.set_flush_denormal(True) and not flushes_subnormals()
    False
    >>> _ = torch.set_flush_denormal(False)
    """
    return bool(torch.tensor(1e-30) * torch.tensor(1e-10) == 0)


#: Warned at the first CPU training step if x86 computes subnormals (slow).
_SUBNORMAL_WARNING = (
    "SPG training on a CPU that computes subnormal numbers: as the gates "
    "pinch whole matrices, the gradients through them become subnormal and "
    "x86 CPUs compute these slowly. Call torch.set_flush_denormal(True) "
    "first in your script, before any other torch work (README: 'Use SPG "
    "from Python'); the recipe's train.py does."
)


class GatedWavLMAttention(WavLMAttention):
    """WavLM attention with gated projection weights: ``WavLMAttention``
    reads ``q_proj.weight`` etc. directly, bypassing ``GatedLinear.forward``.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> lobe = SPGWavLM(tiny_model_folder("wavlm"))
    >>> type(lobe.model.encoder.layers[0].attention).__name__
    'GatedWavLMAttention'
    """

    def torch_multi_head_self_attention(self, *args, **kwargs):
        """As ``WavLMAttention``'s, with the gated projection weights."""
        projections = self.q_proj, self.k_proj, self.v_proj, self.out_proj
        with effective_weights(*projections):
            return super().torch_multi_head_self_attention(*args, **kwargs)


class SPGLobeMixin:
    """Adds self-pinching gates to a SpeechBrain HuggingFace SSL lobe.

    Arguments
    ---------
    source : str
        HuggingFace hub id or local folder of the SSL model.
    save_path : str
        Download folder, as in SpeechBrain's wrappers.
    **kwargs
        SPG options (``SPGOptions``); the rest goes to SpeechBrain's wrapper.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> lobe = SPGHuBERT(tiny_model_folder("hubert"), threshold_init=0.8)
    >>> lobe.gated_layers()[0] is lobe.model.get_submodule(lobe.gated_names[0])
    True
    >>> loss = lobe(torch.randn(2, 4000)).pow(2).mean() + lobe.sparsity_loss()
    >>> loss.backward(); lobe.gate.threshold_param.grad.shape  # one per matrix
    torch.Size([12])
    >>> 0.0 < lobe.hard_prune().hard < 1.0, lobe.is_pruned  # ends the run
    (True, True)
    """

    #: Set at the first training step on a CPU (``_SUBNORMAL_WARNING``).
    _checked_subnormals = False
    #: Set on ``DataParallel``'s copies (``_replicate_for_data_parallel``).
    _is_replica = False

    def __init__(self, source, save_path="", **kwargs):
        spg_keys = {f.name for f in SPGOptions.__dataclass_fields__.values()}
        refuse_misspelled_options(kwargs, spg_keys)
        spg = {k: kwargs.pop(k) for k in list(kwargs) if k in spg_keys}
        options = SPGOptions(**spg)
        if kwargs.get("freeze", False):
            raise ValueError(
                "freeze: an SPG lobe must be trainable (its thresholds learn); "
                "set freeze: False (freeze_feature_extractor: True keeps the "
                "CNN front end fixed)."
            )
        config = AutoConfig.from_pretrained(source, cache_dir=save_path or None)
        check_model_type(config.model_type, source)
        super().__init__(source=source, save_path=save_path, **kwargs)
        self.source, self.spg_options = str(source), options
        self.structured = options.granularity == "structured"
        self.gate, self.gated_names = install_gates(self.model, options)
        self._gated_layers = tuple(
            self.model.get_submodule(name) for name in self.gated_names
        )
        total = sum(p.numel() for p in self.model.parameters())
        gated = sum(x.weight.numel() for x in self._gated_layers)
        self.total_params, self.gated_params = total, gated
        self.gated_target = gated_target(
            options.target_sparsity, options.target_scope, total, gated
        )
        self.regularizer = LagrangianSparsityRegularizer(
            self.gated_target,
            options.warmup_steps,
            options.ramp_steps,
            lr_scale=options.gate_lr_scale,
            damping=options.sparsity_damping,
        )
        self.register_load_state_dict_post_hook(_restore_masks)
        self._projected = self._hooked = self._normal = None

    def gated_layers(self):
        """The ``GatedLinear`` layers in gate order (looked up once).

        Returns
        -------
        list of GatedLinear
        """
        return list(self._gated_layers)

    @property
    def is_pruned(self):
        """Whether ``hard_prune`` has been applied."""
        return self.gate.is_pruned

    def forward(self, wav, wav_lens=None):
        """Encodes a batch of waveforms through the gated model.

        Arguments
        ---------
        wav : torch.Tensor
            Waveforms (batch, time).
        wav_lens : torch.Tensor
            Relative lengths, SpeechBrain style.

        Returns
        -------
        torch.Tensor
            The SSL features (in drop-in training: with the regulariser).
        """
        if self._is_replica:
            raise RuntimeError(
                f"{type(self).__name__} cannot run under torch.nn.DataParallel "
                "on several devices: the copies of its gated layers would all "
                "read the gate (thresholds) of the first device. Use "
                "DistributedDataParallel instead (torchrun; see the README's "
                "Multi-GPU section)."
            )
        training = self.training and torch.is_grad_enabled()
        self.gate.soft_zeros.clear()
        pregating = contextlib.nullcontext()
        if training:
            self.gate.advance()
            self.project_thresholds()
            if not self._checked_subnormals and wav.device.type == "cpu":
                self._checked_subnormals = True
                if x86_cpu() and not flushes_subnormals():
                    warnings.warn(_SUBNORMAL_WARNING, stacklevel=2)
            if not self.structured:
                pregating = pregated_weights(self.gate, self.gated_layers())
        with pregating:
            out = super().forward(wav, wav_lens)
        if training and self.spg_options.inject_sparsity_loss:
            if not self.is_pruned:
                out = AuxiliaryLossInjection.apply(out, self.sparsity_loss())
        return out

    def soft_sparsity(self):
        """Expected fraction of the gated weights removed (differentiable).

        Returns
        -------
        torch.Tensor
            Scalar in [0, 1].
        """
        count = self.gate.scale.numel()  # matrices, or structured sub-layers
        counts = self.gate.recorded_soft_zero_vector(count)
        if counts is None:
            recorded = self.gate.recorded_soft_zeros(count)
            missing = [i for i in range(count) if i not in recorded]
            if missing:
                # Only entries no forward pass gated cost an extra pass.
                computed = self._soft_zeros_of(missing)
                recorded.update(zip(missing, computed.unbind()))
            counts = torch.stack([recorded[i] for i in range(count)])
        if not torch.is_grad_enabled():
            counts = counts.detach()
        return counts.sum() / self.gated_params

    def _soft_zeros_of(self, entries):
        """Soft-zero counts of gate entries (matrices, or structured
        sub-layers) that no forward pass of this step gated."""
        layers, gate = self.gated_layers(), self.gate
        if self.structured:
            squares = gate.all_squares()
            counts = [gate.soft_zero_count(i, squares[i]) for i in entries]
            return torch.stack(counts)
        index = torch.tensor(entries, device=gate.scale.device)
        weights = [layers[i].weight.detach() for i in entries]
        ts, taus = gate.thresholds()[index], gate.taus()[index]
        return soft_zero_counts(weights, ts, taus, gate.impl)

    def hard_masks(self, thresholds=None):
        """The hard mask of every gated matrix: the fixed one if pruned,
        else ``|W| > |t|`` (structured: the units with ``s^2 > t^2``).

        Arguments
        ---------
        thresholds : torch.Tensor, optional
            Absolute threshold of every gate entry (default: the gate's).

        Returns
        -------
        list of torch.Tensor
            Boolean, ``True`` where kept, one per gated matrix.
        """
        layers = self.gated_layers()
        if self.is_pruned:
            return [layer.mask for layer in layers]
        with torch.no_grad():
            t = self.gate.thresholds() if thresholds is None else thresholds
            if self.structured:
                units = self.gate.hard_unit_masks(self.gate.all_squares(), t)
                return self.gate.weight_masks(units, layers)
            return [hard_mask(x.weight, t[i]) for i, x in enumerate(layers)]

    def hard_zero_counts(self):
        """Weights removed by the hard mask (or by the fixed mask if pruned).

        Returns
        -------
        torch.Tensor
            1-D long tensor, one count per gated matrix.
        """
        layers = self.gated_layers()
        if self.is_pruned or self.structured:
            return torch.stack([(~mask).sum() for mask in self.hard_masks()])
        weights = [layer.weight for layer in layers]
        return hard_zero_counts(weights, self.gate.thresholds())

    def _hard_zero_total(self, thresholds, measured):
        """Gated weights the hard mask removes at ``thresholds`` (one per
        gate entry); ``measured``: the weights or the structured scores."""
        if self.structured:
            return self.gate.hard_zeros(measured, thresholds).sum()
        return hard_zero_counts(measured, thresholds).sum()

    def hard_sparsity(self):
        """Fraction of the gated weights the hard mask removes.

        Returns
        -------
        float
        """
        return self.hard_zero_counts().sum().item() / self.gated_params

    def sparsity_loss(self):
        """The sparsity term of the step, to add to the task loss (or
        ``inject_sparsity_loss``): the Lagrangian (one minimising optimiser
        is enough: the multipliers ascend through a gradient reversal), or,
        with the projection controller, zero (``project_thresholds`` holds
        the target; it runs here if no forward pass of this step did).

        Returns
        -------
        torch.Tensor
        """
        if self.spg_options.sparsity_controller == "lagrangian":
            return self.regularizer(self.soft_sparsity(), self.gate.step_count)
        self.project_thresholds()
        return (self.regularizer.multiplier_param * 0).sum()

    def project_thresholds(self, passes=1):
        """Projection controller, once per training step: Newton steps on
        one offset of all thresholds put the hard sparsity on the scheduled
        target (the soft count is aimed at the hard target plus the soft-hard
        gap measured first; structured gates, whose units cross the threshold
        in jumps, aim the soft count at the target itself and are calibrated
        at the end); the direction of the sparsity's gradient is kept
        for the thresholds' gradient hook (``project_out``). Nothing during
        warm-up, after pruning or with the Lagrangian controller; no device
        read-back.

        Arguments
        ---------
        passes : int
            Newton steps (passes over the weights).
        """
        gate, step = self.gate, self.gate.step_count
        if (
            self.spg_options.sparsity_controller != "projection"
            or self.is_pruned
            or step == self._projected
            or step < self.regularizer.warmup_steps
        ):
            return
        self._projected, param = step, gate.threshold_param
        if self._hooked != id(param):  # once per parameter (deepcopy drops it)
            self._hooked = id(param)
            param.register_hook(lambda grad: project_out(grad, self._normal))
        if self.structured:
            measured = self.gate.all_squares()
            soft_zeros = gate.soft_zeros_and_slopes
        else:
            measured = [layer.weight.detach() for layer in self.gated_layers()]
            kernels = EAGER if gate.impl == "reference" else None
            kernels = kernels or select_kernels(measured, gate.impl)

            def soft_zeros(weights, t):
                return kernels.soft_zeros(weights, t, gate.taus())

        target = self.regularizer.target_at(step) * self.gated_params
        floor = 1e-3 / gate.lr_scale  # a zero threshold has zero slope
        with torch.no_grad():
            for index in range(passes):
                t = gate.thresholds().abs()
                zeros, slopes = soft_zeros(measured, t)
                slopes = (t * slopes * gate.scale).float()  # d zeros / d offset
                # Whole units jump across their threshold: structured gates
                # aim the soft count at the target (calibration ends there).
                if index == 0 and not self.structured:
                    hard = self._hard_zero_total(t, measured)
                    target = target + zeros.sum() - hard
                offset = offset_step(zeros, slopes, target)
                if self.structured:  # t = b + theta: theta may be negative
                    param.add_(offset / gate.lr_scale)
                else:
                    param.abs_().add_(offset / gate.lr_scale)
                    param.clamp_min_(floor)
            normal = torch.zeros_like(param).index_add_(0, gate.group, slopes)
            self._normal = normal

    def sparsity_report(self):
        """Sparsity overall and per gated matrix (after hard pruning the
        soft sparsity is the hard one: the gate no longer applies).

        Returns
        -------
        SparsityReport
            ``.as_dict()`` for JSON, ``.table()`` / ``str()`` to read.
        """
        layers, gate = self.gated_layers(), self.gate
        with torch.no_grad():
            thresholds, groups = gate.thresholds(), gate.group
            hard = self.hard_zero_counts()
            if self.is_pruned:
                soft = hard.double()
            elif self.structured:
                counts, _ = gate.soft_zeros_and_slopes(
                    self.gate.all_squares(), thresholds
                )
                sizes = [
                    sum(layers[i].weight.numel() for i in s.linears)
                    for s in gate.sublayers
                ]
                fraction = counts.double() / torch.tensor(sizes).double()
                which = gate.matrix_sublayer
                numels = torch.tensor([x.weight.numel() for x in layers])
                soft = fraction[which] * numels
            else:
                weights = [layer.weight for layer in layers]
                taus = gate.taus()
                soft = soft_zero_counts(weights, thresholds, taus, "reference")
            if self.structured:  # per matrix: its sub-layer's
                thresholds = thresholds[gate.matrix_sublayer]
                groups = groups[gate.matrix_sublayer]
        per_layer = tuple(
            LayerSparsity(
                name=name,
                group=int(groups[i]),
                numel=layer.weight.numel(),
                hard=hard[i].item() / layer.weight.numel(),
                soft=soft[i].item() / layer.weight.numel(),
                threshold=abs(thresholds[i].item()),
            )
            for i, (name, layer) in enumerate(zip(self.gated_names, layers))
        )
        return SparsityReport(
            target=self.gated_target,
            soft=soft.sum().item() / self.gated_params,
            hard=hard.sum().item() / self.gated_params,
            total_params=self.total_params,
            gated_params=self.gated_params,
            removed_params=int(hard.sum()),
            layers=per_layer,
        )

    def calibrate_thresholds(self, target=None, iterations=60):
        """Scales all thresholds by one factor (bisection) to hit a hard
        sparsity, keeping the allocation between layers that training found
        (a ``ValueError`` if a threshold is 0 or not finite: nothing moves it).
        Structured gates, whose thresholds are ``b + theta``, are shifted by
        one offset (in spreads) instead.

        Arguments
        ---------
        target : float, optional
            Hard sparsity to reach; default the gated target.
        iterations : int
            Bisection steps.

        Returns
        -------
        float
            The factor the thresholds were multiplied by (structured: the
            offset added to them).
        """
        target = self.gated_target if target is None else target
        base = self.gate.thresholds().detach()
        if self.structured:
            return self._calibrate_offset(target, base, iterations)
        measured = [x.weight.detach() for x in self.gated_layers()]
        names = self.gated_names
        values = zip(names, base.tolist())
        bad = [n for n, v in values if v == 0 or not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"Cannot calibrate the thresholds to sparsity {target}: "
                f"{len(bad)} of them are zero or not finite (first: "
                f"{bad[0]}), and scaling cannot move those. Was "
                "threshold_init 0? Train with a positive threshold_init, or "
                "prune without calibrate."
            )

        def sparsity(factor):
            removed = self._hard_zero_total(base * factor, measured)
            return removed.item() / self.gated_params

        low, high = 0.0, 1.0
        while sparsity(high) < target:
            high *= 2  # ends: |W| is finite, so some factor prunes them all
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if sparsity(mid) < target else (low, mid)
        with torch.no_grad():
            self.gate.threshold_param.mul_(high)
        return high

    def _calibrate_offset(self, target, base, iterations):
        """``calibrate_thresholds`` of structured gates: the smallest shift
        of every threshold (bisection) whose hard sparsity reaches
        ``target``; returns it."""
        squares = self.gate.all_squares()

        def sparsity(offset):
            thresholds = (base + offset).clamp_min(0)
            removed = self._hard_zero_total(thresholds, squares)
            return removed.item() / self.gated_params

        low, high = -float(base.max()), 1.0
        while sparsity(high) < target:
            high *= 2  # ends: the scores are finite
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if sparsity(mid) < target else (low, mid)
        with torch.no_grad():
            self.gate.threshold_param.add_(high / self.gate.lr_scale)
        return high

    def hard_prune(self, calibrate=False):
        """Applies the hard mask ``|W| > |t|`` for good (fixed masks), so that
        the lobe computes what the exported compact model computes.

        Arguments
        ---------
        calibrate : bool
            First ``calibrate_thresholds`` to the target.

        Returns
        -------
        SparsityReport
        """
        if self.is_pruned:
            return self.sparsity_report()
        if calibrate:
            calibration = self.calibrate_thresholds()
            key = (
                "calibration_offset"
                if self.structured
                else "calibration_factor"
            )
            setattr(self, key, calibration)
        self.apply_masks(self.hard_masks())
        return self.sparsity_report()

    def apply_masks(self, masks):
        """Fixes binary masks on the gated layers and zeros pruned weights.

        Arguments
        ---------
        masks : list of torch.Tensor
            One boolean mask per gated matrix (``True`` = kept; structured:
            whole units).
        """
        for layer, mask in zip(self.gated_layers(), masks):
            layer.fix_mask(mask)
        with torch.no_grad():
            self.gate.pruned.fill_(True)


def _restore_masks(module, incompatible_keys):
    """After loading a pruned checkpoint, rebuilds the fixed masks (whole
    units for structured gates)."""
    layers = module.gated_layers()
    for layer in layers:
        layer.mask = layer.bias_mask = None
    if not module.is_pruned:
        return
    masks = [layer.weight != 0 for layer in layers]
    if module.structured:
        units = module.gate.unit_masks_of(masks)
        masks = module.gate.weight_masks(units, layers)
    for layer, mask in zip(layers, masks):
        layer.fix_mask(mask)


class SPGWav2Vec2(SPGLobeMixin, Wav2Vec2):
    """SpeechBrain's ``Wav2Vec2`` lobe with self-pinching gates.

    Arguments
    ---------
    source, save_path, **kwargs
        As ``SPGLobeMixin`` (e.g. ``facebook/wav2vec2-base``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> src = tiny_model_folder("wav2vec2")
    >>> lobe = SPGWav2Vec2(src, target_sparsity=0.6)
    >>> lobe(torch.randn(2, 4000)).shape, lobe.gate.num_groups, lobe.gated_params
    (torch.Size([2, 198, 32]), 12, 16384)
    >>> for _ in range(3):  # each training pass projects the thresholds
    ...     _ = lobe.train()(torch.randn(2, 4000))
    >>> abs(lobe.hard_sparsity() - 0.6) < 1e-3, lobe.sparsity_loss().item()
    (True, 0.0)
    >>> damped = SPGWav2Vec2(src, target_sparsity=0.6, sparsity_damping=100.0,
    ...                      sparsity_controller="lagrangian")
    >>> torch.allclose(damped.sparsity_loss(), 100 * (damped.soft_sparsity() - 0.6) ** 2)
    True
    """


class SPGHuBERT(SPGLobeMixin, HuBERT):
    """SpeechBrain's ``HuBERT`` lobe with self-pinching gates.

    Arguments
    ---------
    source, save_path, **kwargs
        As ``SPGLobeMixin`` (e.g. ``facebook/hubert-large-ll60k``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> SPGHuBERT(tiny_model_folder("hubert"), tie="block").gate.num_groups
    2
    """


class SPGWavLM(SPGLobeMixin, WavLM):
    """SpeechBrain's ``WavLM`` lobe with self-pinching gates.

    Arguments
    ---------
    source, save_path, **kwargs
        As ``SPGLobeMixin`` (e.g. ``microsoft/wavlm-base-plus``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> SPGWavLM(tiny_model_folder("wavlm"), tie="global").gate.num_groups
    1
    """


def spg_lobe(source, save_path="", **kwargs):
    """The SPG lobe of ``source``'s architecture, so that one YAML block
    builds the encoder of any supported model.

    Arguments
    ---------
    source, save_path, **kwargs
        As ``SPGLobeMixin``.

    Returns
    -------
    SPGWav2Vec2, SPGHuBERT or SPGWavLM
        Chosen by the model's ``config.model_type``.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> type(spg_lobe(tiny_model_folder("hubert"), tie="block")).__name__
    'SPGHuBERT'
    """
    config = AutoConfig.from_pretrained(source, cache_dir=save_path or None)
    lobes = {"wav2vec2": SPGWav2Vec2, "hubert": SPGHuBERT, "wavlm": SPGWavLM}
    lobe = lobes[check_model_type(config.model_type, source)]
    return lobe(source, save_path=save_path, **kwargs)
