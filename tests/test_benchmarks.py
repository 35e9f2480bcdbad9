"""The performance benchmarks run and print what their docstrings promise.

Run on tiny random models (the full-size ones take minutes); the numbers
are not checked (tests never assert timings), their presence and format
are.
"""

import importlib.util
import re
import sys

import pytest
import torch

from conftest import REPO, assert_png
from speechbrain_spg.data.architectures import TINY_OVERRIDES, build_config
from speechbrain_spg.lobes import flushes_subnormals as flushing

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name, monkeypatch):
    """Imports ``benchmarks/<name>.py`` as module ``name``.

    ``benchmarks/`` goes on ``sys.path`` so that processes spawned by the
    benchmark import the same module.
    """
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        name, BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flush_off():
    """Flush-to-zero off, with PyTorch's CPU thread pool started while it
    is off (worker threads take the setting of the thread that starts
    them: a pool started inside a benchmark's flushing block would keep
    flushing in later tests), and off again afterwards. Yields whether
    this CPU has the setting."""
    supported = torch.set_flush_denormal(False)
    torch.ones(1 << 20).exp()  # element-wise work split over the threads
    torch.ones(256, 256) @ torch.ones(256, 256)
    yield supported
    torch.set_flush_denormal(False)


@pytest.fixture
def subnormals_kept(flush_off):
    """``flush_off``, skipped on a CPU without the setting."""
    if not flush_off:
        pytest.skip("this CPU has no flush-to-zero setting")


def test_benchmarks_flush_subnormals_as_the_recipe_and_restore(
    monkeypatch, subnormals_kept
):
    gate_overhead = load_benchmark("gate_overhead", monkeypatch)
    assert not flushing()
    with gate_overhead.flush_subnormals():
        assert flushing()
    assert not flushing()
    # A setting that was on stays on; off for a block asking for it.
    torch.set_flush_denormal(True)
    with gate_overhead.flush_subnormals():
        assert flushing()
    assert flushing()
    with gate_overhead.flush_subnormals(on=False):
        assert not flushing()
    assert flushing()
    # Restored when the block raises.
    torch.set_flush_denormal(False)
    with pytest.raises(KeyError):
        with gate_overhead.flush_subnormals():
            raise KeyError("step")
    assert not flushing()


def test_gate_overhead_measures_with_subnormals_flushed(
    monkeypatch, subnormals_kept
):
    gate_overhead = load_benchmark("gate_overhead", monkeypatch)
    monkeypatch.setattr(
        gate_overhead, "_measure", lambda *args: {"flushing": flushing()}
    )
    assert gate_overhead.measure("compiled", "source", None) == {
        "flushing": True
    }
    assert not flushing()


def test_gate_overhead_prints_a_table_and_the_ratio_line(monkeypatch, capsys):
    gate_overhead = load_benchmark("gate_overhead", monkeypatch)
    monkeypatch.setattr(
        gate_overhead,
        "hub_config",
        lambda hub_id: build_config("wav2vec2", **TINY_OVERRIDES),
    )
    variants = [
        "dense",
        "fused",
        "compiled",
        "compiled_recompute_gated",
        "compiled_no_triton",
    ]
    gate_overhead.main(
        ["--models", "facebook/wav2vec2-base", "--variants", *variants]
        + ["--steps", "1", "--warmup", "1", "--eval-steps", "1"]
        + ["--rounds", "2"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "zero_grad after-step" in lines[0]
    header = lines.index(next(x for x in lines if x.split()[:1] == ["variant"]))
    table = lines[header + 1 : header + 1 + len(variants)]
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert list(rows) == variants
    assert rows["dense"][1] == "1.000" and rows["dense"][3] == "1.000"
    assert rows["dense"][5] == "1.000-1.000"
    for cells in rows.values():
        step, ratio, evaluation, eval_ratio, memory = map(float, cells[:5])
        assert step > 0 and evaluation > 0 and memory > 0
        low, high = map(float, cells[5].split("-"))
        # The median of two per-round ratios lies between them.
        assert low <= ratio <= high
    match = re.fullmatch(
        r"step-time ratio spg/dense: reference nan, fast (\d+\.\d{3})",
        lines[-1],
    )
    # fast = the better of the fast variants (each: its worst model).
    best = min(float(rows[v][1]) for v in variants[1:])
    assert match and float(match.group(1)) == pytest.approx(best, abs=1e-3)


def assert_pair_summary(lines, label):
    """The last two lines of an alternating benchmark on wav2vec2-base:
    ordered per-pair statistics, then ``LABEL ratio`` with their median."""
    stats = re.search(
        r"median (\d+\.\d{3}), quartiles (\d+\.\d{3})-(\d+\.\d{3}), "
        r"range (\d+\.\d{3})-(\d+\.\d{3})",
        lines[-2],
    )
    median, q1, q3, low, high = map(float, stats.groups())
    assert low <= q1 <= median <= q3 <= high
    match = re.fullmatch(
        rf"{label} ratio spg/dense: facebook/wav2vec2-base (\d+\.\d{{3}})",
        lines[-1],
    )
    assert match and float(match.group(1)) == median


def test_eval_overhead_alternates_the_lobes_and_prints_the_ratio_line(
    monkeypatch, capsys
):
    eval_overhead = load_benchmark("eval_overhead", monkeypatch)
    monkeypatch.setattr(
        eval_overhead,
        "hub_config",
        lambda hub_id: build_config("wav2vec2", **TINY_OVERRIDES),
    )
    order = []
    timed_pass = eval_overhead.timed_pass

    def recording_pass(lobe, *args):
        order.append("spg" if hasattr(lobe, "gate") else "dense")
        return timed_pass(lobe, *args)

    monkeypatch.setattr(eval_overhead, "timed_pass", recording_pass)
    eval_overhead.main(
        ["--models", "facebook/wav2vec2-base", "--pairs", "4", "--warmup", "1"]
    )
    # One warm-up pass each, then pairs in alternating order.
    assert order == ["dense", "spg"] + ["dense", "spg", "spg", "dense"] * 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu, batch 2 x 1.0 s, 4 alternating")
    assert_pair_summary(lines, "eval-time")


def test_step_overhead_alternates_training_steps_and_prints_the_ratio_line(
    monkeypatch, capsys, flush_off
):
    step_overhead = load_benchmark("step_overhead", monkeypatch)
    monkeypatch.setattr(
        step_overhead,
        "hub_config",
        lambda hub_id: build_config("wav2vec2", **TINY_OVERRIDES),
    )
    order, steps = [], {}
    timed_step = step_overhead.timed_step

    def recording_step(setup, device):
        name = "spg" if hasattr(setup[0], "gate") else "dense"
        order.append(name)
        # Subnormals flushed, as in the recipe.
        assert flushing() == supported
        before = setup[0].gate.step_count if name == "spg" else None
        seconds = timed_step(setup, device)
        if name == "spg":
            steps.setdefault("spg", []).append(setup[0].gate.step_count)
            assert setup[0].gate.step_count == before + 1
        # Gradients are cleared after each step (SpeechBrain's order).
        assert all(p.grad is None for p in setup[0].parameters())
        return seconds

    monkeypatch.setattr(step_overhead, "timed_step", recording_step)
    supported = flush_off
    step_overhead.main(
        ["--models", "facebook/wav2vec2-base", "--pairs", "4", "--warmup", "1"]
    )
    # One warm-up step each, then pairs in alternating order.
    assert order == ["dense", "spg"] + ["dense", "spg", "spg", "dense"] * 2
    assert steps["spg"] == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    # Between the times and the ratio statistics (Unix).
    assert re.fullmatch(
        r"  minor page faults per step \(medians\): dense \d+, spg \d+",
        lines[-3],
    ), lines[-3]
    assert lines[0].startswith(
        "device cpu, batch 2 x 1.0 s, SPG variant compiled, 4 alternating"
    )
    assert_pair_summary(lines, "step-time")


def test_step_overhead_refuses_dense_as_the_spg_variant(monkeypatch, capsys):
    step_overhead = load_benchmark("step_overhead", monkeypatch)
    with pytest.raises(SystemExit):
        step_overhead.main(["--variant", "dense"])
    assert "--variant must be an SPG variant, got 'dense'" in (
        capsys.readouterr().err
    )


def test_eval_overhead_refuses_a_lobe_that_does_not_cache(monkeypatch):
    eval_overhead = load_benchmark("eval_overhead", monkeypatch)
    monkeypatch.setattr(
        eval_overhead,
        "hub_config",
        lambda hub_id: build_config("wav2vec2", **TINY_OVERRIDES),
    )
    # A gated layer whose cache is dropped after every pass.
    forward = eval_overhead.GatedLinear.forward

    def forgetful(self, x):
        out = forward(self, x)
        self._cache = None
        return out

    monkeypatch.setattr(eval_overhead.GatedLinear, "forward", forgetful)
    with pytest.raises(RuntimeError, match=r"only 0 of \d+ gated layers"):
        eval_overhead.main(["--models", "x", "--pairs", "2", "--warmup", "1"])


def test_sparsity_controller_prints_and_plots_both_controllers(
    monkeypatch, capsys, tmp_path, flush_off
):
    controller = load_benchmark("sparsity_controller", monkeypatch)
    png = tmp_path / "traces.png"
    argv = ["--steps", "12", "--ramp-steps", "4", "--log-interval", "4"]
    rows = controller.main(argv + ["--target", "0.5", "--plot", str(png)])
    assert [row[:3] for row in rows] == [
        ("projection", "alone", 0),
        ("projection", "task", 0),
        ("lagrangian", "alone", 0),
        ("lagrangian", "task", 0),
    ]
    # The projection is on the target (hard) from the first steps; the
    # Lagrangian is far below it after 12 steps.
    for _, _, _, hard, gap in rows[:2]:
        assert abs(hard - 0.5) <= 0.005 and gap <= 0.01
    assert all(hard < 0.3 for _, _, _, hard, _ in rows[2:])
    assert_png(png)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["controller", "setting", "seed", "hard"] + [
        "max",
        "|soft",
        "-",
        "target|",
        "layers",
    ]
    assert len(lines) == 6 and lines[-1] == f"traces: {png}"
    assert not flushing()  # the setting the benchmark found is restored


def test_export_size_prints_sizes_and_alternated_load_times(
    monkeypatch, capsys
):
    export_size = load_benchmark("export_size", monkeypatch)
    monkeypatch.setattr(
        export_size,
        "hub_config",
        lambda hub_id: build_config("wav2vec2", **TINY_OVERRIDES),
    )
    order = []
    best_times = export_size.best_times

    def recording(functions, repeats):
        order.append(list(functions))
        return best_times(functions, repeats)

    monkeypatch.setattr(export_size, "best_times", recording)
    rows = export_size.main(["--sparsities", "0.5", "0.8", "--repeats", "2"])
    # Per sparsity and dtype: loads, then loads + forward, the 3 loaders.
    assert order == [list(export_size.LOADERS)] * 8
    assert [(round(r["sparsity"], 2), r["dtype"]) for r in rows] == [
        (0.5, "float32"),
        (0.5, "float16"),
        (0.8, "float32"),
        (0.8, "float16"),
    ]
    for row in rows:
        # Compact-only: the folder is the compact file plus the manifest.
        assert row["ideal_bytes"] < row["export_bytes"] < row["dense_bytes"]
        assert row["dense16_bytes"] < row["dense_bytes"]
        for times in (row["load_s"], row["load_forward_s"]):
            assert sorted(times) == sorted(export_size.LOADERS)
            assert all(t > 0 for t in times.values())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model: facebook/wav2vec2-base (random")
    assert lines[1].split() == [
        "sparsity", "dtype", "dense32", "MB", "dense16", "MB", "export", "MB",
        "/dense32", "/ideal",
    ]  # fmt: skip
    sizes = [line.split() for line in lines[2:6]]
    assert [cells[:2] for cells in sizes] == [
        ["0.5000", "float32"],
        ["0.5000", "float16"],
        ["0.8000", "float32"],
        ["0.8000", "float16"],
    ]
    for cells, row in zip(sizes, rows):
        ratio = row["export_bytes"] / row["ideal_bytes"]
        assert float(cells[-1]) == pytest.approx(ratio, abs=1e-4)
    times = lines[-4:]
    assert all(line.count("x)") == 4 for line in times)


def tiny_hub_config(hub_id):
    """A tiny configuration of the family of a hub model."""
    return build_config(
        "hubert" if "hubert" in hub_id else "wav2vec2", **TINY_OVERRIDES
    )


def test_inference_speed_alternates_three_models_and_prints_the_ratio_line(
    monkeypatch, capsys
):
    inference_speed = load_benchmark("inference_speed", monkeypatch)
    monkeypatch.setattr(inference_speed, "hub_config", tiny_hub_config)
    order = []
    timed_pass = inference_speed.timed_pass

    def recording(name, function, inputs):
        order.append(name)
        assert torch.is_inference_mode_enabled()
        assert inputs.shape == (1, 16000)
        return timed_pass(name, function, inputs)

    monkeypatch.setattr(inference_speed, "timed_pass", recording)
    rows = inference_speed.main(["--rounds", "3", "--seconds", "1"])
    variants = list(inference_speed.VARIANTS)
    assert variants == ["dense", "unstructured", "structured"]
    # Per model (both defaults): one warm-up pass each, then every round
    # times each model once, the starting model rotating.
    rotated = [variants[r:] + variants[:r] for r in range(3)]
    per_model = variants + [name for turn in rotated for name in turn]
    assert order == per_model * 2
    models = ["facebook/wav2vec2-base", "facebook/hubert-large-ll60k"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        (model, variant) for model in models for variant in variants
    ]
    for model in models:
        dense, unstructured, structured = (
            r for r in rows if r["model"] == model
        )
        # Same fraction of the gated weights removed by both exports.
        assert unstructured["gated_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert structured["gated_sparsity"] == pytest.approx(0.5, abs=1e-3)
        # Unstructured loads back at the dense shapes; structured is smaller.
        assert unstructured["weight_bytes"] == dense["weight_bytes"]
        assert structured["weight_bytes"] < dense["weight_bytes"]
        assert structured["file_bytes"] < dense["file_bytes"]
        # The equivalence checks were computed (and pass).
        assert dense["max_abs_diff"] is None
        assert 0 <= structured["max_abs_diff"] < 1e-4
        assert 0 <= unstructured["max_abs_diff"] < 1e-4
        for row in (dense, unstructured, structured):
            assert len(row["times_s"]) == 3 and all(
                t > 0 for t in row["times_s"]
            )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu, torch threads ")
    for model in models:
        start = lines.index(
            next(x for x in lines if x.startswith(f"model: {model} "))
        )
        assert lines[start + 1].split()[:4] == [
            "variant", "gated", "sp.", "latency",
        ]  # fmt: skip
        table = [line.split() for line in lines[start + 2 : start + 5]]
        assert [cells[0] for cells in table] == variants
        model_rows = [r for r in rows if r["model"] == model]
        for cells, row in zip(table, model_rows):
            # sparsity, latency, /dense, rounds, weights, /dense, files, /dense
            assert len(cells) == 9
            assert float(cells[3]) == pytest.approx(
                row["latency_ratio"], abs=1e-3
            )
            assert float(cells[6]) == pytest.approx(
                row["weight_ratio"], abs=1e-3
            )
            assert float(cells[8]) == pytest.approx(row["file_ratio"], abs=1e-3)
        assert table[0][3] == table[0][6] == table[0][8] == "1.000"
        assert table[1][6] == "1.000"  # unstructured: dense shapes
        assert float(table[2][6]) < 1
        for variant, line in zip(variants[1:], lines[start + 5 : start + 7]):
            match = re.fullmatch(
                rf"check: {variant} export vs its pruned lobe, max abs diff "
                r"(\d\.\d\de[+-]\d\d)",
                line,
            )
            assert match and float(match.group(1)) < 1e-4
        ratio = re.fullmatch(
            r"inference latency ratio structured/dense: (\d+\.\d+)",
            lines[start + 7],
        )
        structured = model_rows[2]["latency_ratio"]
        assert float(ratio.group(1)) == pytest.approx(structured, abs=1e-3)
    # The last line: the first model's ratio, a plain decimal.
    match = re.fullmatch(
        r"inference latency ratio structured/dense: (\d+\.\d+)", lines[-1]
    )
    assert match and float(match.group(1)) == pytest.approx(
        rows[2]["latency_ratio"], abs=1e-3
    )
    assert lines[-2] == "first model, facebook/wav2vec2-base:"


def test_inference_speed_check_catches_a_wrong_structured_export(monkeypatch):
    import os

    inference_speed = load_benchmark("inference_speed", monkeypatch)
    monkeypatch.setattr(inference_speed, "hub_config", tiny_hub_config)
    load_compact = inference_speed.load_compact

    def wrong_load(folder):
        model = load_compact(folder)
        if os.path.basename(folder) == "structured":
            # A shrink that pairs the kept units of the feed-forward's two
            # matrices in different orders, say.
            output_dense = model.encoder.layers[0].feed_forward.output_dense
            with torch.no_grad():
                output_dense.weight.copy_(output_dense.weight.flip(1))
        return model

    monkeypatch.setattr(inference_speed, "load_compact", wrong_load)
    rows = inference_speed.main(
        ["--models", "facebook/wav2vec2-base", "--rounds", "1"]
        + ["--seconds", "0.5"]
    )
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["unstructured"]["max_abs_diff"] < 1e-4
    assert by_variant["structured"]["max_abs_diff"] > 1e-3


def test_alternating_latency_returns_the_median_of_each_model(monkeypatch):
    inference_speed = load_benchmark("inference_speed", monkeypatch)
    clock = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 7.0, 6.0])}
    calls = []

    def fake_pass(name, function, inputs):
        calls.append(name)
        function(inputs)
        return next(clock[name])

    monkeypatch.setattr(inference_speed, "timed_pass", fake_pass)
    ran = []
    models = {"a": ran.append, "b": ran.append}
    medians = inference_speed.alternating_latency(models, "x", rounds=3)
    # The warm-up pass (9.0) is not counted.
    assert medians == {"a": 2.0, "b": 6.0}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert ran == ["x"] * 8
