"""The performance benchmarks run and print what their docstrings promise.

Run on tiny random models (the full-size ones take minutes); the numbers
are not checked (tests never assert timings), their presence and format
are.
"""

import importlib.util
import re
import sys
from operator import itemgetter

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
    # Per sparsity and dtype: loads, then loads + forward, the 3 loaders
    # (int8: also load_compact(int8_linears=True)).
    loaders, int8_loaders = list(export_size.LOADERS), export_size.INT8_LOADERS
    assert list(int8_loaders) == loaders + ["int8_linears"]
    per_sparsity = [loaders] * 4 + [list(int8_loaders)] * 2
    assert order == per_sparsity * 2
    assert [(round(r["sparsity"], 2), r["dtype"]) for r in rows] == [
        (0.5, "float32"),
        (0.5, "float16"),
        (0.5, "int8"),
        (0.8, "float32"),
        (0.8, "float16"),
        (0.8, "int8"),
    ]
    for row in rows:
        # Compact-only: the folder is the compact file plus the manifest.
        assert row["ideal_bytes"] < row["export_bytes"] < row["dense_bytes"]
        assert row["dense16_bytes"] < row["dense_bytes"]
        expected = int8_loaders if row["dtype"] == "int8" else loaders
        for times in (row["load_s"], row["load_forward_s"]):
            assert sorted(times) == sorted(expected)
            assert all(t > 0 for t in times.values())
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model: facebook/wav2vec2-base (random")
    assert lines[1].split() == [
        "sparsity", "dtype", "dense32", "MB", "dense16", "MB", "export", "MB",
        "/dense32", "/ideal",
    ]  # fmt: skip
    sizes = [line.split() for line in lines[2:8]]
    assert [cells[:2] for cells in sizes] == [
        ["0.5000", "float32"],
        ["0.5000", "float16"],
        ["0.5000", "int8"],
        ["0.8000", "float32"],
        ["0.8000", "float16"],
        ["0.8000", "int8"],
    ]
    for cells, row in zip(sizes, rows):
        ratio = row["export_bytes"] / row["ideal_bytes"]
        assert float(cells[-1]) == pytest.approx(ratio, abs=1e-4)
        dense = row["export_bytes"] / row["dense_bytes"]
        assert float(cells[-2]) == pytest.approx(dense, abs=1e-3)
    times = lines[-6:]
    # Two ratios (load, + forward) per loader after dense.
    assert [line.split()[:2] for line in times] == [
        cells[:2] for cells in sizes
    ]
    assert [line.count("x)") for line in times] == [4, 4, 6] * 2
    for line, row in zip(times, rows):
        ratios = [float(x) for x in re.findall(r"\((\d+\.\d\d)x\)", line)]
        for key, printed in zip(
            ("load_s", "load_forward_s"),
            (ratios[: len(ratios) // 2], ratios[len(ratios) // 2 :]),
        ):
            t = row[key]
            expected = [
                t[name] / t["dense"] for name in int8_loaders[1:] if name in t
            ]
            assert printed == pytest.approx(expected, abs=0.006)


def tiny_hub_config(hub_id):
    """A tiny configuration of the family of a hub model."""
    return build_config(
        "hubert" if "hubert" in hub_id else "wav2vec2", **TINY_OVERRIDES
    )


def rotation_schedule(names, rounds):
    """The order of ``alternating_times``: one warm-up pass each, then every
    round times each model once, the starting model rotating."""
    turns = [
        names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)
    ]
    return names + [name for turn in turns for name in turn]


def inference_table(lines, model):
    """Index of a model's ``model:`` line and its table: variant (which may
    hold spaces) -> its 8 number cells, in printed order."""
    start = lines.index(
        next(x for x in lines if x.startswith(f"model: {model} "))
    )
    assert lines[start + 1].split()[:4] == [
        "variant", "gated", "sp.", "latency",
    ]  # fmt: skip
    table = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) < 9 or not re.fullmatch(r"\d\.\d{4}", cells[-8]):
            break
        table[" ".join(cells[:-8])] = cells[-8:]
    return start, table


def test_inference_speed_alternates_all_variants_and_prints_the_ratio_lines(
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
    assert variants == [
        "dense",
        "unstructured",
        "structured",
        "unstructured int8 (dynamic int8 linears)",
        "structured int8 (dynamic int8 linears)",
        "structured ONNX fp32",
        "structured ONNX int8",
    ]
    # Per model (both defaults, both with the ONNX rows): every variant
    # timed in the same alternation.
    assert order == rotation_schedule(variants, 3) * 2
    models = ["facebook/wav2vec2-base", "facebook/hubert-large-ll60k"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        (model, variant) for model in models for variant in variants
    ]
    for model in models:
        by_variant = {r["variant"]: r for r in rows if r["model"] == model}
        dense = by_variant["dense"]
        unstructured, structured = (
            by_variant["unstructured"],
            by_variant["structured"],
        )
        u8, s8 = (by_variant[v] for v in variants[3:5])
        # Same fraction of the gated weights removed by every export.
        for row in list(by_variant.values())[1:]:
            assert row["gated_sparsity"] == pytest.approx(0.5, abs=1e-3)
        # Unstructured loads back at the dense shapes; structured is smaller.
        assert unstructured["weight_bytes"] == dense["weight_bytes"]
        assert structured["weight_bytes"] < dense["weight_bytes"]
        assert structured["file_bytes"] < dense["file_bytes"]
        # int8: smaller than its float32 export, in memory and on disk.
        for int8, fp32 in ((u8, unstructured), (s8, structured)):
            assert int8["weight_bytes"] < fp32["weight_bytes"]
            assert int8["file_bytes"] < fp32["file_bytes"]
            assert int8["runtime"] == "torch"
            # Compared with its float32 export: int8 rounding, not zero.
            assert 0 < int8["max_abs_diff"] < 0.1
        assert s8["weight_bytes"] < u8["weight_bytes"]
        # The equivalence checks were computed (and pass).
        assert dense["max_abs_diff"] is None
        assert 0 <= structured["max_abs_diff"] < 1e-4
        assert 0 <= unstructured["max_abs_diff"] < 1e-4
        for row in by_variant.values():
            assert len(row["times_s"]) == 3
            assert all(t > 0 for t in row["times_s"])
        onnx32, onnx8 = (by_variant[v] for v in variants[5:])
        assert onnx32["runtime"] == onnx8["runtime"] == "onnxruntime"
        assert 0 <= onnx32["max_abs_diff"] < 1e-4
        assert 0 < onnx8["max_abs_diff"] < 0.1
        for row in (onnx32, onnx8):  # initializers: the file less the graph
            assert 0 < row["weight_bytes"] < row["file_bytes"]
        assert onnx32["weight_bytes"] == pytest.approx(
            structured["weight_bytes"], rel=0.05
        )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu, torch threads ")
    assert lines[1].startswith("ONNX rows: onnxruntime ")
    for model in models:
        start, table = inference_table(lines, model)
        model_rows = [r for r in rows if r["model"] == model]
        assert list(table) == [r["variant"] for r in model_rows]
        for row in model_rows:
            # sparsity, latency, /dense, rounds, weights, /dense, files, /dense
            cells = table[row["variant"]]
            ratios = (
                row["latency_ratio"],
                row["weight_ratio"],
                row["file_ratio"],
            )
            for cell, ratio in zip(itemgetter(2, 5, 7)(cells), ratios):
                assert float(cell) == pytest.approx(ratio, abs=1e-3)
            low, high = map(float, cells[3].split("-"))
            assert low - 1e-3 <= row["latency_ratio"] <= high + 1e-3
        assert table["dense"][2] == table["dense"][5] == "1.000"
        assert table["dense"][7] == "1.000"
        assert table["unstructured"][5] == "1.000"  # dense shapes
        assert float(table["structured"][5]) < 1
        after = start + 2 + len(table)
        assert lines[after].startswith("weights: parameters and buffers")
        assert lines[after + 1].startswith("files: the export folder")
        checks = lines[after + 2 : after + 1 + len(table)]
        for row, line in zip(model_rows[1:], checks):
            variant = re.escape(row["variant"])
            if row["variant"] in ("unstructured", "structured"):
                pattern = rf"check: {variant} export vs its pruned lobe, "
            elif row["variant"] == "structured ONNX fp32":
                pattern = (
                    rf"check: {variant} vs the structured export in "
                    r"PyTorch, "
                )
            else:
                source = row["variant"].split()[0]
                pattern = rf"check: {variant} vs the float32 {source} export, "
            pattern += r"max abs diff (\d\.\d\de[+-]\d\d)"
            pattern += {
                "unstructured": "",
                "structured": "",
                "structured ONNX fp32": r" \(at most 1e-04\)",
            }.get(row["variant"], r" \(int8 rounding, not checked\)")
            match = re.fullmatch(pattern, line)
            assert match, line
            assert float(match.group(1)) == pytest.approx(
                row["max_abs_diff"], rel=0.01, abs=1e-12
            )
        onnx_line, ratio_line = lines[after + 1 + len(table) :][:2]
        onnx = re.fullmatch(
            r"inference latency ratio structured ONNX int8/dense: "
            r"(\d+\.\d{3})",
            onnx_line,
        )
        assert float(onnx.group(1)) == pytest.approx(
            model_rows[6]["latency_ratio"], abs=1e-3
        )
        ratio = re.fullmatch(
            r"inference latency ratio structured/dense: (\d+\.\d+)",
            ratio_line,
        )
        structured = model_rows[2]["latency_ratio"]
        assert float(ratio.group(1)) == pytest.approx(structured, abs=1e-3)
    # The last two lines: the first model's ratios, plain decimals.
    assert lines[-3] == "first model, facebook/wav2vec2-base:"
    match = re.fullmatch(
        r"inference latency ratio structured ONNX int8/dense: (\d+\.\d+)",
        lines[-2],
    )
    assert match and float(match.group(1)) == pytest.approx(
        rows[6]["latency_ratio"], abs=1e-3
    )
    match = re.fullmatch(
        r"inference latency ratio structured/dense: (\d+\.\d+)", lines[-1]
    )
    assert match and float(match.group(1)) == pytest.approx(
        rows[2]["latency_ratio"], abs=1e-3
    )


def test_inference_speed_check_catches_a_wrong_structured_export(monkeypatch):
    import os

    inference_speed = load_benchmark("inference_speed", monkeypatch)
    monkeypatch.setattr(inference_speed, "hub_config", tiny_hub_config)
    load_compact = inference_speed.load_compact

    def wrong_load(folder, **kwargs):
        model = load_compact(folder, **kwargs)
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


def test_inference_speed_skips_the_onnx_rows_without_onnxruntime(
    monkeypatch, capsys
):
    inference_speed = load_benchmark("inference_speed", monkeypatch)
    monkeypatch.setattr(inference_speed, "hub_config", tiny_hub_config)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    argv = ["--models", "facebook/wav2vec2-base", "--rounds", "1"]
    argv += ["--seconds", "0.5"]
    # Without the option: stops before measuring, naming the package.
    with pytest.raises(SystemExit) as stop:
        inference_speed.main(argv)
    message = str(stop.value)
    assert "optional package onnxruntime, which is not installed" in message
    assert message.endswith("(or pass --skip-missing-onnx)")
    assert capsys.readouterr().out.startswith("device cpu")
    rows = inference_speed.main(argv + ["--skip-missing-onnx"])
    # The int8 rows stay; the ONNX rows are left out, saying so.
    assert [r["variant"] for r in rows] == list(inference_speed.VARIANTS[:5])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith(
        "ONNX rows skipped: benchmarks/inference_speed.py (ONNX rows) needs "
        "the optional package onnxruntime"
    )
    assert lines[-2] == (
        "inference latency ratio structured ONNX int8/dense: skipped "
        "(onnxruntime not installed)"
    )
    assert re.fullmatch(
        r"inference latency ratio structured/dense: \d+\.\d{3}", lines[-1]
    )
    # --onnx-models without a model: no ONNX rows, without the packages.
    rows = inference_speed.main(argv + ["--onnx-models"])
    assert [r["variant"] for r in rows] == list(inference_speed.VARIANTS[:5])
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any(line.startswith("ONNX rows") for line in lines)
    assert lines[-2] == (
        "inference latency ratio structured ONNX int8/dense: skipped "
        "(not in --onnx-models)"
    )


def test_inference_speed_refuses_an_onnx_model_unlike_pytorch(
    monkeypatch, capsys
):
    inference_speed = load_benchmark("inference_speed", monkeypatch)
    monkeypatch.setattr(inference_speed, "hub_config", tiny_hub_config)
    export = inference_speed.export_onnx_encoder

    def wrong_export(model, example, path, **kwargs):
        output_dense = model.encoder.layers[0].feed_forward.output_dense
        with torch.no_grad():
            output_dense.weight.copy_(output_dense.weight.flip(1))
        return export(model, example, path, **kwargs)

    monkeypatch.setattr(inference_speed, "export_onnx_encoder", wrong_export)
    order = []
    monkeypatch.setattr(
        inference_speed, "timed_pass", lambda name, *args: order.append(name)
    )
    argv = ["--models", "facebook/wav2vec2-base", "--rounds", "1"]
    with pytest.raises(
        RuntimeError,
        match=r"structured ONNX fp32 model's output differs from the "
        r"structured export's in PyTorch by \S+ \(> 0.0001\)",
    ):
        inference_speed.main(argv + ["--seconds", "0.5"])
    assert order == []  # refused before timing
    # --onnx-models names models of --models only.
    with pytest.raises(SystemExit):
        inference_speed.main(argv + ["--onnx-models", "facebook/wavlm-base"])
    assert "--onnx-models: not in --models: facebook/wavlm-base" in (
        capsys.readouterr().err
    )
