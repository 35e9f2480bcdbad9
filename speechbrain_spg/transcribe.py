"""Transcribes audio files with an SPG inference folder.

Usage::

    python -m speechbrain_spg.transcribe FOLDER AUDIO... [--device cpu]
        [--batch-size 8] [--noprogressbar] [--onnx MODEL.onnx]

``FOLDER`` is an inference folder (what a compressed run of the recipe writes
in ``<output_folder>/compact``, or ``tools.inference.write_inference_folder``):
it is loaded with SpeechBrain's ``EncoderASR`` or ``EncoderDecoderASR``
(``tools.inference.load_asr``, checksums verified). Each ``AUDIO`` is a file
or a directory (every ``*.wav`` and ``*.flac`` below it, sorted); any format
``soundfile`` reads, any sample rate (resampled to the model's) and any number
of channels (averaged to mono), as ``transcribe_file`` does.

Files are read, sorted by length and transcribed ``--batch-size`` at a time
(zero-padded, with SpeechBrain's relative lengths). One line per file is
printed on stdout, in the order of the command line: ``path<TAB>transcript``
(whitespace normalised). A file that cannot be transcribed (missing,
unreadable, empty, shorter than the model's convolutional front end accepts)
gets one line on stderr instead, ``path: error: <reason>``, and the others are
still transcribed. Silence is transcribed like any other audio.

With ``--onnx MODEL.onnx`` (a model that ``python -m
speechbrain_spg.export_onnx FOLDER MODEL.onnx`` wrote from ``FOLDER``), ONNX
Runtime runs the model instead of PyTorch (``export_onnx.OnnxASR``): the
same batches and relative lengths, greedy CTC decoding as SpeechBrain's
``ctc_greedy_decode``, decoded by ``FOLDER``'s tokenizer (refused if it is
not the one the model was exported with); the output and the per-file
errors are the same. It needs the optional extra ``pip install
speechbrain-spg[onnx]`` (without it: one line says so, exit code 2).

Exit code: 0 when every file was transcribed, 1 when some file failed, 2 when
the folder cannot be loaded (one line on stderr says why, e.g. which files an
inference folder lacks) or the command line is wrong.

Padding: a file padded in a batch can be transcribed slightly differently
than alone, as in the recipe's own batched evaluation: the wav2vec2-family
lobes normalise the padded waveform as a whole (``normalize_wav``), and CTC
decoding takes ``round(relative length * frames)`` frames, which can include
a padding frame or two (the convolutional front end's frame count is not
proportional to the length). The longest file of each batch is not padded;
``--batch-size 1`` gives exactly ``transcribe_file``'s transcripts.

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import os
import sys
import tempfile

import soundfile
import torch

from speechbrain_spg.export_onnx import MissingExtraError

#: Audio file extensions found in directories (lower case).
AUDIO_EXTENSIONS = (".wav", ".flac")
#: A progress bar is shown from this many files on (on a terminal).
PROGRESS_MIN_FILES = 16


class AudioError(ValueError):
    """A file that cannot be transcribed; the message says why."""


def audio_files(paths):
    """Expands directories into the audio files below them.

    Arguments
    ---------
    paths : sequence of str
        Files and directories, as given on the command line.

    Returns
    -------
    list of str
        Each file as given (even one that does not exist: it is reported
        later), each directory replaced by every ``*.wav`` and ``*.flac``
        below it (case-insensitive), sorted; a directory without any is kept
        as it is (reported later).

    Example
    -------
    >>> work = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(work, "d", "sub"))
    >>> for name in ["d/b.wav", "d/sub/a.flac", "d/notes.txt"]:
    ...     open(os.path.join(work, name), "w").close()
    >>> found = audio_files(["x.wav", os.path.join(work, "d")])
    >>> [os.path.relpath(p, work) if p != "x.wav" else p for p in found]
    ['x.wav', 'd/b.wav', 'd/sub/a.flac']
    """
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            found += [
                os.path.join(root, name)
                for name in names
                if name.lower().endswith(AUDIO_EXTENSIONS)
            ]
        files += sorted(found) if found else [path]
    return files


def min_input_samples(kernels, strides):
    """The fewest samples a stack of 1-D convolutions (no padding) turns
    into one output frame.

    Arguments
    ---------
    kernels : sequence of int
        Kernel size of each convolution, first to last.
    strides : sequence of int
        Stride of each convolution.

    Returns
    -------
    int

    Example
    -------
    >>> min_input_samples([10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2])
    400
    >>> min_input_samples([10, 8], [5, 4])
    45
    """
    needed = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        needed = kernel + stride * (needed - 1)
    return needed


def model_min_samples(asr):
    """The fewest samples the model's convolutional front end accepts.

    Arguments
    ---------
    asr : speechbrain.inference.interfaces.Pretrained or export_onnx.OnnxASR
        The loaded model: its ``min_samples`` if it has one (an ONNX model
        reads it from its metadata), else its modules are searched for a
        HuggingFace configuration with ``conv_kernel`` and ``conv_stride``.

    Returns
    -------
    int
        1 if no module has such a configuration.

    Example
    -------
    >>> from transformers import AutoConfig
    >>> class Asr:
    ...     mods = torch.nn.ModuleDict({"ssl": torch.nn.Linear(1, 1)})
    >>> Asr.mods.ssl.config = AutoConfig.for_model("wav2vec2")
    >>> model_min_samples(Asr())
    400
    """
    if getattr(asr, "min_samples", None) is not None:
        return int(asr.min_samples)
    for module in asr.mods.modules():
        config = getattr(module, "config", None)
        kernels = getattr(config, "conv_kernel", None)
        strides = getattr(config, "conv_stride", None)
        if kernels and strides:
            return min_input_samples(kernels, strides)
    return 1


def read_audio(path, normalizer):
    """Reads one audio file as the model's input.

    Arguments
    ---------
    path : str
        The file (anything ``soundfile`` reads).
    normalizer : callable
        ``normalizer(signal, sample_rate)``, with ``signal`` as
        ``[time, channels]``, returns a mono waveform at the model's rate:
        the model's ``audio_normalizer`` (SpeechBrain's ``AudioNormalizer``,
        which ``transcribe_file`` applies too).

    Returns
    -------
    torch.Tensor
        ``[time]``, float32.

    Raises
    ------
    AudioError
        The file is missing, unreadable, empty or has no samples.

    Example
    -------
    >>> from speechbrain.dataio.preprocess import AudioNormalizer
    >>> path = os.path.join(tempfile.mkdtemp(), "a.wav")
    >>> soundfile.write(path, torch.zeros(800, 2).numpy(), 8000)
    >>> read_audio(path, AudioNormalizer(16000)).shape
    torch.Size([1600])
    >>> read_audio(path + ".missing", AudioNormalizer(16000))
    Traceback (most recent call last):
      ...
    speechbrain_spg.transcribe.AudioError: no such file
    """
    if not os.path.exists(path):
        raise AudioError("no such file")
    if os.path.isdir(path):
        raise AudioError(
            "a directory without any "
            + " or ".join(f"*{ext}" for ext in AUDIO_EXTENSIONS)
            + " file"
        )
    if os.path.getsize(path) == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's errors, unreadable files
        reason = getattr(err, "error_string", None) or str(err)
        raise AudioError(f"cannot read audio ({_one_line(reason)})") from None
    if data.shape[0] == 0:
        raise AudioError("empty audio (no samples)")
    return normalizer(torch.from_numpy(data), rate).float()


def pad_batch(wavs):
    """Zero-pads waveforms into a batch, with SpeechBrain's relative lengths.

    Arguments
    ---------
    wavs : sequence of torch.Tensor
        ``[time]`` waveforms.

    Returns
    -------
    batch : torch.Tensor
        ``[batch, longest]``.
    wav_lens : torch.Tensor
        Each length divided by the longest (the longest is 1.0).

    Example
    -------
    >>> batch, wav_lens = pad_batch([torch.ones(4), torch.ones(2)])
    >>> batch.tolist(), wav_lens.tolist()
    ([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], [1.0, 0.5])
    """
    longest = max(len(wav) for wav in wavs)
    batch = wavs[0].new_zeros(len(wavs), longest)
    for row, wav in zip(batch, wavs):
        row[: len(wav)] = wav
    lengths = torch.tensor([len(wav) for wav in wavs], dtype=torch.float)
    return batch, lengths / longest


def transcribe_files(asr, paths, batch_size=8, progressbar=False):
    """Transcribes files in batches of similar length.

    Arguments
    ---------
    asr : speechbrain.inference.interfaces.Pretrained
        An ``EncoderASR`` or ``EncoderDecoderASR`` (``transcribe_batch``,
        ``audio_normalizer``).
    paths : sequence of str
        Audio files.
    batch_size : int
        Files per call of ``transcribe_batch``.
    progressbar : bool
        Show a tqdm progress bar (stderr).

    Returns
    -------
    list of (str, str or None, str or None)
        ``(path, transcript, error)`` per file, in the order of ``paths``:
        the transcript (whitespace normalised) or the reason it failed.

    Example
    -------
    >>> from speechbrain.dataio.preprocess import AudioNormalizer
    >>> class Asr:  # "transcribes" each file as its number of samples
    ...     mods = torch.nn.ModuleDict()
    ...     audio_normalizer = AudioNormalizer(16000)
    ...     def transcribe_batch(self, wavs, wav_lens):
    ...         n = (wav_lens * wavs.shape[1]).round().int().tolist()
    ...         return [f" {k}  samples " for k in n], None
    >>> work = tempfile.mkdtemp()
    >>> paths = [os.path.join(work, f"{n}.wav") for n in (100, 300, 200)]
    >>> for path, n in zip(paths, (100, 300, 200)):
    ...     soundfile.write(path, torch.zeros(n).numpy(), 16000)
    >>> results = transcribe_files(Asr(), paths + ["nowhere.wav"], batch_size=2)
    >>> [(os.path.basename(p), text, error) for p, text, error in results]
    [('100.wav', '100 samples', None), ('300.wav', '300 samples', None), ('200.wav', '200 samples', None), ('nowhere.wav', None, 'no such file')]
    """
    results = [(path, None, None) for path in paths]
    min_samples = model_min_samples(asr)
    durations = [(_duration(path), i) for i, path in enumerate(paths)]
    order = [i for _, i in sorted(durations, key=lambda d: (-d[0], d[1]))]
    batches = [
        order[start : start + batch_size]
        for start in range(0, len(order), batch_size)
    ]
    bar = None
    if progressbar:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="file", file=sys.stderr)
    for batch in batches:
        wavs = {}
        for i in batch:
            try:
                wav = read_audio(paths[i], asr.audio_normalizer)
                if len(wav) < min_samples:
                    raise AudioError(
                        f"too short: {len(wav)} samples at "
                        f"{asr.audio_normalizer.sample_rate} Hz, the model "
                        f"needs at least {min_samples}"
                    )
                wavs[i] = wav
            except AudioError as err:
                results[i] = (paths[i], None, str(err))
        for i, text, error in _transcribe(asr, wavs):
            results[i] = (paths[i], text, error)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


def _transcribe(asr, wavs):
    """``(index, transcript, error)`` for a batch ``{index: waveform}``;
    a batch the model refuses is retried one file at a time."""
    if not wavs:
        return []
    indices = list(wavs)
    batch, wav_lens = pad_batch([wavs[i] for i in indices])
    try:
        texts, _ = asr.transcribe_batch(batch, wav_lens)
    except Exception as err:
        if len(indices) > 1:
            out = []
            for i in indices:
                out += _transcribe(asr, {i: wavs[i]})
            return out
        return [(indices[0], None, f"the model failed: {_one_line(err)}")]
    return [(i, " ".join(str(t).split()), None) for i, t in zip(indices, texts)]


def _duration(path):
    """Duration in seconds from the file's header (0 if unreadable), to
    batch files of similar length."""
    try:
        info = soundfile.info(path)
        return info.frames / info.samplerate
    except Exception:
        return 0.0


def _one_line(message):
    """An exception or message on one line."""
    return " ".join(str(message).split())


def _parser():
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.transcribe",
        description="Transcribes audio files with an SPG inference folder; "
        "prints path<TAB>transcript per file.",
    )
    parser.add_argument("folder", help="the inference folder")
    parser.add_argument(
        "audio",
        nargs="+",
        help="audio files, or directories (every *.wav and *.flac below)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, ... (cpu)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="files per forward pass (8); 1 gives exactly transcribe_file's "
        "transcripts (no padding)",
    )
    parser.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="run this ONNX model (python -m speechbrain_spg.export_onnx "
        "FOLDER MODEL.onnx) with onnxruntime instead of PyTorch; FOLDER "
        "gives the tokenizer",
    )
    parser.add_argument(
        "--noprogressbar",
        action="store_true",
        help="no progress bar (shown on a terminal for many files)",
    )
    return parser


def _positive_int(text):
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _load(args, savedir, device):
    """The model of the command line: the folder with PyTorch, or its ONNX
    export with ONNX Runtime (``--onnx``)."""
    if args.onnx:
        from speechbrain_spg.export_onnx import OnnxASR

        return OnnxASR(args.onnx, args.folder, device=device)
    from speechbrain_spg.tools.inference import load_asr

    return load_asr(args.folder, savedir=savedir, device=device)


def main(argv=None):
    """Runs the command.

    Arguments
    ---------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0: every file transcribed; 1: some file failed; 2: the folder cannot
        be loaded, or a wrong command line.

    Example
    -------
    >>> main([tempfile.mkdtemp(), "audio.wav"])  # not an inference folder
    2
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a wrong command line
        return exit_.code if isinstance(exit_.code, int) else 2
    paths = audio_files(args.audio)
    with tempfile.TemporaryDirectory(prefix="spg-transcribe-") as savedir:
        try:
            device = "cuda:0" if args.device == "cuda" else args.device
            asr = _load(args, savedir, device)
        except Exception as err:
            message = _one_line(err)
            if not isinstance(
                err, (FileNotFoundError, ValueError, MissingExtraError)
            ):
                message = (
                    f"{args.folder}: cannot load the model: "
                    f"{type(err).__name__}: {message}"
                )
            print(message, file=sys.stderr)
            return 2
        progressbar = (
            not args.noprogressbar
            and len(paths) >= PROGRESS_MIN_FILES
            and sys.stderr.isatty()
        )
        results = transcribe_files(
            asr, paths, args.batch_size, progressbar=progressbar
        )
    failed = 0
    for path, text, error in results:
        if error is None:
            print(f"{path}\t{text}", flush=True)
        else:
            failed += 1
            print(f"{path}: error: {error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
