"""A Lightning callback that records the dtypes the precision policy promises (used by ``gpu_check.py``).

Kept apart from ``gpu_check.py`` so that module stays import-light; the CLI loads it by class path
(``--trainer.callbacks+=benchmarks.gpu_probe.DtypeProbe``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L

PROBE_ENV = "DRG_GPU_CHECK_PROBE"


class DtypeProbe(L.Callback):
    """Records, after the first optimizer step, the dtypes the precision policy promises (``--trainer.callbacks+=``).

    Writes JSON to ``$DRG_GPU_CHECK_PROBE``: the frozen weight matrices' dtypes, the trainable tensors' dtypes, the
    AdamW states' dtypes, the number of 4-bit layers and the device.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = os.environ.get(PROBE_ENV)
        if batch_idx != 0 or not path or not trainer.is_global_zero:
            return
        params = list(pl_module.named_parameters())
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        state = optimizer.state.values() if optimizer is not None else []
        record = {
            "frozen_matrix_dtypes": sorted({str(p.dtype) for _, p in params if not p.requires_grad and p.dim() == 2}),
            "trainable_dtypes": sorted({str(p.dtype) for _, p in params if p.requires_grad}),
            "trainable_tensors": sum(p.requires_grad for _, p in params),
            "adam_state_dtypes": sorted({str(s["exp_avg"].dtype) for s in state if "exp_avg" in s}),
            "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in pl_module.modules()),
            "device": str(next(p.device for _, p in params)),
            "precision": str(trainer.precision),
        }
        Path(path).write_text(json.dumps(record, indent=2))
