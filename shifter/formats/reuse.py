"""``<udiMount>/var/shifterConfig.json``: the marker that says which request an environment serves.

setupRoot writes it after building an environment; the launcher regenerates the
string for its own request and compares bytes: equal means the prepared
environment can be entered as is.  The text is the original's, byte for byte
(it is not produced by a JSON encoder)::

    {"identifier":"<id>","user":"<user>","volMap":"<signature>","modules":"<m1>,<m2>,"}\\n

Every module name is followed by a comma; no modules give an empty string.
Unlike the original, fields that would need JSON escaping are refused, so two
different requests can never produce the same marker.
"""

from __future__ import annotations

from shifter.errors import ShifterError

MARKER_RELATIVE_PATH = "var/shifterConfig.json"


def _field(name: str, value: str) -> str:
    for char in value:
        if char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F:
            raise ShifterError(f"reuse marker {name} {value!r} contains the character {char!r}")
    return value


def marker_text(identifier: str, user: str, volmap_signature: str, modules: list[str]) -> str:
    """The exact shifterConfig.json line (with its trailing newline)."""
    module_field = "".join(f"{_field('module', name)}," for name in modules)
    return (
        f'{{"identifier":"{_field("identifier", identifier)}","user":"{_field("user", user)}",'
        f'"volMap":"{_field("volMap", volmap_signature)}","modules":"{module_field}"}}\n'
    )


def marker_matches(marker_file_text: str, expected: str) -> bool:
    """The original compares only the first len(expected) bytes; we require the whole file to match."""
    return marker_file_text == expected
