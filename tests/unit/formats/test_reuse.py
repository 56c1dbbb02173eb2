"""shifterConfig.json: the original's exact reuse-marker string."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.reuse import marker_matches, marker_text
from shifter.formats.volumemap import parse_volume_map, volume_signature


def test_original_vector():
    assert marker_text("testImage", "dmj", "", []) == (
        '{"identifier":"testImage","user":"dmj","volMap":"","modules":""}\n'
    )


def test_modules_each_followed_by_a_comma():
    text = marker_text("abc123", "alice", "", ["mpich", "cuda"])
    assert text == '{"identifier":"abc123","user":"alice","volMap":"","modules":"mpich,cuda,"}\n'


def test_volume_signature_goes_in_verbatim():
    sig = volume_signature(parse_volume_map("/x:/y:ro;/a:/b", site=False))
    text = marker_text("f" * 64, "bob", sig, ["m"])
    assert text == '{"identifier":"' + "f" * 64 + '","user":"bob","volMap":"/a:/b;/x:/y:ro","modules":"m,"}\n'


def test_marker_matches_requires_the_whole_file():
    expected = marker_text("id", "u", "", [])
    assert marker_matches(expected, expected)
    assert not marker_matches(expected + "trailing", expected)
    assert not marker_matches(expected[:-1], expected)
    assert not marker_matches(marker_text("id", "v", "", []), expected)


@pytest.mark.parametrize(
    ("identifier", "user", "volmap", "modules", "fragment"),
    [
        ('a"b', "u", "", [], "identifier"),
        ("a", 'u","volMap":"x', "", [], "user"),
        ("a", "u", "/a:/b\\", [], "volMap"),
        ("a", "u", "", ["m\n"], "module"),
        ("a", "u\x00", "", [], "user"),
        ("a", "u", "", ['x"'], "module"),
    ],
)
def test_fields_needing_escapes_are_refused(identifier, user, volmap, modules, fragment):
    with pytest.raises(ShifterError, match=f"reuse marker {fragment}"):
        marker_text(identifier, user, volmap, modules)
