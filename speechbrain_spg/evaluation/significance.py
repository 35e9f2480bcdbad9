"""Is the WER difference between two ASR systems statistically significant?

Compressing a model usually costs some accuracy, and a WER that moved by a
few tenths of a point may be noise. This module provides the two tests used
to decide that, both on the same test set decoded by two systems A and B:

* the matched-pairs sentence-segment word error test (MAPSSWE) of Gillick
  and Cox (1989), as run by NIST SCTK ``sc_stats``. Each utterance is cut
  into segments bounded by runs of reference words that both systems got
  right; the per-segment difference of error counts is then tested against
  zero with a normal approximation;
* a paired bootstrap over utterances, which gives a confidence interval for
  the corpus-level WER difference.

Words are compared exactly as given (split on whitespace): normalise case
and punctuation before calling these functions.

Authors
 * speechbrain-spg developers 2026
"""

import json
import math
from dataclasses import dataclass

import numpy as np

#: Alignment operations returned by :func:`word_errors`.
CORRECT = "C"
SUBSTITUTION = "S"
DELETION = "D"
INSERTION = "I"

#: How many ids a mismatch error lists before it only gives the count.
_IDS_SHOWN = 5


def _as_words(utterance):
    """Returns an utterance as a list of words.

    Arguments
    ---------
    utterance : str or sequence of str
        A whitespace-separated string or a sequence of words.

    Returns
    -------
    list of str
        The words.

    Raises
    ------
    TypeError
        If ``utterance`` is neither a string nor a sequence of strings.
    """
    if isinstance(utterance, str):
        return utterance.split()
    words = list(utterance)
    for word in words:
        if not isinstance(word, str):
            raise TypeError(
                "An utterance must be a string or a list of word strings; "
                f"found the word {word!r} of type {type(word).__name__}."
            )
    return words


def word_errors(ref_words, hyp_words):
    """Aligns a hypothesis to its reference with a word Levenshtein distance.

    The alignment has the fewest edits (so ``S + D + I`` is the word edit
    distance) and, among those, the fewest substitutions, which is the same
    as the most correct words: ``"a b c d"`` against ``"a x d e"`` keeps
    ``d`` correct rather than substituting three words. Remaining ties are
    broken the same way every time (from the end: match or substitution,
    then deletion, then insertion).

    Arguments
    ---------
    ref_words : str or sequence of str
        The reference, as a string or a list of words.
    hyp_words : str or sequence of str
        The hypothesis, as a string or a list of words.

    Returns
    -------
    substitutions : int
        Number of substituted reference words.
    deletions : int
        Number of deleted reference words.
    insertions : int
        Number of inserted hypothesis words.
    alignment : list of tuple
        ``(operation, ref_word, hyp_word)`` in reading order, where
        ``operation`` is one of ``"C"`` (correct), ``"S"``, ``"D"``, ``"I"``;
        ``ref_word`` is None for insertions and ``hyp_word`` for deletions.

    Example
    -------
    >>> subs, dels, ins, alignment = word_errors("a b c", "a x c d")
    >>> subs, dels, ins
    (1, 0, 1)
    >>> alignment
    [('C', 'a', 'a'), ('S', 'b', 'x'), ('C', 'c', 'c'), ('I', None, 'd')]
    """
    ref = _as_words(ref_words)
    hyp = _as_words(hyp_words)
    # An insertion or deletion costs gap_cost and a substitution one more.
    # A substitution count never reaches gap_cost, so the total cost
    # gap_cost * edits + substitutions orders alignments by edits first.
    gap_cost = min(len(ref), len(hyp)) + 1
    cost = _edit_costs(ref, hyp, gap_cost)
    alignment = _backtrace(cost, ref, hyp, gap_cost)
    operations = [operation for operation, _, _ in alignment]
    return (
        operations.count(SUBSTITUTION),
        operations.count(DELETION),
        operations.count(INSERTION),
        alignment,
    )


def _substitution_cost(ref_word, hyp_word, gap_cost):
    """Cost of aligning two words: 0 if equal, else ``gap_cost + 1``."""
    return 0 if ref_word == hyp_word else gap_cost + 1


def _edit_costs(ref, hyp, gap_cost):
    """Fills the edit cost table: ``cost[i][j]`` aligns ``ref[:i]``, ``hyp[:j]``."""
    cost = [[gap_cost * j for j in range(len(hyp) + 1)]]
    for i, ref_word in enumerate(ref, start=1):
        row = [gap_cost * i]
        previous = cost[-1]
        for j, hyp_word in enumerate(hyp, start=1):
            diagonal = previous[j - 1] + _substitution_cost(
                ref_word, hyp_word, gap_cost
            )
            deletion = previous[j] + gap_cost
            insertion = row[j - 1] + gap_cost
            row.append(min(diagonal, deletion, insertion))
        cost.append(row)
    return cost


def _backtrace(cost, ref, hyp, gap_cost):
    """Reads one cheapest alignment back from a filled edit cost table."""
    alignment = []
    i, j = len(ref), len(hyp)
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            step = _substitution_cost(ref[i - 1], hyp[j - 1], gap_cost)
            if cost[i][j] == cost[i - 1][j - 1] + step:
                operation = SUBSTITUTION if step else CORRECT
                alignment.append((operation, ref[i - 1], hyp[j - 1]))
                i, j = i - 1, j - 1
                continue
        if i > 0 and cost[i][j] == cost[i - 1][j] + gap_cost:
            alignment.append((DELETION, ref[i - 1], None))
            i -= 1
        else:
            alignment.append((INSERTION, None, hyp[j - 1]))
            j -= 1
    alignment.reverse()
    return alignment


def _token_errors(ref, hyp):
    """Error counts per position of the interleaved sequence of gaps and words.

    Position ``2 * k`` is the gap before reference word ``k`` (insertions
    there), position ``2 * k + 1`` is reference word ``k`` (1 if it was
    substituted or deleted); the last position is the gap after the last
    word.
    """
    _, _, _, alignment = word_errors(ref, hyp)
    errors = [0] * (2 * len(ref) + 1)
    word_index = 0
    for operation, _, _ in alignment:
        if operation == INSERTION:
            errors[2 * word_index] += 1
        else:
            errors[2 * word_index + 1] = int(operation != CORRECT)
            word_index += 1
    return errors


def _boundary_positions(errors_a, errors_b, min_good_words):
    """Marks the positions that lie in a run of at least ``min_good_words``
    reference words that both systems got right, with no insertion inside."""
    num_positions = len(errors_a)
    boundary = [False] * num_positions
    start = 0
    while start < num_positions:
        if errors_a[start] or errors_b[start]:
            start += 1
            continue
        end = start
        while end < num_positions and not (errors_a[end] or errors_b[end]):
            end += 1
        # Odd positions are words: there are end // 2 of them below end.
        if end // 2 - start // 2 >= min_good_words:
            boundary[start:end] = [True] * (end - start)
        start = end
    return boundary


@dataclass(frozen=True)
class Segment:
    """One segment of an utterance for the matched-pairs test.

    Arguments
    ---------
    start : int
        Index of the first reference word in the segment.
    end : int
        One past the last reference word. ``start == end`` when the segment
        holds only insertions, made in the gap before reference word
        ``start``.
    errors_a : int
        Errors (substitutions, deletions, insertions) of system A in it.
    errors_b : int
        Errors of system B in it.

    Example
    -------
    >>> Segment(start=2, end=4, errors_a=1, errors_b=3).difference
    -2
    """

    start: int
    end: int
    errors_a: int
    errors_b: int

    @property
    def difference(self):
        """``errors_a - errors_b``."""
        return self.errors_a - self.errors_b


def matched_pair_segments(ref, hyp_a, hyp_b, min_good_words=2):
    """Cuts one utterance into the segments of the matched-pairs test.

    Both hypotheses are aligned to the reference. A reference word is good
    when both systems recognised it correctly. A run of at least
    ``min_good_words`` consecutive good words, with no insertion by either
    system between them, is a boundary; the stretches between boundaries
    (and the utterance edges) are the segments, and every error of either
    system lies in exactly one of them. Segments in which neither system
    made an error are dropped.

    Arguments
    ---------
    ref : str or sequence of str
        The reference.
    hyp_a : str or sequence of str
        The hypothesis of system A.
    hyp_b : str or sequence of str
        The hypothesis of system B.
    min_good_words : int
        Shortest run of good words that separates two segments (SCTK uses 2).

    Returns
    -------
    list of Segment
        The segments in reading order.

    Raises
    ------
    ValueError
        If ``min_good_words`` is smaller than 1.

    Example
    -------
    >>> ref = "a b c d e f g"
    >>> hyp_a, hyp_b = "a b x d e f g", "a b c d e f"
    >>> for segment in matched_pair_segments(ref, hyp_a, hyp_b):
    ...     print(segment)
    Segment(start=2, end=3, errors_a=1, errors_b=0)
    Segment(start=6, end=7, errors_a=0, errors_b=1)
    """
    if min_good_words < 1:
        raise ValueError(
            f"min_good_words must be at least 1, got {min_good_words}."
        )
    ref = _as_words(ref)
    errors_a = _token_errors(ref, _as_words(hyp_a))
    errors_b = _token_errors(ref, _as_words(hyp_b))
    boundary = _boundary_positions(errors_a, errors_b, min_good_words)
    segments = []
    position = 0
    while position < len(boundary):
        if boundary[position]:
            position += 1
            continue
        first = position
        while position < len(boundary) and not boundary[position]:
            position += 1
        segment = _make_segment(first, position, errors_a, errors_b)
        if segment.errors_a or segment.errors_b:
            segments.append(segment)
    return segments


def _make_segment(first, stop, errors_a, errors_b):
    """Builds the segment that covers interleaved positions ``[first, stop)``."""
    start = first // 2
    end = stop // 2 if stop - first > 1 or first % 2 else start
    return Segment(
        start=start,
        end=end,
        errors_a=sum(errors_a[first:stop]),
        errors_b=sum(errors_b[first:stop]),
    )


@dataclass(frozen=True)
class MapssweResult:
    """Outcome of the matched-pairs sentence-segment word error test.

    Arguments
    ---------
    z : float
        The test statistic ``W = mean / (std / sqrt(n))`` of the per-segment
        differences ``N_A - N_B``; negative when A makes fewer errors.
    p_value : float
        Two-sided p-value under the standard normal.
    n_segments : int
        Number of segments in which at least one system made an error.
    significant : bool
        Whether ``p_value < alpha``.
    mean_difference : float
        Mean of ``N_A - N_B`` over the segments.
    errors_a : int
        Total errors of system A.
    errors_b : int
        Total errors of system B.
    alpha : float
        The significance level used.

    Example
    -------
    >>> result = MapssweResult(
    ...     z=-2.5, p_value=0.0124, n_segments=60, significant=True,
    ...     mean_difference=-0.3, errors_a=40, errors_b=58, alpha=0.05,
    ... )
    >>> print(result)
    MAPSSWE over 60 segments: A 40 errors, B 58 errors, mean(N_A - N_B) = -0.3, z = -2.5, p = 0.0124: significant at alpha = 0.05, A better.
    """

    z: float
    p_value: float
    n_segments: int
    significant: bool
    mean_difference: float
    errors_a: int
    errors_b: int
    alpha: float

    def __str__(self):
        if self.significant:
            better = "A" if self.mean_difference < 0 else "B"
            verdict = f"significant at alpha = {self.alpha:g}, {better} better"
        else:
            verdict = f"not significant at alpha = {self.alpha:g}"
        return (
            f"MAPSSWE over {self.n_segments} segments: "
            f"A {self.errors_a} errors, B {self.errors_b} errors, "
            f"mean(N_A - N_B) = {self.mean_difference:.4g}, "
            f"z = {self.z:.4g}, p = {self.p_value:.3g}: {verdict}."
        )


def _check_same_lengths(refs, hyps_a, hyps_b):
    """Raises a ValueError unless the three lists have the same length."""
    lengths = (len(refs), len(hyps_a), len(hyps_b))
    if len(set(lengths)) != 1:
        raise ValueError(
            "refs, hyps_a and hyps_b must hold one entry per utterance, "
            f"got {lengths[0]}, {lengths[1]} and {lengths[2]} entries."
        )


def _check_alpha(alpha):
    """Raises a ValueError unless ``0 < alpha < 1``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")


def _normal_test(differences):
    """Returns ``(mean, z, p_value)`` for paired integer differences.

    The sample variance (``n - 1`` in the denominator) is computed exactly in
    integers, so that a zero variance is recognised as such.
    """
    n = len(differences)
    total = sum(differences)
    if n == 0 or total == 0:
        return 0.0, 0.0, 1.0
    mean = total / n
    if n == 1:
        return mean, 0.0, 1.0
    scaled_variance = n * sum(d * d for d in differences) - total * total
    if scaled_variance == 0:
        return mean, math.copysign(math.inf, mean), 0.0
    variance = scaled_variance / (n * (n - 1))
    z = mean / math.sqrt(variance / n)
    return mean, z, math.erfc(abs(z) / math.sqrt(2))


def mapsswe(refs, hyps_a, hyps_b, alpha=0.05, min_good_words=2):
    """Matched-pairs sentence-segment word error test (NIST SCTK style).

    Segments every utterance with :func:`matched_pair_segments`, takes the
    per-segment differences ``Z_i = N_A,i - N_B,i`` and computes
    ``W = mean(Z) / (std(Z) / sqrt(n))`` (sample standard deviation), which
    is standard normal when both systems are equally accurate. The normal
    approximation wants a fair number of segments (a few dozen or more).

    Degenerate cases: with no segment, or when the differences sum to zero
    (identical systems included), ``z = 0`` and ``p = 1``. A single segment
    gives no variance estimate, so the test makes no claim either
    (``z = 0``, ``p = 1``). When every segment has the same nonzero
    difference, the variance is zero: ``z`` is infinite with the sign of the
    mean and ``p = 0``.

    Arguments
    ---------
    refs : list of (str or list of str)
        Reference of each utterance.
    hyps_a : list of (str or list of str)
        Hypothesis of system A for each utterance.
    hyps_b : list of (str or list of str)
        Hypothesis of system B for each utterance.
    alpha : float
        Significance level of the two-sided test.
    min_good_words : int
        Shortest run of words both systems got right that bounds a segment.

    Returns
    -------
    MapssweResult
        The statistic, p-value and error totals.

    Raises
    ------
    ValueError
        If the three lists differ in length, or ``alpha`` is not in (0, 1).

    Example
    -------
    >>> refs = ["a b c d e f"] * 3
    >>> hyps_a = ["a b c d e f", "a b c d e f", "a x c d e f"]
    >>> hyps_b = ["a x c d e f", "a x c d y f", "a x c d e f"]
    >>> result = mapsswe(refs, hyps_a, hyps_b)
    >>> result.n_segments, result.errors_a, result.errors_b
    (4, 1, 4)
    >>> round(result.z, 3), round(result.p_value, 3), result.significant
    (-3.0, 0.003, True)
    """
    _check_same_lengths(refs, hyps_a, hyps_b)
    _check_alpha(alpha)
    segments = [
        segment
        for ref, hyp_a, hyp_b in zip(refs, hyps_a, hyps_b)
        for segment in matched_pair_segments(ref, hyp_a, hyp_b, min_good_words)
    ]
    mean, z, p_value = _normal_test([s.difference for s in segments])
    return MapssweResult(
        z=z,
        p_value=p_value,
        n_segments=len(segments),
        significant=p_value < alpha,
        mean_difference=mean,
        errors_a=sum(s.errors_a for s in segments),
        errors_b=sum(s.errors_b for s in segments),
        alpha=alpha,
    )


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of a paired bootstrap of the corpus-level WER difference.

    WERs are fractions (total errors / total reference words), not percents.

    Arguments
    ---------
    wer_a : float
        WER of system A on the whole set.
    wer_b : float
        WER of system B on the whole set.
    delta : float
        ``wer_a - wer_b`` on the whole set (negative when A is better).
    ci_low : float
        Lower end of the percentile confidence interval of ``delta``.
    ci_high : float
        Upper end of that interval.
    p_a_better : float
        Fraction of resamples in which A has the lower WER.
    confidence : float
        Coverage of the interval, e.g. 0.95.
    num_samples : int
        Number of resamples.

    Example
    -------
    >>> result = BootstrapResult(
    ...     wer_a=0.031, wer_b=0.035, delta=-0.004, ci_low=-0.006,
    ...     ci_high=-0.002, p_a_better=0.999, confidence=0.95,
    ...     num_samples=1000,
    ... )
    >>> print(result)
    Paired bootstrap (1000 resamples): WER A 3.10%, B 3.50%, A - B = -0.40% (95% CI -0.60% to -0.20%), A better in 99.9% of resamples.
    """

    wer_a: float
    wer_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_a_better: float
    confidence: float
    num_samples: int

    def __str__(self):
        return (
            f"Paired bootstrap ({self.num_samples} resamples): "
            f"WER A {self.wer_a:.2%}, B {self.wer_b:.2%}, "
            f"A - B = {self.delta:.2%} ({self.confidence:.0%} CI "
            f"{self.ci_low:.2%} to {self.ci_high:.2%}), "
            f"A better in {self.p_a_better:.1%} of resamples."
        )


def _utterance_error_counts(refs, hyps):
    """Returns per-utterance (total errors, reference words) as int arrays."""
    errors, lengths = [], []
    for ref, hyp in zip(refs, hyps):
        ref_words = _as_words(ref)
        subs, dels, ins, _ = word_errors(ref_words, hyp)
        errors.append(subs + dels + ins)
        lengths.append(len(ref_words))
    return np.array(errors, dtype=np.int64), np.array(lengths, dtype=np.int64)


def paired_bootstrap(
    refs, hyps_a, hyps_b, num_samples=1000, seed=0, confidence=0.95
):
    """Paired bootstrap over utterances of the WER difference ``A - B``.

    Each resample draws as many utterances as the test set holds, with
    replacement, and takes the same utterances for both systems. The
    corpus-level WER of a resample is its total errors over its total
    reference words (at least 1, in the unlikely case that only empty
    references were drawn). The interval is the percentile interval of the
    resampled differences.

    Arguments
    ---------
    refs : list of (str or list of str)
        Reference of each utterance.
    hyps_a : list of (str or list of str)
        Hypothesis of system A for each utterance.
    hyps_b : list of (str or list of str)
        Hypothesis of system B for each utterance.
    num_samples : int
        Number of resamples.
    seed : int
        Seed of the numpy generator; equal seeds give equal results.
    confidence : float
        Coverage of the confidence interval, in (0, 1).

    Returns
    -------
    BootstrapResult
        Point estimates, interval and fraction of resamples where A wins.

    Raises
    ------
    ValueError
        If the lists differ in length, the references hold no word,
        ``num_samples < 1`` or ``confidence`` is not in (0, 1).

    Example
    -------
    >>> refs = ["a b c d"] * 4
    >>> hyps_a = ["a b c d"] * 4
    >>> hyps_b = ["a b x d"] * 4
    >>> result = paired_bootstrap(refs, hyps_a, hyps_b, num_samples=100)
    >>> result.wer_a, result.wer_b, result.delta
    (0.0, 0.25, -0.25)
    >>> result.ci_low, result.ci_high, result.p_a_better
    (-0.25, -0.25, 1.0)
    """
    _check_same_lengths(refs, hyps_a, hyps_b)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    errors_a, lengths = _utterance_error_counts(refs, hyps_a)
    errors_b, _ = _utterance_error_counts(refs, hyps_b)
    total_words = int(lengths.sum())
    if total_words == 0:
        raise ValueError(
            "The references hold no word at all, so the WER is undefined."
        )
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(lengths), size=(num_samples, len(lengths)))
    words = np.maximum(lengths[draws].sum(axis=1), 1)
    deltas = (errors_a[draws].sum(axis=1) - errors_b[draws].sum(axis=1)) / words
    tail = (1 - confidence) / 2
    ci_low, ci_high = np.quantile(deltas, [tail, 1 - tail])
    wer_a = int(errors_a.sum()) / total_words
    wer_b = int(errors_b.sum()) / total_words
    return BootstrapResult(
        wer_a=wer_a,
        wer_b=wer_b,
        delta=wer_a - wer_b,
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        p_a_better=float(np.mean(deltas < 0)),
        confidence=confidence,
        num_samples=num_samples,
    )


def load_hypotheses(path):
    """Reads a hypotheses file written by the recipe.

    Each non-blank line is a JSON object
    ``{"id": "...", "ref": "REFERENCE WORDS", "hyp": "HYPOTHESIS WORDS"}``.

    Arguments
    ---------
    path : str or os.PathLike
        The JSON-lines file.

    Returns
    -------
    dict
        Utterance id -> ``(ref, hyp)`` strings, in file order.

    Raises
    ------
    ValueError
        If a line is not a JSON object with string fields ``id``, ``ref`` and
        ``hyp``, an id appears twice, or the file holds no utterance; the
        message names the file and the line.

    Example
    -------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "test-clean.jsonl")
    ...     with open(path, "w", encoding="utf-8") as f:
    ...         _ = f.write('{"id": "u1", "ref": "A B", "hyp": "A C"}\\n')
    ...     load_hypotheses(path)
    {'u1': ('A B', 'A C')}
    """
    hypotheses = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utterance_id, ref, hyp = _parse_line(line, path, line_number)
            if utterance_id in hypotheses:
                raise ValueError(
                    f"{path}, line {line_number}: the id {utterance_id!r} "
                    "appears a second time; each utterance must appear once."
                )
            hypotheses[utterance_id] = (ref, hyp)
    if not hypotheses:
        raise ValueError(
            f"{path} holds no utterance; expected one JSON object per line "
            'with the keys "id", "ref" and "hyp".'
        )
    return hypotheses


def _parse_line(line, path, line_number):
    """Returns ``(id, ref, hyp)`` from one line of a hypotheses file."""
    where = f"{path}, line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error}).") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with the keys "
            f'"id", "ref" and "hyp", got {type(record).__name__}.'
        )
    fields = []
    for key in ("id", "ref", "hyp"):
        if key not in record:
            raise ValueError(f'{where}: the key "{key}" is missing.')
        if not isinstance(record[key], str):
            raise ValueError(
                f'{where}: "{key}" must be a string, got '
                f"{type(record[key]).__name__} {record[key]!r}."
            )
        fields.append(record[key])
    return tuple(fields)


def _describe_ids(ids):
    """Lists a few ids, then the count: ``'a', 'b', ... (7 in all)``."""
    shown = ", ".join(repr(i) for i in ids[:_IDS_SHOWN])
    more = ", ..." if len(ids) > _IDS_SHOWN else ""
    return f"{shown}{more} ({len(ids)} in all)"


def _matched_ids(hypotheses_a, hypotheses_b, path_a, path_b):
    """Sorted ids of two hypotheses files, which must hold the same ids."""
    only_a = sorted(set(hypotheses_a) - set(hypotheses_b))
    only_b = sorted(set(hypotheses_b) - set(hypotheses_a))
    problems = []
    if only_a:
        problems.append(f"only in {path_a}: {_describe_ids(only_a)}")
    if only_b:
        problems.append(f"only in {path_b}: {_describe_ids(only_b)}")
    if problems:
        raise ValueError(
            "The hypotheses files must cover the same utterances; ids "
            + "; ids ".join(problems)
            + "."
        )
    return sorted(hypotheses_a)


@dataclass(frozen=True)
class HypothesisComparison:
    """Both significance tests of system A against system B on one test set.

    Arguments
    ---------
    mapsswe : MapssweResult
        Outcome of the matched-pairs test.
    bootstrap : BootstrapResult
        Outcome of the paired bootstrap.
    num_utterances : int
        Number of utterances compared.

    Example
    -------
    >>> refs, hyps_a, hyps_b = ["a b"] * 2, ["a b"] * 2, ["a c"] * 2
    >>> comparison = HypothesisComparison(
    ...     mapsswe=mapsswe(refs, hyps_a, hyps_b),
    ...     bootstrap=paired_bootstrap(refs, hyps_a, hyps_b, num_samples=10),
    ...     num_utterances=2,
    ... )
    >>> comparison.bootstrap.delta
    -0.5
    """

    mapsswe: MapssweResult
    bootstrap: BootstrapResult
    num_utterances: int

    def __str__(self):
        return (
            f"{self.num_utterances} utterances.\n"
            f"{self.mapsswe}\n{self.bootstrap}"
        )


def compare_hypothesis_files(
    path_a, path_b, alpha=0.05, min_good_words=2, num_samples=1000, seed=0
):
    """Compares two systems from their hypotheses files on one test split.

    Utterances are matched by id and taken in sorted id order, so the result
    does not depend on the order of the lines.

    Arguments
    ---------
    path_a : str or os.PathLike
        Hypotheses file of system A (see :func:`load_hypotheses`).
    path_b : str or os.PathLike
        Hypotheses file of system B.
    alpha : float
        Significance level of the matched-pairs test.
    min_good_words : int
        Segment boundary length of the matched-pairs test.
    num_samples : int
        Number of bootstrap resamples.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    HypothesisComparison
        The MAPSSWE and the paired bootstrap results.

    Raises
    ------
    ValueError
        If a file is malformed, the files hold different ids (the message
        lists some of the ids found in only one file and their count), or
        the two files give different references for an id.

    Example
    -------
    >>> import json, os, tempfile
    >>> def write(path, hyps):
    ...     with open(path, "w", encoding="utf-8") as f:
    ...         for i, hyp in enumerate(hyps):
    ...             record = {"id": f"u{i}", "ref": "A B C", "hyp": hyp}
    ...             _ = f.write(json.dumps(record) + "\\n")
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path_a = os.path.join(folder, "a.jsonl")
    ...     path_b = os.path.join(folder, "b.jsonl")
    ...     write(path_a, ["A B C", "A B C"])
    ...     write(path_b, ["A X C", "A B C"])
    ...     comparison = compare_hypothesis_files(path_a, path_b)
    >>> comparison.num_utterances, comparison.mapsswe.errors_b
    (2, 1)
    """
    hypotheses_a = load_hypotheses(path_a)
    hypotheses_b = load_hypotheses(path_b)
    ids = _matched_ids(hypotheses_a, hypotheses_b, path_a, path_b)
    refs, hyps_a, hyps_b = [], [], []
    for utterance_id in ids:
        ref_a, hyp_a = hypotheses_a[utterance_id]
        ref_b, hyp_b = hypotheses_b[utterance_id]
        if ref_a.split() != ref_b.split():
            raise ValueError(
                f"The reference of {utterance_id!r} differs between the "
                f"files: {ref_a!r} in {path_a}, {ref_b!r} in {path_b}. "
                "Both systems must be scored against the same references."
            )
        refs.append(ref_a)
        hyps_a.append(hyp_a)
        hyps_b.append(hyp_b)
    return HypothesisComparison(
        mapsswe=mapsswe(refs, hyps_a, hyps_b, alpha, min_good_words),
        bootstrap=paired_bootstrap(
            refs, hyps_a, hyps_b, num_samples=num_samples, seed=seed
        ),
        num_utterances=len(ids),
    )
