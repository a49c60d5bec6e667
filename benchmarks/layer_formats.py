"""Per-layer formats, two ways, on the Fashion-MNIST teacher (no fine-tune: post-training
numerics, so every accuracy is the real one): the space's per-layer choices
(``keep_float`` x ``linear`` under int8 static, as the search picks among them) against a
sensitivity-plus-integer-programming allocation (the AutoQuantize method, with each
layer's latency in each format from the latency model in place of bit counts).

Sensitivity: the held-out drop when one layer alone runs in a format (numerics simulated).
The integer program picks one format per layer minimizing the predicted latency with the
summed sensitivity within a budget (scipy's ``milp``). Every allocation is then converted,
compiled, timed interleaved with the teacher in a fresh process and scored on the whole
validation set."""

from __future__ import annotations

import argparse
import copy
import itertools
import warnings
from pathlib import Path

import numpy as np
import torch

from paretoslim.evaluators import (
    OTHER,
    LatencyModel,
    layer_calls,
    run_isolated,
    size_mb,
    target_key,
    time_layer_calls,
)
from paretoslim.kernels import detect_target
from paretoslim.search import LatencySpec, load_task, measure_baseline
from paretoslim.search._measuring import (
    calibration_batches,
    latency_input,
    latency_job,
    quality_of,
    val_slice,
)
from paretoslim.spaces import (
    Recipe,
    float_layers,
    kind_formats,
    layer_formats,
    quantize,
    simulate_numerics,
    with_layer_formats,
)
from paretoslim.spaces import model_io as io

TASK = Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist.py"
FORMATS = ("int8", "bf16", "fp32")


def layer_costs(names: list[str], calls: dict[str, tuple], latency: LatencyModel
                ) -> dict[str, dict[str, float]]:
    """``{layer: {format: ms}}`` from ``calls`` (the model's layer calls with every layer in
    one format, by format): each weight layer's micro-timing in that format, with the
    pooling and other modules after it (they run in its format)."""
    costs: dict[str, dict[str, float]] = {n: {} for n in names}
    for fmt, ordered in calls.items():
        index = -1
        for call in ordered:
            if call.kind in ("linear", "conv2d"):
                index += 1
            if index >= 0:
                costs[names[index]][fmt] = costs[names[index]].get(fmt, 0.0) + \
                    latency.layer_ms(call)
    return costs


def sensitivities(task, model, val, calibration) -> dict[str, dict[str, float]]:
    """``{layer: {format: drop}}``: the held-out accuracy lost when that layer alone runs in
    that format (simulated numerics; fp32 loses nothing)."""
    names = list(layer_formats(model, "fp32"))
    reference = quality_of(task, model, val)
    out = {}
    for name in names:
        out[name] = {"fp32": 0.0}
        for fmt in ("int8", "bf16"):
            formats = dict.fromkeys(names, "fp32") | {name: fmt}
            simulated = simulate_numerics(copy.deepcopy(model), formats, calibration)
            out[name][fmt] = max(0.0, reference - quality_of(task, simulated, val))
    return out


def allocate(costs, drops, budget: float) -> dict[str, str]:
    """The integer program: one format per layer, minimum summed latency, summed drop at
    most ``budget``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(costs)
    pairs = [(n, f) for n in names for f in FORMATS]
    c = np.array([costs[n][f] for n, f in pairs])
    one = np.array([[1.0 if n == m else 0.0 for n, _ in pairs] for m in names])
    drop = np.array([[drops[n][f] for n, f in pairs]])
    result = milp(c, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one, 1, 1), LinearConstraint(drop, 0, budget)])
    if not result.success:
        raise RuntimeError(f"no allocation within a drop of {budget}: {result.message}")
    return {n: f for (n, f), chosen in zip(pairs, result.x, strict=True) if chosen > 0.5}


def converted(task, formats: dict[str, str], x, calibration):
    """The teacher in int8 static with each layer in its format in ``formats``."""
    model = copy.deepcopy(task.model).eval()
    keep = with_layer_formats(model, "int8_static", formats, [])
    return quantize(model, "int8_static", x, calibration, keep_float=keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.002, 0.005, 0.01])
    parser.add_argument("--min-calls", type=int, default=200)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target = detect_target()
    task = load_task(str(TASK) + ":make_task", TASK.parent, {})
    spec = LatencySpec(batch_size=64, threads=1, min_calls=args.min_calls)
    x, calibration = latency_input(task, spec), list(calibration_batches(task))
    inputs = [io.batch_inputs(b) for b in calibration]
    teacher = task.model.eval()
    latency = LatencyModel(target_key(target, threads=1, batch=64, lowering="aoti"))
    names = list(layer_formats(teacher, "fp32"))
    calls = {fmt: layer_calls(teacher, x, dict.fromkeys(names, fmt)) for fmt in FORMATS}
    timed = {c for ordered in calls.values() for c in ordered if c.kind != OTHER}
    latency.add_timings(time_layer_calls(sorted(timed, key=repr), threads=1))
    costs = layer_costs(names, calls, latency)
    drops = sensitivities(task, teacher, val_slice(task, 2000), inputs[:2])
    print(f"CPU: {target.cpu}; torch {torch.__version__}; batch 64, 1 thread, AOTInductor")
    print("| layer | " + " | ".join(f"{f} ms | {f} drop" for f in FORMATS) + " |")
    for n in names:
        print(f"| `{n}` | " + " | ".join(f"{costs[n][f]:.3f} | {100 * drops[n][f]:.2f}"
                                         for f in FORMATS) + " |")

    candidates: dict[str, dict[str, str]] = {}
    for keep, linear in itertools.product(("none", "first_last"), ("scheme", "bf16")):
        recipe = Recipe.from_dict({"quantization": {"scheme": "int8_static",
                                                    "keep_float": keep, "linear": linear}})
        q = recipe.quantization
        kept = float_layers(teacher, x, q.keep_float, [], q.scheme, 0)
        candidates[f"space: {recipe.short()}"] = layer_formats(teacher, q.scheme, kept,
                                                               kind_formats(q))
    for budget in args.budgets:
        candidates[f"integer program, drop <= {100 * budget:.1f} pt"] = allocate(
            costs, drops, budget)

    baseline = measure_baseline(task)
    full = quality_of(task, teacher)
    print("\n| allocation | formats | predicted ms | speedup (measured) | accuracy drop | size |")
    print("| --- | --- | --- | --- | --- | --- |")
    measured: dict[tuple, str] = {}
    for title, formats in candidates.items():
        key = tuple(formats[n] for n in names)
        if key in measured:
            print(f"| {title} | {measured[key]} |")
            continue
        model = converted(task, formats, x, calibration)
        report = run_isolated(latency_job(task, model, "int8_static", spec, baseline))
        t = report.timing
        spread = f" ({t.speedup_low:.2f}-{t.speedup_high:.2f})"
        predicted = sum(costs[n][formats[n]] for n in names)
        row = (f"{' '.join(formats[n] for n in names)} | {predicted:.3f} | "
               f"{t.speedup:.2f}x{spread} | {100 * (full - quality_of(task, model)):+.2f} pt | "
               f"{size_mb(task.model) / size_mb(model):.1f}x")
        measured[key] = row
        print(f"| {title} | {row} |", flush=True)
    print(f"\nlayers in order: {', '.join(names)}; teacher accuracy {full:.4f}")


if __name__ == "__main__":
    main()
