"""Datasets for ``lpa-train``: shipped or generated data (no downloads) and local CIFAR folders.

Every loader returns a :class:`Dataset` of in-memory tensors. Training sets of the ``-lt`` variants are
long-tailed with the exponential profile of the long-tail literature (Cui et al. 2019, Cao et al. 2019):
class ``c`` of ``K`` keeps ``int(n_max * imbalance ** (-c / (K - 1)))`` samples, so class 0 is the most
frequent and ``n_max / n_min == imbalance`` up to rounding. Test sets stay balanced.

Many/medium/few-shot groups (:func:`shot_groups`) follow the literature's thresholds on training counts
(many > 100, medium 20..100, few < 20) when each of the three groups holds at least two classes and a
tenth of them (true for CIFAR-100-LT and ImageNet-LT); otherwise (small or mildly imbalanced data, e.g.
digits-lt, where only class 0 has more than 100 samples) the classes are split into terciles by count.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "digits-lt", "synthetic", "synthetic-lt",
            "cifar10", "cifar10-lt", "cifar100", "cifar100-lt")
# Imbalance ratio n_max / n_min used by an ``-lt`` dataset when ``--imbalance`` is not given.
DEFAULT_IMBALANCE = {"digits": 10.0, "synthetic": 10.0, "cifar10": 100.0, "cifar100": 100.0}
NUM_CLASSES = {"digits": 10, "synthetic": 10, "cifar10": 10, "cifar100": 100}  # per dataset, its -lt form alike
SHOT_THRESHOLDS = (100, 20)  # many: count > 100, few: count < 20, medium: the rest
SPLIT_SEED = 0  # train/test splits and long-tail subsets are fixed, whatever the training seed


@dataclass
class Dataset:
    """``x_train (N, *S)`` float32, ``y_train (N,)`` int64, the same for test; ``S`` is ``(D,)`` for
    vectors and ``(C, H, W)`` for images."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def train_counts(self) -> list[int]:
        return torch.bincount(self.y_train, minlength=self.num_classes).tolist()

    @property
    def test_counts(self) -> list[int]:
        return torch.bincount(self.y_test, minlength=self.num_classes).tolist()

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class training counts of the exponential profile (class 0 largest)."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (n_max / n_min), got {imbalance}")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a long-tailed subset: the first ``n_c`` of a random order of each class, where
    ``n_max`` is the smallest class size so that every class can fill its quota."""
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    counts = long_tail_counts(min(len(p) for p in pools), num_classes, imbalance)
    return np.sort(np.concatenate([p[:n] for p, n in zip(pools, counts)]))


def shot_groups(train_counts: list[int], rule: str = "auto") -> tuple[dict[str, list[int]], str]:
    """Split classes into many/medium/few-shot groups by training count; returns (groups, rule used).

    ``"thresholds"``: many > 100, medium 20..100, few < 20. ``"terciles"``: classes sorted by count
    (largest first, ties by class index) cut into three near-equal parts (``np.array_split``).
    ``"auto"``: thresholds when every group holds at least ``max(2, K / 10)`` classes, terciles otherwise.
    """
    if rule not in ("auto", "thresholds", "terciles"):
        raise ValueError(f"shot rule must be 'auto', 'thresholds' or 'terciles', got {rule!r}")
    many_above, few_below = SHOT_THRESHOLDS
    by_threshold = {
        "many": [c for c, n in enumerate(train_counts) if n > many_above],
        "medium": [c for c, n in enumerate(train_counts) if few_below <= n <= many_above],
        "few": [c for c, n in enumerate(train_counts) if n < few_below],
    }
    smallest_group = max(2, len(train_counts) / 10)
    if rule == "thresholds" or (rule == "auto" and all(len(g) >= smallest_group for g in by_threshold.values())):
        return by_threshold, "thresholds"
    order = sorted(range(len(train_counts)), key=lambda c: (-train_counts[c], c))
    parts = np.array_split(np.array(order, dtype=np.int64), 3)
    return {name: sorted(p.tolist()) for name, p in zip(("many", "medium", "few"), parts)}, "terciles"


def resolved_imbalance(name: str, imbalance: float | None) -> float | None:
    """The imbalance ratio a ``-lt`` dataset is built with: ``imbalance``, or the dataset's default when
    None (other datasets: ``imbalance`` as given, which ``load`` does not use)."""
    if imbalance is None and name.endswith("-lt"):
        return DEFAULT_IMBALANCE[name.removesuffix("-lt")]
    return imbalance


def load(name: str, imbalance: float | None = None, data_dir: str | Path | None = None) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); CIFAR needs ``data_dir``."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    base, long_tail = name.removesuffix("-lt"), name.endswith("-lt")
    if base.startswith("cifar"):
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs --data-dir: a folder holding the CIFAR python-pickle files")
        x_train, y_train, x_test, y_test, k = _cifar(Path(data_dir), NUM_CLASSES[base])
    else:
        x_train, y_train, x_test, y_test, k = _digits() if base == "digits" else _synthetic(NUM_CLASSES[base])
    rng = np.random.default_rng(SPLIT_SEED)
    if long_tail:
        keep = long_tail_indices(y_train, k, resolved_imbalance(name, imbalance), rng)
        x_train, y_train = x_train[keep], y_train[keep]
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(name, torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
                   torch.from_numpy(x_test), torch.from_numpy(y_test).long(), k)


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero mean, unit variance with training statistics: per feature for vectors, per channel for images."""
    axes = (0, 2, 3) if x_train.ndim == 4 else (0,)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)  # constant features (digits' border pixels) stay at 0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _balanced_split(labels: np.ndarray, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def _digits():
    """sklearn's 8x8 digits (1797 images): 50 per class held out as a balanced test set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    train, test = _balanced_split(y, test_per_class=50)
    return x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test], 10


def _synthetic(num_classes: int = 10, dim: int = 32, modes: int = 3, train_per_class: int = 300,
               test_per_class: int = 100, spread: float = 0.6):
    """A Gaussian mixture: each class is ``modes`` unit-variance blobs whose centres are drawn from
    N(0, spread^2 I), so classes overlap and the boundaries are not linear (an MLP reaches about 75%)."""
    rng = np.random.default_rng(SPLIT_SEED)
    centres = rng.normal(0.0, spread, size=(num_classes, modes, dim))

    def sample(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        mode = rng.integers(0, modes, size=len(y))
        return (centres[y, mode] + rng.normal(size=(len(y), dim))).astype(np.float32), y

    x_train, y_train = sample(train_per_class)
    x_test, y_test = sample(test_per_class)
    return x_train, y_train, x_test, y_test, num_classes


def _cifar(data_dir: Path, num_classes: int):
    """CIFAR-10/100 from the python-pickle release (``cifar-10-batches-py`` / ``cifar-100-python``);
    ``data_dir`` is that folder or its parent."""
    folder_name, train_files, test_files, label_key = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }[num_classes]
    folder = data_dir / folder_name if (data_dir / folder_name).is_dir() else data_dir
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-{num_classes} files {missing} not found in {folder} "
                                f"(expected the python-pickle release, folder {folder_name})")

    def read(files):
        images, labels = zip(*(_cifar_batch(folder / f, label_key, num_classes) for f in files))
        return np.concatenate(images).astype(np.float32) / 255.0, np.concatenate(labels)

    (x_train, y_train), (x_test, y_test) = read(train_files), read(test_files)
    return x_train, y_train, x_test, y_test, num_classes


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One file of the CIFAR python-pickle release: images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)``;
    ``ValueError`` naming the file when it is not one (a truncated or empty download, the other CIFAR's
    file, labels outside ``[0, num_classes)``)."""
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except OSError:
        raise
    except Exception as exc:  # pickle raises many kinds for damaged data (UnpicklingError, EOFError, ...)
        raise ValueError(f"cannot read the CIFAR file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"the CIFAR file {path} does not hold the keys {[b'data', label_key]} of CIFAR-{num_classes}'s "
                         "python-pickle release")
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the CIFAR file {path} does not hold 3x32x32 uint8 images and integer labels: {exc}") from exc
    if len(images) != len(labels) or not len(labels) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"the CIFAR file {path} holds {len(images)} images and {len(labels)} labels, which must be "
                         f"as many, at least one, in [0, {num_classes})")
    return images, labels


def augment_images(x: torch.Tensor) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch ``(B, C, H, W)``: random horizontal flip and a random
    crop of the image padded by 4 pixels (zeros, i.e. the mean after standardisation)."""
    b, _, h, w = x.shape
    pad = 4
    flip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device) + torch.arange(h, device=x.device)
    left = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device) + torch.arange(w, device=x.device)
    rows = top[:, None, :, None].expand(b, x.shape[1], h, padded.shape[3])
    cropped_rows = padded.gather(2, rows)
    cols = left[:, None, None, :].expand(b, x.shape[1], h, w)
    return cropped_rows.gather(3, cols)
