"""Loaders: MovieLens 100K / 1M / latest, a generic CSV format, and the synthetic default.

Every loader returns a `Dataset`. A file that cannot be used raises one `DataError` that
names the file, the 1-based physical line and the problem; rows that are safe to drop
(exact duplicates) are dropped with one counted warning on the "training.data" logger.
Files are parsed line by line (tab, `|` and `::` formats) or with the csv module; no
pandas, so that ml-100k loads in a fraction of a second with no extra dependency.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from training.dataset import AttributeField, AttributeTable, DataError, Dataset, LabelSpec
from training.synthetic import generate_synthetic
from warmstart.contract import parse_values

log = logging.getLogger("training.data")

KINDS = ("ml-100k", "ml-1m", "ml-latest", "generic", "synthetic")

MOVIELENS_RATING = LabelSpec("rating", 1.0, 5.0)
MOVIELENS_LATEST_RATING = LabelSpec("rating", 0.5, 5.0)

MOVIELENS_USER_FIELDS = [
    AttributeField("gender"),
    AttributeField("age"),
    AttributeField("occupation"),
    AttributeField("zip_prefix"),
]
MOVIELENS_ITEM_FIELDS = [AttributeField("genres", multi_valued=True), AttributeField("year")]

# MovieLens-1M's age codes and their ranges (its README); ml-100k's exact ages are bucketed
# onto the same ranges so that both datasets share one vocabulary.
ML1M_AGE_BUCKETS = {
    "1": "under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "56+",
}

# MovieLens-1M README, "Occupation is chosen from the following choices".
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)

_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")
_ML100K_DATE = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")
_NO_GENRES = "(no genres listed)"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------------------------------
# Attribute buckets shared by the loaders (and the synthetic generator's vocabulary).


def age_bucket(age: int) -> str:
    """An exact age mapped onto MovieLens-1M's age ranges."""
    if age < 18:
        return "under 18"
    if age < 25:
        return "18-24"
    if age < 35:
        return "25-34"
    if age < 45:
        return "35-44"
    if age < 50:
        return "45-49"
    if age < 56:
        return "50-55"
    return "56+"


def year_bucket(year: int) -> str:
    """Release-year bucket: "pre-1930", decades to 1989, five-year spans from 1990.

    Most MovieLens films are recent, so recent years get finer buckets.
    """
    if year < 1930:
        return "pre-1930"
    if year < 1990:
        return f"{year // 10 * 10}s"
    start = year // 5 * 5
    return f"{start}-{start + 4}"


def _title_year(title: str) -> tuple[str, ...]:
    """The year bucket of "Title (1995)", or no value when the title carries no year."""
    match = _TITLE_YEAR.search(title)
    return (year_bucket(int(match.group(1))),) if match else ()


# ---------------------------------------------------------------------------------------
# Reading files.


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded; a missing, empty or undecodable file is a DataError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(str(path), "file not found") from None
    except IsADirectoryError:
        raise DataError(str(path), "is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            str(path), f"not valid {exc.encoding} text (byte 0x{raw[exc.start]:02x})", line
        ) from None
    if not text.strip():
        raise DataError(str(path), "file is empty")
    return text


def _delimited_lines(path: Path, separator: str, n_fields: int, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a headerless delimited file; blank lines are skipped."""
    text = _read_text(path, encoding)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split(separator)
        if len(parts) != n_fields:
            raise DataError(str(path), f"expected {n_fields} fields separated by {separator!r}, found {len(parts)}", number)
        yield number, parts


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the record starts, fields) of each non-blank CSV record."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(str(path), f"malformed CSV: {exc}", reader.line_num or start) from None
        end = reader.line_num
        if row:  # csv yields [] for a blank line
            yield start, row


def _csv_table(
    path: Path, required: Iterable[str], encoding: str = "utf-8-sig"
) -> tuple[int, list[str], Iterator[tuple[int, list[str]]]]:
    """The header line and header of a CSV file (checked for required columns), and its rows.

    Rows are checked for the header's number of fields as they are read.
    """
    text = _read_text(path, encoding)
    rows = _csv_rows(path, text)
    line, header = next(rows)  # _read_text refused a file with no content
    if len(set(header)) != len(header):
        repeated = sorted({name for name in header if header.count(name) > 1})
        raise DataError(str(path), f"repeated column(s) in header: {', '.join(repeated)}", line)
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(
            str(path), f"header lacks column(s) {', '.join(missing)} (header is {','.join(header)})", line
        )

    def checked() -> Iterator[tuple[int, list[str]]]:
        count = 0
        for number, row in rows:
            if len(row) != len(header):
                raise DataError(str(path), f"expected {len(header)} fields as in the header, found {len(row)}", number)
            count += 1
            yield number, row
        if count == 0:
            raise DataError(str(path), "has a header but no data rows")

    return line, header, checked()


def _integer(path: Path, line: int, what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(str(path), f"{what} {text!r} is not an integer", line) from None


def _warn_dropped(count: int, path: Path, what: str) -> None:
    if count:
        log.warning("dropped %d exact duplicate %s of %s", count, what, path)


# ---------------------------------------------------------------------------------------
# Interactions and attribute tables.


@dataclass
class _Interactions:
    """Checked interaction rows of one file, collected in the file's order."""

    path: Path
    label: LabelSpec
    label_step: float | None = None  # ratings must be multiples of this (None: any value)
    user_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    _seen: dict[tuple[str, str, int], tuple[float, int]] = field(default_factory=dict)
    _duplicates: int = 0

    def add(self, line: int, user: str, item: str, label_text: str, timestamp_text: str) -> None:
        """Check one row and keep it, unless it exactly repeats an earlier one."""
        path = str(self.path)
        if not user:
            raise DataError(path, "empty user id", line)
        if not item:
            raise DataError(path, "empty item id", line)
        try:
            value = float(label_text)
        except ValueError:
            raise DataError(path, f"label {label_text!r} is not a number", line) from None
        if not math.isfinite(value):
            raise DataError(path, f"label {label_text!r} is not a finite number", line)
        self._check_label(line, value, label_text)
        timestamp = _integer(self.path, line, "timestamp", timestamp_text)
        if not _INT64_MIN <= timestamp <= _INT64_MAX:
            raise DataError(path, f"timestamp {timestamp_text!r} is out of range", line)
        key = (user, item, timestamp)
        earlier = self._seen.get(key)
        if earlier is not None:
            if earlier[0] != value:
                raise DataError(
                    path,
                    f"user {user!r}, item {item!r} at timestamp {timestamp} has label {label_text!r} "
                    f"here and {earlier[0]:g} on line {earlier[1]}",
                    line,
                )
            self._duplicates += 1
            return
        self._seen[key] = (value, line)
        self.user_ids.append(user)
        self.item_ids.append(item)
        self.labels.append(value)
        self.timestamps.append(timestamp)

    def _check_label(self, line: int, value: float, text: str) -> None:
        if self.label.kind == "click":
            if value not in (0.0, 1.0):
                raise DataError(str(self.path), f"click label {text!r} is not 0 or 1", line)
            return
        if not self.label.min_value <= value <= self.label.max_value:
            raise DataError(
                str(self.path),
                f"rating {text!r} is outside [{self.label.min_value:g}, {self.label.max_value:g}]",
                line,
            )
        if self.label_step is not None and not (value / self.label_step).is_integer():
            raise DataError(str(self.path), f"rating {text!r} is not a multiple of {self.label_step:g}", line)

    def finish(self, name: str, users: AttributeTable, items: AttributeTable) -> Dataset:
        if not self.user_ids:
            raise DataError(str(self.path), "has no interactions")
        _warn_dropped(self._duplicates, self.path, "rows")
        return Dataset(
            name=name,
            label=self.label,
            user_ids=np.array(self.user_ids, dtype=object),
            item_ids=np.array(self.item_ids, dtype=object),
            labels=np.array(self.labels, dtype=np.float64),
            timestamps=np.array(self.timestamps, dtype=np.int64),
            users=users,
            items=items,
        )


class _TableBuilder:
    """Collects one attribute table; a repeated id is dropped if identical, an error if not."""

    def __init__(self, path: Path, fields: list[AttributeField]) -> None:
        self.path = path
        self.table = AttributeTable(fields=list(fields), values={})
        self._lines: dict[str, int] = {}
        self._duplicates = 0

    def add(self, line: int, entity: str, values: dict[str, tuple[str, ...]]) -> None:
        if not entity:
            raise DataError(str(self.path), "empty id", line)
        earlier = self.table.values.get(entity)
        if earlier is not None:
            if earlier != values:
                first = self._lines[entity]
                raise DataError(
                    str(self.path), f"id {entity!r} appears again with different attributes (first on line {first})", line
                )
            self._duplicates += 1
            return
        self.table.values[entity] = values
        self._lines[entity] = line

    def finish(self) -> AttributeTable:
        if not self.table.values:
            raise DataError(str(self.path), "has no rows")
        _warn_dropped(self._duplicates, self.path, "rows")
        return self.table


@dataclass(frozen=True)
class _Known:
    """An attribute table and the file it came from (for error messages)."""

    path: Path
    table: AttributeTable


def _one(value: str) -> tuple[str, ...]:
    """A single-valued attribute; an empty cell is a missing value."""
    return parse_values(value, "", multi_valued=False)


# ---------------------------------------------------------------------------------------
# MovieLens 100K.


def _ml_directory(path: str | Path, kind: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise DataError(str(directory), f"{kind} directory not found")
    if not directory.is_dir():
        raise DataError(str(directory), f"expected the {kind} directory, got a file")
    return directory


def _ml100k_genres(path: Path) -> list[str]:
    """Genre names of u.genre in flag order."""
    by_index: dict[int, str] = {}
    for line, (name, index_text) in _delimited_lines(path, "|", 2, "latin-1"):
        index = _integer(path, line, "genre index", index_text)
        if index in by_index:
            raise DataError(str(path), f"genre index {index} appears twice", line)
        by_index[index] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(str(path), f"genre indices are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _ml100k_users(path: Path) -> AttributeTable:
    builder = _TableBuilder(path, MOVIELENS_USER_FIELDS)
    for line, (user, age_text, gender, occupation, zip_code) in _delimited_lines(path, "|", 5, "latin-1"):
        _integer(path, line, "user id", user)
        age = _integer(path, line, "age", age_text)
        builder.add(
            line,
            user,
            {
                "gender": _one(gender),
                "age": (age_bucket(age),),
                "occupation": _one(occupation),
                "zip_prefix": _one(zip_code.strip()[:1]),
            },
        )
    return builder.finish()


def _ml100k_items(path: Path, genres: list[str]) -> AttributeTable:
    builder = _TableBuilder(path, MOVIELENS_ITEM_FIELDS)
    for line, parts in _delimited_lines(path, "|", 5 + len(genres), "latin-1"):
        item, release_date = parts[0], parts[2].strip()
        _integer(path, line, "item id", item)
        flags = parts[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(str(path), "genre flags must be 0 or 1", line)
        year: tuple[str, ...] = ()
        if release_date:
            match = _ML100K_DATE.match(release_date)
            if match is None:
                raise DataError(str(path), f"release date {release_date!r} is not like 01-Jan-1995", line)
            year = (year_bucket(int(match.group(1))),)
        builder.add(
            line,
            item,
            {"genres": tuple(name for name, flag in zip(genres, flags) if flag == "1"), "year": year},
        )
    return builder.finish()


def load_movielens_100k(path: str | Path) -> Dataset:
    """MovieLens 100K from its directory (u.data, u.user, u.item, u.genre)."""
    directory = _ml_directory(path, "ml-100k")
    users = _Known(directory / "u.user", _ml100k_users(directory / "u.user"))
    items = _Known(directory / "u.item", _ml100k_items(directory / "u.item", _ml100k_genres(directory / "u.genre")))
    ratings = directory / "u.data"
    interactions = _Interactions(ratings, MOVIELENS_RATING, label_step=1.0)
    for line, (user, item, rating, timestamp) in _delimited_lines(ratings, "\t", 4, "latin-1"):
        _check_movielens_ids(ratings, line, user, item, users, items)
        interactions.add(line, user, item, rating, timestamp)
    return interactions.finish("ml-100k", users.table, items.table)


def _check_movielens_ids(ratings: Path, line: int, user: str, item: str, users: _Known, items: _Known) -> None:
    """MovieLens ids are integers, and every one must be in the users / items file."""
    if user not in users.table.values:
        _integer(ratings, line, "user id", user)
        raise DataError(str(ratings), f"user {user!r} is not in {users.path}", line)
    if item not in items.table.values:
        _integer(ratings, line, "item id", item)
        raise DataError(str(ratings), f"item {item!r} is not in {items.path}", line)


# ---------------------------------------------------------------------------------------
# MovieLens 1M.


def _ml1m_users(path: Path) -> AttributeTable:
    builder = _TableBuilder(path, MOVIELENS_USER_FIELDS)
    for line, (user, gender, age_code, occupation_code, zip_code) in _delimited_lines(path, "::", 5, "latin-1"):
        _integer(path, line, "user id", user)
        age = ML1M_AGE_BUCKETS.get(age_code.strip())
        if age is None:
            raise DataError(str(path), f"age code {age_code!r} is not one of {', '.join(ML1M_AGE_BUCKETS)}", line)
        occupation = _integer(path, line, "occupation code", occupation_code)
        if not 0 <= occupation < len(ML1M_OCCUPATIONS):
            raise DataError(str(path), f"occupation code {occupation} is not in 0..{len(ML1M_OCCUPATIONS) - 1}", line)
        builder.add(
            line,
            user,
            {
                "gender": _one(gender),
                "age": (age,),
                "occupation": (ML1M_OCCUPATIONS[occupation],),
                "zip_prefix": _one(zip_code.strip()[:1]),
            },
        )
    return builder.finish()


def _split_genres(text: str) -> tuple[str, ...]:
    """`Action|Comedy` -> its genres; "(no genres listed)" and an empty cell mean none."""
    text = text.strip()
    if not text or text == _NO_GENRES:
        return ()
    return tuple(genre.strip() for genre in text.split("|") if genre.strip())


def _ml1m_items(path: Path) -> AttributeTable:
    builder = _TableBuilder(path, MOVIELENS_ITEM_FIELDS)
    for line, (item, title, genres) in _delimited_lines(path, "::", 3, "latin-1"):
        _integer(path, line, "item id", item)
        builder.add(line, item, {"genres": _split_genres(genres), "year": _title_year(title)})
    return builder.finish()


def load_movielens_1m(path: str | Path) -> Dataset:
    """MovieLens 1M from its directory (ratings.dat, users.dat, movies.dat)."""
    directory = _ml_directory(path, "ml-1m")
    users = _Known(directory / "users.dat", _ml1m_users(directory / "users.dat"))
    items = _Known(directory / "movies.dat", _ml1m_items(directory / "movies.dat"))
    ratings = directory / "ratings.dat"
    interactions = _Interactions(ratings, MOVIELENS_RATING, label_step=1.0)
    for line, (user, item, rating, timestamp) in _delimited_lines(ratings, "::", 4, "latin-1"):
        _check_movielens_ids(ratings, line, user, item, users, items)
        interactions.add(line, user, item, rating, timestamp)
    return interactions.finish("ml-1m", users.table, items.table)


# ---------------------------------------------------------------------------------------
# MovieLens latest (and latest-small, 20M, 25M, 32M: the same CSV layout).


def _ml_latest_items(path: Path) -> AttributeTable:
    _, header, rows = _csv_table(path, ("movieId", "title", "genres"))
    item_col, title_col, genres_col = (header.index(c) for c in ("movieId", "title", "genres"))
    builder = _TableBuilder(path, MOVIELENS_ITEM_FIELDS)
    for line, row in rows:
        _integer(path, line, "movieId", row[item_col])
        builder.add(line, row[item_col], {"genres": _split_genres(row[genres_col]), "year": _title_year(row[title_col])})
    return builder.finish()


def load_movielens_latest(path: str | Path) -> Dataset:
    """MovieLens "latest" layout from its directory (ratings.csv, movies.csv); no user attributes."""
    directory = _ml_directory(path, "ml-latest")
    items = _ml_latest_items(directory / "movies.csv")
    ratings = directory / "ratings.csv"
    _, header, rows = _csv_table(ratings, ("userId", "movieId", "rating", "timestamp"))
    user_col, item_col, rating_col, time_col = (header.index(c) for c in ("userId", "movieId", "rating", "timestamp"))
    interactions = _Interactions(ratings, MOVIELENS_LATEST_RATING, label_step=0.5)
    for line, row in rows:
        user, item = row[user_col], row[item_col]
        _integer(ratings, line, "userId", user)
        if item not in items.values:
            _integer(ratings, line, "movieId", item)
            raise DataError(str(ratings), f"item {item!r} is not in {directory / 'movies.csv'}", line)
        interactions.add(line, user, item, row[rating_col], row[time_col])
    return interactions.finish("ml-latest", AttributeTable(), items)


# ---------------------------------------------------------------------------------------
# Generic CSV.


def _generic_attributes(path: Path, id_column: str, multi_valued: set[str], separator: str) -> AttributeTable:
    """An attribute CSV with header `<id_column>,<field>...`."""
    header_line, header, rows = _csv_table(path, (id_column,))
    if header[0] != id_column:
        raise DataError(str(path), f"the first column must be {id_column!r}, found {header[0]!r}", header_line)
    names = header[1:]
    if not names:
        raise DataError(str(path), f"header has no attribute columns after {id_column!r}", header_line)
    if any(not name.strip() for name in names):
        raise DataError(str(path), "header has an unnamed column", header_line)
    fields = [AttributeField(name, multi_valued=name in multi_valued) for name in names]
    builder = _TableBuilder(path, fields)
    for line, row in rows:
        values: dict[str, tuple[str, ...]] = {}
        for spec, cell in zip(fields, row[1:]):
            values[spec.name] = parse_values(cell, separator, spec.multi_valued)  # as the service parses inline attributes
        builder.add(line, row[0], values)
    return builder.finish()


def load_generic(
    interactions_csv: str | Path,
    label: LabelSpec,
    user_attributes_csv: str | Path | None = None,
    item_attributes_csv: str | Path | None = None,
    multi_valued: Iterable[str] = (),
    separator: str = "|",
    name: str | None = None,
) -> Dataset:
    """Interactions CSV `user,item,label,timestamp` plus optional attribute CSVs.

    Ids are kept exactly as written. `label` is a rating in the declared range or a 0/1
    click; `timestamp` is integer seconds and required. Attribute CSVs have the header
    `user,<field>...` / `item,<field>...`; fields named in `multi_valued` hold several
    values joined by `separator`. When an attribute file is given, every user (item) of
    the interactions must be in it. UTF-8, with or without a byte-order mark.
    """
    if not isinstance(label, LabelSpec):
        raise ValueError(f"label must be a LabelSpec, got {label!r}")
    if not separator:
        raise ValueError("separator must not be empty")
    multi = set(multi_valued)
    interactions_path = Path(interactions_csv)
    users = AttributeTable()
    items = AttributeTable()
    if user_attributes_csv is not None:
        users = _generic_attributes(Path(user_attributes_csv), "user", multi, separator)
    if item_attributes_csv is not None:
        items = _generic_attributes(Path(item_attributes_csv), "item", multi, separator)
    unknown = multi - set(users.field_names()) - set(items.field_names())
    if unknown:
        raise ValueError(f"multi_valued names field(s) no attribute file has: {', '.join(sorted(unknown))}")

    columns = ("user", "item", "label", "timestamp")
    header_line, header, rows = _csv_table(interactions_path, columns)
    extra = [column for column in header if column not in columns]
    if extra:
        raise DataError(
            str(interactions_path), f"unexpected column(s) {', '.join(extra)}; expected {','.join(columns)}", header_line
        )
    user_col, item_col, label_col, time_col = (header.index(c) for c in columns)
    interactions = _Interactions(interactions_path, label)
    for line, row in rows:
        user, item = row[user_col], row[item_col]
        if user_attributes_csv is not None and user and user not in users.values:
            raise DataError(str(interactions_path), f"user {user!r} is not in {user_attributes_csv}", line)
        if item_attributes_csv is not None and item and item not in items.values:
            raise DataError(str(interactions_path), f"item {item!r} is not in {item_attributes_csv}", line)
        interactions.add(line, user, item, row[label_col], row[time_col].strip())
    return interactions.finish(name or interactions_path.stem, users, items)


# ---------------------------------------------------------------------------------------
# Dispatch.


def detect_kind(path: str | Path) -> str:
    """The kind of dataset a directory holds, recognised by its files."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(str(directory), "not a directory, cannot tell which dataset it holds")
    if (directory / "u.data").is_file():
        return "ml-100k"
    if (directory / "ratings.dat").is_file():
        return "ml-1m"
    if (directory / "ratings.csv").is_file() and (directory / "movies.csv").is_file():
        return "ml-latest"
    if (directory / "interactions.csv").is_file():
        return "generic"
    raise DataError(
        str(directory),
        "no known dataset here: expected u.data (ml-100k), ratings.dat (ml-1m), "
        "ratings.csv + movies.csv (ml-latest) or interactions.csv (generic)",
    )


def _load_generic_path(path: Path, options: dict[str, Any]) -> Dataset:
    """A generic CSV path: the interactions file, or a directory with the conventional names

    interactions.csv, users.csv and items.csv (the attribute files only where present).
    """
    if "label" not in options:
        raise ValueError("generic data needs label=LabelSpec(...) (a rating range or LabelSpec.click())")
    if path.is_dir():
        for option, filename in (("user_attributes_csv", "users.csv"), ("item_attributes_csv", "items.csv")):
            if option not in options and (path / filename).is_file():
                options[option] = path / filename
        options.setdefault("name", path.name)
        path = path / "interactions.csv"
    return load_generic(path, **options)


_MOVIELENS_LOADERS: dict[str, Callable[[str | Path], Dataset]] = {
    "ml-100k": load_movielens_100k,
    "ml-1m": load_movielens_1m,
    "ml-latest": load_movielens_latest,
}


def load_dataset(kind: str, path: str | Path | None = None, **options: Any) -> Dataset:
    """Load a dataset of the given kind: one of ml-100k, ml-1m, ml-latest, generic, synthetic.

    MovieLens kinds take the dataset's directory and no options; "generic" takes the
    interactions CSV (or a directory holding interactions.csv, users.csv, items.csv) and
    `load_generic`'s options; "synthetic" takes no path and `generate_synthetic`'s options.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "synthetic":
        if path is not None:
            raise ValueError(f"synthetic data is generated, not read: got path {str(path)!r}")
        return generate_synthetic(**options)
    if path is None:
        raise ValueError(f"dataset kind {kind!r} needs a path")
    if kind == "generic":
        return _load_generic_path(Path(path), dict(options))
    if options:
        raise ValueError(f"dataset kind {kind!r} takes no options, got {', '.join(sorted(options))}")
    return _MOVIELENS_LOADERS[kind](path)
