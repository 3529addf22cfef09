"""Task loading: digits, MNIST IDX files written by the test, custom factories, bad input."""
import gzip
import struct

import numpy as np
import pytest
import torch

from deepcompress.errors import CompressError
from deepcompress.tasks import MNIST_MEAN, MNIST_STD, Task, accuracy, load_task, read_idx


def write_idx(path, array, magic_dims=None, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder, n_test=50, n_train=0, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    sets = [("t10k", n_test)] + ([("train", n_train)] if n_train else [])
    arrays = {}
    for prefix, n in sets:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_task("digits"), load_task("digits")
    assert (len(a.train[0]), len(a.val[0]), len(a.test[0])) == (1257, 180, 360)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    rows = {tuple(r.tolist()) for r in a.train[0]}
    assert not any(tuple(r.tolist()) in rows for r in a.val[0][:50])
    assert a.build_model()(a.example_input).shape == (len(a.example_input), 10)


def test_mnist_t10k_only_gives_80_20_split(tmp_path):
    arrays = write_mnist(tmp_path, n_test=50)
    task = load_task("mnist", str(tmp_path))
    images, labels = arrays["t10k"]
    assert len(task.train[0]) + len(task.val[0]) == 40 and len(task.test[0]) == 10
    assert task.train[0].shape[1:] == (1, 28, 28)
    expected = (torch.from_numpy(images[40:]).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(task.test[0][:, 0], expected)
    assert torch.equal(task.test[1], torch.from_numpy(labels[40:]).long())
    pooled = torch.cat([task.train[1], task.val[1]]).sort().values
    assert torch.equal(pooled, torch.from_numpy(labels[:40]).long().sort().values)


def test_mnist_full_set_uses_standard_split_uncompressed(tmp_path):
    write_mnist(tmp_path, n_test=30, n_train=120, gz=False)
    task = load_task("mnist", str(tmp_path))
    assert len(task.train[0]) + len(task.val[0]) == 120 and len(task.test[0]) == 30
    assert len(task.val[0]) == 10


def test_idx_header_validation(tmp_path):
    good = write_idx(tmp_path / "a-idx1-ubyte", np.arange(10))
    assert read_idx(good).tolist() == list(range(10))
    truncated = tmp_path / "b"
    truncated.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(CompressError, match="bytes"):
        read_idx(truncated)
    bad_magic = tmp_path / "c"
    bad_magic.write_bytes(b"\x01\x02" + good.read_bytes()[2:])
    with pytest.raises(CompressError, match="magic"):
        read_idx(bad_magic)


def test_mnist_count_mismatch(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((20, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19))
    with pytest.raises(CompressError, match="20 images but 19 labels"):
        load_task("mnist", str(tmp_path))


@pytest.mark.parametrize(
    "spec, data_dir, message",
    [
        ("cifar", None, "unknown task"),
        ("mnist", None, "--data-dir"),
        ("mnist", "/nonexistent/dir", "no such directory"),
        ("missing_file.py:make", None, "does not exist"),
        ("deepcompress.models:no_such_factory", None, "no callable"),
        ("no_such_module_xyz:f", None, "cannot import"),
        ("deepcompress.models:lenet5", None, "not a Task"),
    ],
)
def test_bad_specs_raise_one_line(spec, data_dir, message):
    with pytest.raises(CompressError, match=message) as info:
        load_task(spec, data_dir)
    assert "\n" not in str(info.value)


def test_data_dir_without_mnist(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing")
    with pytest.raises(CompressError, match="no MNIST files"):
        load_task("mnist", str(tmp_path))


def test_custom_factory_from_file(tmp_path):
    source = tmp_path / "mytask.py"
    source.write_text(
        "import torch\n"
        "from deepcompress.tasks import Task\n"
        "def make(data_dir=None):\n"
        "    x = torch.randn(10, 3); y = torch.zeros(10, dtype=torch.long)\n"
        "    return Task(str(data_dir), (x, y), (x, y), (x, y))\n"
    )
    task = load_task(f"{source}:make", data_dir="here")
    assert isinstance(task, Task) and task.name == "here"
    assert task.example_input.shape == (8, 3)


def test_accuracy():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
