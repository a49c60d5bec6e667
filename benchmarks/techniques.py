"""Each compression technique alone at a few settings, and combinations, on the Fashion-MNIST
teacher (or, with ``--study text``, the text study's MiniLM-L6 teacher at batch 1): quality,
speedup (lowered and timed like a study trial) and compression."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from _rows import record, trial_settings

from paretoslim.search import measure_baseline, run_trial
from paretoslim.spaces import Recipe

RECIPES: dict[str, dict] = {
    # single techniques
    "student width 0.5": {"student": {"width": 0.5}},
    "prune 0.5 (L2, global)": {"pruning": {"ratio": 0.5}},
    "prune 0.5 (BN scale, global)": {"pruning": {"ratio": 0.5, "criterion": "bn_scale"}},
    "prune 0.5 (L2, sensitivity)": {"pruning": {"ratio": 0.5, "allocation": "sensitivity"}},
    "sparsity 0.9 (magnitude, one shot), CSR": {"sparsity": {"ratio": 0.9}},
    "sparsity 0.9 (magnitude, AGP), CSR": {"sparsity": {"ratio": 0.9, "schedule": "gradual"}},
    "low rank 0.25 (SVD)": {"low_rank": {"rank_fraction": 0.25}},
    "low rank energy 0.9 (Tucker-2)": {"low_rank": {"energy": 0.9, "conv": "tucker2"}},
    "bf16": {"quantization": {"scheme": "bf16"}},
    "int8 dynamic": {"quantization": {"scheme": "int8_dynamic"}},
    "int8 static, per channel": {"quantization": {"scheme": "int8_static"}},
    "int8 static, per tensor": {"quantization": {"scheme": "int8_static",
                                                 "granularity": "per_tensor"}},
    "int8 static, first/last float": {"quantization": {"scheme": "int8_static",
                                                       "keep_float": "first_last"}},
    "int8 QAT": {"quantization": {"scheme": "int8_static", "qat": True}},
    "k-means 4 bits": {"weight_sharing": {"bits": 4}},
    "k-means 3 bits": {"weight_sharing": {"bits": 3}},
    # combinations
    "prune 0.3 + int8 static": {"pruning": {"ratio": 0.3},
                                "quantization": {"scheme": "int8_static"}},
    "prune 0.3 + k-means 4 bits": {"pruning": {"ratio": 0.3},
                                   "weight_sharing": {"bits": 4}},
    "prune 0.3 + k-means 3 bits": {"pruning": {"ratio": 0.3},
                                   "weight_sharing": {"bits": 3}},
    "prune 0.4 + k-means 4 bits": {"pruning": {"ratio": 0.4},
                                   "weight_sharing": {"bits": 4}},
    "width 0.625 + k-means 4 bits": {"student": {"width": 0.625},
                                     "weight_sharing": {"bits": 4}},
    "sparsity 0.9 AGP + bf16, CSR": {"sparsity": {"ratio": 0.9, "schedule": "gradual"},
                                     "quantization": {"scheme": "bf16"}},
    "prune 0.3 + sparsity 0.8 AGP + k-means 4 bits": {
        "pruning": {"ratio": 0.3}, "sparsity": {"ratio": 0.8, "schedule": "gradual"},
        "weight_sharing": {"bits": 4}},
}

# the text study's encoder (MiniLM-L6 on Rotten Tomatoes snippets), timed at batch 1
TEXT_RECIPES: dict[str, dict] = {
    # no fine-tune: the numeric schemes and stored forms alone
    "int8 static": {"quantization": {"scheme": "int8_static"}},
    "int8 dynamic": {"quantization": {"scheme": "int8_dynamic"}},
    "bf16": {"quantization": {"scheme": "bf16"}},
    "embedding int8": {"embedding": {"form": "int8"}},
    "embedding k-means 4 bits": {"embedding": {"form": "kmeans4"}},
    "k-means 4 bits": {"weight_sharing": {"bits": 4}},
    # structure, then the distillation fine-tune
    "heads 0.5 removed": {"pruning": {"heads": 0.5}},
    "depth 0.5 (3 of 6 layers)": {"student": {"depth": 0.5}},
    "depth 0.5, hidden-state distillation": {"student": {"depth": 0.5},
                                             "distillation": {"hidden_weight": 1.0}},
    "channels 0.25 (heads, FFN, hidden)": {"pruning": {"ratio": 0.25}},
    "low rank 0.5 (SVD)": {"low_rank": {"rank_fraction": 0.5}},
}
STUDIES = {"fashion_mnist": (RECIPES, 64, None), "text": (TEXT_RECIPES, 1, 2e-4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", choices=sorted(STUDIES), default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=300, help="fine-tune steps per recipe")
    parser.add_argument("--only", nargs="*", help="substrings of recipe names to run")
    parser.add_argument("--recipe", action="append", default=[],
                        help="an extra recipe as JSON (e.g. from a study's front)")
    parser.add_argument("--learning-rate", type=float, help="default: the study's table's")
    parser.add_argument("--batch-size", type=int, help="timed batch; default: the study's")
    parser.add_argument("--min-calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("techniques.jsonl"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    table, batch_size, learning_rate = STUDIES[args.study]
    learning_rate = args.learning_rate or learning_rate
    batch_size = args.batch_size or batch_size
    recipes = {name: r for name, r in table.items()
               if not args.only or any(s in name for s in args.only)}
    for text in args.recipe:
        recipe = Recipe.from_json(text)
        recipes[recipe.short()] = recipe.to_dict()
    if args.study == "text":
        from paretoslim.studies.text_classification import make_task
    else:
        from paretoslim.studies.fashion_mnist import make_task
    task = make_task()
    baseline = measure_baseline(task)
    settings = trial_settings(args.steps, args.min_calls, batch_size, learning_rate)
    print(f"teacher: quality {baseline.quality:.4f}, size {baseline.size_mb:.3f} MB, "
          f"{baseline.parameters} parameters", flush=True)
    print("| recipe | quality | drop (pt) | speedup | compression | size (MB) |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    with args.out.open("a") as log:
        for name, data in recipes.items():
            recipe = Recipe.from_dict(data)
            started = time.perf_counter()
            result = run_trial(task, recipe, settings, baseline)
            if not record(log, name, recipe.to_dict(), result.failure,
                          time.perf_counter() - started, result.metrics, columns=6):
                continue
            m = result.metrics
            print(f"| {name} | {m['quality']:.4f} | {100 * m['quality_drop']:+.2f} | "
                  f"{m['speedup']:.2f}x | {m['compression']:.1f}x | {m['size_mb']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
