"""Export a classifier run as a plain Hugging Face sequence-classification folder: no drg-llama needed to serve it.

    python -m drg_llama.export --run runs/two_label/version_0 --out exported/two_label
    python -m drg_llama.export --run runs/single_label/version_0 --out exported/single_label --checkpoint last

The LoRA adapters are merged into the base weights and the folder is written with ``save_pretrained``:
``config.json`` (``id2label`` names every output: ``DRG 291: HEART FAILURE AND SHOCK WITH MCC`` for single_label;
the base DRGs and then ``SEVERITY NONE/CC/MCC`` for two_label), ``model.safetensors``, the tokenizer, and
``drg_llama.json`` (the label space, the calibration temperature, the context length and truncation). Load it with

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("exported/two_label")
    tokenizer = AutoTokenizer.from_pretrained("exported/two_label")
    logits = model(**tokenizer(course_text, truncation=True, return_tensors="pt")).logits

and the logits equal the run's own (``predict``) for notes within the run's context length. A single_label run's
softmax over them, after dividing by the temperature, is ``predict``'s distribution; a two_label run's
``n_base + 3`` outputs become DRG probabilities with the torch-free ``drg_llama.drg.LabelSpace`` (see the README).

Only runs whose notes are pooled at their last token (``model.backbone.pooling: last``, DRG-LLaMA's choice and the
default) can be exported: transformers' sequence classifiers pool the last token, so a mean-pooled run would give
other logits there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drg_llama.errors import USER_ERRORS, report_error
from drg_llama.runs import Run, RunError, replacing, write_json

#: Sidecar file of an exported folder: what transformers' config.json cannot say about the DRG outputs.
EXPORT_FILE = "drg_llama.json"
# transformers' tokenizers cut the end (right) or the start (left) of a longer text; head_tail has no equivalent.
_TRUNCATION_SIDE = {"head": "right", "tail": "left"}


def output_labels(space) -> list[str]:
    """A name for every output of the score layer: DRGs (single_label), or base DRGs then severities (two_label)."""
    from drg_llama.drg import SEVERITIES, get_table, split_severity_phrase

    table = get_table(space.version)
    if space.variant == "single_label":
        return [f"DRG {d}: {table[d].title}" for d in space.drgs]
    # The family's title without its severity phrase; the phrase is found in upper case (CMS titles' own case).
    stems = {b: table[b].title[: len(split_severity_phrase(table[b].title.upper())[0])] for b in space.bases}
    bases = [f"BASE {b}: {stems[b]}" for b in space.bases]
    return bases + [f"SEVERITY {s.value}" for s in SEVERITIES]


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "best") -> Path:
    """Merge a classifier run's LoRA into its base and write a standard HF sequence-classification folder.

    Args:
        run_dir: A classifier run folder.
        out: The folder to write; it must not exist yet, or be empty (it is written complete or not at all).
        checkpoint: ``best`` (the one training tested), ``last``, or a ``.ckpt`` path.

    Returns:
        ``out``.
    """
    from peft import PeftModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    run = Run.open(run_dir)
    if run.recipe != "classifier":
        raise RunError(
            f"{run.folder} is a {run.variant} reasoner run; export writes sequence classifiers (a reasoner's "
            "adapter/ folder loads onto its base model with PEFT)"
        )
    backbone = run.backbone
    if backbone["pooling"] != "last":
        raise RunError(
            f"{run.folder} pools the mean of each note's tokens (model.backbone.pooling: {backbone['pooling']}), "
            "which a transformers sequence classifier cannot reproduce; export a run trained with pooling: last"
        )
    if backbone["quantization"] is not None:
        raise RunError(
            f"{run.folder} has a {backbone['quantization']} quantized base, which LoRA cannot be merged into"
        )
    data = run.config.get("data") or {}
    model, ckpt = run.load_model(checkpoint)
    hf = model.model.merge_and_unload() if isinstance(model.model, PeftModel) else model.model
    labels = output_labels(run.label_space)
    hf.config.id2label = dict(enumerate(labels))
    hf.config.label2id = {label: i for i, label in enumerate(labels)}
    hf.config.problem_type = "single_label_classification"
    tokenizer = model.tokenizer
    _check_last_token_pooling(tokenizer, out)
    # Right padding: transformers' own position ids count from the first position, as ours do for right padding.
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = data.get("max_length") or tokenizer.model_max_length
    truncation = data.get("truncation") or "head"
    tokenizer.truncation_side = _TRUNCATION_SIDE.get(truncation, "right")
    sidecar = {
        "label_space": run.label_space.to_dict(),
        "temperature": run.temperature(ckpt),
        "variant": run.variant,
        "max_length": data.get("max_length"),
        "truncation": truncation,
        "exported_from": {"run": str(run.folder.resolve()), "checkpoint": run.relative(ckpt)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / EXPORT_FILE, sidecar)
    return out


def _check_last_token_pooling(tokenizer, out: Path) -> None:
    """transformers pools the last token that is not padding: a tokenizer that appends its pad token would move it."""
    from drg_llama.data.tokenization import special_tokens

    _, suffix = special_tokens(tokenizer)
    if tokenizer.pad_token_id in suffix:
        raise RunError(
            f"the tokenizer appends its padding token to every note, so an exported model would pool another token "
            f"than training did; {out} was not written"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drg_llama.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="classifier run folder written by python -m drg_llama.train")
    parser.add_argument("--out", required=True, help="folder to write (new or empty)")
    parser.add_argument("--checkpoint", default="best", help="best (the one training tested), last, or a .ckpt path")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, args.out, args.checkpoint)
    except USER_ERRORS as err:
        return report_error(err, args.debug)
    print(f"exported {args.run} -> {out} (load with transformers' AutoModelForSequenceClassification.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
