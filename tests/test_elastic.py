"""The elastic student: slices are compress()'s structures, share their weights, train and
persist."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_task

from paretoslim.spaces import (
    BudgetExceeded,
    Deadline,
    DistillationConfig,
    ElasticStudent,
    PruningConfig,
    Recipe,
    StudentConfig,
    compress,
    distillation_loss,
    sliceable,
)

KD = DistillationConfig(temperature=4.0, alpha=0.9)


@pytest.fixture(scope="module")
def tasks():
    return {kind: tiny_task(kind) for kind in ("cnn", "resnet", "mlp", "transformer")}


def structure(width=1.0, depth=1.0, ratio=0.0, allocation="global", **pruning):
    return Recipe(StudentConfig(width=width, depth=depth),
                  PruningConfig(ratio=ratio, allocation=allocation, round_to=2, **pruning))


def tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


def kd_loss(model, task):
    with torch.no_grad():
        return sum(float(distillation_loss(model(x), task.model(x), y, KD))
                   for x, y in task.val) / len(task.val)


@pytest.mark.parametrize("kind", ["cnn", "resnet", "mlp", "transformer"])
@pytest.mark.parametrize("recipe", [
    structure(width=0.5), structure(width=0.75), structure(ratio=0.3),
    structure(ratio=0.3, allocation="uniform"), structure(width=0.75, ratio=0.3),
    structure(ratio=0.3, allocation="uniform", taper=0.6),
    structure(depth=0.5), structure(width=0.5, depth=0.5, ratio=0.3)],
    ids=["w0.5", "w0.75", "p0.3", "p0.3u", "w0.75p0.3", "p0.3taper", "d0.5", "w0.5d0.5p0.3"])
def test_a_slice_is_the_structure_compress_builds(tasks, kind, recipe):
    task = tasks[kind]
    sliced = ElasticStudent(task.model, task.example_input).slice(recipe)
    built, _ = compress(task.model, recipe, example_input=task.example_input,
                        train=task.train, calibration=None, finetune_steps=0,
                        learning_rate=0.0, seed=0)
    expected, got = tensors(built), tensors(sliced)
    assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in expected.items()}
    assert [type(m) for m in sliced.modules()] == [type(m) for m in built.modules()]
    # before training the shared weights are the teacher's: the same channels are kept
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_the_largest_slice_is_the_teacher(tasks):
    task = tasks["resnet"]
    elastic = ElasticStudent(task.model, task.example_input)
    x = task.val[0][0]
    with torch.no_grad():
        assert torch.equal(elastic.slice(Recipe())(x), task.model(x))
        plan = elastic.plan(Recipe())
        assert torch.equal(elastic.forward(plan, x), task.model(x))


def test_slices_share_the_elements_they_keep(tasks):
    task = tasks["cnn"]
    elastic = ElasticStudent(task.model, task.example_input)
    narrow = structure(width=0.5)
    kept = set(elastic.plan(narrow).params["stem.0.weight"].flatten().tolist())
    weight = elastic.model.stem[0].weight
    inside = next(i for i in range(weight.numel()) if i in kept)
    outside = next(i for i in range(weight.numel()) if i not in kept)
    before = elastic.slice(narrow).stem[0].weight.clone()
    with torch.no_grad():
        weight.view(-1)[outside] += 1.0
    assert torch.equal(elastic.slice(narrow).stem[0].weight, before)
    with torch.no_grad():
        weight.view(-1)[inside] += 1.0
    changed = elastic.slice(narrow).stem[0].weight
    assert (changed != before).sum() == 1
    assert torch.equal(elastic.slice(Recipe()).stem[0].weight, weight)
    # gradients of a slice reach exactly the shared elements it keeps
    x, y = task.train[0]
    torch.nn.functional.cross_entropy(elastic.forward(elastic.plan(narrow), x), y).backward()
    touched = set(weight.grad.flatten().nonzero().flatten().tolist())
    assert touched and touched <= kept


@pytest.mark.parametrize(("recipe", "reason"), [
    (structure(ratio=0.3, allocation="sensitivity"), "sensitivity allocation"),
    (structure(ratio=0.3, criterion="taylor"), "'taylor' criterion"),
    (structure(heads=0.5), "attention heads"),
])
def test_a_recipe_that_is_no_slice_is_refused_with_its_reason(tasks, recipe, reason):
    task = tasks["transformer"]
    assert reason in sliceable(recipe)
    with pytest.raises(ValueError, match=reason):
        ElasticStudent(task.model, task.example_input).slice(recipe)


def test_a_student_factory_builds_no_slices():
    assert "student factory" in sliceable(structure(width=0.5), student_factory=lambda w, d: 0)
    assert sliceable(structure(ratio=0.3), student_factory=lambda w, d: 0) is None


def test_sandwich_training_lowers_the_loss_of_the_smallest_slice(tasks):
    task = tasks["cnn"]
    elastic = ElasticStudent(task.model, task.example_input)
    smallest = structure(width=0.5, ratio=0.4)
    grid = [structure(width=w, ratio=r) for w in (0.5, 0.75) for r in (0.0, 0.4)]
    untrained = kd_loss(ElasticStudent.recalibrate(elastic.slice(smallest), task.train), task)
    seen = []
    losses = elastic.train(grid, task.train, 40, distillation=KD, learning_rate=3e-3,
                           on_step=lambda step, total: seen.append((step, total)))
    trained = kd_loss(ElasticStudent.recalibrate(elastic.slice(smallest), task.train), task)
    assert trained < 0.7 * untrained
    assert len(losses) == 40 and seen[-1] == (40, 40) and elastic.steps == 40


def test_training_stops_at_its_deadline(tasks):
    task = tasks["mlp"]
    elastic = ElasticStudent(task.model, task.example_input)
    with pytest.raises(BudgetExceeded, match="elastic training"):
        elastic.train([structure(width=0.5)], task.train, 50, distillation=KD,
                      learning_rate=1e-3, deadline=Deadline(0.0))
    assert elastic.steps == 1


def test_recalibration_measures_batch_statistics(tasks):
    task = tasks["cnn"]
    model = ElasticStudent(task.model, task.example_input).slice(structure(width=0.5))
    x = task.train[0][0]
    ElasticStudent.recalibrate(model, [x])
    with torch.no_grad():
        mean = model.stem[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(model.stem[1].running_mean, mean, atol=1e-5)
    assert model.stem[1].momentum == 0.1 and not model.training


def test_save_and_load_give_the_same_slices_ranked_by_the_teacher(tasks, tmp_path):
    task = tasks["resnet"]
    elastic = ElasticStudent(task.model, task.example_input)
    recipes = [structure(width=0.5), structure(ratio=0.3), structure(depth=0.5, ratio=0.3)]
    positions = [elastic.plan(r).params for r in recipes]
    elastic.train(recipes, task.train, 3, distillation=KD, learning_rate=1e-3)
    with torch.no_grad():  # reverse the channel order the shared weights would rank
        for p in elastic.model.parameters():
            p.mul_(torch.linspace(3.0, 0.1, p.shape[0]).view(-1, *[1] * (p.dim() - 1)))
    elastic.save(tmp_path / "elastic.pt")
    loaded = ElasticStudent.load(tmp_path / "elastic.pt", task.model, task.example_input)
    assert loaded.steps == 3
    for recipe, before in zip(recipes, positions, strict=True):
        assert all(torch.equal(i, before[n]) for n, i in loaded.plan(recipe).params.items())
        a, b = tensors(elastic.slice(recipe)), tensors(loaded.slice(recipe))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_cache_key_follows_the_teacher_and_the_settings(tasks):
    mlp, cnn = tasks["mlp"].model, tasks["cnn"].model
    key = ElasticStudent.cache_key(mlp, steps=300)
    assert key == ElasticStudent.cache_key(mlp, steps=300)
    assert key not in (ElasticStudent.cache_key(mlp, steps=600),
                       ElasticStudent.cache_key(cnn, steps=300))
