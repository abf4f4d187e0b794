"""TF-IDF + logistic-regression DRG classifier: the floor every LLM run is compared with.

Trains on ``train.parquet`` of a prepared folder, scores ``test.parquet`` (or another split) and writes
``OUT/metrics.json`` in the layout the LLM runs use, plus the metrics of always predicting the most frequent
training DRG, and ``OUT/predictions.parquet`` (ids and top-10 DRGs with probabilities; never note text)::

    python -m drg_llama.baseline --data PREPARED_DIR --out runs/baseline
    python -m drg_llama.baseline --data PREPARED_DIR --out runs/baseline --C 30 --max-features 400000

DRGs in the scored split that never occur in training get probability 0, so they count as errors.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drg_llama.data.prepared import PreparedFolder
from drg_llama.data.splits import SPLITS
from drg_llama.drg import LabelSpace
from drg_llama.errors import USER_ERRORS, UserError, report_error
from drg_llama.metrics import score_predictions
from drg_llama.runs import replacing, write_json

logger = logging.getLogger(__name__)

VARIANT = "tfidf_logreg"
_REQUIRED = ("hadm_id", "text", "drg_code")
_TOP = 10


def _read_split(folder: PreparedFolder, split: str, limit: int | None) -> pd.DataFrame:
    frame = folder.read(split, list(_REQUIRED), limit)
    if frame.empty:
        raise UserError(f"{folder.split_path(split)} has no rows; choose another split or prepare more admissions.")
    return frame


def run_baseline(
    prepared_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    label_space: LabelSpace | None = None,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    max_features: int = 200_000,
    min_df: int = 2,
    C: float = 10.0,
    solver: str = "saga",
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    text_window: Callable[[Sequence[str]], list[str]] | None = None,
    text_window_name: str | None = None,
) -> dict[str, Any]:
    """Fit TF-IDF + multinomial logistic regression on ``train`` and score ``split``; write metrics.json.

    Args:
        prepared_dir: Prepared folder (checked against its manifest) with ``train.parquet`` and ``{split}.parquet``.
        out_dir: Where ``metrics.json`` and ``predictions.parquet`` go (created).
        split: Split to score.
        label_space: The classes to score over (pass the LLM run's, so both are scored on the same classes);
            default: a single-label space of the training DRGs. Gold DRGs outside it count as errors.
        limit_train: Train on the first N training rows only (match an LLM run's ``data.limit_train``).
        limit_eval: Score the first N rows of ``split`` only (match ``data.limit_test``).
        max_features: Vocabulary size (most frequent word 1-2 grams).
        min_df: Ignore n-grams found in fewer training notes than this.
        C: Inverse L2 strength. TF-IDF rows have unit norm, so separating hundreds of classes needs large weights.
        solver: ``saga`` (default; memory grows with classes x features only) or ``lbfgs``.
        max_iter: Passes over the data (saga) or iterations (lbfgs).
        tol: Stopping tolerance.
        seed: Seed for saga's sampling order.
        text_window: Applied to every note first, e.g. an LLM run's ``DRGDataModule.visible_text`` so the baseline
            reads only the tokens the model reads; default the whole course.
        text_window_name: How ``metrics.json`` names that window (e.g. ``first 128 tokens``).

    Returns:
        The dict written to ``metrics.json``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    folder, out_dir = PreparedFolder.open(prepared_dir), Path(out_dir)
    train = _read_split(folder, "train", limit_train)
    scored = _read_split(folder, split, limit_eval)
    if label_space is None:
        version = folder.drg_version or "v43"
        label_space = LabelSpace.build(version, "single_label", train["drg_code"])
    classes = list(label_space.drgs)
    index = {c: i for i, c in enumerate(classes)}
    in_space = train["drg_code"].isin(index)
    train = train[in_space]  # a label space narrower than the training DRGs (rare) limits what can be learnt
    y_train = train["drg_code"].map(index).to_numpy(np.int64)  # [N_train]
    if len(np.unique(y_train)) < 2:
        raise UserError(
            f"{folder.split_path('train')} has fewer than two DRGs among the rows trained on; logistic "
            "regression needs two at least (prepare more admissions)."
        )
    gold = scored["drg_code"].map(index).fillna(-1).to_numpy(np.int64)  # [N], -1: not a class -> an error

    start = time.perf_counter()
    vectorizer = TfidfVectorizer(
        ngram_range=(1, 2), sublinear_tf=True, max_features=max_features, min_df=min_df, dtype=np.float32
    )
    window = text_window or (lambda texts: list(texts))
    x_train = vectorizer.fit_transform(window(train["text"].tolist()))
    logger.info("TF-IDF: %d training notes, %d features.", x_train.shape[0], x_train.shape[1])
    model = LogisticRegression(C=C, solver=solver, max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        logger.warning("Logistic regression did not converge in %d iterations; raise --max-iter.", max_iter)
    train_seconds = time.perf_counter() - start

    probs = np.zeros((len(scored), len(classes)))  # [N, C]; classes unseen in training keep probability 0
    probs[:, model.classes_] = model.predict_proba(vectorizer.transform(window(scored["text"].tolist())))
    majority = int(np.bincount(y_train, minlength=len(classes)).argmax())
    majority_probs = np.zeros_like(probs)
    majority_probs[:, majority] = 1.0

    result = {
        "split": split,
        "variant": VARIANT,
        "metrics": score_predictions(label_space, probs, gold),
        "majority_class": score_predictions(label_space, majority_probs, gold),
        "majority_drg": _plain(classes[majority]),
        "drg_version": folder.drg_version,
        "n_train": int(len(train)),
        "train_classes": int(len(model.classes_)),
        "unseen_in_train": int((~np.isin(gold, model.classes_)).sum()),
        "limit_train": limit_train,
        "limit_eval": limit_eval,
        "features": int(x_train.shape[1]),
        "text_window": text_window_name or ("custom" if text_window else "the whole hospital course"),
        "converged": converged,
        "train_seconds": round(train_seconds, 2),
        "config": {
            "max_features": max_features,
            "min_df": min_df,
            "ngram_range": [1, 2],
            "sublinear_tf": True,
            "C": C,
            "solver": solver,
            "max_iter": max_iter,
            "tol": tol,
            "seed": seed,
        },
    }
    write_json(out_dir / "metrics.json", result)
    _write_predictions(out_dir / "predictions.parquet", scored, gold, probs, classes)
    return result


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _write_predictions(path: Path, scored: pd.DataFrame, gold: np.ndarray, probs: np.ndarray, classes: list) -> None:
    k = min(_TOP, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]
    codes = np.asarray(classes, dtype=object)
    frame = pd.DataFrame(
        {
            "hadm_id": scored["hadm_id"].to_numpy(),
            "gold": scored["drg_code"].to_numpy(),
            "top_drgs": [list(codes[row]) for row in top],
            "top_probs": [probs[i, row].astype(np.float32).tolist() for i, row in enumerate(top)],
        }
    )
    with replacing(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared folder (train.parquet, test.parquet, ...)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and predictions.parquet")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--max-features", type=int, default=200_000)
    parser.add_argument("--min-df", type=int, default=2)
    parser.add_argument("--C", type=float, default=10.0, help="inverse L2 regularisation strength")
    parser.add_argument("--solver", choices=("saga", "lbfgs"), default="saga")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    for name in ("max_features", "min_df", "max_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.C > 0:
        parser.error("--C must be > 0")
    if args.split not in SPLITS:
        parser.error(f"--split must be one of {', '.join(SPLITS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_baseline(
            args.data,
            args.out,
            split=args.split,
            max_features=args.max_features,
            min_df=args.min_df,
            C=args.C,
            solver=args.solver,
            max_iter=args.max_iter,
            seed=args.seed,
        )
    except USER_ERRORS as err:
        return report_error(err, args.debug)
    header = f"{'':16}{'top1':>8}{'top5':>8}{'macroF1':>9}{'macroAUC':>10}"
    print(f"{header}   ({result['split']}, n={result['metrics']['n']:.0f})")
    for name, m in (("tfidf_logreg", result["metrics"]), ("majority_class", result["majority_class"])):
        print(f"{name:16}{m['top1']:8.4f}{m['top5']:8.4f}{m['macro_f1_present']:9.4f}{m['macro_auc']:10.4f}")
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
