"""Tests of the WER significance tests (MAPSSWE, paired bootstrap)."""

import json
import math
import re
import statistics

import jiwer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from speechbrain_spg.evaluation.significance import (
    BootstrapResult,
    MapssweResult,
    Segment,
    compare_hypothesis_files,
    load_hypotheses,
    mapsswe,
    matched_pair_segments,
    paired_bootstrap,
    word_errors,
)

# Ten distinct reference words; A substitutes c and inserts "uh" between h
# and i; B deletes d and substitutes j.
SEG_REF = "a b c d e f g h i j"
SEG_HYP_A = "a b X d e f g h uh i j"
SEG_HYP_B = "a b c e f g h i Y"

words = st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=8)


def _segments(min_good_words):
    segments = matched_pair_segments(
        SEG_REF, SEG_HYP_A, SEG_HYP_B, min_good_words=min_good_words
    )
    return [(s.start, s.end, s.errors_a, s.errors_b) for s in segments]


def _clearly_better_set():
    """40 utterances of 8 words; per-segment differences N_A - N_B are
    -1 (30 times), 0 (6 times) and +1 (4 times)."""
    refs, hyps_a, hyps_b = [], [], []
    for u in range(40):
        ref = [f"w{u}_{k}" for k in range(8)]
        wrong = list(ref)
        wrong[4] = "oops"
        refs.append(ref)
        if u < 30:  # A right, B one substitution
            hyps_a.append(ref)
            hyps_b.append(wrong)
        elif u < 36:  # both make the same substitution
            hyps_a.append(wrong)
            hyps_b.append(wrong)
        else:  # A one substitution, B right
            hyps_a.append(wrong)
            hyps_b.append(ref)
    return refs, hyps_a, hyps_b


def _expected_z(differences):
    mean = statistics.mean(differences)
    std = statistics.stdev(differences)
    return mean / (std / math.sqrt(len(differences)))


# word_errors ---------------------------------------------------------------


def test_word_errors_identical():
    assert word_errors("a b c", "a b c") == (
        0,
        0,
        0,
        [("C", "a", "a"), ("C", "b", "b"), ("C", "c", "c")],
    )


def test_word_errors_prefers_matches_among_equal_edit_counts():
    # Three substitutions would also take three edits, but keep one match
    # fewer. Of the two remaining ties, the backtrace (from the end) takes
    # the substitution of c first.
    assert word_errors("a b c d", "a x d e") == (
        1,
        1,
        1,
        [
            ("C", "a", "a"),
            ("D", "b", None),
            ("S", "c", "x"),
            ("C", "d", "d"),
            ("I", None, "e"),
        ],
    )


def test_word_errors_deletion_before_insertion():
    assert word_errors("a b", "b c") == (
        0,
        1,
        1,
        [("D", "a", None), ("C", "b", "b"), ("I", None, "c")],
    )


def test_word_errors_empty_sides():
    assert word_errors("", "x y") == (
        0,
        0,
        2,
        [("I", None, "x"), ("I", None, "y")],
    )
    assert word_errors(["a", "b"], []) == (
        0,
        2,
        0,
        [("D", "a", None), ("D", "b", None)],
    )
    assert word_errors([], "") == (0, 0, 0, [])


def test_word_errors_rejects_non_string_words():
    with pytest.raises(TypeError, match="found the word 3 of type int"):
        word_errors(["a", 3], "a")


@settings(max_examples=60, deadline=None)
@given(ref=words.filter(bool), hyp=words)
def test_word_errors_agrees_with_jiwer(ref, hyp):
    subs, dels, ins, alignment = word_errors(ref, hyp)
    expected = jiwer.process_words(" ".join(ref), " ".join(hyp))
    assert subs + dels + ins == (
        expected.substitutions + expected.deletions + expected.insertions
    )
    # Among alignments with the fewest edits, ours keeps the most matches.
    assert len(ref) - subs - dels >= expected.hits
    # The alignment reads back both sides and matches the counts.
    assert [r for op, r, _ in alignment if op != "I"] == ref
    assert [h for op, _, h in alignment if op != "D"] == hyp
    operations = [op for op, _, _ in alignment]
    assert (subs, dels, ins) == tuple(operations.count(o) for o in "SDI")
    for op, r, h in alignment:
        assert (op == "C") == (r is not None and r == h)


# matched_pair_segments ------------------------------------------------------


def test_segments_default_boundaries():
    # Good words a b | c d (errors) | e f g h | gap insertion, i good, j err.
    # The lone good word i is too short a run to bound a segment.
    assert _segments(2) == [(2, 4, 1, 1), (8, 10, 1, 1)]


def test_segments_min_good_words_one_splits_more():
    # Now i alone bounds: the insertion before i is a segment of its own.
    assert _segments(1) == [(2, 4, 1, 1), (8, 8, 1, 0), (9, 10, 0, 1)]


def test_segments_longer_minimum_merges():
    # a b (2 good words) no longer bounds: the first segment starts at 0.
    assert _segments(3) == [(0, 4, 1, 1), (8, 10, 1, 1)]
    # e f g h (4 good words) no longer bounds either: one segment.
    assert _segments(5) == [(0, 10, 2, 2)]


def test_segments_drop_error_free_utterances():
    assert matched_pair_segments("a", "a", "a") == []
    assert matched_pair_segments("", "", "") == []
    assert matched_pair_segments("", "x", "") == [
        Segment(start=0, end=0, errors_a=1, errors_b=0)
    ]


def test_segments_reject_min_good_words_zero():
    with pytest.raises(ValueError, match="min_good_words must be at least 1"):
        matched_pair_segments("a", "a", "a", min_good_words=0)


@settings(max_examples=60, deadline=None)
@given(ref=words, hyp_a=words, hyp_b=words, k=st.integers(1, 3))
def test_segments_hold_every_error_once(ref, hyp_a, hyp_b, k):
    segments = matched_pair_segments(ref, hyp_a, hyp_b, min_good_words=k)
    assert sum(s.errors_a for s in segments) == sum(word_errors(ref, hyp_a)[:3])
    assert sum(s.errors_b for s in segments) == sum(word_errors(ref, hyp_b)[:3])
    assert all(s.errors_a or s.errors_b for s in segments)
    # In order and disjoint: a segment ends no later than the next starts.
    for before, after in zip(segments, segments[1:]):
        assert before.start <= before.end <= after.start <= after.end


# mapsswe --------------------------------------------------------------------


def test_identical_systems_show_no_difference():
    refs = ["a b c d", "e f g", "h i j k l"]
    hyps = ["a x c d", "e f g", "h i k l"]
    result = mapsswe(refs, hyps, hyps)
    assert result == MapssweResult(
        z=0.0,
        p_value=1.0,
        n_segments=2,
        significant=False,
        mean_difference=0.0,
        errors_a=2,
        errors_b=2,
        alpha=0.05,
    )


def test_perfect_systems_have_no_segment():
    result = mapsswe(["a b"], ["a b"], ["a b"])
    assert (result.n_segments, result.z, result.p_value) == (0, 0.0, 1.0)
    assert not result.significant


def test_clearly_better_system_is_significant():
    refs, hyps_a, hyps_b = _clearly_better_set()
    result = mapsswe(refs, hyps_a, hyps_b)
    differences = [-1] * 30 + [0] * 6 + [1] * 4
    assert result.n_segments == 40
    assert (result.errors_a, result.errors_b) == (10, 36)
    assert result.mean_difference == pytest.approx(-0.65)
    assert result.z == pytest.approx(_expected_z(differences))
    assert result.z < 0
    assert result.p_value < 0.01
    assert result.significant

    boot = paired_bootstrap(refs, hyps_a, hyps_b, num_samples=500, seed=1)
    assert boot.wer_a == pytest.approx(10 / 320)
    assert boot.wer_b == pytest.approx(36 / 320)
    assert boot.delta == pytest.approx(-26 / 320)
    assert boot.ci_low <= boot.delta <= boot.ci_high < 0
    assert boot.p_a_better > 0.99


def test_hand_computed_z_and_p():
    # Per-segment differences N_A - N_B: -1, -2, 0, -1, +1.
    refs = ["a b c d e f"] * 5
    hyps_a = ["a b c d e f"] * 5
    hyps_a[2] = "a x c d e f"
    hyps_a[4] = "a b c x e f"
    hyps_b = ["a b x d e f", "a b x y e f", "a x c d e f", "x b c d e f"]
    hyps_b.append("a b c d e f")
    result = mapsswe(refs, hyps_a, hyps_b)
    differences = [-1, -2, 0, -1, 1]
    expected_z = _expected_z(differences)
    assert expected_z == pytest.approx(-0.6 / math.sqrt(1.3 / 5))
    assert result.n_segments == 5
    assert result.mean_difference == pytest.approx(-0.6)
    assert result.z == pytest.approx(expected_z)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(expected_z)))
    assert result.p_value == pytest.approx(0.2393, abs=1e-4)
    assert not result.significant
    assert mapsswe(refs, hyps_a, hyps_b, alpha=0.3).significant


def test_zero_variance_gives_infinite_z():
    refs = ["a b c"] * 3
    result = mapsswe(refs, refs, ["a x c"] * 3)
    assert result.z == -math.inf
    assert result.p_value == 0.0
    assert result.significant
    assert mapsswe(refs, ["a x c"] * 3, refs).z == math.inf


def test_single_segment_makes_no_claim():
    result = mapsswe(["a b c"], ["a b c"], ["a x c"])
    assert (result.n_segments, result.mean_difference) == (1, -1.0)
    assert (result.z, result.p_value, result.significant) == (0.0, 1.0, False)


def test_min_good_words_changes_segment_count():
    refs, hyps_a, hyps_b = [SEG_REF], [SEG_HYP_A], [SEG_HYP_B]
    assert mapsswe(refs, hyps_a, hyps_b).n_segments == 2
    assert mapsswe(refs, hyps_a, hyps_b, min_good_words=1).n_segments == 3
    assert mapsswe(refs, hyps_a, hyps_b, min_good_words=5).n_segments == 1


def test_strings_and_word_lists_agree():
    refs, hyps_a, hyps_b = _clearly_better_set()
    as_strings = [[" ".join(u) for u in x] for x in (refs, hyps_a, hyps_b)]
    assert mapsswe(refs, hyps_a, hyps_b) == mapsswe(*as_strings)
    assert paired_bootstrap(refs, hyps_a, hyps_b) == paired_bootstrap(
        *as_strings
    )


def test_mismatched_lengths_name_them():
    message = (
        "refs, hyps_a and hyps_b must hold one entry per utterance, "
        "got 3, 3 and 2 entries."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        mapsswe(["a"] * 3, ["a"] * 3, ["a"] * 2)
    with pytest.raises(ValueError, match=re.escape(message)):
        paired_bootstrap(["a"] * 3, ["a"] * 3, ["a"] * 2)


def test_bad_alpha_is_rejected():
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        mapsswe(["a"], ["a"], ["a"], alpha=1.5)


def test_mapsswe_str_is_readable():
    refs, hyps_a, hyps_b = _clearly_better_set()
    text = str(mapsswe(refs, hyps_a, hyps_b))
    assert text.startswith("MAPSSWE over 40 segments: A 10 errors, B 36")
    assert text.endswith("significant at alpha = 0.05, A better.")
    text = str(mapsswe(refs, hyps_a, hyps_a))
    assert text.endswith("not significant at alpha = 0.05.")


# paired_bootstrap -------------------------------------------------------------


def test_bootstrap_is_deterministic_for_a_seed():
    refs, hyps_a, hyps_b = _clearly_better_set()
    first = paired_bootstrap(refs, hyps_a, hyps_b, num_samples=200, seed=3)
    second = paired_bootstrap(refs, hyps_a, hyps_b, num_samples=200, seed=3)
    assert first == second
    assert isinstance(first, BootstrapResult)
    assert first.num_samples == 200 and first.confidence == 0.95


def test_bootstrap_identical_systems():
    refs, hyps_a, _ = _clearly_better_set()
    result = paired_bootstrap(refs, hyps_a, hyps_a, num_samples=100)
    assert (result.delta, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert result.p_a_better == 0.0


def test_bootstrap_wider_confidence_gives_wider_interval():
    refs, hyps_a, hyps_b = _clearly_better_set()
    narrow = paired_bootstrap(refs, hyps_a, hyps_b, confidence=0.5)
    wide = paired_bootstrap(refs, hyps_a, hyps_b, confidence=0.99)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        paired_bootstrap(["a"], ["a"], ["a"], num_samples=0)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\)"):
        paired_bootstrap(["a"], ["a"], ["a"], confidence=1.0)
    with pytest.raises(ValueError, match="The references hold no word"):
        paired_bootstrap([""], ["x"], [""])


# hypotheses files -------------------------------------------------------------


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def _records(refs, hyps, ids=None):
    ids = ids or [f"utt{i:02d}" for i in range(len(refs))]
    return [
        {"id": i, "ref": " ".join(r), "hyp": " ".join(h)}
        for i, r, h in zip(ids, refs, hyps)
    ]


def test_load_hypotheses_reads_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "test-clean.jsonl"
    path.write_text(
        '{"id": "u1", "ref": "A B", "hyp": "A"}\n\n'
        '{"hyp": "C", "id": "u2", "ref": "C D"}\n',
        encoding="utf-8",
    )
    assert load_hypotheses(path) == {"u1": ("A B", "A"), "u2": ("C D", "C")}


@pytest.mark.parametrize(
    "second_line, problem",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["u2", "A", "B"]', "line 2: expected a JSON object"),
        ('{"id": "u2", "hyp": "A"}', 'line 2: the key "ref" is missing.'),
        (
            '{"id": 7, "ref": "A", "hyp": "A"}',
            'line 2: "id" must be a string, got int 7.',
        ),
        (
            '{"id": "u1", "ref": "A", "hyp": "A"}',
            "line 2: the id 'u1' appears a second time",
        ),
    ],
)
def test_load_hypotheses_errors_name_file_and_line(
    tmp_path, second_line, problem
):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"id": "u1", "ref": "A", "hyp": "A"}\n' + second_line + "\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}, {problem}")):
        load_hypotheses(path)


def test_load_hypotheses_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path} holds no utt")):
        load_hypotheses(path)


def test_compare_hypothesis_files_matches_by_id(tmp_path):
    refs, hyps_a, hyps_b = _clearly_better_set()
    path_a = _write_jsonl(tmp_path / "a.jsonl", _records(refs, hyps_a))
    # B's lines in reverse order: matching is by id, not by line.
    path_b = _write_jsonl(tmp_path / "b.jsonl", _records(refs, hyps_b)[::-1])
    comparison = compare_hypothesis_files(path_a, path_b, num_samples=300)
    assert comparison.num_utterances == 40
    assert comparison.mapsswe == mapsswe(refs, hyps_a, hyps_b)
    assert comparison.bootstrap == paired_bootstrap(
        refs, hyps_a, hyps_b, num_samples=300
    )
    text = str(comparison)
    assert text.splitlines()[0] == "40 utterances."
    assert "A better in" in text


def test_compare_hypothesis_files_mismatched_ids(tmp_path):
    refs, hyps_a, _ = _clearly_better_set()
    records = _records(refs, hyps_a)
    path_a = _write_jsonl(tmp_path / "a.jsonl", records)
    extra = [{"id": f"extra{i}", "ref": "A", "hyp": "A"} for i in range(7)]
    path_b = _write_jsonl(tmp_path / "b.jsonl", records[2:] + extra)
    message = (
        "The hypotheses files must cover the same utterances; "
        f"ids only in {path_a}: 'utt00', 'utt01' (2 in all); "
        f"ids only in {path_b}: 'extra0', 'extra1', 'extra2', 'extra3', "
        "'extra4', ... (7 in all)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        compare_hypothesis_files(path_a, path_b)


def test_compare_hypothesis_files_different_references(tmp_path):
    path_a = _write_jsonl(
        tmp_path / "a.jsonl", [{"id": "u1", "ref": "A B", "hyp": "A B"}]
    )
    path_b = _write_jsonl(
        tmp_path / "b.jsonl", [{"id": "u1", "ref": "A C", "hyp": "A B"}]
    )
    message = (
        f"The reference of 'u1' differs between the files: 'A B' in "
        f"{path_a}, 'A C' in {path_b}."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        compare_hypothesis_files(path_a, path_b)
