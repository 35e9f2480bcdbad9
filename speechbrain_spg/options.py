"""The SPG hyperparameters, their defaults and their validation.

Every SPG-specific option is checked here, when the lobe is built (that is,
when a recipe's YAML is loaded), and a bad value fails with one message that
names the key and the allowed values.

Authors
 * speechbrain-spg developers 2026
"""

import dataclasses
import re
import warnings

from speechbrain_spg.sparsity import validate_damping, validate_target

#: Encoder attention (q/k/v/out) and feed-forward (in/out) linear layers of
#: wav2vec2, HuBERT and WavLM, as named inside the HuggingFace models.
DEFAULT_PRUNE_MODULES = (
    r"encoder\.layers\.\d+\."
    r"(attention\.(q|k|v|out)_proj|feed_forward\.(intermediate|output)_dense)$"
)
TIE_MODES = ("linear", "block", "global")
TARGET_SCOPES = ("gated", "model")
GATE_IMPLS = ("fused", "compiled", "reference")
SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")


@dataclasses.dataclass(frozen=True)
class SPGOptions:
    """Validated SPG hyperparameters.

    Arguments
    ---------
    target_sparsity : float
        Fraction of weights to remove, in [0, 1) (see ``target_scope``).
    tie : str
        Threshold sharing: ``"linear"`` (one per matrix), ``"block"`` (one per
        transformer block) or ``"global"`` (one for the encoder).
    prune_modules : str
        Regular expression searched in the names of the model's
        ``nn.Linear`` modules; the matching ones are gated.
    tau_scale : float
        Temperature relative to each matrix's weight variance (> 0).
    threshold_init : float
        Initial threshold in units of each matrix's weight std (>= 0). Every
        gradient of a threshold is proportional to it: thresholds that start
        at exactly 0 never move (no pruning), which is warned about.
    target_scope : str
        ``"gated"``: the target is the fraction of gated weights removed;
        ``"model"``: the fraction of ALL parameters of the wrapped model.
    inject_sparsity_loss : bool
        Drop-in mode: the lobe adds its regulariser's gradient itself.
    warmup_steps : int
        Training steps before the target starts to rise (>= 0).
    ramp_steps : int
        Steps over which the target rises linearly (>= 0).
    gate_lr_scale : float
        Thresholds and multipliers move this many times faster than the
        optimiser's learning rate (> 0).
    sparsity_damping : float
        Fixed quadratic coefficient of the sparsity regulariser (>= 0; see
        ``LagrangianSparsityRegularizer``): damps the oscillation of the
        sparsity around the target and its overshoot after the ramp. Larger
        values hold the target more closely but make the layers'
        sparsities more alike; the effect on WER was not clear (a tiny
        model: ``benchmarks/RESULTS.md``). 0 (default) gives the paper's
        two-multiplier Lagrangian.
    gate_impl : str
        ``"fused"`` (default: gate and soft sparsity in one pass, eager
        PyTorch), ``"compiled"`` (the same math in hand-written C kernels on
        x86-64 CPUs and Triton kernels on CUDA, ``torch.compile`` kernels
        elsewhere, eager where nothing compiles) or ``"reference"`` (plain
        autograd, for tests).
    recompute_gated_weights : bool
        Keep no gated weight from the forward pass to the backward pass:
        the matrix product's backward computes ``W * M`` again. Saves memory
        the size of the gated weights, for one more gate pass per matrix
        and step. Measured on CPU, float32, 2 x 4 s, wav2vec2-base /
        HuBERT-large: peak memory 1.10 -> 1.05 / 1.03x dense, step time
        1.05 -> 1.14x / 1.06 -> 1.09x (``benchmarks/RESULTS.md``). WavLM's attention projections, which
        do not go through ``GatedLinear.forward``, keep theirs.

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
    tie: str = "linear"
    prune_modules: str = DEFAULT_PRUNE_MODULES
    tau_scale: float = 0.02
    threshold_init: float = 0.05
    target_scope: str = "gated"
    inject_sparsity_loss: bool = False
    warmup_steps: int = 0
    ramp_steps: int = 0
    gate_lr_scale: float = 1.0
    sparsity_damping: float = 0.0
    gate_impl: str = "fused"
    recompute_gated_weights: bool = False

    def __post_init__(self):
        validate_target(self.target_sparsity, "target_sparsity")
        _check_choice("tie", self.tie, TIE_MODES)
        _check_choice("target_scope", self.target_scope, TARGET_SCOPES)
        _check_choice("gate_impl", self.gate_impl, GATE_IMPLS)
        if not isinstance(self.prune_modules, str) or not self.prune_modules:
            raise ValueError(
                "prune_modules: must be a non-empty regular expression string,"
                f" got {self.prune_modules!r}."
            )
        try:
            re.compile(self.prune_modules)
        except re.error as err:
            raise ValueError(
                f"prune_modules: {self.prune_modules!r} is not a valid regular"
                f" expression ({err})."
            ) from None
        _check_number("tau_scale", self.tau_scale, minimum=0, strict=True)
        _check_number("threshold_init", self.threshold_init, minimum=0)
        if self.threshold_init == 0:
            warnings.warn(
                "threshold_init: 0 is a fixed point (the thresholds get zero "
                "gradient and never move, so nothing is pruned in training); "
                "use a small positive value such as 0.05 to train.",
                stacklevel=3,
            )
        _check_number("gate_lr_scale", self.gate_lr_scale, 0, strict=True)
        validate_damping(self.sparsity_damping)
        _check_int("warmup_steps", self.warmup_steps)
        _check_int("ramp_steps", self.ramp_steps)
        for key in ("inject_sparsity_loss", "recompute_gated_weights"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"{key}: must be true or false, got {getattr(self, key)!r}."
                )


def _check_choice(key, value, allowed):
    """Raises unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{key}: must be one of {names}, got {value!r}.")


def _check_number(key, value, minimum, strict=False):
    """Raises unless ``value`` is a finite number above ``minimum``."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and value != float("inf")
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = ">" if strict else ">="
        raise ValueError(
            f"{key}: must be a finite number {bound} {minimum}, got {value!r}."
        )


def _check_int(key, value):
    """Raises unless ``value`` is a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{key}: must be a non-negative integer, got {value!r}."
        )


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
        ``"gated"`` (returned unchanged) or ``"model"`` (fraction of all
        parameters, converted with the parameter counts).
    total_params : int
        All parameters of the wrapped model.
    gated_params : int
        Weights under a gate.

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
        limit = gated_params / total_params
        raise ValueError(
            f"target_sparsity: removing {target} of all {total_params} "
            f"parameters needs {converted:.4f} of the {gated_params} gated "
            f"weights; with target_scope 'model' the target must stay below "
            f"{limit:.4g} (gated / total). Lower target_sparsity or gate more "
            "modules (prune_modules)."
        )
    return converted
