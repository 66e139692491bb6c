"""Text inputs: labelled tables (held-out evaluation sets) and unlabelled corpora (transfer texts for KD).

Example:
    >>> texts, labels = read_text_table(Path("sst2/dev.tsv"), "sentence", "label", ["negative", "positive"])
    >>> texts[0], labels[0]
    ("it 's a charming and often affecting journey . ", 1)
    >>> corpus = read_corpus(Path("wikitext-103/wiki.train.raw"))
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from pathlib import Path
from typing import Any

from dfkd_cli.errors import DfkdError, shown

__all__ = ["TABLE_FORMATS", "read_corpus", "read_text_table"]

TABLE_FORMATS = {".tsv": "\t", ".csv": ","}
_INTEGER = re.compile(r"^[+-]?\d+(\.0*)?$")  # "1" and "1.0" (pandas writes integer labels as floats)
_WIKITEXT_HEADING = re.compile(r"^=+\s.*\s=+$")  # " = Title = ", " = = Section = = "
_WIKITEXT_AT = re.compile(r" @([-.,])@ ")  # WikiText's tokenised "1 @,@ 000", "well @-@ known"
# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def _decode(path: Path, what: str) -> str:
    """The file's text (UTF-8, an optional BOM dropped); one-line DfkdError when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DfkdError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); re-save it as UTF-8"
        ) from None


def read_text_table(
    path: Path,
    text_column: str,
    label_column: str | None,
    class_names: list[str] | None,
    limit: int | None = None,
) -> tuple[list[str], list[int] | None]:
    """Texts (and integer labels) from a ``.tsv`` or ``.csv`` file with a header row.

    ``.tsv`` is split on tabs with no quoting (as GLUE/SST-2 write it: quote characters are text);
    ``.csv`` uses standard CSV quoting. Labels may be class indices ``0..C-1`` or class names
    (matched to ``class_names`` case-insensitively, names first). Reads at most ``limit`` rows.
    Every problem is a one-line :class:`DfkdError` that says where and what to do.

    Example:
        >>> read_text_table(Path("dev.csv"), "text", "label", ["negative", "positive"])
        (['a fine film', 'dull'], [1, 0])
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    path = Path(path)
    reader = _table_reader(path)
    suffix = path.suffix.lower()
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise DfkdError(f"table '{path}' is empty; it needs a header row naming the columns, then one row per example")
        header = [cell.strip() for cell in header]
        text_index = _column(header, text_column, path, "text")
        label_index = None if label_column is None else _column(header, label_column, path, "label")
        lookup = {name.strip().casefold(): i for i, name in enumerate(class_names or [])}
        texts: list[str] = []
        labels: list[int] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            line = reader.line_num
            if len(row) != len(header):
                raise DfkdError(
                    f"table '{path}' line {line} has {len(row)} fields but the header has {len(header)}; "
                    f"{'a tab inside a text? remove it' if suffix == '.tsv' else 'quote texts that contain commas'}"
                )
            cell = row[text_index].strip()
            if not cell:
                raise DfkdError(f"table '{path}' line {line}: the '{header[text_index]}' text is empty; fill it in or remove the row")
            texts.append(cell)
            if label_index is not None:
                labels.append(_label(row[label_index].strip(), class_names, lookup, path, line))
            if limit is not None and len(texts) >= limit:
                break
    except csv.Error as error:
        raise DfkdError(f"table '{path}' line {reader.line_num} is not valid {suffix[1:].upper()} ({error}); fix or re-save the file") from None
    if not texts:
        raise DfkdError(f"table '{path}' has a header but no rows; add one row per example")
    return texts, (labels if label_index is not None else None)


def _table_reader(path: Path) -> Any:
    """A CSV reader over the table at ``path``: tabs without quoting for .tsv, standard CSV for .csv."""
    if not path.exists():
        raise DfkdError(f"table '{path}' not found; check the path")
    if path.is_dir():
        raise DfkdError(f"table '{path}' is a folder; pass a .tsv or .csv file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise DfkdError(f"table '{path}' has an unsupported extension '{path.suffix or '(none)'}'; "
                        "use a .tsv (tab-separated) or .csv (comma-separated) file with a header row")
    stream = io.StringIO(_decode(path, "table"), newline="")
    if suffix == ".tsv":
        return csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(stream, delimiter=",")


def _column(header: list[str], name: str, path: Path, role: str) -> int:
    """Index of column ``name`` (exact, else the one case-insensitive match); DfkdError listing the columns."""
    if name in header:
        return header.index(name)
    folded = [i for i, column in enumerate(header) if column.casefold() == name.strip().casefold()]
    if len(folded) == 1:
        return folded[0]
    close = difflib.get_close_matches(name, header, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; pass one of those"
    columns = ", ".join(shown(column, 40) for column in header)
    raise DfkdError(f"table '{path}' has no {role} column {name!r} (its columns: {columns}){hint}")


def _label(cell: str, class_names: list[str] | None, lookup: dict[str, int], path: Path, line: int) -> int:
    """A label cell as a class index: a class name first, else an integer in range."""
    if not cell:
        raise DfkdError(f"table '{path}' line {line}: the label is empty; fill it in or remove the row")
    index = lookup.get(cell.casefold())
    if index is not None:
        return index
    if _INTEGER.match(cell):
        value = int(float(cell))
        if value < 0 or (class_names is not None and value >= len(class_names)):
            span = f"0..{len(class_names) - 1}" if class_names else "0 or more"
            raise DfkdError(f"table '{path}' line {line}: label {value} is outside {span}; labels are class indices "
                            "or class names")
        return value
    if class_names is None:
        raise DfkdError(f"table '{path}' line {line}: label {shown(cell, 40)} is not a class index, and there are no class "
                        "names to match it against; use integer labels 0..C-1")
    names = ", ".join(shown(name, 30) for name in class_names)
    close = difflib.get_close_matches(cell, class_names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise DfkdError(f"table '{path}' line {line}: label {shown(cell, 40)} is not one of the classes ({names}) nor an "
                    f"index 0..{len(class_names) - 1}{hint}")


def read_corpus(path: Path, min_words: int = 3, max_words: int = 64) -> list[str]:
    """Unlabelled texts for distillation from a text file, or a folder of ``.txt`` files (searched recursively).

    One text per line, whitespace collapsed; blank lines and WikiText headings (`` = Title = ``) are
    dropped and WikiText's `` @-@ `` tokens joined. A line longer than ``max_words`` words is split
    at sentence ends, and a sentence still too long into equal chunks of at most ``max_words``;
    pieces shorter than ``min_words`` words are dropped.

    Example:
        >>> read_corpus(Path("corpus.txt"), min_words=3)[:2]
        ['The film opens in Paris.', 'It was a commercial success.']
    """
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    path = Path(path)
    if not path.exists():
        raise DfkdError(f"corpus '{path}' not found; pass a UTF-8 text file or a folder of .txt files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DfkdError(f"corpus folder '{path}' has no .txt files; put the texts in .txt files (UTF-8, one text per line)")
    else:
        files = [path]
    texts: list[str] = []
    empty = True
    for file in files:
        content = _decode(file, "corpus file")
        empty = empty and not content.strip()
        for raw in content.splitlines():
            line = " ".join(raw.split())
            if not line or _WIKITEXT_HEADING.match(line):
                continue
            line = _WIKITEXT_AT.sub(r"\1", f" {line} ").strip()
            texts.extend(piece for piece in _split_line(line, max_words) if len(piece.split()) >= min_words)
    if empty:
        raise DfkdError(f"corpus '{path}' is empty; it needs text, one passage per line")
    if not texts:
        raise DfkdError(f"corpus '{path}' has no usable lines (each needs at least {min_words} words, headings and blank "
                        "lines are skipped); pass a corpus of running text or lower the minimum")
    return texts


def _split_line(line: str, max_words: int) -> list[str]:
    """``line`` itself when short enough, else its sentences, each cut into equal chunks of at most ``max_words``."""
    if len(line.split()) <= max_words:
        return [line]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(line):
        words = sentence.split()
        if not words:
            continue
        count = math.ceil(len(words) / max_words)
        size = math.ceil(len(words) / count)
        pieces.extend(" ".join(words[i : i + size]) for i in range(0, len(words), size))
    return pieces
