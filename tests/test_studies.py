"""Tests for the built-in study data helpers and the Fashion-MNIST task (tiny fake data only)."""

from __future__ import annotations

import gzip
import importlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from paretoslim.search import ParetoslimError, Task
from paretoslim.studies import fashion_mnist as fm
from paretoslim.studies._data import TensorBatches, find_idx_split, read_idx

TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
TYPE_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    code = TYPE_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fake_fashion_mnist(directory: Path, n_train: int = 96, n_test: int = 48) -> Path:
    """Four IDX files with learnable fake data: class k has a bright k-th band of rows."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label + 4 : 2 * label + 6] = 250
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels)
    return directory


TINY = fm.TeacherConfig(epochs=1, batch_size=32, channels=(4, 8, 8), hidden=16)


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g))
    test = (torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))
    return train, test


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = fm.train_teacher

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fm, "train_teacher", counting)
    return calls


def load_or_train(tiny_data, cache_file, fingerprint=None, config=TINY):
    (tx, ty), (sx, sy) = tiny_data
    return fm.load_or_train_teacher(
        tx, ty, sx, sy, cache_file, fingerprint or {"data": "tiny"}, config, progress=False
    )


# ---------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-128, -1, 0, 127], dtype=np.int8),
        np.array([[-30000, 5], [7, 30000]], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1, 12345], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.array([np.pi, -np.e, 1e300], dtype=np.float64),
    ],
    ids=["ubyte", "byte", "short", "int", "float", "double"],
)
def test_read_idx_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"data-idx{array.ndim}{suffix}", array)
    result = read_idx(path)
    assert result.dtype == array.dtype and result.dtype.isnative
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)
    result[...] = 0  # writable, not a view of a read-only buffer


def test_read_idx_detects_gzip_by_content(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "plain", array, compress=True)), array)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown type code 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "header needs 12 bytes"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "needs 3 payload bytes, found 2"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "needs 1 payload bytes, found 2"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00", "needs 4 payload bytes, found 2"),
    ],
)
def test_read_idx_malformed_names_file(tmp_path, content, problem):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ParetoslimError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ParetoslimError, match=str(path)):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(ParetoslimError, match="does not exist"):
        read_idx(tmp_path / "nope")


def test_find_idx_split_variants(tmp_path):
    (tmp_path / "train-images.idx3-ubyte.gz").write_bytes(b"")
    assert find_idx_split(tmp_path, "train-images-idx3-ubyte").name.startswith("train-images.")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    assert find_idx_split(tmp_path, "train-images-idx3-ubyte").name == "train-images-idx3-ubyte"
    with pytest.raises(ParetoslimError, match="t10k-labels-idx1-ubyte.gz"):
        find_idx_split(tmp_path, "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------- TensorBatches


def test_tensor_batches_len_and_partial_batch():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = TensorBatches(x, y, batch_size=4)
    assert len(batches) == 3
    sizes = [len(b) for b, _ in batches]
    assert sizes == [4, 4, 2]
    assert torch.equal(torch.cat([t for _, t in batches]), y)  # unshuffled keeps order
    assert len(TensorBatches(x, y, batch_size=5)) == 2


def test_tensor_batches_shuffle_is_deterministic_per_epoch():
    x, y = torch.arange(50.0).unsqueeze(1), torch.arange(50)
    a = TensorBatches(x, y, 8, shuffle=True, seed=3)
    b = TensorBatches(x, y, 8, shuffle=True, seed=3)
    epochs_a = [torch.cat([t for _, t in a]) for _ in range(3)]
    epochs_b = [torch.cat([t for _, t in b]) for _ in range(3)]
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        assert torch.equal(ea, eb)
        assert sorted(ea.tolist()) == list(range(50))  # a permutation: nothing lost
    assert not torch.equal(epochs_a[0], epochs_a[1])  # each epoch reshuffles
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1))
    assert torch.equal(epochs_a[1], expected)
    a.set_epoch(0)
    assert torch.equal(torch.cat([t for _, t in a]), epochs_a[0])
    other_seed = TensorBatches(x, y, 8, shuffle=True, seed=4)
    assert not torch.equal(torch.cat([t for _, t in other_seed]), epochs_a[0])


def test_tensor_batches_pairs_stay_aligned_and_are_copies():
    x, y = torch.arange(20.0).unsqueeze(1), torch.arange(20)
    for inputs, targets in TensorBatches(x, y, 6, shuffle=True):
        assert torch.equal(inputs.squeeze(1).long(), targets)
        inputs.zero_()
    assert torch.equal(x.squeeze(1), torch.arange(20.0))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_tensor_batches_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(torch.zeros(3), torch.zeros(3), batch_size)


def test_tensor_batches_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        TensorBatches(torch.zeros(3), torch.zeros(4), 2)


# ---------------------------------------------------------------------------- data directory


def test_missing_data_names_directory_and_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.DATA_ENV, raising=False)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(ParetoslimError) as info:
        fm.load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "data_dir argument" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert fm.DATA_ENV in message and "task_options.data_dir" in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte[" not in message  # present, so not listed as missing


def test_missing_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(ParetoslimError, match=r"absent \(from \$PARETOSLIM_FASHION_MNIST\)"):
        fm.fashion_mnist_files()


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.DATA_ENV, raising=False)
    assert fm.resolve_data_dir()[0] == fm.DEFAULT_DATA_DIR
    monkeypatch.setenv(fm.DATA_ENV, str(tmp_path / "env"))
    assert fm.resolve_data_dir()[0] == tmp_path / "env"
    assert fm.resolve_data_dir(tmp_path / "arg")[0] == tmp_path / "arg"


def test_cache_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.CACHE_ENV, raising=False)
    assert fm.resolve_cache_dir() == Path.home() / ".cache" / "paretoslim"
    monkeypatch.setenv(fm.CACHE_ENV, str(tmp_path / "env"))
    assert fm.resolve_cache_dir() == tmp_path / "env"
    assert fm.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_load_fashion_mnist_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.DATA_ENV, str(write_fake_fashion_mnist(tmp_path / "fm")))
    data = fm.load_fashion_mnist()
    assert data.train_images.shape == (96, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_labels.shape == (48,) and data.test_labels.dtype == np.int64
    x = fm.normalize(data.test_images)
    assert x.shape == (48, 1, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-fm.MEAN / fm.STD, abs=1e-5)


def test_load_fashion_mnist_rejects_bad_labels(tmp_path):
    directory = write_fake_fashion_mnist(tmp_path)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.full(48, 10, dtype=np.uint8))
    with pytest.raises(ParetoslimError, match="outside 0..9"):
        fm.load_fashion_mnist(directory)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(47, dtype=np.uint8))
    with pytest.raises(ParetoslimError, match=r"expected \(48,\)"):
        fm.load_fashion_mnist(directory)


def test_load_fashion_mnist_rejects_bad_image_shape(tmp_path):
    directory = write_fake_fashion_mnist(tmp_path)
    write_idx(directory / "train-images-idx3-ubyte.gz", np.zeros((96, 32, 32), np.uint8))
    with pytest.raises(ParetoslimError, match=r"train-images-idx3-ubyte\.gz holds uint8"):
        fm.load_fashion_mnist(directory)


# ---------------------------------------------------------------------------- model


def test_teacher_contract():
    model = fm.FashionMNISTNet().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n_params <= 2_000_000
    x = torch.randn(3, 1, 28, 28)
    before = x.clone()
    assert model(x).shape == (3, 10)
    assert torch.equal(x, before)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    default = fm.TeacherConfig().build()
    assert sum(p.numel() for p in default.parameters()) == n_params


def test_config_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = TINY.build(), TINY.build()
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_augment_keeps_shape_and_input():
    x = torch.randn(16, 1, 28, 28)
    before = x.clone()
    out = fm.augment(x, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(x, before)
    assert not torch.equal(out, x)
    # every output image is a shifted (possibly flipped) window of the padded input
    padded = torch.nn.functional.pad(x, (2,) * 4, value=-fm.MEAN / fm.STD)
    for i in range(16):
        windows = [padded[i, :, r : r + 28, c : c + 28] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


# ---------------------------------------------------------------------------- cache


def test_training_is_deterministic(tiny_data, tmp_path):
    a, acc_a = load_or_train(tiny_data, tmp_path / "a.pt")
    b, acc_b = load_or_train(tiny_data, tmp_path / "b.pt")
    assert acc_a == acc_b
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_second_call_loads_cache(tiny_data, tmp_path, count_training, capsys):
    cache_file = tmp_path / "sub" / "teacher.pt"
    model, accuracy = load_or_train(tiny_data, cache_file)
    assert count_training == [1] and cache_file.is_file()
    assert [p.name for p in cache_file.parent.iterdir()] == ["teacher.pt"]  # no temp left
    assert not model.training
    capsys.readouterr()
    again, again_accuracy = load_or_train(tiny_data, cache_file)
    assert count_training == [1]
    assert again_accuracy == accuracy
    err = capsys.readouterr().err
    assert "loaded from cache" in err and f"{accuracy:.2%}" in err
    assert not again.training
    for ta, tb in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(ta, tb)
    payload = torch.load(cache_file, weights_only=True)
    assert payload["metadata"]["test_accuracy"] == accuracy
    assert payload["metadata"]["torch_major"] == int(torch.__version__.split(".")[0])


def test_corrupt_cache_is_rebuilt(tiny_data, tmp_path, count_training, capsys):
    cache_file = tmp_path / "teacher.pt"
    cache_file.write_bytes(b"not a torch file")
    load_or_train(tiny_data, cache_file)
    assert count_training == [1]
    err = capsys.readouterr().err
    assert "warning" in err and "unreadable" in err and str(cache_file) in err
    load_or_train(tiny_data, cache_file)
    assert count_training == [1]


def test_truncated_cache_is_rebuilt(tiny_data, tmp_path, count_training):
    cache_file = tmp_path / "teacher.pt"
    load_or_train(tiny_data, cache_file)
    cache_file.write_bytes(cache_file.read_bytes()[:500])
    load_or_train(tiny_data, cache_file)
    assert count_training == [1, 1]
    load_or_train(tiny_data, cache_file)
    assert count_training == [1, 1]


@pytest.mark.parametrize("change", ["data", "config", "torch_major", "state_dict"])
def test_mismatched_cache_is_rebuilt(tiny_data, tmp_path, count_training, capsys, change):
    cache_file = tmp_path / "teacher.pt"
    load_or_train(tiny_data, cache_file)
    fingerprint, config = {"data": "tiny"}, TINY
    if change == "data":
        fingerprint = {"data": "other"}
    elif change == "config":
        config = fm.TeacherConfig(epochs=1, batch_size=32, channels=(4, 8, 8), hidden=17)
    else:
        payload = torch.load(cache_file, weights_only=True)
        if change == "torch_major":
            payload["metadata"]["torch_major"] -= 1
        else:
            payload["state_dict"].pop("classifier.3.bias")
        torch.save(payload, cache_file)
    capsys.readouterr()
    load_or_train(tiny_data, cache_file, fingerprint, config)
    assert count_training == [1, 1]
    assert "retraining" in capsys.readouterr().err
    load_or_train(tiny_data, cache_file, fingerprint, config)
    assert count_training == [1, 1]


def test_unwritable_cache_still_returns_model(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    model, _ = load_or_train(tiny_data, blocker / "teacher.pt")
    assert isinstance(model, fm.FashionMNISTNet)
    assert "cannot write the teacher cache" in capsys.readouterr().err


# ---------------------------------------------------------------------------- make_task


def test_make_task_on_fake_data(tmp_path, monkeypatch, count_training):
    monkeypatch.setattr(fm, "DEFAULT_TEACHER", TINY)
    data_dir = write_fake_fashion_mnist(tmp_path / "data")
    task = fm.make_task(
        data_dir=data_dir, cache_dir=tmp_path / "cache", batch_size=16, calibration_batches=3
    )
    assert isinstance(task, Task) and task.name == "fashion_mnist"
    assert not task.model.training
    assert task.example_input.shape == (16, 1, 28, 28)
    assert task.example_input.dtype == torch.float32
    assert len(task.train) == 6 and task.train.shuffle
    assert len(task.val) == 1 and not task.val.shuffle
    assert len(task.calibration) == 3
    assert all(len(x) == 16 for x, _ in task.calibration)
    first_train_x = fm.normalize(fm.load_fashion_mnist(data_dir).train_images[:16])
    assert torch.equal(task.calibration[0][0], first_train_x)
    assert task.model(task.example_input).shape == (16, 10)
    assert Path(task.extras["teacher_cache"]) == tmp_path / "cache" / fm.CACHE_FILE
    assert count_training == [1]
    fm.make_task(data_dir=data_dir, cache_dir=tmp_path / "cache")
    assert count_training == [1]


@pytest.mark.parametrize("option, value", [
    ("batch_size", 0), ("val_batch_size", True), ("calibration_batches", 2.0)])
@pytest.mark.parametrize("study", ["fashion_mnist", "text_classification"])
def test_make_task_rejects_bad_option(tmp_path, study, option, value):
    module = importlib.import_module(f"paretoslim.studies.{study}")
    with pytest.raises(ParetoslimError, match=f"{study} task: .*task_options.{option} in"):
        module.make_task(tmp_path, **{option: value})
