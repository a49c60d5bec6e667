"""Fashion-MNIST task: the IDX data, a CNN teacher trained once and cached, and make_task."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paretoslim.evaluators import CACHE_ENV
from paretoslim.evaluators import accuracy as top1_accuracy
from paretoslim.search import ParetoslimError, Task
from paretoslim.spaces import PhaseProgress
from paretoslim.studies._data import (
    TensorBatches,
    check_counts,
    find_idx_split,
    first_line,
    read_idx,
    resolve_cache_dir,
    save_atomic,
    say,
)

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "DEFAULT_TEACHER",
    "DEFAULT_DATA_DIR",
    "FashionMNIST",
    "FashionMNISTNet",
    "TeacherConfig",
    "data_fingerprint",
    "fashion_mnist_files",
    "load_fashion_mnist",
    "load_or_train_teacher",
    "make_task",
    "normalize",
    "resolve_cache_dir",
    "resolve_data_dir",
    "train_teacher",
]

DATA_ENV = "PARETOSLIM_FASHION_MNIST"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10
SPLITS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
ARCHITECTURE = "FashionMNISTNet"
ARCHITECTURE_VERSION = 1
CACHE_FORMAT = 1
CACHE_FILE = f"fashion_mnist_teacher_v{ARCHITECTURE_VERSION}.pt"


# ---------------------------------------------------------------------------- data


class FashionMNIST(NamedTuple):
    """The four splits as numpy arrays: uint8 images (N x 28 x 28) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def resolve_data_dir(data_dir: str | Path | None = None) -> tuple[Path, str]:
    """Data directory and its source: argument > $PARETOSLIM_FASHION_MNIST > default."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(env).expanduser(), f"${DATA_ENV}"
    return DEFAULT_DATA_DIR, "the default location"


def fashion_mnist_files(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the four IDX files, keyed like :class:`FashionMNIST` fields.

    Raises ParetoslimError naming the directory searched and how to get the data.
    """
    directory, source = resolve_data_dir(data_dir)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, prefix in SPLITS.items():
        try:
            found[key] = find_idx_split(directory, prefix)
        except ParetoslimError:
            missing.append(prefix + "[.gz]")
    if missing:
        where = (
            f"{directory} (from {source}) does not exist"
            if not directory.is_dir()
            else f"{directory} (from {source}) lacks {', '.join(missing)}"
        )
        raise ParetoslimError(
            f"Fashion-MNIST data not found: {where}. Install it with "
            "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point "
            f"${DATA_ENV} or the study spec's task_options.data_dir at a directory holding "
            "the four standard IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, raw or .gz)"
        )
    return found


def load_fashion_mnist(data_dir: str | Path | None = None) -> FashionMNIST:
    """Read and check the four IDX files; see :func:`resolve_data_dir` for the directory."""
    files = fashion_mnist_files(data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ParetoslimError(
                f"Fashion-MNIST file {image_file} holds {images.dtype} of shape "
                f"{images.shape}, expected uint8 images of shape (N, 28, 28); "
                "replace it with the standard file"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ParetoslimError(
                f"Fashion-MNIST file {label_file} holds labels of shape {labels.shape}, "
                f"expected ({len(images)},) to match {image_file}; replace it with the "
                "standard file"
            )
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ParetoslimError(
                f"Fashion-MNIST file {label_file} holds labels outside 0..{NUM_CLASSES - 1} "
                "(or none); replace it with the standard file"
            )
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    return FashionMNIST(**arrays)


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N x 28 x 28) -> float32 tensor N x 1 x 28 x 28, ``(x/255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    return x.div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)


def data_fingerprint(data: FashionMNIST) -> dict[str, Any]:
    """Shapes and SHA-256 of every split: identifies the data a teacher was trained on."""
    return {
        name: {
            "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        }
        for name, array in data._asdict().items()
    }


# ---------------------------------------------------------------------------- model


class FashionMNISTNet(nn.Module):
    """CNN teacher: three Conv-BN-ReLU stages with max pooling, then a two-layer classifier.

    Input: float N x 1 x 28 x 28 normalized with :func:`normalize`; output: logits N x 10.
    Standard modules only, so structured pruning and PT2E quantization can trace it.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), hidden: int = 256) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.channels = (c1, c2, c3)
        self.hidden = hidden
        self.features = nn.Sequential(
            *_conv_bn_relu(1, c1),
            nn.MaxPool2d(2),  # 14 x 14
            *_conv_bn_relu(c1, c2),
            *_conv_bn_relu(c2, c2),
            nn.MaxPool2d(2),  # 7 x 7
            *_conv_bn_relu(c2, c3),
            nn.MaxPool2d(2),  # 3 x 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 3 * 3, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher is built and trained; every field is part of the cache key."""

    epochs: int = 9
    batch_size: int = 128
    max_lr: float = 3e-3
    weight_decay: float = 5e-2
    crop_padding: int = 2
    hflip: bool = True
    seed: int = 0
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"The {name!r} parameter of TeacherConfig must be an int >= 1. "
                    f"Got {value!r} instead."
                )
        if self.crop_padding < 0:
            raise ValueError(
                "The 'crop_padding' parameter of TeacherConfig must be >= 0. "
                f"Got {self.crop_padding!r} instead."
            )
        if len(self.channels) != 3:
            raise ValueError(
                "The 'channels' parameter of TeacherConfig must hold 3 ints. "
                f"Got {self.channels!r} instead."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) that ``torch.load(weights_only=True)`` reads back."""
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    def build(self) -> FashionMNISTNet:
        """A freshly initialized network, seeded from ``seed`` without touching global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return FashionMNISTNet(self.channels, self.hidden)


def augment(
    x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop after padding with the background value, and random horizontal flip.

    Returns a new tensor; ``x`` (normalized, N x C x H x W) is not modified.
    """
    n, c, h, w = x.shape
    if padding > 0:
        background = -MEAN / STD
        padded = F.pad(x, (padding,) * 4, value=background)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        batch = torch.arange(n)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def train_teacher(
    train_batches: TensorBatches,
    test_batches: Iterable,
    config: TeacherConfig = TeacherConfig(),
    progress: bool = True,
) -> tuple[FashionMNISTNet, float]:
    """Train a teacher from scratch with AdamW and a one-cycle schedule.

    ``train_batches`` yields one shuffled epoch per iteration (its epochs are set to
    0..epochs-1, so the result depends only on the data and ``config``). Shows a progress
    bar per epoch, prints the test accuracy, and returns the model (eval mode) and it.
    """
    start = time.perf_counter()
    model = config.build()
    # Denormal gradients and optimizer state made some epochs 2-4x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    try:
        _fit(model, train_batches, config, progress)
    finally:
        torch.set_flush_denormal(False)
    accuracy = top1_accuracy(model, test_batches)
    say(
        f"Fashion-MNIST teacher: test accuracy {accuracy:.2%} "
        f"({_count_parameters(model):,} parameters, {config.epochs} epochs, "
        f"{time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads)"
    )
    return model, accuracy


def _fit(
    model: nn.Module, train_batches: TensorBatches, config: TeacherConfig, progress: bool
) -> None:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = len(train_batches)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, total_steps=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(config.seed + 1_000_003)
    # a bar on a terminal; into a log file or a pipe, a line every 30 s and one per epoch
    bar = PhaseProgress(f"teacher training ({config.epochs} epochs)",
                        config.epochs * steps_per_epoch, enabled=progress)
    with bar:
        for epoch in range(config.epochs):
            model.train()
            train_batches.set_epoch(epoch)
            started, running = time.perf_counter(), 0.0
            for step, (inputs, targets) in enumerate(train_batches, 1):
                inputs = augment(inputs, config.crop_padding, config.hflip, generator)
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += (loss.item() - running) / min(step, 50)
                if not math.isfinite(running):
                    raise RuntimeError(f"teacher training diverged (loss {running}) in epoch "
                                       f"{epoch}")
                bar.update(1, epoch=f"{epoch + 1}/{config.epochs}", loss=f"{running:.4f}")
            if progress and not bar.terminal:
                say(f"teacher epoch {epoch + 1}/{config.epochs}: loss {running:.4f} "
                    f"({time.perf_counter() - started:.0f} s)")
    model.eval()


DEFAULT_TEACHER = TeacherConfig()

# ---------------------------------------------------------------------------- cache


def _cache_key(config: TeacherConfig, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "architecture": ARCHITECTURE,
        "architecture_version": ARCHITECTURE_VERSION,
        "training": config.to_dict(),
        "data": dict(fingerprint),
        "torch_major": int(torch.__version__.split(".")[0]),
    }


def load_or_train_teacher(
    train_inputs: torch.Tensor,
    train_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    cache_file: str | Path,
    data_fingerprint: Mapping[str, Any],
    config: TeacherConfig = TeacherConfig(),
    progress: bool = True,
) -> tuple[FashionMNISTNet, float]:
    """The teacher stored in ``cache_file`` if it matches, else a newly trained (and stored) one.

    A match needs the same architecture version, ``config``, ``data_fingerprint`` (plain
    data) and torch major version, and a state_dict that loads strictly. An unreadable
    file is reported in one line and replaced. Returns the model (eval mode) and its test
    accuracy.
    """
    cache_file = Path(cache_file)
    key = _cache_key(config, data_fingerprint)
    cached = _load_cached(cache_file, key, config)
    if cached is not None:
        return cached
    train_batches = TensorBatches(
        train_inputs, train_targets, config.batch_size, shuffle=True, seed=config.seed
    )
    test_batches = TensorBatches(test_inputs, test_targets, 1000)
    model, accuracy = train_teacher(train_batches, test_batches, config, progress=progress)
    metadata = {**key, "test_accuracy": accuracy, "parameters": _count_parameters(model)}
    save_atomic(cache_file, {"metadata": metadata, "state_dict": model.state_dict()})
    return model, accuracy


def _load_cached(
    cache_file: Path, key: Mapping[str, Any], config: TeacherConfig
) -> tuple[FashionMNISTNet, float] | None:
    if not cache_file.exists():
        return None
    try:
        payload = torch.load(cache_file, map_location="cpu", weights_only=True)
        metadata, state_dict = payload["metadata"], payload["state_dict"]
        accuracy = float(metadata["test_accuracy"])
    except Exception as exc:
        say(
            f"warning: cached teacher {cache_file} is unreadable "
            f"({type(exc).__name__}: {first_line(exc)}); retraining"
        )
        return None
    stale = sorted(k for k in key if metadata.get(k) != key[k])
    if stale:
        say(f"cached teacher {cache_file} is stale ({', '.join(stale)} changed); retraining")
        return None
    model = config.build()
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        say(
            f"cached teacher {cache_file} does not fit the model "
            f"({type(exc).__name__}: {first_line(exc)}); retraining"
        )
        return None
    model.eval()
    say(f"Fashion-MNIST teacher: loaded from cache {cache_file} (test accuracy {accuracy:.2%})")
    return model, accuracy


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- task


def make_task(
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    val_batch_size: int = 500,
    calibration_batches: int = 8,
) -> Task:
    """The Fashion-MNIST task: the cached (or newly trained) teacher and the data as batches.

    ``train`` is the 60k training images shuffled per epoch (seed 0), ``val`` the 10k test
    images in order, ``example_input`` the first ``batch_size`` test images, and
    ``calibration`` the first ``calibration_batches`` unshuffled training batches.
    """
    check_counts("fashion_mnist", batch_size=batch_size, val_batch_size=val_batch_size,
                 calibration_batches=calibration_batches)
    data = load_fashion_mnist(data_dir)
    train_x, test_x = normalize(data.train_images), normalize(data.test_images)
    train_y = torch.from_numpy(data.train_labels)
    test_y = torch.from_numpy(data.test_labels)
    cache_file = resolve_cache_dir(cache_dir) / CACHE_FILE
    model, accuracy = load_or_train_teacher(
        train_x, train_y, test_x, test_y, cache_file, data_fingerprint(data), DEFAULT_TEACHER
    )
    calibration = list(
        itertools.islice(TensorBatches(train_x, train_y, batch_size), calibration_batches)
    )
    return Task(
        model=model.eval(),
        train=TensorBatches(train_x, train_y, batch_size, shuffle=True, seed=0),
        val=TensorBatches(test_x, test_y, val_batch_size),
        example_input=test_x[:batch_size].clone(),
        calibration=calibration,
        name="fashion_mnist",
        extras={"teacher_test_accuracy": accuracy, "teacher_cache": str(cache_file)},
    )
