"""Exports an SPG inference folder's CTC model to ONNX, to run without PyTorch.

Usage::

    python -m speechbrain_spg.export_onnx FOLDER OUT.onnx [--int8]
        [--opset N] [--dynamo]

``FOLDER`` is a CTC inference folder (``asr_interface: EncoderASR``; what a
compressed run of the recipe writes in ``<output_folder>/compact``). It is
loaded as ``transcribe`` loads it (SpeechBrain's ``EncoderASR``, checksums
verified), and its ``encoder`` (the SSL model as the folder's
``hyperparams.yaml`` builds it, waveform normalisation included when the lobe
has ``normalize_wav``, then the CTC head up to the log-softmax) is written to
``OUT.onnx`` for ONNX Runtime:

- inputs ``wav`` (batch, samples), float32, at the model's sample rate, and
  ``wav_lens`` (batch,), float32: each length divided by the longest
  (SpeechBrain's relative lengths; 1.0 for a batch of one), which masks the
  zero padding of shorter waveforms as SpeechBrain does;
- output ``log_probs`` (batch, frames, vocabulary), float32;
- batch, samples and frames are dynamic axes;
- the file's metadata (``metadata_props``) holds what decoding needs: the
  blank index, the vocabulary size, the sample rate, the fewest samples the
  convolutional front end accepts, the frame rate, and the tokenizer file
  name and sha256 (``transcribe --onnx`` refuses another folder's tokenizer).

The encoder is exported as the folder computes it: a structured export (with
``granularity: structured``, smaller matrices) gives a smaller ONNX model; an
unstructured one is written with its full matrices, the pruned weights at
zero (ONNX Runtime has no sparse kernels: same size and speed as dense).

``--int8`` applies ONNX Runtime's dynamic quantisation
(``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations
quantised at run time) to the matrix products (``MatMul``) of the exported
model; without it the model is float32. The convolutions stay float32:
ONNX Runtime's ``ConvInteger`` made a random wav2vec2-base model 1.8x slower
than float32 on one CPU core, while quantising the matrix products only made
it 1.6x faster (4 s of audio: 1.39 s, 0.48 s, float32 0.76 s). Before writing, the float32 graph is run with ONNX Runtime
on a padded batch of two waveforms and compared with PyTorch (refused beyond
``MAX_ABS_DIFF``); the command prints the largest difference.

Exporter: by default the TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``, opset 17). With torch 2.14 it exported tiny wav2vec2,
HuBERT and WavLM folders, unstructured and structured, with dynamic axes in
1-2 s each, within 2e-6 of PyTorch (its tracer warns about two conditions in
transformers' attention masking that have the same value for every input);
``--dynamo`` (the ``torch.export`` exporter, which needs ``onnxscript`` and
opset 18 or newer) gave the same results but took about ten times longer.
PyTorch deprecates the TorchScript exporter: ``--dynamo`` is the way once it
is removed.

``onnx`` and ``onnxruntime`` (and ``onnxscript`` for ``--dynamo``) are the
optional extra ``pip install speechbrain-spg[onnx]``; without them the
command says so and exits with status 2.

Transcribe with the ONNX model::

    python -m speechbrain_spg.transcribe FOLDER AUDIO... --onnx OUT.onnx

Exit code: 0 when written, 2 when the extra is missing, the folder cannot be
exported (one line on stderr says why) or the command line is wrong.

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import importlib
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from itertools import groupby

import numpy as np
import torch

#: What installs the optional packages.
EXTRA_HINT = "pip install speechbrain-spg[onnx]"
#: Opset of the TorchScript exporter (the dynamo exporter needs 18+).
DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
#: The largest difference of log-probabilities between ONNX Runtime (float32)
#: and PyTorch that an export accepts.
MAX_ABS_DIFF = 1e-3
#: Format tag in the ONNX metadata.
FORMAT = "speechbrain-spg-ctc/1"
INPUT_NAMES = ("wav", "wav_lens")
OUTPUT_NAME = "log_probs"
#: Modules each part of the command needs.
EXPORT_MODULES = ("onnx", "onnxruntime")
RUNTIME_MODULES = ("onnxruntime",)


class MissingExtraError(ImportError):
    """An optional package of the ``onnx`` extra is not installed."""


def require_onnx(modules=EXPORT_MODULES, what="speechbrain_spg.export_onnx"):
    """Imports the optional packages, or says which extra installs them.

    Arguments
    ---------
    modules : sequence of str
        The packages needed (``onnx``, ``onnxruntime``, ``onnxscript``).
    what : str
        What needs them, for the message.

    Returns
    -------
    dict
        Name -> imported module.

    Raises
    ------
    MissingExtraError
        Naming every missing package and ``EXTRA_HINT``.

    Example
    -------
    >>> require_onnx(["json"])["json"].__name__
    'json'
    >>> try:
    ...     require_onnx(["no_such_package_spg"], "this")
    ... except MissingExtraError as err:
    ...     print(err)
    this needs the optional package no_such_package_spg, which is not installed: pip install speechbrain-spg[onnx]
    """
    found, missing = {}, []
    for name in modules:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:  # also a module set to None in sys.modules
            missing.append(name)
    if missing:
        packages = "package" if len(missing) == 1 else "packages"
        raise MissingExtraError(
            f"{what} needs the optional {packages} {', '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{EXTRA_HINT}"
        )
    return found


class TraceableSSL(torch.nn.Module):
    """What a SpeechBrain ``Wav2Vec2`` lobe (``CompactWav2Vec2``) computes,
    written so that the ONNX exporters keep the batch and length dynamic.

    The lobe builds its padding mask with a length read back to Python and
    normalises with ``F.layer_norm`` over a shape taken from the input;
    traced, both would be frozen to the example's shapes. Here the mask is a
    comparison with ``round(wav_lens * samples)`` (what SpeechBrain's mask is
    when the longest relative length is 1.0) and the layer norms are written
    out (mean and biased variance, epsilon 1e-5, as ``F.layer_norm``).

    Arguments
    ---------
    lobe : speechbrain.integrations.huggingface.wav2vec2.Wav2Vec2
        The loaded lobe (its ``model``, ``normalize_wav``, ``output_norm``);
        ``output_all_hiddens`` is refused.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.export import CompactWav2Vec2, export_compact
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> lobe = CompactWav2Vec2(out, freeze=True, output_norm=True).eval()
    >>> wav, wav_lens = torch.randn(2, 4000), torch.tensor([1.0, 0.7])
    >>> with torch.no_grad():
    ...     diff = TraceableSSL(lobe)(wav, wav_lens) - lobe(wav, wav_lens)
    >>> diff.abs().max().item() < 1e-5
    True
    """

    def __init__(self, lobe):
        super().__init__()
        if getattr(lobe, "output_all_hiddens", False):
            raise ValueError(
                "ssl: output_all_hiddens is True; the ONNX export supports "
                "an SSL lobe that outputs its last hidden state only."
            )
        self.model = lobe.model
        self.normalize_wav = bool(lobe.normalize_wav)
        self.output_norm = bool(lobe.output_norm)

    def forward(self, wav, wav_lens):
        """The SSL features.

        Arguments
        ---------
        wav : torch.Tensor
            ``[batch, samples]``.
        wav_lens : torch.Tensor
            ``[batch]``, relative lengths (the longest 1.0).

        Returns
        -------
        torch.Tensor
            ``[batch, frames, hidden]``.
        """
        samples = wav.shape[1]
        positions = torch.arange(samples, device=wav.device)
        lengths = torch.round(wav_lens * samples)
        mask = (positions[None, :] < lengths[:, None]).long()
        if self.normalize_wav:
            wav = _layer_norm(wav, dims=(1,))
        out = self.model(wav, attention_mask=mask).last_hidden_state
        if self.output_norm:
            out = _layer_norm(out, dims=(1, 2))
        return out


def _layer_norm(x, dims, eps=1e-5):
    """``F.layer_norm`` over ``dims`` without weights, shape-agnostic."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class CTCGraph(torch.nn.Module):
    """The module exported: an inference folder's ``encoder`` with its SSL
    lobe replaced by ``TraceableSSL``.

    Arguments
    ---------
    encoder : speechbrain.nnet.containers.LengthsCapableSequential
        The folder's ``encoder`` (SSL lobe, then the CTC head up to the
        log-softmax); its modules that take lengths get ``wav_lens``.

    Example
    -------
    >>> from speechbrain.nnet.containers import LengthsCapableSequential
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.export import CompactWav2Vec2, export_compact
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "compact")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> encoder = LengthsCapableSequential(
    ...     ssl=CompactWav2Vec2(out, freeze=True),
    ...     lin=torch.nn.Linear(32, 5),
    ...     log_softmax=torch.nn.LogSoftmax(dim=-1),
    ... ).eval()
    >>> wav, wav_lens = torch.randn(2, 4000), torch.tensor([1.0, 0.5])
    >>> with torch.no_grad():
    ...     graph = CTCGraph(encoder)(wav, wav_lens)
    ...     diff = graph - encoder(wav, wav_lens)
    >>> tuple(graph.shape), diff.abs().max().item() < 1e-5
    ((2, 198, 5), True)
    """

    def __init__(self, encoder):
        super().__init__()
        from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

        names = getattr(encoder, "lengths_arg_names", None)
        if names is None:
            raise ValueError(
                "encoder: expected a speechbrain.nnet.containers."
                f"LengthsCapableSequential, found {type(encoder).__name__}; "
                "export a CTC inference folder written by speechbrain-spg."
            )
        layers, takes_lengths, ssl = [], [], 0
        for layer, arg in zip(encoder.values(), names):
            if isinstance(layer, Wav2Vec2):
                layer, arg, ssl = TraceableSSL(layer), "wav_lens", ssl + 1
            layers.append(layer)
            takes_lengths.append(arg is not None)
        if ssl != 1:
            raise ValueError(
                f"encoder: {ssl} SSL lobes (SpeechBrain Wav2Vec2 / "
                "CompactWav2Vec2) found, expected exactly one."
            )
        self.layers = torch.nn.ModuleList(layers)
        self.takes_lengths = takes_lengths
        self._ssl_index = next(
            i
            for i, layer in enumerate(layers)
            if isinstance(layer, TraceableSSL)
        )

    @property
    def ssl(self):
        """The ``TraceableSSL`` in place of the lobe."""
        return self.layers[self._ssl_index]

    def forward(self, wav, wav_lens):
        """The log-probabilities.

        Arguments
        ---------
        wav : torch.Tensor
            ``[batch, samples]``.
        wav_lens : torch.Tensor
            ``[batch]``, relative lengths.

        Returns
        -------
        torch.Tensor
            ``[batch, frames, vocabulary]``.
        """
        x = wav
        for layer, takes_lengths in zip(self.layers, self.takes_lengths):
            x = layer(x, wav_lens) if takes_lengths else layer(x)
            if isinstance(x, tuple):
                x = x[0]
        return x


def ctc_greedy(log_probs, wav_lens, blank_index):
    """Greedy CTC decoding, as SpeechBrain's ``ctc_greedy_decode``.

    Each sequence keeps its first ``round(wav_lens * frames)`` frames, takes
    the best label per frame, merges repeats and drops blanks.

    Arguments
    ---------
    log_probs : numpy.ndarray
        ``[batch, frames, vocabulary]``.
    wav_lens : numpy.ndarray
        ``[batch]``, relative lengths.
    blank_index : int
        The CTC blank (negative: counted from the end).

    Returns
    -------
    list of list of int
        The label ids of each sequence.

    Example
    -------
    >>> probs = np.log([[[0.3, 0.7], [0.2, 0.8]], [[0.2, 0.8], [0.9, 0.1]]])
    >>> ctc_greedy(probs, np.array([0.51, 1.0], dtype=np.float32), 0)
    [[1], [1]]
    """
    frames, vocabulary = log_probs.shape[1], log_probs.shape[2]
    blank = blank_index % vocabulary
    out = []
    for seq, rel in zip(log_probs, np.asarray(wav_lens, dtype=np.float32)):
        kept = int(np.round(rel * np.float32(frames)))
        best = seq[:kept].argmax(axis=-1).tolist()
        out.append([label for label, _ in groupby(best) if label != blank])
    return out


def min_samples_of(config):
    """The fewest samples the convolutional front end of a configuration
    turns into one frame, and the samples per frame.

    Arguments
    ---------
    config : transformers.PretrainedConfig
        A wav2vec2 / HuBERT / WavLM configuration.

    Returns
    -------
    (int, int)

    Example
    -------
    >>> from transformers import AutoConfig
    >>> min_samples_of(AutoConfig.for_model("wav2vec2"))
    (400, 320)
    """
    from speechbrain_spg.transcribe import min_input_samples

    kernels, strides = list(config.conv_kernel), list(config.conv_stride)
    return min_input_samples(kernels, strides), math.prod(strides)


def onnx_metadata(folder, asr, graph, vocab, precision, exporter, opset):
    """The metadata an exported model carries (all strings).

    Arguments
    ---------
    folder : str
        The inference folder.
    asr : speechbrain.inference.ASR.EncoderASR
        The folder, loaded.
    graph : CTCGraph
        Its exported module.
    vocab : int
        The number of output labels.
    precision : str
        ``float32`` or ``int8``.
    exporter : str
        ``torchscript`` or ``dynamo``.
    opset : int
        The ONNX opset.

    Returns
    -------
    dict
        ``format``, ``blank_index``, ``vocab_size``, ``sample_rate``,
        ``min_samples``, ``samples_per_frame``, ``frame_rate``,
        ``tokenizer_file``, ``tokenizer_sha256``, ``token_type``,
        ``decoding`` (the folder's), ``model_type``, ``structured``,
        ``precision``, ``exporter``, ``opset``, ``inputs``, ``outputs``.

    Example
    -------
    ``export_onnx`` writes it (and returns it with its checks):

    >>> from speechbrain_spg.data.architectures import tiny_inference_folder
    >>> folder = tiny_inference_folder(tempfile.mkdtemp())
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> metadata = export_onnx(folder, path)
    >>> metadata["blank_index"], metadata["precision"], metadata["structured"]
    ('0', 'float32', 'false')
    """
    from speechbrain_spg.export import read_manifest, sha256_of
    from speechbrain_spg.tools.inference import TOKENIZER_FILES

    manifest = read_manifest(folder, verify=False)
    tokenizer_file = _tokenizer_file(folder, asr)
    min_samples, per_frame = min_samples_of(graph.ssl.model.config)
    rate = int(asr.audio_normalizer.sample_rate)
    decoding = asr.hparams.decoding_function
    function = getattr(decoding, "func", decoding)
    greedy = getattr(function, "__name__", "") == "ctc_greedy_decode"
    blank = getattr(decoding, "keywords", {}).get("blank_id")
    if blank is None:
        blank = getattr(asr.hparams, "blank_index", 0)
    blank, how = int(blank), "greedy" if greedy else "beam search"
    token_type = {v: k for k, v in TOKENIZER_FILES.items()}[tokenizer_file]
    return {
        "format": FORMAT,
        "blank_index": str(blank % vocab),
        "vocab_size": str(vocab),
        "sample_rate": str(rate),
        "min_samples": str(min_samples),
        "samples_per_frame": str(per_frame),
        "frame_rate": f"{rate / per_frame:g}",
        "tokenizer_file": tokenizer_file,
        "tokenizer_sha256": sha256_of(os.path.join(folder, tokenizer_file)),
        "token_type": token_type,
        "decoding": how,
        "model_type": manifest["model_type"],
        "structured": str(bool(manifest.get("structure"))).lower(),
        "precision": precision,
        "exporter": exporter,
        "opset": str(opset),
        "inputs": "wav: float32 [batch, samples]; wav_lens: float32 [batch], "
        "length / longest length",
        "outputs": "log_probs: float32 [batch, frames, vocab_size]",
    }


def _tokenizer_file(folder, asr):
    """The tokenizer file name the folder's Pretrainer loads."""
    from speechbrain_spg.tools.inference import TOKENIZER_FILES

    pretrainer = getattr(asr.hparams, "pretrainer", None)
    path = getattr(pretrainer, "paths", {}).get("tokenizer")
    name = os.path.basename(str(path)) if path else None
    if name in TOKENIZER_FILES.values():
        return name
    for name in TOKENIZER_FILES.values():
        if os.path.isfile(os.path.join(folder, name)):
            return name
    raise FileNotFoundError(
        f"{folder}: no {' or '.join(TOKENIZER_FILES.values())}."
    )


def probe_batch(min_samples, sample_rate, seed=0):
    """The waveforms an export is traced with and checked on: a padded batch
    of two (1 s and 0.6 s at least), and one waveform of another length.

    Arguments
    ---------
    min_samples : int
        The fewest samples the model accepts.
    sample_rate : int
        The model's rate.
    seed : int
        Seed of the noise.

    Returns
    -------
    list of (torch.Tensor, torch.Tensor)
        ``(wav, wav_lens)`` pairs.

    Example
    -------
    >>> [(tuple(w.shape), l.tolist()) for w, l in probe_batch(45, 16000)]
    [((2, 16000), [1.0, 0.6000000238418579]), ((1, 10667), [1.0])]
    """
    generator = torch.Generator().manual_seed(seed)
    longest = max(sample_rate, 4 * min_samples)
    shorter = int(0.6 * longest)
    wav = torch.randn(2, longest, generator=generator) * 0.1
    wav[1, shorter:] = 0
    lens = torch.tensor([1.0, shorter / longest])
    other = torch.randn(1, longest * 2 // 3 + 1, generator=generator)
    return [(wav, lens), (other * 0.1, torch.ones(1))]


def export_onnx(
    folder, out, int8=False, opset=None, dynamo=False, savedir=None
):
    """Exports an inference folder's CTC model to an ONNX file.

    Arguments
    ---------
    folder : str or os.PathLike
        A CTC inference folder (``EncoderASR``).
    out : str or os.PathLike
        The ONNX file (written in one rename; replaced if it exists).
    int8 : bool
        Quantise the matrix products with ONNX Runtime's
        ``quantize_dynamic`` (else float32).
    opset : int, optional
        The ONNX opset (default 17; 18 with ``dynamo``).
    dynamo : bool
        Use the ``torch.export`` exporter instead of the TorchScript one.
    savedir : str, optional
        Where SpeechBrain links the folder's files (default: a temporary
        folder, removed afterwards).

    Returns
    -------
    dict
        The metadata written, and ``max_abs_diff`` (float32 ONNX Runtime vs
        PyTorch log-probabilities) and ``max_abs_diff_written`` (the written
        model, int8 if quantised, vs PyTorch) on the probe waveforms.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_inference_folder
    >>> folder = tiny_inference_folder(tempfile.mkdtemp())
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> result = export_onnx(folder, path)
    >>> result["max_abs_diff"] < 1e-4, os.path.isfile(path)
    (True, True)
    """
    mods = require_onnx(EXPORT_MODULES + (("onnxscript",) if dynamo else ()))
    onnx, ort = mods["onnx"], mods["onnxruntime"]
    if opset is None:
        opset = DYNAMO_MIN_OPSET if dynamo else DEFAULT_OPSET
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise ValueError(
            f"--opset {opset}: the dynamo exporter writes opset "
            f"{DYNAMO_MIN_OPSET} or newer; choose one, or leave out --dynamo."
        )
    folder, out = os.fspath(folder), os.path.abspath(os.fspath(out))
    if os.path.isdir(out):
        raise ValueError(f"{out} is a folder; give the ONNX file to write.")
    from speechbrain_spg.tools.inference import asr_interface, load_asr

    asr = _load(folder, savedir, load_asr, asr_interface)
    graph = CTCGraph(asr.mods.encoder).eval()
    precision = "int8" if int8 else "float32"
    exporter = "dynamo" if dynamo else "torchscript"
    probes = probe_batch(
        min_samples_of(graph.ssl.model.config)[0],
        int(asr.audio_normalizer.sample_rate),
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. WavLM's mask types
        expected = [asr.encode_batch(w, lens).numpy() for w, lens in probes]
    vocab = expected[0].shape[-1]
    metadata = onnx_metadata(
        folder, asr, graph, vocab, precision, exporter, opset
    )
    sums = np.abs(np.logaddexp.reduce(expected[0], axis=-1)).max()
    if sums > 1e-3:
        raise ValueError(
            f"{folder}/hyperparams.yaml: the encoder's output is not "
            f"log-probabilities (log-sum-exp off by {sums:.3g}); its last "
            "module must be the log-softmax of a CTC folder."
        )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".spg-onnx-", dir=os.path.dirname(out))
    try:
        fp32 = os.path.join(work, "float32.onnx")
        # Both exporters write PyTorch's fused attention with a boolean mask
        # as several passes over every (head, frame, frame) score; eager
        # attention adds one float mask: the same values, and half the time
        # in ONNX Runtime on the tiny test model.
        graph.ssl.model.set_attn_implementation("eager")
        _torch_export(graph, probes[0], fp32, opset, dynamo)
        diff = _max_diff(ort, fp32, probes, expected)
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(
                f"{folder}: the exported graph's log-probabilities differ "
                f"from PyTorch's by {diff:.3g} (> {MAX_ABS_DIFF}); try the "
                "other exporter (--dynamo, or without it)."
            )
        written = fp32
        if int8:
            written = os.path.join(work, "int8.onnx")
            _quantize(fp32, written)
        model = onnx.load(written)
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, written)
        result = dict(metadata, max_abs_diff=diff)
        result["max_abs_diff_written"] = (
            _max_diff(ort, written, probes, expected) if int8 else diff
        )
        os.replace(written, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _load(folder, savedir, load_asr, asr_interface):
    """The folder as ``EncoderASR``, refusing other inference classes."""
    from speechbrain_spg.tools.inference import check_inference_folder

    check_inference_folder(folder)
    interface = asr_interface(folder)
    if interface != "EncoderASR":
        raise ValueError(
            f"{folder}/hyperparams.yaml: asr_interface is {interface}; the "
            "ONNX export supports CTC folders (EncoderASR) only."
        )
    if savedir is not None:
        return load_asr(folder, savedir=savedir)
    with tempfile.TemporaryDirectory(prefix="spg-onnx-") as tmp:
        return load_asr(folder, savedir=tmp)


def _torch_export(graph, example, path, opset, dynamo):
    """``torch.onnx.export`` with dynamic batch, samples and frames."""
    kwargs = dict(
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=dynamo,
    )
    if dynamo:
        batch = torch.export.Dim("batch")
        samples = torch.export.Dim("samples")
        kwargs["dynamic_shapes"] = {
            "wav": {0: batch, 1: samples},
            "wav_lens": {0: batch},
        }
        kwargs["verbose"] = False
    else:
        kwargs["dynamic_axes"] = {
            "wav": {0: "batch", 1: "samples"},
            "wav_lens": {0: "batch"},
            OUTPUT_NAME: {0: "batch", 1: "frames"},
        }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        torch.onnx.export(graph, tuple(example), path, **kwargs)


def _quantize(src, dst):
    """ONNX Runtime's dynamic quantisation of the matrix products (not the
    convolutions: see the module's documentation), without its advice to
    run its pre-processing first (logged as a warning)."""
    from onnxruntime.quantization import quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def _max_diff(ort, path, probes, expected):
    """The largest difference between ONNX Runtime's outputs and
    ``expected`` on the probe waveforms."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diff = 0.0
    for (wav, lens), ref in zip(probes, expected):
        got = session.run(None, {"wav": wav.numpy(), "wav_lens": lens.numpy()})
        if got[0].shape != ref.shape:
            return math.inf
        diff = max(diff, float(np.abs(got[0] - ref).max()))
    return diff


def read_metadata(path):
    """The metadata of a model that ``export_onnx`` wrote.

    Arguments
    ---------
    path : str or os.PathLike
        The ONNX file.

    Returns
    -------
    dict
        Key -> string (see ``onnx_metadata``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_inference_folder
    >>> folder = tiny_inference_folder(tempfile.mkdtemp())
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> _ = export_onnx(folder, path)
    >>> read_metadata(path)["blank_index"]
    '0'
    """
    ort = require_onnx(RUNTIME_MODULES, "reading an ONNX model")["onnxruntime"]
    return _session(ort, path, ["CPUExecutionProvider"])[1]


def _session(ort, path, providers):
    """An inference session and the speechbrain-spg metadata of its model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such ONNX file (write one with python -m "
            "speechbrain_spg.export_onnx FOLDER OUT.onnx)."
        )
    try:
        session = ort.InferenceSession(path, providers=providers)
    except Exception as err:
        message = " ".join(str(err).split())
        raise ValueError(
            f"{path}: not a readable ONNX model ({message})."
        ) from None
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not written by speechbrain_spg.export_onnx (metadata "
            f"format {metadata.get('format')!r}, expected {FORMAT!r}); export "
            "the inference folder again."
        )
    return session, dict(metadata)


class OnnxASR:
    """An exported CTC model run by ONNX Runtime, with the interface that
    ``transcribe.transcribe_files`` uses (``transcribe_batch``,
    ``audio_normalizer``, ``min_samples``).

    Arguments
    ---------
    path : str or os.PathLike
        The ONNX file (``export_onnx``).
    folder : str or os.PathLike
        The inference folder it was exported from: its tokenizer decodes
        (refused if it is not the one exported with the model: sha256).
    device : str
        ``cpu``, or ``cuda`` / ``cuda:N`` (ONNX Runtime's CUDA provider,
        ``onnxruntime-gpu``).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_inference_folder
    >>> folder = tiny_inference_folder(tempfile.mkdtemp())
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> _ = export_onnx(folder, path)
    >>> asr = OnnxASR(path, folder)
    >>> texts, ids = asr.transcribe_batch(torch.randn(1, 16000), torch.ones(1))
    >>> len(texts)
    1
    """

    def __init__(self, path, folder, device="cpu"):
        from speechbrain.dataio.preprocess import AudioNormalizer

        ort = require_onnx(RUNTIME_MODULES, "transcribe --onnx")["onnxruntime"]
        providers = _providers(ort, device)
        self.session, self.metadata = _session(ort, path, providers)
        self.tokenizer, self.token_type = _load_tokenizer(
            os.fspath(folder), os.fspath(path), self.metadata
        )
        self.blank_index = int(self.metadata["blank_index"])
        self.min_samples = int(self.metadata["min_samples"])
        self.audio_normalizer = AudioNormalizer(
            int(self.metadata["sample_rate"])
        )

    def log_probs(self, wavs, wav_lens):
        """The model's log-probabilities.

        Arguments
        ---------
        wavs : torch.Tensor or numpy.ndarray
            ``[batch, samples]``.
        wav_lens : torch.Tensor or numpy.ndarray
            ``[batch]``, relative lengths.

        Returns
        -------
        numpy.ndarray
            ``[batch, frames, vocabulary]``.
        """
        feeds = {
            "wav": _numpy(wavs),
            "wav_lens": _numpy(wav_lens),
        }
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def transcribe_batch(self, wavs, wav_lens):
        """Greedy CTC transcripts, as ``EncoderASR.transcribe_batch``.

        Arguments
        ---------
        wavs : torch.Tensor or numpy.ndarray
            ``[batch, samples]``.
        wav_lens : torch.Tensor or numpy.ndarray
            ``[batch]``, relative lengths.

        Returns
        -------
        texts : list of str
        ids : list of list of int
        """
        lens = _numpy(wav_lens)
        ids = ctc_greedy(self.log_probs(wavs, lens), lens, self.blank_index)
        if self.token_type == "char":
            texts = ["".join(self.tokenizer.decode_ndim(seq)) for seq in ids]
        else:
            texts = [self.tokenizer.decode_ids(seq) for seq in ids]
        return texts, ids


def _numpy(x):
    """A float32 numpy array of a tensor or an array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _providers(ort, device):
    """ONNX Runtime execution providers for a ``--device``."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"--device {device}: this onnxruntime has no "
                f"CUDAExecutionProvider (available: {', '.join(available)}); "
                "install onnxruntime-gpu, or use --device cpu."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index})]
    raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N.")


def _load_tokenizer(folder, path, metadata):
    """The folder's tokenizer, checked against the one exported."""
    from speechbrain_spg.export import sha256_of

    name = metadata["tokenizer_file"]
    where = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder.")
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"{where}: missing; {path} decodes with the tokenizer of the "
            "inference folder it was exported from."
        )
    if sha256_of(where) != metadata["tokenizer_sha256"]:
        raise ValueError(
            f"{where} is not the tokenizer {path} was exported with (sha256 "
            "differs); give the folder it was exported from, or export it "
            "again."
        )
    if metadata["token_type"] == "char":
        from speechbrain_spg.tools.inference import CharTokenizer

        tokenizer = CharTokenizer()
        tokenizer.load(where)
    else:
        import sentencepiece

        tokenizer = sentencepiece.SentencePieceProcessor(model_file=where)
    return tokenizer, metadata["token_type"]


def _parser():
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.export_onnx",
        description="Exports the CTC model of an SPG inference folder to "
        "ONNX (inputs wav [batch, samples] and wav_lens [batch]; output "
        "log_probs [batch, frames, vocab]).",
    )
    parser.add_argument("folder", help="the inference folder (EncoderASR)")
    parser.add_argument("out", help="the ONNX file to write")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="quantise the matrix products with onnxruntime's "
        "quantize_dynamic (int8 weights)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset ({DEFAULT_OPSET}; {DYNAMO_MIN_OPSET} with --dynamo)",
    )
    parser.add_argument(
        "--dynamo",
        action="store_true",
        help="use the torch.export-based exporter (needs onnxscript) "
        "instead of the TorchScript one",
    )
    return parser


def main(argv=None):
    """Runs the command.

    Arguments
    ---------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0: written; 2: the extra is missing, the folder cannot be exported,
        or a wrong command line.

    Example
    -------
    An empty folder is refused (stderr names the missing files, or the
    extra to install where ``onnx`` / ``onnxruntime`` are missing):

    >>> main([tempfile.mkdtemp(), "out.onnx"])
    2
    """
    from speechbrain_spg.export import CompactExportError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a wrong command line
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        result = export_onnx(
            args.folder,
            args.out,
            int8=args.int8,
            opset=args.opset,
            dynamo=args.dynamo,
        )
    except (
        MissingExtraError,
        FileNotFoundError,
        ValueError,
        CompactExportError,
    ) as err:
        print(" ".join(str(err).split()), file=sys.stderr)
        return 2
    size = os.path.getsize(args.out) / 1e6
    print(
        f"Wrote {args.out} ({result['precision']}, {size:.2f} MB, opset "
        f"{result['opset']}, {result['exporter']} exporter). Max |ONNX "
        f"Runtime - PyTorch| of the log-probabilities: float32 "
        f"{result['max_abs_diff']:.2g}"
        + (f", int8 {result['max_abs_diff_written']:.2g}" if args.int8 else "")
        + "."
    )
    print(
        "Transcribe: python -m speechbrain_spg.transcribe "
        f"{args.folder} AUDIO... --onnx {args.out}"
    )
    if result["decoding"] != "greedy":
        print(
            f"Note: {args.folder} decodes with {result['decoding']}; "
            "transcribe --onnx decodes greedily."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
