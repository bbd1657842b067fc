"""Loaders on tiny files written here, every kind of bad file, and the real ml-100k."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from training.data import (
    age_bucket,
    detect_kind,
    load_dataset,
    load_generic,
    load_movielens_100k,
    load_movielens_1m,
    load_movielens_latest,
    year_bucket,
)
from training.dataset import DataError, Dataset, LabelSpec

ML100K_DIR = Path(__file__).parents[3] / "shared/data/ml-100k"

# --- tiny MovieLens 100K: 3 users, 5 items (item 5 unrated), 5 ratings -----------------

ML100K_GENRE = "unknown|0\nAction|1\nComedy|2\nDrama|3\n\n"
ML100K_USER = "1|24|M|technician|85711\n2|17|F|student|T8H1N\n3|56|M|retired|\n"
ML100K_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1|0\n"
    "2|Amélie (2001)|01-Jan-2001||http://x|0|0|1|1\n"
    "3|Star Wars (1977)|01-Jan-1977||http://x|0|1|0|0\n"
    "4|unknown||||1|0|0|0\n"
    "5|Nosferatu (1922)|01-Jan-1922||http://x|0|0|0|1\n"
)
ML100K_DATA = "1\t1\t5\t881250949\n1\t3\t4\t881250950\n2\t2\t3\t881250951\n3\t4\t1\t881250952\n2\t1\t2\t881250953\n"


def write_ml100k(root: Path, **files: str | None) -> Path:
    """The tiny ml-100k directory; a keyword (u_data=...) replaces a file, None leaves it out."""
    contents = {"u.genre": ML100K_GENRE, "u.user": ML100K_USER, "u.item": ML100K_ITEM, "u.data": ML100K_DATA}
    contents.update({name.replace("_", "."): text for name, text in files.items()})
    root.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        if text is not None:
            (root / name).write_bytes(text.encode("latin-1"))
    return root


ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::0::V3N4P\n"
ML1M_MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "3::Citizen Kane (1941)::Drama\n"
    "4::Unrated Film (2000)::Drama|Thriller\n"
)
ML1M_RATINGS = "1::1::5::978300760\n1::3::3::978302109\n2::2::4::978301968\n3::1::1::978300275\n"


def write_ml1m(root: Path, **files: str | None) -> Path:
    contents = {"users.dat": ML1M_USERS, "movies.dat": ML1M_MOVIES, "ratings.dat": ML1M_RATINGS}
    contents.update({name.replace("_", "."): text for name, text in files.items()})
    root.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        if text is not None:
            (root / name).write_bytes(text.encode("latin-1"))
    return root


ML_LATEST_MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    '42,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)  ",Comedy|Romance\n'
    "99,Untitled,(no genres listed)\n"
)
ML_LATEST_RATINGS = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,11,3.5,964981247\n"
    "2,42,0.5,964982224\n"
    "2,1,5.0,964983815\n"
)


def write_ml_latest(root: Path, **files: str | bytes | None) -> Path:
    contents: dict[str, str | bytes | None] = {"movies.csv": ML_LATEST_MOVIES, "ratings.csv": ML_LATEST_RATINGS}
    contents.update({name.replace("_", "."): text for name, text in files.items()})
    root.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        if text is not None:
            (root / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


GENERIC_INTERACTIONS = "user,item,label,timestamp\nalice,song-1,4,100\nalice,song-2,2,200\nbob,song-1,5,150\n"
GENERIC_USERS = "user,country,plan\nalice,FR,free\nbob,,premium\n"
GENERIC_ITEMS = "item,tags,artist\nsong-1,rock|indie,A\nsong-2,,B\nsong-3,jazz | blues,C\n"


def write_text(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def assert_data_error(load: Callable[[], object], path: Path, line: int | None, fragment: str) -> DataError:
    """The load fails with one DataError naming the file, the line and the problem."""
    with pytest.raises(DataError) as info:
        load()
    error = info.value
    assert error.path == str(path)
    assert error.line == line
    assert fragment in error.problem
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(error).startswith(where + ": ")
    return error


# --- buckets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("year", "bucket"),
    [(1895, "pre-1930"), (1929, "pre-1930"), (1930, "1930s"), (1977, "1970s"), (1989, "1980s"),
     (1990, "1990-1994"), (1994, "1990-1994"), (1995, "1995-1999"), (2004, "2000-2004"), (2023, "2020-2024")],
)
def test_year_bucket(year: int, bucket: str) -> None:
    assert year_bucket(year) == bucket


@pytest.mark.parametrize(
    ("age", "bucket"),
    [(7, "under 18"), (17, "under 18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (44, "35-44"),
     (45, "45-49"), (50, "50-55"), (55, "50-55"), (56, "56+"), (73, "56+")],
)
def test_age_bucket_matches_movielens_1m_ranges(age: int, bucket: str) -> None:
    assert age_bucket(age) == bucket


# --- MovieLens 100K --------------------------------------------------------------------


def test_ml100k_loads_interactions_and_attributes(tmp_path: Path) -> None:
    data = load_movielens_100k(write_ml100k(tmp_path))

    assert data.name == "ml-100k"
    assert data.label == LabelSpec("rating", 1.0, 5.0)
    assert list(data.user_ids) == ["1", "1", "2", "3", "2"]
    assert list(data.item_ids) == ["1", "3", "2", "4", "1"]
    assert data.labels.dtype == np.float64 and list(data.labels) == [5, 4, 3, 1, 2]
    assert data.timestamps.dtype == np.int64 and data.timestamps[0] == 881250949

    assert data.users.field_names() == ["gender", "age", "occupation", "zip_prefix"]
    assert data.users.get("1") == {
        "gender": ("M",), "age": ("18-24",), "occupation": ("technician",), "zip_prefix": ("8",)
    }
    assert data.users.get("2")["age"] == ("under 18",)
    assert data.users.get("2")["zip_prefix"] == ("T",)
    assert data.users.get("3")["age"] == ("56+",)
    assert data.users.get("3")["zip_prefix"] == ()

    assert data.items.field_names() == ["genres", "year"]
    assert [f.multi_valued for f in data.items.fields] == [True, False]
    assert set(data.items.values) == {"1", "2", "3", "4", "5"}  # item 5 is rated by no one
    assert data.items.get("1") == {"genres": ("Comedy",), "year": ("1995-1999",)}
    assert data.items.get("2") == {"genres": ("Comedy", "Drama"), "year": ("2000-2004",)}
    assert data.items.get("3")["year"] == ("1970s",)
    assert data.items.get("4") == {"genres": ("unknown",), "year": ()}  # no release date
    assert data.items.get("5")["year"] == ("pre-1930",)


@pytest.mark.parametrize(
    ("file", "text", "line", "fragment"),
    [
        ("u.data", None, None, "file not found"),
        ("u.data", "", None, "file is empty"),
        ("u.data", "\n  \n", None, "file is empty"),
        ("u.data", "1\t1\t5\t881250949\n1\t3\t4\n", 2, "expected 4 fields"),
        ("u.data", "1\t1\t5\t881250949\n\n1\t3\tfour\t881250950\n", 3, "label 'four' is not a number"),
        ("u.data", "1\t1\t6\t881250949\n", 1, "outside [1, 5]"),
        ("u.data", "1\t1\t0\t881250949\n", 1, "outside [1, 5]"),
        ("u.data", "1\t1\t3.5\t881250949\n", 1, "not a multiple of 1"),
        ("u.data", "1\t1\tnan\t881250949\n", 1, "not a finite number"),
        ("u.data", "1\t1\t5\tyesterday\n", 1, "timestamp 'yesterday' is not an integer"),
        ("u.data", "one\t1\t5\t881250949\n", 1, "user id 'one' is not an integer"),
        ("u.data", "1\t99\t5\t881250949\n", 1, "item '99' is not in"),
        ("u.data", "1\t1\t5\t881250949\n7\t1\t5\t881250949\n", 2, "user '7' is not in"),
        ("u.data", "1\t1\t5\t881250949\n2\t1\t4\t1\n1\t1\t3\t881250949\n", 3, "here and 5 on line 1"),
        ("u.user", "1|24|M|technician|85711\n2|old|F|student|T8H1N\n", 2, "age 'old' is not an integer"),
        ("u.user", "1|24|M|technician\n", 1, "expected 5 fields"),
        ("u.user", "1|24|M|technician|85711\n1|30|M|technician|85711\n", 2, "different attributes"),
        ("u.item", ML100K_ITEM + "6|X (1990)|01-Jan-1990||u|0|0|1\n", 6, "expected 9 fields"),
        ("u.item", "1|Toy Story (1995)|01-Jan-1995||u|0|0|2|0\n", 1, "genre flags must be 0 or 1"),
        ("u.item", "1|Toy Story (1995)|1995-01-01||u|0|0|1|0\n", 1, "release date '1995-01-01'"),
        ("u.genre", "unknown|0\nAction|one\n", 2, "genre index 'one' is not an integer"),
        ("u.genre", "unknown|0\nAction|2\n", None, "genre indices are not 0..1"),
    ],
)
def test_ml100k_bad_files(tmp_path: Path, file: str, text: str | None, line: int | None, fragment: str) -> None:
    root = write_ml100k(tmp_path, **{file.replace(".", "_"): text})
    error = assert_data_error(lambda: load_movielens_100k(root), root / file, line, fragment)
    if "is not in" in fragment:
        assert "u.user" in error.problem or "u.item" in error.problem


def test_ml100k_missing_directory(tmp_path: Path) -> None:
    assert_data_error(lambda: load_movielens_100k(tmp_path / "nowhere"), tmp_path / "nowhere", None, "not found")


def test_ml100k_exact_duplicates_dropped_with_one_counted_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = ML100K_DATA.splitlines(keepends=True)
    root = write_ml100k(tmp_path, u_data="".join(lines + [lines[0], lines[2], lines[0]]))
    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load_movielens_100k(root)
    assert len(data) == len(lines)
    warnings = [r for r in caplog.records if r.name == "training.data"]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == f"dropped 3 exact duplicate rows of {root / 'u.data'}"


def test_ml100k_same_user_and_item_at_another_time_is_kept(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path, u_data=ML100K_DATA + "1\t1\t2\t999999999\n")
    assert len(load_movielens_100k(root)) == 6


# --- MovieLens 1M ----------------------------------------------------------------------


def test_ml1m_loads_interactions_and_attributes(tmp_path: Path) -> None:
    data = load_movielens_1m(write_ml1m(tmp_path))

    assert data.name == "ml-1m"
    assert len(data) == 4 and list(data.labels) == [5, 3, 4, 1]
    assert data.users.field_names() == ["gender", "age", "occupation", "zip_prefix"]
    assert data.users.get("1") == {
        "gender": ("F",), "age": ("under 18",), "occupation": ("K-12 student",), "zip_prefix": ("4",)
    }
    assert data.users.get("2")["age"] == ("56+",)
    assert data.users.get("2")["occupation"] == ("self-employed",)
    assert data.users.get("3")["occupation"] == ("other",)
    assert data.users.get("3")["zip_prefix"] == ("V",)
    assert data.items.get("1") == {"genres": ("Animation", "Children's", "Comedy"), "year": ("1995-1999",)}
    assert data.items.get("3")["year"] == ("1940s",)
    assert "4" in data.items.values  # unrated


@pytest.mark.parametrize(
    ("file", "text", "line", "fragment"),
    [
        ("users.dat", "1::F::1::10::48067\n2::M::30::16::70072\n", 2, "age code '30'"),
        ("users.dat", "1::F::1::21::48067\n", 1, "occupation code 21 is not in 0..20"),
        ("users.dat", "1::F::1::48067\n", 1, "expected 5 fields"),
        ("movies.dat", "1::Toy Story (1995)\n", 1, "expected 3 fields"),
        ("ratings.dat", "1::1::5::978300760\n1::4::9::978302109\n", 2, "outside [1, 5]"),
        ("ratings.dat", "1::1::5::978300760\n1::8::3::978302109\n", 2, "item '8' is not in"),
        ("ratings.dat", "", None, "file is empty"),
    ],
)
def test_ml1m_bad_files(tmp_path: Path, file: str, text: str, line: int | None, fragment: str) -> None:
    root = write_ml1m(tmp_path, **{file.replace(".", "_"): text})
    assert_data_error(lambda: load_movielens_1m(root), root / file, line, fragment)


# --- MovieLens latest ------------------------------------------------------------------


def test_ml_latest_loads_half_stars_quoted_titles_and_no_users(tmp_path: Path) -> None:
    data = load_movielens_latest(write_ml_latest(tmp_path))

    assert data.name == "ml-latest"
    assert data.label == LabelSpec("rating", 0.5, 5.0)
    assert list(data.labels) == [4.0, 3.5, 0.5, 5.0]
    assert list(data.item_ids) == ["1", "11", "42", "1"]
    assert data.users.fields == [] and data.users.values == {}
    assert data.items.field_names() == ["genres", "year"]
    assert data.items.get("11") == {"genres": ("Comedy", "Drama", "Romance"), "year": ("1995-1999",)}
    assert data.items.get("42")["year"] == ("2000-2004",)  # year before trailing spaces
    assert data.items.get("99") == {"genres": (), "year": ()}


def test_ml_latest_line_numbers_are_physical_across_multiline_fields(tmp_path: Path) -> None:
    movies = ML_LATEST_MOVIES + '7,"Two\nLines (1999)",Drama\nx,Broken (2000),Drama\n'
    root = write_ml_latest(tmp_path, movies_csv=movies)
    assert_data_error(lambda: load_movielens_latest(root), root / "movies.csv", 8, "movieId 'x' is not an integer")


@pytest.mark.parametrize(
    ("file", "text", "line", "fragment"),
    [
        ("ratings.csv", ML_LATEST_RATINGS + "3,1,0.25,964982703\n", 6, "outside [0.5, 5]"),
        ("ratings.csv", ML_LATEST_RATINGS + "3,1,4.2,964982703\n", 6, "not a multiple of 0.5"),
        ("ratings.csv", ML_LATEST_RATINGS + "3,1,4.0\n", 6, "expected 4 fields"),
        ("ratings.csv", "userId,movieId,rating\n1,1,4.0\n", 1, "lacks column(s) timestamp"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", None, "no data rows"),
        ("ratings.csv", ML_LATEST_RATINGS + "3,12345,4.0,964982703\n", 6, "item '12345' is not in"),
        ("ratings.csv", ML_LATEST_RATINGS + "3,1,4.0,964982703\n3,1,3.0,964982703\n", 7, "on line 6"),
        ("movies.csv", "movieId,title,genres\n1,\"Unclosed (1995),Drama\n", 2, "malformed CSV"),
        ("movies.csv", ML_LATEST_MOVIES.encode("utf-8") + b"5,Caf\xe9 (1999),Drama\n", 6, "not valid utf-8"),
        ("movies.csv", None, None, "file not found"),
    ],
)
def test_ml_latest_bad_files(tmp_path: Path, file: str, text: str | bytes | None, line: int | None, fragment: str) -> None:
    root = write_ml_latest(tmp_path, **{file.replace(".", "_"): text})
    assert_data_error(lambda: load_movielens_latest(root), root / file, line, fragment)


def test_ml_latest_100k_rows_load_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_items = 2000
    movies = "movieId,title,genres\n" + "".join(
        f'{i},"Film {i}, The ({1950 + i % 70})",Drama|Comedy\n' for i in range(n_items)
    )
    users, items = rng.integers(1, 600, 100_000), rng.integers(0, n_items, 100_000)
    stars = rng.integers(1, 11, 100_000) / 2
    ratings = "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{s},{1_000_000 + t}\n" for t, (u, i, s) in enumerate(zip(users, items, stars))
    )
    root = write_ml_latest(tmp_path, movies_csv=movies, ratings_csv=ratings)
    data = load_movielens_latest(root)
    assert len(data) == 100_000 and len(data.items.values) == n_items


# --- generic CSV -----------------------------------------------------------------------


def test_generic_loads_ratings_with_attribute_tables(tmp_path: Path) -> None:
    data = load_generic(
        write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS),
        LabelSpec("rating", 1, 5),
        user_attributes_csv=write_text(tmp_path / "users.csv", GENERIC_USERS),
        item_attributes_csv=write_text(tmp_path / "items.csv", GENERIC_ITEMS),
        multi_valued=["tags"],
    )
    assert data.name == "log"
    assert list(data.user_ids) == ["alice", "alice", "bob"]
    assert list(data.item_ids) == ["song-1", "song-2", "song-1"]
    assert list(data.timestamps) == [100, 200, 150]
    assert data.users.field_names() == ["country", "plan"]
    assert data.users.get("bob") == {"country": (), "plan": ("premium",)}
    assert [(f.name, f.multi_valued) for f in data.items.fields] == [("tags", True), ("artist", False)]
    assert data.items.get("song-1")["tags"] == ("rock", "indie")
    assert data.items.get("song-2")["tags"] == ()
    assert data.items.get("song-3")["tags"] == ("jazz", "blues")  # unrated, still listed


def test_generic_clicks_with_bom_crlf_and_columns_in_any_order(tmp_path: Path) -> None:
    text = "\ufefftimestamp,label,item,user\r\n10,1,a,u1\r\n11,0,b,u1\r\n12,1.0,a,u2\r\n"
    data = load_generic(write_text(tmp_path / "clicks.csv", text), LabelSpec.click(), name="clicks")
    assert data.name == "clicks"
    assert data.label.kind == "click"
    assert list(data.labels) == [1.0, 0.0, 1.0]
    assert list(data.user_ids) == ["u1", "u1", "u2"]
    assert data.users.values == {} and data.items.values == {}


@pytest.mark.parametrize(
    ("text", "label", "line", "fragment"),
    [
        ("user,item,label,timestamp\nu,a,2,1\n", LabelSpec.click(), 2, "click label '2' is not 0 or 1"),
        ("user,item,label,timestamp\nu,a,0.5,1\n", LabelSpec.click(), 2, "not 0 or 1"),
        ("user,item,label,timestamp\nu,a,1,1\nu,b,11,2\n", LabelSpec("rating", 1, 10), 3, "outside [1, 10]"),
        ("user,item,label,timestamp\nu,a,1,\n", LabelSpec.click(), 2, "timestamp '' is not an integer"),
        ("user,item,label,timestamp\nu,a,1,1.5\n", LabelSpec.click(), 2, "timestamp '1.5' is not an integer"),
        ("user,item,label,timestamp\nu,a,1,99999999999999999999\n", LabelSpec.click(), 2, "out of range"),
        ("user,item,label,timestamp\nu,a,1,1\nv,b,1,2\nu,a,0,1\n", LabelSpec.click(), 4, "here and 1 on line 2"),
        ("user,item,label,timestamp\n,a,1,1\n", LabelSpec.click(), 2, "empty user id"),
        ("user,item,label\nu,a,1\n", LabelSpec.click(), 1, "lacks column(s) timestamp"),
        ("user,item,rating,timestamp\nu,a,1,1\n", LabelSpec.click(), 1, "lacks column(s) label"),
        ("user,item,label,timestamp,extra\nu,a,1,1,x\n", LabelSpec.click(), 1, "unexpected column(s) extra"),
        ("user,item,label,timestamp,user\nu,a,1,1,u\n", LabelSpec.click(), 1, "repeated column(s) in header: user"),
        ("user,item,label,timestamp\nu,a,1,1,9\n", LabelSpec.click(), 2, "expected 4 fields"),
        ("user,item,label,timestamp\n", LabelSpec.click(), None, "no data rows"),
        ("", LabelSpec.click(), None, "file is empty"),
        ("\ufeff", LabelSpec.click(), None, "file is empty"),
        (b"user,item,label,timestamp\nu,a,1,1\nu,\xff,1,2\n", LabelSpec.click(), 3, "not valid utf-8"),
    ],
)
def test_generic_bad_interactions(
    tmp_path: Path, text: str | bytes, label: LabelSpec, line: int | None, fragment: str
) -> None:
    path = write_text(tmp_path / "log.csv", text)
    assert_data_error(lambda: load_generic(path, label), path, line, fragment)


def test_generic_interaction_with_item_absent_from_item_file(tmp_path: Path) -> None:
    log = write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS + "bob,song-9,3,300\n")
    items = write_text(tmp_path / "items.csv", GENERIC_ITEMS)
    error = assert_data_error(
        lambda: load_generic(log, LabelSpec("rating", 1, 5), item_attributes_csv=items, multi_valued=["tags"]),
        log,
        5,
        "item 'song-9' is not in",
    )
    assert str(items) in error.problem


def test_generic_interaction_with_user_absent_from_user_file(tmp_path: Path) -> None:
    log = write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS + "carol,song-1,3,300\n")
    users = write_text(tmp_path / "users.csv", GENERIC_USERS)
    assert_data_error(
        lambda: load_generic(log, LabelSpec("rating", 1, 5), user_attributes_csv=users), log, 5, "user 'carol' is not in"
    )


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("id,tags,artist\nsong-1,rock,A\n", 1, "lacks column(s) item"),
        ("artist,item\nA,song-1\n", 1, "first column must be 'item'"),
        ("item\nsong-1\n", 1, "no attribute columns"),
        ("item,tags,artist\nsong-1,rock,A\nsong-1,jazz,A\n", 3, "different attributes (first on line 2)"),
        ("item,tags,artist\nsong-1,rock\n", 2, "expected 3 fields"),
    ],
)
def test_generic_bad_attribute_files(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    log = write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS)
    items = write_text(tmp_path / "items.csv", text)
    assert_data_error(
        lambda: load_generic(log, LabelSpec("rating", 1, 5), item_attributes_csv=items), items, line, fragment
    )


def test_generic_duplicate_attribute_rows_and_interactions_warn_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS + "alice,song-1,4,100\n")
    items = write_text(tmp_path / "items.csv", GENERIC_ITEMS + "song-1,rock|indie,A\nsong-1,rock|indie,A\n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load_generic(log, LabelSpec("rating", 1, 5), item_attributes_csv=items, multi_valued=["tags"])
    assert len(data) == 3 and len(data.items.values) == 3
    assert sorted(r.getMessage() for r in caplog.records if r.name == "training.data") == [
        f"dropped 1 exact duplicate rows of {log}",
        f"dropped 2 exact duplicate rows of {items}",
    ]


def test_generic_rejects_bad_options(tmp_path: Path) -> None:
    log = write_text(tmp_path / "log.csv", GENERIC_INTERACTIONS)
    with pytest.raises(ValueError, match="multi_valued names field"):
        load_generic(log, LabelSpec("rating", 1, 5), multi_valued=["tags"])
    with pytest.raises(ValueError, match="label must be a LabelSpec"):
        load_generic(log, "rating")  # type: ignore[arg-type]


# --- dispatch --------------------------------------------------------------------------


def test_detect_kind_recognises_each_layout(tmp_path: Path) -> None:
    assert detect_kind(write_ml100k(tmp_path / "a")) == "ml-100k"
    assert detect_kind(write_ml1m(tmp_path / "b")) == "ml-1m"
    assert detect_kind(write_ml_latest(tmp_path / "c")) == "ml-latest"
    (tmp_path / "d").mkdir()
    write_text(tmp_path / "d/interactions.csv", GENERIC_INTERACTIONS)
    assert detect_kind(tmp_path / "d") == "generic"
    (tmp_path / "e").mkdir()
    write_text(tmp_path / "e/ratings.csv", ML_LATEST_RATINGS)  # no movies.csv beside it
    assert_data_error(lambda: detect_kind(tmp_path / "e"), tmp_path / "e", None, "no known dataset here")


def test_load_dataset_dispatches_on_kind(tmp_path: Path) -> None:
    assert load_dataset("ml-100k", write_ml100k(tmp_path / "a")).name == "ml-100k"
    assert load_dataset("ml-1m", str(write_ml1m(tmp_path / "b"))).name == "ml-1m"
    assert load_dataset("ml-latest", write_ml_latest(tmp_path / "c")).name == "ml-latest"
    synthetic = load_dataset("synthetic", seed=3, n_users=20, n_items=40)
    assert isinstance(synthetic, Dataset) and synthetic.name == "synthetic"

    directory = tmp_path / "music"
    directory.mkdir()
    write_text(directory / "interactions.csv", GENERIC_INTERACTIONS)
    write_text(directory / "users.csv", GENERIC_USERS)
    write_text(directory / "items.csv", GENERIC_ITEMS)
    generic = load_dataset("generic", directory, label=LabelSpec("rating", 1, 5), multi_valued=["tags"])
    assert generic.name == "music"
    assert generic.users.field_names() == ["country", "plan"]
    assert generic.items.get("song-1")["tags"] == ("rock", "indie")
    single = load_dataset("generic", directory / "interactions.csv", label=LabelSpec("rating", 1, 5))
    assert single.name == "interactions" and single.items.values == {}


def test_load_dataset_refuses_unknown_kinds_and_misplaced_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset kind 'ml-10m'; expected one of ml-100k, ml-1m"):
        load_dataset("ml-10m", tmp_path)
    with pytest.raises(ValueError, match="takes no options"):
        load_dataset("ml-100k", write_ml100k(tmp_path / "a"), seed=1)
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("ml-1m")
    with pytest.raises(ValueError, match="generated, not read"):
        load_dataset("synthetic", tmp_path)
    with pytest.raises(ValueError, match="generic data needs label"):
        load_dataset("generic", tmp_path / "log.csv")


# --- the real MovieLens 100K -----------------------------------------------------------


@pytest.mark.skipif(not ML100K_DIR.is_dir(), reason=f"MovieLens 100K not found at {ML100K_DIR} (download it there to run)")
def test_real_ml100k() -> None:
    data = load_movielens_100k(ML100K_DIR)
    assert len(data) == 100_000
    assert len(set(data.user_ids)) == 943 and len(data.users.values) == 943
    assert len(set(data.item_ids)) == 1682 and len(data.items.values) == 1682
    assert data.users.field_names() == ["gender", "age", "occupation", "zip_prefix"]
    assert data.items.field_names() == ["genres", "year"]
    assert set(np.unique(data.labels)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert data.items.get("267") == {"genres": ("unknown",), "year": ()}  # the film with no date
    assert detect_kind(ML100K_DIR) == "ml-100k"
