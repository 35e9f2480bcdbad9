"""Compact export of a pruned SPG lobe, and loading it back.

``export_compact(lobe, path)`` writes, into a temporary folder then moved into
place with one rename (so an interrupted export leaves no half-written one):

- ``compact.safetensors``: each pruned matrix as a bitmask (``<key>::mask``,
  one bit per weight) and its kept values (``<key>::values``), the rest as is
  (a structured export: the smaller matrices, no mask); with ``dtype="int8"``
  every gated matrix's kept values are int8 (``<key>::int8``, with one
  float32 scale per output row in ``<key>::scales``, see
  ``speechbrain_spg.quantize``) and the other tensors float16;
- ``spg_manifest.json``: configuration, feature extractor, per-layer sparsity
  and thresholds, target, parameter counts, source and the sha256 of every
  file, which ``load_compact`` checks, with the architecture, before loading;
- on request (``dense_hf=True``), ``hf/``: a plain HuggingFace folder (pruned
  weights zero) for tools that only read HuggingFace weights.

``CompactWav2Vec2`` is the SpeechBrain lobe over an export: it reads the
compact form directly, and by default keeps the pruned weights at zero
through further fine-tuning.

Authors
 * speechbrain-spg developers 2026
"""

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    mark_as_transfer,
    register_checkpoint_hooks,
)
from transformers import AutoConfig, AutoModel
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

from speechbrain_spg import __version__
from speechbrain_spg.options import check_model_type
from speechbrain_spg.quantize import (
    EMPTY_ROW_SCALE,
    SCHEME,
    dequantize_matrix,
    dynamic_int8_linear,
    int8_matrix,
    quantize_matrix,
)
from speechbrain_spg.shrink import (
    ShrunkWavLMAttention,
    block_sizes,
    shrink_model,
    unused_parameters,
)

MANIFEST = "spg_manifest.json"
COMPACT_FILE = "compact.safetensors"
HF_FOLDER = "hf"
FORMAT_VERSION = 2
#: Export dtype -> storage type of its float tensors (int8: the ungated ones).
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int8": torch.float16,
}
#: Key suffixes of a quantised matrix: its int8 values, its per-row scales.
_INT8, _SCALES = "::int8", "::scales"
#: Manifest keys that loading needs.
_MANIFEST_KEYS = ("model_type", "config", "files", "sparse_shapes")


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
    layers = zip(lobe.gated_names, lobe.hard_masks(), lobe.gated_layers())
    for name, mask, layer in layers:
        mask = mask.cpu()
        key = f"{name}.weight"
        state[key] = state[key] * mask
        masks[key] = mask
        bias = state.get(f"{name}.bias")
        if getattr(layer, "axis", None) == 0 and bias is not None:
            # A removed unit's row takes its bias with it.
            state[f"{name}.bias"] = bias * mask.any(dim=1)
    return state, masks


def compact_tensors(state, masks, dtype="float32", quantized=None):
    """Encodes a state dict for safetensors, as bitmask + kept values for
    the masked keys (and, in int8, int8 values + per-row scales).

    Arguments
    ---------
    state, masks : dict
        Key -> tensor; key -> boolean mask of the keys stored sparsely.
    dtype : str
        ``"float32"`` or ``"float16"``: storage type of every float tensor;
        ``"int8"``: the ``quantized`` matrices in int8 (kept values only,
        ``<key>::int8``) with one float32 scale per output row
        (``<key>::scales``), every other float tensor in float16.
    quantized : collection of str, optional
        With ``dtype="int8"``, the 2-D keys stored in int8 (default: the
        masked ones); ignored otherwise.

    Returns
    -------
    dict

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    >>> out = compact_tensors({"w": w, "b": torch.ones(2)}, {"w": w != 0})
    >>> out["w::values"], out["w::mask"], out["b"]
    (tensor([2., 3.]), tensor([96], dtype=torch.uint8), tensor([1., 1.]))
    >>> out = compact_tensors({"w": w}, {"w": w != 0}, "int8")
    >>> out["w::int8"], out["w::scales"]
    (tensor([127, 127], dtype=torch.int8), tensor([0.0157, 0.0236]))
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}."
        )
    store = _DTYPES[dtype]
    if dtype != "int8":
        quantized = ()
    quantized = set(masks if quantized is None else quantized)
    out = {}
    for key, tensor in state.items():
        mask = masks.get(key)
        if key in quantized:
            q, out[f"{key}{_SCALES}"] = quantize_matrix(tensor, mask)
            out[f"{key}{_INT8}"] = q.contiguous()
        elif mask is not None:
            out[f"{key}::values"] = tensor[mask].to(store).contiguous()
        elif tensor.is_floating_point():
            out[key] = tensor.to(store).contiguous()
        else:
            out[key] = tensor.contiguous()
        if mask is not None:
            out[f"{key}::mask"] = pack_mask(mask)
    return out


def expand_tensors(tensors, shapes, pool=None):
    """Inverse of ``compact_tensors``: dense float32 tensors and the masks.

    Each matrix is scattered from the positions of its set bits (int8 ones
    dequantised: ``q * scale`` of their row); matrices are independent, so
    a thread pool expands several at once.

    Arguments
    ---------
    tensors, shapes : dict
        Tensors read from ``compact.safetensors``; key -> shape of (at least)
        every sparsely stored matrix.
    pool : concurrent.futures.Executor, optional
        Where the matrices are expanded (default: one after the other).

    Returns
    -------
    state, masks : dict
        Key -> tensor; key -> boolean mask of every sparsely stored matrix.

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    >>> state, masks = expand_tensors(compact_tensors({"w": w}, {"w": w != 0}), {"w": [2, 2]})
    >>> torch.equal(state["w"], w), masks["w"].tolist()
    (True, [[False, True], [True, False]])
    >>> int8 = compact_tensors({"w": w}, {}, "int8", quantized=["w"])
    >>> torch.equal(expand_tensors(int8, {})[0]["w"], w)
    True
    """

    def expand(name):
        shape = tuple(shapes[name])
        packed = tensors[f"{name}::mask"].numpy()
        bits = np.unpackbits(packed, count=math.prod(shape)).view(np.bool_)
        mask = torch.from_numpy(bits).reshape(shape)
        if f"{name}{_INT8}" in tensors:  # int8 kept values, per-row scales
            q, scales = tensors[f"{name}{_INT8}"], tensors[f"{name}{_SCALES}"]
            return dequantize_matrix(q, scales, mask), mask
        dense = np.zeros(bits.shape, dtype=np.float32)
        dense[np.flatnonzero(bits)] = tensors[f"{name}::values"].float().numpy()
        return torch.from_numpy(dense).reshape(shape), mask

    names = [key[: -len("::mask")] for key in tensors if key.endswith("::mask")]
    expanded = dict(zip(names, (pool.map if pool else map)(expand, names)))
    state = {name: dense for name, (dense, _) in expanded.items()}
    for name in _int8_names(tensors):
        if name not in expanded:  # a whole int8 matrix (structured)
            q, scales = tensors[f"{name}{_INT8}"], tensors[f"{name}{_SCALES}"]
            state[name] = dequantize_matrix(q, scales)
    for key, tensor in tensors.items():
        if "::" not in key:
            state[key] = (
                tensor.float() if tensor.is_floating_point() else tensor
            )
    return state, {name: mask for name, (_, mask) in expanded.items()}


def _int8_names(tensors):
    """The keys of the matrices a compact file stores in int8."""
    return [key[: -len(_INT8)] for key in tensors if key.endswith(_INT8)]


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


def ideal_compact_bytes(state, masks, dtype="float32", quantized=None):
    """Bytes of a compact export's tensor data without container overhead:
    dense tensors, kept values, one bit per gated weight (and, in int8, one
    byte per kept value and a float32 scale per row of the int8 matrices).

    Arguments
    ---------
    state, masks : dict
        Key -> tensor (pruned); key -> boolean mask of the gated matrices.
    dtype : str
        ``"float32"``, ``"float16"`` or ``"int8"`` (``compact_tensors``).
    quantized : collection of str, optional
        With ``dtype="int8"``, the keys stored in int8 (default: the masked
        ones).

    Returns
    -------
    int

    Example
    -------
    >>> w = torch.zeros(4, 4); w[0, 0] = 1.0
    >>> ideal_compact_bytes({"w": w}, {"w": w != 0})
    6
    >>> ideal_compact_bytes({"w": w}, {"w": w != 0}, "int8")  # 1 + 2 + 4 * 4
    19
    """
    width = torch.finfo(_DTYPES[dtype]).bits // 8
    quantized = set(masks if quantized is None else quantized)
    if dtype != "int8":
        quantized = set()
    total = 0.0
    for key, tensor in state.items():
        mask = masks.get(key)
        kept = tensor.numel() if mask is None else int(mask.sum())
        if mask is not None:
            total += mask.numel() / 8
        if key in quantized:
            total += kept + 4 * tensor.shape[0]
        elif mask is not None:
            total += kept * width
        elif tensor.is_floating_point():
            total += tensor.numel() * width
        else:
            total += tensor.numel() * tensor.element_size()
    return int(math.ceil(total))


def export_compact(
    lobe,
    path,
    dtype="float32",
    overwrite=False,
    dense_hf=False,
    extra_files=None,
):
    """Writes the pruned lobe in compact form (and, on request, dense).

    Arguments
    ---------
    lobe : SPGLobeMixin
        The SPG lobe (if it is not ``hard_prune``-d, the hard mask is applied
        to the exported copy).
    path : str or os.PathLike
        Export folder, refused if it exists and is not empty.
    dtype : str
        ``"float32"`` (default, exact), ``"float16"``, or ``"int8"``: the
        gated matrices' kept values in int8 with one float32 scale per
        output row (``speechbrain_spg.quantize``), the rest in float16 (at
        65% sparsity about two thirds of a float16 export).
    overwrite : bool
        Replace a non-empty ``path`` instead (in one rename).
    dense_hf : bool
        Also write ``hf/``, a plain HuggingFace folder with the pruned weights
        set to zero (the size of the dense model), for tools that read only
        HuggingFace weights.
    extra_files : dict, optional
        Relative name -> file to copy into the export (e.g. a head and a
        tokenizer); their sha256 goes into the manifest too.

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
    (['compact.safetensors', 'spg_manifest.json'], 0.58)
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"export_compact: dtype must be one of {sorted(_DTYPES)}, got "
            f"{dtype!r} (the recipe key: export_dtype)."
        )
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
    with written_whole(path) as tmp:
        for rel, src in (extra_files or {}).items():
            shutil.copy(src, os.path.join(tmp, rel))
        manifest = _write_export(lobe, tmp, dtype, dense_hf)
    return manifest


@contextlib.contextmanager
def written_whole(path):
    """A temporary folder beside ``path`` to write a folder into: when the
    block ends it is made readable by all and renamed into place (an
    existing ``path`` moved aside first, then removed); if the block fails
    it is removed. An interrupted write leaves no half-written folder.

    Arguments
    ---------
    path : str
        The folder to write (absolute or relative).

    Example
    -------
    >>> out = os.path.join(tempfile.mkdtemp(), "folder")
    >>> with written_whole(out) as tmp:
    ...     open(os.path.join(tmp, "a.txt"), "w").close()
    >>> os.listdir(out)
    ['a.txt']
    """
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent or ".")
    try:
        yield tmp
        _readable_by_all(tmp)
        if os.path.exists(path):  # replaced: moved aside, then removed
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent or ".")
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable_by_all(folder):
    """Gives a temporary folder the permissions of a folder made as usual
    (``mkdtemp`` makes it private), so that the export can be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _write_export(lobe, folder, dtype, dense_hf):
    """Writes every file of an export into ``folder``; returns the manifest."""
    state, masks = pruned_state_dict(lobe)
    stored, sparse, structure = state, masks, None
    gated = [f"{name}.weight" for name in lobe.gated_names]
    if lobe.structured:  # smaller matrices instead of bitmasks
        kept = structure_of(lobe, masks)
        model = fill_model(empty_model(lobe.model.config), dict(state), "")
        stored, sparse = shrink_to(model, kept).state_dict(), {}
        structure = {
            "attention_heads": kept["attention_heads"],
            "intermediate_sizes": [len(units) for units in kept["kept_units"]],
        }
    if dense_hf:
        hf_dir = os.path.join(folder, HF_FOLDER)
        model = AutoModel.from_config(lobe.model.config)
        model.load_state_dict(state, strict=True)
        model.save_pretrained(hf_dir)
        lobe.feature_extractor.save_pretrained(hf_dir)
    metadata = {"format": "speechbrain-spg", "version": str(FORMAT_VERSION)}
    if structure is not None:
        metadata["structure"] = json.dumps(structure)
    save_file(
        compact_tensors(stored, sparse, dtype, quantized=gated),
        os.path.join(folder, COMPACT_FILE),
        metadata=metadata,
    )
    report = lobe.sparsity_report()
    removed_weights = sum(int((~m).sum()) for m in masks.values())
    options, total = lobe.spg_options, lobe.total_params
    removed = removed_weights
    if structure is not None:  # the biases of removed units go too
        removed = total - sum(t.numel() for t in stored.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": f"speechbrain-spg {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": lobe.source,
        "model_type": lobe.model.config.model_type,
        "config": lobe.model.config.to_dict(),
        "feature_extractor": lobe.feature_extractor.to_dict(),
        "dtype": dtype,
        "quantization": _quantization(dtype, len(gated)),
        "structure": structure,
        "spg": {
            "target_sparsity": options.target_sparsity,
            "target_scope": options.target_scope,
            "gated_target": lobe.gated_target,
            "tie": options.tie,
            "granularity": options.granularity,
            "prune_modules": options.prune_modules,
            "tau_scale": options.tau_scale,
            "calibration_factor": getattr(lobe, "calibration_factor", None),
            "calibration_offset": getattr(lobe, "calibration_offset", None),
        },
        "params": {
            "total": total,
            "gated": lobe.gated_params,
            "removed": removed,
            "nonzero": total - removed,
        },
        "sparsity": {
            "gated": removed_weights / lobe.gated_params,
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
        "sparse_shapes": {key: list(m.shape) for key, m in sparse.items()},
        "ideal_compact_bytes": ideal_compact_bytes(
            stored, sparse, dtype, quantized=gated
        ),
        "files": {
            rel: sha256_of(os.path.join(folder, rel))
            for rel in _relative_files(folder)
        },
    }
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _quantization(dtype, matrices):
    """The manifest's description of an int8 export's storage (else None)."""
    if dtype != "int8":
        return None
    return {
        "scheme": SCHEME,
        "int8_range": [-127, 127],
        "scale_dtype": "float32",
        "empty_row_scale": EMPTY_ROW_SCALE,
        "matrices": matrices,
        "tensors": "<key>::int8 (kept values, row-major; a structured "
        "export: the whole matrix) and <key>::scales (one per output row)",
        "other_dtype": "float16",
    }


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
    >>> with open(os.path.join(out, COMPACT_FILE), "ab") as f:
    ...     _ = f.write(b" ")
    >>> read_manifest(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    speechbrain_spg.export.CompactExportError: ...compact.safetensors: sha256 ... does not match the manifest ...
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
            f"not supported (expected {FORMAT_VERSION}); export the model "
            "again with this version of speechbrain-spg."
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CompactExportError(
            f"{where}: the keys {missing} are missing; the manifest "
            "was edited or truncated. Export again."
        )
    if verify:
        verify_files(path, manifest)
    return manifest


def verify_files(path, manifest):
    """Checks the architecture and the sha256 of every file an export loads.

    Arguments
    ---------
    path : str or os.PathLike
        Export folder.
    manifest : dict
        Its manifest (``read_manifest(path, verify=False)``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> verify_files(out, read_manifest(out, verify=False))
    """
    where = os.path.join(path, MANIFEST)
    hf_files = _relative_files(os.path.join(path, HF_FOLDER))
    loaded = [COMPACT_FILE] + [f"{HF_FOLDER}/{rel}" for rel in hf_files]
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


def structure_of(lobe, masks):
    """The per-block sizes of a structured lobe's pruned model: the kept
    heads of every block and its feed-forward size.

    Arguments
    ---------
    lobe : SPGLobeMixin
        A lobe with ``granularity: structured``.
    masks : dict
        Weight key -> hard mask of every gated matrix
        (``pruned_state_dict``).

    Returns
    -------
    dict
        ``attention_heads`` (per block, the kept head indices) and
        ``kept_units`` (per block, the kept feed-forward unit indices).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), granularity="structured")
    >>> structure = structure_of(lobe, pruned_state_dict(lobe)[1])
    >>> structure["attention_heads"], [len(u) for u in structure["kept_units"]]
    ([[0, 1], [0, 1]], [64, 64])
    """
    config = lobe.model.config
    layers = config.num_hidden_layers
    heads = [list(range(config.num_attention_heads)) for _ in range(layers)]
    units = [list(range(config.intermediate_size)) for _ in range(layers)]
    weight_masks = [masks[f"{name}.weight"] for name in lobe.gated_names]
    unit_masks = lobe.gate.unit_masks_of(weight_masks)
    for sub, kept in zip(lobe.gate.sublayers, unit_masks):
        block, kind = _block_and_kind(sub.name)
        kept = kept.nonzero().flatten().tolist()
        (heads if kind == "attention" else units)[block] = kept
    return {"attention_heads": heads, "kept_units": units}


def _block_and_kind(name):
    """``(3, "attention")`` from ``encoder.layers.3.attention``."""
    parts = name.split(".")
    return int(parts[-2]), parts[-1]


def shrink_to(model, structure):
    """Shrinks a HuggingFace model (real or on the meta device) to the
    per-block sizes of a structured export.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        The model, with its configuration's shapes.
    structure : dict
        ``attention_heads`` and ``kept_units`` (``structure_of``); for a
        model on the meta device, ``intermediate_sizes`` instead of
        ``kept_units`` is enough.

    Returns
    -------
    transformers.PreTrainedModel
        ``model``, shrunk (``speechbrain_spg.shrink``).

    Example
    -------
    >>> model = empty_model({"model_type": "wav2vec2", "num_hidden_layers": 1})
    >>> structure = {"attention_heads": [[0, 5]], "intermediate_sizes": [7]}
    >>> shrink_to(model, structure).encoder.layers[0].attention.q_proj.weight.shape
    torch.Size([128, 768])
    """
    units = structure.get("kept_units")
    if units is None:
        units = [list(range(n)) for n in structure["intermediate_sizes"]]
    return shrink_model(model, structure["attention_heads"], units)


def stored_structure(path):
    """The per-block sizes a safetensors file was written with (by a
    structured export or ``CompactWav2Vec2.save_weights``), else None.

    Arguments
    ---------
    path : str or os.PathLike
        The file.

    Returns
    -------
    dict or None
        ``attention_heads`` and ``intermediate_sizes``.

    Example
    -------
    >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": torch.ones(1)}, f, metadata={"structure": '{"attention_heads": [[1]]}'})
    >>> stored_structure(f)
    {'attention_heads': [[1]]}
    """
    with safe_open(os.fspath(path), framework="pt") as f:
        text = (f.metadata() or {}).get("structure")
    return None if text is None else json.loads(text)


def empty_model(config):
    """A HuggingFace model of ``config`` with uninitialised weights.

    Building on the meta device skips the random initialisation that loading
    overwrites anyway (most of the time a load would otherwise take).

    Arguments
    ---------
    config : dict or transformers.PretrainedConfig
        The architecture (a dict holds ``model_type``).

    Returns
    -------
    transformers.PreTrainedModel
        Its tensors on the meta device: ``fill_model`` gives it real ones.

    Example
    -------
    >>> model = empty_model({"model_type": "wav2vec2", "num_hidden_layers": 1})
    >>> any(p.is_meta for p in model.parameters())
    True
    """
    if isinstance(config, dict):
        config = dict(config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def fill_model(model, state, where):
    """Gives ``model`` (built by ``empty_model``) the tensors of ``state``.

    Arguments
    ---------
    model : transformers.PreTrainedModel
        The model.
    state : dict
        Key -> tensor, every tensor of the architecture.
    where : str
        What the tensors came from, for the error message.

    Returns
    -------
    transformers.PreTrainedModel
        ``model``, in eval mode (else ``CompactExportError``: tensors unlike
        its architecture).

    Example
    -------
    >>> model = empty_model({"model_type": "wav2vec2", "num_hidden_layers": 1})
    >>> fill_model(model, {}, "nothing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    speechbrain_spg.export.CompactExportError: nothing: tensors do not match ...
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(state) & set(expected)
    wrong = sorted(k for k in common if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CompactExportError(
            f"{where}: tensors do not match the {model.config.model_type} "
            f"architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]})."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def read_compact_file(path, shapes, check=None):
    """The dense state dict of a ``compact.safetensors`` file, and its masks.

    Arguments
    ---------
    path : str or os.PathLike
        The file (a plain safetensors state dict is read as it is).
    shapes : dict
        Key -> shape, of at least every sparsely stored matrix (a manifest's
        ``sparse_shapes``, or a model's state dict shapes).
    check : callable, optional
        Run meanwhile in a thread (``verify_files`` of the export); its
        error comes first, since a corrupted file also fails to expand.

    Returns
    -------
    state, masks : dict
        Key -> float32 tensor; key -> boolean mask of the pruned matrices.

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    >>> f = os.path.join(tempfile.mkdtemp(), COMPACT_FILE)
    >>> save_file(compact_tensors({"w": w}, {"w": w != 0}), f)
    >>> state, masks = read_compact_file(f, {"w": [2, 2]})
    >>> torch.equal(state["w"], w), masks["w"].sum().item()
    (True, 2)
    """
    return _read_compact(path, shapes, check)[:2]


def _read_compact(path, shapes, check):
    """``read_compact_file``'s state and masks, and the tensors as stored."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        checked = None if check is None else pool.submit(check)
        try:
            tensors = load_file(os.fspath(path))
            state, masks = expand_tensors(tensors, shapes, pool)
        except Exception:
            if checked is not None:  # a missing or corrupted file: say so
                checked.result()
            raise
        if checked is not None:
            checked.result()
    return state, masks, tensors


def load_compact(path, verify=True, int8_linears=False):
    """Rebuilds the HuggingFace model of a compact export.

    Arguments
    ---------
    path : str or os.PathLike
        Export folder written by ``export_compact``.
    verify : bool
        Verify checksums and architecture (recommended; done while the
        tensors are expanded).
    int8_linears : bool
        For an ``int8`` export only: replace every gated linear (and only
        those) by PyTorch's dynamically quantised int8 linear, built from
        the stored int8 values and scales (``quantize.dynamic_int8_linear``)
        for CPU inference (not trainable; a 0-sized linear of an emptied
        block stays float). WavLM's attention, which reads the projection
        weights itself, is swapped for ``shrink.ShrunkWavLMAttention`` over
        every head, which calls the projections. Default: every weight
        dequantised to float32, as with other exports.

    Returns
    -------
    transformers.PreTrainedModel
        The pruned model (float32), in eval mode (else ``CompactExportError``:
        incomplete or tampered export, tensors unlike its architecture;
        ``ValueError``: ``int8_linears`` on an export that is not int8).

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
    >>> _ = export_compact(lobe, out, dtype="int8", overwrite=True)
    >>> int8 = load_compact(out, int8_linears=True)
    >>> type(int8.encoder.layers[0].attention.q_proj).__module__
    'torch.ao.nn.quantized.dynamic.modules.linear'
    """
    path = os.fspath(path)
    if int8_linears:
        dtype = read_manifest(path, verify=False).get("dtype")
        if dtype != "int8":
            raise ValueError(
                f"load_compact: int8_linears needs an int8 export "
                f"(export_dtype: int8); {path} holds {dtype}."
            )
    return _load_export(path, verify, int8_linears)[0]


def _load_export(path, verify, int8_linears=False):
    """(model, masks, manifest) of an export folder."""
    path = os.fspath(path)
    manifest = read_manifest(path, verify=False)
    state, masks, tensors = _read_compact(
        os.path.join(path, COMPACT_FILE),
        manifest["sparse_shapes"],
        check=(lambda: verify_files(path, manifest)) if verify else None,
    )
    model = empty_model(manifest["config"])
    if manifest.get("structure"):
        shrink_to(model, manifest["structure"])
    model = fill_model(model, state, path)
    if int8_linears:
        _install_int8_linears(model, tensors, masks)
    return model, masks, manifest


def _install_int8_linears(model, tensors, masks):
    """Replaces the int8-stored linears of ``model`` by dynamically
    quantised ones, from the file's int8 values and scales (in place)."""
    for key in _int8_names(tensors):
        name = key[: -len(".weight")]
        linear = model.get_submodule(name)
        if linear.weight.numel() == 0:  # an emptied block's: never run
            continue
        q = tensors[f"{key}{_INT8}"]
        if key in masks:
            q = int8_matrix(q, masks[key])
        parent, _, child = name.rpartition(".")
        int8 = dynamic_int8_linear(q, tensors[f"{key}{_SCALES}"], linear.bias)
        setattr(model.get_submodule(parent), child, int8)
    for module in model.modules():
        if type(module) is WavLMAttention:  # reads q_proj.weight itself
            module.kept_heads = list(range(module.num_heads))
            module.__class__ = ShrunkWavLMAttention
    model.eval()


@register_checkpoint_hooks
class CompactWav2Vec2(Wav2Vec2):
    """SpeechBrain lobe over a compact SPG export (wav2vec2, HuBERT or WavLM).

    A recipe uses a compressed model by pointing ``source`` at the export
    folder: its checksums are verified and the compact file is read directly.
    An inference ``hyperparams.yaml`` gives ``config`` instead (the folder's
    files then come through SpeechBrain's ``Pretrainer``, which loads
    ``compact.safetensors`` into this lobe through ``load_weights``).

    With ``keep_sparsity`` (the default unless frozen) the gradient of every
    pruned weight is zeroed before it reaches the optimiser, so further
    fine-tuning keeps them at exactly zero (Adam, AdamW, SGD; weight decay
    too) while every parameter still receives a gradient, as DDP expects.
    (Without ``apply_spec_augment``, the unused SpecAugment embedding
    ``masked_spec_embed`` is not trained, for the same reason.)

    Arguments
    ---------
    source : str, optional
        Export folder written by ``export_compact``.
    save_path : str
        Unused; kept for signature compatibility with SpeechBrain's lobes.
    verify : bool
        Verify the manifest checksums first.
    config : dict, optional
        The model's configuration (with ``model_type``), instead of
        ``source``: the weights come later through ``load_weights``.
    normalize_wav : bool, optional
        Normalise input waveforms (default: the export's feature extractor
        setting; ``True`` with ``config``).
    output_norm, freeze, freeze_feature_extractor, apply_spec_augment, output_all_hiddens : bool
        As in SpeechBrain's ``Wav2Vec2`` lobe.
    keep_sparsity : bool, optional
        Hold pruned weights at zero in training (default: ``not freeze``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> CompactWav2Vec2(out)(torch.randn(1, 4000)).shape
    torch.Size([1, 198, 32])
    """

    def __init__(
        self,
        source=None,
        save_path="",
        verify=True,
        config=None,
        normalize_wav=None,
        output_norm=False,
        freeze=False,
        freeze_feature_extractor=False,
        apply_spec_augment=False,
        output_all_hiddens=False,
        keep_sparsity=None,
    ):
        torch.nn.Module.__init__(self)
        if (source is None) == (config is None):
            raise ValueError(
                "CompactWav2Vec2: give either source (an export folder) or "
                "config (a model configuration), not both or neither."
            )
        masks = None
        if source is not None:
            self.model, masks, self.manifest = _load_export(source, verify)
            extractor = self.manifest.get("feature_extractor", {})
            default_normalize = extractor.get("do_normalize", True)
        else:
            self.model, self.manifest = empty_model(config), None
            default_normalize = True
        self.config = self.model.config
        self.model.config.apply_spec_augment = apply_spec_augment
        self.normalize_wav = (
            default_normalize if normalize_wav is None else normalize_wav
        )
        self.output_norm = output_norm
        self.output_all_hiddens = output_all_hiddens
        self.freeze = freeze
        self.freeze_feature_extractor = freeze_feature_extractor
        self.keep_sparsity = (
            not freeze if keep_sparsity is None else keep_sparsity
        )
        if masks is not None:
            self._prepare(masks)

    def _prepare(self, masks):
        """Freezing, training mode and the sparsity masks, once weighted."""
        if self.freeze:
            self.freeze_model(self.model)
        else:
            self.model.train()
            if self.freeze_feature_extractor:
                self.model.feature_extractor.eval()
                for param in self.model.feature_extractor.parameters():
                    param.requires_grad = False
            embed = getattr(self.model, "masked_spec_embed", None)
            if embed is not None and not self.config.apply_spec_augment:
                embed.requires_grad = False  # unused: DDP would wait for it
            params = dict(self.model.named_parameters())
            for name in unused_parameters(self.model):  # emptied blocks'
                params[name].requires_grad = False
        if self.keep_sparsity and not self.freeze:
            self._keep_masks(masks)

    def _keep_masks(self, masks):
        """Zeroes the gradient of every pruned weight (masks as buffers)."""
        params = dict(self.model.named_parameters())
        for i, (key, mask) in enumerate(sorted(masks.items())):
            name = f"sparsity_mask_{i}"
            self.register_buffer(name, mask, persistent=False)
            params[key].register_hook(
                lambda grad, name=name: grad * getattr(self, name)
            )

    @mark_as_saver
    def save_weights(self, path):
        """Saves the model's weights (safetensors; the Checkpointer's hook).

        Arguments
        ---------
        path : str or os.PathLike
            Where to write.
        """
        state = self.model.state_dict()
        heads, sizes = block_sizes(self.model)
        structure = {"attention_heads": heads, "intermediate_sizes": sizes}
        metadata = {"structure": json.dumps(structure)}
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, path, metadata=metadata)

    @mark_as_transfer
    @mark_as_loader
    def load_weights(self, path, *args):
        """Loads ``compact.safetensors`` or a saved checkpoint (the hook of
        SpeechBrain's Pretrainer and Checkpointer for this lobe).

        Arguments
        ---------
        path : str or os.PathLike
            The file.
        *args
            Ignored (the Checkpointer passes ``end_of_epoch``).
        """
        if any(p.is_meta for p in self.model.parameters()):  # from a config
            structure = stored_structure(path)
            if structure is not None:  # the per-block sizes of the file
                shrink_to(self.model, structure)
        shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        state, masks = read_compact_file(path, shapes)
        if any(p.is_meta for p in self.model.parameters()):
            self.model = fill_model(self.model, state, os.fspath(path))
            self._prepare(masks)
        else:
            self.model.load_state_dict(state, strict=True)
