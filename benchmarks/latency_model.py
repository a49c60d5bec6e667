"""The latency model against real measurements: structures of the Fashion-MNIST teacher
(width, global pruning, scheme, float layers; no fine-tune) timed in full as a trial times
them, and predicted from layer micro-timings, corrected by a third of the full measurements;
the error on the other two thirds."""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch

from paretoslim.evaluators import (
    LatencyModel,
    MeasurementError,
    error_summary,
    layer_calls,
    run_isolated,
    target_key,
    time_layer_calls,
)
from paretoslim.kernels import LoweringError, detect_target
from paretoslim.search import LatencySpec, load_task, measure_baseline
from paretoslim.search._measuring import calibration_batches, latency_input, latency_job
from paretoslim.spaces import Recipe, compress, float_layers, layer_formats

TASK = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.py"
SCHEMES = ("fp32", "bf16", "int8_static", "int8_weight_only")


def recipes(count: int, seed: int) -> list[dict]:
    """The teacher, then ``count - 1`` distinct random points of the study's space."""
    rng, seen = random.Random(seed), {(1.0, 0.0, "fp32", "none")}
    while len(seen) < count:
        seen.add((rng.choice([0.5, 0.625, 0.75, 0.875, 1.0]),
                  rng.choice([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), rng.choice(SCHEMES),
                  rng.choice(["none", "first_last"])))
    points = [(1.0, 0.0, "fp32", "none")] + sorted(seen - {(1.0, 0.0, "fp32", "none")})
    return [{"student": {"width": w}, "pruning": {"ratio": r, "round_to": 8},
             "quantization": {"scheme": s, "keep_float": k}} for w, r, s, k in points]


def structure(task, recipe: dict, x, calibration):
    """The float structure, its layer calls in the recipe's formats, and the compressed model."""
    def build(data):
        return compress(task.model, Recipe.from_dict(data), example_input=x, train=task.train,
                        calibration=calibration, finetune_steps=0, learning_rate=1e-3,
                        seed=0)[0]

    quant = recipe["quantization"]
    floating = build({**recipe, "quantization": {"scheme": "fp32"}})
    kept = float_layers(floating, x, quant["keep_float"], [], quant["scheme"], 0)
    calls = layer_calls(floating, x, layer_formats(floating, quant["scheme"], kept))
    return calls, build(recipe)


def measure_all(task, points, spec, log) -> list[dict]:
    """Each structure timed in full against the teacher, in a fresh process."""
    baseline = measure_baseline(task)
    x, calibration = latency_input(task, spec), calibration_batches(task)
    rows = []
    for i, recipe in enumerate(points):
        calls, model = structure(task, recipe, x, calibration)
        started = time.perf_counter()
        try:
            report = run_isolated(latency_job(task, model, recipe["quantization"]["scheme"],
                                              spec, baseline))
        except (LoweringError, MeasurementError) as exc:
            print(f"structure {i} failed: {exc}", flush=True)
            continue
        row = {"recipe": recipe, "calls": calls, "ms": report.timing.model.median_ms,
               "teacher_ms": report.timing.baseline.median_ms,
               "compile_s": report.compile_seconds, "wall_s": time.perf_counter() - started}
        rows.append(row)
        log.write(json.dumps({k: v for k, v in row.items() if k != "calls"}) + "\n")
        log.flush()
        print(f"{i:3d} {json.dumps(recipe['student'])} {json.dumps(recipe['pruning'])} "
              f"{recipe['quantization']['scheme']:>16} {recipe['quantization']['keep_float']:>10}"
              f" {row['ms']:7.3f} ms  ({row['wall_s']:.1f} s)", flush=True)
    return rows


def line(name: str, predicted, measured) -> str:
    median, p90, tau = error_summary(predicted, measured)
    return f"| {name} | {len(measured)} | {100 * median:.1f}% | {100 * p90:.1f}% | {tau:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", type=int, default=45)
    parser.add_argument("--min-calls", type=int, default=100, help="study: 300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("latency_model.jsonl"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    task = load_task(str(TASK) + ":make_task", TASK.parent, {})
    spec = LatencySpec(batch_size=64, threads=1, min_calls=args.min_calls)
    target = detect_target()
    print(f"CPU: {target.cpu} ({target.cores} cores, {target.capabilities}), torch "
          f"{torch.__version__}, batch 64, 1 thread, AOTInductor, min_calls {args.min_calls}")
    with args.out.open("a") as log:
        rows = measure_all(task, recipes(args.structures, args.seed), spec, log)
    started = time.perf_counter()
    timings = time_layer_calls([c for r in rows for c in r["calls"]], threads=1)
    micro_s = time.perf_counter() - started
    model = LatencyModel(target_key(target, threads=1, batch=64, lowering="aoti"), timings)
    order = list(range(1, len(rows)))
    random.Random(args.seed).shuffle(order)
    train = [0] + order[: len(rows) // 3 - 1]  # the teacher is always measured
    test = [i for i in range(len(rows)) if i not in train]
    for i in train:
        model.add_measurement(rows[i]["calls"], rows[i]["ms"])
    measured = [rows[i]["ms"] for i in test]
    teacher = rows[0]["calls"]
    print(f"\n{len(timings)} distinct layer calls micro-timed in {micro_s:.1f} s "
          f"({1e3 * micro_s / max(1, len(timings)):.0f} ms each, one process); full "
          f"measurement {sum(r['wall_s'] for r in rows) / len(rows):.1f} s each "
          f"(compile {sum(r['compile_s'] for r in rows) / len(rows):.1f} s)")
    print(f"fitted on {len(train)}, tested on {len(test)}: {model.correction}")
    print("\n| prediction | structures | median abs rel error | p90 | Kendall tau |")
    print("| --- | --- | --- | --- | --- |")
    print(line("micro-timings only, held out", [model.raw(rows[i]["calls"]) for i in test],
               measured))
    print(line("corrected, held out", [model.predict(rows[i]["calls"]) for i in test],
               measured))
    print(line("speedup over the teacher, held out",
               [model.ratio(rows[i]["calls"], teacher) for i in test],
               [rows[i]["teacher_ms"] / rows[i]["ms"] for i in test]))
    report = model.error_report()
    print(f"| leave-one-out over the fitted {report.count} | {report.count} | "
          f"{100 * report.median:.1f}% | {100 * report.p90:.1f}% | {report.kendall_tau:.3f} |")


if __name__ == "__main__":
    main()
