"""Tests of the run comparison report (table, significance, plots, CLI)."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import assert_png, parse_markdown_table
from speechbrain_spg.evaluation.compare import (
    choose_baseline,
    compare_runs,
    display_names,
    load_run,
    main,
    markdown_table,
    ordered_splits,
    plot_layer_sparsity,
    plot_training,
    plot_wer_vs_ratio,
)
from speechbrain_spg.evaluation.significance import mapsswe, word_errors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("test-clean", "test-other")
NUM_UTTERANCES = 40
WORDS_PER_UTTERANCE = 10
TOTAL_PARAMS = 94_371_712

# Utterances (by index) that each system gets wrong, per split. Against
# dense, spg differs on 4 segments (+1, +1, +1, -1): z = 1 exactly, so
# p = erfc(1 / sqrt(2)). ump makes 20 more errors and one fewer.
DENSE_WRONG = {"test-clean": {0, 1, 2, 3}, "test-other": set(range(8))}
SPG_EXTRA = {4 + 8, 5 + 8, 6 + 8}  # beyond the dense errors of both splits
ump_extra = set(range(10, 30))
WRONG = {
    "dense": DENSE_WRONG,
    "spg": {s: (w - {0}) | SPG_EXTRA for s, w in DENSE_WRONG.items()},
    "ump": {s: (w - {1}) | ump_extra for s, w in DENSE_WRONG.items()},
}
SPG_P_VALUE = math.erfc(1 / math.sqrt(2))
NONZERO = {"dense": TOTAL_PARAMS, "spg": 33_030_099, "ump": 33_100_000}
WALL_TIME = {"dense": 1000.25, "spg": 1234.56, "ump": 987.0}


def _reference(split, k):
    return [f"{split}_w{k}_{i}" for i in range(WORDS_PER_UTTERANCE)]


def _hypothesis(split, k, wrong):
    words = _reference(split, k)
    if k in wrong:
        words[5] = "oops"
    return words


def _records(method, split):
    return [
        {
            "id": f"{split}-{k:04d}",
            "ref": " ".join(_reference(split, k)),
            "hyp": " ".join(_hypothesis(split, k, WRONG[method][split])),
        }
        for k in range(NUM_UTTERANCES)
    ]


def _wer_percent(records):
    errors = sum(sum(word_errors(r["ref"], r["hyp"])[:3]) for r in records)
    words = sum(len(r["ref"].split()) for r in records)
    return 100 * errors / words


def _summary(method, records_by_split):
    summary = {
        "method": method,
        "system": method if method == "dense" else f"{method}-0.65",
        "source": "facebook/wav2vec2-base",
        "decoder": "ctc",
        "token_type": "char",
        "epochs": 3,
        "history": [
            {"epoch": e, "train_loss": 60.0 / e, "dev_loss": 50.0 / e}
            for e in (1, 2, 3)
        ],
        "trace": [],
        "skipped_nonfinite_batches": 0,
        "wall_time_s": WALL_TIME[method],
        "params": {"total": TOTAL_PARAMS, "nonzero": NONZERO[method]},
        "compression_ratio": TOTAL_PARAMS / NONZERO[method],
        "wer": {s: _wer_percent(r) for s, r in records_by_split.items()},
        "cer": {s: 1.0 for s in records_by_split},
    }
    if method != "dense":
        for epoch in summary["history"]:
            epoch.update(
                hard_sparsity=0.2 * epoch["epoch"],
                soft_sparsity=0.21 * epoch["epoch"],
                target=0.65,
                sparsity_loss=0.01,
            )
        summary["sparsity"] = {
            "target_sparsity": 0.65,
            "target_scope": "gated",
            "gated_target": 0.65,
            "hard_sparsity": 0.651,
            "model_sparsity": 0.5,
            "calibration_factor": None,
            "layers": [
                {
                    "name": f"encoder.layers.{i}.attention.{proj}",
                    "sparsity": 0.6 + 0.01 * i,
                    "threshold": 0.01,
                }
                for i in range(12)
                for proj in ("k_proj", "v_proj")
            ],
        }
    if method == "spg":
        summary["trace"] = [
            {
                "step": step,
                "task_loss": 100.0 / step,
                "sparsity_loss": 0.02 - 0.001 * step,
                "hard_sparsity": 0.003 * step,
                "soft_sparsity": 0.0032 * step,
                "target": 0.0035 * step,
            }
            for step in range(10, 210, 10)
        ]
    return summary


def _write_run(folder, method, reverse_lines=False):
    os.makedirs(folder)
    records_by_split = {s: _records(method, s) for s in SPLITS}
    for split, records in records_by_split.items():
        lines = [json.dumps(r) for r in records]
        if reverse_lines:
            lines.reverse()
        with open(folder / f"hyps_{split}.jsonl", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    summary = _summary(method, records_by_split)
    with open(folder / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


@pytest.fixture
def run_dirs(tmp_path):
    """Three run folders: dense, spg (near dense) and ump (clearly worse).

    The ump hypotheses are written in reverse order, so that utterances can
    only be paired by id.
    """
    dirs = {}
    for method in ("dense", "spg", "ump"):
        dirs[method] = tmp_path / "runs" / method
        _write_run(dirs[method], method, reverse_lines=method == "ump")
    return dirs


@pytest.fixture
def runs(run_dirs):
    return {method: load_run(path) for method, path in run_dirs.items()}


def test_load_run(runs, run_dirs):
    spg = runs["spg"]
    assert spg.path == str(run_dirs["spg"])
    assert spg.name == "spg-0.65"
    assert spg.method == "spg"
    assert spg.splits == list(SPLITS)
    hypotheses = spg.hypotheses["test-other"]
    assert len(hypotheses) == NUM_UTTERANCES
    ref, hyp = hypotheses["test-other-0012"]
    assert ref.split()[5] == "test-other_w12_5"
    assert hyp.split()[5] == "oops"


def test_table_numbers_equal_summaries(runs):
    rows = compare_runs(
        [runs["spg"], runs["ump"], runs["dense"]], baseline=runs["dense"]
    )
    assert [row.system for row in rows] == ["dense", "spg-0.65", "ump-0.65"]
    table = parse_markdown_table(markdown_table(rows, list(SPLITS)))
    assert len(table) == 3
    dense_wer = runs["dense"].summary["wer"]
    for cells, method in zip(table, ("dense", "spg", "ump")):
        summary = runs[method].summary
        assert cells["System"] == summary["system"]
        assert cells["Method"] == method
        assert int(cells["Params"].replace(",", "")) == TOTAL_PARAMS
        assert int(cells["Nonzero"].replace(",", "")) == NONZERO[method]
        assert cells["Ratio"] == f"{TOTAL_PARAMS / NONZERO[method]:.2f}x"
        assert float(cells["Wall time (s)"]) == pytest.approx(
            WALL_TIME[method], abs=0.05
        )
        for split in SPLITS:
            wer = float(cells[f"WER {split}"])
            assert wer == pytest.approx(summary["wer"][split], abs=0.005)
            if method == "dense":
                assert cells[f"ΔWER {split}"] == "-"
                assert cells[f"p {split}"] == "-"
                assert cells[f"Significant {split}"] == "-"
                continue
            delta = float(cells[f"ΔWER {split}"])
            expected = summary["wer"][split] - dense_wer[split]
            assert delta == pytest.approx(expected, abs=0.005)
            assert cells[f"ΔWER {split}"].startswith("+")
    # Each changed utterance moves the WER by 1 / (40 * 10) = 0.25 points.
    assert table[1]["ΔWER test-clean"] == "+0.50"
    assert table[2]["ΔWER test-clean"] == "+4.75"
    assert table[0]["WER test-clean"] == "1.00"
    assert table[0]["Ratio"] == "1.00x"
    assert table[1]["Params"] == "94,371,712"


def test_significance_of_each_system(runs):
    rows = compare_runs(
        [runs["dense"], runs["spg"], runs["ump"]], baseline=runs["dense"]
    )
    dense, spg, ump = rows
    assert dense.p_value == {s: None for s in SPLITS}
    assert dense.significant == {s: None for s in SPLITS}
    for split in SPLITS:
        assert spg.p_value[split] == pytest.approx(SPG_P_VALUE, rel=1e-12)
        assert spg.significant[split] is False
        assert ump.p_value[split] < 0.05
        assert ump.significant[split] is True
        assert ump.tests[split].num_utterances == NUM_UTTERANCES
        assert (
            ump.tests[split].mapsswe.errors_b
            > ump.tests[split].mapsswe.errors_a
        )
    # The reversed ump file is paired by id: the same as a direct MAPSSWE.
    split = "test-clean"
    refs = [" ".join(_reference(split, k)) for k in range(NUM_UTTERANCES)]
    direct = mapsswe(
        refs,
        [r["hyp"] for r in _records("dense", split)],
        [r["hyp"] for r in _records("ump", split)],
    )
    assert ump.p_value[split] == pytest.approx(direct.p_value, rel=1e-12)
    assert direct.n_segments == 24  # 3 shared errors, 21 differing
    cells = parse_markdown_table(markdown_table(rows, [split]))
    assert cells[1][f"p {split}"] == "0.317"
    assert cells[1][f"Significant {split}"] == "no"
    assert cells[2][f"p {split}"] == f"{direct.p_value:.3g}"
    assert cells[2][f"Significant {split}"] == "yes"


def test_alpha_decides_significance(runs):
    rows = compare_runs([runs["dense"], runs["spg"]], runs["dense"], alpha=0.4)
    assert rows[1].significant["test-clean"] is True
    with pytest.raises(
        ValueError, match=r"alpha must lie in \(0, 1\), got 1.5"
    ):
        compare_runs([runs["dense"]], runs["dense"], alpha=1.5)


def test_baseline_choice_and_order(runs):
    ordered = [runs["ump"], runs["spg"], runs["dense"]]
    assert choose_baseline(ordered) is runs["dense"]
    assert choose_baseline([runs["ump"], runs["spg"]]) is runs["ump"]
    rows = compare_runs([runs["dense"], runs["ump"]], baseline=runs["spg"])
    assert [row.system for row in rows] == ["spg-0.65", "dense", "ump-0.65"]
    assert rows[1].delta_wer["test-clean"] == pytest.approx(-0.5)
    assert rows[1].p_value["test-clean"] == pytest.approx(SPG_P_VALUE)


def test_duplicate_system_names_use_folder_names(tmp_path, run_dirs):
    second = tmp_path / "other" / "spg-rerun"
    _write_run(second, "spg")
    runs = [load_run(run_dirs["spg"]), load_run(second)]
    assert display_names(runs) == ["spg-0.65 (spg)", "spg-0.65 (spg-rerun)"]
    assert ordered_splits(runs) == list(SPLITS)


def test_split_missing_from_a_run_is_a_dash(tmp_path, run_dirs):
    partial = tmp_path / "partial"
    summary = _write_run(partial, "ump")
    del summary["wer"]["test-other"]
    with open(partial / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f)
    runs = [load_run(run_dirs["dense"]), load_run(partial)]
    rows = compare_runs(runs, runs[0])
    cells = parse_markdown_table(markdown_table(rows, list(SPLITS)))
    assert cells[1]["WER test-other"] == "-"
    assert cells[1]["p test-other"] == "-"
    assert cells[1]["Significant test-clean"] == "yes"


def test_plots_are_valid_pngs(tmp_path, runs):
    everything = list(runs.values())
    paths = [
        plot_wer_vs_ratio(everything, tmp_path / "wer.png", "test-other"),
        plot_layer_sparsity(runs["spg"], tmp_path / "layers.png"),
        plot_training(runs["spg"], tmp_path / "trace.png"),
        # Empty trace: falls back to the per-epoch history.
        plot_training(runs["ump"], tmp_path / "ump.png"),
        plot_training(runs["dense"], tmp_path / "sub" / "dense.png"),
    ]
    for path in paths:
        assert_png(path)


def test_plots_reject_missing_data(tmp_path, runs, run_dirs):
    summary_path = os.path.join(str(run_dirs["dense"]), "summary.json")
    with pytest.raises(ValueError, match="has no per-layer sparsity") as info:
        plot_layer_sparsity(runs["dense"], tmp_path / "x.png")
    assert summary_path in str(info.value)
    with pytest.raises(ValueError, match="No run has a WER on the split 'dev'"):
        plot_wer_vs_ratio(list(runs.values()), tmp_path / "x.png", "dev")
    runs["dense"].summary["history"] = []
    with pytest.raises(ValueError, match="neither a training trace"):
        plot_training(runs["dense"], tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_main_writes_report_and_plots(tmp_path, run_dirs, capsys):
    out = tmp_path / "report"
    argv = [str(run_dirs[m]) for m in ("spg", "ump", "dense")]
    argv += ["--out", str(out), "--alpha", "0.01"]
    written = main(argv)
    names = sorted(os.path.basename(path) for path in written)
    assert names == sorted(
        [
            "comparison.md",
            "wer_vs_ratio_test-clean.png",
            "wer_vs_ratio_test-other.png",
            "layer_sparsity_spg-0.65.png",
            "layer_sparsity_ump-0.65.png",
            "training_dense.png",
            "training_spg-0.65.png",
            "training_ump-0.65.png",
        ]
    )
    assert sorted(os.listdir(out)) == names
    for path in written[1:]:
        assert_png(path)
    document = (out / "comparison.md").read_text(encoding="utf-8")
    assert "python -m speechbrain_spg.evaluation.compare " in document
    assert f"--out {out} --alpha 0.01" in document
    assert "alpha = 0.01" in document
    assert "Baseline: dense" in document
    table = parse_markdown_table(document)
    assert [row["System"] for row in table] == ["dense", "spg-0.65", "ump-0.65"]
    assert table[2]["Significant test-other"] == "yes"
    printed = capsys.readouterr().out
    assert (
        markdown_table(
            compare_runs(
                [load_run(run_dirs[m]) for m in ("dense", "spg", "ump")],
                load_run(run_dirs["dense"]),
                alpha=0.01,
            ),
            list(SPLITS),
        )
        in printed
    )
    for path in written:
        assert f"Wrote {path}" in printed


def test_main_reports_errors_with_exit_status_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(SystemExit) as info:
        main([str(empty), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert str(empty / "summary.json") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(empty), "--alpha", "0"])
    assert "--alpha must lie in (0, 1), got 0.0" in capsys.readouterr().err


def test_command_line_in_a_subprocess(tmp_path, run_dirs):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "speechbrain_spg.evaluation.compare"]
    result = subprocess.run(
        [*command, str(run_dirs["dense"]), "--baseline", str(run_dirs["spg"])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    default_out = tmp_path / "comparison"
    table = parse_markdown_table(
        (default_out / "comparison.md").read_text("utf-8")
    )
    assert [row["System"] for row in table] == ["spg-0.65", "dense"]
    assert table[1]["ΔWER test-clean"] == "-0.50"
    assert table[1]["p test-clean"] == "0.317"
    assert (
        "| dense | dense | 94,371,712 | 94,371,712 | 1.00x |" in result.stdout
    )
    assert (
        f"Wrote {os.path.join('comparison', 'comparison.md')}" in result.stdout
    )
    assert sorted(os.listdir(default_out)) == [
        "comparison.md",
        "layer_sparsity_spg-0.65.png",
        "training_dense.png",
        "training_spg-0.65.png",
        "wer_vs_ratio_test-clean.png",
        "wer_vs_ratio_test-other.png",
    ]
    missing = tmp_path / "missing"
    result = subprocess.run(
        [*command, str(run_dirs["dense"]), str(missing), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"The run folder {missing} does not exist" in result.stderr
    assert not os.path.exists(out)


def test_missing_summary_is_named(tmp_path):
    folder = tmp_path / "run"
    os.makedirs(folder)
    expected = f"{folder} has no summary.json: {folder / 'summary.json'} does not exist"
    with pytest.raises(FileNotFoundError) as info:
        load_run(folder)
    assert expected in str(info.value)


def test_invalid_summary_is_named(tmp_path, run_dirs):
    path = run_dirs["spg"] / "summary.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        load_run(run_dirs["spg"])
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"method": "spg", "wer": {}}), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_run(run_dirs["spg"])
    assert str(info.value) == (
        f'{path} lacks the key "params"; it must be the summary written by '
        "the recipe at the end of a run."
    )


def test_missing_hypotheses_file_is_named(run_dirs):
    missing = run_dirs["ump"] / "hyps_test-other.jsonl"
    os.remove(missing)
    with pytest.raises(FileNotFoundError) as info:
        load_run(run_dirs["ump"])
    message = str(info.value)
    assert message.startswith(f"{missing} does not exist")
    assert "the split 'test-other'" in message


def test_mismatched_utterances_are_reported(run_dirs, runs):
    path = run_dirs["spg"] / "hyps_test-clean.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    spg = load_run(run_dirs["spg"])
    with pytest.raises(ValueError, match="must cover the same utterances"):
        compare_runs([runs["dense"], spg], runs["dense"])
