#!/usr/bin/env python3
"""Step-time and memory cost of the self-pinching gates vs a dense model.

Builds wav2vec2-base and HuBERT-large from their configurations (random
weights, no download) and measures, side by side in one run, a CTC
fine-tuning step (forward, CTC loss + sparsity loss, backward, Adam step) of

- the plain SpeechBrain lobe (dense),
- the SPG lobe with the reference gate (``gate_impl: reference``),
- the SPG lobe with the fused gate (``gate_impl: fused``; eager PyTorch),
- the SPG lobe with the compiled gate (``gate_impl: compiled``:
  ``torch.compile``, the hand-written Triton kernels on CUDA),
- optionally (``--variants ... compiled_no_triton``) the compiled gate
  without the Triton kernels (CUDA mode; on CPU the same as ``compiled``),
- optionally (``--variants ... compiled_recompute_gated``) the compiled gate
  with ``recompute_gated_weights: True`` (no gated weight kept for the
  backward pass; computed again there),
- optionally (``--variants ... structured``) the structured gates
  (``granularity: structured``: heads and feed-forward units),

plus evaluation-mode inference (cached gated weights) and peak memory. The
CNN front end is frozen, as in the recipes. The step runs in the order of
SpeechBrain's ``Brain.fit_batch``: forward, backward, optimiser step, then
``zero_grad(set_to_none=True)``, so gradients are not kept through the next
forward pass (``--zero-grad before-backward`` clears them between forward
and backward instead, as many plain PyTorch loops do: the previous step's
gradients are then alive during the forward pass). Subnormal results are
flushed to zero during the steps (``torch.set_flush_denormal(True)``, as the
recipe's ``train.py`` does; x86 CPUs compute them slowly). CPU mode uses short audio so it
finishes in minutes on a laptop; CUDA mode uses batch 8 x 15 s under bf16
autocast. Timings of separate processes vary by several percent on a
shared CPU: ``--rounds N`` measures every variant N times, interleaved, and
reports medians of the per-round ratios with their range. The last line
reads
``step-time ratio spg/dense: reference R, fast F`` where F is the best of the
fused variants.

Usage:
    python benchmarks/gate_overhead.py --device cpu
    python benchmarks/gate_overhead.py --device cuda

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import concurrent.futures
import contextlib
import gc
import logging
import multiprocessing
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
import transformers
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

from speechbrain_spg.data.architectures import hub_config, save_random_model
from speechbrain_spg.kernels import triton
from speechbrain_spg.lobes import SPGWav2Vec2, flushes_subnormals

MODELS = ("facebook/wav2vec2-base", "facebook/hubert-large-ll60k")
VARIANTS = ("dense", "reference", "fused", "compiled")


def build(variant, source, device):
    """The lobe under test and a linear CTC head."""
    # The patch holds for this process only (each variant runs in a fresh
    # one).
    if variant == "compiled_no_triton":
        triton.supports = lambda weights: False
        variant = "compiled"
    options = {}
    if variant == "compiled_recompute_gated":
        options["recompute_gated_weights"] = True
        variant = "compiled"
    if variant == "structured":  # heads and units (one autograd path)
        options["granularity"] = "structured"
        variant = "fused"
    if variant == "dense":
        lobe = Wav2Vec2(source, save_path="", freeze_feature_extractor=True)
    else:
        lobe = SPGWav2Vec2(
            source,
            save_path="",
            freeze_feature_extractor=True,
            target_sparsity=0.65,
            gate_impl=variant,
            **options,
        )
    head = torch.nn.Linear(lobe.model.config.hidden_size, 32)
    return lobe.to(device), head.to(device)


def step_fn(lobe, head, optimizer, wav, targets, autocast, zero_grad):
    """One training step; returns nothing (timed from outside).

    ``zero_grad`` is ``"after-step"`` (SpeechBrain's order) or
    ``"before-backward"``.
    """
    with autocast():
        feats = lobe(wav)
        logits = head(feats).float().log_softmax(-1).transpose(0, 1)
        lengths = torch.full((wav.shape[0],), logits.shape[0])
        loss = F.ctc_loss(
            logits,
            targets,
            lengths,
            torch.full((wav.shape[0],), targets.shape[1]),
            zero_infinity=True,
        )
        if hasattr(lobe, "sparsity_loss"):
            loss = loss + lobe.sparsity_loss()
    if zero_grad == "before-backward":
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if zero_grad == "after-step":
        optimizer.zero_grad(set_to_none=True)


class PeakRSS:
    """Largest resident set size of this process while the block runs.

    CPU counterpart of ``torch.cuda.max_memory_allocated``: the kernel's
    high-water mark (``VmHWM`` of ``/proc/self/status``), reset on entry by
    writing 5 to ``/proc/self/clear_refs``; no sampling thread that would
    compete with the timed steps. It counts everything resident (weights,
    Adam states, activations, Python), so ratios between variants are what
    it is for. ``peak`` stays None where Linux's ``/proc`` files are
    missing or read-only.
    """

    def __init__(self):
        self.peak = None
        self._active = False

    @staticmethod
    def _high_water_mark():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("no VmHWM in /proc/self/status")

    def __enter__(self):
        try:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._high_water_mark()
            self._active = True
        except OSError:
            self._active = False
        return self

    def __exit__(self, *exc):
        if self._active:
            self.peak = self._high_water_mark()


@contextlib.contextmanager
def flush_subnormals(on=True):
    """Subnormal results flushed to zero within the block (``on``), as in
    the recipe's ``train.py``, or kept (``torch.set_flush_denormal``: x86
    and ARM CPUs; x86 ones compute subnormals slowly). PyTorch's CPU worker
    threads take the setting of the thread that starts them, so the block
    should begin before other torch work of the process. On leaving it, the
    setting of this thread is restored; worker threads started inside the
    block keep the block's (a benchmark's own process ends with it)."""
    was_on = flushes_subnormals()
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def synchronize(device):
    """Waits for the device."""
    if device == "cuda":
        torch.cuda.synchronize()


def quiet():
    """No progress bars or deprecation warnings from the model loading."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("speechbrain").setLevel(logging.WARNING)


def add_batch_arguments(parser):
    """``--device``, ``--batch`` and ``--seconds``, shared by the benchmarks
    that build a training setup (see ``resolve_batch``)."""
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--batch", type=int, default=None, help="default: 8 (cuda), 2 (cpu)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="audio per utterance; default: 15 (cuda), 1 (cpu)",
    )


def resolve_batch(args):
    """Fills in the device's default batch: 8 x 15 s on CUDA (measured
    under bf16 autocast), 2 x 1 s on CPU (minutes on a laptop)."""
    gpu = args.device == "cuda"
    args.batch = args.batch or (8 if gpu else 2)
    args.seconds = args.seconds or (15.0 if gpu else 1.0)


def training_setup(variant, source, args):
    """Lobe, head, Adam optimiser, a random batch and the autocast context
    of one variant's training steps (bf16 autocast on CUDA), in train
    mode."""
    quiet()
    device = args.device
    torch.manual_seed(0)
    lobe, head = build(variant, source, device)
    params = [p for p in lobe.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params + list(head.parameters()), lr=1e-5)
    wav = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    targets = torch.randint(1, 32, (args.batch, 10), device=device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device == "cuda"
        else contextlib.nullcontext
    )
    lobe.train()
    return lobe, head, optimizer, wav, targets, autocast


def measure(variant, source, args):
    """Median step time, eval time and peak memory of one variant (with
    subnormal results flushed to zero, as in the recipe)."""
    with flush_subnormals():
        return _measure(variant, source, args)


def _measure(variant, source, args):
    """``measure`` without the flush-to-zero setting."""
    device = args.device
    lobe, head, optimizer, wav, targets, autocast = training_setup(
        variant, source, args
    )
    for _ in range(args.warmup):
        step_fn(lobe, head, optimizer, wav, targets, autocast, args.zero_grad)
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for _ in range(args.steps):
            start = time.perf_counter()
            step_fn(
                lobe, head, optimizer, wav, targets, autocast, args.zero_grad
            )
            synchronize(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    lobe.eval()
    eval_times = []
    # One autocast region per pass, as SpeechBrain enters one per batch
    # (autocast caches casts of parameters within a region only).
    with torch.no_grad():
        with autocast():
            lobe(wav)
        for _ in range(args.eval_steps):
            start = time.perf_counter()
            with autocast():
                lobe(wav)
            synchronize(device)
            eval_times.append(time.perf_counter() - start)
    del lobe, head, optimizer
    gc.collect()
    return {
        "step": statistics.median(times),
        "eval": statistics.median(eval_times),
        "peak": peak,
    }


def measure_in_fresh_process(variant, source, args):
    """``measure`` in a new Python process.

    Each variant starts from the same state: no allocator pages kept from
    the variant before (which would skew the CPU resident-memory peak), no
    compiled kernels cached in memory.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure, variant, source, args).result()


def round_ratios(rounds, variant, key):
    """``variant``'s ``key`` over dense's, one per round that has both."""
    return [
        r[variant][key] / r["dense"][key]
        for r in rounds
        if r[variant][key] and r["dense"][key]
    ]


def median_ratio(rounds, variant, key):
    """Median of ``round_ratios``; None when a round has no value (peak
    memory where /proc is missing)."""
    values = round_ratios(rounds, variant, key)
    return statistics.median(values) if len(values) == len(rounds) else None


def print_table(rounds):
    """One row per variant: medians over rounds; the step ratio's range."""
    width = max(len(name) for name in ("variant", *rounds[0]))
    header = (
        f"{'variant':>{width}} {'step s':>8} {'ratio':>6} {'eval s':>8}"
        f" {'ratio':>6} {'peak mem ratio':>14}"
    )
    many = len(rounds) > 1
    print(header + (f" {'step ratio range':>16}" if many else ""))
    for variant in rounds[0]:
        step = statistics.median(r[variant]["step"] for r in rounds)
        evaluation = statistics.median(r[variant]["eval"] for r in rounds)
        memory = median_ratio(rounds, variant, "peak")
        memory = f"{memory:>14.3f}" if memory else f"{'n/a':>14}"
        row = (
            f"{variant:>{width}} {step:>8.3f} "
            f"{median_ratio(rounds, variant, 'step'):>6.3f} {evaluation:>8.3f} "
            f"{median_ratio(rounds, variant, 'eval'):>6.3f} {memory}"
        )
        if many:
            each = round_ratios(rounds, variant, "step")
            row += f" {f'{min(each):.3f}-{max(each):.3f}':>16}"
        print(row)


def main(argv=None):
    """Runs every model x variant and prints ratios to dense."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_arguments(parser)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="timed evaluation passes (default: 3 x --steps; they are short)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every variant this many times, interleaved, each in "
        "a fresh process; ratios are medians of per-round ratios",
    )
    parser.add_argument(
        "--zero-grad",
        default="after-step",
        choices=("after-step", "before-backward"),
        help="when gradients are cleared (default: SpeechBrain's order)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    quiet()
    resolve_batch(args)
    gpu = args.device == "cuda"
    args.steps = args.steps or (20 if gpu else 5)
    args.eval_steps = args.eval_steps or 3 * args.steps
    memory = "max allocated" if gpu else "max resident set"
    print(
        f"device {args.device}, batch {args.batch} x {args.seconds} s, "
        f"{args.steps} timed steps after {args.warmup} warm-up "
        f"({args.eval_steps} evaluation passes), median; "
        f"zero_grad {args.zero_grad}; "
        f"peak memory = {memory} during the timed steps; "
        f"{torch.get_num_threads()} CPU threads; each variant in a fresh "
        f"process; {args.rounds} round(s)"
    )
    ratios = {v: [] for v in args.variants if v != "dense"}
    with tempfile.TemporaryDirectory() as work:
        for hub_id in args.models:
            source = save_random_model(hub_config(hub_id), f"{work}/{hub_id}")
            rounds = [
                {
                    v: measure_in_fresh_process(v, source, args)
                    for v in args.variants
                }
                for _ in range(args.rounds)
            ]
            print(f"\n{hub_id} (random weights)")
            print_table(rounds)
            for variant in ratios:
                ratios[variant].append(median_ratio(rounds, variant, "step"))
    worst = {v: max(r) for v, r in ratios.items()}
    fast = [worst[v] for v in worst if v != "reference"]
    reference = worst.get("reference", float("nan"))
    fast = min(fast) if fast else float("nan")
    print(
        f"step-time ratio spg/dense: reference {reference:.3f}, fast {fast:.3f}"
    )


if __name__ == "__main__":
    main()
