"""The rules of gateway.access on plain records: per-tag access, ACLs that add up, public wins."""

from __future__ import annotations

from gateway.access import PUBLIC, Access, combine, effective, for_tag


def _rec(*entries: dict, **fields: object) -> dict:
    return {"tag": [e["tag"] for e in entries], "tag_access": list(entries), **fields}


def test_an_image_named_by_any_public_tag_is_public() -> None:
    rec = _rec({"tag": "priv/app:v1", "private": True, "userACL": [1001], "groupACL": []},
               {"tag": "lib/app:v1", "private": False, "userACL": [], "groupACL": []})
    assert effective(rec) == PUBLIC
    assert for_tag(rec, "priv/app:v1") == Access(True, (1001,), ())


def test_private_tags_add_their_acls_up() -> None:
    rec = _rec({"tag": "a:v1", "private": True, "userACL": [1001], "groupACL": [50]},
               {"tag": "b:v1", "private": True, "userACL": [1002], "groupACL": []})
    assert effective(rec) == Access(True, (1001, 1002), (50,))


def test_a_new_private_pull_of_a_tag_widens_it_and_a_public_one_opens_it() -> None:
    old = Access(True, (1001,), ())
    assert combine(old, Access(True, (1002,), (7,))) == Access(True, (1001, 1002), (7,))
    assert combine(old, PUBLIC) == PUBLIC
    assert combine(PUBLIC, Access(True, (1002,), ())) == Access(True, (1002,), ())  # the registry decides


def test_records_without_tag_access_use_their_own_acl_for_every_tag() -> None:
    legacy = {"tag": ["old:v1"], "private": True, "userACL": [1001], "groupACL": []}
    assert for_tag(legacy, "old:v1") == effective(legacy) == Access(True, (1001,), ())
    assert effective({"tag": [], "private": True, "userACL": [], "groupACL": []}) == PUBLIC


def test_covers_says_whether_a_tag_already_grants_a_request() -> None:
    tag = Access(True, (1001, 1002), (50,))
    assert tag.covers(Access(True, (1001,), ()))
    assert not tag.covers(Access(True, (1003,), ()))
    assert PUBLIC.covers(Access(True, (1003,), ()))
