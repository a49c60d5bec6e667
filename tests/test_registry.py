"""The technique registry: Recipe, space, labels, compress and the README come from it."""

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from paretoslim.evaluators import size_mb
from paretoslim.kernels import lower
from paretoslim.spaces import (
    Choice,
    Config,
    Fixed,
    Phase,
    PruningConfig,
    QuantizationConfig,
    Recipe,
    SearchSpace,
    Technique,
    Verdict,
    compress,
    param,
    parameter_table,
    quantize,
    register,
    scheme_names,
    techniques,
)
from paretoslim.spaces import _technique as registry

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ScaleConfig(Config):
    factor: float = param(1.0, low=0.0, high=4.0, low_open=True, off=True)


class Scale(Technique):
    """A toy technique: the output layer's weights scaled; the fine-tune is asked for."""

    section, config, phase, stage = "scale", ScaleConfig, Phase.LOW_RANK, "scale"

    def apply(self, model, config, ctx):
        if config.factor != 1.0:
            last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                last.weight.mul_(config.factor)
            ctx.facts["scaled"] = config.factor
            ctx.changed = True
        return model

    def label(self, config):
        return f"scale={config.factor:g}" if config.factor != 1.0 else ""


@pytest.fixture
def scale_registered(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register(Scale)
    yield


def test_a_registered_technique_joins_recipe_space_labels_and_compress(scale_registered,
                                                                         mlp_task):
    assert [t.section for t in techniques()].index("scale") == 3  # after low rank
    recipe = Recipe.from_dict({"scale": {"factor": 2.0}})
    assert recipe.scale == ScaleConfig(2.0) and Recipe.from_json(recipe.to_json()) == recipe
    assert recipe.short() == "scale=2 fp32"
    space = SearchSpace.from_table({"scale": {"factor": [1.0, 2.0]}})
    assert space.searched()["scale.factor"] == Choice((1.0, 2.0))
    assert "`space.scale.factor` | 1.0 (off) | (0, 4]" in parameter_table()
    with pytest.raises(ValueError, match="'factor' parameter of ScaleConfig"):
        Recipe.from_dict({"scale": {"factor": 5.0}})
    _, facts = compress(mlp_task.model, recipe, example_input=mlp_task.example_input,
                        train=mlp_task.train, calibration=None, finetune_steps=2,
                        learning_rate=1e-3, seed=0)
    assert facts["scaled"] == 2.0 and facts["finetune_steps"] == 2
    _, untouched = compress(mlp_task.model, Recipe(), example_input=mlp_task.example_input,
                            train=mlp_task.train, calibration=None, finetune_steps=2,
                            learning_rate=1e-3, seed=0)
    assert "scaled" not in untouched and untouched["finetune_steps"] == 0


def test_a_section_registers_once():
    with pytest.raises(ValueError, match="registered"):
        register(type("Again", (Technique,), {"section": "pruning", "config": ScaleConfig,
                                              "phase": Phase.STUDENT, "stage": "x"}))


def test_recipe_sections_are_placed_by_type_and_checked():
    assert Recipe(QuantizationConfig("bf16")).quantization.scheme == "bf16"
    with pytest.raises(TypeError, match="must be a QuantizationConfig"):
        Recipe(quantization=ScaleConfig())
    with pytest.raises(TypeError, match="not a recipe section"):
        Recipe(ScaleConfig())


def test_the_readme_parameter_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert parameter_table() in readme, "README's parameter table differs from the registry"


def test_int8_weight_only_is_a_scheme_of_the_default_space():
    assert "int8_weight_only" in scheme_names()
    assert "int8_weight_only" in SearchSpace.default().domains["quantization.scheme"].values
    assert SearchSpace.from_table({"quantization": {"scheme": "int8_weight_only"}}).domains[
        "quantization.scheme"] == Fixed("int8_weight_only")


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_int8_weight_only_stores_int8_weights_and_lowers(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(16, 128)
    expected = model(x)
    dense = size_mb(model)
    quantized = quantize(model, "int8_weight_only", x, granularity=granularity,
                         keep_float=["2"])
    assert type(quantized[2].weight) is torch.nn.Parameter  # kept in float
    assert type(quantized[0].weight.data).__name__ != "Tensor"
    assert size_mb(quantized) < 0.5 * dense
    out = quantized(x)
    assert ((out - expected).abs().max() / expected.abs().max()) < 0.05
    lowered = lower(quantized, x, "int8_weight_only", "aoti")
    assert lowered.max_relative_error < 0.05
    torch.testing.assert_close(lowered.fn(x), out, rtol=1e-3, atol=1e-3)


def test_compress_with_int8_weight_only_keeps_quality(mlp_task):
    recipe = Recipe(QuantizationConfig("int8_weight_only"))
    model, facts = compress(mlp_task.model, recipe, example_input=mlp_task.example_input,
                            train=mlp_task.train, calibration=None, finetune_steps=0,
                            learning_rate=1e-3, seed=0)
    assert 0 < facts["quantization_error"] < 0.05
    assert recipe.short() == "int8_weight_only"
    assert size_mb(model) < 0.5 * size_mb(mlp_task.model)


def _long_functions(folder: str, limit: int = 50) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.name}:{node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("folder", ["spaces", "search"])
def test_every_function_fits_on_a_screen(folder):
    assert _long_functions(folder) == []


@pytest.mark.parametrize("folder", ["spaces", "search"])
def test_every_module_holds_one_job(folder, limit=350):
    long = [f"{path.name} ({n} lines)" for path in sorted((ROOT / folder).glob("*.py"))
            if (n := len(path.read_text().splitlines())) >= limit]
    assert long == []


def test_the_size_checks_find_what_is_too_long(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    folder.mkdir()
    body = "\n".join(f"    x{k} = {k}" for k in range(50))
    (folder / "long.py").write_text(f"def f():\n{body}\n" + "\n" * 300)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _long_functions("pkg") == ["long.py:f (51 lines)"]
    with pytest.raises(AssertionError, match="long.py"):
        test_every_module_holds_one_job("pkg")


def test_compress_names_no_technique():
    source = (ROOT / "spaces" / "_apply.py").read_text()
    body = source[source.index("def compress("):]
    sections = [t.section for t in techniques()]
    named = [s for s in sections if re.search(rf"\b{s}\b", body.split('"""')[2])]
    assert named == []


class _Watch:
    """A fine-tune watch that records what it sees and stops at ``stop_at``."""

    def __init__(self, rungs, stop_at=None, extend_to=None):
        self.rungs, self.stop_at, self.extend_to = tuple(rungs), stop_at, extend_to
        self.seen, self.steps = [], []

    def at_rung(self, step, steps, model):
        assert not model.training
        self.seen.append((step, steps))
        if step == self.stop_at:
            return Verdict(stop="hopeless")
        if self.extend_to:  # asked at step 0 too, where it cannot extend
            return Verdict(extend_to=self.extend_to)
        return Verdict()

    def after_step(self, done, total):
        self.steps.append((done, total))


def test_the_fine_tune_shows_its_rungs_and_can_be_stopped_or_extended_there(mlp_task):
    recipe = Recipe(PruningConfig(0.5))
    kwargs = dict(example_input=mlp_task.example_input, train=mlp_task.train,
                  calibration=None, learning_rate=1e-3, seed=0)
    watch = _Watch((0.1, 0.5))
    _, facts = compress(mlp_task.model, recipe, finetune_steps=20, watch=watch, **kwargs)
    assert watch.seen == [(0, 20), (2, 20), (10, 20)] and "stopped" not in facts
    assert watch.steps == [(k, 20) for k in range(1, 21)]
    watch = _Watch((0.5,), stop_at=5)
    model, facts = compress(mlp_task.model, recipe, finetune_steps=10, watch=watch, **kwargs)
    assert watch.seen == [(0, 10), (5, 10)] and len(watch.steps) == 5
    assert facts["stopped"] == "hopeless" and facts["stopped_at_step"] == 5
    assert facts["finetune_steps"] == 10
    watch = _Watch((0.5,), extend_to=16)
    _, facts = compress(mlp_task.model, recipe, finetune_steps=10, watch=watch, **kwargs)
    assert watch.seen == [(0, 10), (5, 10)] and len(watch.steps) == 16
    assert facts["finetune_steps"] == 16 and facts["promoted_at_step"] == 5
    watch = _Watch((0.5,), stop_at=5)
    compress(mlp_task.model, Recipe(), finetune_steps=10, watch=watch, **kwargs)
    assert watch.seen == []  # nothing changed: no fine-tune, no rung


def test_rungs_wait_until_gradual_sparsity_has_settled(mlp_task):
    watch = _Watch((0.25, 0.5, 0.8))
    recipe = Recipe.from_dict({"sparsity": {"ratio": 0.5, "schedule": "gradual"}})
    compress(mlp_task.model, recipe, example_input=mlp_task.example_input,
             train=mlp_task.train, calibration=None, learning_rate=1e-3, seed=0,
             finetune_steps=20, watch=watch)
    assert [step for step, _ in watch.seen] == [0, 16]
