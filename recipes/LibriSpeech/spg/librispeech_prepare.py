"""Data preparation for LibriSpeech: one SpeechBrain CSV file per split.

The LibriSpeech corpus is laid out as
``<data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac``
with one ``<speaker>-<chapter>.trans.txt`` per chapter folder, whose lines
read ``<utterance id> TRANSCRIPT``. This module turns each requested split
into ``<save_folder>/<split>.csv`` with the columns
``ID,duration,wav,spk_id,wrd`` that SpeechBrain's data loaders read.

Utterances that cannot be used for CTC training or evaluation are left out,
with a warning per file and a count per split and reason (see
``SKIP_REASONS``). Inconsistent input (audio without a transcript line, or
the reverse) is an error, because it means a broken download or extraction.

The preparation is skipped when it was already done with the same options
on the same input files: ``<save_folder>/prepare_options.json`` keeps the
options, a fingerprint of the input files and the report of the last run.

The recipe imports it as a plain module::

    from librispeech_prepare import prepare_librispeech

Authors
 * speechbrain-spg developers 2026
"""

import csv
import hashlib
import json
import os
from collections import Counter

import soundfile
from speechbrain.utils.logger import get_logger
from tqdm import tqdm

logger = get_logger(__name__)

#: Column names of the CSV files written for every split.
CSV_HEADER = ("ID", "duration", "wav", "spk_id", "wrd")

#: Name of the file, in ``save_folder``, that records a finished preparation.
OPTIONS_FILE = "prepare_options.json"

#: Why an utterance may be left out, in the order the checks are made: an
#: utterance is counted once, under the first reason that applies.
SKIP_REASONS = (
    "empty_transcript",
    "bad_characters",
    "unreadable_audio",
    "zero_length_audio",
    "wrong_sample_rate",
    "too_short",
    "too_long",
)

#: Samples decoded at the end of every audio file to detect truncated files.
TAIL_CHECK_FRAMES = 1024

#: A progress bar is shown for splits with at least this many audio files.
PROGRESS_BAR_MIN_FILES = 1000

AUDIO_SUFFIX = ".flac"
TRANSCRIPT_SUFFIX = ".trans.txt"
_MAX_LISTED = 5
_STATE_VERSION = 1


def normalize_transcript(text):
    """Normalises a transcript: upper case, single spaces, no outer spaces.

    LibriSpeech transcripts are already upper case; this makes transcripts
    from edited or third-party copies comparable with them. Any run of
    whitespace (spaces, tabs, unicode spaces) becomes one space.

    Arguments
    ---------
    text : str
        The raw transcript.

    Returns
    -------
    str
        The normalised transcript (empty if ``text`` holds only whitespace).

    Example
    -------
    >>> normalize_transcript("  hello\\t World  it's   me ")
    "HELLO WORLD IT'S ME"
    >>> normalize_transcript(" \\n ")
    ''
    """
    return " ".join(text.upper().split())


def prepare_librispeech(
    data_folder,
    save_folder,
    tr_splits=("train-clean-100",),
    dev_splits=("dev-clean",),
    te_splits=("test-clean", "test-other"),
    merge_lst=None,
    merge_name=None,
    skip_prep=False,
    sample_rate=16000,
    min_duration=0.1,
    max_duration=30.0,
    allowed_chars="ABCDEFGHIJKLMNOPQRSTUVWXYZ' ",
    progressbar=True,
):
    """Writes one SpeechBrain CSV file per LibriSpeech split.

    Each ``<save_folder>/<split>.csv`` has the header
    ``ID,duration,wav,spk_id,wrd`` (duration in seconds, absolute audio
    path, speaker folder name, normalised transcript) and its rows sorted by
    ID. Utterances are left out, with a warning naming the file, when (in
    this order) the normalised transcript is empty or has characters outside
    ``allowed_chars``, or the audio cannot be read, has no samples, has
    another sample rate than ``sample_rate``, or lasts less than
    ``min_duration`` or more than ``max_duration`` seconds.

    Nothing is done when ``<save_folder>/prepare_options.json`` shows that
    the same options were used on the same input files (same names, sizes
    and modification times) and all CSV files exist.

    Arguments
    ---------
    data_folder : str
        The folder that contains the split folders, e.g.
        ``/data/LibriSpeech`` (which holds ``train-clean-100``, ...).
    save_folder : str
        Where the CSV files and ``prepare_options.json`` are written.
    tr_splits : sequence of str
        Training splits, e.g. ``["train-clean-100", "train-clean-360"]``.
    dev_splits : sequence of str
        Validation splits.
    te_splits : sequence of str
        Test splits.
    merge_lst : sequence of str, optional
        Splits (among those above) to concatenate, in this order, into one
        more CSV file named after ``merge_name``.
    merge_name : str, optional
        Name of the merged CSV file, with or without the ``.csv`` suffix
        (``"train"`` and ``"train.csv"`` both give ``train.csv``). Required
        when ``merge_lst`` is not empty.
    skip_prep : bool
        If True, nothing is checked or written; the CSV paths are returned
        (with the report of the last preparation, if any).
    sample_rate : int
        The sample rate every kept audio file must have, in Hz.
    min_duration : float
        Shortest kept utterance in seconds (shorter ones are too short for
        the convolutional front end of the SSL models).
    max_duration : float
        Longest kept utterance in seconds.
    allowed_chars : str
        Every character a kept (normalised) transcript may contain.
    progressbar : bool
        Show a progress bar while the audio files of a split are checked
        (splits of ``PROGRESS_BAR_MIN_FILES`` files or more); the recipe
        passes False under ``--noprogressbar``.

    Returns
    -------
    dict
        Split name (and merged file name without ``.csv``) -> CSV path, and
        ``"report"`` -> ``{split: {"total": int, "kept": int,
        "skipped": {reason: int for reason in SKIP_REASONS}}}``.

    Raises
    ------
    FileNotFoundError
        If a split folder does not exist under ``data_folder``.
    ValueError
        If audio files and transcript lines do not match, if utterance IDs
        repeat, or if the arguments are inconsistent.

    Example
    -------
    >>> import shutil, tempfile
    >>> import numpy
    >>> root = tempfile.mkdtemp()
    >>> chapter = os.path.join(root, "LibriSpeech", "dev-clean", "19", "198")
    >>> os.makedirs(chapter)
    >>> wav = os.path.join(chapter, "19-198-0000.flac")
    >>> soundfile.write(wav, numpy.zeros(8000), 16000)
    >>> with open(os.path.join(chapter, "19-198.trans.txt"), "w") as f:
    ...     _ = f.write("19-198-0000 HELLO WORLD\\n")
    >>> out = prepare_librispeech(
    ...     os.path.join(root, "LibriSpeech"),
    ...     os.path.join(root, "save"),
    ...     tr_splits=[],
    ...     dev_splits=["dev-clean"],
    ...     te_splits=[],
    ... )
    >>> out["report"]["dev-clean"]["kept"]
    1
    >>> with open(out["dev-clean"]) as f:
    ...     print(f.read().splitlines()[1].replace(wav, "WAV"))
    19-198-0000,0.5,WAV,19,HELLO WORLD
    >>> shutil.rmtree(root)
    """
    splits = _unique(
        _as_list(tr_splits) + _as_list(dev_splits) + _as_list(te_splits)
    )
    if not splits:
        raise ValueError(
            "No split to prepare: tr_splits, dev_splits and te_splits are "
            "all empty."
        )
    merge_splits = _as_list(merge_lst)
    merge_file = _merge_file_name(merge_splits, merge_name, splits)
    _check_limits(sample_rate, min_duration, max_duration, allowed_chars)

    csv_paths = {
        split: os.path.join(save_folder, split + ".csv") for split in splits
    }
    if merge_file is not None:
        csv_paths[merge_file[: -len(".csv")]] = os.path.join(
            save_folder, merge_file
        )
    state_path = os.path.join(save_folder, OPTIONS_FILE)

    if skip_prep:
        logger.info("skip_prep is set: LibriSpeech preparation skipped.")
        state = _load_state(state_path)
        return dict(csv_paths, report=(state or {}).get("report", {}))

    data_folder = os.path.abspath(data_folder)
    split_folders = {
        split: _split_folder(data_folder, split) for split in splits
    }
    listings = {
        split: _list_split_files(folder)
        for split, folder in split_folders.items()
    }
    options = {
        "data_folder": data_folder,
        "splits": splits,
        "merge_lst": merge_splits,
        "merge_file": merge_file,
        "sample_rate": sample_rate,
        "min_duration": min_duration,
        "max_duration": max_duration,
        "allowed_chars": allowed_chars,
    }
    fingerprints = {
        split: _fingerprint(listing["stats"], split_folders[split])
        for split, listing in listings.items()
    }

    state = _load_state(state_path)
    if _is_done(state, options, fingerprints, csv_paths.values()):
        logger.info(
            "LibriSpeech already prepared in %s with the same options and "
            "input files: nothing to do.",
            save_folder,
        )
        return dict(csv_paths, report=state["report"])

    if state is not None:
        logger.info(
            "LibriSpeech options or input files changed since the last "
            "preparation in %s: preparing again.",
            save_folder,
        )
        os.remove(state_path)

    utterances = {}
    for split in splits:
        transcripts = _read_transcripts(listings[split]["transcripts"])
        _check_consistency(
            split, split_folders[split], listings[split]["audio"], transcripts
        )
        utterances[split] = _pair_utterances(
            listings[split]["audio"], transcripts
        )

    os.makedirs(save_folder, exist_ok=True)
    limits = {
        "sample_rate": sample_rate,
        "min_duration": min_duration,
        "max_duration": max_duration,
        "allowed_chars": frozenset(allowed_chars),
    }
    rows = {}
    report = {}
    for split in splits:
        rows[split], report[split] = _prepare_split(
            split, utterances[split], limits, progressbar
        )
        _write_csv(csv_paths[split], rows[split])

    if merge_file is not None:
        merged = [row for split in merge_splits for row in rows[split]]
        _write_csv(os.path.join(save_folder, merge_file), merged)
        logger.info(
            "Merged %s into %s (%d utterances).",
            ", ".join(merge_splits),
            merge_file,
            len(merged),
        )

    _save_state(
        state_path,
        {
            "version": _STATE_VERSION,
            "options": options,
            "fingerprints": fingerprints,
            "report": report,
        },
    )
    return dict(csv_paths, report=report)


def _as_list(splits):
    """Returns ``splits`` as a list (a lone string is one split)."""
    if splits is None:
        return []
    if isinstance(splits, str):
        return [splits]
    return list(splits)


def _unique(items):
    """Returns ``items`` without repeats, first occurrences kept in order."""
    return list(dict.fromkeys(items))


def _merge_file_name(merge_splits, merge_name, splits):
    """Returns the merged CSV file name (``None`` without merge)."""
    if not merge_splits:
        return None
    if not merge_name:
        raise ValueError(
            f"merge_lst={merge_splits} is given but merge_name is not: set "
            "merge_name to the name of the merged CSV file, e.g. 'train'."
        )
    unknown = [split for split in merge_splits if split not in splits]
    if unknown:
        raise ValueError(
            f"merge_lst names split(s) {unknown} that are not prepared: add "
            "them to tr_splits, dev_splits or te_splits (prepared: "
            f"{splits})."
        )
    merge_file = merge_name
    if not merge_file.endswith(".csv"):
        merge_file += ".csv"
    if merge_file in {split + ".csv" for split in splits}:
        raise ValueError(
            f"merge_name '{merge_name}' would overwrite the CSV file of a "
            "split: choose another name."
        )
    return merge_file


def _check_limits(sample_rate, min_duration, max_duration, allowed_chars):
    """Raises ``ValueError`` for limits that would keep no utterance."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}.")
    if min_duration < 0 or max_duration < min_duration:
        raise ValueError(
            "Expected 0 <= min_duration <= max_duration, got "
            f"min_duration={min_duration}, max_duration={max_duration}."
        )
    if not allowed_chars:
        raise ValueError("allowed_chars is empty: no transcript would pass.")


def _split_folder(data_folder, split):
    """Returns the folder of ``split``; raises if it does not exist."""
    folder = os.path.join(data_folder, split)
    if os.path.isdir(folder):
        return folder
    message = (
        f"LibriSpeech split folder not found: {folder}. Expected data_folder "
        f"({data_folder}) to contain one folder per split, laid out as "
        f"{split}/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac; did you "
        f"point data_folder at the folder that contains {split}?"
    )
    nested = os.path.join(data_folder, "LibriSpeech", split)
    if os.path.isdir(nested):
        message += (
            f" It exists as {nested}: set data_folder to "
            f"{os.path.dirname(nested)}."
        )
    raise FileNotFoundError(message)


def _list_split_files(split_folder):
    """Lists the audio and transcript files of a split, with their stats.

    Hidden files (names starting with ``.``) are ignored.

    Returns
    -------
    dict
        ``"audio"``: list of audio paths, ``"transcripts"``: list of
        transcript paths, ``"stats"``: list of ``(path, size, mtime_ns)``
        for all of them; all sorted by path.
    """
    audio, transcripts, stats = [], [], []
    for folder, subfolders, files in os.walk(split_folder):
        subfolders.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            if name.endswith(AUDIO_SUFFIX):
                audio.append(path)
            elif name.endswith(TRANSCRIPT_SUFFIX):
                transcripts.append(path)
            else:
                continue
            info = os.stat(path)
            stats.append((path, info.st_size, info.st_mtime_ns))
    return {"audio": audio, "transcripts": transcripts, "stats": stats}


def _fingerprint(stats, split_folder):
    """Summarises file stats as a file count and a SHA-256 digest."""
    digest = hashlib.sha256()
    for path, size, mtime_ns in sorted(stats):
        relative = os.path.relpath(path, split_folder)
        digest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode())
    return {"files": len(stats), "sha256": digest.hexdigest()}


def _load_state(state_path):
    """Reads ``prepare_options.json``; ``None`` if absent or unreadable."""
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _save_state(state_path, state):
    """Writes ``prepare_options.json`` (atomically)."""
    temporary = state_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
    os.replace(temporary, state_path)


def _is_done(state, options, fingerprints, csv_paths):
    """Whether a stored state matches the current options and inputs."""
    return (
        state is not None
        and state.get("version") == _STATE_VERSION
        and state.get("options") == options
        and state.get("fingerprints") == fingerprints
        and isinstance(state.get("report"), dict)
        and all(os.path.isfile(path) for path in csv_paths)
    )


def _read_transcripts(transcript_paths):
    """Reads transcript files.

    Lines end at ``\\n``, ``\\r`` or ``\\r\\n``; other unicode line
    separators count as whitespace inside a transcript.

    Returns
    -------
    list of tuple
        ``(utterance id, raw transcript, transcript path)`` per non-blank
        line, in file order.
    """
    lines = []
    for path in transcript_paths:
        try:
            with open(path, encoding="utf-8") as handle:
                content = handle.read().split("\n")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"Cannot decode transcript file {path} as UTF-8 ({error}): "
                "re-extract it from the LibriSpeech archive."
            ) from error
        for line in content:
            fields = line.split(maxsplit=1)
            if fields:
                text = fields[1] if len(fields) > 1 else ""
                lines.append((fields[0], text, path))
    return lines


def _check_consistency(split, split_folder, audio_paths, transcripts):
    """Raises ``ValueError`` unless audio files and transcripts match 1:1.

    An audio file ``<id>.flac`` matches the line ``<id> ...`` of a
    transcript file in the same folder.
    """
    audio_keys = Counter(_audio_key(path) for path in audio_paths)
    line_keys = Counter(
        (os.path.dirname(path), utt_id) for utt_id, _, path in transcripts
    )
    no_transcript = [
        path for path in audio_paths if _audio_key(path) not in line_keys
    ]
    no_audio = [
        f"{utt_id} (in {path})"
        for utt_id, _, path in transcripts
        if (os.path.dirname(path), utt_id) not in audio_keys
    ]
    repeated_lines = sorted(
        f"{utt_id} (in {os.path.join(folder, '*' + TRANSCRIPT_SUFFIX)})"
        for (folder, utt_id), count in line_keys.items()
        if count > 1
    )
    id_counts = Counter(
        os.path.basename(path)[: -len(AUDIO_SUFFIX)] for path in audio_paths
    )
    repeated_ids = sorted(
        path
        for path in audio_paths
        if id_counts[os.path.basename(path)[: -len(AUDIO_SUFFIX)]] > 1
    )
    problems = [
        _listing("audio file(s) without a transcript line", no_transcript),
        _listing("transcript line(s) without an audio file", no_audio),
        _listing("repeated transcript line(s)", repeated_lines),
        _listing("audio file(s) with a repeated utterance ID", repeated_ids),
    ]
    problems = [problem for problem in problems if problem]
    if not audio_paths:
        problems.append(f"no {AUDIO_SUFFIX} file found under {split_folder}")
    if problems:
        raise ValueError(
            f"LibriSpeech split '{split}' ({split_folder}) is inconsistent: "
            + "; ".join(problems)
            + ". Every <speaker>-<chapter>-<utt>.flac needs exactly one line "
            "'<speaker>-<chapter>-<utt> TRANSCRIPT' in the "
            "<speaker>-<chapter>.trans.txt of its folder, and every line "
            "needs its audio file: re-extract the split or remove the "
            "extra files."
        )


def _audio_key(path):
    """``(folder, utterance id)`` of an audio file."""
    return os.path.dirname(path), os.path.basename(path)[: -len(AUDIO_SUFFIX)]


def _listing(what, items):
    """Describes a problem with its first few items and their count."""
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    if more > 0:
        shown += f", ... ({more} more)"
    return f"{len(items)} {what}: {shown}"


def _pair_utterances(audio_paths, transcripts):
    """Returns ``(utterance id, audio path, raw transcript, transcript
    path)`` per audio file, for consistent input."""
    by_key = {
        (os.path.dirname(path), utt_id): (text, path)
        for utt_id, text, path in transcripts
    }
    utterances = []
    for audio_path in audio_paths:
        folder, utt_id = _audio_key(audio_path)
        text, transcript_path = by_key[(folder, utt_id)]
        utterances.append((utt_id, audio_path, text, transcript_path))
    return utterances


def _audio_info(path):
    """Returns ``(frames, sample rate)`` of an audio file, or the error
    message if it cannot be read.

    Besides the header, only the last ``TAIL_CHECK_FRAMES`` samples (and
    what seeking to them reads) are decoded: a truncated or damaged FLAC (an interrupted download or
    extraction) has a valid header and would otherwise only fail when
    training reads it, in the middle of an epoch."""
    try:
        with soundfile.SoundFile(path) as audio:
            frames, rate = int(audio.frames), int(audio.samplerate)
            expected = min(frames, TAIL_CHECK_FRAMES)
            if expected:
                audio.seek(frames - expected)
                decoded = len(audio.read(expected))
                if decoded != expected:
                    raise RuntimeError(
                        f"the header announces {frames} samples but only "
                        f"{frames - expected + decoded} can be decoded"
                    )
        return (frames, rate), None
    except Exception as error:  # any failure means an unusable file
        return None, f"{type(error).__name__}: {error}"


def _transcript_problem(text, allowed_chars):
    """Returns ``(reason, detail)`` for an unusable normalised transcript,
    or ``None``."""
    if not text:
        return "empty_transcript", "the transcript is empty"
    outside = sorted(set(text) - allowed_chars)
    if outside:
        return (
            "bad_characters",
            f"the transcript has characters outside allowed_chars: {outside}",
        )
    return None


def _audio_problem(frames, rate, limits):
    """Returns ``(reason, detail)`` for unusable audio, or ``None``."""
    if frames <= 0:
        return "zero_length_audio", "the audio has no samples"
    if rate != limits["sample_rate"]:
        return (
            "wrong_sample_rate",
            f"sample rate {rate} Hz, expected {limits['sample_rate']} Hz",
        )
    duration = frames / rate
    if duration < limits["min_duration"]:
        return (
            "too_short",
            f"{duration:.4f} s is shorter than min_duration="
            f"{limits['min_duration']} s",
        )
    if duration > limits["max_duration"]:
        return (
            "too_long",
            f"{duration:.4f} s is longer than max_duration="
            f"{limits['max_duration']} s",
        )
    return None


def _prepare_split(split, utterances, limits, progressbar=True):
    """Checks the utterances of one split (with a progress bar if asked for
    and the split is large).

    Returns
    -------
    rows : list of tuple
        One CSV row per kept utterance, sorted by ID.
    report : dict
        ``{"total": int, "kept": int, "skipped": {reason: int}}``.
    """
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    rows = []
    kept_seconds = 0.0
    for utt_id, audio_path, raw_text, transcript_path in tqdm(
        utterances,
        desc=f"Preparing {split}",
        disable=not progressbar or len(utterances) < PROGRESS_BAR_MIN_FILES,
    ):
        text = normalize_transcript(raw_text)
        problem = _transcript_problem(text, limits["allowed_chars"])
        if problem is not None:
            problem = (problem[0], f"{problem[1]} (in {transcript_path})")
        else:
            info, error = _audio_info(audio_path)
            if info is None:
                problem = ("unreadable_audio", f"cannot read it ({error})")
            else:
                problem = _audio_problem(*info, limits)
        if problem is not None:
            reason, detail = problem
            skipped[reason] += 1
            logger.warning("Skipping %s: %s: %s.", audio_path, reason, detail)
            continue
        frames, rate = info
        kept_seconds += frames / rate
        speaker = os.path.basename(os.path.dirname(os.path.dirname(audio_path)))
        rows.append(
            (utt_id, str(round(frames / rate, 6)), audio_path, speaker, text)
        )
    rows.sort()
    report = {"total": len(utterances), "kept": len(rows), "skipped": skipped}
    reasons = ", ".join(
        f"{reason}={count}" for reason, count in skipped.items() if count
    )
    logger.info(
        "%s: kept %d of %d utterances (%.2f h); skipped %d%s.",
        split,
        len(rows),
        len(utterances),
        kept_seconds / 3600,
        len(utterances) - len(rows),
        f" ({reasons})" if reasons else "",
    )
    return rows, report


def _write_csv(path, rows):
    """Writes a SpeechBrain CSV file (atomically)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    os.replace(temporary, path)
