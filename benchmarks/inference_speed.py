#!/usr/bin/env python3
"""Inference latency of a structured vs an unstructured export vs dense.

What it measures, per model (each built from its configuration with random
weights, no download, and saved as a dense HuggingFace folder): two exports
that remove the SAME fraction of the gated weights (``--sparsity``) by
uniform magnitude pruning (``uniform_magnitude_prune``) and are written by
``export_compact``:

- ``unstructured``: an SPG lobe with ``granularity: weight``; the export
  stores a bitmask and the kept values, and ``load_compact`` rebuilds the
  dense shapes (pruned weights zero): no fewer operations;
- ``structured``: ``granularity: structured`` (whole attention heads and
  feed-forward units); the export holds physically smaller matrices
  (``speechbrain_spg.shrink``), so a forward pass does fewer operations.

On the CPU, four more rows compress the same pruned lobes further:

- ``unstructured int8 (dynamic int8 linears)`` and ``structured int8
  (dynamic int8 linears)``: each lobe also exported with
  ``export_compact(..., dtype="int8")`` (the gated matrices' kept values in
  int8, one float32 scale per output row, the rest float16) and loaded with
  ``load_compact(export, int8_linears=True)``: PyTorch's dynamically
  quantised int8 linears built from the stored values (activations
  quantised at run time), every other module float32;
- ``structured ONNX fp32`` and ``structured ONNX int8``: the structured
  float32 export, loaded, written to ONNX (``export_onnx_encoder``: the
  TorchScript exporter, opset 17, eager attention, dynamic batch and
  length axes, as ``speechbrain_spg.export_onnx`` writes a folder's
  encoder) and, for int8, quantised with ONNX Runtime's ``quantize_dynamic``
  (the matrix products only, as ``export_onnx --int8``); run by ONNX Runtime
  (``InferenceSession``, CPU provider, ``intra_op_num_threads`` = PyTorch's
  number of threads). ``--onnx-models`` chooses the models that get these
  two rows (default: every model; the default run, all seven rows of both
  models, stays under 10 minutes on a 2-core CPU: a one-round run of
  HuBERT-large alone took 2.5 minutes, 2.1 of them to build, export and
  load, and its seven passes 8 s); ``--skip-missing-onnx`` leaves them out,
  with a line saying so, when ``onnx`` or ``onnxruntime`` is not installed
  (else the benchmark stops and names the package).

All the models (the dense folder through ``AutoModel.from_pretrained``, the
exports through ``load_compact``, the ONNX files through ONNX Runtime) are
timed in one process, with PyTorch's default number of threads, under
``torch.inference_mode()``: one forward pass of a random waveform
(``--batch`` x ``--seconds`` of 16 kHz audio, normalised as the feature
extractor does, fixed seed). After one warm-up pass each, every round times
each model once (round-robin, the starting model rotating from round to
round so that none always follows the same one), and the median per model
is reported. Per model it prints a table: median latency (seconds, ratio to
dense, and the range of the per-round ratios), weights in memory (bytes of
the loaded model's parameters and buffers, a dynamic int8 linear counted as
its int8 values, one float32 scale per row and its bias; for ONNX, the
bytes of the model's initializers, not ONNX Runtime's own memory; ratio to
dense) and file size (the whole folder, for ONNX the ``.onnx`` file; ratio
to the dense folder). Before timing, it checks once that each float32
export computes what its pruned lobe computes (the largest absolute
difference of the encoder output, printed; about 1e-5 expected), so that a
wrong shrink cannot give a fast but wrong number, and that the ONNX float32
model computes what the structured export computes in PyTorch on the
benchmark input (refused beyond ``ONNX_MAX_ABS_DIFF``, 1e-4); the int8
variants' largest difference from their float32 export is printed, not
checked (int8 rounding).

Why the latency cannot fall as much as the weights: only the transformer
encoder's attention and feed-forward matrices are gated. The convolutional
front end (``feature_extractor``, which runs on every audio sample), the
feature projection, the convolutional positional embedding and the layer
norms are not pruned, and the attention's time-by-time products shrink only
with the number of kept heads, so at 50% of the gated weights removed the
structured model's latency stays well above 0.5x dense: on a CPU, with 10 s
of audio, the front end alone takes about a third of a dense pass of
wav2vec2-base and of HuBERT-large (whose front end has layer norms), so
halving the attention and feed-forward time gives about 0.7x.

The LAST line printed is ``inference latency ratio structured/dense: R``
(structured float32 in PyTorch) for the FIRST model of ``--models``
(wav2vec2-base by default), and the line before it ``inference latency
ratio structured ONNX int8/dense: R`` for the same model (``R`` replaced by
``skipped (why)`` when its ONNX rows were not measured); with several
models, each model's own two lines are printed after its table, and the
first model's lines are repeated at the end.

``alternating_latency(models, inputs, rounds)`` (name -> callable, to name
-> median seconds) is the reusable timing loop, e.g. for the synthetic
study's exported models.

Usage:
    python benchmarks/inference_speed.py
    python benchmarks/inference_speed.py --device cuda
    python benchmarks/inference_speed.py --models facebook/wav2vec2-base \
        --sparsity 0.65 --rounds 20
    python benchmarks/inference_speed.py --onnx-models \
        facebook/wav2vec2-base facebook/hubert-large-ll60k

On a GPU (``--device cuda``) the int8 and ONNX rows are left out (PyTorch's
dynamic int8 linears and the CPU provider run on the CPU only).

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from transformers import AutoModel

from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.data.architectures import hub_config, save_random_model
from speechbrain_spg.export import export_compact, load_compact
from speechbrain_spg.export_onnx import (
    DEFAULT_OPSET,
    MissingExtraError,
    require_onnx,
)
from speechbrain_spg.lobes import spg_lobe

#: The float32 PyTorch models, in table order.
FLOAT_VARIANTS = ("dense", "unstructured", "structured")
#: The int8 exports with PyTorch's dynamic int8 linears (CPU only).
INT8_VARIANTS = (
    "unstructured int8 (dynamic int8 linears)",
    "structured int8 (dynamic int8 linears)",
)
#: The structured export run by ONNX Runtime (CPU provider).
ONNX_VARIANTS = ("structured ONNX fp32", "structured ONNX int8")
#: Every model compared, in table order.
VARIANTS = FLOAT_VARIANTS + INT8_VARIANTS + ONNX_VARIANTS
#: Variant -> lobe granularity of its export.
GRANULARITY = {"unstructured": "weight", "structured": "structured"}
#: Compressed variant -> the float32 export it is made from (and compared
#: with).
SOURCE = dict(zip(INT8_VARIANTS, GRANULARITY)) | dict.fromkeys(
    ONNX_VARIANTS, "structured"
)
#: The largest difference between ONNX Runtime (float32) and PyTorch on the
#: structured export's output that the benchmark accepts.
ONNX_MAX_ABS_DIFF = 1e-4
#: Chosen so that the default run (wav2vec2-base and HuBERT-large, 10 s)
#: takes under 10 minutes on a 2-core CPU.
DEFAULT_ROUNDS = 10


def log(message):
    """A progress message, on stderr."""
    print(message, file=sys.stderr, flush=True)


def folder_bytes(folder):
    """Total size of the files below ``folder``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def weight_bytes(model):
    """Bytes of a model's parameters and buffers (each counted once); a
    dynamically quantised linear (whose packed weight is neither) counts
    its int8 values, one float32 scale per output row and its bias."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors = list(model.parameters()) + list(model.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module._weight_bias()
            total += weight.numel() + 4 * weight.shape[0]
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total


def synchronize(device):
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(name, function, inputs):
    """Wall time of ``function(inputs)``, the device synchronised around it.

    Arguments
    ---------
    name : str
        The model's name (unused here; lets a test record the order).
    function : callable
        Runs the model on ``inputs``.
    inputs : torch.Tensor
        Its input; its device is synchronised.

    Returns
    -------
    float
        Seconds.
    """
    synchronize(inputs.device)
    start = time.perf_counter()
    function(inputs)
    synchronize(inputs.device)
    return time.perf_counter() - start


def alternating_times(models, inputs, rounds, warmup=1):
    """Per-round wall times of models timed in alternation.

    After ``warmup`` untimed passes of each model, every round runs each
    model once, round-robin; round ``r`` starts at model ``r mod n`` (the
    order rotates, so that no model always follows the same one). Runs
    under ``torch.inference_mode()``.

    Arguments
    ---------
    models : dict
        Name -> callable taking ``inputs``.
    inputs : torch.Tensor
        The input of every pass.
    rounds : int
        Timed passes of each model.
    warmup : int
        Untimed passes of each model first.

    Returns
    -------
    dict
        Name -> list of ``rounds`` seconds, in round order.

    Example
    -------
    >>> times = alternating_times({"a": torch.exp, "b": torch.sin},
    ...                           torch.ones(4), rounds=3)
    >>> {name: len(t) for name, t in times.items()}
    {'a': 3, 'b': 3}
    """
    names = list(models)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                timed_pass(name, models[name], inputs)
        for r in range(rounds):
            start = r % len(names)
            for name in names[start:] + names[:start]:
                times[name].append(timed_pass(name, models[name], inputs))
    return times


def alternating_latency(models, inputs, rounds, warmup=1):
    """Median wall time of each model, the models timed in alternation.

    Arguments
    ---------
    models, inputs, rounds, warmup
        As ``alternating_times``.

    Returns
    -------
    dict
        Name -> median seconds of one call.

    Example
    -------
    >>> medians = alternating_latency({"a": torch.exp, "b": torch.sin},
    ...                               torch.ones(4), rounds=3)
    >>> sorted(medians), all(t > 0 for t in medians.values())
    (['a', 'b'], True)
    """
    times = alternating_times(models, inputs, rounds, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def encoder_output(model, inputs):
    """The last hidden state of a HuggingFace SSL model."""
    return model(inputs).last_hidden_state


def max_abs_diff(output, expected):
    """The largest absolute difference of two outputs (tensors or arrays)."""
    output = torch.as_tensor(output).cpu()
    return (output - expected.cpu()).abs().max().item()


def build_exports(source, sparsity, work, inputs, device, int8=False):
    """Writes both exports of ``source`` and checks each against its lobe.

    Arguments
    ---------
    source : str
        The dense HuggingFace folder.
    sparsity : float
        Fraction of the gated weights (structured: of every sub-layer's
        heads and units) removed by uniform magnitude pruning.
    work : str
        Folder for the exports.
    inputs : torch.Tensor
        Normalised waveforms for the check.
    device : torch.device
        Where the check runs.
    int8 : bool
        Also export each pruned lobe with ``dtype="int8"`` (folder
        ``<variant>_int8``).

    Returns
    -------
    dict
        Variant -> dict: ``folder``, ``int8_folder`` (None without
        ``int8``), ``sparsity`` (gated, as written in its manifest),
        ``max_abs_diff`` (between the loaded export's and the pruned lobe's
        outputs on ``inputs``) and ``output`` (the loaded export's output on
        ``inputs``, on the CPU).
    """
    exports = {}
    for variant, granularity in GRANULARITY.items():
        start = time.perf_counter()
        lobe = spg_lobe(source, save_path="", granularity=granularity)
        uniform_magnitude_prune(lobe, sparsity)
        folder = os.path.join(work, variant)
        manifest = export_compact(lobe, folder)
        int8_folder = None
        if int8:
            int8_folder = os.path.join(work, f"{variant}_int8")
            export_compact(lobe, int8_folder, dtype="int8")
        lobe = lobe.to(device).eval()
        model = load_compact(folder).to(device)
        with torch.inference_mode():
            expected = encoder_output(lobe.model, inputs)
            output = encoder_output(model, inputs)
        exports[variant] = {
            "folder": folder,
            "int8_folder": int8_folder,
            "sparsity": manifest["sparsity"]["gated"],
            "max_abs_diff": max_abs_diff(output, expected),
            "output": output.cpu(),
        }
        del lobe, model, expected, output
        gc.collect()
        log(
            f"  {variant}: pruned, exported{' (float32, int8)' * int8} and "
            f"checked in {time.perf_counter() - start:.1f} s"
        )
    return exports


class EncoderOutput(torch.nn.Module):
    """What is exported to ONNX: a HuggingFace SSL model's last hidden
    state (the PyTorch rows time the same computation)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, wav):
        """``[batch, samples]`` normalised waveforms to ``[batch, frames,
        hidden]``."""
        return self.model(wav).last_hidden_state


def export_onnx_encoder(model, example, path, opset=DEFAULT_OPSET):
    """Writes a HuggingFace SSL model to ONNX as ``export_onnx`` writes an
    inference folder's encoder: TorchScript exporter, eager attention,
    dynamic axes (input ``wav`` [batch, samples], normalised; output
    ``last_hidden_state`` [batch, frames, hidden]).

    Arguments
    ---------
    model : transformers.PreTrainedModel
        A float32 model on the CPU (its attention is set to ``eager``).
    example : torch.Tensor
        A ``[batch, samples]`` input to trace with.
    path : str
        The ONNX file to write.
    opset : int
        The ONNX opset.
    """
    # As in export_onnx: eager attention is what ONNX Runtime runs fastest
    # of what both exporters write.
    model.set_attn_implementation("eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        torch.onnx.export(
            EncoderOutput(model).eval(),
            (example,),
            path,
            input_names=["wav"],
            output_names=["last_hidden_state"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={
                "wav": {0: "batch", 1: "samples"},
                "last_hidden_state": {0: "batch", 1: "frames"},
            },
        )


def quantize_onnx(src, dst):
    """ONNX Runtime's dynamic int8 quantisation of the matrix products
    (``MatMul``), as ``export_onnx --int8`` does; its advice to pre-process
    the model first (a warning) is not shown."""
    from onnxruntime.quantization import quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def onnx_weight_bytes(onnx, path):
    """Bytes of the initializers (weights and constants) of an ONNX model."""
    model = onnx.load(path)
    return sum(
        math.prod(t.dims)
        * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )


def onnx_runner(session):
    """A callable running an ONNX Runtime session on a waveform tensor."""

    def run(inputs):
        return session.run(None, {"wav": inputs.cpu().numpy()})[0]

    return run


def build_onnx(folder, inputs, work, modules):
    """The ONNX rows of a structured export: float32 and int8 files.

    Arguments
    ---------
    folder : str
        The structured float32 export.
    inputs : torch.Tensor
        The benchmark input (traced with).
    work : str
        Folder for the ONNX files.
    modules : dict
        ``onnx`` and ``onnxruntime``, imported.

    Returns
    -------
    dict
        Variant -> (ONNX file, ``InferenceSession`` on the CPU provider
        with ``intra_op_num_threads`` = PyTorch's number of threads).
    """
    ort = modules["onnxruntime"]
    start = time.perf_counter()
    model = load_compact(folder)
    fp32 = os.path.join(work, "structured_fp32.onnx")
    export_onnx_encoder(model, inputs.cpu(), fp32)
    del model
    gc.collect()
    int8 = os.path.join(work, "structured_int8.onnx")
    quantize_onnx(fp32, int8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    sessions = {}
    for variant, path in zip(ONNX_VARIANTS, (fp32, int8)):
        session = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        sessions[variant] = (path, session)
    log(
        f"  structured ONNX: exported, quantised and loaded in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return sessions


def measure(hub_id, args, work, device, onnx_modules=None):
    """Rows (one per variant measured) for one model.

    Arguments
    ---------
    hub_id : str
        The model.
    args : argparse.Namespace
        The command line.
    work : str
        Folder for the dense folder and the exports.
    device : torch.device
        Where PyTorch runs; the int8 and ONNX rows only on the CPU.
    onnx_modules : dict, optional
        ``onnx`` and ``onnxruntime``, for the ONNX rows (none without).

    Returns
    -------
    list of dict
        In ``VARIANTS`` order.
    """
    log(f"{hub_id}: building (random weights) and exporting")
    start = time.perf_counter()
    source = save_random_model(hub_config(hub_id), os.path.join(work, "dense"))
    generator = torch.Generator().manual_seed(args.seed)
    wav = torch.randn(
        args.batch, int(args.seconds * 16000), generator=generator
    )
    inputs = torch.nn.functional.layer_norm(wav, wav.shape[1:]).to(device)
    cpu = device.type == "cpu"
    exports = build_exports(
        source, args.sparsity, work, inputs, device, int8=cpu
    )
    models = {"dense": AutoModel.from_pretrained(source).eval().to(device)}
    folders = {"dense": source}
    checks = {}
    for variant, export in exports.items():
        models[variant] = load_compact(export["folder"]).to(device)
        folders[variant] = export["folder"]
        checks[variant] = export["max_abs_diff"]
    if cpu:
        for variant in INT8_VARIANTS:
            export = exports[SOURCE[variant]]
            model = load_compact(export["int8_folder"], int8_linears=True)
            with torch.inference_mode():
                output = encoder_output(model, inputs)
            models[variant] = model
            folders[variant] = export["int8_folder"]
            checks[variant] = max_abs_diff(output, export["output"])
    weights = {variant: weight_bytes(m) for variant, m in models.items()}
    files = {variant: folder_bytes(f) for variant, f in folders.items()}
    attention = {
        variant: m.config._attn_implementation for variant, m in models.items()
    }
    runs = dict(models)
    sessions = {}
    if cpu and onnx_modules is not None:
        sessions = build_onnx(
            exports["structured"]["folder"], inputs, work, onnx_modules
        )
        for variant, (path, session) in sessions.items():
            runs[variant] = onnx_runner(session)
            weights[variant] = onnx_weight_bytes(onnx_modules["onnx"], path)
            files[variant] = os.path.getsize(path)
            attention[variant] = "eager"
            checks[variant] = max_abs_diff(
                runs[variant](inputs), exports["structured"]["output"]
            )
        fp32 = checks[ONNX_VARIANTS[0]]
        if not fp32 <= ONNX_MAX_ABS_DIFF:
            raise RuntimeError(
                f"{hub_id}: the structured ONNX fp32 model's output differs "
                f"from the structured export's in PyTorch by {fp32:.3g} "
                f"(> {ONNX_MAX_ABS_DIFF:g}) on the benchmark input"
            )
    log(
        f"{hub_id}: ready in {time.perf_counter() - start:.1f} s; timing "
        f"{len(runs)} models, {args.rounds} rounds"
    )
    start = time.perf_counter()
    times = alternating_times(runs, inputs, args.rounds)
    log(f"{hub_id}: timed in {time.perf_counter() - start:.1f} s")
    rows = []
    for variant in (v for v in VARIANTS if v in runs):
        ratios = [t / d for t, d in zip(times[variant], times["dense"])]
        source_variant = SOURCE.get(variant, variant)
        rows.append(
            {
                "model": hub_id,
                "variant": variant,
                "runtime": "onnxruntime" if variant in sessions else "torch",
                "reference": (
                    None
                    if variant == "dense"
                    else "pruned lobe"
                    if variant in GRANULARITY
                    else f"{source_variant} export"
                ),
                "gated_sparsity": (
                    0.0
                    if variant == "dense"
                    else exports[source_variant]["sparsity"]
                ),
                "max_abs_diff": checks.get(variant),
                "attn": attention[variant],
                "latency_s": statistics.median(times[variant]),
                "round_ratios": (min(ratios), max(ratios)),
                "times_s": times[variant],
                "weight_bytes": weights[variant],
                "file_bytes": files[variant],
            }
        )
    dense = rows[0]
    for row in rows:
        row["latency_ratio"] = row["latency_s"] / dense["latency_s"]
        row["weight_ratio"] = row["weight_bytes"] / dense["weight_bytes"]
        row["file_ratio"] = row["file_bytes"] / dense["file_bytes"]
    del models, runs, sessions
    gc.collect()
    return rows


def ratio_line(rows, variant="structured"):
    """The summary line of one model's rows: ``variant``'s median latency
    over dense's."""
    ratio = next(r for r in rows if r["variant"] == variant)
    return (
        f"inference latency ratio {variant}/dense: {ratio['latency_ratio']:.3f}"
    )


def onnx_ratio_line(rows, skipped=None):
    """The structured ONNX int8 summary line, or why it was not measured.

    Example
    -------
    >>> rows = [{"variant": "structured ONNX int8", "latency_ratio": 0.41}]
    >>> onnx_ratio_line(rows)
    'inference latency ratio structured ONNX int8/dense: 0.410'
    >>> onnx_ratio_line(rows[:0], "not in --onnx-models")
    'inference latency ratio structured ONNX int8/dense: skipped (not in --onnx-models)'
    """
    variant = ONNX_VARIANTS[1]
    if any(r["variant"] == variant for r in rows):
        return ratio_line(rows, variant)
    return f"inference latency ratio {variant}/dense: skipped ({skipped})"


def print_rows(rows, onnx_skipped=None):
    """One model's table, its equivalence checks and its two ratio lines
    (``onnx_skipped``: why it has no ONNX rows)."""
    torch_attention = sorted(
        {r["attn"] for r in rows if r["runtime"] == "torch"}
    )
    onnx = any(r["runtime"] == "onnxruntime" for r in rows)
    print(
        f"\nmodel: {rows[0]['model']} (random weights, built from its "
        f"config; attention {'/'.join(torch_attention)}"
        + ("; ONNX exported with eager attention" if onnx else "")
        + ")"
    )
    width = max(len("variant"), *(len(r["variant"]) for r in rows))
    print(
        f"{'variant':<{width}} {'gated sp.':>9} {'latency s':>9} "
        f"{'/dense':>6} {'rounds/dense':>12} {'weights MB':>10} "
        f"{'/dense':>6} {'files MB':>8} {'/dense':>6}"
    )
    for r in rows:
        low, high = r["round_ratios"]
        print(
            f"{r['variant']:<{width}} {r['gated_sparsity']:>9.4f} "
            f"{r['latency_s']:>9.3f} {r['latency_ratio']:>6.3f} "
            f"{f'{low:.3f}-{high:.3f}':>12} "
            f"{r['weight_bytes'] / 1e6:>10.1f} {r['weight_ratio']:>6.3f} "
            f"{r['file_bytes'] / 1e6:>8.1f} {r['file_ratio']:>6.3f}"
        )
    if len(rows) > len(FLOAT_VARIANTS):
        print(
            "weights: parameters and buffers (dynamic int8 linears: int8 "
            "values, a float32 scale per row, bias"
            + (
                "; ONNX: the model's initializers, not ONNX Runtime's memory)"
                if onnx
                else ")"
            )
        )
        print(
            "files: the export folder"
            + (" (ONNX: the .onnx file)" if onnx else "")
        )
    for r in rows[1:]:
        if r["variant"] in GRANULARITY:
            print(
                f"check: {r['variant']} export vs its pruned lobe, max abs "
                f"diff {r['max_abs_diff']:.2e}"
            )
        elif r["variant"] == ONNX_VARIANTS[0]:
            print(
                f"check: {r['variant']} vs the {r['reference']} in PyTorch, "
                f"max abs diff {r['max_abs_diff']:.2e} (at most "
                f"{ONNX_MAX_ABS_DIFF:.0e})"
            )
        else:
            print(
                f"check: {r['variant']} vs the float32 {r['reference']}, max "
                f"abs diff {r['max_abs_diff']:.2e} (int8 rounding, not "
                "checked)"
            )
    print(onnx_ratio_line(rows, onnx_skipped))
    print(ratio_line(rows))


def onnx_plan(args, device):
    """Model -> why it has no ONNX rows (None: it has them), and the
    ``onnx`` / ``onnxruntime`` modules (None when no model has them)."""
    requested = set(
        args.models if args.onnx_models is None else args.onnx_models
    )
    why = {
        model: None if model in requested else "not in --onnx-models"
        for model in args.models
    }
    if device.type != "cpu":
        return dict.fromkeys(args.models, f"CPU only, device {device}"), None
    if not any(reason is None for reason in why.values()):
        return why, None
    try:
        modules = require_onnx(
            ("onnx", "onnxruntime"), "benchmarks/inference_speed.py (ONNX rows)"
        )
    except MissingExtraError as err:
        if not args.skip_missing_onnx:
            raise SystemExit(f"{err} (or pass --skip-missing-onnx)") from None
        print(f"ONNX rows skipped: {err}")
        return dict.fromkeys(args.models, "onnxruntime not installed"), None
    return why, modules


def main(argv=None):
    """Runs the benchmark, prints the tables and returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["facebook/wav2vec2-base", "facebook/hubert-large-ll60k"],
    )
    parser.add_argument(
        "--onnx-models",
        nargs="*",
        default=None,
        help="the models that get the ONNX rows (default: every model of "
        "--models; none: no ONNX rows)",
    )
    parser.add_argument(
        "--skip-missing-onnx",
        action="store_true",
        help="leave the ONNX rows out, saying so, when onnx or onnxruntime "
        "is not installed (default: stop)",
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.onnx_models or ()) - set(args.models))
    if unknown:
        parser.error(f"--onnx-models: not in --models: {' '.join(unknown)}")
    device = torch.device(args.device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, batch "
        f"{args.batch} x {args.seconds:g} s of 16 kHz audio, gated sparsity "
        f"{args.sparsity:g} (uniform magnitude pruning), median of "
        f"{args.rounds} alternating rounds after 1 warm-up pass each, "
        "torch.inference_mode()"
    )
    skipped, onnx_modules = onnx_plan(args, device)
    if onnx_modules is not None:
        print(
            f"ONNX rows: onnxruntime {onnx_modules['onnxruntime'].__version__}"
            f", CPU provider, intra-op threads {torch.get_num_threads()}, "
            f"opset {DEFAULT_OPSET}; int8 = quantize_dynamic of MatMul"
        )
    if device.type != "cpu":
        print(f"int8 and ONNX rows skipped: CPU only, device {device}")
    tables = []
    for hub_id in args.models:
        with tempfile.TemporaryDirectory() as work:
            rows = measure(
                hub_id,
                args,
                work,
                device,
                onnx_modules if skipped[hub_id] is None else None,
            )
        print_rows(rows, skipped[hub_id])
        tables.append(rows)
    if len(tables) > 1:  # the first model's lines last
        print(f"\nfirst model, {args.models[0]}:")
        print(onnx_ratio_line(tables[0], skipped[args.models[0]]))
        print(ratio_line(tables[0]))
    return [row for rows in tables for row in rows]


if __name__ == "__main__":
    main()
