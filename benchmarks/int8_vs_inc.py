"""Paretoslim's int8 static path against Intel Neural Compressor's int8 autotune on the
Fashion-MNIST teacher: accuracy on the 10k test set and speedup over fp32, one thread."""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import logging
import multiprocessing
import platform
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from paretoslim.evaluators import accuracy, measure_speedup, torch_threads
from paretoslim.kernels import TOLERANCE, LoweringError, lower, relative_error
from paretoslim.spaces import quantize
from paretoslim.studies.fashion_mnist import make_task

SCHEMES = {"fp32": "fp32", "paretoslim": "int8_static", "inc": "int8_static"}
LABELS = {"fp32": "fp32 teacher", "paretoslim": "paretoslim int8 static (PT2E)",
          "inc": "INC 3.10 int8 autotune"}
QUANT_OPS = ("quantize_per_tensor", "quantize_per_channel", "dequantize_per_tensor",
             "dequantize_per_channel", "quantize_affine", "dequantize_affine")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-calls", type=int, default=300)
    return parser.parse_args()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- models


def paretoslim_int8(task, example: torch.Tensor) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    model = quantize(copy.deepcopy(task.model), "int8_static", example, task.calibration)
    return model, time.perf_counter() - start


def inc_int8(task, example: torch.Tensor) -> tuple[nn.Module | None, dict]:
    """INC's documented 3.x flow: export, then autotune over its static int8 config set."""
    try:
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import (
            StaticQuantConfig,
            TuningConfig,
            autotune,
        )
    except ImportError as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}"}
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)

    def calibrate(model: nn.Module) -> None:
        with torch.no_grad():
            for inputs, _ in task.calibration:
                model(inputs)

    evaluations: list[float] = []

    def evaluate(model: nn.Module) -> float:
        allow_exported_model_train_eval(model)
        evaluations.append(accuracy(model, task.val))
        return evaluations[-1]

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export(copy.deepcopy(task.model).eval(), (example,),
                          dynamic_shapes=({0: batch},))
        tune_config = TuningConfig(config_set=[StaticQuantConfig.get_config_set_for_tuning()])
        model = autotune(exported, tune_config, eval_fn=evaluate, run_fn=calibrate,
                         example_inputs=(example,))
    info = {
        "version": importlib.metadata.version("neural-compressor-pt"),
        "autotune_seconds": time.perf_counter() - start,
        "tuning_evaluations": evaluations,
    }
    if model is None:
        return None, {**info, "error": "autotune found no config within its tolerance"}
    allow_exported_model_train_eval(model)
    chosen = getattr(model, "qconfig", None) or {}
    info["config"] = {str(k): v.to_dict() for k, v in chosen.items()}
    return model, info


# ---------------------------------------------------------------------------- graphs


def op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def is_quant_node(node: torch.fx.Node, kinds: tuple[str, ...] = QUANT_OPS) -> bool:
    return node.op == "call_function" and op_name(node) in kinds


def int8_graph_summary(gm: torch.fx.GraphModule) -> dict:
    """Ops reading a dequantized activation, ops whose output is quantized, zero points."""
    act_dq = ("dequantize_per_tensor", "dequantize_affine")
    act_q = ("quantize_per_tensor", "quantize_affine")
    reads, writes = Counter(), Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_quant_node(node):
            continue
        if any(isinstance(a, torch.fx.Node) and is_quant_node(a, act_dq) for a in node.args):
            reads[op_name(node)] += 1
        if any(is_quant_node(user, act_q) for user in node.users):
            writes[op_name(node)] += 1
    quant = Counter(op_name(n) for n in gm.graph.nodes if is_quant_node(n))
    zero_points = sorted({int(n.args[2]) for n in gm.graph.nodes
                          if is_quant_node(n, act_q) and isinstance(n.args[2], int)})
    return {"int8_inputs": dict(reads), "int8_outputs": dict(writes), "qdq_nodes": dict(quant),
            "activation_zero_points": zero_points}


# ---------------------------------------------------------------------------- lowering


def _compile_package(model: nn.Module, example: torch.Tensor, path: str) -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example.clone(),))
        torch._inductor.aoti_compile_and_package(
            program, package_path=path, inductor_configs={"freezing": True})


def aoti_isolated(model: nn.Module, example: torch.Tensor, scheme: str,
                  path: Path) -> tuple[Callable, float]:
    """``lower(..., backend="aoti")``'s export + AOTInductor + freezing, in a forked process.

    Weight prepacking in one process is influenced by earlier prepacks of same-shaped int8
    convolutions with other zero points; a fresh process per package keeps each clean.
    The package is loaded here and checked against eager like ``lower`` does.
    """
    model.eval()
    process = multiprocessing.get_context("fork").Process(
        target=_compile_package, args=(model, example, str(path)))
    start = time.perf_counter()
    process.start()
    process.join()
    seconds = time.perf_counter() - start
    if process.exitcode != 0:
        raise LoweringError(f"AOTI compilation exited with code {process.exitcode}")
    fn = torch._inductor.aoti_load_package(str(path))
    probe = example.clone()
    with torch.no_grad():
        expected, output = model(example.clone()), fn(probe)
    if not torch.equal(probe, example):
        raise LoweringError("the compiled model modified its input in place")
    error = relative_error(output, expected)
    if not error <= TOLERANCE[scheme]:
        raise LoweringError(f"compiled outputs differ from eager by {error:.3g} (relative)")
    return fn, seconds


def compiled_accuracy(fn: Callable, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in batches:
            correct += (fn(inputs).argmax(dim=-1) == targets).sum().item()
            total += targets.numel()
    return correct / total


# ---------------------------------------------------------------------------- timing


def time_pairs(pairs: dict[str, tuple], example: torch.Tensor, repeats: int,
               min_calls: int) -> dict[str, dict]:
    """Each (model, baseline) pair timed interleaved ``repeats`` times, pairs in turn."""
    runs: dict[str, list] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, (model_fn, baseline_fn) in pairs.items():
            runs[name].append(measure_speedup(model_fn, baseline_fn, example, threads=1,
                                              min_calls=min_calls))
    results = {}
    for name, measured in runs.items():
        speedups = [m.speedup for m in measured]
        results[name] = {
            "speedup_median": statistics.median(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
            "model_ms_median": statistics.median(m.model.median_ms for m in measured),
            "baseline_ms_median": statistics.median(m.baseline.median_ms for m in measured),
            "speedups": speedups,
            "within_run_spread": [m.speedup_spread for m in measured],
            "noisy": any(m.noisy for m in measured),
        }
    return results


def bench_batch(models: dict[str, nn.Module], packages: dict[str, Callable],
                example: torch.Tensor, repeats: int, min_calls: int) -> dict:
    batch = example.shape[0]
    fns = {f"{name}_aoti": fn for name, fn in packages.items()}
    compile_seconds = {}
    for name in ("fp32", "inc"):
        if name in models:
            lowered = lower(models[name], example, SCHEMES[name], backend="compile")
            fns[f"{name}_compile"] = lowered.fn
            compile_seconds[f"{name}_compile"] = lowered.compile_seconds
    fp32 = time_pairs({"fp32_compile": (fns["fp32_compile"], fns["fp32_aoti"])}, example,
                      repeats, min_calls)["fp32_compile"]
    baseline = "fp32_compile" if fp32["speedup_median"] > 1.0 else "fp32_aoti"
    other = "fp32_aoti" if baseline == "fp32_compile" else "fp32_compile"
    pairs = {key: (fn, fns[baseline]) for key, fn in fns.items() if not key.startswith("fp32")}
    timed = time_pairs(pairs, example, repeats, min_calls)
    base_ms = statistics.median(r["baseline_ms_median"] for r in timed.values())
    timed[baseline] = {"speedup_median": 1.0, "speedup_min": 1.0, "speedup_max": 1.0,
                       "model_ms_median": base_ms}
    ratio = (1 / fp32["speedup_median"], 1 / fp32["speedup_max"], 1 / fp32["speedup_min"])
    if baseline == "fp32_aoti":
        ratio = (fp32["speedup_median"], fp32["speedup_min"], fp32["speedup_max"])
    timed[other] = {"speedup_median": ratio[0], "speedup_min": ratio[1],
                    "speedup_max": ratio[2], "model_ms_median": base_ms / ratio[0]}
    return {"batch": batch, "baseline": baseline, "fp32_compile_vs_aoti": fp32,
            "compile_seconds": compile_seconds, "timings": timed}


# ---------------------------------------------------------------------------- report


def table(results: dict) -> str:
    lines = ["| batch | model | lowering | accuracy (eager) | accuracy (compiled) "
             "| latency ms | speedup vs fp32: median (min-max) |",
             "|---:|---|---|---:|---:|---:|---|"]
    for batch_result in results["batches"]:
        for key, t in sorted(batch_result["timings"].items(), key=_order):
            name, backend = key.rsplit("_", 1)
            acc = results["accuracy"][name]
            marker = " (baseline)" if key == batch_result["baseline"] else ""
            lines.append(
                f"| {batch_result['batch']} | {LABELS[name]} | {backend}{marker} "
                f"| {acc['eager']:.4f} | {acc['compiled']:.4f} | {t['model_ms_median']:.3f} "
                f"| {t['speedup_median']:.2f}x ({t['speedup_min']:.2f}-{t['speedup_max']:.2f}) |"
            )
    return "\n".join(lines)


def _order(item: tuple[str, dict]) -> tuple[int, str]:
    return list(LABELS).index(item[0].rsplit("_", 1)[0]), item[0]


def _example(task, batch: int) -> torch.Tensor:
    if batch <= task.example_input.shape[0]:
        return task.example_input[:batch].clone()
    return next(iter(task.val))[0][:batch].clone()


def main() -> None:
    args = parse_args()
    results: dict = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
                     "threads": 1, "torch": torch.__version__, "accuracy": {}, "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="int8-vs-inc-") as tmp, torch_threads(1):
        task = make_task()
        models: dict[str, nn.Module] = {"fp32": task.model.eval()}
        models["paretoslim"], results["paretoslim_quantize_seconds"] = paretoslim_int8(
            task, task.example_input)
        inc_model, results["inc"] = inc_int8(task, task.example_input)
        if inc_model is not None:
            models["inc"] = inc_model
        for name, model in models.items():
            results["accuracy"][name] = {"eager": accuracy(model, task.val)}
            if isinstance(model, torch.fx.GraphModule):
                results["graphs"][name] = int8_graph_summary(model)
        val_example = next(iter(task.val))[0]
        examples = {b: _example(task, b) for b in args.batches}
        packages: dict[int, dict[str, Callable]] = {b: {} for b in args.batches}
        seconds = results["aoti_compile_seconds"] = {}
        for name, model in models.items():
            fn, seconds[f"{name}_val"] = aoti_isolated(model, val_example, SCHEMES[name],
                                                        Path(tmp) / f"{name}-val.pt2")
            results["accuracy"][name]["compiled"] = compiled_accuracy(fn, task.val)
            for batch, example in examples.items():
                packages[batch][name], seconds[f"{name}_b{batch}"] = aoti_isolated(
                    model, example, SCHEMES[name], Path(tmp) / f"{name}-{batch}.pt2")
        results["batches"] = [bench_batch(models, packages[b], examples[b], args.repeats,
                                          args.min_calls) for b in args.batches]
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    inc = results["inc"]
    if "error" in inc:
        print(f"\nINC unavailable: {inc['error']}")
    else:
        chosen = next(iter(inc["config"].values()), {})
        print(f"\nINC autotune: {inc['autotune_seconds']:.1f} s, "
              f"{len(inc['tuning_evaluations']) - 1} trial(s) after the fp32 baseline "
              f"(accuracies {inc['tuning_evaluations']}); chosen activations: "
              f"{chosen.get('act_dtype')} sym={chosen.get('act_sym')} {chosen.get('act_algo')}")
    for name, summary in results["graphs"].items():
        print(f"{name} graph: int8 inputs {summary['int8_inputs']}, "
              f"int8 outputs {summary['int8_outputs']}, "
              f"activation zero points {summary['activation_zero_points']}")


if __name__ == "__main__":
    main()
