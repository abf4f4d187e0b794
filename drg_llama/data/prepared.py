"""The prepared folder: written complete or not at all, and checked against its manifest whenever it is read.

``prepare`` writes everything into a hidden temporary folder beside ``--out`` and only then moves it into place
(:func:`writing_folder`): an interrupted run (Ctrl-C, an exception, a full disk) leaves the previous folder as it
was, or no folder, never new Parquet files beside an old manifest. The manifest records every file's size, SHA-256
and (for Parquet) row count; :func:`verify` checks them, so a folder that was modified or copied incompletely is
refused with one sentence instead of being trained on.

:class:`PreparedFolder` is the one reader of a prepared folder (the data module, the TF-IDF baseline and
``python -m drg_llama.data stats`` all open it here)::

    from drg_llama.data.prepared import PreparedFolder

    folder = PreparedFolder.open("data/prepared", drg_version="v43")   # checked against manifest.json
    folder.read("test", ["hadm_id", "drg_code"], limit=100)            # only the columns asked for

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

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from drg_llama.data.csvfiles import DataError
from drg_llama.data.splits import SPLITS
from drg_llama.drg import resolve_version
from drg_llama.errors import UserError

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


def read_manifest(folder: str | Path) -> dict:
    """The parsed ``manifest.json`` of ``folder``, without checking the files it lists (:func:`verify` does that).

    Raises:
        FileNotFoundError: ``folder`` has no manifest.json (not a prepared folder).
        DataError: the manifest is not readable JSON.
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
    if not isinstance(manifest, dict):
        raise DataError(path, "is not a readable manifest; re-run prepare to rewrite the folder")
    return manifest


def verify(folder: str | Path) -> dict:
    """The manifest of a prepared folder, after checking that every file it lists matches it.

    Raises:
        FileNotFoundError: ``folder`` has no manifest.json (not a prepared folder).
        DataError: the manifest is unreadable or predates file checksums, or a file is missing, has another size,
            checksum or row count than the manifest says.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(
            folder / MANIFEST,
            "lists no file checksums (written by an older drg-llama); re-run prepare to rewrite the folder",
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


class PreparedFolder:
    """A prepared folder whose files matched its manifest when it was opened; reads its splits by column.

    Open one with :meth:`open`. Text is read only when a caller asks for the ``text`` column.

    Attributes:
        path: The folder.
        manifest: Its parsed ``manifest.json`` (DRG version, split protocol, counts, file checksums).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, drg_version: str | None = None, hint: str = "") -> PreparedFolder:
        """Check ``path`` against its manifest (every file's size, rows and SHA-256) and open it.

        Args:
            path: Output folder of ``python -m drg_llama.data prepare``.
            drg_version: The MS-DRG version the caller's classes belong to; the folder must have been prepared with
                it. None accepts any version.
            hint: Words added to the "does not exist" and "not a prepared folder" errors (another way to get data).

        Raises:
            UserError: no such folder, no manifest, another DRG version, or a split file missing.
            DataError: a file does not match the manifest, or the manifest is unreadable.
        """
        path = Path(path).expanduser()
        create = f"create it with `python -m drg_llama.data prepare --mimic-root ROOT --out {path}`{hint}"
        if not path.is_dir():
            raise UserError(f"data folder {path} does not exist; {create}.")
        if not (path / MANIFEST).is_file():
            raise UserError(f"{path} is not a prepared folder (no manifest.json); {create}.")
        manifest = verify(path)
        missing = [name for name in SPLIT_FILES if not (path / name).is_file()]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; re-run prepare.")
        prepared = manifest.get("drg_version")
        if drg_version is not None and (prepared is None or resolve_version(prepared) != resolve_version(drg_version)):
            raise UserError(
                f"{path} was prepared with {prepared} but drg_version is {resolve_version(drg_version)}; re-run "
                f"prepare or set --data.drg_version {prepared}"
            )
        return cls(path, manifest)

    @property
    def drg_version(self) -> str | None:
        """The MS-DRG version the folder's labels belong to (None in a manifest that does not say)."""
        return self.manifest.get("drg_version")

    def split_path(self, split: str) -> Path:
        """``{split}.parquet`` of the folder."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self.path / f"{split}.parquet"

    def num_rows(self, split: str) -> int:
        """Rows of a split, from the Parquet footer (nothing else is read)."""
        return pq.ParquetFile(self.split_path(split)).metadata.num_rows

    def read(self, split: str, columns: list[str], limit: int | None = None) -> pd.DataFrame:
        """The first ``limit`` rows (all when None) of a split, ``columns`` only, in file order.

        A limit is read batch by batch, so the first rows of a large split cost what they hold, not the split.

        Raises:
            DataError: the split lacks one of ``columns``.
            UserError: the file is not readable Parquet.
        """
        path = self.split_path(split)
        try:
            present = pq.ParquetFile(path).schema_arrow.names
            if missing := [c for c in columns if c not in present]:
                raise DataError(path, f"lacks column(s) {', '.join(missing)}; re-run prepare to rewrite the folder")
            if limit is None:
                return pq.read_table(path, columns=columns).to_pandas()
            parts, total = [], 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=min(limit, 65_536), columns=columns):
                parts.append(batch.to_pandas())
                total += batch.num_rows
                if total >= limit:
                    break
            frame = pd.concat(parts, ignore_index=True) if parts else pq.read_table(path, columns=columns).to_pandas()
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{path} is not a readable prepared split ({type(err).__name__}); re-run prepare") from None
        return frame.iloc[:limit].reset_index(drop=True)
