"""Scale-out: two nodes on localhost through Lightning's cluster environment variables, and sharded sweeps.

The two "nodes" are two processes on this machine, each started by hand the way a multi-node job starts one process
per device on every node (MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK, WORLD_SIZE), talking over gloo.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from drg_llama.data.datamodule import DRGDataModule
from drg_llama.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
TINY = str(CONFIG_DIR / "tiny.yaml")

# One process of a "node": trains through the public entry point and writes what it saw, named by its node rank.
NODE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from drg_llama.train import main
    results = main(sys.argv[1:])
    metrics = next(v for k, v in results.items() if "best on val" in k)
    with open(f"metrics-node{os.environ['NODE_RANK']}.json", "w") as fh:
        json.dump(metrics, fh)
    """
)

# Passed as --trainer.callbacks+=test_rows.RecordTestRows: the rows each process scored in trainer.test.
RECORD_TEST_ROWS = textwrap.dedent(
    """
    import json, os
    import lightning as L

    class RecordTestRows(L.Callback):
        def __init__(self):
            self.rows = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.rows += batch["row"].tolist()

        def on_test_end(self, trainer, pl_module):
            record = {"rows": self.rows, "global_rank": trainer.global_rank, "world_size": trainer.world_size}
            with open(f"rows-node{os.environ['NODE_RANK']}.json", "w") as fh:
                json.dump(record, fh)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_agree_and_score_every_test_row_once(cache, tmp_path):
    prepared = DRGDataModule(synthetic_n=300).prepared_dir  # the tiny config's corpus, built before both nodes start
    n_test = min(len(pd.read_parquet(prepared / "test.parquet")), 40)  # tiny.yaml's limit_test
    # 12 rows per evaluation batch cut the test split into an odd number of batches, so the nodes get unequal numbers
    # of batches: evaluation is not padded with repeated rows (metrics synchronised over nodes would count them twice).
    eval_batch = 12
    assert (-(-n_test // eval_batch)) % 2 == 1
    (tmp_path / "node.py").write_text(NODE_SCRIPT)
    (tmp_path / "test_rows.py").write_text(RECORD_TEST_ROWS)
    # Only Lightning's own variables: no launcher (torchrun, SLURM) may be detected instead of LightningEnvironment.
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK",)
    }
    base_env |= {
        "DRG_LLAMA_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(REPO), base_env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",  # set: Lightning starts no process itself, each node's process is ours
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "node.py",
        "--variant",
        "single_label",
        "--config",
        TINY,
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--data.eval_batch_size",
        str(eval_batch),
        "--trainer.callbacks+=test_rows.RecordTestRows",
        "--run_baseline",
        "false",
    ]
    logs = [(tmp_path / f"node{rank}.log").open("w") for rank in (0, 1)]
    nodes = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env={**base_env, "NODE_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT
        )
        for rank, log in enumerate(logs)
    ]
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # the other node hangs in a collective when one dies: end it too
                node.kill()
        for log in logs:
            log.close()
    output = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in output)
    for rank in (0, 1):  # each process joined one process group of two, as global rank = its node rank
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output[rank]

    metrics = [json.loads((tmp_path / f"metrics-node{rank}.json").read_text()) for rank in (0, 1)]
    assert metrics[0] == metrics[1]
    assert metrics[0]["n"] == n_test
    rows = [json.loads((tmp_path / f"rows-node{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["global_rank"], r["world_size"]) for r in rows] == [(0, 2), (1, 2)]
    scored = rows[0]["rows"] + rows[1]["rows"]
    assert sorted(scored) == list(range(n_test))  # every row scored by exactly one node

    # One run folder, written by node 0 only, holding the metrics both nodes computed.
    run_dirs = sorted((tmp_path / "runs" / "single_label").iterdir())
    assert [d.name for d in run_dirs] == ["version_0"]
    recorded = json.loads((run_dirs[0] / "test_metrics.json").read_text())["metrics"]
    assert recorded == pytest.approx(metrics[0], nan_ok=True)
