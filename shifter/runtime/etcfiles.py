"""The container's /etc account files, generated from the host's (reference section 2.5 step 4).

Only the job's user (and the site's ``usersToImport``, e.g. ``sshd`` for the in-container sshd)
appear in a generated passwd; the group file lists the user in at most ``maxGroupCount`` groups.
The original listed the user in no group when ``maxGroupCount`` was 0 despite documenting 0 as
"unlimited": here 0 means unlimited, as documented.
"""

from __future__ import annotations

from shifter.errors import ShifterError

NSSWITCH_CONF = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
    "protocols: files\nservices: files\nethers: files\nrpc: files\nnetgroup: files\n"
)
HOST_CONF = "order bind,hosts\nmulti on\n"


def find_passwd_entry(passwd_text: str, name: str) -> list[str] | None:
    """The 7 fields of ``name``'s line in a passwd file, or None."""
    for line in passwd_text.splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[0] == name:
            return fields
    return None


def passwd_text(entries: list[list[str]]) -> str:
    return "".join(":".join(fields) + "\n" for fields in entries)


def filter_group(group_text: str, user: str, max_groups: int) -> str:
    """Rewrite a group file: no member lists except the user's, in at most ``max_groups`` groups.

    A group counts as the user's when the user is a listed member or the group is named after
    the user (the original's rule).  Groups with gid 0 are dropped.
    """
    out = []
    found = 0
    for line in group_text.splitlines():
        fields = line.split(":")
        if len(fields) != 4 or not fields[0] or line.startswith("#"):
            continue
        name, _, gid, members = fields
        if not gid.isdigit():
            raise ShifterError(f"bad gid {gid!r} for group {name!r} in group file")
        if int(gid) == 0:
            continue
        mine = name == user or user in members.split(",")
        if mine and (max_groups <= 0 or found < max_groups):
            found += 1
            out.append(f"{name}:x:{gid}:{user}\n")
        else:
            out.append(f"{name}:x:{gid}:\n")
    return "".join(out)


def groups_text(groups: list[tuple[str, int]], user: str) -> str:
    """A group file for populateEtcDynamically: one line per group of the user."""
    return "".join(f"{name}:x:{gid}:{user}\n" for name, gid in groups if gid != 0)
