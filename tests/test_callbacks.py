"""What training writes besides checkpoints (drg_llama.callbacks): metrics.csv across a resume."""

import pandas as pd

from drg_llama.callbacks import RunLogger


def test_the_run_logger_keeps_the_rows_logged_before_the_resumed_step(tmp_path):
    first = RunLogger(tmp_path, name="run", version=0)
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step)
    first.log_metrics({"val/top1": 0.5}, 3)
    first.save()
    metrics_file = tmp_path / "run" / "version_0" / "metrics.csv"

    resumed = RunLogger(tmp_path, name="run", version=0)
    resumed.keep_history(before_step=4)  # the checkpoint was written after step 4: steps 4 and 5 are trained again
    resumed.log_metrics({"train/loss": 40.0}, 4)
    resumed.save()
    rows = pd.read_csv(metrics_file)
    assert rows["step"].tolist() == [0, 1, 2, 3, 3, 4]
    assert rows["train/loss"].tolist()[:4] == [0.0, 1.0, 2.0, 3.0] and rows["train/loss"].iloc[-1] == 40.0
    assert rows["val/top1"].dropna().tolist() == [0.5]

    fresh = RunLogger(tmp_path, name="run", version=0)  # not a resume: Lightning's behaviour, a new file
    fresh.log_metrics({"train/loss": 7.0}, 0)
    fresh.save()
    assert pd.read_csv(metrics_file)["train/loss"].tolist() == [7.0]
