"""Helpers of the built-in tasks: IDX file reading, deterministic in-memory batches, the
teacher cache and the checks of task options."""

from __future__ import annotations

import gzip
import math
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paretoslim.evaluators import CACHE_ENV
from paretoslim.evaluators import cache_dir as shared_cache_dir
from paretoslim.search import ParetoslimError

__all__ = ["IDX_DTYPES", "TensorBatches", "find_idx_split", "read_idx"]

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a native-byte-order numpy array.

    Compression is detected from the content, not the suffix. A malformed file (bad magic
    number, unknown type code, truncated or oversized payload, broken gzip stream) raises
    ParetoslimError naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise ParetoslimError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ParetoslimError(
            f"IDX file {path} cannot be read ({type(exc).__name__}: {exc}); "
            "replace it with an intact copy"
        ) from exc

    def malformed(problem: str) -> ParetoslimError:
        return ParetoslimError(
            f"IDX file {path} is malformed: {problem}; replace it with an intact copy"
        )

    if len(raw) < 4:
        raise malformed(f"only {len(raw)} bytes, too short for the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise malformed(f"magic number starts with {raw[:2].hex()}, expected 0000")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise malformed(f"unknown type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise malformed("zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise malformed(f"header needs {header} bytes for {ndim} dimensions, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise malformed(
            f"shape {shape} of {dtype.name} needs {expected} payload bytes, found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_split(directory: str | Path, prefix: str) -> Path:
    """Locate the IDX file ``prefix`` in ``directory``, raw or ``.gz``.

    ``prefix`` is a standard name such as ``train-images-idx3-ubyte``; the variant with a dot
    before ``idx`` (``train-images.idx3-ubyte``) is accepted too. A raw file is preferred
    over a compressed one. Raises ParetoslimError naming the directory and the names tried.
    """
    directory = Path(directory)
    stems = [prefix]
    dotted = prefix.replace("-idx", ".idx", 1)
    if dotted != prefix:
        stems.append(dotted)
    candidates = [directory / (stem + suffix) for suffix in ("", ".gz") for stem in stems]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(c.name for c in candidates)
    raise ParetoslimError(f"no IDX file for {prefix!r} in {directory} (tried {tried})")


class TensorBatches:
    """Re-iterable ``(inputs, targets)`` batches over in-memory tensors: ``inputs`` is a
    tensor, or a dict of tensors of one length (keyword inputs, batched alike).

    Every iteration is one epoch and yields fresh tensors (never views of the data), the
    last partial batch included. With ``shuffle=True``, epoch ``k`` (counted from 0 per
    object, or set with :meth:`set_epoch`) draws its order from a ``torch.Generator``
    seeded with ``seed + k``, so the sequence of batches is reproducible.
    """

    def __init__(
        self,
        inputs: torch.Tensor | Mapping[str, torch.Tensor],
        targets: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        columns = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
        if not all(isinstance(c, torch.Tensor) for c in columns) or not isinstance(
                targets, torch.Tensor):
            raise TypeError(
                "The 'inputs' and 'targets' parameters of TensorBatches must be tensors. "
                f"Got {type(inputs).__name__} and {type(targets).__name__} instead."
            )
        if targets.ndim == 0 or any(c.ndim == 0 or len(c) != len(targets) for c in columns):
            raise ValueError(
                "The 'inputs' and 'targets' parameters of TensorBatches must have the same "
                f"length. Got shapes {[tuple(c.shape) for c in columns]} and "
                f"{tuple(targets.shape)} instead."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                "The 'batch_size' parameter of TensorBatches must be an int >= 1. "
                f"Got {batch_size!r} instead."
            )
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (only changes the order when shuffling)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        n = self.num_samples
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            inputs = ({k: v.index_select(0, index) for k, v in self.inputs.items()}
                      if isinstance(self.inputs, Mapping)
                      else self.inputs.index_select(0, index))
            yield inputs, self.targets.index_select(0, index)

    def __repr__(self) -> str:
        return (
            f"TensorBatches(samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed})"
        )


def save_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` whole or not at all (a temporary file renamed); a cache
    that cannot be written is reported in one line, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache must stay readable
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        say(
            f"warning: cannot write the teacher cache {path} ({exc}); it will be retrained "
            f"next time (set ${CACHE_ENV} to a writable directory)"
        )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Cache directory: argument > $PARETOSLIM_CACHE > ``~/.cache/paretoslim``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    return shared_cache_dir()


def check_counts(task: str, **options: Any) -> None:
    """Raise ParetoslimError naming the first of ``options`` that is not an int >= 1."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParetoslimError(
                f"{task} task: the {name!r} option must be an int >= 1. "
                f"Got {value!r} instead; fix task_options.{name} in the study spec"
            )
