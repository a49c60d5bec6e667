"""Hugging Face transformers compressed as they are: keyword inputs, output objects, heads,
FFN and layers removed, every technique on tiny randomly initialised encoders."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from paretoslim.evaluators import size_mb
from paretoslim.search import ParetoslimError, Task
from paretoslim.search._task import check_model_accepts_input
from paretoslim.spaces import (
    DistillationConfig,
    Recipe,
    canonicalize,
    compress,
    derive_student,
    distill,
    is_weight_layer,
    model_io,
    prune_channels,
)
from paretoslim.spaces._distill import _block_pairs
from paretoslim.spaces._heads import hf_attentions

ROOT = Path(__file__).resolve().parent.parent
LABELS = 3


def _text_batch(n: int = 8, length: int = 12, vocab: int = 100) -> dict:
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, -3:] = 0  # one padded row
    return {"input_ids": torch.randint(2, vocab, (n, length)), "attention_mask": mask,
            "labels": torch.randint(0, LABELS, (n,))}


def _image_batch(n: int = 8) -> dict:
    return {"pixel_values": torch.randn(n, 1, 16, 16), "labels": torch.randint(0, LABELS, (n,))}


ENCODERS = {
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=LABELS)), _text_batch),
    "distilbert": (lambda: transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                      hidden_dim=64, max_position_embeddings=64,
                                      num_labels=LABELS)), _text_batch),
    "roberta": (lambda: transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, num_labels=LABELS,
                                   pad_token_id=1)), _text_batch),
    "gpt2": (lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=LABELS,
        pad_token_id=0)), _text_batch),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=LABELS)), _image_batch),
}


def _encoder(name: str):
    torch.manual_seed(0)
    make, batch = ENCODERS[name]
    return make().eval(), batch


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _heads(model) -> list[int]:
    return [a.num_heads for a in hf_attentions(canonicalize(copy.deepcopy(model)))]


# each technique alone; what must hold of the compressed model beside its outputs
TECHNIQUES = {
    "heads": ({"pruning": {"heads": 0.5}}, lambda old, new, facts: sum(_heads(new)) == 4),
    "channels": ({"pruning": {"ratio": 0.5}},
                 lambda old, new, facts: size_mb(new) < 0.8 * size_mb(old)),
    "width": ({"student": {"width": 0.5}},
              lambda old, new, facts: size_mb(new) < 0.8 * size_mb(old)),
    "depth": ({"student": {"depth": 0.5}}, lambda old, new, facts: facts["blocks_removed"] == 1),
    "low_rank": ({"low_rank": {"rank_fraction": 0.25}},
                 lambda old, new, facts: size_mb(new) < size_mb(old)),
    "sparsity": ({"sparsity": {"ratio": 0.5}},
                 lambda old, new, facts: size_mb(new) < size_mb(old)),
    "weight_sharing": ({"weight_sharing": {"bits": 4}},
                       lambda old, new, facts: size_mb(new) < size_mb(old)),
    "int8_dynamic": ({"quantization": {"scheme": "int8_dynamic"}},
                     lambda old, new, facts: size_mb(new) < size_mb(old)),
    "int8_static": ({"quantization": {"scheme": "int8_static"}},
                    lambda old, new, facts: size_mb(new) < size_mb(old)),
    "bf16": ({"quantization": {"scheme": "bf16"}},
             lambda old, new, facts: size_mb(new) < 0.6 * size_mb(old)),
    "embedding_int8": ({"embedding": {"form": "int8"}}, lambda old, new, facts: (
        facts["compressed_embeddings"] >= 1 and size_mb(new) < size_mb(old))),
    "embedding_kmeans4": ({"embedding": {"form": "kmeans4"}}, lambda old, new, facts: (
        facts["compressed_embeddings"] >= 1 and size_mb(new) < size_mb(old))),
    "feature_distillation": ({"distillation": {"feature_weight": 0.5}},
                             lambda old, new, facts: True),
    "hidden_distillation": ({"student": {"depth": 0.5}, "pruning": {"ratio": 0.25},
                             "distillation": {"hidden_weight": 1.0}},
                            lambda old, new, facts: facts["blocks_removed"] == 1),
}


@pytest.mark.parametrize(("encoder", "technique"), [
    (e, t) for e in sorted(ENCODERS) for t in sorted(TECHNIQUES)
    if not (e == "vit" and t.startswith("embedding"))])  # ViT has no embedding table
def test_each_technique_compresses_each_encoder_as_it_is(encoder, technique):
    model, batch = _encoder(encoder)
    recipe, holds = TECHNIQUES[technique]
    train = [batch() for _ in range(3)]
    x = _inputs(batch(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, facts = compress(model, Recipe.from_dict(recipe), example_input=x,
                                     train=train, calibration=None, finetune_steps=2,
                                     learning_rate=1e-3, seed=0)
        out = model_io.predict(compressed, x)
    assert out.shape == (2, LABELS) and torch.isfinite(out).all()
    assert holds(model, compressed, facts)
    assert _heads(model) == [4, 4]  # the teacher is left as it was


@pytest.mark.parametrize("encoder", ["bert", "distilbert", "vit"])
def test_removed_heads_compute_what_the_model_computes_with_those_heads_silenced(encoder):
    model, batch = _encoder(encoder)
    x = _inputs(batch(4))
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        for attention in hf_attentions(silenced):  # heads 0 and 2 give zero values
            size = attention.v_proj.out_features // attention.num_heads
            for head in (0, 2):
                attention.v_proj.weight[head * size:(head + 1) * size] = 0
                attention.v_proj.bias[head * size:(head + 1) * size] = 0
        expected = model_io.predict(silenced, x)
        for attention in hf_attentions(model):
            attention.keep_heads([1, 3])
        actual = model_io.predict(model, x)
    assert _heads(model) == [2, 2]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["bert", "vit"])
def test_channel_pruning_shrinks_every_head_evenly_and_the_ffn(encoder):
    model, batch = _encoder(encoder)
    x = _inputs(batch(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_channels(model, x, 0.5, global_ranking=False)
    for attention in hf_attentions(model):
        size = getattr(attention.module, attention._size)
        assert attention.q_proj.out_features == attention.num_heads * size == 16
    ffn = [m for n, m in model.named_modules()
           if n.endswith(("intermediate.dense", "mlp.fc1"))]  # the residual stream halves too
    assert len(ffn) == 2 and all((m.in_features, m.out_features) == (16, 32) for m in ffn)
    assert model_io.predict(model, x).shape == (2, LABELS)


def _layers(model):
    return model.bert.encoder.layer


def _last_hidden_error(teacher, student, x) -> float:
    """Mean squared error between the teacher's and the student's last encoder outputs."""
    taken = {}
    hooks = [layers[-1].register_forward_hook(
        lambda _m, _i, out, key=key: taken.__setitem__(key, out[0] if isinstance(
            out, tuple) else out)) for key, layers in (("t", _layers(teacher)),
                                                        ("s", _layers(student)))]
    with torch.no_grad():
        model_io.call(teacher, x), model_io.call(student, x)
    for hook in hooks:
        hook.remove()
    return float(torch.nn.functional.mse_loss(taken["s"], taken["t"]))


def test_transposed_weight_linears_become_linear_layers_computing_the_same():
    model, batch = _encoder("gpt2")
    x = _inputs(batch(4))
    fused = [m for m in model.modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert fused and all(is_weight_layer(m) for m in fused)
    expected = model_io.predict(model, x)
    canonical = canonicalize(copy.deepcopy(model))
    assert not any(isinstance(m, transformers.pytorch_utils.Conv1D) for m in canonical.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in canonical.modules())
    assert linears == len(fused) + 1  # and the classifier head
    torch.testing.assert_close(model_io.predict(canonical, x), expected, rtol=1e-5, atol=1e-6)
    task = Task(model=model, train=[batch()], val=[batch()], example_input=x)
    assert task.model is model and not any(
        isinstance(m, transformers.pytorch_utils.Conv1D) for m in model.modules())


def test_a_fused_query_key_value_projection_loses_whole_heads_in_all_three_parts():
    model, batch = _encoder("gpt2")
    model = canonicalize(model)
    x = _inputs(batch(4))
    attention = model.transformer.h[0].attn
    silenced = copy.deepcopy(model)
    with torch.no_grad():  # head 1 of the first layer contributes nothing
        silenced.transformer.h[0].attn.c_proj.weight[:, 8:16] = 0
    expected = model_io.predict(silenced, x)
    heads = [a for a in hf_attentions(model) if a.module is attention][0]
    heads.keep_heads([0, 2, 3])
    assert attention.c_attn.out_features == 3 * 24 and attention.c_proj.in_features == 24
    assert (attention.split_size, attention.head_dim, attention.num_heads) == (24, 8, 3)
    torch.testing.assert_close(model_io.predict(model, x), expected, rtol=1e-4, atol=1e-5)


def test_hidden_state_distillation_pulls_the_kept_layers_towards_the_teachers():
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=LABELS)).eval()
    train = [_text_batch() for _ in range(4)]
    x = _inputs(_text_batch(16))
    student = derive_student(teacher, x, 1.0, depth=0.5)  # keeps layers 0 and 3
    pairs = _block_pairs(teacher, student, x)
    assert [(t, s) for t, s in pairs] == [(_layers(teacher)[0], _layers(student)[0]),
                                          (_layers(teacher)[3], _layers(student)[1])]
    # the student's second layer starts from the teacher's last, fed another input
    errors = {}
    for weight in (0.0, 10.0):
        trained = distill(copy.deepcopy(student), teacher, train, steps=40,
                          config=DistillationConfig(hidden_weight=weight),
                          learning_rate=1e-3, seed=0)
        errors[weight] = _last_hidden_error(teacher, trained, x)
    assert errors[10.0] < 0.5 * errors[0.0]
    assert not any(layer._forward_hooks for layer in _layers(teacher))


def test_hidden_states_of_another_width_are_matched_through_a_projection():
    model, batch = _encoder("bert")
    x = _inputs(batch(4))
    narrow = copy.deepcopy(model)
    prune_channels(narrow, x, 0.5, global_ranking=False)
    losses = []
    distill(narrow, model, [batch() for _ in range(3)], steps=20,
            config=DistillationConfig(hidden_weight=1.0, alpha=1.0), learning_rate=1e-3,
            seed=0, on_step=lambda _step, loss: losses.append(loss))
    assert _layers(narrow)[0].output.dense.out_features < 32  # hidden width 32 shrank
    assert sum(losses[-5:]) < sum(losses[:5])


def test_hidden_state_distillation_needs_blocks_both_models_share():
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="repeated blocks"):
        distill(copy.deepcopy(teacher), teacher, [(torch.randn(8, 4), torch.zeros(8).long())],
                steps=1, config=DistillationConfig(hidden_weight=1.0), learning_rate=1e-3,
                seed=0)


def test_inputs_outputs_and_batches_in_every_form():
    bert, _ = _encoder("bert")
    batch = _text_batch(4)
    inputs, targets = model_io.split_batch(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is batch["labels"]
    assert model_io.split_batch((torch.ones(2, 3), torch.zeros(2)))[0].shape == (2, 3)
    with pytest.raises(ValueError, match="'labels'"):
        model_io.split_batch(inputs)
    output = model_io.call(bert, inputs)
    assert not isinstance(output, torch.Tensor)
    assert model_io.logits(output) is output.logits
    assert model_io.logits((output.logits, None)) is output.logits
    assert model_io.logits({"logits": output.logits}) is output.logits
    with pytest.raises(TypeError, match="logits"):
        model_io.logits("text")
    grown = model_io.with_batch(inputs, 10)
    assert model_io.batch_size(grown) == 10 and torch.equal(grown["input_ids"][4:8],
                                                            inputs["input_ids"])
    cast = model_io.to_floating({"ids": inputs["input_ids"], "x": torch.ones(2)},
                                torch.bfloat16)
    assert cast["ids"].dtype == torch.long and cast["x"].dtype == torch.bfloat16
    pair = (torch.ones(2, 3), torch.ones(2, 3))
    assert model_io.call(lambda a, b: a + b, pair).sum() == 12
    assert model_io.input_error([torch.ones(1), "x"]) is not None
    assert model_io.input_error({"a": torch.ones(1)}) is None


def test_an_exported_encoder_takes_any_batch_and_sequence_length():
    model, _ = _encoder("bert")
    x = _inputs(_text_batch(1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = model_io.export(model, x, dynamic=True, sequence=True)
    longer = _inputs(_text_batch(3, 20))
    with torch.no_grad():
        got = model_io.call(program.module(), longer)
        expected = model_io.predict(model, longer)
    assert isinstance(got, torch.Tensor)  # logits alone: loads without transformers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_task_takes_keyword_inputs_and_output_objects():
    model, batch = _encoder("distilbert")
    task = Task(model=model, train=[batch()], val=[batch()], example_input=_inputs(batch(1)))
    check_model_accepts_input(task.model, task.example_input, where="task")
    with pytest.raises(TypeError, match="dict of inputs must map argument names to tensors"):
        Task(model=model, train=[], val=[], example_input={"input_ids": [1, 2]})

    class Words(torch.nn.Module):
        def forward(self, x):
            return "not logits"

    with pytest.raises(ParetoslimError, match="expected a tensor"):
        check_model_accepts_input(Words(), torch.ones(1), where="task")


def test_an_encoder_trial_is_compiled_timed_and_counted_at_batch_one():
    from paretoslim.search import LatencySpec, TrialSettings, measure_baseline, run_trial

    model, batch = _encoder("bert")
    task = Task(model=model, train=[batch() for _ in range(3)], val=[batch(), batch()],
                example_input=_inputs(batch(4)))
    settings = TrialSettings(latency=LatencySpec(min_calls=20, min_seconds=0.0,
                                                 batch_size=1))
    result = run_trial(task, Recipe.from_dict({"quantization": {"scheme": "int8_static"}}),
                       settings, measure_baseline(task))
    assert result.failure is None, result.failure
    assert result.metrics["speedup"] > 0 and result.metrics["compression"] > 1
    assert result.metrics["latency_batch_size"] == 1


def test_the_checkout_folders_step_aside_for_packages_of_their_names(tmp_path):
    # A stand-in for the PyPI package ``spaces``; ``kernels`` is transformers' own
    # dependency where it is installed, so the real one is kept then; ``evaluators`` has none.
    real_kernels = importlib.util.find_spec("kernels")
    installed = real_kernels is not None and ROOT not in Path(real_kernels.origin).parents
    for name in ("spaces",) + (() if installed else ("kernels",)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("__version__ = '9.9'\n")
    probe = ("import transformers\n"
             "from transformers import BertModel, ViTForImageClassification\n"
             "import kernels, spaces, evaluators\n"
             "for module in (kernels, spaces, evaluators):\n"
             "    print(module.__name__, module.__file__, getattr(module, '__version__', None))\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {name: (Path(file), version) for name, file, version
             in (line.split() for line in done.stdout.splitlines())}
    assert found["spaces"] == (tmp_path / "spaces" / "__init__.py", "9.9")
    assert found["evaluators"][1] == "None"  # no package of that name: the probe sees none
    assert ROOT not in found["kernels"][0].parents
    if installed:
        assert found["kernels"][0] == Path(real_kernels.origin)
    alone = subprocess.run([sys.executable, "-c", "import transformers.models.bert.modeling_bert"],
                           cwd=ROOT, env={**env, "PYTHONPATH": ""}, capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]


def test_stored_embedding_tables_look_up_what_the_table_holds():
    from paretoslim.spaces._embedding import Int8Embedding, KMeans4Embedding

    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 7)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    int8 = Int8Embedding(table)
    assert int8.table.dtype == torch.int8
    torch.testing.assert_close(int8(ids), table(ids), rtol=0, atol=float(
        table.weight.detach().abs().max()) / 127)
    with torch.no_grad():  # 16 distinct values: the codebook holds them exactly
        table.weight.copy_(torch.linspace(-1, 1, 16)[torch.randint(0, 16, (50, 7))])
    shared = KMeans4Embedding(table)
    assert shared.codes.shape == (50, 4) and shared.codes.dtype == torch.uint8
    torch.testing.assert_close(shared(ids), table(ids))
    torch.testing.assert_close(shared.weight, table.weight)


def test_latency_inputs_take_the_batch_and_sequence_length_of_the_settings():
    from paretoslim.search import LatencySpec
    from paretoslim.search._measuring import latency_input

    model, batch = _encoder("bert")
    task = Task(model=model, train=[batch()], val=[batch()], example_input=_inputs(batch(4)))
    x = latency_input(task, LatencySpec(batch_size=1, sequence_length=30))
    assert {k: tuple(t.shape) for k, t in x.items()} == {"input_ids": (1, 30),
                                                          "attention_mask": (1, 30)}
    assert torch.equal(x["input_ids"][0, 12:24], task.example_input["input_ids"][0])
    same = latency_input(task, LatencySpec())
    assert model_io.equal(same, task.example_input) and same is not task.example_input


WORDS = ["good", "great", "fine", "moving", "bad", "dull", "awful", "boring", "film", "plot",
         "the", "a", "is", "was", "very", "not"]


@pytest.fixture
def tiny_text_study(tmp_path):
    """A tiny BERT folder (weights and tokenizer, as a package would install them) and a
    CSV of 150 labelled snippets, in the study's data format."""
    import csv
    import random

    folder = tmp_path / "encoder"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    rng = random.Random(0)
    rows = []
    for i in range(150):
        fresh = i % 2 == 0
        words = rng.sample(WORDS[:4] if fresh else WORDS[4:8], 2) + rng.sample(WORDS[8:], 3)
        rows.append({"category": "fresh" if fresh else "rotten", "text": " ".join(words),
                     "movie_name": "m"})
    rows.append({"category": "plot", "text": "a plot summary", "movie_name": "m"})
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["category", "text", "movie_name"])
        writer.writeheader()
        writer.writerows(rows)
    return {"data_file": str(data), "model_dir": str(folder), "cache_dir": str(tmp_path)}


def test_the_text_study_fine_tunes_its_teacher_once_and_rebuilds_a_corrupt_cache(
        tiny_text_study, capsys):
    from paretoslim.studies import text_classification as study

    task = study.make_task(**tiny_text_study, batch_size=8, val_batch_size=16)
    assert "test accuracy" in capsys.readouterr().err
    cache = Path(task.extras["teacher_cache"])
    assert cache.is_file() and set(task.example_input) == {"input_ids", "attention_mask"}
    assert task.example_input["input_ids"].shape == (8, study.DEFAULT_TEACHER.max_length)
    inputs, targets = next(iter(task.train))
    assert targets.shape == (8,) and set(targets.tolist()) <= {0, 1}
    assert sum(len(t) for _, t in task.val) == 30  # a fifth of the 150 distinct snippets

    again = study.make_task(**tiny_text_study, batch_size=8, val_batch_size=16)
    assert "loaded from cache" in capsys.readouterr().err
    x = task.example_input
    torch.testing.assert_close(model_io.predict(again.model, x), model_io.predict(task.model, x))

    cache.write_bytes(b"not a checkpoint")
    study.make_task(**tiny_text_study, batch_size=8, val_batch_size=16)
    err = capsys.readouterr().err
    assert "unreadable" in err and "test accuracy" in err


def test_the_text_study_names_what_to_install_when_its_data_is_missing(tmp_path):
    from paretoslim.studies import text_classification as study

    (tmp_path / "empty.csv").write_text("category,text\nfresh,only one label here\n")
    with pytest.raises(ParetoslimError, match="expected columns text and category"):
        study.load_reviews(tmp_path / "empty.csv")
    with pytest.raises(ParetoslimError, match="not a Hugging Face model folder"):
        study.encoder_dir(tmp_path)
