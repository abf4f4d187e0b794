"""ICD-10-CM and ICD-10-PCS code titles: the CMS and Tuva lists shipped as data files by the ``drg`` package.

The synthetic corpus names its sampled codes with them and the reasoner's grounded rationales quote them. Read once
per process, on first use (never at import time)::

    from drg_llama.drg.icd import cm_titles
    cm_titles()["I5023"]   # 'Acute on chronic systolic (congestive) heart failure'
"""

from __future__ import annotations

import csv
import functools

from drg_llama.drg.tables import package_data


@functools.lru_cache(maxsize=1)
def cm_titles() -> dict[str, str]:
    """ICD-10-CM code (no dot) -> title (CMS list shipped by the ``drg`` package)."""
    return _read_titles("cms", "icd_10_cm.csv")


@functools.lru_cache(maxsize=1)
def pcs_titles() -> dict[str, str]:
    """ICD-10-PCS code -> title (Tuva list shipped by the ``drg`` package)."""
    return _read_titles("tuva", "icd_10_pcs.csv")


def _read_titles(source: str, name: str) -> dict[str, str]:
    with package_data("drg", "data", source, name).open("r", encoding="utf-8", newline="") as fh:
        return {row[0]: row[1] for row in csv.reader(fh) if len(row) >= 2}
