"""The quality proxy against the real figure: candidates of the default study's space drawn
at random, each predicted (its slice of the elastic student, numerics simulated, read on
the held-out slice) and then fine-tuned from that slice as the measured tier does
(``candidates.finetune_steps`` at ``candidates.learning_rate``, quality on the whole
validation set); Spearman's rank correlation of the two over all candidates and over those
the fine-tune brings within twice the study's quality limit, and the fraction of the
predicted drop the fine-tune recovers."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings
from pathlib import Path

from scipy.stats import spearmanr

from paretoslim.kernels import detect_target
from paretoslim.search import load_spec
from paretoslim.search._candidates import CandidateTier
from paretoslim.search._measuring import calibration_batches, measure_baseline, quality_of
from paretoslim.search._progress import StudyProgress
from paretoslim.search._proxy import unpredicted
from paretoslim.search._sampling import _draw
from paretoslim.search._task import load_task
from paretoslim.spaces import compress

SPEC = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.toml"


def candidates(spec, count: int, seed: int) -> list:
    """``count`` distinct predictable recipes of the space, drawn at random."""
    rng, found = random.Random(seed), {}
    while len(found) < count:
        params = {n: _draw(d, rng) for n, d in spec.space.searched().items()}
        recipe = spec.space.recipe(params)
        if unpredicted(recipe) is None:
            found.setdefault(json.dumps(recipe.to_dict(), sort_keys=True), recipe)
    return list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="quality_proxy.jsonl")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    spec = load_spec(SPEC)
    task = load_task(spec.task, spec.base_dir, spec.task_options)
    baseline = measure_baseline(task)
    tier = CandidateTier(spec, task, baseline, StudyProgress(target=1, completed=0))
    tier.prepare(None)  # the elastic student and latency model, cached by a study
    steps = spec.candidates.finetune_steps or spec.finetune.steps
    print(f"CPU: {detect_target().cpu}; teacher {baseline.quality:.4f}; fine-tunes of "
          f"{steps} steps at {spec.candidates.learning_rate}", flush=True)
    rows = []
    with open(args.out, "w") as log:
        for recipe in candidates(spec, args.count, args.seed):
            predicted = tier.scorer.score(recipe)
            started = time.perf_counter()
            model, _ = compress(task.model, recipe, example_input=task.example_input,
                                train=task.train, calibration=calibration_batches(task),
                                finetune_steps=steps,
                                learning_rate=spec.candidates.learning_rate, seed=spec.seed,
                                structure=tier.start(recipe))
            real = baseline.quality - quality_of(task, model)
            row = {"recipe": recipe.short(), "predicted_drop": predicted.quality_drop,
                   "fine_tuned_drop": real, "seconds": time.perf_counter() - started}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{row['recipe']:<55} predicted {row['predicted_drop']:+.4f}  "
                  f"fine-tuned {row['fine_tuned_drop']:+.4f}  ({row['seconds']:.0f} s)",
                  flush=True)
    near = [r for r in rows if r["fine_tuned_drop"] <= 2 * spec.constraints.max_quality_drop]
    for title, subset in (("all", rows), ("near the limit", near)):
        if len(subset) < 3:
            print(f"{title}: {len(subset)} candidates, too few to rank")
            continue
        predicted = [r["predicted_drop"] for r in subset]
        real = [r["fine_tuned_drop"] for r in subset]
        recovered = [1 - r["fine_tuned_drop"] / r["predicted_drop"] for r in subset
                     if r["predicted_drop"] >= 0.002]
        rho = spearmanr(predicted, real).statistic
        line = f"{title}: {len(subset)} candidates, Spearman {rho:.3f}"
        if recovered:
            line += (f"; fraction of the predicted drop recovered: median "
                     f"{statistics.median(recovered):.2f}, range {min(recovered):.2f} to "
                     f"{max(recovered):.2f}")
        print(line)

if __name__ == "__main__":
    main()
