"""Tests for the LibriSpeech data preparation of the SPG recipe.

Every test builds a tiny LibriSpeech tree (a few ~0.3 s FLAC files) in a
temporary folder.
"""

import csv
import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

RECIPE_FOLDER = (
    Path(__file__).resolve().parents[1] / "recipes" / "LibriSpeech" / "spg"
)
sys.path.insert(0, str(RECIPE_FOLDER))

from librispeech_prepare import (  # noqa: E402
    SKIP_REASONS,
    normalize_transcript,
    prepare_librispeech,
)


def forget_unimportable_lazy_modules():
    """Removes SpeechBrain's lazy aliases that cannot be imported here.

    ``import speechbrain`` puts lazy aliases of old module paths into
    ``sys.modules``, some of them for optional dependencies that are not
    installed (k2, flair, numba). Hypothesis reads ``__file__`` of every
    module in ``sys.modules`` when it runs a property-based test; on such an
    alias this triggers the import, whose ``ImportError`` aborts the whole
    session. Importing them can only fail, so they are dropped.
    """
    from speechbrain.utils.importutils import LazyModule

    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            target = module.target
            if module.package is not None:
                target = "." + target
            try:
                importlib.import_module(target, module.package)
            except ImportError:
                del sys.modules[name]


forget_unimportable_lazy_modules()

RATE = 16000
ONLY_DEV = dict(tr_splits=[], dev_splits=["dev-clean"], te_splits=[])


def write_audio(path, seconds=0.3, rate=RATE, frames=None, seed=0):
    """Writes mono noise as FLAC; zero frames give a header-only file.

    soundfile writes nothing at all for an empty FLAC (and libsndfile can
    not read a FLAC stream without frames), so a readable file with zero
    samples is written as WAV content under the ``.flac`` name: libsndfile
    recognises the format from the content.
    """
    if frames is None:
        frames = int(round(seconds * rate))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if frames == 0:
        soundfile.write(path, np.zeros(0, dtype="float32"), rate, format="WAV")
        return
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, frames)
    soundfile.write(path, noise.astype("float32"), rate, format="FLAC")


def add_utterance(data_folder, split, utt_id, text, audio=True, **audio_args):
    """Adds ``<utt_id>.flac`` (unless ``audio`` is False) and its
    transcript line (unless ``text`` is None); returns the audio path."""
    speaker, chapter, _ = utt_id.split("-")
    folder = os.path.join(data_folder, split, speaker, chapter)
    os.makedirs(folder, exist_ok=True)
    audio_path = os.path.join(folder, utt_id + ".flac")
    if audio:
        write_audio(audio_path, **audio_args)
    if text is not None:
        transcript = os.path.join(folder, f"{speaker}-{chapter}.trans.txt")
        with open(transcript, "a", encoding="utf-8") as handle:
            handle.write(f"{utt_id} {text}\n")
    return audio_path


def read_rows(csv_path):
    """Returns the rows of a CSV file, header included."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def assert_rows(csv_path, expected):
    """Checks a CSV file against ``(ID, seconds, wav, spk_id, wrd)``
    tuples, durations within 1e-3 s."""
    rows = read_rows(csv_path)
    assert rows[0] == ["ID", "duration", "wav", "spk_id", "wrd"]
    assert len(rows) - 1 == len(expected)
    for row, (utt_id, seconds, wav, speaker, words) in zip(rows[1:], expected):
        assert [row[0], row[2], row[3], row[4]] == [utt_id, wav, speaker, words]
        assert float(row[1]) == pytest.approx(seconds, abs=1e-3)


def no_skips(total):
    """The report of a split where all ``total`` utterances are kept."""
    return {
        "total": total,
        "kept": total,
        "skipped": dict.fromkeys(SKIP_REASONS, 0),
    }


@pytest.fixture
def small_corpus(tmp_path):
    """dev-clean with three utterances of two speakers, written unsorted."""
    data = tmp_path / "LibriSpeech"
    wavs = {
        "84-121-0001": add_utterance(
            data, "dev-clean", "84-121-0001", "  it's  late\tnow ", seconds=0.5
        ),
        "19-198-0001": add_utterance(
            data, "dev-clean", "19-198-0001", "HELLO WORLD", seconds=0.25
        ),
        "19-198-0000": add_utterance(
            data, "dev-clean", "19-198-0000", "good morning", seconds=0.3
        ),
    }
    return data, wavs


def test_normal_run_writes_exact_csv(small_corpus, tmp_path):
    data, wavs = small_corpus
    save = tmp_path / "save"
    out = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert out["dev-clean"] == str(save / "dev-clean.csv")
    assert out["report"] == {"dev-clean": no_skips(3)}
    assert_rows(
        out["dev-clean"],
        [
            ("19-198-0000", 0.3, wavs["19-198-0000"], "19", "GOOD MORNING"),
            ("19-198-0001", 0.25, wavs["19-198-0001"], "19", "HELLO WORLD"),
            ("84-121-0001", 0.5, wavs["84-121-0001"], "84", "IT'S LATE NOW"),
        ],
    )
    assert all(os.path.isabs(wav) for wav in wavs.values())
    assert (save / "prepare_options.json").is_file()


def test_rows_are_sorted_by_id_not_by_folder(tmp_path):
    data = tmp_path / "LibriSpeech"
    rows = []
    for folder, utt_id in (("1/1", "2-1-0000"), ("3/1", "10-1-0000")):
        chapter = data / "dev-clean" / folder
        audio = str(chapter / f"{utt_id}.flac")
        write_audio(audio, seconds=0.2)
        transcript = chapter / f"{folder.replace('/', '-')}.trans.txt"
        transcript.write_text(f"{utt_id} WORDS\n", encoding="utf-8")
        rows.append((utt_id, 0.2, audio, folder.split("/")[0], "WORDS"))
    out = prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    assert_rows(out["dev-clean"], rows[::-1])


def test_csv_is_read_by_speechbrain(small_corpus, tmp_path):
    from speechbrain.dataio.dataio import load_data_csv

    data, wavs = small_corpus
    out = prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    loaded = load_data_csv(out["dev-clean"])
    assert sorted(loaded) == sorted(wavs)
    assert loaded["84-121-0001"]["duration"] == pytest.approx(0.5)
    assert loaded["84-121-0001"]["wav"] == wavs["84-121-0001"]
    assert loaded["84-121-0001"]["wrd"] == "IT'S LATE NOW"


def test_relative_data_folder_gives_absolute_wav_paths(
    small_corpus, tmp_path, monkeypatch
):
    data, wavs = small_corpus
    monkeypatch.chdir(tmp_path)
    out = prepare_librispeech("LibriSpeech", "save", **ONLY_DEV)
    rows = read_rows(out["dev-clean"])
    assert [row[2] for row in rows[1:]] == sorted(wavs.values())


@pytest.mark.parametrize("merge_name", ["train", "train.csv"])
def test_merge_concatenates_splits_in_order(tmp_path, merge_name):
    data = tmp_path / "LibriSpeech"
    a = add_utterance(data, "train-clean-360", "7-1-0000", "B", seconds=0.3)
    b = add_utterance(data, "train-clean-100", "9-2-0001", "C", seconds=0.4)
    c = add_utterance(data, "train-clean-100", "9-2-0000", "A", seconds=0.2)
    out = prepare_librispeech(
        str(data),
        str(tmp_path / "save"),
        tr_splits=["train-clean-100", "train-clean-360"],
        dev_splits=[],
        te_splits=[],
        merge_lst=["train-clean-100", "train-clean-360"],
        merge_name=merge_name,
    )
    assert out["train"] == str(tmp_path / "save" / "train.csv")
    assert_rows(
        out["train"],
        [
            ("9-2-0000", 0.2, c, "9", "A"),
            ("9-2-0001", 0.4, b, "9", "C"),
            ("7-1-0000", 0.3, a, "7", "B"),
        ],
    )
    assert sorted(out["report"]) == ["train-clean-100", "train-clean-360"]


def test_merge_arguments_are_checked(small_corpus, tmp_path):
    data, _ = small_corpus
    save = str(tmp_path / "save")
    with pytest.raises(ValueError, match="merge_name is not"):
        prepare_librispeech(
            str(data), save, merge_lst=["dev-clean"], **ONLY_DEV
        )
    with pytest.raises(ValueError, match=r"\['test-clean'\] that are not"):
        prepare_librispeech(
            str(data),
            save,
            merge_lst=["test-clean"],
            merge_name="x",
            **ONLY_DEV,
        )
    with pytest.raises(ValueError, match="would overwrite"):
        prepare_librispeech(
            str(data),
            save,
            merge_lst=["dev-clean"],
            merge_name="dev-clean",
            **ONLY_DEV,
        )


def test_second_call_does_nothing(small_corpus, tmp_path, caplog):
    data, _ = small_corpus
    save = tmp_path / "save"
    first = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    old_ns = 1_000_000_000_000_000_000
    for name in ("dev-clean.csv", "prepare_options.json"):
        os.utime(save / name, ns=(old_ns, old_ns))
    with caplog.at_level(logging.INFO):
        second = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert second == first
    assert "already prepared" in caplog.text
    for name in ("dev-clean.csv", "prepare_options.json"):
        assert (save / name).stat().st_mtime_ns == old_ns


def test_progressbar_false_hides_the_bar_of_large_splits(
    small_corpus, tmp_path, monkeypatch, capsys
):
    """A split as large as ``PROGRESS_BAR_MIN_FILES`` shows a bar unless
    ``progressbar=False`` (the recipe's --noprogressbar); the option is not
    part of what decides whether to prepare again."""
    import librispeech_prepare

    monkeypatch.setattr(librispeech_prepare, "PROGRESS_BAR_MIN_FILES", 3)
    data, _ = small_corpus
    save = tmp_path / "save"
    quiet = prepare_librispeech(
        str(data), str(save), progressbar=False, **ONLY_DEV
    )
    assert "Preparing dev-clean" not in capsys.readouterr().err
    assert prepare_librispeech(str(data), str(save), **ONLY_DEV) == quiet
    shown = prepare_librispeech(str(data), str(tmp_path / "again"), **ONLY_DEV)
    assert "Preparing dev-clean: 100%" in capsys.readouterr().err
    assert shown["report"] == quiet["report"]


def test_redo_when_a_transcript_changes(small_corpus, tmp_path, caplog):
    data, _ = small_corpus
    save = tmp_path / "save"
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    transcript = data / "dev-clean" / "84" / "121" / "84-121.trans.txt"
    transcript.write_text("84-121-0001 GOOD NIGHT\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        out = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert "preparing again" in caplog.text
    assert read_rows(out["dev-clean"])[3][4] == "GOOD NIGHT"


def test_redo_when_only_an_mtime_changes(small_corpus, tmp_path):
    data, wavs = small_corpus
    save = tmp_path / "save"
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    old_ns = 1_000_000_000_000_000_000
    os.utime(save / "dev-clean.csv", ns=(old_ns, old_ns))
    os.utime(wavs["19-198-0000"], ns=(old_ns, old_ns))
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert (save / "dev-clean.csv").stat().st_mtime_ns != old_ns


def test_redo_when_an_audio_file_is_added(small_corpus, tmp_path):
    data, _ = small_corpus
    save = tmp_path / "save"
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    add_utterance(data, "dev-clean", "19-198-0002", "MORE", seconds=0.3)
    out = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert out["report"] == {"dev-clean": no_skips(4)}
    assert len(read_rows(out["dev-clean"])) == 5


def test_redo_when_options_change(small_corpus, tmp_path):
    data, _ = small_corpus
    save = tmp_path / "save"
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    out = prepare_librispeech(
        str(data), str(save), max_duration=0.4, **ONLY_DEV
    )
    assert out["report"]["dev-clean"]["skipped"]["too_long"] == 1
    ids = [row[0] for row in read_rows(out["dev-clean"])[1:]]
    assert ids == ["19-198-0000", "19-198-0001"]


def test_redo_when_a_csv_is_missing(small_corpus, tmp_path):
    data, _ = small_corpus
    save = tmp_path / "save"
    prepare_librispeech(str(data), str(save), **ONLY_DEV)
    os.remove(save / "dev-clean.csv")
    out = prepare_librispeech(str(data), str(save), **ONLY_DEV)
    assert len(read_rows(out["dev-clean"])) == 4


def test_skip_prep_touches_nothing(tmp_path):
    save = tmp_path / "save"
    out = prepare_librispeech(
        str(tmp_path / "nowhere"), str(save), skip_prep=True, **ONLY_DEV
    )
    assert out == {"dev-clean": str(save / "dev-clean.csv"), "report": {}}
    assert not save.exists()


def test_missing_split_folder_message(small_corpus):
    data, _ = small_corpus
    with pytest.raises(FileNotFoundError) as error:
        prepare_librispeech(
            str(data), str(data.parent / "save"), te_splits=["test-other"]
        )
    folder = data / "train-clean-100"
    assert str(error.value) == (
        f"LibriSpeech split folder not found: {folder}. Expected data_folder "
        f"({data}) to contain one folder per split, laid out as "
        "train-clean-100/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac; "
        "did you point data_folder at the folder that contains "
        "train-clean-100?"
    )


def test_missing_split_folder_suggests_nested_folder(small_corpus):
    data, _ = small_corpus
    with pytest.raises(FileNotFoundError) as error:
        prepare_librispeech(
            str(data.parent), str(data.parent / "s"), **ONLY_DEV
        )
    assert str(error.value).endswith(
        f" It exists as {data / 'dev-clean'}: set data_folder to {data}."
    )


def test_audio_without_transcript_line(small_corpus, tmp_path):
    data, _ = small_corpus
    orphan = add_utterance(data, "dev-clean", "19-198-0007", None)
    with pytest.raises(ValueError) as error:
        prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    message = str(error.value)
    assert message.startswith(
        f"LibriSpeech split 'dev-clean' ({data / 'dev-clean'}) is "
        f"inconsistent: 1 audio file(s) without a transcript line: {orphan}. "
        "Every <speaker>-<chapter>-<utt>.flac needs exactly one line"
    )
    assert not (tmp_path / "save" / "dev-clean.csv").exists()


def test_transcript_line_without_audio(small_corpus, tmp_path):
    data, _ = small_corpus
    add_utterance(data, "dev-clean", "84-121-0009", "LOST", audio=False)
    with pytest.raises(ValueError) as error:
        prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    transcript = data / "dev-clean" / "84" / "121" / "84-121.trans.txt"
    assert (
        "inconsistent: 1 transcript line(s) without an audio file: "
        f"84-121-0009 (in {transcript}). Every" in str(error.value)
    )


def test_inconsistency_lists_first_five_and_total(small_corpus, tmp_path):
    data, _ = small_corpus
    orphans = [
        add_utterance(data, "dev-clean", f"5-6-000{i}", None) for i in range(7)
    ]
    with pytest.raises(ValueError) as error:
        prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    assert (
        "7 audio file(s) without a transcript line: "
        + ", ".join(orphans[:5])
        + ", ... (2 more). "
    ) in str(error.value)


def test_both_kinds_of_mismatch_are_reported_together(small_corpus, tmp_path):
    data, _ = small_corpus
    orphan = add_utterance(data, "dev-clean", "19-198-0005", None)
    add_utterance(data, "dev-clean", "19-198-0006", "X", audio=False)
    with pytest.raises(ValueError) as error:
        prepare_librispeech(str(data), str(tmp_path / "save"), **ONLY_DEV)
    message = str(error.value)
    assert f"1 audio file(s) without a transcript line: {orphan}; " in message
    assert "1 transcript line(s) without an audio file: 19-198-0006" in message


def test_each_skip_reason_is_counted(small_corpus, tmp_path, caplog):
    data, wavs = small_corpus
    split = "dev-clean"
    bad = {
        "empty_transcript": add_utterance(data, split, "3-4-0000", "   "),
        "bad_characters": add_utterance(data, split, "3-4-0001", "ROOM 101"),
        "unreadable_audio": add_utterance(data, split, "3-4-0002", "CORRUPT"),
        "zero_length_audio": add_utterance(
            data, split, "3-4-0003", "NOTHING", frames=0
        ),
        "wrong_sample_rate": add_utterance(
            data, split, "3-4-0004", "PHONE", rate=8000
        ),
        "too_short": add_utterance(data, split, "3-4-0005", "HI", seconds=0.05),
        "too_long": add_utterance(data, split, "3-4-0006", "LONG", seconds=1.5),
    }
    random_bytes = np.random.default_rng(1).integers(0, 256, 4000)
    Path(bad["unreadable_audio"]).write_bytes(random_bytes.astype("uint8"))
    with caplog.at_level(logging.INFO):
        out = prepare_librispeech(
            str(data), str(tmp_path / "save"), max_duration=1.0, **ONLY_DEV
        )
    assert out["report"] == {
        split: {
            "total": 10,
            "kept": 3,
            "skipped": dict.fromkeys(SKIP_REASONS, 1),
        }
    }
    ids = [row[0] for row in read_rows(out[split])[1:]]
    assert ids == sorted(wavs)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    ]
    assert len(warnings) == 7
    for reason, path in bad.items():
        assert sum(f"Skipping {path}: {reason}: " in w for w in warnings) == 1
    assert (
        "dev-clean: kept 3 of 10 utterances (0.00 h); skipped 7 "
        "(empty_transcript=1, bad_characters=1, unreadable_audio=1, "
        "zero_length_audio=1, wrong_sample_rate=1, too_short=1, too_long=1)."
    ) in caplog.text


def test_allowed_chars_apply_after_normalisation(tmp_path):
    data = tmp_path / "LibriSpeech"
    add_utterance(data, "dev-clean", "1-2-0000", "abc", seconds=0.3)
    add_utterance(data, "dev-clean", "1-2-0001", "ABD", seconds=0.3)
    out = prepare_librispeech(
        str(data), str(tmp_path / "save"), allowed_chars="ABC", **ONLY_DEV
    )
    assert out["report"]["dev-clean"]["skipped"]["bad_characters"] == 1
    assert [row[4] for row in read_rows(out["dev-clean"])[1:]] == ["ABC"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello world", "HELLO WORLD"),
        ("  a \t b\n\nc  ", "A B C"),
        ("it's", "IT'S"),
        ("", ""),
        (" \u00a0\u2003 ", ""),
        ("stra\u00dfe", "STRASSE"),
    ],
)
def test_normalize_transcript_examples(text, expected):
    assert normalize_transcript(text) == expected


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=40))
def test_normalize_transcript_properties(text):
    normalized = normalize_transcript(text)
    assert normalized == normalized.strip()
    assert "  " not in normalized
    assert all(not c.isspace() or c == " " for c in normalized)
    assert normalize_transcript(normalized) == normalized
    assert "".join(normalized.split()) == "".join(text.upper().split())


# Transcripts: arbitrary unicode without line breaks (one line per
# utterance), or, twice as likely, text of lower- and upper-case letters,
# apostrophes and whitespace so that many rows are kept.
ALLOWED_LIKE = st.text(alphabet="abcXYZ' \t", max_size=20)
TRANSCRIPTS = st.one_of(
    st.text(
        alphabet=st.characters(
            exclude_categories=("Cs",), exclude_characters="\n\r"
        ),
        max_size=20,
    ),
    ALLOWED_LIKE,
    ALLOWED_LIKE,
)
# Audio lengths in samples at 16 kHz: anything up to 0.6 s, or, as likely,
# lengths between the 0.1 s and 0.5 s limits of the test.
FRAMES = st.one_of(
    st.integers(min_value=0, max_value=9600),
    st.integers(min_value=1600, max_value=8000),
)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(TRANSCRIPTS, FRAMES),
        min_size=1,
        max_size=4,
    )
)
def test_random_transcripts_and_lengths(utterances):
    min_duration, max_duration = 0.1, 0.5
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "LibriSpeech")
        expected_kept = {}
        for index, (text, frames) in enumerate(utterances):
            utt_id = f"1-2-{index:04d}"
            add_utterance(data, "dev-clean", utt_id, text, frames=frames)
            words = normalize_transcript(text)
            if (
                words
                and set(words) <= allowed
                and min_duration <= frames / RATE <= max_duration
            ):
                expected_kept[utt_id] = words
        out = prepare_librispeech(
            data,
            os.path.join(tmp, "save"),
            min_duration=min_duration,
            max_duration=max_duration,
            **ONLY_DEV,
        )
        rows = read_rows(out["dev-clean"])[1:]
    report = out["report"]["dev-clean"]
    assert report["total"] == len(utterances)
    assert report["kept"] + sum(report["skipped"].values()) == len(utterances)
    assert report["kept"] == len(rows)
    assert {row[0]: row[4] for row in rows} == expected_kept
    for utt_id, duration, _, speaker, words in rows:
        assert set(words) <= allowed
        assert min_duration <= float(duration) <= max_duration
        frames = utterances[int(utt_id.split("-")[2])][1]
        assert float(duration) == pytest.approx(frames / RATE, abs=1e-6)
        assert speaker == "1"
