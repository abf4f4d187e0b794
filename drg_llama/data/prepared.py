"""The prepared folder: written complete or not at all, and checked against its manifest whenever it is read.

``prepare`` writes everything into a hidden temporary folder beside ``--out`` and only then moves it into place
(:func:`writing_folder`): an interrupted run (Ctrl-C, an exception, a full disk) leaves the previous folder as it
was, or no folder, never new Parquet files beside an old manifest. The manifest records every file's size, SHA-256
and (for Parquet) row count; :func:`verify` checks them, so a folder that was modified or copied incompletely is
refused with one sentence instead of being trained on.

A process killed outright (SIGKILL, power loss) cannot clean up: it may leave a ``.NAME.prepare-*`` folder beside
``--out``, which can be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from drg_llama.data.csvfiles import DataError
from drg_llama.data.splits import SPLITS

MANIFEST = "manifest.json"
SPLIT_FILES = tuple(f"{split}.parquet" for split in SPLITS)


def file_record(path: Path) -> dict:
    """Size, SHA-256 and, for Parquet, the number of rows of one output file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    record = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    if path.suffix == ".parquet":
        record["rows"] = pq.ParquetFile(path).metadata.num_rows
    return record


def write_manifest(folder: Path, manifest: dict, files: tuple[str, ...]) -> dict:
    """Add the records of ``files`` (names inside ``folder``) to ``manifest`` and write ``manifest.json``."""
    manifest = dict(manifest, files={name: file_record(folder / name) for name in files})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_output(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a prepared folder, before any input is read.

    ``out`` may be new, an empty folder or a folder ``prepare`` wrote before (it is replaced as a whole). A file, a
    folder with other content, or a place where nothing can be written is a DataError naming ``out``.
    """
    if out.exists() and not out.is_dir():
        raise DataError(out, "--out is a file; give a folder (a new one, or one that prepare wrote before)")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(
            out,
            "--out holds files but no manifest.json; prepare replaces the whole folder, so give a new or empty one",
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.rmdir(probe)
    except OSError as err:
        raise DataError(out, f"cannot write beside --out ({err.strerror or err}); choose a writable folder") from None


@contextlib.contextmanager
def writing_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; on success it replaces ``out`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` keeps what it held
    before. Between the two renames of a replacement an interrupt puts the old folder back.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(folder: str | Path) -> dict:
    """The manifest of a prepared folder, after checking that every file it lists matches it.

    Raises:
        FileNotFoundError: ``folder`` has no manifest.json (not a prepared folder).
        DataError: the manifest is unreadable or predates file checksums, or a file is missing, has another size,
            checksum or row count than the manifest says.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a prepared folder (no manifest.json); create one with "
            f"`python -m drg_llama.data prepare --mimic-root ROOT --out {folder}`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(path, "is not a readable manifest; re-run prepare to rewrite the folder") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise DataError(
            path, "lists no file checksums (written by an older drg-llama); re-run prepare to rewrite the folder"
        )
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise DataError(file, "is listed in manifest.json but missing; re-run prepare to rewrite the folder")
        if file.stat().st_size != expected.get("bytes"):
            raise DataError(file, _mismatch("size"))
        if name.endswith(".parquet") and pq.ParquetFile(file).metadata.num_rows != expected.get("rows"):
            raise DataError(file, _mismatch("row count"))
        if file_record(file)["sha256"] != expected.get("sha256"):
            raise DataError(file, _mismatch("SHA-256"))
    return manifest


def _mismatch(what: str) -> str:
    return f"its {what} differs from manifest.json (modified or partly written); re-run prepare to rewrite the folder"
