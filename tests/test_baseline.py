"""TF-IDF + logistic-regression baseline on a tiny, separable prepared folder written by the test.

Run: pytest tests/test_baseline.py
"""

import json

import numpy as np
import pandas as pd
import pytest

from drg_llama.baseline import _main, run_baseline
from drg_llama.data.prepared import SPLIT_FILES, write_manifest
from drg_llama.drg import LabelSpace
from drg_llama.errors import UserError

# drg_code -> (base_drg, allowed severities, mdc, words that mark the class)
DRGS = {
    291: (291, ["MCC"], "05", "heart failure edema diuresis furosemide"),
    292: (291, ["CC"], "05", "heart failure kidney injury creatinine"),
    871: (871, ["MCC"], "18", "sepsis lactate vasopressor cultures"),
    872: (871, ["CC", "NONE"], "18", "sepsis fever antibiotics cultures"),
    193: (193, ["MCC"], "04", "pneumonia respiratory failure intubation"),  # only in test: unseen in training
}
FILLER = "patient admitted stable course discharged home follow up".split()


def _frame(counts: dict[int, int], seed: int, start_id: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for code, n in counts.items():
        base, severities, mdc, words = DRGS[code]
        for _ in range(n):
            tokens = list(rng.choice(FILLER, size=8)) + list(
                rng.choice(words.split(), size=4, replace=False)
            )  # >= 2 class-specific words
            rng.shuffle(tokens)
            hadm = start_id + len(rows)
            rows.append(
                {
                    "hadm_id": hadm,
                    "subject_id": hadm // 2,
                    "text": " ".join(tokens),
                    "drg_code": code,
                    "drg_title": f"DRG {code}",
                    "base_drg": base,
                    "mdc": mdc,
                    "allowed_severities": severities,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def prepared(tmp_path):
    _frame({291: 30, 292: 12, 871: 12, 872: 12}, seed=0, start_id=1000).to_parquet(tmp_path / "train.parquet")
    _frame({291: 5, 292: 5, 871: 5, 872: 5}, seed=1, start_id=2000).to_parquet(tmp_path / "val.parquet")
    _frame({291: 8, 292: 8, 871: 8, 872: 8, 193: 4}, seed=2, start_id=3000).to_parquet(tmp_path / "test.parquet")
    write_manifest(tmp_path, {"drg_version": "v43"}, SPLIT_FILES)
    return tmp_path


def _rewrite(folder, name: str, frame: pd.DataFrame) -> None:
    """Replace one split and record it in the manifest, as prepare would have written it."""
    frame.to_parquet(folder / f"{name}.parquet")
    write_manifest(folder, json.loads((folder / "manifest.json").read_text()), SPLIT_FILES)


def test_baseline_writes_metrics_and_beats_majority(prepared, tmp_path):
    out = tmp_path / "run"
    run_baseline(prepared, out, min_df=1)
    result = json.loads((out / "metrics.json").read_text())
    assert result["split"] == "test" and result["variant"] == "tfidf_logreg"
    assert result["drg_version"] == "v43" and result["majority_drg"] == 291
    expected = {"n", "top1", "top5", "top10", "macro_f1_present", "macro_f1_all", "micro_f1", "macro_auc", "ece"}
    expected |= {"base_acc", "severity_acc", "mdc_acc", "auc_classes", "auc_classes_skipped", "classes_present"}
    assert expected <= result["metrics"].keys() and result["metrics"].keys() == result["majority_class"].keys()
    m, maj = result["metrics"], result["majority_class"]
    assert m["n"] == 36 and m["num_classes"] == 5 and result["unseen_in_train"] == 4
    assert maj["top1"] == pytest.approx(8 / 36)
    # Nearly separable toy set: far above majority; the 4 unseen-DRG notes (1/9 of the split) are always errors.
    assert 0.75 < m["top1"] <= 32 / 36 and m["top1"] > maj["top1"] + 0.5
    assert m["base_acc"] >= m["top1"] and m["mdc_acc"] >= m["base_acc"]
    assert m["top5"] == 1.0  # only 5 classes

    predictions = pd.read_parquet(out / "predictions.parquet")
    assert list(predictions.columns) == ["hadm_id", "gold", "top_drgs", "top_probs"]
    assert len(predictions) == 36 and "text" not in predictions.columns
    unseen = predictions[predictions["gold"] == 193]
    assert len(unseen) == 4 and all(193 not in drgs[:4] for drgs in unseen["top_drgs"])
    assert "heart" not in (out / "metrics.json").read_text()  # no note text in the metrics file


def test_cli_and_explicit_label_space(prepared, tmp_path, capsys):
    _main(["--data", str(prepared), "--out", str(tmp_path / "cli"), "--min-df", "1", "--split", "val"])
    assert "tfidf_logreg" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"]["n"] == 20
    # A label space larger than the data widens macro_f1_all but not macro_f1_present.
    space = LabelSpace.build("v43", "single_label", [193, 291, 292, 293, 871, 872])
    wide = run_baseline(prepared, tmp_path / "wide", min_df=1, label_space=space)
    assert wide["metrics"]["num_classes"] == 6
    assert wide["metrics"]["macro_f1_all"] < wide["metrics"]["macro_f1_present"]
    # A narrower label space: gold DRGs outside it are scored as errors, never dropped.
    narrow = run_baseline(
        prepared, tmp_path / "narrow", min_df=1, label_space=LabelSpace.build("v43", "single_label", [291, 292, 871])
    )
    assert narrow["metrics"]["n"] == wide["metrics"]["n"] and narrow["metrics"]["unseen_gold"] > 0
    assert narrow["metrics"]["top1"] < wide["metrics"]["top1"]
    limited = run_baseline(prepared, tmp_path / "limited", min_df=1, limit_train=45, limit_eval=5)
    assert limited["n_train"] == 45 and limited["metrics"]["n"] == 5


def test_missing_split_or_column_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(UserError, match="drg_llama.data prepare"):
        run_baseline(tmp_path / "nowhere", tmp_path / "out")
    test = pd.read_parquet(prepared / "test.parquet")
    test.iloc[:0].to_parquet(prepared / "test.parquet")  # not what the manifest recorded: refused before reading
    with pytest.raises(UserError, match="test.parquet: its size differs from manifest.json"):
        run_baseline(prepared, tmp_path / "out")
    _rewrite(prepared, "test", test.drop(columns=["text"]))
    with pytest.raises(UserError, match="test.parquet: lacks column"):
        run_baseline(prepared, tmp_path / "out")
    _rewrite(prepared, "test", test.iloc[:0])
    with pytest.raises(UserError, match="test.parquet has no rows"):
        run_baseline(prepared, tmp_path / "out")


def test_cli_errors_are_one_line(prepared, tmp_path, capsys):
    """Every bad input to the baseline's command line: one line on stderr, exit status 2, no traceback."""
    train = pd.read_parquet(prepared / "train.parquet")
    _rewrite(prepared, "train", train.assign(drg_code=train["drg_code"].iloc[0]))  # one class
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train.parquet").write_text("not parquet")
    cases = {
        "nowhere": ["--data", str(tmp_path / "nowhere")],
        "one class": ["--data", str(prepared)],
        "not parquet": ["--data", str(tmp_path / "broken")],
    }
    for name, args in cases.items():
        assert _main([*args, "--out", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    with pytest.raises(UserError):  # --debug: the exception itself, with its traceback
        _main(["--data", str(prepared), "--out", str(tmp_path / "out"), "--debug"])


def test_baseline_reads_only_the_text_window_it_is_given(prepared, tmp_path):
    """Sweeps compare an LLM reading N tokens with TF-IDF on the same N tokens: the window must apply to train and
    scored notes alike, and metrics.json says which window it was."""
    seen: list[str] = []

    def first_word(texts):
        seen.extend(texts)
        return [t.split()[0] for t in texts]

    whole = run_baseline(prepared, tmp_path / "whole", min_df=1)
    window = run_baseline(prepared, tmp_path / "window", min_df=1, text_window=first_word, text_window_name="1 word")
    assert window["features"] < whole["features"] and window["text_window"] == "1 word"
    assert whole["text_window"] == "the whole hospital course"
    assert len(seen) == window["n_train"] + int(window["metrics"]["n"])  # train and scored notes both cut
    assert json.loads((tmp_path / "window" / "metrics.json").read_text())["text_window"] == "1 word"
