"""SpeechBrain lobes of wav2vec2, HuBERT and WavLM with self-pinching gates.

``SPGWav2Vec2``, ``SPGHuBERT`` and ``SPGWavLM`` take every constructor
argument of SpeechBrain's ``speechbrain.integrations.huggingface`` wrappers,
plus the SPG options (see ``speechbrain_spg.options.SPGOptions``). The
linear layers selected by ``prune_modules`` are replaced by ``GatedLinear``
layers that share their parameters, so the HuggingFace state-dict keys are
unchanged.

In drop-in mode (``inject_sparsity_loss=True``) the lobe attaches its
sparsity regulariser to its own output, so a recipe that only minimises its
task loss with one optimiser over ``lobe.parameters()`` still reaches the
target.

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
from speechbrain_spg.kernels import soft_zero_counts
from speechbrain_spg.layers import (
    GatedLinear,
    SelfPinchingGate,
    group_indices,
    pregated_weights,
)
from speechbrain_spg.options import (
    SPGOptions,
    check_model_type,
    gated_target,
)
from speechbrain_spg.sparsity import (
    AuxiliaryLossInjection,
    LagrangianSparsityRegularizer,
    LayerSparsity,
    SparsityReport,
    hard_zero_counts,
)


def find_prunable_linears(model, pattern):
    """Lists the ``nn.Linear`` modules whose name matches a regex.

    Arguments
    ---------
    model : nn.Module
        The model to search.
    pattern : str
        Regular expression, searched (``re.search``) in each module name.

    Returns
    -------
    list of (str, nn.Linear)
        Matching modules in definition order.

    Raises
    ------
    ValueError
        If nothing matches (the message lists some linear layer names).

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> [name for name, _ in find_prunable_linears(net, r"^2$")]
    ['2']
    """
    regex = re.compile(pattern)
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    found = [(name, module) for name, module in linears if regex.search(name)]
    if not found:
        examples = ", ".join(name for name, _ in linears[:6])
        raise ValueError(
            f"prune_modules: the regex {pattern!r} matches none of the "
            f"{len(linears)} nn.Linear modules of the model (e.g. {examples})."
        )
    return found


def install_gates(model, options):
    """Replaces the selected linear layers of ``model`` by gated ones.

    Arguments
    ---------
    model : nn.Module
        The HuggingFace model (modified in place).
    options : SPGOptions
        Which modules, how thresholds are tied, initial values.

    Returns
    -------
    gate : SelfPinchingGate
        The gate holding the thresholds.
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
    for module in model.modules():
        if type(module) is WavLMAttention:
            module.__class__ = GatedWavLMAttention
    return gate, names


@contextlib.contextmanager
def effective_weights(*layers):
    """Makes ``layer.weight`` read as the gated weight inside the block.

    For code that reads the weights of linear layers instead of calling them
    (WavLM's attention passes ``q_proj.weight`` etc. to
    ``F.multi_head_attention_forward``). Layers that are not ``GatedLinear``
    are left alone; the parameters are put back on exit.

    Arguments
    ---------
    *layers : nn.Module
        The layers whose ``weight`` is read inside the block.

    Example
    -------
    >>> layer = nn.Linear(2, 2)
    >>> gate = SelfPinchingGate(torch.ones(1), [0], 0.05, 100.0)
    >>> gated = GatedLinear(layer, gate, 0)
    >>> with effective_weights(gated):
    ...     bool((gated.weight.abs() < 1e-6).all())
    True
    >>> gated.weight is layer.weight
    True
    """
    gated = [layer for layer in layers if isinstance(layer, GatedLinear)]
    originals = [layer._parameters["weight"] for layer in gated]
    effective = [layer.effective_weight() for layer in gated]
    try:
        for layer, weight in zip(gated, effective):
            layer._parameters["weight"] = weight
        yield
    finally:
        for layer, weight in zip(gated, originals):
            layer._parameters["weight"] = weight


def refuse_misspelled_options(kwargs, option_names):
    """Refuses keyword arguments that look like misspelled SPG options.

    The lobes pass unknown keywords on to SpeechBrain and HuggingFace, which
    would otherwise reject a typo only after loading the model, with a
    message about ``Wav2Vec2Model.__init__``.

    Arguments
    ---------
    kwargs : dict
        Keyword arguments given to the lobe.
    option_names : iterable of str
        The SPG option names.

    Raises
    ------
    ValueError
        For a keyword close to, but not equal to, an option name.

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
    """Whether PyTorch runs on an x86 CPU (SSE / AVX): there subnormal
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
    """Whether this thread flushes subnormal float results to zero
    (``torch.set_flush_denormal(True)``).

    Returns
    -------
    bool
        From a product whose exact value (1e-40) is subnormal.

    Example
    -------
    >>> torch.set_flush_denormal(True) and not flushes_subnormals()
    False
    >>> _ = torch.set_flush_denormal(False)
    """
    return bool(torch.tensor(1e-30) * torch.tensor(1e-10) == 0)


def keeps_subnormals():
    """Whether this thread computes subnormal floats on an x86 CPU, where
    they are slow (no ``torch.set_flush_denormal(True)``).

    Returns
    -------
    bool
        False on other CPUs (the setting does not apply there) and with
        flush-to-zero on.

    Example
    -------
    >>> torch.set_flush_denormal(True) and keeps_subnormals()
    False
    >>> _ = torch.set_flush_denormal(False)
    """
    return x86_cpu() and not flushes_subnormals()


def _warn_about_subnormals():
    """The warning of CPU training without flush-to-zero (shown once per
    process by Python's default warning filter)."""
    warnings.warn(
        "SPG training on a CPU that computes subnormal numbers: as the "
        "gates pinch whole matrices, the gradients through them become "
        "subnormal and x86 CPUs compute these slowly. Call "
        "torch.set_flush_denormal(True) first "
        "in your script, before any other torch work (README: 'Use SPG "
        "from Python'); the recipe's train.py does.",
        UserWarning,
        stacklevel=3,
    )


class GatedWavLMAttention(WavLMAttention):
    """WavLM attention whose projection weights go through their gates.

    ``WavLMAttention`` reads ``q_proj.weight``, ``k_proj.weight``,
    ``v_proj.weight`` and ``out_proj.weight`` directly, which would bypass
    ``GatedLinear.forward``; ``install_gates`` switches WavLM attention
    modules to this class, which computes the same attention with the
    effective (gated or masked) weights.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import (
    ...     TINY_OVERRIDES, build_config, build_model)
    >>> model = build_model(build_config("wavlm", **TINY_OVERRIDES))
    >>> _ = install_gates(model, SPGOptions())
    >>> type(model.encoder.layers[0].attention).__name__
    'GatedWavLMAttention'
    """

    def torch_multi_head_self_attention(self, *args, **kwargs):
        """WavLM's attention with the gated projection weights.

        Arguments
        ---------
        *args, **kwargs
            As ``WavLMAttention.torch_multi_head_self_attention``.

        Returns
        -------
        tuple
            As ``WavLMAttention.torch_multi_head_self_attention``.
        """
        with effective_weights(
            self.q_proj, self.k_proj, self.v_proj, self.out_proj
        ):
            return super().torch_multi_head_self_attention(*args, **kwargs)


class SPGLobeMixin:
    """Adds self-pinching gates to a SpeechBrain HuggingFace SSL lobe.

    Mixed in front of ``Wav2Vec2`` / ``HuBERT`` / ``WavLM``; the keyword
    arguments of ``SPGOptions`` are taken here, every other argument goes to
    the SpeechBrain wrapper unchanged.

    Arguments
    ---------
    source : str
        HuggingFace hub id or local folder of the SSL model.
    save_path : str
        Download folder, as in SpeechBrain's wrappers.
    **kwargs
        SPG options (``target_sparsity``, ``tie``, ``prune_modules``,
        ``tau_scale``, ``threshold_init``, ``target_scope``,
        ``inject_sparsity_loss``, ``warmup_steps``, ``ramp_steps``,
        ``gate_lr_scale``, ``sparsity_damping``, ``gate_impl``,
        ``recompute_gated_weights``) and the wrapper's own arguments.

    Example
    -------
    Used through ``SPGWav2Vec2``, ``SPGHuBERT`` and ``SPGWavLM``: a training
    step, then the hard pruning that ends the run.

    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> src = tiny_model_folder("hubert")
    >>> lobe = SPGHuBERT(src, save_path="", threshold_init=0.8)
    >>> loss = lobe(torch.randn(2, 4000)).pow(2).mean() + lobe.sparsity_loss()
    >>> loss.backward()
    >>> lobe.gate.threshold_param.grad.shape  # one threshold per matrix
    torch.Size([12])
    >>> report = lobe.hard_prune(calibrate=False)
    >>> lobe.is_pruned, 0.0 < report.hard < 1.0
    (True, True)
    """

    #: Set at the first training step on a CPU (see ``keeps_subnormals``).
    _checked_subnormals = False
    #: Set on the copies ``torch.nn.DataParallel`` makes (PyTorch's
    #: ``_replicate_for_data_parallel``), which refuse to run.
    _is_replica = False

    def __init__(self, source, save_path="", **kwargs):
        spg_keys = {f.name for f in SPGOptions.__dataclass_fields__.values()}
        refuse_misspelled_options(kwargs, spg_keys)
        options = SPGOptions(
            **{k: kwargs.pop(k) for k in list(kwargs) if k in spg_keys}
        )
        if kwargs.get("freeze", False):
            raise ValueError(
                "freeze: an SPG lobe must be trainable (its thresholds learn); "
                "set freeze: False (freeze_feature_extractor: True keeps the "
                "CNN front end fixed)."
            )
        config = AutoConfig.from_pretrained(source, cache_dir=save_path or None)
        check_model_type(config.model_type, source)
        super().__init__(source=source, save_path=save_path, **kwargs)
        self.source = str(source)
        self.spg_options = options
        self.gate, self.gated_names = install_gates(self.model, options)
        # Looked up once, not by name in every training step (host time).
        self._gated_layers = tuple(
            self.model.get_submodule(name) for name in self.gated_names
        )
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.gated_params = sum(
            layer.weight.numel() for layer in self.gated_layers()
        )
        self.gated_target = gated_target(
            options.target_sparsity,
            options.target_scope,
            self.total_params,
            self.gated_params,
        )
        self.regularizer = LagrangianSparsityRegularizer(
            self.gated_target,
            options.warmup_steps,
            options.ramp_steps,
            lr_scale=options.gate_lr_scale,
            damping=options.sparsity_damping,
        )
        self.register_load_state_dict_post_hook(_restore_masks)

    def gated_layers(self):
        """The ``GatedLinear`` layers, in gate order.

        They are the layers ``install_gates`` put in the model, looked up
        once when the lobe was built (looking them up by name in every
        training step cost host time); a module swapped into the model
        afterwards is not among them.

        Returns
        -------
        list of GatedLinear
            One per gated matrix.

        Example
        -------
        >>> from speechbrain_spg.data.architectures import tiny_model_folder
        >>> src = tiny_model_folder("wav2vec2")
        >>> lobe = SPGWav2Vec2(src, save_path="")
        >>> layers = lobe.gated_layers()
        >>> lobe.gated_names[0], layers[0] is lobe.model.get_submodule(
        ...     lobe.gated_names[0])
        ('encoder.layers.0.attention.k_proj', True)
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
            The SSL features, as the wrapped lobe returns them. In drop-in
            mode during training they carry the sparsity regulariser's
            gradient.
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
        if training:
            self.gate.advance()
            if not self._checked_subnormals and wav.device.type == "cpu":
                self._checked_subnormals = True
                if keeps_subnormals():
                    _warn_about_subnormals()
        # Fused paths on a GPU: a block's matrices gated in one call (little
        # host work per matrix).
        with (
            pregated_weights(self.gate, self.gated_layers())
            if training
            else contextlib.nullcontext()
        ):
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
        count = len(self.gated_names)
        whole = self.gate.recorded_soft_zero_vector(count)
        if whole is not None:
            counts = whole if torch.is_grad_enabled() else whole.detach()
            return counts.sum() / self.gated_params
        recorded = self.gate.recorded_soft_zeros(count)
        missing = [i for i in range(count) if i not in recorded]
        if missing:
            # Only the matrices the forward pass did not gate (reference
            # path, no training forward pass yet) cost an extra pass.
            layers = self.gated_layers()
            index = torch.tensor(missing, device=self.gate.scale.device)
            weights = [layers[i].weight.detach() for i in missing]
            computed = soft_zero_counts(
                weights,
                self.gate.thresholds()[index],
                self.gate.taus()[index],
                self.gate.impl,
            )
            recorded.update(zip(missing, computed.unbind()))
        counts = torch.stack([recorded[i] for i in range(count)])
        if not torch.is_grad_enabled():
            counts = counts.detach()
        return counts.sum() / self.gated_params

    def hard_zero_counts(self):
        """Weights removed by the hard mask (or by the fixed mask if pruned).

        Returns
        -------
        torch.Tensor
            1-D long tensor, one count per gated matrix.
        """
        layers = self.gated_layers()
        if self.is_pruned:
            return torch.stack([(~layer.mask).sum() for layer in layers])
        return hard_zero_counts(
            [layer.weight for layer in layers], self.gate.thresholds()
        )

    def hard_sparsity(self):
        """Fraction of the gated weights the hard mask removes.

        Returns
        -------
        float
            In [0, 1].
        """
        return self.hard_zero_counts().sum().item() / self.gated_params

    def sparsity_loss(self):
        """The Lagrangian sparsity term for the current step.

        Add it to the task loss (or use ``inject_sparsity_loss``). One
        minimising optimiser over all parameters is enough: the multipliers
        ascend through a gradient reversal.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        return self.regularizer(self.soft_sparsity(), self.gate.step_count)

    def sparsity_report(self):
        """Sparsity overall and per gated matrix.

        After hard pruning the masks are binary, so the soft sparsity equals
        the hard one (the gate no longer applies).

        Returns
        -------
        SparsityReport
            ``.as_dict()`` for JSON, ``.table()`` / ``str()`` to read.
        """
        layers = self.gated_layers()
        with torch.no_grad():
            thresholds = self.gate.thresholds()
            hard = self.hard_zero_counts()
            if self.is_pruned:
                soft = hard.double()
            else:
                soft = soft_zero_counts(
                    [layer.weight for layer in layers],
                    thresholds,
                    self.gate.taus(),
                    "reference",
                )
        per_layer = tuple(
            LayerSparsity(
                name=name,
                group=int(self.gate.group[i]),
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
        """Scales all thresholds by one factor so hard sparsity hits a target.

        The relative allocation between layers that training found is kept.
        Returns the factor so that it can be reported.

        Arguments
        ---------
        target : float, optional
            Hard sparsity to reach; default the gated target.
        iterations : int
            Bisection steps.

        Returns
        -------
        float
            The factor the thresholds were multiplied by.

        Raises
        ------
        ValueError
            If a threshold is zero or not finite: no common factor can
            move it (e.g. ``threshold_init: 0``, which never trains).
        """
        target = self.gated_target if target is None else target
        weights = [layer.weight.detach() for layer in self.gated_layers()]
        base = self.gate.thresholds().detach()
        bad = [
            name
            for name, value in zip(self.gated_names, base.tolist())
            if value == 0 or not math.isfinite(value)
        ]
        if bad:
            raise ValueError(
                f"Cannot calibrate the thresholds to sparsity {target}: "
                f"{len(bad)} of them are zero or not finite (first: "
                f"{bad[0]}), and scaling cannot move those. Was "
                "threshold_init 0? Train with a positive threshold_init, or "
                "prune without calibrate."
            )

        def sparsity(factor):
            return hard_zero_counts(weights, base * factor).sum().item() / (
                self.gated_params
            )

        low, high = 0.0, 1.0
        while sparsity(high) < target:
            high *= 2  # ends: |W| is finite, so some factor prunes them all
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if sparsity(mid) < target else (low, mid)
        with torch.no_grad():
            self.gate.threshold_param.mul_(high)
        return high

    def hard_prune(self, calibrate=False):
        """Applies the hard mask ``|W| > |t|`` permanently.

        Pruned weights are set to zero and kept at zero by a fixed mask in
        any further fine-tuning; the soft gate is switched off, so the lobe
        computes exactly what the exported compact model computes.

        Arguments
        ---------
        calibrate : bool
            First scale the thresholds so the hard sparsity equals the target
            (see ``calibrate_thresholds``).

        Returns
        -------
        SparsityReport
            The sparsity after pruning.
        """
        if self.is_pruned:
            return self.sparsity_report()
        if calibrate:
            self.calibration_factor = self.calibrate_thresholds()
        with torch.no_grad():
            thresholds = self.gate.thresholds()
            masks = [
                hard_mask(layer.weight, thresholds[i])
                for i, layer in enumerate(self.gated_layers())
            ]
        self.apply_masks(masks)
        return self.sparsity_report()

    def apply_masks(self, masks):
        """Fixes binary masks on the gated layers and zeros the pruned weights.

        Arguments
        ---------
        masks : list of torch.Tensor
            One boolean mask per gated matrix (``True`` = kept).
        """
        with torch.no_grad():
            for layer, mask in zip(self.gated_layers(), masks):
                layer.weight.mul_(mask)
                layer.mask = mask.to(torch.bool)
            self.gate.pruned.fill_(True)


def _restore_masks(module, incompatible_keys):
    """After loading a pruned checkpoint, rebuilds the fixed masks."""
    for layer in module.gated_layers():
        layer.mask = (layer.weight != 0) if module.is_pruned else None


class SPGWav2Vec2(SPGLobeMixin, Wav2Vec2):
    """SpeechBrain's ``Wav2Vec2`` lobe with self-pinching gates.

    Arguments
    ---------
    source : str
        HuggingFace hub id (e.g. ``facebook/wav2vec2-base``) or local folder.
    save_path : str
        Download folder.
    **kwargs
        SPG options (see ``SPGOptions``: ``target_sparsity``, ``tie``,
        ``prune_modules``, ``tau_scale``, ``threshold_init``,
        ``target_scope``, ``inject_sparsity_loss``, ``warmup_steps``,
        ``ramp_steps``, ``gate_lr_scale``, ``sparsity_damping``, ...) and
        every argument of
        ``speechbrain.integrations.huggingface.wav2vec2.Wav2Vec2``
        (``output_norm``, ``freeze_feature_extractor``, ...).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> src = tiny_model_folder("wav2vec2")
    >>> lobe = SPGWav2Vec2(src, save_path="", target_sparsity=0.6)
    >>> lobe(torch.randn(2, 4000)).shape
    torch.Size([2, 198, 32])
    >>> lobe.gate.num_groups, lobe.gated_params
    (12, 16384)
    >>> lobe.sparsity_loss()  # multipliers still at 0
    tensor(0., grad_fn=<AddBackward0>)
    >>> damped = SPGWav2Vec2(src, save_path="", target_sparsity=0.6,
    ...                      sparsity_damping=100.0)
    >>> gap = damped.soft_sparsity() - 0.6
    >>> torch.allclose(damped.sparsity_loss(), 100 * gap**2)
    True
    """


class SPGHuBERT(SPGLobeMixin, HuBERT):
    """SpeechBrain's ``HuBERT`` lobe with self-pinching gates.

    Arguments
    ---------
    source : str
        HuggingFace hub id (e.g. ``facebook/hubert-large-ll60k``) or folder.
    save_path : str
        Download folder.
    **kwargs
        SPG options (see ``SPGWav2Vec2``) and every argument of
        ``speechbrain.integrations.huggingface.hubert.HuBERT``.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> src = tiny_model_folder("hubert")
    >>> lobe = SPGHuBERT(src, save_path="", tie="block")
    >>> lobe.gate.num_groups
    2
    """


class SPGWavLM(SPGLobeMixin, WavLM):
    """SpeechBrain's ``WavLM`` lobe with self-pinching gates.

    Arguments
    ---------
    source : str
        HuggingFace hub id (e.g. ``microsoft/wavlm-base-plus``) or folder.
    save_path : str
        Download folder.
    **kwargs
        SPG options (see ``SPGWav2Vec2``) and every argument of
        ``speechbrain.integrations.huggingface.wavlm.WavLM``.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> src = tiny_model_folder("wavlm")
    >>> lobe = SPGWavLM(src, save_path="", tie="global")
    >>> lobe.gate.num_groups
    1
    """
