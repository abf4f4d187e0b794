"""Reading MIMIC-format CSV files (plain or gzip) in chunks, with one clear sentence for every kind of bad file.

Every reader of ``prepare`` goes through here, so a bad file gets the same treatment whichever table it is:

* a missing column, an empty file or a wrong delimiter names the file and the columns found;
* a corrupt or truncated gzip file says so (zlib's and gzip's own errors, and the parser errors that decompressed
  garbage can cause before gzip's checksum fails, are all turned into "copy it again");
* a malformed row (an unquoted comma, a stray quote) names the data row and the line an editor shows, found by a
  second pass with Python's ``csv`` module only when pandas' parser has failed;
* a cell that is not an integer, or is not valid text in the file's encoding, names its row.

Messages carry ids, counts and column names, never cell text of the note column.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from drg_llama.errors import UserError

# What the gzip layer raises for a damaged file: a bad header or checksum (BadGzipFile, an OSError), a damaged
# deflate stream (zlib.error) or a file cut short (EOFError).
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


class DataError(UserError):
    """Bad input data, with the file and (data) row it was found at.

    Attributes:
        file: Path of the offending file.
        row: 1-based data row (the header is row 0), or None when the problem is the whole file.
    """

    def __init__(self, file: str | Path, message: str, row: int | None = None):
        self.file = str(file)
        self.row = row
        where = f"{self.file}, row {row}" if row is not None else self.file
        super().__init__(f"{where}: {message}")


def check_encoding(encoding: str) -> str:
    """The canonical codec name of ``encoding``; ValueError naming the option when Python has no such codec."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown --encoding {encoding!r}; give a codec name such as utf-8 or latin-1") from None


def _is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


def _corrupt_gzip(path: Path, err: BaseException) -> DataError:
    detail = str(err) or type(err).__name__
    return DataError(path, f"the gzip file is corrupt or truncated ({detail}); copy or download it again")


def _gzip_error(path: Path) -> BaseException | None:
    """The error that reading ``path`` to its end raises, or None when the whole gzip stream is sound."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except _GZIP_ERRORS as err:
        return err
    return None


def read_header(path: Path, required: tuple[str, ...], encoding: str = "utf-8") -> list[str]:
    """Read and check a CSV header; returns the column names.

    Raises:
        DataError: empty file, unreadable or corrupt file, or missing columns (with a hint when the file looks
            tab-, semicolon- or pipe-separated).
    """
    try:
        header = pd.read_csv(path, nrows=0, encoding=encoding, encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty (no header line)") from None
    except _GZIP_ERRORS as err:
        if _is_gzip(path):
            raise _corrupt_gzip(path, err) from None
        raise DataError(path, f"cannot read the CSV header ({err})") from None
    except pd.errors.ParserError as err:
        raise DataError(path, f"cannot read the CSV header ({err})") from None
    columns = [str(c).strip() for c in header.columns]
    missing = [c for c in required if c not in columns]
    if missing:
        hint = ""
        if len(columns) == 1 and any(sep in columns[0] for sep in "\t;|"):
            hint = " — the header is one column; the file looks tab/semicolon/pipe-separated, expected commas"
        # The names found are not echoed: in a file without a header line they are the first note's words.
        raise DataError(path, f"missing column(s) {missing} in the header line ({len(columns)} columns){hint}")
    return columns


def iter_csv(
    path: Path, usecols: list[str], chunk_rows: int, encoding: str = "utf-8"
) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield (first data row number, chunk) with every column as Python str, undecodable bytes kept as surrogates.

    Raises:
        DataError: a corrupt or truncated gzip file, or a malformed row (with its data row and editor line).
    """
    # All columns are parsed (no usecols): with usecols pandas silently accepts rows with extra fields, which is how
    # an unquoted comma or a shifted row shows up.
    reader = pd.read_csv(
        path,
        dtype=object,  # pandas 3's default string dtype is Arrow-backed and would reject surrogate-escaped bytes
        na_filter=False,  # empty cells stay "" so a missing id is reported as such, not as NaN
        encoding=encoding,
        encoding_errors="surrogateescape",
        chunksize=chunk_rows,
    )
    first = 1
    try:
        for chunk in reader:
            yield first, chunk[usecols]
            first += len(chunk)
    except _GZIP_ERRORS as err:
        if _is_gzip(path):
            raise _corrupt_gzip(path, err) from None
        raise DataError(path, f"cannot read the file after data row {first - 1} ({err}); copy it again") from None
    except pd.errors.ParserError as err:
        # Decompressed garbage parses as odd rows before gzip reaches its checksum: a damaged file is reported as
        # such, not as a CSV problem.
        if _is_gzip(path) and (gz_err := _gzip_error(path)) is not None:
            raise _corrupt_gzip(path, gz_err) from None
        raise _malformed(path, encoding, err) from None
    finally:
        reader.close()


def _malformed(path: Path, encoding: str, err: Exception) -> DataError:
    """Locate the first malformed record with the ``csv`` module (pandas reports record numbers of its own)."""
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
        reader = csv.reader(text, strict=True)
        row, line = 0, 1
        try:
            n_fields = len(next(reader))
            line = reader.line_num + 1
            for record in reader:
                row += 1
                if len(record) > n_fields:
                    return DataError(
                        path,
                        f"malformed CSV: {len(record)} fields where the header has {n_fields} (starting at line "
                        f"{line}); a field with a comma or a quote is probably not quoted — fix that line",
                        row=row,
                    )
                line = reader.line_num + 1
        except csv.Error as csv_err:
            return DataError(
                path,
                f"malformed CSV ({csv_err}) in the record starting at line {line}; check the quotes from that line on",
                row=row + 1,
            )
    return DataError(path, f"malformed CSV ({err}); check the file's quoting and delimiters")


def int_column(values: pd.Series, path: Path, first_row: int, name: str) -> np.ndarray:
    """Parse a column of non-negative integers, raising DataError at the first bad cell."""
    try:
        parsed = values.to_numpy().astype(np.int64)  # fast path: int() per cell, accepts " 12" but not "1.5" or ""
        if len(parsed) == 0 or parsed.min() >= 0:
            return parsed
    except (ValueError, OverflowError):
        pass
    ok = values.str.strip().str.fullmatch(r"\d{1,18}")
    i = int(np.flatnonzero(~ok.to_numpy(dtype=bool))[0])
    bad = values.iloc[i]
    shown = "an empty value" if not bad.strip() else f"{bad[:30]!r}"
    raise DataError(path, f"{name} is {shown}, expected an integer", row=first_row + i)


def check_text(values: pd.Series, path: Path, name: str, encoding: str = "utf-8") -> None:
    """Raise DataError naming the row of the first cell with bytes the file's encoding cannot decode (short columns).

    The chunk index of ``pd.read_csv(chunksize=...)`` runs on across chunks, so index + 1 is the data row.
    """
    try:
        "".join(values).encode("utf-8")  # one check per chunk; look for the row only when it fails
        return
    except UnicodeEncodeError:
        pass
    for index, value in values.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                path,
                f"{name} has bytes that are not {_codec_label(encoding)}; if the file is in another encoding, "
                "re-run with --encoding (e.g. --encoding latin-1)",
                row=int(index) + 1,
            ) from None


def _codec_label(encoding: str) -> str:
    return "UTF-8" if codecs.lookup(encoding).name == "utf-8" else f"valid {encoding}"
