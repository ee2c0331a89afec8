"""Tests of the bundled tasks: shapes, seeded splits, dtypes, caches and on-disk data readers."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from hyperdescent.errors import ConfigError, DataError
from hyperdescent.space import Real, Space
from hyperdescent.tasks import Task, get, names
from hyperdescent.tasks import mnist1d_task as m1d
from hyperdescent.tasks.formats import read_cifar_batch, read_idx
from hyperdescent.tasks.paths import cache_dir, data_dir
from hyperdescent.tasks.prep import split_indices

TABULAR = {  # name -> (input dim, classes, (train, val, test) sizes)
    "digits_mlp": (64, 10, (1000, 400, 397)),
    "digits_logreg": (64, 10, (1000, 400, 397)),
    "cancer_logreg": (30, 2, (341, 114, 114)),
}


def rows(x: torch.Tensor) -> set[bytes]:
    """The rows of a 2-d tensor as a set of byte strings."""
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of a model's parameters."""
    return [p.detach().clone() for p in model.parameters()]


def check_task(task: Task, in_shape: tuple, sizes: tuple, num_classes: int,
               dtype=torch.float32) -> None:
    """Common checks: split shapes/dtypes, labels in range, a finite loss from a fresh model."""
    assert isinstance(task, Task) and task.num_classes == num_classes
    for (x, y), n in zip((task.train, task.val, task.test), sizes):
        assert x.shape == (n, *in_shape) and x.dtype == dtype
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < num_classes
        assert torch.isfinite(x).all()
    assert isinstance(task.space, Space) and set(task.space) == {"lr", "weight_decay"}
    assert all(isinstance(h, Real) for h in task.space.values())
    model = task.make_model()
    assert all(p.dtype == dtype for p in model.parameters())
    x, y = task.train
    out = model(x[:16])
    assert out.shape == (min(16, len(x)), num_classes) and out.dtype == dtype
    assert torch.isfinite(task.loss(out, y[:16]))


def test_names_and_unknown_name():
    assert names() == ["digits_mlp", "digits_logreg", "cancer_logreg", "mnist1d_mlp",
                       "mnist_mlp", "mnist_cnn", "cifar10_cnn"]
    with pytest.raises(DataError, match="'nope'.*digits_mlp.*cifar10_cnn") as err:
        get("nope")
    assert isinstance(err.value, ValueError)


def test_bad_dtype_refused():
    with pytest.raises(ConfigError, match="dtype"):
        get("digits_logreg", dtype=torch.int64)


@pytest.mark.parametrize("name", list(TABULAR))
def test_tabular_task_shapes_and_splits(name):
    dim, classes, sizes = TABULAR[name]
    task = get(name)
    check_task(task, (dim,), sizes, classes)
    parts = [rows(s[0]) for s in (task.train, task.val, task.test)]
    assert [len(p) for p in parts] == list(sizes)  # the data sets have no duplicate rows
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    xtr = task.train[0]  # standardized with train statistics
    assert torch.allclose(xtr.mean(0), torch.zeros(dim), atol=1e-4)
    assert task.info["sizes"] == dict(zip(("train", "val", "test"), sizes))


@pytest.mark.parametrize("name", list(TABULAR))
def test_tabular_splits_fixed_by_seed(name):
    a, b, c = get(name, seed=0), get(name, seed=0), get(name, seed=1)
    for sa, sb, sc in zip((a.train, a.val, a.test), (b.train, b.val, b.test),
                          (c.train, c.val, c.test)):
        assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
        assert rows(sa[0]) != rows(sc[0]) or not torch.equal(sa[1], sc[1])
    assert rows(a.val[0]) != rows(c.val[0])


def test_digits_models():
    assert isinstance(get("digits_logreg").make_model(), torch.nn.Linear)
    mlp = get("digits_mlp").make_model()
    assert [tuple(p.shape) for p in mlp.parameters()] == [(128, 64), (128,), (128, 128),
                                                         (128,), (10, 128), (10,)]


def test_model_factory_deterministic_and_rng_neutral():
    task = get("digits_mlp")
    state = torch.get_rng_state()
    p0, p0b, p1 = (params(task.make_model(s)) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(p0, p0b))
    assert not all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(a, b) for a, b in zip(params(task.make_model()), p0))
    # the default model seed is the task's seed
    other = get("digits_mlp", seed=1).make_model()
    assert all(torch.equal(a, b) for a, b in zip(params(other), p1))


def test_float64_task():
    task = get("cancer_logreg", dtype=torch.float64)
    check_task(task, (30,), (341, 114, 114), 2, dtype=torch.float64)
    p32 = params(get("cancer_logreg").make_model(3))
    p64 = params(task.make_model(3))
    assert all(torch.equal(a.double(), b) for a, b in zip(p32, p64))
    assert task.info["dtype"] == "torch.float64"


def test_split_indices_disjoint():
    tr, va, te = split_indices(50, (30, 10, 7), seed=4)
    assert len(set(tr) | set(va) | set(te)) == 47
    assert np.array_equal(split_indices(50, (30, 10, 7), 4)[1], va)
    with pytest.raises(ValueError, match="only 5"):
        split_indices(5, (3, 3), 0)


def test_default_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERDESCENT_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("HYPERDESCENT_CACHE", str(tmp_path / "c"))
    assert data_dir() == tmp_path / "d" and cache_dir() == tmp_path / "c"
    assert data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("HYPERDESCENT_DATA")
    monkeypatch.delenv("HYPERDESCENT_CACHE")
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path / "data"
    assert cache_dir().parts[-2:] == (".cache", "hyperdescent")


# --- MNIST-1D -----------------------------------------------------------------------------

def test_mnist1d_generated_then_cached(monkeypatch, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    np_state = np.random.get_state()
    task = get("mnist1d_mlp", seed=0, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # global RNG left alone
    check_task(task, (40,), (6000, 2000, 2000), 10)
    assert not (rows(task.train[0]) & rows(task.val[0]))
    assert list(cwd.iterdir()) == []  # nothing written to the current directory
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]

    def fail(*a, **k):
        raise AssertionError("the second call must read the cache")
    monkeypatch.setattr(m1d, "generate", fail)
    again = get("mnist1d_mlp", seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train[0], task.train[0]) and torch.equal(again.test[1], task.test[1])
    other = get("mnist1d_mlp", seed=1, cache_dir=tmp_path / "cache")
    assert torch.equal(other.test[0], task.test[0])  # test set fixed, val carved by seed
    assert not torch.equal(other.val[1], task.val[1])


def test_mnist1d_corrupt_cache_regenerated(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    fake = {"x": rng.normal(size=(2100, 40)), "y": rng.integers(0, 10, 2100),
            "x_test": rng.normal(size=(50, 40)), "y_test": rng.integers(0, 10, 50),
            "seed": np.int64(42)}
    monkeypatch.setattr(m1d, "generate", lambda *a, **k: fake)
    path = m1d.cache_path(tmp_path)
    path.write_bytes(b"not an npz file")
    task = get("mnist1d_mlp", cache_dir=tmp_path)
    check_task(task, (40,), (100, 2000, 50), 10)
    with np.load(path) as f:
        assert np.array_equal(f["x_test"], fake["x_test"])


# --- MNIST / CIFAR-10 on-disk formats --------------------------------------------------------

def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """Write a uint8 array in the idx format (optionally gzipped), as torchvision stores MNIST."""
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    data += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_mnist(root, n_train=20, n_test=10):
    """Write tiny MNIST raw files under root/MNIST/raw (train images gzipped); return arrays."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, a in arrays.items():
        write_idx(raw / name, a, gz=name.startswith("train-images"))
    return arrays


def fake_cifar(root, per_batch=4, n_test=5):
    """Write tiny CIFAR-10 python batches (bytes keys, like the real pickles); return arrays."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[name] = d
    return out


def test_read_idx_roundtrip(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (3, 5, 7))
    write_idx(tmp_path / "a", a)
    write_idx(tmp_path / "b", a, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), a)
    (tmp_path / "c").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(DataError, match="needs 17"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "d")


def test_read_cifar_batch(tmp_path):
    d = fake_cifar(tmp_path)["data_batch_2"]
    x, y = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x[1, 2].ravel(), d[b"data"][1, 2048:])  # channel-major rows
    assert y.tolist() == d[b"labels"]


@pytest.mark.parametrize("name,shape", [("mnist_mlp", (784,)), ("mnist_cnn", (1, 28, 28))])
def test_mnist_tasks_from_fake_files(tmp_path, name, shape):
    arrays = fake_mnist(tmp_path)
    task = get(name, data_dir=tmp_path, dtype=torch.float64)
    check_task(task, shape, (17, 3, 10), 10, dtype=torch.float64)
    train_y = torch.cat([task.train[1], task.val[1]]).sort().values
    assert train_y.tolist() == sorted(arrays["train-labels-idx1-ubyte"].tolist())
    assert task.test[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # the test images keep their order and are an affine map of the raw pixels
    raw = torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float64).reshape(10, -1)
    got = task.test[0].reshape(10, -1)
    assert torch.corrcoef(torch.stack([raw.ravel(), got.ravel()]))[0, 1] > 0.999999
    assert rows(get(name, seed=1, data_dir=tmp_path).val[0]) != rows(
        get(name, seed=0, data_dir=tmp_path).val[0])
    if name == "mnist_cnn":
        model = task.make_model()
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert all(b.dtype == torch.float64 for b in model.buffers() if b.is_floating_point())


def test_cifar_task_from_fake_files(tmp_path):
    fake_cifar(tmp_path)
    task = get("cifar10_cnn", data_dir=tmp_path)
    check_task(task, (3, 32, 32), (18, 2, 5), 10)
    x = torch.cat([task.train[0], task.val[0]])
    assert torch.allclose(task.train[0].mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert x.shape == (20, 3, 32, 32)
    a, b = get("cifar10_cnn", seed=0, data_dir=tmp_path), get("cifar10_cnn", seed=5,
                                                               data_dir=tmp_path)
    assert torch.equal(a.val[0], task.val[0]) and torch.equal(a.test[1], b.test[1])
    assert rows(a.val[0]) != rows(b.val[0])  # val carved by seed; test fixed (labels, order)


@pytest.mark.parametrize("name,folder,files", [
    ("mnist_cnn", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("cifar10_cnn", "cifar-10-batches-py", ["data_batch_1", "test_batch"]),
])
def test_missing_vision_files(tmp_path, name, folder, files):
    with pytest.raises(DataError) as err:
        get(name, data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / folder) in msg and name in msg
    assert all(f in msg for f in files)
    assert "hyperdescent[vision]" in msg and "download=True" in msg


def test_partially_missing_mnist_names_the_missing_file(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing: \['t10k-labels-idx1-ubyte'\]"):
        get("mnist_mlp", data_dir=tmp_path)
