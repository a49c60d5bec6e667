"""Export of one trial: the compressed model as a torch.export program, its recipe and a card."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from ..kernels import dense_execution, sparse_execution
from ..spaces import Recipe, compress, model_io
from ._archive import check_program_archive
from ._errors import ParetoslimError
from ._measuring import calibration_batches, quality_of
from ._spec import StudySpec
from ._store import StudyStore
from ._task import load_task
from ._trial import TrialSettings

MODEL_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
METRICS_FILE = "metrics.json"


def export_trial(study: optuna.Study, spec: StudySpec | None, number: int,
                 out_dir: str | Path) -> Path:
    """Rebuild trial ``number`` from its recipe and write the deployable artifact to ``out_dir``.

    Writes ``model.pt2`` (``torch.export`` program, dynamic batch dimension when the model
    allows it; load with ``load_program``), ``model.onnx`` when the ONNX exporter handles
    the scheme, ``recipe.json``, ``metrics.json`` (search-time figures, the quality
    re-measured on export, the task and measurement settings, the environment) and
    ``card.md``. Raises ParetoslimError if the trial is not a completed one or the spec
    needed to rebuild the task is not available.
    """
    trial = _completed_trial(study, spec, number)
    record = StudyStore.record(trial)
    recipe = Recipe.from_dict(record.recipe)
    recorded = dict(record.metrics)
    task = load_task(spec.task, spec.base_dir, spec.task_options)
    settings = TrialSettings.from_spec(spec)
    finetune = settings.finetune
    model, _ = compress(
        task.model, recipe, example_input=task.example_input, train=task.train,
        calibration=calibration_batches(task), finetune_steps=finetune.steps,
        learning_rate=finetune.learning_rate, seed=settings.seed, student_factory=task.student,
    )
    quality = quality_of(task, model)
    model, execution = _as_measured(model, recorded)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    program, dynamic, sequence = _exported(model, task.example_input)
    with _replacing(out / MODEL_FILE) as temporary:
        torch.export.save(program, str(temporary))
    onnx = _save_onnx(program, out / ONNX_FILE)
    _write(out / "recipe.json", json.dumps(recipe.to_dict(), indent=2) + "\n")
    exported = {
        "study": study.study_name, "trial": number, "recorded": recorded,
        "export_quality": quality, "dynamic_batch": dynamic, "dynamic_sequence": sequence,
        "onnx": onnx, "sparse_execution": execution,
        "model_file_mb": (out / MODEL_FILE).stat().st_size / 1e6,
        "scheme": recipe.quantization.scheme, **_settings_record(spec, settings),
        "environment": _environment(),
    }
    _write(out / METRICS_FILE, json.dumps(exported, indent=2) + "\n")
    onnx_line = ("`model.onnx` holds the same model for ONNX runtimes.\n" if onnx == ONNX_FILE
                 else f"No ONNX file ({onnx.removeprefix('skipped: ')}).\n")
    _write(out / "card.md", _card(study.study_name, number, recipe, recorded, quality,
                                  dynamic, model_io.shapes(task.example_input), execution)
           + onnx_line)
    return out


def _settings_record(spec: StudySpec, settings: TrialSettings) -> dict[str, Any]:
    """The task and latency settings an export records for ``verify``."""
    latency = settings.latency
    return {
        "task": {"reference": spec.task, "base_dir": str(spec.base_dir.resolve()),
                 "options": spec.task_options},
        "latency": {"batch_size": latency.batch_size,
                    "sequence_length": latency.sequence_length, "threads": latency.threads,
                    "min_calls": latency.min_calls, "min_seconds": latency.min_seconds,
                    "max_spread": latency.max_spread, "lowering": latency.lowering},
    }


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` once written: a link
    already at ``path`` is replaced, never written through; a failed write leaves nothing."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                    suffix=path.suffix)  # torch.export.save wants .pt2
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write(path: Path, text: str) -> None:
    with _replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _completed_trial(study: optuna.Study, spec: StudySpec | None,
                     number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number``, checked to be completed and rebuildable (``spec`` known)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(number)
    if trial is None:
        held = f"trials 0..{len(trials) - 1}" if trials else "it has no trials yet"
        raise ParetoslimError(f"study {study.study_name!r} has no trial {number} ({held})")
    if trial.state != TrialState.COMPLETE:
        raise ParetoslimError(
            f"trial {number} of study {study.study_name!r} is {trial.state.name.lower()}, "
            "only completed trials can be exported")
    if spec is None:
        raise ParetoslimError(
            f"study {study.study_name!r}: its spec file is not readable any more; pass the "
            "spec path instead of the study name")
    if not StudyStore.record(trial).recipe:
        raise ParetoslimError(f"trial {number} of study {study.study_name!r} holds no "
                              "readable recipe to rebuild it from")
    return trial


def _as_measured(model: torch.nn.Module, recorded: dict[str, Any]
                 ) -> tuple[torch.nn.Module, str]:
    """The model computing the way its latency was measured, and how: "none" (no stored
    weight forms), "sparse" (sparse layers run ``paretoslim::sparse_linear``, other stored
    forms decoded) or "densified" (every stored form decoded to dense weights)."""
    if recorded.get("sparse_execution") == "sparse":
        fast = sparse_execution(model)
        if fast is not None:
            return fast, "sparse"
    dense = dense_execution(model)
    return dense, "none" if dense is model else "densified"


def _exported(model: torch.nn.Module, example: model_io.Inputs
              ) -> tuple[torch.export.ExportedProgram, bool, bool]:
    """The model's torch.export program, as dynamic as the model allows, and whether its
    batch and its sequence dimensions (of token-id inputs) are dynamic."""
    model.eval()
    tokens = any(model_io.token_like(t) for t in model_io.tensors(example))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tokens:
            with contextlib.suppress(Exception):
                return model_io.export(model, example, dynamic=True, sequence=True), True, True
        with contextlib.suppress(Exception):  # some models specialize the batch size
            return model_io.export(model, example, dynamic=True), True, False
        return model_io.export(model, example), False, False


def load_program(path: str | Path) -> torch.nn.Module:
    """Load a saved ``torch.export`` program as a module without running code it carries.

    The archive is checked first (``check_program_archive``): ``torch.export.load`` would
    unpickle some entries with ``pickle``. Then ``torch.export.load`` runs with weights-only
    loading forced, so its ``torch.load`` calls cannot fall back to full unpickling.
    Raises ParetoslimError for a refused archive.
    """
    import logging

    from torchao.quantization.pt2e import allow_exported_model_train_eval

    from .. import kernels  # registers paretoslim::sparse_linear

    check_program_archive(path)
    kernels.register_quantized_ops()
    previous = {name: os.environ.pop(name, None) for name in (_WEIGHTS_ONLY, _NO_WEIGHTS_ONLY)}
    os.environ[_WEIGHTS_ONLY] = "1"
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path)).module()
    finally:
        export_log.setLevel(level)
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    # exported modules refuse .eval(); it is a no-op for an inference graph
    allow_exported_model_train_eval(module)
    return module


_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _save_onnx(program: torch.export.ExportedProgram, path: Path) -> str:
    """Write an ONNX file of the exported program (its dynamic dimensions kept) if the
    exporter handles it; return what happened."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "skipped: install with pip install 'paretoslim[onnx]'"
    import logging

    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with _replacing(path) as temporary:
                torch.onnx.export(program, dynamo=True, verbose=False).save(str(temporary))
    except Exception as exc:  # the exporter covers fp32 and bf16, not PT2E int8 graphs
        path.unlink(missing_ok=True)  # an earlier export's file (a link: the link alone)
        return f"skipped: the ONNX exporter failed ({type(exc).__name__})"
    finally:
        quiet.setLevel(level)
    return ONNX_FILE


def _environment() -> dict[str, Any]:
    from ..kernels import detect_target

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "target": detect_target().to_dict(),
    }


def _card(study: str, number: int, recipe: Recipe, m: dict[str, Any], quality: float,
          dynamic: bool, shape: str, execution: str) -> str:
    def row(label: str, key: str, base_key: str, unit: str, fmt: str) -> str:
        value, base = m.get(key), m.get(base_key)
        if value is None or base is None:
            return ""
        return f"| {label} | {format(base, fmt)} {unit} | {format(value, fmt)} {unit} |\n"

    batch = "any batch size" if dynamic else f"input shape {shape} only"
    sparse = {
        "sparse": "Its sparse layers call `paretoslim::sparse_linear` (`torch.sparse.mm` on "
                  "the stored CSR / BSR components): `import paretoslim.kernels` before "
                  "loading it.\n\n",
        "densified": "Layers kept in a compact form (sparse components, k-means codebooks) "
                     "are decoded to dense weights in `model.pt2`, as they were timed; "
                     "`size` counts the compact form.\n\n",
    }.get(execution, "")
    return (
        f"# Compressed model: study `{study}`, trial {number}\n\n"
        f"Recipe: `{recipe.short()}` (full recipe in `recipe.json`).\n\n"
        "| figure | teacher | compressed |\n| --- | --- | --- |\n"
        + row("quality", "quality", "baseline_quality", "", ".4f")
        + row("latency (median)", "latency_ms", "baseline_latency_ms", "ms", ".3f")
        + row("size", "size_mb", "baseline_size_mb", "MB", ".3f")
        + row("parameters", "parameters", "baseline_parameters", "", ",d")
        + "\n"
        f"Speedup {m.get('speedup', float('nan')):.2f}x, compression "
        f"{m.get('compression', float('nan')):.1f}x, measured at search time with batch "
        f"{m.get('latency_batch_size')} on {m.get('threads')} thread(s) of "
        f"{m.get('target', {}).get('cpu', 'this CPU')}; the teacher was lowered the same way "
        f"({m.get('lowering', 'aoti')} lowering, frozen weights) and timed interleaved with "
        "it.\n\n"
        + sparse +
        f"Quality re-measured on export: {quality:.4f}.\n\n"
        f"`model.pt2` is a `torch.export` program ({batch}): "
        "`torch.export.load('model.pt2')`; compile it with AOTInductor, "
        "`torch._inductor.aoti_compile_and_package(program, "
        "inductor_configs={'freezing': True})`, for the measured speed. "
        "`paretoslim verify DIR` re-measures quality and latency on the machine at hand.\n"
    )
