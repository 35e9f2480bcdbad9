"""The SPG hyperparameters, their defaults and their validation.

Every SPG-specific option is checked when the lobe is built (when a recipe's
YAML is loaded): a bad value fails at once, naming the key and what it allows.

Authors
 * speechbrain-spg developers 2026
"""

import dataclasses
import re
import warnings

from speechbrain_spg.kernels import GATE_IMPLS
from speechbrain_spg.sparsity import validate_damping, validate_target

#: The encoder's attention and feed-forward linears (HuggingFace names).
DEFAULT_PRUNE_MODULES = (
    r"encoder\.layers\.\d+\."
    r"(attention\.(q|k|v|out)_proj|feed_forward\.(intermediate|output)_dense)$"
)
TIE_MODES = ("linear", "block", "global")
TARGET_SCOPES = ("gated", "model")
SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
_ZERO_THRESHOLD = (
    "threshold_init: 0 is a fixed point of the lagrangian controller (the "
    "thresholds get zero gradient and never move, so nothing is pruned in "
    "training); use a small positive value such as 0.05 to train."
)
_STRUCTURED_LAGRANGIAN = (
    "granularity: structured starts every threshold below all units of its "
    "sub-layer, where the gates give the thresholds no gradient: the "
    "lagrangian controller cannot move them from there. Use "
    "sparsity_controller: projection (the default)."
)
CONTROLLERS = ("projection", "lagrangian")
GRANULARITIES = ("weight", "structured")
_CHOICES = dict(
    granularity=GRANULARITIES,
    tie=TIE_MODES,
    target_scope=TARGET_SCOPES,
    gate_impl=GATE_IMPLS,
    sparsity_controller=CONTROLLERS,
)


@dataclasses.dataclass(frozen=True)
class SPGOptions:
    """Validated SPG hyperparameters.

    Arguments
    ---------
    target_sparsity : float
        Fraction of weights to remove, in [0, 1) (see ``target_scope``).
    granularity : str
        What a gate removes: single weights (``"weight"``, the paper's
        gates) or whole attention heads and feed-forward units
        (``"structured"``: the exported matrices shrink; see
        ``speechbrain_spg.structured``).
    tie : str
        One threshold per matrix (``"linear"``; structured: per block's
        attention and per block's feed-forward), per transformer block
        (``"block"``) or for the whole encoder (``"global"``).
    prune_modules : str
        Regex searched in the ``nn.Linear`` module names: matches are gated.
    tau_scale : float
        Temperature relative to each matrix's weight variance (> 0).
    threshold_init : float
        Initial threshold in units of weight std (>= 0; 0 would never move);
        structured: how far below each sub-layer's mean unit score less 3
        spreads the threshold starts, in spreads of the scores.
    target_scope : str
        The target is a fraction of the gated weights (``"gated"``) or of ALL
        parameters of the wrapped model (``"model"``).
    inject_sparsity_loss : bool
        Drop-in mode: the lobe adds its regulariser's gradient itself.
    warmup_steps, ramp_steps : int
        Steps before the target starts to rise, then of its linear rise.
    gate_lr_scale : float
        Speed of the thresholds and multipliers relative to the lr (> 0).
    sparsity_controller : str
        ``"projection"`` (default: the soft sparsity is held on the scheduled
        target at every step) or ``"lagrangian"`` (the two-multiplier
        regulariser); see ``speechbrain_spg.sparsity``.
    sparsity_damping : float
        Lagrangian only: fixed quadratic coefficient of the regulariser (>= 0; 0: the plain
        two-multiplier Lagrangian): less oscillation, but more alike layer
        sparsities.
    gate_impl : str
        ``"fused"`` (default: eager PyTorch), ``"compiled"`` (``torch.compile``
        on CPU and GPU, Triton kernels on CUDA) or ``"reference"`` (autograd);
        structured gates always use autograd (one reduction per matrix).
    recompute_gated_weights : bool
        Recompute ``W * M`` in the backward pass instead of keeping it: less
        memory, one more gate pass per step (WavLM's attention keeps its own).

    Example
    -------
    >>> SPGOptions(target_sparsity=0.65).tie
    'linear'
    >>> SPGOptions(tie="layer")
    Traceback (most recent call last):
      ...
    ValueError: tie: must be one of 'linear', 'block', 'global', got 'layer'.
    """

    target_sparsity: float = 0.5
    granularity: str = "weight"
    tie: str = "linear"
    prune_modules: str = DEFAULT_PRUNE_MODULES
    tau_scale: float = 0.02
    threshold_init: float = 0.05
    target_scope: str = "gated"
    inject_sparsity_loss: bool = False
    warmup_steps: int = 0
    ramp_steps: int = 0
    gate_lr_scale: float = 1.0
    sparsity_controller: str = "projection"
    sparsity_damping: float = 0.0
    gate_impl: str = "fused"
    recompute_gated_weights: bool = False

    def __post_init__(self):
        validate_target(self.target_sparsity, "target_sparsity")
        for key, allowed in _CHOICES.items():
            names = ", ".join(repr(a) for a in allowed)
            self._require(key, getattr(self, key) in allowed, f"one of {names}")
        regex = self.prune_modules
        what = "a non-empty regular expression string"
        self._require("prune_modules", isinstance(regex, str) and regex, what)
        try:
            re.compile(regex)
        except re.error as err:
            bad = f"prune_modules: {regex!r} is not a valid regular expression"
            raise ValueError(f"{bad} ({err}).") from None
        for key in ("tau_scale", "threshold_init", "gate_lr_scale"):
            value, strict = getattr(self, key), key != "threshold_init"
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and 0 <= value < float("inf") and (value > 0 or not strict)
            what = "a finite number > 0" if strict else "a finite number >= 0"
            self._require(key, ok, what)
            lagrangian = self.sparsity_controller == "lagrangian"
            if not strict and value == 0 and lagrangian:
                warnings.warn(_ZERO_THRESHOLD, stacklevel=3)
        structured = self.granularity == "structured"
        if structured and self.sparsity_controller == "lagrangian":
            warnings.warn(_STRUCTURED_LAGRANGIAN, stacklevel=3)
        validate_damping(self.sparsity_damping)
        for key in ("warmup_steps", "ramp_steps"):
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool)
            self._require(key, ok and value >= 0, "a non-negative integer")
        for key in ("inject_sparsity_loss", "recompute_gated_weights"):
            ok = isinstance(getattr(self, key), bool)
            self._require(key, ok, "true or false")

    def _require(self, key, ok, what):
        """Raises unless ``ok``: ``key`` must be ``what``, got its value."""
        if not ok:
            value = getattr(self, key)
            raise ValueError(f"{key}: must be {what}, got {value!r}.")


def check_model_type(model_type, source):
    """Refuses architectures the SPG lobes do not support.

    Arguments
    ---------
    model_type : str
        ``config.model_type`` of the source model.
    source : str
        The ``source`` hyperparameter, for the message.

    Returns
    -------
    str
        The model type.

    Example
    -------
    >>> check_model_type("hubert", "facebook/hubert-large-ll60k")
    'hubert'
    >>> check_model_type("whisper", "openai/whisper-tiny")
    Traceback (most recent call last):
      ...
    ValueError: source: 'openai/whisper-tiny' is a 'whisper' model; SPG lobes support 'wav2vec2', 'hubert', 'wavlm'.
    """
    if model_type not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(repr(m) for m in SUPPORTED_MODEL_TYPES)
        raise ValueError(
            f"source: {source!r} is a {model_type!r} model; SPG lobes "
            f"support {names}."
        )
    return model_type


def gated_target(target, scope, total_params, gated_params):
    """Converts a target to the fraction of GATED weights to remove.

    Arguments
    ---------
    target : float
        The user's target.
    scope : str
        ``"gated"`` (returned unchanged) or ``"model"`` (of all parameters).
    total_params, gated_params : int
        Parameters of the wrapped model; weights under a gate.

    Returns
    -------
    float
        The target for the gated weights.

    Example
    -------
    >>> round(gated_target(0.765, "model", 94_371_712, 84_934_656), 4)
    0.85
    >>> gated_target(0.95, "model", 100, 90)
    Traceback (most recent call last):
      ...
    ValueError: target_sparsity: removing 0.95 of all 100 parameters needs 1.0556 of the 90 gated weights; with target_scope 'model' the target must stay below 0.9 (gated / total). Lower target_sparsity or gate more modules (prune_modules).
    """
    if scope == "gated":
        return target
    converted = target * total_params / gated_params
    if converted >= 1:
        raise ValueError(
            f"target_sparsity: removing {target} of all {total_params} "
            f"parameters needs {converted:.4f} of the {gated_params} gated "
            f"weights; with target_scope 'model' the target must stay below "
            f"{gated_params / total_params:.4g} (gated / total). Lower "
            "target_sparsity or gate more modules (prune_modules)."
        )
    return converted
