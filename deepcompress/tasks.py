"""Tasks: a dataset split three ways plus a loss, a metric and optionally a model factory."""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deepcompress.errors import CompressError
from deepcompress.models import digits_mlp, lenet300

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the target class."""
    return float((logits.argmax(dim=1) == targets).double().mean())


Batches = Iterable[tuple[Tensor, Tensor]]
SPLITS = ("train", "val", "test")


def _is_pair(data: object) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(t, Tensor) for t in data))


@dataclass
class Task:
    """Training, validation and test data with the loss to train on and the metric to maximise.

    Each split is an (inputs, targets) pair of tensors, or any re-iterable of (inputs, targets)
    batches (a DataLoader, a list), read one batch at a time. The metric is a batch's mean
    score; over a split it is averaged per example.
    """

    name: str
    train: tuple[Tensor, Tensor] | Batches
    val: tuple[Tensor, Tensor] | Batches
    test: tuple[Tensor, Tensor] | Batches
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy
    metric: Callable[[Tensor, Tensor], float] = accuracy
    build_model: Callable[[], nn.Module] | None = None
    example_input: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in SPLITS:
            data = getattr(self, name)
            if not _is_pair(data) and (not isinstance(data, Iterable) or iter(data) is data):
                raise CompressError(f"task {self.name}: split {name!r} must be an (inputs, "
                                    "targets) pair of tensors or a re-iterable of batches (a "
                                    "DataLoader or a list), not a one-shot iterator")
        if self.example_input is None:
            first = self.train if _is_pair(self.train) else next(iter(self.train), None)
            if not _is_pair(tuple(first) if first is not None else None):
                raise CompressError(f"task {self.name}: the train split yields no (inputs, "
                                    "targets) batch; check the data")
            self.example_input = first[0][:8]

    def split(self, name: str) -> tuple[Tensor, Tensor] | Batches:
        """Return the 'train', 'val' or 'test' data (a tensor pair or an iterable of batches)."""
        if name not in SPLITS:
            raise CompressError(f"split {name!r}: unknown split; use 'train', 'val' or 'test'")
        return getattr(self, name)

    def size(self, name: str) -> int | None:
        """Examples in a split when it is a tensor pair (None for an iterable of batches)."""
        data = self.split(name)
        return len(data[0]) if _is_pair(data) else None

    def batches(self, name: str, batch_size: int = 1000, order: Tensor | None = None
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """The split's (inputs, targets) batches: slices of a tensor pair (rows in `order` when
        given), or the iterable's own batches."""
        data = self.split(name)
        if not _is_pair(data):
            for batch in data:
                yield tuple(batch)  # type: ignore[misc]
            return
        x, y = data
        for start in range(0, len(x), batch_size):
            if order is None:
                yield x[start:start + batch_size], y[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                yield x[idx], y[idx]


def _holdout(x: Tensor, y: Tensor, n_val: int, seed: int = 0) -> tuple[tuple, tuple]:
    """Split off a fixed pseudo-random n_val rows as the validation set."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def digits_task() -> Task:
    """scikit-learn's 1,797 8x8 digits: fixed split of 1,257 train, 180 val, 360 test rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train, val = _holdout(x[:1437], y[:1437], 180)
    return Task("digits", train, val, (x[1437:], y[1437:]), build_model=digits_mlp)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), checking its magic number and length."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as exc:
        raise CompressError(f"{path}: cannot read IDX file ({exc.strerror or exc}); check the path") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise CompressError(f"{path}: not an IDX file (bad magic number); pass an MNIST IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CompressError(f"{path}: IDX header truncated; re-download the file")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise CompressError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file has {len(raw)} bytes; "
            "re-download the file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_pair(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise CompressError(f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.shape}; pass MNIST image files")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise CompressError(f"{labels_path}: expected a 1-D uint8 label file; pass MNIST label files")
    if len(images) != len(labels):
        raise CompressError(
            f"{images_path}: {len(images)} images but {len(labels)} labels in {labels_path.name}; use matching files"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist_task(data_dir: str | Path) -> Task:
    """MNIST from IDX files: 60,000/10,000 with the full set, 8,000/2,000 from the t10k files alone."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CompressError(f"--data-dir {data_dir}: no such directory; pass the folder holding the MNIST IDX files")
    paths = {key: _find_idx(data_dir, stem) for key, stem in MNIST_FILES.items()}
    if paths["test_images"] is None or paths["test_labels"] is None:
        raise CompressError(
            f"--data-dir {data_dir}: no MNIST files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); "
            "pass the folder holding them"
        )
    test_x, test_y = _mnist_pair(paths["test_images"], paths["test_labels"])
    if paths["train_images"] is not None and paths["train_labels"] is not None:
        train_x, train_y = _mnist_pair(paths["train_images"], paths["train_labels"])
        n_val = 5000 * len(train_x) // 60000
    else:
        if len(test_x) < 10:
            raise CompressError(f"{paths['test_images']}: only {len(test_x)} images; pass the full MNIST t10k files")
        cut = len(test_x) * 4 // 5
        train_x, train_y, test_x, test_y = test_x[:cut], test_y[:cut], test_x[cut:], test_y[cut:]
        n_val = len(train_x) // 8
    train, val = _holdout(train_x, train_y, max(n_val, 1))
    return Task("mnist", train, val, (test_x, test_y), build_model=lenet300)


def load_object(spec: str, what: str = "factory") -> Callable:
    """Resolve 'path/to/file.py:name' or 'package.module:name' to the named attribute."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise CompressError(f"{what} {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise CompressError(f"{what} {spec!r}: file {path} does not exist; check the path")
        mod_name = f"_deepcompress_user_{abs(hash(str(path.resolve())))}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise CompressError(f"{what} {spec!r}: cannot import {path}; pass a Python file")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        try:
            mspec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise CompressError(f"{what} {spec!r}: importing {path} failed ({type(exc).__name__}: {exc}); fix the file") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise CompressError(f"{what} {spec!r}: cannot import module {module_part!r} ({exc}); check the name and PYTHONPATH") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise CompressError(f"{what} {spec!r}: {module_part} has no callable named {attr!r}; check the name")
    return obj


BUILTIN_TASKS = ("digits", "mnist")


def load_task(spec: str, data_dir: str | None = None) -> Task:
    """Build a Task from a built-in name ('digits', 'mnist') or a 'file.py:factory' / 'module:factory' spec."""
    if spec == "digits":
        return digits_task()
    if spec == "mnist":
        if data_dir is None:
            raise CompressError("task 'mnist': needs the IDX files; pass --data-dir DIR")
        return mnist_task(data_dir)
    if ":" not in spec:
        raise CompressError(
            f"task {spec!r}: unknown task; use one of {', '.join(BUILTIN_TASKS)} or 'path/to/file.py:factory'"
        )
    factory = load_object(spec, "task")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    task = factory(data_dir=data_dir) if "data_dir" in params else factory()
    if not isinstance(task, Task):
        raise CompressError(f"task {spec!r}: factory returned {type(task).__name__}, not a Task; return deepcompress.tasks.Task")
    return task
