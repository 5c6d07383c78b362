"""lpa-train's datasets, long-tail profile, many/medium/few split, augmentation and models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lpa_programs import data as D
from lpa_programs.models import MLP, ResNet, build_model
from tests.programs.fake_cifar import fake_image, write_cifar


@pytest.mark.parametrize("n_max,k,imbalance", [(124, 10, 10.0), (500, 100, 100.0), (5000, 10, 100.0), (30, 3, 2.5)])
def test_long_tail_counts_follow_the_exponential_profile(n_max, k, imbalance):
    counts = D.long_tail_counts(n_max, k, imbalance)
    assert len(counts) == k and counts[0] == n_max, "class 0 keeps n_max samples"
    assert all(a >= b for a, b in zip(counts, counts[1:])), "counts must not increase with the class index"
    # n_max / n_min equals the imbalance up to the rounding down of n_min
    assert n_max / (counts[-1] + 1) < imbalance <= n_max / counts[-1] + 1e-9, f"ratio {n_max / counts[-1]} vs {imbalance}"
    for c, n in enumerate(counts):  # each count is the exponential profile rounded down
        exact = n_max * math.exp(-c / (k - 1) * math.log(imbalance))
        assert n <= exact + 1e-9 and exact < n + 1, f"class {c}: {n} samples, profile says {exact:.2f}"


def test_long_tail_rejects_an_imbalance_below_one():
    with pytest.raises(ValueError, match="imbalance"):
        D.long_tail_counts(100, 10, 0.5)


def test_digits_has_a_fixed_balanced_test_split_and_standardised_features():
    a, b = D.load("digits"), D.load("digits")
    assert a.x_train.shape[1:] == (64,) and a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert len(a.y_train) + len(a.y_test) == 1797, "every digits image is in exactly one split"
    assert a.test_counts == [50] * 10, "balanced test set: 50 images per class"
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test), "the split does not depend on the run"
    varying = a.x_train.std(0) > 0
    assert torch.allclose(a.x_train.mean(0), torch.zeros(64), atol=1e-5), "features are centred on the training set"
    assert torch.allclose(a.x_train.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-4)


@pytest.mark.parametrize("name,imbalance", [("digits-lt", 10.0), ("digits-lt", 4.0), ("synthetic-lt", 10.0), ("synthetic-lt", None)])
def test_long_tailed_training_set_and_balanced_test_set(name, imbalance):
    lt = D.load(name, imbalance)
    balanced = D.load(name.removesuffix("-lt"))
    counts = lt.train_counts
    expected_ratio = imbalance or D.DEFAULT_IMBALANCE[name.removesuffix("-lt")]
    assert counts[0] == min(balanced.train_counts), "n_max is the smallest class of the balanced pool"
    assert counts == D.long_tail_counts(counts[0], lt.num_classes, expected_ratio)
    assert lt.test_counts == balanced.test_counts and len(set(lt.test_counts)) == 1, "the test set stays balanced"


def test_synthetic_data_is_seeded_and_shaped():
    a, b = D.load("synthetic"), D.load("synthetic")
    assert a.x_train.shape == (3000, 32) and a.x_test.shape == (1000, 32) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train), "synthetic data is generated from a fixed seed"
    assert not torch.equal(a.x_train[:1000], a.x_test), "test samples are drawn separately from training samples"


def test_fake_cifar10_folder_loads_with_labels_and_pixels_in_order(tmp_path):
    write_cifar(tmp_path, 10, per_class_per_file=3)
    data = D.load("cifar10", data_dir=tmp_path)  # the parent of cifar-10-batches-py
    assert data.x_train.shape == (150, 3, 32, 32) and data.x_test.shape == (30, 3, 32, 32)
    labels = np.array([c for _ in range(3) for c in range(10)])
    assert data.y_train.tolist() == np.tile(labels, 5).tolist() and data.y_test.tolist() == labels.tolist()
    raw = np.concatenate([[fake_image(c, i)[0] for i, c in enumerate(labels)]] * 5) / 255.0
    expected = (raw - raw.mean()) / raw.std()  # every pixel of an image, in every channel, holds one value
    assert np.allclose(data.x_train[:, 1, 5, 7].numpy(), expected, atol=1e-5), "pixels standardised per channel"
    assert data.is_image


def test_fake_cifar100_long_tail_from_the_folder_itself(tmp_path):
    folder = write_cifar(tmp_path, 100, per_class_per_file=4)
    data = D.load("cifar100-lt", imbalance=4.0, data_dir=folder)
    assert data.num_classes == 100 and data.test_counts == [4] * 100
    assert data.train_counts == D.long_tail_counts(4, 100, 4.0)


def test_cifar_without_a_folder_or_with_missing_files_says_what_is_needed(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        D.load("cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        D.load("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset"):
        D.load("mnist")


def test_shot_groups_use_the_literature_thresholds_when_every_group_is_populated():
    counts = D.long_tail_counts(500, 100, 100.0)  # CIFAR-100-LT
    groups, rule = D.shot_groups(counts)
    assert rule == "thresholds"
    assert all(counts[c] > 100 for c in groups["many"]) and all(counts[c] < 20 for c in groups["few"])
    assert all(20 <= counts[c] <= 100 for c in groups["medium"])
    assert sorted(groups["many"] + groups["medium"] + groups["few"]) == list(range(100))


def test_shot_groups_fall_back_to_count_terciles_on_small_data():
    counts = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]  # digits-lt: only class 0 has more than 100
    groups, rule = D.shot_groups(counts)
    assert rule == "terciles"
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    unsorted = [5, 50, 7, 30, 90, 1]
    assert D.shot_groups(unsorted, "terciles")[0] == {"many": [1, 4], "medium": [2, 3], "few": [0, 5]}
    assert D.shot_groups(counts, "thresholds")[0]["many"] == [0], "an explicit rule is obeyed"
    with pytest.raises(ValueError, match="shot rule"):
        D.shot_groups(counts, "quartiles")


def test_augmented_images_are_flipped_or_not_and_shifted_by_at_most_four_pixels():
    x = torch.randn(6, 2, 8, 8)
    out = D.augment_images(x)
    assert out.shape == x.shape
    padded = [torch.nn.functional.pad(v, (4, 4, 4, 4)) for v in (x, x.flip(3))]
    for i in range(len(x)):
        crops = [p[i, :, r:r + 8, c:c + 8] for p in padded for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], crop) for crop in crops), f"sample {i} is not a crop of its padded image"


def test_models_expose_the_named_layers_lpa_perturbs():
    mlp = MLP(64, 10, width=16)
    names = dict(mlp.named_modules())
    assert {"features", "features.0", "features.1", "features.3"} <= names.keys()
    assert isinstance(names["classifier"], torch.nn.Linear) and mlp(torch.randn(3, 64)).shape == (3, 10)
    net = ResNet(7, width=4, blocks=1)
    names = dict(net.named_modules())
    assert {"features.stem", "features.stage1", "features.stage2", "features.stage3", "features.pool"} <= names.keys()
    assert net.features(torch.randn(2, 3, 32, 32)).shape == (2, net.classifier.in_features)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert isinstance(build_model(D.load("synthetic")), MLP)
