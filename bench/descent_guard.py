"""Adversarial support sets: does adaptation ever leave a user fitting their own
interactions worse than the initialisation?

Builds --sets valid but hostile support sets from an artifact's catalog (the same item
repeated with alternating extreme labels, one extreme label on many items, a single
interaction, the longest allowed support of random labels, ...), runs them through the
served graph (onnxruntime on model.onnx) and, in the same run, through training's inner
loop rebuilt from the artifact with the best-iterate guard switched off (the baseline:
what the graph did before the guard). Prints, for each, how many sets end with a support
loss above their starting loss (and above 1.05x, 2x), the worst ratio, and how many
scores sit at the ends of the label range.

    python bench/descent_guard.py --artifact models/warmstart/1
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import load_file

from training.export import INPUT_NAMES, load_exported_model, output_names
from training.inner_loop import Batch


def hostile_sets(codes: np.ndarray, low: float, high: float, count: int, max_support: int, rng: np.random.Generator):
    """(item codes (S, W), labels (S,)) per set: valid inputs chosen to make steps overshoot."""
    kinds = ("one item, alternating extremes", "one extreme on many items", "single", "longest, random", "two items, opposite")
    for k in range(count):
        kind = kinds[k % len(kinds)]
        s = {"single": 1, "longest, random": max_support}.get(kind, int(rng.integers(2, max_support + 1)))
        if kind == "one item, alternating extremes":
            items = np.repeat(codes[rng.integers(len(codes))][None], s, axis=0)
            labels = np.where(np.arange(s) % 2 == 0, high, low)
        elif kind == "one extreme on many items":
            items = codes[rng.integers(len(codes), size=s)]
            labels = np.full(s, high if rng.random() < 0.5 else low)
        elif kind == "two items, opposite":
            pair = codes[rng.integers(len(codes), size=2)]
            items = pair[np.arange(s) % 2]
            labels = np.where(np.arange(s) % 2 == 0, high, low)
        else:
            items = codes[rng.integers(len(codes), size=s)]
            labels = rng.choice([low, high], size=s) if kind == "single" else rng.uniform(low, high, size=s)
        yield kind, items, labels.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="an artifact version directory")
    parser.add_argument("--sets", type=int, default=2084, help="support sets to try (default 2084, as in issue 12)")
    parser.add_argument("--max-support", type=int, default=128, help="longest support set (the server's default limit)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_exported_model(args.artifact)
    unguarded = replace(model, inner_config=replace(model.inner_config, keep_best=False))
    codes = load_file(str(args.artifact / "catalog.safetensors"))["item_features"]
    low, high = model.label.min_value, model.label.max_value
    session = ort.InferenceSession(str(args.artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds_of = [i.name for i in session.get_inputs()]
    user = np.zeros((1, sum(f.width for f in model.schema.user_fields)), dtype=np.int64)
    query = codes[:64][None]
    rows = {"served graph (guard)": [], "inner loop without the guard": []}
    pinned = {name: 0 for name in rows}
    for kind, items, labels in hostile_sets(codes, low, high, args.sets, args.max_support, np.random.default_rng(args.seed)):
        inputs = (user, items[None], labels[None], np.ones((1, len(labels)), np.float32), query)
        feeds = {n: a for n, a in zip(INPUT_NAMES, inputs) if n in feeds_of}
        scores, before, after, *_ = session.run(list(output_names(model)), feeds)
        rows["served graph (guard)"].append(float(after[0]) / max(float(before[0]), 1e-12))
        pinned["served graph (guard)"] += int(np.sum((scores <= low + 1e-6) | (scores >= high - 1e-6)) > scores.size / 4)
        with torch.no_grad():
            out = unguarded.forward(Batch(*(torch.from_numpy(a) for a in inputs)))
        rows["inner loop without the guard"].append(float(out[2][0]) / max(float(out[1][0]), 1e-12))
        pinned["inner loop without the guard"] += int(np.sum((out[0].numpy() <= low + 1e-6) | (out[0].numpy() >= high - 1e-6)) > out[0].numel() / 4)
    print(f"{args.sets} adversarial support sets, artifact {args.artifact}")
    print("| path | after > before | > 1.05x | > 2x | worst after/before | sets with > 1/4 of scores at the range ends |")
    print("|---|---|---|---|---|---|")
    for name, ratios in rows.items():
        r = np.array(ratios)
        print(f"| {name} | {int(np.sum(r > 1 + 1e-6))} | {int(np.sum(r > 1.05))} | {int(np.sum(r > 2))} | {r.max():.3f} | {pinned[name]} |")


if __name__ == "__main__":
    main()
