"""Billed labels: each admission's HCFA (MS-DRG) rows of ``hosp/drgcodes``, mapped *by title* to the target version.

DRG-LLaMA's labels, and ``prepare``'s default (``--labels billed``). MIMIC-IV's HCFA rows carry the code and an
abbreviated title of whichever MS-DRG version billed the stay, and the row does not say which version that was, so the
title is what is mapped (``drg_llama.drg.map_title``, once per distinct title): an unmappable title beats a conflict
(rows of one admission mapping to different DRGs), a conflict beats an error DRG (998/999), each outcome a drop reason
that ``prepare`` accounts for. APR-DRG rows are ignored.

Each row's ``drg_code`` is checked against its title and disagreements are *counted*, not dropped: the check can only
ask whether any known version gave that title that code, and the pre-v36 titles are an incomplete hand-written list;
the title is what the billed label uses, and grouped labels (``drg_llama.data.grouping``) recompute such stays from
their codes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from drg_llama.data.csvfiles import check_text, int_column, iter_csv, read_header
from drg_llama.drg import ERROR_DRGS, TitleMapping, map_title

#: Columns ``drgcodes`` must have (``drg_code`` is read when present, for the code/title check).
DRG_COLUMNS = ("subject_id", "hadm_id", "drg_type", "description")


def read_billed_labels(
    path: Path, version: str, chunk_rows: int, encoding: str, progress: bool
) -> tuple[pd.DataFrame, dict]:
    """One row per admission in drgcodes: subject_id, label reason/detail, target DRG and raw HCFA title.

    Also checks each HCFA row's ``drg_code`` against its title (when the file has that column): the code must be one
    that the title carried in some known version. Rows that disagree are counted, not dropped (see ``prepare``).
    """
    columns = read_header(path, DRG_COLUMNS, encoding)
    usecols = list(DRG_COLUMNS) + (["drg_code"] if "drg_code" in columns else [])
    parts = []
    mapping_cache: dict[str, TitleMapping] = {}  # map_title once per distinct title, not per row
    code_titles: Counter = Counter()  # (drg_code, title) -> HCFA rows
    with tqdm(desc="drgcodes", unit=" rows", disable=not progress) as bar:
        for first, chunk in iter_csv(path, usecols, chunk_rows * 20, encoding):
            hadm = int_column(chunk["hadm_id"], path, first, "hadm_id")
            subject = int_column(chunk["subject_id"], path, first, "subject_id")
            is_hcfa = (chunk["drg_type"].str.strip().str.upper() == "HCFA").to_numpy()
            titles = chunk["description"].str.strip()
            hcfa_titles = titles[is_hcfa]
            check_text(hcfa_titles, path, "description", encoding)  # cheap: titles are short
            parts.append(
                pd.DataFrame(
                    {
                        "hadm_id": hadm,
                        "subject_id": subject,
                        "is_hcfa": is_hcfa,
                        "title": titles.where(is_hcfa, None).to_numpy(dtype=object),
                    }
                )
            )
            for title in hcfa_titles.unique():
                if title not in mapping_cache:
                    mapping_cache[title] = map_title(title, version)
            if "drg_code" in chunk:
                code_titles.update(zip(chunk["drg_code"].str.strip()[is_hcfa], hcfa_titles))
            bar.update(len(chunk))
    rows = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["hadm_id", "subject_id", "is_hcfa", "title"])
    )
    counts = {
        "rows": int(len(rows)),
        "hcfa_rows": int(rows["is_hcfa"].sum()),
        "distinct_titles": len(mapping_cache),
        "code_check": _code_title_check(code_titles, mapping_cache),
    }

    subjects = rows.groupby("hadm_id", sort=True)["subject_id"].agg(["first", "nunique"])
    labels = pd.DataFrame(index=subjects.index)
    labels["subject_id"] = subjects["first"].astype(np.int64)
    labels["drg_subject_mismatch"] = subjects["nunique"] > 1
    labels["reason"] = None
    labels["detail"] = ""
    labels["drg_code"] = -1
    labels["source_title"] = None

    hcfa = rows.loc[rows["is_hcfa"].astype(bool), ["hadm_id", "title"]]
    labels.loc[~labels.index.isin(hcfa["hadm_id"].unique()), ["reason", "detail"]] = (
        "no_hcfa_row",
        "drgcodes has rows for this admission, none of drg_type HCFA",
    )
    target = {t: (m.drg if m.drg is not None and m.reason is None else np.nan) for t, m in mapping_cache.items()}
    hcfa = hcfa.assign(drg=hcfa["title"].map(target).astype(float))
    hcfa = hcfa.assign(unmapped=hcfa["drg"].isna())
    by_hadm = hcfa.groupby("hadm_id", sort=True)
    summary = pd.DataFrame(
        {
            "unmapped": by_hadm["unmapped"].any(),
            "n_drgs": by_hadm["drg"].nunique(),
            "drg": by_hadm["drg"].first(),
            "title": by_hadm["title"].first(),
        }
    )
    labels.loc[summary.index, "source_title"] = summary["title"]
    labels.loc[summary.index, "drg_code"] = summary["drg"].fillna(-1).astype(np.int64)

    unmapped = hcfa[hcfa["unmapped"]].groupby("hadm_id", sort=True)["title"].first()
    why = {t: f"{t!r} ({m.reason}: {m.detail})" for t, m in mapping_cache.items()}
    labels.loc[unmapped.index, "reason"] = "unmappable_title"
    labels.loc[unmapped.index, "detail"] = unmapped.map(why)
    # Conflicts are rare; their detail (every title and its DRG) is built in Python.
    conflicting = summary.index[~summary["unmapped"] & (summary["n_drgs"] > 1)]
    for hadm_id, group in hcfa[hcfa["hadm_id"].isin(conflicting)].groupby("hadm_id"):
        pairs = dict(zip(group["title"], group["drg"].astype(int)))
        labels.at[hadm_id, "reason"] = "conflicting_drgs"
        labels.at[hadm_id, "detail"] = ", ".join(f"{t!r} -> {d}" for t, d in pairs.items())
    errors = summary.index[~summary["unmapped"] & (summary["n_drgs"] == 1) & summary["drg"].isin(list(ERROR_DRGS))]
    labels.loc[errors, "reason"] = "error_drg"
    labels.loc[errors, "detail"] = "ungroupable or invalid principal diagnosis: DRG " + labels.loc[
        errors, "drg_code"
    ].astype(str)
    return labels, counts


def _code_title_check(code_titles: Counter, mappings: dict[str, TitleMapping], top: int = 10) -> dict:
    """HCFA rows whose drg_code is not a code their title carried in any known version, counted with examples.

    MIMIC does not record which version a row was coded in, so a code agrees with its title when some installed
    version (or the pre-v36 title list) gave that title that code. An empty code is not checked.
    """
    checked = disagree = 0
    examples: Counter = Counter()
    for (code, title), rows in code_titles.items():
        source = mappings[title].source_codes
        if not code or not source:
            continue  # no code, or a title no version knows (that stay is dropped as unmappable_title anyway)
        checked += rows
        if not (code.isdigit() and int(code) in source):
            disagree += rows
            examples[(code, title)] += rows
    return {
        "hcfa_rows_checked": checked,
        "disagreeing_rows": disagree,
        "examples": [
            {"drg_code": code, "title": title, "title_drgs": list(mappings[title].source_codes), "rows": rows}
            for (code, title), rows in examples.most_common(top)
        ],
    }
