"""Another storage type for an existing export or inference folder.

``convert_inference_folder(src, dst, "int8")`` writes a copy of a float32
export (``export_compact``) or inference folder
(``tools.inference.write_inference_folder``; what a compressed run of the
recipe writes in ``<output_folder>/compact``) whose ``compact.safetensors``
holds the same model in another storage type, without the training run or
the lobe:

- the dense state and the bitmasks are read back from the float32 compact
  file (``export.read_compact_file``: exact, float32 is stored as is);
- the new compact file is written by the export's own code
  (``export.compact_tensors``) with the same arguments as ``export_compact``
  gives it: every gated matrix (the manifest's ``layers``) quantised in
  int8 with one scale per output row, or every float tensor in float16; and
  the same safetensors metadata (format, structure). It holds the tensors
  that ``export_compact(lobe, dtype=...)`` would have written from the lobe;
- the manifest is the source's with ``dtype``, ``quantization``,
  ``ideal_compact_bytes`` and the sha256 of every file updated, and a
  ``converted_from`` record (the source's dtype and compact file sha256);
  ``load_compact``, ``CompactWav2Vec2`` and ``EncoderASR.from_hparams``
  verify and load it as any export of that type;
- every other file the manifest lists (head, tokenizer, ``hyperparams.yaml``,
  ``hf/``) is copied unchanged; the model card (``README.md``, not listed:
  its results and storage are the source's) is not: write the new folder's
  with ``tools.inference.write_model_card`` once it is evaluated.

The folder is written in a temporary folder beside ``dst`` and moved into
place with one rename, as ``export_compact`` does.

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import datetime
import json
import os
import shutil
import sys

from safetensors import safe_open
from safetensors.torch import save_file

from speechbrain_spg.export import (
    _DTYPES,
    COMPACT_FILE,
    MANIFEST,
    CompactExportError,
    _quantization,
    _relative_files,
    compact_tensors,
    ideal_compact_bytes,
    read_compact_file,
    read_manifest,
    sha256_of,
    written_whole,
)


def convert_inference_folder(src, dst, dtype="int8", overwrite=False):
    """Writes a copy of a float32 export or inference folder whose compact
    weights are stored in ``dtype``.

    Arguments
    ---------
    src : str or os.PathLike
        A float32 export or inference folder (checksums verified first).
    dst : str or os.PathLike
        The new folder (refused if it exists and is not empty, unless
        ``overwrite``).
    dtype : str
        ``"int8"`` (the gated matrices' kept values in int8, one float32
        scale per output row, the other tensors in float16), ``"float16"``
        or ``"float32"``: as ``export_compact``'s ``dtype``.
    overwrite : bool
        Replace a non-empty ``dst`` (in one rename).

    Returns
    -------
    dict
        The new folder's manifest (else ``ValueError``: a source that is not
        float32, an unknown ``dtype``, ``dst`` the source itself;
        ``FileExistsError``: ``dst`` not empty; ``CompactExportError``: the
        source does not verify).

    Example
    -------
    >>> import tempfile, torch
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.export import export_compact, load_compact
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> work = tempfile.mkdtemp()
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="", threshold_init=0.8)
    >>> _ = lobe.eval().hard_prune()
    >>> _ = export_compact(lobe, f"{work}/fp32")
    >>> manifest = convert_inference_folder(f"{work}/fp32", f"{work}/int8")
    >>> manifest["dtype"], manifest["quantization"]["matrices"]
    ('int8', 12)
    >>> fp32 = load_compact(f"{work}/fp32").state_dict()
    >>> int8 = load_compact(f"{work}/int8").state_dict()  # verified
    >>> key = "encoder.layers.0.attention.q_proj.weight"
    >>> err = (int8[key] - fp32[key]).abs().max(dim=1).values
    >>> bool((err <= fp32[key].abs().max(dim=1).values / 254 + 1e-7).all())
    True
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"convert_inference_folder: dtype must be one of "
            f"{sorted(_DTYPES)}, got {dtype!r}."
        )
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError(
            f"convert_inference_folder: {dst} is the source folder; "
            "write the converted copy elsewhere."
        )
    manifest = read_manifest(src)  # every checksum
    if manifest.get("dtype", "float32") != "float32":
        raise ValueError(
            f"convert_inference_folder: {src} holds a {manifest.get('dtype')} "
            "export; convert from a float32 one (the exact weights)."
        )
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(
            f"convert_inference_folder: {dst} exists and is not empty; pass "
            "overwrite=True to replace it, or choose another folder."
        )
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(
            f"convert_inference_folder: {dst} is a file, not a folder."
        )
    compact = os.path.join(src, COMPACT_FILE)
    state, masks = read_compact_file(compact, manifest["sparse_shapes"])
    gated = [f"{layer['name']}.weight" for layer in manifest["layers"]]
    missing = [key for key in gated if key not in state]
    if missing:
        raise ValueError(
            f"convert_inference_folder: {src}: the manifest's gated layers "
            f"{missing[:3]} are not in {COMPACT_FILE}."
        )
    with safe_open(compact, framework="pt") as f:
        metadata = f.metadata() or {}

    with written_whole(dst) as tmp:
        for rel in manifest["files"]:
            if rel == COMPACT_FILE:
                continue
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copy(os.path.join(src, rel), os.path.join(tmp, rel))
        save_file(
            compact_tensors(state, masks, dtype, quantized=gated),
            os.path.join(tmp, COMPACT_FILE),
            metadata=metadata,
        )
        new = dict(manifest)
        new["dtype"] = dtype
        new["quantization"] = _quantization(dtype, len(gated))
        new["ideal_compact_bytes"] = ideal_compact_bytes(
            state, masks, dtype, quantized=gated
        )
        new["converted_from"] = {
            "dtype": manifest.get("dtype", "float32"),
            "compact_sha256": manifest["files"][COMPACT_FILE],
            "created": manifest.get("created"),
            "converted": datetime.datetime.now(
                datetime.timezone.utc
            ).isoformat(),
            "by": "speechbrain_spg.tools.convert.convert_inference_folder",
        }
        new["files"] = {
            rel: sha256_of(os.path.join(tmp, rel))
            for rel in _relative_files(tmp)
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(new, f, indent=2)
    return new


def main(argv=None):
    """``python -m speechbrain_spg.tools.convert SRC DST [--dtype int8]
    [--overwrite]``: a float32 export or inference folder converted; one
    error line and exit status 2 for a bad folder.

    Arguments
    ---------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.

    Example
    -------
    >>> main(["/nonexistent/compact", "/tmp/out"])  # doctest: +ELLIPSIS
    2
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.tools.convert",
        description="Writes a float32 export (or inference folder) again in "
        "another storage type, without the training run.",
    )
    parser.add_argument("src", help="a float32 export or inference folder")
    parser.add_argument("dst", help="the folder to write")
    parser.add_argument(
        "--dtype",
        default="int8",
        choices=("int8", "float16"),
        help="storage type of the new compact file (default: int8)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dst"
    )
    args = parser.parse_args(argv)
    try:
        manifest = convert_inference_folder(
            args.src, args.dst, args.dtype, args.overwrite
        )
    except (OSError, ValueError, CompactExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {manifest['dtype']} ({COMPACT_FILE} rewritten)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
