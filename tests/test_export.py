"""drg_llama.export: a plain transformers sequence classifier whose logits are the run's own (predict's)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from drg_llama.drg import LabelSpace
from drg_llama.export import EXPORT_FILE, export_run, main
from drg_llama.predict import predict_file
from drg_llama.runs import RunError

TEXTS = ["sepsis with acute kidney injury", "heart failure with a long, long history of hypertension", "pneumonia"]


@pytest.mark.parametrize("variant", ["single_label", "two_label"])
def test_exported_folder_loads_in_plain_transformers_with_predicts_probabilities(tiny_runs, tmp_path, variant):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = tiny_runs[variant]
    out = export_run(run_dir, tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")) and not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and "auto_map" not in config
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    sidecar = json.loads((out / EXPORT_FILE).read_text())
    space = LabelSpace.from_dict(sidecar["label_space"])
    assert len(model.config.id2label) == space.num_outputs
    if variant == "single_label":
        assert model.config.id2label[0] == f"DRG {space.drgs[0]}: " + model.config.id2label[0].split(": ", 1)[1]
    else:
        assert model.config.id2label[0].startswith(f"BASE {space.bases[0]}: ")
        assert model.config.id2label[space.num_outputs - 1] == "SEVERITY MCC"

    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
        logits = model(**batch).logits.numpy()
    # The README's recipe: the label space turns outputs into a distribution over DRGs, then the temperature.
    scores = space.drg_log_probs(logits) / sidecar["temperature"]
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"id": range(len(TEXTS)), "text": TEXTS}).to_csv(notes, index=False)
    predicted = predict_file(run_dir, notes, tmp_path / "pred.csv", top_k=3)
    for j in range(3):
        top = np.argsort(-probs, axis=1, kind="stable")[:, j]
        assert predicted[f"drg_{j + 1}"].tolist() == [space.drgs[i] for i in top]
        np.testing.assert_allclose(predicted[f"prob_{j + 1}"], probs[np.arange(len(TEXTS)), top], rtol=1e-4)


def test_export_refuses_what_it_cannot_write_faithfully(tiny_runs, tmp_path, capsys):
    run_dir = shutil.copytree(tiny_runs["two_label"][0], tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    assert main(["--run", str(run_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "keep me"

    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("pooling: last", "pooling: mean"))
    with pytest.raises(RunError, match="pools the mean of each note's tokens"):
        export_run(run_dir, tmp_path / "mean")
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "recipe": "reasoner", "variant": "grpo"}))
    with pytest.raises(RunError, match="reasoner run; export writes sequence classifiers"):
        export_run(run_dir, tmp_path / "reasoner")
    assert not (tmp_path / "mean").exists() and not (tmp_path / "reasoner").exists()
