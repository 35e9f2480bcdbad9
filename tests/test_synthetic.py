"""Tests of the synthetic LibriSpeech-layout corpus (eSpeak NG)."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from speechbrain_spg.data import synthetic
from speechbrain_spg.data.synthetic import (
    MANIFEST_NAME,
    SPLITS,
    ESpeakNG,
    generate_corpus,
    generate_sentences,
    plan_corpus,
    speaker_table,
    split_speakers,
    synthesize_text,
    vocabulary,
)

HOURS = 0.003
SEED = 11
UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d{4})$")
TRANSCRIPT_LINE = re.compile(r"^(\d+-\d+-\d{4}) ([A-Z']+(?: [A-Z']+)*)$")
# Fields of SYNTHETIC.json that describe the run, not the corpus.
RUN_FIELDS = ("num_workers", "summary")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny corpus: (its LibriSpeech folder, the returned summary)."""
    out = tmp_path_factory.mktemp("corpus")
    summary = generate_corpus(out, hours=HOURS, seed=SEED, progress=False)
    return os.path.join(out, "LibriSpeech"), summary


def _files(root):
    """Relative path -> bytes of every file under ``root``."""
    contents = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                contents[os.path.relpath(path, root)] = handle.read()
    return contents


def _transcripts(root):
    """Split -> {utterance id: transcript} read from the trans.txt files."""
    result = {}
    for split in SPLITS:
        lines = {}
        for folder, _, names in os.walk(os.path.join(root, split)):
            for name in names:
                if name.endswith(".trans.txt"):
                    with open(os.path.join(folder, name)) as handle:
                        for line in handle.read().splitlines():
                            utt_id, text = line.split(" ", 1)
                            lines[utt_id] = text
        result[split] = lines
    return result


def _speakers(root, split):
    return {int(name) for name in os.listdir(os.path.join(root, split))}


def _corpus_files(root):
    """Files of a corpus without its manifest, plus the manifest without
    run-dependent fields."""
    files = _files(root)
    manifest = json.loads(files.pop(MANIFEST_NAME))
    for field in RUN_FIELDS:
        manifest.pop(field)
    return files, manifest


def test_layout_and_naming(corpus):
    root, _ = corpus
    assert sorted(os.listdir(root)) == sorted([*SPLITS, MANIFEST_NAME])
    for split in SPLITS:
        chapters = 0
        for speaker in os.listdir(os.path.join(root, split)):
            assert speaker.isdigit()
            for chapter in os.listdir(os.path.join(root, split, speaker)):
                assert chapter.isdigit()
                chapters += 1
                names = sorted(
                    os.listdir(os.path.join(root, split, speaker, chapter))
                )
                transcript = f"{speaker}-{chapter}.trans.txt"
                assert transcript in names
                names.remove(transcript)
                assert names
                for name in names:
                    match = UTT_ID.match(name[: -len(".flac")])
                    assert name.endswith(".flac") and match, name
                    assert match.group(1, 2) == (speaker, chapter)
        assert chapters > 0, split


def test_transcripts_match_files_and_plan(corpus):
    root, _ = corpus
    planned = {
        utt.utterance_id: utt.sentence.upper()
        for utt in plan_corpus(HOURS, SEED)
    }
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".trans.txt"):
                continue
            with open(os.path.join(folder, name)) as handle:
                lines = handle.read().splitlines()
            flac_ids = sorted(n[:-5] for n in names if n.endswith(".flac"))
            matches = [TRANSCRIPT_LINE.match(line) for line in lines]
            assert all(matches), lines
            assert sorted(m.group(1) for m in matches) == flac_ids
            for match in matches:
                assert match.group(1).startswith(name[: -len(".trans.txt")])
                found[match.group(1)] = match.group(2)
                assert 4 <= len(match.group(2).split()) <= 16
    assert found == planned


def test_audio_is_16k_mono_flac_and_not_silent(corpus):
    root, summary = corpus
    seconds = dict.fromkeys(SPLITS, 0.0)
    for split in SPLITS:
        for folder, _, names in os.walk(os.path.join(root, split)):
            for name in (n for n in names if n.endswith(".flac")):
                path = os.path.join(folder, name)
                info = soundfile.info(path)
                assert (info.samplerate, info.channels) == (16000, 1)
                assert (info.format, info.subtype) == ("FLAC", "PCM_16")
                audio, _ = soundfile.read(path, dtype="int16")
                assert np.sqrt(np.mean(audio.astype(float) ** 2)) > 300
                assert 0.5 < len(audio) / 16000 < 10
                seconds[split] += len(audio) / 16000
    for split in SPLITS:
        assert summary["splits"][split]["seconds"] == pytest.approx(
            seconds[split], abs=1e-3
        )


def test_summary_counts(corpus):
    root, summary = corpus
    transcripts = _transcripts(root)
    for split in SPLITS:
        info = summary["splits"][split]
        assert info["utterances"] == len(transcripts[split])
        assert info["speakers"] == len(_speakers(root, split))
        assert info["utterances"] >= synthetic.MIN_EVAL_UTTERANCES
    assert summary["utterances"] == sum(
        len(lines) for lines in transcripts.values()
    )
    train_seconds = summary["splits"]["train-clean-100"]["seconds"]
    assert 0.7 * HOURS * 3600 < train_seconds < 1.5 * HOURS * 3600
    assert summary["audio_seconds_per_wall_second"] > 0


def test_no_sentence_shared_between_splits(corpus):
    root, _ = corpus
    texts = {
        split: set(lines.values())
        for split, lines in _transcripts(root).items()
    }
    for i, first in enumerate(SPLITS):
        assert len(texts[first]) == len(_transcripts(root)[first])
        for second in SPLITS[i + 1 :]:
            assert not texts[first] & texts[second], (first, second)


def test_speakers_of_splits(corpus):
    root, _ = corpus
    train = _speakers(root, "train-clean-100")
    assert not _speakers(root, "test-other") & train
    assert _speakers(root, "test-clean") <= train
    assert _speakers(root, "dev-clean") <= train


def test_larger_plan_splits_speakers_and_chapters():
    plan = plan_corpus(6.0, seed=2)
    by_split = {
        split: [u for u in plan if u.split == split] for split in SPLITS
    }
    speakers = {
        split: {u.speaker.speaker_id for u in utts}
        for split, utts in by_split.items()
    }
    seen, unseen = split_speakers(speaker_table())
    assert speakers["train-clean-100"] == {s.speaker_id for s in seen}
    assert speakers["test-other"] == {s.speaker_id for s in unseen}
    assert speakers["test-clean"] <= speakers["train-clean-100"]
    sentences = [u.sentence for u in plan]
    assert len(sentences) == len(set(sentences))
    # About 5 % of the training amount for each evaluation split.
    estimated = {
        split: sum(
            synthetic.estimate_seconds(u.sentence, u.speaker) for u in utts
        )
        for split, utts in by_split.items()
    }
    assert 6 * 3600 <= estimated["train-clean-100"] < 6 * 3600 + 10
    for split in SPLITS[1:]:
        assert 0.05 * 6 * 3600 <= estimated[split] < 0.05 * 6 * 3600 + 10
    # Chapters hold at most 100 utterances numbered from 0; ids are unique.
    chapters = {}
    for utt in plan:
        chapters.setdefault(utt.chapter_id, []).append(utt)
    assert max(len(utts) for utts in chapters.values()) == 100
    for utts in chapters.values():
        assert sorted(u.index for u in utts) == list(range(len(utts)))
        assert len({(u.split, u.speaker) for u in utts}) == 1
    ids = [u.utterance_id for u in plan]
    assert len(ids) == len(set(ids))


def test_vocabulary_and_sentences():
    words = vocabulary()
    assert len(words) >= 600
    assert len(words) == len(set(words))
    assert all(re.fullmatch(r"[a-z']+", word) for word in words)
    sentences = generate_sentences(3000, random.Random(4))
    assert len(set(sentences)) == 3000
    used = {word for sentence in sentences for word in sentence.split()}
    assert used <= set(words)
    assert len(used) >= 600
    lengths = {len(sentence.split()) for sentence in sentences}
    assert min(lengths) == 4 and max(lengths) == 16
    assert sentences == generate_sentences(3000, random.Random(4))
    assert sentences != generate_sentences(3000, random.Random(5))


def test_speaker_table():
    speakers = speaker_table()
    assert len(speakers) >= 20
    ids = [s.speaker_id for s in speakers]
    assert ids == list(range(100, 100 + len(speakers)))
    combinations = {(s.voice_name, s.rate, s.pitch) for s in speakers}
    assert len(combinations) == len(speakers)
    seen, unseen = split_speakers(speakers)
    assert len(seen) >= 20 and len(unseen) >= 4
    assert not {s.variant for s in seen} & {s.variant for s in unseen}
    assert {s.sex for s in unseen} == {"M", "F"}


def test_every_voice_speaks_and_voices_differ():
    voices = {}
    with ESpeakNG() as engine:
        for speaker in speaker_table():
            if speaker.voice_name not in voices:
                audio = engine.synthesize("yes.", speaker.voice_name)
                assert audio.size > 1000, speaker.voice_name
                voices[speaker.voice_name] = audio.tobytes()
    assert len(set(voices.values())) == len(voices)


def test_synthesis_does_not_depend_on_history():
    first, second = speaker_table()[0], speaker_table()[-1]
    with ESpeakNG() as engine:
        a = synthesize_text("the brave knight slept", first, engine)
        b = synthesize_text("the brave knight slept", second, engine)
        again = synthesize_text("the brave knight slept", first, engine)
    assert np.array_equal(a, again)
    assert a.dtype == np.int16
    assert not (a.size == b.size and np.array_equal(a, b))


def test_unknown_voice_is_an_error():
    with ESpeakNG() as engine:
        with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
            engine.synthesize("hello.", "xx-nowhere")


def test_deterministic_with_two_workers(corpus, tmp_path):
    root, summary = corpus
    again = generate_corpus(
        tmp_path, hours=HOURS, seed=SEED, num_workers=2, progress=False
    )
    assert _corpus_files(os.path.join(tmp_path, "LibriSpeech")) == (
        _corpus_files(root)
    )
    assert again["splits"] == summary["splits"]


def test_rerun_with_same_options_does_nothing(corpus):
    root, summary = corpus
    paths = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(root)
        for name in names
    ]
    times = {path: os.stat(path).st_mtime_ns for path in paths}
    again = generate_corpus(
        os.path.dirname(root), hours=HOURS, seed=SEED, progress=False
    )
    assert again == summary
    assert {path: os.stat(path).st_mtime_ns for path in paths} == times


@pytest.mark.parametrize(
    "options", [{"hours": 0.004, "seed": SEED}, {"hours": HOURS, "seed": 12}]
)
def test_other_options_on_existing_corpus_are_an_error(corpus, options):
    root, _ = corpus
    with pytest.raises(FileExistsError) as error:
        generate_corpus(os.path.dirname(root), progress=False, **options)
    message = str(error.value)
    assert "already holds a synthetic corpus" in message
    assert "Choose another output folder or delete" in message
    assert f"'seed': {options['seed']}" in message


def test_foreign_folder_is_an_error(tmp_path):
    os.makedirs(tmp_path / "LibriSpeech" / "dev-clean")
    with pytest.raises(FileExistsError, match="did not write"):
        generate_corpus(tmp_path, hours=HOURS, progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hours": 0}, "hours must be a positive"),
        ({"hours": -1.0}, "hours must be a positive"),
        ({"hours": float("nan")}, "hours must be a positive"),
        ({"hours": "1"}, "hours must be a number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"num_workers": 0}, "num_workers must be a positive integer"),
    ],
)
def test_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        generate_corpus(tmp_path, progress=False, **options)
    assert not os.path.exists(tmp_path / "LibriSpeech")


def test_cli(corpus, tmp_path):
    root, summary = corpus
    command = [sys.executable, "-m", "speechbrain_spg.data.synthetic"]
    command += ["--out", str(tmp_path), "--hours", str(HOURS)]
    result = subprocess.run(
        [*command, "--seed", str(SEED)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["split", "utterances", "hours", "speakers"]
    assert [line.split()[0] for line in lines[1:6]] == [*SPLITS, "total"]
    assert lines[5].split()[1] == str(summary["utterances"])
    assert "Synthesising" in result.stderr  # the progress bar
    assert _corpus_files(os.path.join(tmp_path, "LibriSpeech")) == (
        _corpus_files(root)
    )
    mismatch = subprocess.run(
        [*command, "--seed", "99", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mismatch.returncode == 2
    assert "Choose another output folder or delete" in mismatch.stderr
