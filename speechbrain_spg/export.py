"""Compact export of a pruned SPG lobe, and loading it back.

``export_compact(lobe, path)`` writes, into a temporary folder then moved into
place with one rename (so an interrupted export leaves no half-written one):

- ``hf/``: a HuggingFace folder (pruned weights zero) that SpeechBrain's
  ``Wav2Vec2`` lobe and ``transformers.AutoModel`` load unchanged;
- ``compact.safetensors``: each pruned matrix as a bitmask (``<key>::mask``,
  one bit per weight) and its kept values (``<key>::values``), the rest as is;
- ``spg_manifest.json``: configuration, per-layer sparsity and thresholds,
  target, parameter counts, source and the sha256 of every file, which
  ``load_compact`` checks, with the architecture, before building the model.

Authors
 * speechbrain-spg developers 2026
"""

import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from transformers import AutoConfig, AutoModel

from speechbrain_spg import __version__
from speechbrain_spg.gate import hard_mask
from speechbrain_spg.options import check_model_type

MANIFEST = "spg_manifest.json"
COMPACT_FILE = "compact.safetensors"
HF_FOLDER = "hf"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Manifest keys that loading needs.
_MANIFEST_KEYS = ("model_type", "config", "files", "sparse_shapes")
#: Files loaded besides those in ``hf/``: the manifest must hold their sha256.
_VERIFIED_FILES = (COMPACT_FILE, f"{HF_FOLDER}/config.json")


class CompactExportError(RuntimeError):
    """A compact export is missing, tampered with or does not match."""


def pack_mask(mask):
    """Packs a boolean tensor into bytes, one bit per element.

    Arguments
    ---------
    mask : torch.Tensor
        Boolean tensor (any shape).

    Returns
    -------
    torch.Tensor
        1-D uint8 tensor of ``ceil(numel / 8)`` bytes.

    Example
    -------
    >>> pack_mask(torch.tensor([True, False, True, True]))
    tensor([176], dtype=torch.uint8)
    """
    bits = mask.detach().cpu().reshape(-1).numpy().astype(np.uint8)
    return torch.from_numpy(np.packbits(bits))


def unpack_mask(packed, shape):
    """Inverse of ``pack_mask``: the boolean mask of ``shape``.

    Arguments
    ---------
    packed : torch.Tensor
        uint8 bytes from ``pack_mask``.
    shape : sequence of int
        Shape of the original mask.

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> unpack_mask(torch.tensor([176], dtype=torch.uint8), (2, 2))
    tensor([[ True, False],
            [ True,  True]])
    """
    bits = np.unpackbits(packed.cpu().numpy(), count=math.prod(shape))
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def pruned_state_dict(lobe):
    """State dict of the lobe's HuggingFace model with the hard masks applied.

    Arguments
    ---------
    lobe : SPGLobeMixin
        An SPG lobe; if it is not pruned yet, the hard mask ``|W| > |t|`` is
        applied to the copy only.

    Returns
    -------
    state, masks : dict
        HuggingFace key -> tensor (CPU, detached copies); weight key ->
        boolean mask of every gated matrix.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="", threshold_init=0.8)
    >>> state, masks = pruned_state_dict(lobe)
    >>> key = "encoder.layers.0.attention.q_proj.weight"
    >>> bool((state[key][~masks[key]] == 0).all()), len(masks), lobe.is_pruned
    (True, 12, False)
    """
    state = lobe.model.state_dict()
    state = {key: value.detach().cpu().clone() for key, value in state.items()}
    masks = {}
    with torch.no_grad():
        thresholds = lobe.gate.thresholds()
        layers = zip(lobe.gated_names, lobe.gated_layers())
        for i, (name, layer) in enumerate(layers):
            if layer.mask is not None:
                mask = layer.mask.cpu()
            else:
                mask = hard_mask(layer.weight, thresholds[i]).cpu()
            key = f"{name}.weight"
            state[key] = state[key] * mask
            masks[key] = mask
    return state, masks


def compact_tensors(state, masks, dtype="float32"):
    """Encodes a state dict for safetensors, as bitmask + kept values for
    the masked keys.

    Arguments
    ---------
    state, masks : dict
        Key -> tensor; key -> boolean mask of the keys stored sparsely.
    dtype : str
        ``"float32"`` or ``"float16"``: storage type of every float tensor.

    Returns
    -------
    dict

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    >>> out = compact_tensors({"w": w, "b": torch.ones(2)}, {"w": w != 0})
    >>> out["w::values"], out["w::mask"], out["b"]
    (tensor([2., 3.]), tensor([96], dtype=torch.uint8), tensor([1., 1.]))
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}."
        )
    store = _DTYPES[dtype]
    out = {}
    for key, tensor in state.items():
        if key in masks:
            out[f"{key}::mask"] = pack_mask(masks[key])
            out[f"{key}::values"] = tensor[masks[key]].to(store).contiguous()
        elif tensor.is_floating_point():
            out[key] = tensor.to(store).contiguous()
        else:
            out[key] = tensor.contiguous()
    return out


def expand_tensors(tensors, shapes):
    """Inverse of ``compact_tensors``: dense float32 tensors.

    Arguments
    ---------
    tensors, shapes : dict
        Tensors read from ``compact.safetensors``; key -> shape of every
        sparsely stored matrix.

    Returns
    -------
    dict

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    >>> out = compact_tensors({"w": w}, {"w": w != 0})
    >>> torch.equal(expand_tensors(out, {"w": [2, 2]})["w"], w)
    True
    """
    state = {}
    for key, tensor in tensors.items():
        if key.endswith("::values"):
            continue
        if key.endswith("::mask"):
            name = key[: -len("::mask")]
            mask = unpack_mask(tensor, shapes[name])
            dense = torch.zeros(mask.shape, dtype=torch.float32)
            dense[mask] = tensors[f"{name}::values"].float()
            state[name] = dense
        elif tensor.is_floating_point():
            state[key] = tensor.float()
        else:
            state[key] = tensor
    return state


def sha256_of(path):
    """Hex sha256 (64 digits) of a file.

    Arguments
    ---------
    path : str or os.PathLike
        The file.

    Returns
    -------
    str

    Example
    -------
    >>> f = tempfile.NamedTemporaryFile(delete=False); _ = f.write(b"spg"); f.close()
    >>> sha256_of(f.name)[:12]
    'f2714f600579'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ideal_compact_bytes(state, masks, dtype="float32"):
    """Bytes of a compact export's tensor data without container overhead:
    dense tensors, kept values and one bit per gated weight.

    Arguments
    ---------
    state, masks : dict
        Key -> tensor (pruned); key -> boolean mask of the gated matrices.
    dtype : str
        Storage type of float tensors.

    Returns
    -------
    int

    Example
    -------
    >>> w = torch.zeros(4, 4); w[0, 0] = 1.0
    >>> ideal_compact_bytes({"w": w}, {"w": w != 0})
    6
    """
    width = torch.finfo(_DTYPES[dtype]).bits // 8
    total = 0.0
    for key, tensor in state.items():
        if key in masks:
            total += int(masks[key].sum()) * width + masks[key].numel() / 8
        elif tensor.is_floating_point():
            total += tensor.numel() * width
        else:
            total += tensor.numel() * tensor.element_size()
    return int(math.ceil(total))


def export_compact(lobe, path, dtype="float32", overwrite=False):
    """Writes the pruned lobe as a HuggingFace folder and a compact file.

    Arguments
    ---------
    lobe : SPGLobeMixin
        The SPG lobe (if it is not ``hard_prune``-d, the hard mask is applied
        to the exported copy).
    path : str or os.PathLike
        Export folder, refused if it exists and is not empty.
    dtype : str
        ``"float32"`` (default, exact) or ``"float16"`` for the compact file.
    overwrite : bool
        Replace a non-empty ``path`` instead (in one rename).

    Returns
    -------
    dict
        The manifest written to ``path/spg_manifest.json``.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="", threshold_init=0.8)
    >>> _ = lobe.hard_prune()
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> manifest = export_compact(lobe, out)
    >>> sorted(os.listdir(out)), round(manifest["sparsity"]["gated"], 2)
    (['compact.safetensors', 'hf', 'spg_manifest.json'], 0.58)
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"export_compact: {path} exists and is not empty; pass "
            "overwrite=True to replace it, or choose another folder."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"export_compact: {path} is a file, not a folder."
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        manifest = _write_export(lobe, tmp, dtype)
        if os.path.exists(path):  # replaced: moved aside, then removed
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_export(lobe, folder, dtype):
    """Writes every file of an export into ``folder``; returns the manifest."""
    state, masks = pruned_state_dict(lobe)
    hf_dir = os.path.join(folder, HF_FOLDER)
    model = AutoModel.from_config(lobe.model.config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(hf_dir)
    lobe.feature_extractor.save_pretrained(hf_dir)
    save_file(
        compact_tensors(state, masks, dtype),
        os.path.join(folder, COMPACT_FILE),
        metadata={"format": "speechbrain-spg", "version": str(FORMAT_VERSION)},
    )
    report = lobe.sparsity_report()
    removed = sum(int((~m).sum()) for m in masks.values())
    ideal = ideal_compact_bytes(state, masks, dtype)
    options, total = lobe.spg_options, lobe.total_params
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": f"speechbrain-spg {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": lobe.source,
        "model_type": lobe.model.config.model_type,
        "config": lobe.model.config.to_dict(),
        "dtype": dtype,
        "spg": {
            "target_sparsity": options.target_sparsity,
            "target_scope": options.target_scope,
            "gated_target": lobe.gated_target,
            "tie": options.tie,
            "prune_modules": options.prune_modules,
            "tau_scale": options.tau_scale,
            "calibration_factor": getattr(lobe, "calibration_factor", None),
        },
        "params": {
            "total": total,
            "gated": lobe.gated_params,
            "removed": removed,
            "nonzero": total - removed,
        },
        "sparsity": {
            "gated": removed / lobe.gated_params,
            "model": removed / total,
            "compression_ratio": total / (total - removed),
        },
        "layers": [
            {
                "name": layer.name,
                "group": layer.group,
                "numel": layer.numel,
                "sparsity": float((~masks[f"{layer.name}.weight"]).sum())
                / layer.numel,
                "threshold": layer.threshold,
            }
            for layer in report.layers
        ],
        "sparse_shapes": {key: list(m.shape) for key, m in masks.items()},
        "ideal_compact_bytes": ideal,
        "files": {
            rel: sha256_of(os.path.join(folder, rel))
            for rel in _relative_files(folder)
        },
    }
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _relative_files(folder):
    """Sorted relative POSIX paths of every file below ``folder``."""
    return sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, files in os.walk(folder)
        for name in files
    )


def read_manifest(path, verify=True):
    """Reads and (by default) verifies an export's manifest.

    Arguments
    ---------
    path : str or os.PathLike
        Export folder.
    verify : bool
        Check the sha256 of every file listed and the supported model type.

    Returns
    -------
    dict
        The manifest (else ``CompactExportError``: missing or edited manifest
        or file, unsupported model).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> read_manifest(out)["params"]["gated"]
    16384
    >>> with open(os.path.join(out, "hf", "config.json"), "a") as f:
    ...     _ = f.write(" ")
    >>> read_manifest(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    speechbrain_spg.export.CompactExportError: ...config.json: sha256 ... does not match the manifest ...
    """
    path = os.fspath(path)
    where = os.path.join(path, MANIFEST)
    if not os.path.isfile(where):
        raise CompactExportError(
            f"{where} not found: {path} is not a speechbrain-spg "
            "export (write one with speechbrain_spg.export.export_compact)."
        )
    try:
        with open(where, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CompactExportError(f"{where}: unreadable ({err}).") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CompactExportError(
            f"{where}: format_version {manifest.get('format_version')!r} is "
            f"not supported (expected {FORMAT_VERSION})."
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CompactExportError(
            f"{where}: the keys {missing} are missing; the manifest "
            "was edited or truncated. Export again."
        )
    if not verify:
        return manifest
    hf_files = _relative_files(os.path.join(path, HF_FOLDER))
    loaded = list(_VERIFIED_FILES) + [f"{HF_FOLDER}/{rel}" for rel in hf_files]
    unlisted = sorted(set(loaded) - set(manifest["files"]))
    if unlisted:
        raise CompactExportError(
            f"{where}: {unlisted} not listed under 'files', so "
            "their checksums cannot be verified; the manifest was edited "
            "or files were added. Export again."
        )
    try:
        check_model_type(manifest["model_type"], path)
    except ValueError as err:
        raise CompactExportError(str(err)) from None
    for rel, expected in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CompactExportError(
                f"{full}: listed in the manifest but missing."
            )
        actual = sha256_of(full)
        if actual != expected:
            raise CompactExportError(
                f"{full}: sha256 {actual} does not match the manifest "
                f"({expected}); the file was modified or corrupted. "
                "Export again."
            )
    return manifest


def load_compact(path, verify=True):
    """Rebuilds the HuggingFace model of a compact export.

    Arguments
    ---------
    path : str or os.PathLike
        Export folder written by ``export_compact``.
    verify : bool
        Verify checksums and architecture first (recommended).

    Returns
    -------
    transformers.PreTrainedModel
        The pruned model (float32), in eval mode (else ``CompactExportError``:
        incomplete or tampered export, tensors unlike its architecture).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="", threshold_init=0.8)
    >>> _ = lobe.eval().hard_prune()
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(lobe, out)
    >>> model, wav = load_compact(out), torch.randn(1, 4000)
    >>> with torch.no_grad():
    ...     same = model(wav).last_hidden_state - lobe.model(wav).last_hidden_state
    >>> type(model).__name__, model.training, same.abs().max().item() < 1e-5
    ('Wav2Vec2Model', False, True)
    """
    manifest = read_manifest(path, verify=verify)
    config = dict(manifest["config"])
    model = AutoModel.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    tensors = load_file(os.path.join(os.fspath(path), COMPACT_FILE))
    state = expand_tensors(tensors, manifest["sparse_shapes"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(state) & set(expected)
    wrong = sorted(k for k in common if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CompactExportError(
            f"{path}: tensors do not match the {manifest['model_type']} "
            f"architecture of the manifest (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]})."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


class CompactWav2Vec2(Wav2Vec2):
    """SpeechBrain lobe over a compact SPG export (wav2vec2, HuBERT or WavLM).

    A recipe uses a compressed model by pointing ``source`` at the export:
    the manifest's checksums are verified, then SpeechBrain's own
    ``Wav2Vec2`` lobe loads ``<export>/hf``.

    Arguments
    ---------
    source : str
        Export folder written by ``export_compact``.
    save_path : str
        Unused for local exports; kept for signature compatibility.
    verify : bool
        Verify the manifest checksums first.
    **kwargs
        Every other argument of SpeechBrain's ``Wav2Vec2`` lobe.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> CompactWav2Vec2(out)(torch.randn(1, 4000)).shape
    torch.Size([1, 198, 32])
    """

    def __init__(self, source, save_path="", verify=True, **kwargs):
        manifest = read_manifest(source, verify=verify)
        hf_folder = os.path.join(os.fspath(source), HF_FOLDER)
        super().__init__(source=hf_folder, save_path=save_path, **kwargs)
        self.manifest = manifest
