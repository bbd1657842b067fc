"""Feature schema and encoding on hand-built attribute tables, every code stated by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.dataset import AttributeField, AttributeTable, Dataset, LabelSpec
from training.features import (
    FIRST_CODE,
    ITEM_ID_FIELD,
    OOV,
    PAD,
    FeatureSchema,
    Field,
    build_schema,
    encode_users,
)

# Users: one single-valued field (age), one multi-valued field (langs, widest row = 3).
USERS = AttributeTable(
    fields=[AttributeField("age"), AttributeField("langs", multi_valued=True)],
    values={
        "u1": {"age": ("25-34",), "langs": ("fr", "en")},
        "u2": {"age": ("18-24",), "langs": ("de",)},
        "u3": {"age": ("56+",), "langs": ("it", "en", "de")},
        "u4": {"age": (), "langs": ()},  # nothing known about u4
    },
)
# Items: genres (multi-valued, widest row = 3) and year. i4 has no interaction at all and
# is the only item with the genre "western" and the year "1950s".
ITEMS = AttributeTable(
    fields=[AttributeField("genres", multi_valued=True), AttributeField("year")],
    values={
        "i1": {"genres": ("drama",), "year": ("1990s",)},
        "i2": {"genres": ("comedy", "action"), "year": ("2000s",)},
        "i3": {"genres": ("drama", "comedy", "action"), "year": ("1990s",)},
        "i4": {"genres": ("western",), "year": ("1950s",)},
    },
)


def make_dataset(users: AttributeTable = USERS, items: AttributeTable = ITEMS) -> Dataset:
    return Dataset(
        name="tiny",
        label=LabelSpec("rating", 1.0, 5.0),
        user_ids=np.array(["u1", "u1", "u2", "u3"], dtype=object),
        item_ids=np.array(["i1", "i2", "i3", "i1"], dtype=object),
        labels=np.array([4.0, 3.0, 5.0, 1.0]),
        timestamps=np.array([10, 20, 30, 40], dtype=np.int64),
        users=users,
        items=items,
    )


def field_by_name(fields, name: str) -> Field:
    (match,) = [f for f in fields if f.name == name]
    return match


# --- codes --------------------------------------------------------------------------


def test_codes_are_padding_oov_then_vocabulary_order():
    f = Field("genre", "item", multi_valued=False, width=1, offset=0, vocabulary=("action", "comedy", "drama"))
    assert (PAD, OOV, FIRST_CODE) == (0, 1, 2)
    assert [f.code(v) for v in ("action", "comedy", "drama")] == [2, 3, 4]
    assert f.code("western") == OOV
    assert f.num_codes == 5  # padding, OOV, three values
    assert f.encode([]) == ([PAD], 0)
    assert f.encode(["comedy"]) == ([3], 0)
    assert f.encode(["western"]) == ([OOV], 0)


def test_multi_valued_encode_sorts_dedupes_pads_and_truncates():
    f = Field("genres", "item", multi_valued=True, width=3, offset=0, vocabulary=("action", "comedy", "drama", "horror"))
    # Sorted by value, duplicates removed, padded on the right.
    assert f.encode(["drama", "action", "drama"]) == ([2, 4, PAD], 0)
    # Four distinct values into three slots: the first three in sorted order stay.
    assert f.encode(["horror", "drama", "comedy", "action"]) == ([2, 3, 4], 1)
    # An unknown value takes its sorted place as OOV ("zombie" sorts last, so it is dropped).
    assert f.encode(["zombie", "horror", "drama", "comedy"]) == ([3, 4, 5], 1)
    assert f.encode(["action", "aardvark"]) == ([OOV, 2, PAD], 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"multi_valued": True, "width": 0, "vocabulary": ("a",)}, "width must be >= 1"),
        ({"multi_valued": False, "width": 2, "vocabulary": ("a",)}, "single-valued field has width 1"),
        ({"multi_valued": False, "width": 1, "vocabulary": ("a", "b", "a")}, "duplicate"),
    ],
)
def test_field_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Field("f", "item", offset=0, **kwargs)


# --- build_schema --------------------------------------------------------------------


def test_schema_layout_widths_offsets_and_vocabularies():
    schema = build_schema(make_dataset(), ["i1", "i2", "i3"])
    assert [f.name for f in schema.user_fields] == ["age", "langs"]
    assert [f.name for f in schema.item_fields] == [ITEM_ID_FIELD, "genres", "year"]

    age, langs = schema.user_fields
    assert (age.multi_valued, age.width, age.offset) == (False, 1, 0)
    assert (langs.multi_valued, langs.width, langs.offset) == (True, 3, 1)  # u3 speaks three
    assert age.vocabulary == ("18-24", "25-34", "56+")
    assert langs.vocabulary == ("de", "en", "fr", "it")
    assert schema.user_width == 4

    item_id, genres, year = schema.item_fields
    assert (item_id.width, item_id.offset) == (1, 0)
    assert (genres.width, genres.offset) == (3, 1)  # i3 has three genres
    assert (year.width, year.offset) == (1, 4)
    assert schema.item_width == 5
    assert schema.item_id_field == item_id
    assert all(f.side == "user" for f in schema.user_fields)
    assert all(f.side == "item" for f in schema.item_fields)


def test_attribute_vocabularies_come_from_the_tables_item_ids_from_training_only():
    schema = build_schema(make_dataset(), ["i1", "i2"])  # i3 held out, i4 never interacted
    item_id, genres, year = schema.item_fields
    assert item_id.vocabulary == ("i1", "i2")
    # i4 has no interaction, yet its genre and year are in the vocabularies.
    assert genres.vocabulary == ("action", "comedy", "drama", "western")
    assert year.vocabulary == ("1950s", "1990s", "2000s")
    # A new item: its id is out of vocabulary, its attributes are known.
    assert schema.encode_item("i3", ITEMS.get("i3")).tolist() == [OOV, 2, 3, 4, 3]
    assert schema.encode_item("i4", ITEMS.get("i4")).tolist() == [OOV, 5, PAD, PAD, 2]
    assert schema.encode_item("i2", ITEMS.get("i2")).tolist() == [3, 2, 3, PAD, 4]
    assert schema.encode_item("i1", {}).tolist() == [2, PAD, PAD, PAD, PAD]


def test_item_ids_are_sorted_as_strings_and_deduplicated():
    schema = build_schema(make_dataset(), ["i2", "i1", "i2"])
    assert schema.item_id_field.vocabulary == ("i1", "i2")


def test_without_item_id_there_is_no_item_id_field():
    schema = build_schema(make_dataset(), ["i1", "i2"], use_item_id=False)
    assert schema.item_id_field is None
    assert [f.name for f in schema.item_fields] == ["genres", "year"]
    assert [f.offset for f in schema.item_fields] == [0, 3]
    # The id is ignored: two items with the same attributes encode the same.
    assert schema.encode_item("i1", ITEMS.get("i3")).tolist() == schema.encode_item("zzz", ITEMS.get("i3")).tolist()


def test_max_multi_width_caps_the_width_and_truncates_sorted_values():
    schema = build_schema(make_dataset(), ["i1"], max_multi_width=2)
    genres = field_by_name(schema.item_fields, "genres")
    langs = field_by_name(schema.user_fields, "langs")
    assert genres.width == 2 and langs.width == 2
    assert field_by_name(schema.item_fields, "year").offset == 1 + 2
    # i3: action, comedy, drama -> the first two in sorted order.
    assert schema.encode_item("i3", ITEMS.get("i3")).tolist() == [OOV, 2, 3, 3]
    # u3: de, en, it -> de, en.
    assert schema.encode_user(USERS.get("u3")).tolist() == [4, 2, 3]


def test_a_multi_valued_field_of_single_values_gets_width_one():
    items = AttributeTable(
        fields=[AttributeField("genres", multi_valued=True)],
        values={"i1": {"genres": ("drama",)}, "i2": {"genres": ()}, "i3": {"genres": ("comedy",)}},
    )
    schema = build_schema(make_dataset(items=items), ["i1"], use_item_id=False)
    (genres,) = schema.item_fields
    assert genres.multi_valued and genres.width == 1


def test_exclude_fields():
    schema = build_schema(make_dataset(), ["i1"], exclude_user_fields=["langs"], exclude_item_fields=["genres"])
    assert [f.name for f in schema.user_fields] == ["age"]
    assert [f.name for f in schema.item_fields] == [ITEM_ID_FIELD, "year"]
    assert schema.user_width == 1 and schema.item_width == 2
    assert field_by_name(schema.item_fields, "year").offset == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exclude_user_fields": ["gender"]}, "no user field 'gender'"),
        ({"exclude_item_fields": ["director"]}, "no item field 'director'"),
        ({"exclude_item_fields": ["age"]}, "no item field 'age'"),  # a user field is not an item field
    ],
)
def test_excluding_an_unknown_field_is_an_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_schema(make_dataset(), ["i1"], **kwargs)


@pytest.mark.parametrize("use_item_id", [True, False])
def test_an_item_attribute_named_item_id_is_refused(use_item_id):
    items = AttributeTable(
        fields=[AttributeField(ITEM_ID_FIELD), AttributeField("year")],
        values={"i1": {ITEM_ID_FIELD: ("x",), "year": ("1990s",)}},
    )
    with pytest.raises(ValueError, match="reserved"):
        build_schema(make_dataset(items=items), ["i1"], use_item_id=use_item_id)


def test_user_encoding_missing_values_and_unknown_values():
    schema = build_schema(make_dataset(), ["i1"])
    # age: 18-24=2, 25-34=3, 56+=4; langs: de=2, en=3, fr=4, it=5.
    assert schema.encode_user(USERS.get("u1")).tolist() == [3, 3, 4, PAD]
    assert schema.encode_user(USERS.get("u3")).tolist() == [4, 2, 3, 5]
    assert schema.encode_user(USERS.get("u4")).tolist() == [PAD, PAD, PAD, PAD]
    assert schema.encode_user({"age": ("90+",), "langs": ("en", "xx")}).tolist() == [OOV, 3, OOV, PAD]
    assert schema.encode_user({}).dtype == np.int64


def test_encode_users_stacks_rows_in_the_order_asked():
    schema = build_schema(make_dataset(), ["i1"])
    codes = encode_users(schema, USERS, ["u3", "u1", "nobody"])
    assert codes.dtype == np.int64
    assert codes.shape == (3, 4)
    assert codes.tolist() == [[4, 2, 3, 5], [3, 3, 4, PAD], [PAD, PAD, PAD, PAD]]
    assert encode_users(schema, USERS, []).shape == (0, 4)


def test_schema_round_trips_through_dict_and_json():
    schema = build_schema(make_dataset(), ["i2", "i1"], max_multi_width=2)
    restored = FeatureSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert restored == schema
    assert restored.to_dict() == schema.to_dict()
    # The restored schema encodes identically (its lookup index is rebuilt).
    for item in ("i1", "i2", "i3", "i4", "new"):
        attributes = ITEMS.get(item)
        assert restored.encode_item(item, attributes).tolist() == schema.encode_item(item, attributes).tolist()
    for user in ("u1", "u2", "u3", "u4"):
        assert restored.encode_user(USERS.get(user)).tolist() == schema.encode_user(USERS.get(user)).tolist()
    assert schema.to_dict()["item_fields"][0] == {
        "name": ITEM_ID_FIELD,
        "side": "item",
        "multi_valued": False,
        "width": 1,
        "offset": 0,
        "vocabulary": ["i1", "i2"],
    }
