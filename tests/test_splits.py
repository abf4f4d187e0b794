"""Split protocols on literal inputs: by patient (no patient on two sides) and DRG-LLaMA's stratified 90/10."""

import numpy as np

from drg_llama.data.splits import PROTOCOLS, SPLITS, default_seed, patient_split, stratified_split


def test_patient_split_keeps_each_patient_on_one_side_80_10_10():
    subjects = np.repeat(np.arange(50), 3)  # 50 patients, 3 admissions each
    names = patient_split(subjects, seed=0)
    per_patient = {s: set(names[subjects == s]) for s in range(50)}
    assert all(len(v) == 1 for v in per_patient.values())
    counts = {name: sum(v == {name} for v in per_patient.values()) for name in SPLITS}
    assert counts == {"train": 40, "val": 5, "test": 5}
    assert (patient_split(subjects, seed=0) == names).all() and not (patient_split(subjects, seed=1) == names).all()
    # a handful of patients still gets a test split: the small splits are rounded, not train
    assert sorted(patient_split(np.arange(8), seed=0)).count("test") == 1  # round(0.8): one patient of eight


def test_stratified_split_is_drg_llamas_90_10_with_every_class_in_train():
    labels = np.array([291] * 20 + [292] * 9 + [871] * 2)  # 31 admissions
    names = stratified_split(labels, seed=42)
    assert (names == "test").sum() == 4  # ceil(0.1 * 31), shared out by class size
    assert set(names) == {"train", "test"}  # no validation split
    for code in (291, 292, 871):
        assert (names[labels == code] == "train").any()
    assert (stratified_split(labels, seed=42) == names).all()


def test_protocols_and_default_seeds():
    assert PROTOCOLS == ("patient", "drg_llama_2023") and SPLITS == ("train", "val", "test")
    assert default_seed("drg_llama_2023") == 42 and default_seed("patient") == 0
