"""The latency model against real measurements: structures of the Fashion-MNIST teacher
(width, global pruning, scheme, float layers; no fine-tune) timed in full as a trial times
them, and predicted from layer micro-timings, corrected by some of the full measurements;
the error on the others. Each structure is saved as a JSON line (``--out``) and can be
re-evaluated from there (``--from``) without timing it again."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings
from pathlib import Path

import torch

from paretoslim.evaluators import (
    OTHER,
    LatencyModel,
    LayerCall,
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
from paretoslim.spaces import Recipe, compress, float_layers, kind_formats, layer_formats

TASK = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.py"
SCHEMES = ("fp32", "bf16", "int8_static", "int8_weight_only")


def recipes(count: int, seed: int) -> list[dict]:
    """The teacher, then ``count - 1`` distinct random points of the study's space, the int8
    ones with their linear layers in bf16 half of the time (a per-layer mix)."""
    teacher = (1.0, 0.0, "fp32", "none", "scheme")
    rng, seen = random.Random(seed), {teacher}
    while len(seen) < count:
        scheme = rng.choice(SCHEMES)
        seen.add((rng.choice([0.5, 0.625, 0.75, 0.875, 1.0]),
                  rng.choice([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), scheme,
                  rng.choice(["none", "first_last"]),
                  rng.choice(["scheme", "bf16"]) if scheme.startswith("int8") else "scheme"))
    points = [teacher] + sorted(seen - {teacher})
    return [{"student": {"width": w}, "pruning": {"ratio": r, "round_to": 8},
             "quantization": {"scheme": s, "keep_float": k, "linear": lin}}
            for w, r, s, k, lin in points]


def structure(task, recipe: dict, x, calibration):
    """The float structure, its layer calls in the recipe's formats, and the compressed model."""
    def build(data):
        return compress(task.model, Recipe.from_dict(data), example_input=x, train=task.train,
                        calibration=calibration, finetune_steps=0, learning_rate=1e-3,
                        seed=0)[0]

    quant = Recipe.from_dict(recipe).quantization
    floating = build({**recipe, "quantization": {"scheme": "fp32"}})
    kept = float_layers(floating, x, quant.keep_float, [], quant.scheme, 0)
    calls = layer_calls(floating, x, layer_formats(floating, quant.scheme, kept,
                                                   kind_formats(quant)))
    return calls, build(recipe)


def measure_all(task, points, spec, log) -> list[dict]:
    """Each structure timed in full against the teacher, in a fresh process; each row
    (recipe, layer calls, measured ms) written to ``log`` as a JSON line."""
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
        log.write(json.dumps({**row, "calls": [c.to_list() for c in calls]}) + "\n")
        log.flush()
        print(f"{i:3d} {json.dumps(recipe['student'])} {json.dumps(recipe['pruning'])} "
              f"{recipe['quantization']['scheme']:>16} {recipe['quantization']['keep_float']:>10}"
              f" {recipe['quantization']['linear']:>6}"
              f" {row['ms']:7.3f} ms  ({row['wall_s']:.1f} s)", flush=True)
    return rows


def read_rows(path: Path) -> tuple[dict, list[dict], dict[LayerCall, float]]:
    """The header, the structure rows and the saved micro-timings of a results file."""
    header, rows, table = {}, [], {}
    for text in path.read_text().splitlines():
        data = json.loads(text)
        if "header" in data:
            header = data["header"]
        elif "table" in data:
            table.update({LayerCall.from_list(c): ms for c, ms in data["table"]})
        else:
            rows.append({**data, "calls": tuple(LayerCall.from_list(c) for c in data["calls"])})
    return header, rows, table


def micro_timings(rows: list[dict], table: dict[LayerCall, float], path: Path) -> float:
    """Micro-time the layer calls not yet in ``table`` and append them to ``path``; seconds."""
    missing = [c for r in rows for c in r["calls"] if c.kind != OTHER and c not in table]
    started = time.perf_counter()
    timings = time_layer_calls(missing, threads=1)
    if timings:
        table.update(timings)
        with path.open("a") as log:
            log.write(json.dumps({"table": [[c.to_list(), ms] for c, ms in timings.items()]})
                      + "\n")
    return time.perf_counter() - started


def line(name: str, predicted, measured) -> str:
    median, p90, tau = error_summary(predicted, measured)
    return f"| {name} | {len(measured)} | {100 * median:.1f}% | {100 * p90:.1f}% | {tau:.3f} |"


def evaluate(rows: list[dict], table: dict[LayerCall, float], key: str, fit: int,
             seed: int) -> None:
    """Fit the correction on the teacher and ``fit - 1`` random other structures; print
    the error on the rest, as measured and with each measurement scaled by the teacher
    timed in the same process (the clock drifts ~10% from one process to the next)."""
    teacher_ms = statistics.median(r["teacher_ms"] for r in rows)
    for title, scale in (("as measured", lambda r: 1.0),
                         ("scaled by the in-process teacher",
                          lambda r: teacher_ms / r["teacher_ms"])):
        print(f"\n{title}:")
        report_split(rows, [{**r, "ms": r["ms"] * scale(r)} for r in rows], table, key, fit, seed)


def report_split(raw_rows, rows, table, key, fit, seed) -> None:
    """The held-out table of one split (``rows``: the measurements fitted and tested)."""
    model = LatencyModel(key, table)
    order = list(range(1, len(rows)))
    random.Random(seed).shuffle(order)
    train = [0] + order[: fit - 1]  # the teacher is always measured
    test = [i for i in range(len(rows)) if i not in train]
    for i in train:
        model.add_measurement(rows[i]["calls"], rows[i]["ms"])
    measured = [rows[i]["ms"] for i in test]
    teacher = rows[0]["calls"]
    print(f"fitted on {len(train)}, tested on {len(test)}: {model.correction}")
    print("| prediction | structures | median abs rel error | p90 | Kendall tau |")
    print("| --- | --- | --- | --- | --- |")
    print(line("micro-timings only, held out", [model.raw(rows[i]["calls"]) for i in test],
               measured))
    print(line("corrected, held out", [model.predict(rows[i]["calls"]) for i in test],
               measured))
    print(line("speedup over the teacher, held out",
               [model.ratio(rows[i]["calls"], teacher) for i in test],
               [raw_rows[i]["teacher_ms"] / raw_rows[i]["ms"] for i in test]))
    report = model.error_report()
    print(f"| leave-one-out over the fitted {report.count} | {report.count} | "
          f"{100 * report.median:.1f}% | {100 * report.p90:.1f}% | {report.kendall_tau:.3f} |")


def measure(args, target) -> tuple[dict, list[dict], dict[LayerCall, float]]:
    """Time the structures in full into ``args.out``; with ``args.resume``, only those not
    in it yet."""
    header = {"cpu": target.cpu, "cores": target.cores, "torch": torch.__version__,
              "min_calls": args.min_calls,
              "key": target_key(target, threads=1, batch=64, lowering="aoti")}
    rows, table = [], {}
    if args.resume and args.out.exists():
        header, rows, table = read_rows(args.out)
    done = [r["recipe"] for r in rows]
    points = [p for p in recipes(args.structures, args.seed) if p not in done]
    task = load_task(str(TASK) + ":make_task", TASK.parent, {})
    spec = LatencySpec(batch_size=64, threads=1, min_calls=header["min_calls"])
    with args.out.open("a" if rows else "w") as log:
        if not rows:
            log.write(json.dumps({"header": header}) + "\n")
        rows += measure_all(task, points, spec, log)
    return header, rows, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", type=int, default=54)
    parser.add_argument("--fit", type=int, default=14, help="structures the correction sees")
    parser.add_argument("--min-calls", type=int, default=100, help="study: 300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("latency_model.jsonl"))
    parser.add_argument("--from", dest="source", type=Path,
                        help="re-evaluate the structures saved in this file, without "
                             "timing them again (missing micro-timings are added to it)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the structures already in --out; time only the others")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target = detect_target()
    if args.source:
        header, rows, table = read_rows(args.source)
        path = args.source
    else:
        header, rows, table = measure(args, target)
        path = args.out
    print(f"CPU: {header['cpu']} ({header['cores']} cores), torch {header['torch']}, batch 64, "
          f"1 thread, AOTInductor, min_calls {header['min_calls']}; {len(rows)} structures "
          f"measured in full ({sum(r['wall_s'] for r in rows) / len(rows):.1f} s each)")
    known = len(table)
    seconds = micro_timings(rows, table, path)
    print(f"{len(table) - known} layer calls micro-timed in {seconds:.1f} s, "
          f"{known} read from {path}")
    evaluate(rows, table, header["key"], args.fit, args.seed)


if __name__ == "__main__":
    main()
