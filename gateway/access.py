"""Who may read an image: access belongs to each tag, the image id only sums them up.

A tag is public when its registry served it without credentials, or private to the
requesters it was pulled (or imported) for. Several private pulls of one tag add up
their ACLs; one pull never narrows what another granted. The published files of an
image id follow :func:`effective`: public as soon as any tag that names the id is
public (its bytes are public anyway), else readable by the union of its tags' ACLs.
Records written before tags carried access have only the record-level fields, which
then stand for every tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.store.base import Doc, tag_entry

REGISTRY_OWNER = "registry"  # docker tags: only a registry decides what they name


def import_owner(uid: int) -> str:
    """The owner recorded for a custom tag: the importing user."""
    return f"uid:{uid}"


@dataclass(frozen=True)
class Access:
    private: bool
    user_acl: tuple[int, ...] = ()
    group_acl: tuple[int, ...] = ()

    @classmethod
    def of(cls, private: Any, user_acl: Any, group_acl: Any) -> Access:
        users = tuple(sorted({int(u) for u in user_acl or []}))
        groups = tuple(sorted({int(g) for g in group_acl or []}))
        # the original's rule: a "private" image with empty ACLs is readable by everyone
        return cls(bool(private) and bool(users or groups), users, groups)

    def as_fields(self) -> Doc:
        return {"private": self.private, "userACL": list(self.user_acl), "groupACL": list(self.group_acl)}

    def covers(self, other: Access) -> bool:
        """Does this access already grant everything ``other`` asks for?"""
        if not self.private:
            return True
        return (
            other.private
            and set(other.user_acl) <= set(self.user_acl)
            and set(other.group_acl) <= set(self.group_acl)
        )


PUBLIC = Access(False)


def for_tag(rec: Doc, tag: str) -> Access:
    entry = tag_entry(rec, tag)
    source = entry if entry is not None and "private" in entry else rec
    return Access.of(source.get("private"), source.get("userACL"), source.get("groupACL"))


def combine(old: Access | None, new: Access) -> Access:
    """A new pull of one tag: public if the registry now serves it openly, else ACLs add up.

    A tag that was public and now needs credentials follows the registry: only the
    registry that the tag names can make it private, so no user can do that to others.
    """
    if old is None or not new.private or not old.private:
        return new
    return Access.of(True, old.user_acl + new.user_acl, old.group_acl + new.group_acl)


def effective(rec: Doc) -> Access:
    """The image id's own access, from every tag that names it (what ``.meta`` and file modes show)."""
    tags = rec.get("tag")
    tags = [tags] if isinstance(tags, str) else [t for t in tags or [] if isinstance(t, str)]
    if not tags:
        return Access.of(rec.get("private"), rec.get("userACL"), rec.get("groupACL"))
    users: set[int] = set()
    groups: set[int] = set()
    for tag in tags:
        access = for_tag(rec, tag)
        if not access.private:
            return PUBLIC
        users.update(access.user_acl)
        groups.update(access.group_acl)
    return Access.of(True, users, groups)


def owner_of(rec: Doc, tag: str) -> str | None:
    return (tag_entry(rec, tag) or {}).get("owner")
