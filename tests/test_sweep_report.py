"""Sweep -> evaluate -> notebooks and report, end to end on tiny runs (a 2-point sweep of the tiny random model).

The sweep trains two points once per module into a temporary DRG_LLAMA_CACHE; a second sweep must skip both.
The headless-Chromium check runs only where ``chromium`` is installed (not in CI); every other check runs everywhere.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from drg_llama import sweep
from drg_llama.evaluate import evaluate_run
from drg_llama.predict import predict_file
from drg_llama.report import SECTIONS, build_report
from drg_llama.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
GRID = ["--grid", "data.max_length=32,48"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished 2-point sweep, both points evaluated; yields the sweep folder."""
    cache = tmp_path_factory.mktemp("drg_cache")
    old = os.environ.get("DRG_LLAMA_CACHE")
    os.environ["DRG_LLAMA_CACHE"] = str(cache)
    out = tmp_path_factory.mktemp("sweep")
    sweep.main(["--variant", "two_label", "--config", str(CONFIG_DIR / "tiny.yaml"), *GRID, "--out", str(out)])
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        evaluate_run(run_dir, "test")
    yield out
    if old is None:
        os.environ.pop("DRG_LLAMA_CACHE")
    else:
        os.environ["DRG_LLAMA_CACHE"] = old


def test_grid_axes_become_training_arguments():
    assert sweep.parse_grid(["context=256,512", "model=tiny"]) == [("context", ["256", "512"]), ("model", ["tiny"])]
    assert sweep.axis_args("context", "256") == ["--config", str(CONFIG_DIR / "context" / "256.yaml")]
    assert sweep.axis_args("context", "100") == ["--data.max_length=100"]  # no overlay for 100 tokens
    assert sweep.axis_args("model", "smollm2_135m") == ["--config", str(CONFIG_DIR / "models" / "smollm2_135m.yaml")]
    assert sweep.axis_args("data.batch_size", "4") == ["--data.batch_size=4"]
    assert sweep.axis_args("lora", "all_linear") == ["--config", str(CONFIG_DIR / "lora" / "all_linear.yaml")]
    with pytest.raises(SystemExit, match="no overlay .*choose one of all_linear"):
        sweep.axis_args("lora", "everything")
    assert sweep.point_name({"context": "256", "model": "tiny"}) == "context-256_model-tiny"
    with pytest.raises(SystemExit, match="no model overlay"):
        sweep.axis_args("model", "gpt5")
    with pytest.raises(SystemExit, match="key=v1,v2"):
        sweep.parse_grid(["context"])


def test_sweep_writes_one_run_per_point_and_skips_finished_points(swept, monkeypatch):
    table = pd.read_csv(swept / "sweep.csv")
    assert list(table["point"]) == ["data.max_length-32", "data.max_length-48"]
    assert list(table["context_length"]) == [32, 48]
    assert (table["parameters"] > table["trainable_parameters"]).all() and (table["trainable_parameters"] > 0).all()
    assert table["wall_seconds"].gt(0).all() and table["top1"].between(0, 1).all()
    for point in table["point"]:
        run = swept / point
        for name in (
            "config.yaml",
            "metrics.csv",
            "test_metrics.json",
            "checkpoints/last.ckpt",
            "baseline/metrics.json",
        ):
            assert (run / name).exists(), f"{point}: {name}"
    stamps = {p: (swept / p / "test_metrics.json").stat().st_mtime_ns for p in table["point"]}

    def no_training(argv):
        raise AssertionError(f"a finished point was trained again: {argv}")

    monkeypatch.setattr("drg_llama.train.main", no_training)
    again = sweep.main(
        ["--variant", "two_label", "--config", str(CONFIG_DIR / "tiny.yaml"), *GRID, "--out", str(swept)]
    )
    assert list(again["point"]) == list(table["point"])
    assert {p: (swept / p / "test_metrics.json").stat().st_mtime_ns for p in table["point"]} == stamps
    # a sweep with another grid in the same folder: the table keeps the earlier points after its own
    one = sweep.main(
        ["--variant", "two_label", "--config", str(CONFIG_DIR / "tiny.yaml"), "--grid", "data.max_length=48"]
        + ["--out", str(swept)]
    )
    assert list(one["point"]) == ["data.max_length-48", "data.max_length-32"]
    sweep.main(["--variant", "two_label", "--config", str(CONFIG_DIR / "tiny.yaml"), *GRID, "--out", str(swept)])
    assert list(pd.read_csv(swept / "sweep.csv")["point"]) == list(table["point"])  # the module's table, restored


def test_sweep_table_names_depth_epochs_lora_and_the_windowed_baseline(swept):
    table = pd.read_csv(swept / "sweep.csv").set_index("point")
    assert (table["num_hidden_layers"] == 2).all() and (table["max_epochs"] == 1).all()  # tiny.yaml: 2 layers
    assert (table["lora_target_modules"] == "q_proj+k_proj+v_proj+o_proj").all()
    assert table["baseline_top1"].between(0, 1).all() and table["baseline_macro_f1_present"].notna().all()
    windows = {p: json.loads((swept / p / "baseline" / "metrics.json").read_text())["text_window"] for p in table.index}
    assert windows == {p: f"head {n} tokens of the model's tokenizer" for p, n in table["context_length"].items()}
    from drg_llama.plots import sweep_depth_lines

    assert len(sweep_depth_lines(table.reset_index()).axes) == 2


def test_shards_split_the_grid_round_robin_and_bad_values_stop_in_one_sentence(tmp_path):
    points = [{"p": str(k)} for k in range(5)]
    assert sweep.parse_shard("2/3") == (2, 3) and sweep.parse_shard(" 1 / 1 ") == (1, 1)
    assert [p["p"] for p in sweep.shard_points(points, (1, 2))] == ["0", "2", "4"]
    assert [p["p"] for p in sweep.shard_points(points, (2, 2))] == ["1", "3"]
    assert sweep.shard_points(points, None) == points
    for count in (1, 2, 3, 5, 7):  # every point in exactly one slice; sizes within one of each other
        slices = [sweep.shard_points(points, (i, count)) for i in range(1, count + 1)]
        assert sorted((p for s in slices for p in s), key=lambda p: p["p"]) == points
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    grid = sweep.parse_grid(["a=1,2", "b=x,y,z"])  # the order the slices deal from: the last axis varies fastest
    assert [sweep.point_name(p) for p in sweep.grid_points(grid)][:4] == ["a-1_b-x", "a-1_b-y", "a-1_b-z", "a-2_b-x"]

    bad = {
        "0/4": "the 4 slices are numbered 1 to 4",
        "5/4": "the 4 slices are numbered 1 to 4",
        "1/0": "asks for 0 slices; N must be at least 1",
        "2": "must look like i/N",
        "1/4/2": "must look like i/N",
        "-1/4": "must look like i/N",
        "1.5/4": "must look like i/N",
        "a/b": "must look like i/N",
        "": "must look like i/N",
    }
    for spec, message in bad.items():
        with pytest.raises(SystemExit) as exit_:
            sweep.parse_shard(spec)
        text = str(exit_.value.code)
        assert text.startswith(f"error: --shard {spec!r} ") and message in text and "\n" not in text, text
    with pytest.raises(SystemExit, match="numbered 1 to 2"):  # through the command line, before any training
        sweep.main(["--variant", "two_label", *GRID, "--shard", "3/2", "--out", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()


def test_sharded_sweep_writes_the_same_table_as_an_unsharded_one(swept, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    args = ["--variant", "two_label", "--config", str(CONFIG_DIR / "tiny.yaml"), *GRID, "--out", str(out)]
    sweep.main([*args, "--shard", "2/2"])  # the second slice may well end first
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["data.max_length-48"]
    partial = pd.read_csv(out / "sweep.csv")
    assert list(partial["point"]) == ["data.max_length-48"]  # only what is finished so far
    sweep.main([*args, "--shard", "1/2"])
    assert json.loads((out / "data.max_length-32" / sweep.POINT_FILE).read_text())["shard"] == "1/2"

    varying = ["run_dir", "wall_seconds"]  # where the runs live and how long they took
    unsharded = pd.read_csv(swept / "sweep.csv").drop(columns=varying)
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv").drop(columns=varying), unsharded)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    def no_training(argv):
        raise AssertionError(f"a finished point was trained again: {argv}")

    monkeypatch.setattr("drg_llama.train.main", no_training)
    (out / "sweep.csv").unlink()
    sweep.main([*args, "--shard", "2/2"])  # a slice run again skips its points and still merges the whole grid
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv").drop(columns=varying), unsharded)


def _finished_point(out: Path, name: str, top1: float) -> None:
    """The files sweep_table reads from a finished point's run folder."""
    run = out / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  backbone:\n    name_or_path: random\ndata:\n  max_length: 32\n")
    (run / "test_metrics.json").write_text(json.dumps({"metrics": {"top1": top1}}))


def test_merge_keeps_a_point_another_slice_finishes_while_it_writes(tmp_path, monkeypatch):
    _finished_point(tmp_path, "a", 0.5)
    build = sweep.sweep_table
    calls = []

    def other_slice_finishes_right_after_the_first_read(out, names, variant):
        frame = build(out, names, variant)
        calls.append(len(frame))
        if len(calls) == 1:  # this slice has read the folder; the other slice now finishes "b" and writes its table
            _finished_point(tmp_path, "b", 0.25)
            sweep.write_atomically(tmp_path / "sweep.csv", build(out, names, variant).to_csv(index=False))
        return frame

    monkeypatch.setattr(sweep, "sweep_table", other_slice_finishes_right_after_the_first_read)
    frame = sweep.write_sweep_table(tmp_path, ["a", "b"], "two_label")
    assert calls == [1, 2, 2]  # the stale table was written, found out of date, and written again
    assert list(frame["point"]) == ["a", "b"]
    assert list(pd.read_csv(tmp_path / "sweep.csv")["top1"]) == [0.5, 0.25]


def test_sweep_table_is_written_complete_or_not_at_all(tmp_path, monkeypatch):
    _finished_point(tmp_path, "a", 0.5)
    (tmp_path / "sweep.csv").write_text("the previous table\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sweep.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        sweep.write_sweep_table(tmp_path, ["a"], "two_label")
    assert (tmp_path / "sweep.csv").read_text() == "the previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "sweep.csv"]


def test_evaluate_writes_the_analysis_sections(swept):
    run = swept / "data.max_length-48"
    report = json.loads((run / "eval" / "metrics.json").read_text())
    for key in ("calibration", "selective", "payment", "breakdowns", "severity_confusion", "mdc_confusion"):
        assert key in report, key
    n = int(report["metrics"]["n"])
    assert report["payment"]["n"] == n and report["payment"]["base_rate"] == 6500
    assert sum(map(sum, report["severity_confusion"]["counts"])) == n
    assert sum(r["n"] for r in report["breakdowns"]["length_band"]) == n
    assert json.loads((run / "calibration.json").read_text())["temperature"] == report["calibration"]["temperature"]


def test_predict_applies_the_fitted_temperature(swept, tmp_path):
    run = swept / "data.max_length-48"
    notes = tmp_path / "notes.csv"
    pd.DataFrame({"id": ["a", "b"], "text": ["sepsis with acute kidney injury", "heart failure"]}).to_csv(
        notes, index=False
    )
    # A random-init backbone's frozen weights are not in the checkpoint: load_run rebuilds them from the global RNG,
    # so both predictions seed it the same way to get the same model.
    torch.manual_seed(0)
    calibrated = predict_file(run, notes, tmp_path / "calibrated.csv", top_k=10)
    saved = run / "calibration.json"
    payload = json.loads(saved.read_text())
    try:
        saved.write_text(json.dumps(payload | {"temperature": 1.0}))
        torch.manual_seed(0)
        raw = predict_file(run, notes, tmp_path / "raw.csv", top_k=10)
    finally:
        saved.write_text(json.dumps(payload))
    assert (calibrated["drg_1"] == raw["drg_1"]).all()  # same ranking
    # the top-10 of a 1-D rescaling: p_T = p^(1/T) / Z, so log p_T - log p_T[0] = (log p - log p[0]) / T
    t = payload["temperature"]
    probs_raw = raw[[f"prob_{j}" for j in range(1, 11)]].to_numpy(np.float64)
    probs_cal = calibrated[[f"prob_{j}" for j in range(1, 11)]].to_numpy(np.float64)
    expected = (np.log(probs_raw) - np.log(probs_raw[:, :1])) / t
    np.testing.assert_allclose(np.log(probs_cal) - np.log(probs_cal[:, :1]), expected, rtol=1e-3, atol=1e-4)


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_compare_runs.ipynb",
        "02_sweep_context_and_size.ipynb",
        "03_error_analysis.ipynb",
    ]
    for path in NOTEBOOKS:
        assert '"output_type"' not in path.read_text(), f"{path.name} is stored with outputs"


def _execute(path):
    """Run a notebook from its own folder (as a user opens it); returns the outputs of its code cells."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_tiny_runs(swept, path, monkeypatch):
    monkeypatch.setenv("DRG_LLAMA_RUNS", str(swept))  # the kernel inherits the environment
    monkeypatch.setenv("DRG_LLAMA_SWEEP", str(swept))
    outputs = _execute(path)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} drew no figure"


@pytest.mark.slow
def test_sweep_notebook_reads_the_shipped_cpu_sweep_by_default(monkeypatch):
    """Out of the box, notebook 02 draws the measured CPU sweep committed in docs/ (no sweep of one's own needed)."""
    monkeypatch.delenv("DRG_LLAMA_SWEEP", raising=False)
    outputs = _execute(next(p for p in NOTEBOOKS if p.stem.startswith("02_")))
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # depth lines, context, size


def test_report_has_every_section_and_no_external_reference(swept, tmp_path):
    page = build_report([swept])
    for anchor, heading in SECTIONS:
        assert f'<section id="{anchor}"><h2>' in page, anchor
    for name in ("data.max_length-32", "data.max_length-48"):
        assert name in page
    assert "Not evaluated yet" not in page  # both runs were evaluated
    assert page.count('src="data:image/png;base64,') == 3 + 2 * 8  # comparison, sweep x2; 8 figures per run
    # nothing to fetch: no URL scheme, images inline, links only to anchors of the page, no script/link/CSS url()
    assert not re.search(r"\b(https?|ftp|file):", page), "URL in the report"
    assert re.findall(r'src="([a-z]+):', page) == ["data"] * 19
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert not re.search(r"<(script|link|iframe|object|embed)\b|url\(|@import", page)
    assert "hadm_id" not in page and "subject_id" not in page


def test_report_cli_and_missing_runs(swept, tmp_path, capsys):
    from drg_llama.report import main

    assert main(["--runs", str(swept / "data.max_length-32"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")]) == 2
    assert "not a run directory" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_offline_in_headless_chromium(swept, tmp_path):
    html = tmp_path / "report.html"
    html.write_text(build_report([swept]))
    shot = tmp_path / "shot.png"
    # A dead proxy makes any network fetch fail, so the page must render from the file alone.
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--proxy-server=127.0.0.1:9",
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        html.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]  # [H, W, 3] in [0, 1]
    dark = (pixels.mean(-1) < 0.5).mean()
    coloured = (pixels.std(-1) > 0.15).mean()  # bars and lines of the embedded PNGs
    assert dark > 0.005 and coloured > 0.002, f"blank-looking screenshot: dark {dark:.4f}, coloured {coloured:.4f}"
