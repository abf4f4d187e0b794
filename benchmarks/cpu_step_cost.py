"""Cost of one training step of the embedded demo's model by depth and context, and a fit of how it grows.

    python benchmarks/cpu_step_cost.py --json step_cost.json                    # the sweep's grid, ~20 min on 2 cores
    python benchmarks/cpu_step_cost.py --depths 2,4 --contexts 64,128 --steps 2 # a quick look

One step = what ``python -m drg_llama.train --variant two_label`` does per batch: the two_label ``DRGClassifier``
forward (mean pooling), loss, backward and AdamW update, LoRA r=16 on q/k/v/o, fp32, batch 16 (the demo's
settings), on SmolLM2-135M's shape cut to ``depth`` decoder layers (hidden 576, 9 heads / 3 KV heads, MLP 1,536,
vocabulary 49,152), random weights (the cost does not depend on their values), every note exactly ``context``
tokens long. Each cell runs ``--warmup`` untimed steps, then the median of ``--steps`` timed ones.

The fit: seconds per step = a + b * depth * context + c * depth * context^2 + d * context (least squares), i.e. a
fixed cost, the per-token cost of each layer (matmuls), each layer's attention (quadratic in context), and the
per-token cost outside the layers (embedding, pooling). It is a CPU planning figure: a GPU has other ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
}


def step_seconds(depth: int, context: int, batch: int, warmup: int, steps: int) -> float:
    """Median wall time of one optimizer step of the demo's classifier at this depth and context."""
    from drg_llama.drg import LabelSpace, get_table
    from drg_llama.models.backbone import BackboneConfig
    from drg_llama.models.classifier import DRGClassifier

    torch.manual_seed(0)
    space = LabelSpace.build("v43", "two_label", list(get_table("v43").codes))
    cfg = BackboneConfig(
        random_init={**SMOLLM2, "num_hidden_layers": depth, "vocab_size": 49152},
        tokenizer="byte",
        lora_r=16,
        lora_alpha=32,
        pooling="mean",
    )
    model = DRGClassifier(backbone=cfg, label_space=space)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (batch, context), generator=gen)
    labels = torch.randint(0, len(space.bases), (batch,), generator=gen)
    mask = torch.from_numpy(space.allowed_mask[:batch])  # [B, 3] allowed severities of some gold DRGs
    data = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.zeros(batch, dtype=torch.long),
        "base_labels": labels,
        "severity_mask": mask,
    }
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model.loss(model.batch_logits(data), data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit(cells: list[dict]) -> dict:
    """Least-squares seconds = a + b*d*c + e*d*c^2 + f*c; coefficients, and each cell's relative error."""
    d = np.array([c["depth"] for c in cells], dtype=np.float64)
    n = np.array([c["context"] for c in cells], dtype=np.float64)
    y = np.array([c["seconds"] for c in cells])
    design = np.stack([np.ones_like(d), d * n, d * n**2, n], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    predicted = design @ coef
    return {
        "formula": "seconds = a + b*depth*context + e*depth*context^2 + f*context",
        "a": coef[0],
        "b": coef[1],
        "e": coef[2],
        "f": coef[3],
        "max_relative_error": float(np.max(np.abs(predicted - y) / y)),
        "predicted": predicted.tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2,4,8,16,30")
    parser.add_argument("--contexts", default="64,128,256,512")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    cells = []
    for depth in (int(x) for x in args.depths.split(",")):
        for context in (int(x) for x in args.contexts.split(",")):
            seconds = step_seconds(depth, context, args.batch, args.warmup, args.steps)
            cells.append({"depth": depth, "context": context, "seconds": seconds})
            print(f"depth {depth:>2}  context {context:>4}: {seconds:7.2f} s/step", flush=True)
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(["python", *sys.argv]),
        "batch": args.batch,
        "cells": cells,
        "fit": fit(cells) if len(cells) >= 4 else None,
    }
    if report["fit"]:
        f = report["fit"]
        print(
            f"fit: {f['a']:.3f} + {f['b']:.3e}*d*c + {f['e']:.3e}*d*c^2 + {f['f']:.3e}*c s/step "
            f"(worst cell off by {100 * f['max_relative_error']:.0f}%)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return report


if __name__ == "__main__":
    main()
