"""DRGDataModule on a tiny prepared folder written here: labels, truncation, caching, bucketing, errors.

Run: pytest tests/test_datamodule.py   (the embedded-default test synthesises 300 admissions; -m "not slow" skips it)
"""

import importlib.util
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from drg_llama.data import datamodule as dm_module
from drg_llama.data.datamodule import DRGDataModule
from drg_llama.data.prepared import SPLIT_FILES, write_manifest
from drg_llama.data.tokenization import truncate_ids
from drg_llama.drg import SEVERITIES, get_table
from drg_llama.errors import UserError

VOCAB_WORDS = 300
# Two families: heart failure 291/292/293 (MCC / CC / none) and sepsis 871/872 (MCC / without MCC).
TRAIN_DRGS = [291, 292, 871, 872]


def word_tokenizer(bos_eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: "w{k}" -> id k + 4; optionally wraps every text in <s> ... </s> like LLaMA."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3} | {f"w{k}": k + 4 for k in range(VOCAB_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_eos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def note(n_words: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % VOCAB_WORDS}" for i in range(n_words))


def _rows(split: str, drgs: list[int], first_id: int, rng: np.random.Generator) -> pd.DataFrame:
    table = get_table("v43")
    n_words = rng.integers(5, 120, size=len(drgs))
    return pd.DataFrame(
        {
            "hadm_id": np.arange(first_id, first_id + len(drgs), dtype=np.int64),
            "subject_id": np.arange(first_id, first_id + len(drgs), dtype=np.int64) // 2,
            "note_id": [f"{split}-{i}" for i in range(len(drgs))],
            "text": [note(int(n), start=i) for i, n in enumerate(n_words)],
            "drg_code": np.array(drgs, dtype=np.int64),
            "drg_title": [table[d].title for d in drgs],
            "base_drg": np.array([table.base(d) for d in drgs], dtype=np.int64),
            "allowed_severities": [[s.value for s in SEVERITIES if s in table.allowed_severities(d)] for d in drgs],
            "mdc": [table[d].mdc for d in drgs],
            "source_title": [table[d].title.upper() for d in drgs],
            "n_words": n_words.astype(np.int64),
            "bhc_rule": "brief",
        }
    )


def write_prepared(folder, version: str = "v43", seed: int = 0):
    """A prepared folder like ``prepare`` writes: 40 train rows, val with an unseen DRG family, test."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": _rows("train", [TRAIN_DRGS[i % 4] for i in range(40)], 1000, rng),
        # 293 is unseen in train (a class only for two_label, by family); 190 (COPD) is unseen in both variants.
        "val": _rows("val", [291, 293, 872, 190, 871, 292], 2000, rng),
        "test": _rows("test", [872, 291, 292, 871, 293], 3000, rng),
    }
    for name, frame in splits.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    manifest = {"drg_version": version, "split": "patient", "splits": {k: len(v) for k, v in splits.items()}}
    write_manifest(folder, manifest, SPLIT_FILES)
    return splits


def rewrite_split(folder, name: str, frame: pd.DataFrame) -> None:
    """Replace one split of a prepared folder and record it in the manifest, as prepare would have written it."""
    frame.to_parquet(folder / f"{name}.parquet", index=False)
    write_manifest(folder, json.loads((folder / "manifest.json").read_text()), SPLIT_FILES)


@pytest.fixture
def prepared(tmp_path):
    folder = tmp_path / "prepared"
    return folder, write_prepared(folder)


def make_dm(folder, tokenizer=None, **kwargs) -> DRGDataModule:
    kwargs = {"batch_size": 4, "max_length": 64, "tokenizer": None} | kwargs
    dm = DRGDataModule(data_dir=str(folder), **kwargs)
    dm.set_tokenizer(tokenizer or word_tokenizer())
    return dm


# ----------------------------------------------------------------------------------------------------------------
# labels and batch format


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_batches_decode_to_prepared_drgs(prepared, variant):
    folder, splits = prepared
    dm = make_dm(folder, variant=variant)
    space = dm.label_space  # available before setup, without tokenising
    assert not any(folder.glob("tokenized/*.arrow"))
    expected_drgs = TRAIN_DRGS if variant == "single_label" else [291, 292, 293, 871, 872]
    assert list(space.drgs) == expected_drgs
    dm.setup("fit")
    table = get_table("v43")
    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        truth = splits[split]
        seen_rows = []
        for batch in loader:
            assert set(batch) == {
                "input_ids",
                "attention_mask",
                "labels",
                "base_labels",
                "severity_mask",
                "row",
                "hadm_id",
            }
            b, t = batch["input_ids"].shape
            assert t % 8 == 0 and batch["attention_mask"].shape == (b, t)
            assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
            assert batch["severity_mask"].shape == (b, 3) and batch["severity_mask"].dtype == torch.bool
            rows = batch["row"].tolist()
            seen_rows += rows
            assert batch["hadm_id"].tolist() == truth["hadm_id"].iloc[rows].tolist()
            want = truth["drg_code"].iloc[rows].tolist()
            labels = batch["labels"].tolist()
            decoded = [space.decode([i])[0] if i >= 0 else None for i in labels]
            assert decoded == [d if d in space else None for d in want]
            if variant == "two_label":
                # base index + allowed severities recombine to the prepared DRG
                for base_i, mask, drg in zip(batch["base_labels"].tolist(), batch["severity_mask"].tolist(), want):
                    base = space.bases[base_i]
                    members = [
                        m
                        for m in table.family(base).members
                        if table.allowed_severities(m) == {s for s, ok in zip(SEVERITIES, mask) if ok}
                    ]
                    assert members == [drg]
            else:
                assert set(batch["base_labels"].tolist()) == {-1}
            # the real tokens are the note's words (plus <s> ... </s>)
            for i, row in enumerate(rows):
                n = int(batch["attention_mask"][i].sum())
                assert n == min(64, truth["n_words"].iloc[row] + 2)
        assert sorted(seen_rows) == list(range(len(truth)))


def test_no_text_in_batches_or_cache(prepared):
    folder, _ = prepared
    dm = make_dm(folder)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "text" not in batch
    assert "text" not in dm.tokenize_split("train").column_names
    assert "text" not in dm.split_frame("val").columns
    # the tokenised file holds ids, not the words
    arrow = next(folder.glob("tokenized/train-*.arrow")).read_bytes()
    assert b"w17 w18" not in arrow


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_unseen_val_drgs_kept_with_minus_one(prepared, variant, caplog):
    folder, splits = prepared
    dm = make_dm(folder, variant=variant)
    dm.setup("validate")
    with caplog.at_level("WARNING"):
        rows, labels = [], []
        for batch in dm.val_dataloader():
            rows += batch["row"].tolist()
            labels += batch["labels"].tolist()
    by_row = dict(zip(rows, labels))
    assert sorted(rows) == list(range(len(splits["val"])))  # nothing dropped
    drgs = splits["val"]["drg_code"].tolist()
    unseen = {190} if variant == "two_label" else {190, 293}
    assert {drgs[r] for r, lab in by_row.items() if lab == -1} == unseen
    assert dm.unseen_counts["val"] == len(unseen)
    assert sum("unseen in training" in r.message for r in caplog.records) == 1
    # severity mask of an unseen DRG still says what it admits: 190 is "with MCC"
    frame = dm.split_frame("val")
    assert list(frame.columns) == ["hadm_id", "subject_id", "drg_code", "base_drg", "mdc", "n_words"]
    copd = int(frame.index[frame["drg_code"] == 190][0])
    assert dm.dataset("val").severity_mask[copd].tolist() == [False, False, True]


# ----------------------------------------------------------------------------------------------------------------
# truncation


@pytest.mark.parametrize("truncation", ["head", "tail", "head_tail"])
def test_datamodule_truncation_tokens(prepared, truncation):
    folder, splits = prepared
    dm = make_dm(folder, max_length=16, truncation=truncation, padding_side="right", limit_train=8)
    dm.setup("fit")
    data = dm.dataset("train")
    for row in range(len(data)):
        words = [4 + int(w[1:]) for w in splits["train"]["text"].iloc[row].split()]
        got = list(data[row]["input_ids"])
        assert got == [2] + truncate_ids(words, 14, truncation) + [3]


def test_padding_side_follows_tokenizer(prepared):
    folder, _ = prepared
    tok = word_tokenizer()
    tok.padding_side = "left"
    dm = make_dm(folder, tokenizer=tok)
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch["attention_mask"][:, -1].all()  # left padded: every row ends with a real token


# ----------------------------------------------------------------------------------------------------------------
# caching


def test_tokenisation_cached_across_runs(prepared, monkeypatch):
    folder, _ = prepared
    calls = []
    real_encode = dm_module.encode_texts

    def counting(tokenizer, texts, *args):
        calls.append(len(texts))
        return real_encode(tokenizer, texts, *args)

    monkeypatch.setattr(dm_module, "encode_texts", counting)
    first = make_dm(folder)
    first.prepare_data()
    first.setup("fit")
    assert sum(calls) == 40 + 6 + 5  # each split tokenised once
    path = first.tokenized_path("train")
    mtime = path.stat().st_mtime_ns
    batch_one = next(iter(first.train_dataloader()))

    calls.clear()
    second = make_dm(folder)  # a new run: same tokenizer content, fresh object
    second.prepare_data()
    second.setup("fit")
    batch_two = next(iter(second.train_dataloader()))
    assert calls == [] and path.stat().st_mtime_ns == mtime
    assert all(torch.equal(batch_one[k], batch_two[k]) for k in batch_one)

    # a different max_length or tokenizer is a different cache entry
    assert make_dm(folder, max_length=32).tokenized_path("train") != path
    assert make_dm(folder, tokenizer=word_tokenizer(bos_eos=False)).tokenized_path("train") != path


def test_tokenizer_by_name(prepared):
    folder, _ = prepared
    dm = DRGDataModule(data_dir=str(folder), tokenizer="byte", max_length=32, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].max() < 259 and batch["input_ids"].shape[1] == 32


def test_tokenizer_required(prepared):
    folder, _ = prepared
    dm = DRGDataModule(data_dir=str(folder), tokenizer=None)
    dm.setup("fit")  # label space needs no tokenizer
    assert dm.label_space.num_classes == 5
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------------------------------------------
# bucketing


def test_bucketing_cuts_padding_and_is_deterministic(prepared):
    folder, _ = prepared
    dm = make_dm(folder, max_length=256, batch_size=4, bucket_mega_batches=5)
    dm.setup("fit")
    eff = dm.padding_efficiency("train")
    assert eff["bucketed"] > eff["random"] and eff["sorted"] >= eff["bucketed"]

    def epoch_rows(module, epoch):
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [batch["row"].tolist() for batch in loader]

    again = make_dm(folder, max_length=256, batch_size=4, bucket_mega_batches=5)
    again.setup("fit")
    assert epoch_rows(dm, 0) == epoch_rows(again, 0)
    assert epoch_rows(dm, 0) != epoch_rows(dm, 1)  # reshuffled per epoch
    other_seed = make_dm(folder, max_length=256, batch_size=4, bucket_mega_batches=5, seed=1)
    other_seed.setup("fit")
    assert epoch_rows(dm, 0) != epoch_rows(other_seed, 0)
    rows = sum(epoch_rows(dm, 0), [])
    assert sorted(rows) == list(range(40))


# ----------------------------------------------------------------------------------------------------------------
# errors, limits, predict


def test_version_mismatch_message(tmp_path):
    folder = tmp_path / "old"
    write_prepared(folder, version="v40")
    with pytest.raises(ValueError) as err:
        _ = DRGDataModule(data_dir=str(folder), drg_version="v43").label_space
    assert "prepared with v40 but drg_version is v43; re-run prepare or set --data.drg_version v40" in str(err.value)


def test_not_a_prepared_folder(tmp_path):
    with pytest.raises(UserError, match="python -m drg_llama.data prepare"):
        _ = DRGDataModule(data_dir=str(tmp_path)).label_space
    with pytest.raises(UserError, match="does not exist; create it with `python -m drg_llama.data prepare"):
        _ = DRGDataModule(data_dir=str(tmp_path / "nowhere")).label_space


def test_unusable_training_splits_are_one_sentence(prepared, tmp_path):
    folder, splits = prepared
    train = folder / "train.parquet"
    rewrite_split(folder, "train", splits["train"].iloc[:0])
    with pytest.raises(UserError, match="train.parquet has no rows"):
        _ = DRGDataModule(data_dir=str(folder)).label_space
    # one DRG only: every prediction would be right by construction, and the TF-IDF baseline cannot fit
    rewrite_split(folder, "train", splits["train"].assign(drg_code=291))
    with pytest.raises(UserError, match=r"a single DRG \(291\)"):
        _ = DRGDataModule(data_dir=str(folder)).label_space
    train.write_bytes(b"not parquet")  # not what the manifest recorded: caught before anything reads it
    with pytest.raises(UserError, match="train.parquet: its size differs from manifest.json"):
        _ = DRGDataModule(data_dir=str(folder)).label_space
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json: is not a readable manifest"):
        _ = DRGDataModule(data_dir=str(folder)).label_space


@pytest.mark.parametrize(
    ("option", "message"),
    [({"max_length": 1}, "max_length must be >= 2"), ({"batch_size": 0}, "batch_size and eval_batch_size")],
)
def test_bad_options_are_user_errors(option, message):
    with pytest.raises(UserError, match=message):
        DRGDataModule(**option)


def test_empty_split_tokenises_to_nothing(prepared):
    # prepare --split drg_llama_2023 writes an empty val.parquet; datasets cannot read one ("corresponds to no data")
    folder, splits = prepared
    rewrite_split(folder, "val", splits["val"].iloc[:0])
    dm = make_dm(folder)
    dm.prepare_data()
    assert len(dm.tokenize_split("val")) == 0 and dm.val_dataloader() == []


def test_limits_take_first_rows(prepared):
    folder, splits = prepared
    dm = make_dm(folder, variant="single_label", limit_train=3, limit_test=2)
    assert dm.label_space.drgs == (291, 292, 871)  # classes of the rows trained on
    dm.setup("fit")
    assert len(dm.dataset("train")) == 3
    assert dm.split_frame("test")["hadm_id"].tolist() == splits["test"]["hadm_id"].iloc[:2].tolist()


def test_texts_dataloader_restores_order():
    dm = DRGDataModule(tokenizer=None, max_length=16, eval_batch_size=2)
    dm.set_tokenizer(word_tokenizer())
    texts = [note(3), note(30), note(1), note(7)]
    loader = dm.texts_dataloader(texts, ids=[11, 12, 13, 14])
    rows, ids, lengths = [], [], []
    for batch in loader:
        assert "text" not in batch and (batch["labels"] == -1).all()
        rows += batch["row"].tolist()
        ids += batch["hadm_id"].tolist()
        lengths += batch["attention_mask"].sum(1).tolist()
    assert rows == [1, 3, 0, 2]  # longest first
    assert ids == [12, 14, 11, 13] and lengths == [16, 9, 5, 3]
    dm.set_predict_texts(texts, ["a", "b", "c", "d"])
    assert set(torch.cat([b["hadm_id"] for b in dm.predict_dataloader()]).tolist()) == {-1}
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        dm.texts_dataloader(["w1", ""])


# ----------------------------------------------------------------------------------------------------------------
# embedded default


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("drg_llama.data.synthetic") is None, reason="synthesizer not present")
def test_embedded_default_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DRG_LLAMA_CACHE", str(tmp_path / "cache"))
    dm = DRGDataModule(synthetic_n=300, seed=5, tokenizer="byte", max_length=64, batch_size=8)
    folder = dm.prepared_dir
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "manifest.json").is_file()
    assert dm.label_space.num_classes > 5
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] >= 0).all()
    mtime = os.stat(folder / "manifest.json").st_mtime_ns
    again = DRGDataModule(synthetic_n=300, seed=5, tokenizer="byte")
    assert again.prepared_dir == folder and os.stat(folder / "manifest.json").st_mtime_ns == mtime


def test_visible_text_is_what_training_reads(prepared):
    from drg_llama.data import tokenization

    folder, splits = prepared
    dm = make_dm(folder, max_length=6, truncation="head")
    texts = splits["train"]["text"].tolist()[:3]
    visible = dm.visible_text(texts)
    for text, seen in zip(texts, visible):
        ids = dm.tokenizer(seen, add_special_tokens=False)["input_ids"]
        prefix, suffix = tokenization.special_tokens(dm.tokenizer)
        assert len(ids) <= 6 - len(prefix) - len(suffix) and text.startswith(seen.strip().split()[0])
