"""The splits of a prepared folder and the two protocols that assign admissions to them.

* ``patient`` (the default): 80/10/10 train/val/test over distinct patients (``subject_id``) in a seeded random
  order, so no patient's notes are on both sides and a validation split exists for model selection.
* ``drg_llama_2023``: DRG-LLaMA's protocol (Wang et al., 2024): 90/10 train/test by admission, stratified by DRG,
  seed 42, no validation split (``val.parquet`` is written empty). It reproduces the protocol, not the paper's rows.
"""

from __future__ import annotations

import math

import numpy as np

#: The splits of a prepared folder, one ``{split}.parquet`` file each, in this order.
SPLITS = ("train", "val", "test")
#: How ``prepare --split`` assigns admissions to the splits.
PROTOCOLS = ("patient", "drg_llama_2023")


def default_seed(protocol: str) -> int:
    """The split seed when none is given: 42 for ``drg_llama_2023`` (the paper's), else 0."""
    return 42 if protocol == "drg_llama_2023" else 0


def patient_split(subjects: np.ndarray, seed: int) -> np.ndarray:
    """80/10/10 over distinct patients in a seeded random order; returns a split name per admission."""
    unique = np.unique(subjects)
    order = np.random.default_rng(seed).permutation(len(unique))
    # Round the two small splits, not train, so that a handful of patients still gives a non-empty test split.
    n_val = n_test = round(0.1 * len(unique))
    n_train = len(unique) - n_val - n_test
    names = np.empty(len(unique), dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_val]] = "val"
    names[order[n_train + n_val :]] = "test"
    return names[np.searchsorted(unique, subjects)]


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.1) -> np.ndarray:
    """Admission-level train/test split stratified by label (DRG-LLaMA's protocol, not its exact rows).

    Like scikit-learn's ``train_test_split(stratify=...)`` the test size is ceil(fraction * n), shared out to
    classes in proportion, leftover slots going to the largest remainders; unlike it, it works for any number of
    classes. Every class must have at least 2 cases; each keeps at least one in train.
    """
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_test = math.ceil(test_fraction * len(labels))
    exact = counts * n_test / max(len(labels), 1)
    per_class = np.floor(exact).astype(int)
    leftover = n_test - per_class.sum()
    remainder = exact - per_class + rng.random(len(classes)) * 1e-9  # random tie-break among equal remainders
    for i in np.argsort(-remainder)[:leftover]:
        per_class[i] += 1
    per_class = np.minimum(per_class, counts - 1)
    names = np.full(len(labels), "train", dtype=object)
    for i in range(len(classes)):
        members = np.flatnonzero(inverse == i)
        names[rng.permutation(members)[: per_class[i]]] = "test"
    return names
