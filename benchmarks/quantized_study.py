#!/usr/bin/env python3
"""int8 and ONNX against the float32 export of one SPG run (issue #28).

Takes the recipe's SPG run at 0.65 on the synthetic corpus, as the synthetic
study runs it (reused if its ``summary.json`` exists, else run first: from
``recipes/LibriSpeech/spg``, ``python train.py hparams/tiny_spg.yaml
--output_folder=results/synthetic_study/spg_0.65 --number_of_epochs=3
--evaluate_initial_model=False --target_sparsity=0.65``). Its ``compact/``
is the float32 inference folder the recipe evaluated (the export loaded
back from disk). From that one model it makes:

- ``int8``: the same folder with an int8 ``compact.safetensors``
  (``speechbrain_spg.tools.convert.convert_inference_folder``: the export's
  own quantisation, one scale per output row, the rest float16), loaded by
  ``EncoderASR`` as any folder (weights dequantised to float32);
- ``int8, dynamic int8 linears``: that folder with its gated linears
  replaced by PyTorch's dynamically quantised ones
  (``load_compact(..., int8_linears=True)``);
- ``ONNX float32`` and ``ONNX int8``: ``export_onnx`` of the float32 folder
  (int8: ONNX Runtime's dynamic quantisation of the matrix products), run
  by ONNX Runtime (``export_onnx.OnnxASR``, greedy CTC).

Every variant transcribes the rows of the run's test CSV files
(``<run>/save/<split>.csv``) through ``transcribe.transcribe_files`` with
the same batching (default one file at a time: no padding), so that only the
model differs. Per variant and split it writes ``hyps_<split>.jsonl`` (id,
ref, hyp: the recipe's format) under ``<run>/quantized_study/<variant>/``,
the WER and the MAPSSWE p-value against the float32 folder's transcripts
(``compare_hypothesis_files``). It also gives the largest absolute
difference between ONNX Runtime's float32 log-probabilities and PyTorch's
on a few test utterances (alone and as one padded batch), and the recipe's
own hypotheses of the export (SpeechBrain's batches) against the float32
folder's, as a check that the folder is the model the recipe evaluated.

The table, the command, the machine, the date, the commit and the issue's
goal lines are printed and written to ``benchmarks/quantized_study.md``.

Usage (from the repository root; one core is enough):
    OMP_NUM_THREADS=1 python benchmarks/quantized_study.py

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from speechbrain_spg.evaluation.compare import hypotheses_file
from speechbrain_spg.evaluation.significance import (
    compare_hypothesis_files,
    load_hypotheses,
    word_errors,
)
from speechbrain_spg.export import COMPACT_FILE, load_compact, read_manifest
from speechbrain_spg.tools.convert import convert_inference_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "LibriSpeech", "spg")
RUN = os.path.join(RECIPE, "results", "synthetic_study", "spg_0.65")
OUT_MD = os.path.join(ROOT, "benchmarks", "quantized_study.md")
SPLITS = ("test-clean", "test-other")
ALPHA = 0.05
#: ONNX float32 against PyTorch, log-probabilities (the issue's bound).
LOGPROB_TOLERANCE = 1e-4
#: The float32 inference folder, the reference of every p-value.
BASELINE = "float32 folder (PyTorch)"
INT8 = "int8 folder (PyTorch, dequantised)"
INT8_LINEARS = "int8 folder, dynamic int8 linears (PyTorch)"
ONNX_FP32 = "ONNX float32 (ONNX Runtime)"
ONNX_INT8 = "ONNX int8 (ONNX Runtime)"


def ensure_run(run_dir, epochs=3, target=0.65):
    """The recipe's SPG run, as the synthetic study runs it (reused when its
    ``summary.json`` exists); returns its folder after checking that it
    exported a float32 inference folder and evaluated it."""
    if not os.path.isfile(os.path.join(run_dir, "summary.json")):
        command = [
            sys.executable,
            "train.py",
            "hparams/tiny_spg.yaml",
            f"--output_folder={run_dir}",
            f"--number_of_epochs={epochs}",
            "--evaluate_initial_model=False",
            f"--target_sparsity={target}",
        ]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, cwd=RECIPE, check=True)
    else:
        print(f"reusing {run_dir}")
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    if "sparsity" not in summary:  # the recipe evaluates the export then
        raise RuntimeError(f"{run_dir}: no compact export in the summary.")
    dtype = read_manifest(os.path.join(run_dir, "compact"))["dtype"]
    if dtype != "float32":
        raise RuntimeError(f"{run_dir}/compact is {dtype}, not float32.")
    return summary


def split_rows(run_dir, split):
    """``[(id, wav, ref)]`` of a split: the rows of the run's test CSV."""
    path = os.path.join(run_dir, "save", f"{split}.csv")
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["ID"], r["wav"], r["wrd"]) for r in csv.DictReader(f)]


def make_variants(folder, work, int8_linears=True):
    """Builds the int8 folder and the ONNX files from the float32 folder;
    returns ``{name: spec}`` (what ``load_variant`` loads) and the largest
    log-probability differences ``export_onnx`` measured on its probes."""
    from speechbrain_spg.export_onnx import export_onnx

    int8_folder = os.path.join(work, "compact_int8")
    convert_inference_folder(folder, int8_folder, "int8", overwrite=True)
    onnx_fp32 = os.path.join(work, "model.onnx")
    onnx_int8 = os.path.join(work, "model.int8.onnx")
    probes = {
        "float32": export_onnx(folder, onnx_fp32)["max_abs_diff"],
        "int8": export_onnx(folder, onnx_int8, int8=True)[
            "max_abs_diff_written"
        ],
    }
    variants = {
        BASELINE: {
            "folder": folder,
            "file": os.path.join(folder, COMPACT_FILE),
        },
        INT8: {
            "folder": int8_folder,
            "file": os.path.join(int8_folder, COMPACT_FILE),
        },
    }
    if int8_linears:
        variants[INT8_LINEARS] = dict(variants[INT8], int8_linears=True)
    variants[ONNX_FP32] = {
        "folder": folder,
        "onnx": onnx_fp32,
        "file": onnx_fp32,
    }
    variants[ONNX_INT8] = {
        "folder": folder,
        "onnx": onnx_int8,
        "file": onnx_int8,
    }
    return variants, probes


def load_variant(spec, savedir):
    """The model of a variant, with ``transcribe_batch`` and
    ``audio_normalizer`` (what ``transcribe.transcribe_files`` uses)."""
    if "onnx" in spec:
        from speechbrain_spg.export_onnx import OnnxASR

        return OnnxASR(spec["onnx"], spec["folder"])
    from speechbrain_spg.tools.inference import load_asr

    asr = load_asr(spec["folder"], savedir=savedir)
    if spec.get("int8_linears"):
        ssl = asr.mods.encoder.ssl
        model = load_compact(spec["folder"], int8_linears=True)
        model.config.apply_spec_augment = ssl.model.config.apply_spec_augment
        ssl.model = model.eval()
    return asr


def transcribe_rows(asr, rows, batch_size):
    """``{id: hypothesis}`` of the rows (``transcribe_files``); a file that
    fails stops the study (every test file is expected to transcribe)."""
    from speechbrain_spg.transcribe import transcribe_files

    results = transcribe_files(asr, [wav for _, wav, _ in rows], batch_size)
    hyps = {}
    for (uid, _, _), (path, text, error) in zip(rows, results):
        if error is not None:
            raise RuntimeError(f"{path}: {error}")
        hyps[uid] = text
    return hyps


def write_hyps(path, rows, hyps):
    """A hypotheses file in the recipe's format: one JSON object per line,
    ``{"id", "ref", "hyp"}``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for uid, _, ref in rows:
            record = {"id": uid, "ref": ref, "hyp": hyps[uid]}
            f.write(json.dumps(record) + "\n")
    return path


def wer_of(path):
    """The WER (percent) of a hypotheses file: word edits over reference
    words."""
    errors = words = 0
    for ref, hyp in load_hypotheses(path).values():
        subs, dels, ins, _ = word_errors(ref, hyp)
        errors += subs + dels + ins
        words += len(ref.split())
    return 100.0 * errors / max(words, 1)


def differing(path_a, path_b):
    """How many utterances two hypotheses files transcribe differently."""
    a, b = load_hypotheses(path_a), load_hypotheses(path_b)
    return sum(a[uid][1].split() != b[uid][1].split() for uid in a)


def logprob_diff(asr, onnx_asr, wavs):
    """The largest absolute difference between PyTorch's (``asr``,
    ``EncoderASR.encode_batch``) and ONNX Runtime's log-probabilities:
    ``{"alone": each waveform as a batch of one, "padded": all of them as
    one zero-padded batch (every row's frames up to its length)}``."""
    from speechbrain_spg.transcribe import pad_batch

    alone = 0.0
    for wav in wavs:
        with torch.no_grad():
            expected = asr.encode_batch(wav[None], torch.ones(1)).numpy()
        got = onnx_asr.log_probs(wav[None], torch.ones(1))
        alone = max(alone, _max_diff(got, expected, torch.ones(1)))
    batch, lens = pad_batch(wavs)
    with torch.no_grad():
        expected = asr.encode_batch(batch, lens).numpy()
    got = onnx_asr.log_probs(batch, lens)
    return {"alone": alone, "padded": _max_diff(got, expected, lens)}


def graph_diff(asr, wavs):
    """The same padded batch through ``export_onnx.CTCGraph`` (the module
    the ONNX export traces, run by PyTorch) against ``encode_batch``: how
    far PyTorch's own two ways of computing it are apart."""
    from speechbrain_spg.export_onnx import CTCGraph
    from speechbrain_spg.transcribe import pad_batch

    batch, lens = pad_batch(wavs)
    with torch.no_grad():
        expected = asr.encode_batch(batch, lens).numpy()
        got = CTCGraph(asr.mods.encoder).eval()(batch, lens).numpy()
    return _max_diff(got, expected, lens)


def float64_diff(asr, onnx_asr, wavs):
    """The padded batch against PyTorch in float64 (``asr``'s encoder is
    converted: call last): ``{"pytorch": float32 PyTorch, "onnx": ONNX
    Runtime float32}``, each one's largest difference to float64."""
    from speechbrain_spg.transcribe import pad_batch

    batch, lens = pad_batch(wavs)
    with torch.no_grad():
        pytorch = asr.encode_batch(batch, lens).numpy()
        encoder = asr.mods.encoder.double()
        exact = encoder(batch.double(), lens.double()).numpy()
    onnx = onnx_asr.log_probs(batch, lens)
    return {
        "pytorch": _max_diff(pytorch, exact, lens),
        "onnx": _max_diff(onnx, exact, lens),
    }


def _max_diff(got, expected, lens):
    """The largest absolute difference over each row's frames up to
    ``round(length * frames)`` (what CTC decoding reads)."""
    if got.shape != expected.shape:
        return float("inf")
    frames = expected.shape[1]
    diff = 0.0
    for row, length in enumerate(lens.tolist()):
        n = max(1, int(round(length * frames)))
        diff = max(diff, float(np.abs(got[row, :n] - expected[row, :n]).max()))
    return diff


def study(folder, splits, work, batch_size=1, int8_linears=True, logprob_n=4):
    """Runs every variant on the splits.

    Arguments
    ---------
    folder : str
        The float32 inference folder.
    splits : dict
        Split -> ``[(id, wav, ref)]``.
    work : str
        Where the int8 folder, the ONNX files and the hypotheses go.
    batch_size : int
        Files per forward pass, the same for every variant.
    int8_linears : bool
        Include the dynamic int8 linears variant.
    logprob_n : int
        Utterances of each split for the log-probability comparison.

    Returns
    -------
    dict
        ``variants`` (name -> size, per-split WER, p, differing count,
        seconds), ``logprob`` (ONNX vs PyTorch on test utterances, float32
        and int8, alone and padded), ``graph_padded`` (``graph_diff``),
        ``float64_padded`` (``float64_diff``),
        ``probes`` (the export's own check) and ``fp32_bytes``.
    """
    from speechbrain_spg.export_onnx import OnnxASR
    from speechbrain_spg.transcribe import read_audio

    variants, probes = make_variants(folder, work, int8_linears)
    out = {"variants": {}, "probes": probes}
    base_bytes = os.path.getsize(variants[BASELINE]["file"])
    out["fp32_bytes"] = base_bytes
    with tempfile.TemporaryDirectory(prefix="spg-quantized-") as savedir:
        for name, spec in variants.items():
            asr = load_variant(spec, os.path.join(savedir, _slug(name)))
            row = {
                "bytes": os.path.getsize(spec["file"]),
                "dir": os.path.join(work, _slug(name)),
                "wer": {},
                "p": {},
                "differ": {},
                "seconds": 0.0,
            }
            row["ratio"] = row["bytes"] / base_bytes
            for split, rows in splits.items():
                start = time.perf_counter()
                hyps = transcribe_rows(asr, rows, batch_size)
                row["seconds"] += time.perf_counter() - start
                path = write_hyps(
                    hypotheses_file(row["dir"], split), rows, hyps
                )
                row["wer"][split] = wer_of(path)
            out["variants"][name] = row
            print(f"{name}: WER {row['wer']}", flush=True)
        base = out["variants"][BASELINE]["dir"]
        for row in out["variants"].values():
            for split in splits:
                a = hypotheses_file(row["dir"], split)
                b = hypotheses_file(base, split)
                row["p"][split] = compare_hypothesis_files(
                    a, b, alpha=ALPHA
                ).mapsswe.p_value
                row["differ"][split] = differing(a, b)
        asr = load_variant(variants[BASELINE], os.path.join(savedir, "lp"))
        normalize = asr.audio_normalizer
        wavs = []
        for rows in splits.values():
            for _, wav, _ in rows[:logprob_n]:
                wavs.append(read_audio(wav, normalize))
        out["logprob"] = {
            precision: logprob_diff(
                asr, OnnxASR(variants[name]["onnx"], folder), wavs
            )
            for precision, name in (("float32", ONNX_FP32), ("int8", ONNX_INT8))
        }
        out["logprob_utterances"] = len(wavs)
        out["graph_padded"] = graph_diff(asr, wavs)
        out["float64_padded"] = float64_diff(
            asr, OnnxASR(variants[ONNX_FP32]["onnx"], folder), wavs
        )
    return out


def _slug(name):
    """A folder name for a variant."""
    keep = [c if c.isalnum() else "_" for c in name.lower()]
    return "_".join(filter(None, "".join(keep).split("_")))


def machine():
    """One line describing where the study ran."""
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return (
        f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs "
        f"(torch threads: {threads}), torch {torch.__version__}"
    )


def commit():
    """The repository's commit (``+ uncommitted changes`` when dirty)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (
        " (+ uncommitted changes in the working tree)" if dirty else ""
    )


def yes_no(flag):
    """``met`` / ``NOT met``."""
    return "met" if flag else "NOT met"


def markdown(result, splits, argv, recipe=None, batch_size=1):
    """The study's Markdown: table, command, machine, goals.

    Arguments
    ---------
    result : dict
        ``study``'s result.
    splits : sequence of str
        The splits, in order.
    argv : list of str
        The command line's arguments.
    recipe : dict, optional
        Split -> ``(WER, p vs the float32 folder, differing utterances)`` of
        the recipe's own hypotheses of the export.
    batch_size : int
        The batching every variant used.

    Returns
    -------
    str
    """
    head = "| Variant | File | Size (MB) | vs float32 compact |"
    rule = "| --- | --- | ---: | ---: |"
    for split in splits:
        head += f" WER {split} | p vs float32 | differing |"
        rule += " ---: | ---: | ---: |"
    lines = [
        "# int8 and ONNX vs the float32 export (generated, not typed)",
        "",
        f"Command: `{' '.join(['OMP_NUM_THREADS=1 python benchmarks/quantized_study.py', *argv])}`",
        "",
        f"Machine: {machine()}  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Commit: {commit()}",
        "",
        "Model: the recipe's SPG run at 0.65 on the synthetic corpus "
        "(`tiny_spg.yaml`, 3 epochs, as the synthetic study runs it); its "
        "`compact/` float32 inference folder and, from it, the int8 folder "
        "(`tools.convert.convert_inference_folder`), the ONNX float32 and "
        "ONNX int8 models (`python -m speechbrain_spg.export_onnx`). "
        f"Every variant transcribes the rows of the run's test CSV files "
        f"with the same batching (`transcribe.transcribe_files`, batch "
        f"{batch_size}; greedy CTC). p: MAPSSWE (two-sided) against the "
        "float32 folder's transcripts (1 when identical); differing: "
        "utterances transcribed differently from the float32 folder. "
        "File: the model file each variant loads (the folders' "
        "`compact.safetensors`, the `.onnx` files); the ratio is to the "
        "float32 `compact.safetensors` (an ONNX model holds the full "
        "matrices, the pruned weights as zeros: ONNX Runtime has no sparse "
        "kernels; its int8 quantises the matrix products only).",
        "",
        head,
        rule,
    ]
    for name, row in result["variants"].items():
        file = "model.onnx" if "ONNX" in name else COMPACT_FILE
        if name == ONNX_INT8:
            file = "model.int8.onnx"
        cells = (
            f"| {name} | `{file}` | {row['bytes'] / 1e6:.3f} "
            f"| {row['ratio']:.3f} |"
        )
        for split in splits:
            cells += (
                f" {row['wer'][split]:.2f} | {row['p'][split]:.3g} "
                f"| {row['differ'][split]} |"
            )
        lines.append(cells)
    if recipe:
        cells = (
            "| recipe's evaluation of the export (SpeechBrain batches) | | | |"
        )
        for split in splits:
            wer, p, n = recipe[split]
            cells += f" {wer:.2f} | {p:.3g} | {n} |"
        lines.append(cells)
    logprob = result["logprob"]
    n = result["logprob_utterances"]
    lines += [
        "",
        "ONNX vs PyTorch log-probabilities (the float32 folder's "
        f"`EncoderASR.encode_batch`), largest absolute difference on {n} test "
        f"utterances ({n // len(splits)} of each split), over the frames "
        "that decoding reads:",
        "",
        "| ONNX model | each utterance alone | the utterances as one "
        "zero-padded batch |",
        "| --- | ---: | ---: |",
        *(
            f"| {precision} | {logprob[precision]['alone']:.3g} "
            f"| {logprob[precision]['padded']:.3g} |"
            for precision in ("float32", "int8")
        ),
        "",
        "For scale: on that padded batch, the module the ONNX export traces "
        "(`export_onnx.CTCGraph`, run by PyTorch) differs from "
        f"`encode_batch` by {result['graph_padded']:.3g}; against PyTorch "
        "in float64 on that batch, PyTorch float32 differs by "
        f"{result['float64_padded']['pytorch']:.3g} and ONNX Runtime float32 "
        f"by {result['float64_padded']['onnx']:.3g}. The export's own "
        "check on its probe waveforms (`export_onnx`'s `max_abs_diff`): "
        f"{result['probes']['float32']:.3g} (float32), "
        f"{result['probes']['int8']:.3g} (int8).",
        "",
        "### Goals (issue #28), checked on these runs",
        "",
    ]
    for name, row in result["variants"].items():
        if name == BASELINE:
            continue
        ok = all(row["p"][split] > ALPHA for split in splits)
        ps = ", ".join(f"{split} p = {row['p'][split]:.3g}" for split in splits)
        lines.append(
            f"- {name} not significantly different from the float32 "
            f"export (MAPSSWE, alpha {ALPHA}) on {' and '.join(splits)} "
            f"({ps}): **{yes_no(ok)}**"
        )
    for where, key in (
        ("each test utterance alone", "alone"),
        ("the test utterances as one zero-padded batch", "padded"),
    ):
        value = logprob["float32"][key]
        lines.append(
            f"- ONNX float32 log-probabilities within {LOGPROB_TOLERANCE:g} "
            f"of PyTorch's, {where} ({value:.3g}): "
            f"**{yes_no(value <= LOGPROB_TOLERANCE)}**"
        )
    return "\n".join(lines) + "\n"


def recipe_check(run_dir, work, splits):
    """Split -> (WER, p, differing) of the recipe's hypotheses of the
    export against the float32 folder's transcripts here."""
    out = {}
    for split in splits:
        recipe = hypotheses_file(run_dir, split)
        ours = hypotheses_file(os.path.join(work, _slug(BASELINE)), split)
        p = compare_hypothesis_files(recipe, ours, alpha=ALPHA).mapsswe.p_value
        out[split] = (wer_of(recipe), p, differing(recipe, ours))
    return out


def main(argv=None):
    """Runs the study; returns the Markdown."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=RUN, help="the SPG run's folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.65)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="files per forward pass, for every variant (1: no padding)",
    )
    parser.add_argument(
        "--no-int8-linears",
        action="store_true",
        help="leave out the dynamic int8 linears variant",
    )
    parser.add_argument("--out", default=OUT_MD, help="the Markdown file")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # as the recipe
    ensure_run(args.run, args.epochs, args.target)
    splits = {split: split_rows(args.run, split) for split in SPLITS}
    work = os.path.join(args.run, "quantized_study")
    result = study(
        os.path.join(args.run, "compact"),
        splits,
        work,
        batch_size=args.batch_size,
        int8_linears=not args.no_int8_linears,
    )
    text = markdown(
        result,
        SPLITS,
        argv,
        recipe=recipe_check(args.run, work, SPLITS),
        batch_size=args.batch_size,
    )
    print(text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
