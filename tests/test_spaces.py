import copy
import json

import pytest
import torch
from _tiny import TinyCNN, TinyMLP, blobs
from torch import nn

from paretoslim.evaluators import size_mb
from paretoslim.spaces import (
    Choice,
    DistillationConfig,
    Fixed,
    FloatRange,
    LowRankConfig,
    PruningConfig,
    QuantizationConfig,
    Recipe,
    SearchSpace,
    StudentConfig,
    compress,
    derive_student,
    distill,
    factorize,
    factorize_conv2d,
    factorize_linear,
    output_layers,
    prune_channels,
    quantize,
)
from paretoslim.spaces._pt2e import drop_unused_attributes


def _full_recipe():
    return Recipe(StudentConfig(0.75), PruningConfig(0.3), LowRankConfig(0.5),
                  DistillationConfig(3.0, 0.5), QuantizationConfig("int8_static"))


def test_recipe_json_round_trip():
    recipe = _full_recipe()
    text = recipe.to_json()
    assert json.loads(text)["pruning"] == {"ratio": 0.3, "criterion": "l2",
                                           "allocation": "global", "round_to": 1,
                                           "heads": 0.0, "taper": 0.0}
    assert Recipe.from_json(text) == recipe
    assert Recipe.from_dict({}) == Recipe()


@pytest.mark.parametrize("data, message", [
    ({"prune": {}}, "Unknown recipe section"),
    ({"pruning": {"ratio": 0.1, "criteria": "l1"}}, "Unknown key"),
    ({"pruning": {"ratio": 0.1, "criterion": "l3"}}, "'criterion' parameter of PruningConfig"),
    ({"quantization": {"cluster_bits": 3.5}}, "must be an integer"),
    ({"quantization": {"qat": "yes"}}, "must be true or false"),
    ({"pruning": {"ratio": 1.2}}, "The 'ratio' parameter of PruningConfig must be in"),
    ({"student": {"width": 0.0}}, "'width' parameter of StudentConfig"),
    ({"quantization": {"scheme": "int4"}}, "must be one of"),
])
def test_recipe_rejects_bad_input(data, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Recipe.from_dict(data)


def test_space_from_table_and_recipe():
    space = SearchSpace.from_table({
        "pruning": {"ratio": {"low": 0.0, "high": 0.5, "step": 0.1}},
        "quantization": {"scheme": ["fp32", "int8_static"]},
        "student": {"width": 1.0},
    })
    assert space.domains["pruning.ratio"] == FloatRange(0.0, 0.5, 0.1)
    assert space.domains["quantization.scheme"] == Choice(("fp32", "int8_static"))
    assert space.domains["student.width"] == Fixed(1.0)
    assert "student.width" not in space.searched()
    recipe = space.recipe({"pruning.ratio": 0.2, "quantization.scheme": "int8_static"})
    assert recipe.pruning.ratio == 0.2 and recipe.student.width == 1.0
    # a sampler's float noise makes no second recipe of one grid point
    noisy = space.recipe({"pruning.ratio": 0.1 + 0.2, "quantization.scheme": "int8_static"})
    assert noisy == space.recipe({"pruning.ratio": 0.3, "quantization.scheme": "int8_static"})
    assert noisy.pruning.ratio == 0.3


@pytest.mark.parametrize("table, error", [
    ({"pruning": {"rate": 0.1}}, KeyError),
    ({"pruner": {"ratio": 0.1}}, KeyError),
    ({"pruning": {"ratio": {"low": 0.0, "high": 1.5}}}, ValueError),
    ({"pruning": {"ratio": {"low": 0.0, "high": 0.5, "step": 0.3}}}, ValueError),
    ({"pruning": {"ratio": {"low": 0.0, "high": 0.5, "step": float("inf")}}}, ValueError),
    ({"pruning": {"ratio": {"low": 0.0, "high": 0.5, "step": float("nan")}}}, ValueError),
    ({"quantization": {"scheme": ["fp32", "fp8"]}}, ValueError),
])
def test_space_rejects_bad_tables(table, error):
    with pytest.raises(error):
        SearchSpace.from_table(table)


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_prune_zero_ratio_is_identity():
    model, x = TinyCNN().eval(), torch.randn(4, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    assert prune_channels(model, x, 0.0, global_ranking=True) is model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("global_ranking", [True, False])
def test_pruning_removes_channels_and_keeps_shapes_consistent(global_ranking):
    model, x = TinyCNN(width=16).eval(), torch.randn(4, 1, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    prune_channels(model, x, 0.5, global_ranking=global_ranking)
    out = _outputs(model, x)
    assert out.shape == (4, 4)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params
    # the residual add forces the block's last conv to match the stem
    assert model.block[3].out_channels == model.stem[0].out_channels
    assert model.block[3].out_channels == model.stem[1].num_features
    assert model.head[-1].out_features == 4


def test_output_layer_detected_and_kept():
    model, x = TinyMLP(), torch.randn(2, 16)
    assert output_layers(model, x) == [model.net[4]]


def test_student_width_halves_hidden_units():
    model, x = TinyMLP(hidden=64).eval(), torch.randn(2, 16)
    student = derive_student(model, x, 0.5)
    assert student.net[0].out_features == 32 and student.net[2].out_features == 32
    assert model.net[0].out_features == 64  # teacher untouched


def test_full_rank_factorization_reproduces_outputs():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factorize_linear(linear, 16)(x), linear(x), atol=1e-5,
                               rtol=1e-4)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    y = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(factorize_conv2d(conv, 8)(y), conv(y), atol=1e-5, rtol=1e-4)


def test_low_rank_truncation_error_is_the_tail_of_the_spectrum():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32, bias=False)
    s = torch.linalg.svdvals(linear.weight.detach())
    approx = factorize_linear(linear, 8)
    w = approx[1].weight @ approx[0].weight
    err = torch.linalg.matrix_norm(w - linear.weight.detach())
    torch.testing.assert_close(err, s[8:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_factorize_skips_layers_it_would_not_speed_up():
    model = TinyMLP(features=16, hidden=64)
    same, count = factorize(copy.deepcopy(model), 1.0)
    assert count == 0
    reduced, count = factorize(model, 0.25)
    # 64x64 at rank 16: 16*128 < 4096, factorized; 16x64 at rank 4: 4*80 < 1024, factorized
    assert count == 3
    assert isinstance(reduced.net[2], nn.Sequential)
    _, count = factorize(TinyMLP(), 0.9)  # rank 58 of 64x64: 58*128 > 4096, stays dense
    assert count == 0


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scheme, bound", [
    ("fp32", 0.0), ("bf16", 0.03), ("int8_dynamic", 0.06), ("int8_static", 0.08)])
def test_quantization_error_is_bounded(cnn_task, scheme, bound):
    model = copy.deepcopy(cnn_task.model)
    x = cnn_task.val[0][0]
    reference = _outputs(model, x)
    quantized = quantize(model, scheme, cnn_task.example_input, cnn_task.train[:4])
    assert _relative_error(_outputs(quantized, x), reference) <= bound


def test_int8_static_runs_on_other_batch_sizes_and_shrinks_size(mlp_task):
    model = copy.deepcopy(mlp_task.model)
    quantized = quantize(model, "int8_static", mlp_task.example_input, mlp_task.train[:4])
    assert _outputs(quantized, torch.randn(3, 16)).shape == (3, 4)
    assert size_mb(quantized) < 0.5 * size_mb(mlp_task.model)


def test_drop_unused_attributes_keeps_what_the_graph_reads():
    gm = torch.fx.symbolic_trace(TinyMLP())
    gm.register_buffer("stale", torch.zeros(1000))
    x = torch.randn(2, 16)
    expected = gm(x)
    drop_unused_attributes(gm)
    assert not hasattr(gm, "stale")
    torch.testing.assert_close(gm(x), expected)


def test_distillation_moves_student_towards_teacher(mlp_task):
    teacher = mlp_task.model
    student = derive_student(teacher, mlp_task.example_input, 0.25)
    x = mlp_task.val[0][0]

    def gap():
        return (_outputs(student, x).softmax(-1) - _outputs(teacher, x).softmax(-1)).abs().mean()

    before = gap()
    distill(student, teacher, mlp_task.train, steps=60, config=DistillationConfig(),
            learning_rate=3e-3, seed=0)
    assert gap() < before


def test_distillation_fails_on_nan_loss(mlp_task):
    class NanTeacher(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))

    student = copy.deepcopy(mlp_task.model)
    with pytest.raises(FloatingPointError, match="NaN|nan"):
        distill(student, NanTeacher(), mlp_task.train, steps=3, config=DistillationConfig(),
                learning_rate=1e-3, seed=0)


def test_compress_is_deterministic_and_leaves_teacher_alone(cnn_task):
    recipe = Recipe(StudentConfig(0.75), PruningConfig(0.25), LowRankConfig(0.5))
    teacher_state = copy.deepcopy(cnn_task.model.state_dict())

    def run():
        model, facts = compress(cnn_task.model, recipe, example_input=cnn_task.example_input,
                                train=cnn_task.train, calibration=None, finetune_steps=10,
                                learning_rate=1e-3, seed=3)
        return model, facts

    a, facts = run()
    b, _ = run()
    assert facts["finetune_steps"] == 10 and facts["factorized_layers"] > 0
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    for k, v in cnn_task.model.state_dict().items():
        assert torch.equal(v, teacher_state[k])


def test_compress_uses_task_student_factory(mlp_task):
    calls = []

    def student(width, depth):
        calls.append((width, depth))
        return TinyMLP(hidden=int(64 * width))

    model, facts = compress(mlp_task.model, Recipe(StudentConfig(0.5)),
                            example_input=mlp_task.example_input, train=mlp_task.train,
                            calibration=None, finetune_steps=5, learning_rate=1e-3, seed=0,
                            student_factory=student)
    assert calls == [(0.5, 1.0)]
    assert model.net[0].out_features == 32 and facts["finetune_steps"] == 5


def test_blobs_are_learnable():
    x, y = blobs(64, (16,), 4, seed=0)
    assert x.shape == (64, 16) and set(y.tolist()) <= {0, 1, 2, 3}


def test_fine_tune_data_order_does_not_depend_on_earlier_use():
    class EpochBatches:
        """Shuffles differently per epoch, like a sampler with set_epoch."""

        def __init__(self, data):
            self.data, self.epoch = data, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            epoch, self.epoch = self.epoch, self.epoch + 1
            g = torch.Generator().manual_seed(epoch)
            return iter([self.data[i] for i in torch.randperm(len(self.data), generator=g)])

    from _tiny import tiny_task

    task = tiny_task("mlp")
    train = EpochBatches(task.train)

    def run():
        student = copy.deepcopy(task.model)
        distill(student, task.model, train, steps=20, config=DistillationConfig(),
                learning_rate=1e-3, seed=0)
        return student

    first = run()
    list(iter(train))  # someone else consumed an epoch in between
    second = run()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_int8_static_with_a_batch_of_one_stays_dynamic(mlp_task):
    from paretoslim.spaces import export_dynamic_batch

    one = mlp_task.example_input[:1]
    quantized = quantize(copy.deepcopy(mlp_task.model), "int8_static", one, mlp_task.train[:2])
    assert _outputs(quantized, torch.randn(5, 16)).shape == (5, 4)
    program = export_dynamic_batch(mlp_task.model, one).module()
    assert program(torch.randn(1, 16)).shape == (1, 4)
    assert program(torch.randn(7, 16)).shape == (7, 4)
