#!/usr/bin/env python3
"""Prints the core library's headline numbers (the tests assert the same).

- parameter counts of the full-size architectures (built on the meta
  device from their configurations: no download, no memory) and of the
  matrices the default ``prune_modules`` gates, with the thresholds per tie
  mode;
- the hard sparsity reached when only the regulariser is optimised on a tiny
  model, for targets 0.5 / 0.65 / 0.765 and each tie mode;
- the model-scope conversion of wav2vec2-base's 4.26x target;
- the ideal compact size of wav2vec2-base at 65% gated sparsity, relative to
  its dense float32 weights.

Usage:
    python benchmarks/core_numbers.py

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import tempfile

import torch

from speechbrain_spg.data.architectures import (
    TINY_OVERRIDES,
    build_config,
    build_model,
    hub_config,
    save_random_model,
)
from speechbrain_spg.baselines import magnitude_mask
from speechbrain_spg.export import ideal_compact_bytes
from speechbrain_spg.lobes import SPGWav2Vec2, install_gates
from speechbrain_spg.options import SPGOptions, gated_target


def architecture_counts(hub_id):
    """Total / gated parameter counts and groups per tie mode."""
    with torch.device("meta"):
        model = build_model(hub_config(hub_id))
    total = sum(p.numel() for p in model.parameters())
    groups = {}
    for tie in ("linear", "block", "global"):
        with torch.device("meta"):
            fresh = build_model(hub_config(hub_id))
        gate, names = install_gates(fresh, SPGOptions(tie=tie))
        groups[tie] = gate.num_groups
        gated = sum(fresh.get_submodule(n).weight.numel() for n in names)
    return total, len(names), gated, groups


def regulariser_only(source, target, tie, steps=1000):
    """Hard / soft sparsity after optimising only the regulariser."""
    lobe = SPGWav2Vec2(source, save_path="", target_sparsity=target, tie=tie)
    params = [lobe.gate.threshold_param, lobe.regularizer.multiplier_param]
    optimizer = torch.optim.Adam(params, lr=0.02)
    for _ in range(steps):
        lobe.gate.step += 1
        loss = lobe.sparsity_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = lobe.sparsity_report()
    return report.hard, report.soft


def ideal_ratio(hub_id, sparsity):
    """Ideal compact bytes / dense fp32 bytes at a gated sparsity."""
    torch.manual_seed(0)
    model = build_model(hub_config(hub_id))
    _, names = install_gates(model, SPGOptions())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    masks = {
        f"{n}.weight": magnitude_mask(state[f"{n}.weight"], sparsity)
        for n in names
    }
    dense = sum(t.numel() * t.element_size() for t in state.values())
    return {
        dtype: ideal_compact_bytes(state, masks, dtype) / dense
        for dtype in ("float32", "float16")
    }


def main(argv=None):
    """Prints every number with its context (no options: ``--help`` says
    what it does)."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(
        argv
    )
    print("## Architectures (random weights, meta device)")
    print(
        "| model | total params | gated matrices | gated weights | "
        "thresholds linear/block/global |"
    )
    print("|---|---|---|---|---|")
    counts = {}
    for hub_id in ("facebook/wav2vec2-base", "facebook/hubert-large-ll60k"):
        total, matrices, gated, groups = architecture_counts(hub_id)
        counts[hub_id] = (total, gated)
        print(
            f"| {hub_id} | {total:,} | {matrices} | {gated:,} | "
            f"{groups['linear']}/{groups['block']}/{groups['global']} |"
        )
    total, gated = counts["facebook/wav2vec2-base"]
    print(
        "\nwav2vec2-base, target_scope model, 0.765 (4.26x) -> gated target "
        f"{gated_target(0.765, 'model', total, gated):.4f}"
    )
    print("\n## Regulariser only, tiny wav2vec2 (1000 Adam steps, lr 0.02)")
    print(
        "| target | tie | hard sparsity | soft sparsity | abs(hard - target) |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        source = save_random_model(
            build_config("wav2vec2", **TINY_OVERRIDES), work
        )
        for target in (0.5, 0.65, 0.765):
            for tie in ("linear", "block", "global"):
                hard, soft = regulariser_only(source, target, tie)
                print(
                    f"| {target} | {tie} | {hard:.4f} | {soft:.4f} | "
                    f"{abs(hard - target):.4f} |"
                )
    print("\n## Ideal compact size, wav2vec2-base at 65% gated sparsity")
    for dtype, ratio in ideal_ratio("facebook/wav2vec2-base", 0.65).items():
        print(f"{dtype}: {ratio:.4f} x the dense float32 weights")


if __name__ == "__main__":
    main()
