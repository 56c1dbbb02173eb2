"""Malformed and extreme requests through the real setupRoot: none drains the node.

setupRoot exits 2 only for a node failure (the prolog then drains the node); everything a user
or an image author can put in a request must end in exit 1 with one line naming the problem,
and leave no mount, loop device, directory or cache file behind.
"""

from __future__ import annotations

import os

import pytest

from tests.root.conftest import IMAGE_ID

LONG = "/d" * 2100  # over PATH_MAX
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    # volumes
    "volume onto /": (("-v", "/site1/shared:/"), "root / cannot be a volume target"),
    "volume onto /.": (("-v", "/site1/shared:/./"), "root / cannot be a volume target"),
    "volume with ..": (("-v", "/site1/shared:/data/../etc"), "may not contain '..'"),
    "very long target": (("-v", f"/site1/shared:{LONG}"), "longer than PATH_MAX"),
    "very long name": (("-v", "/site1/shared:/" + "n" * 300), "longer than PATH_MAX or NAME_MAX"),
    "many volumes": (tuple(a for i in range(129) for a in ("-v", f"/site1/shared:/v{i}")), "more than 128 volumes"),
    "unknown flag": (("-v", "/site1/shared:/data:bogus"), "unknown flag"),
    "site flag": (("-v", "/site1/shared:/data:slave"), "reserved to the site"),
    "flag twice": (("-v", "/site1/shared:/data:ro:ro"), "given twice"),
    "flag with a value": (("-v", "/site1/shared:/data:ro=1"), "takes no arguments"),
    "empty flag": (("-v", "/site1/shared:/data:"), "unknown flag"),
    "newline": (("-v", "/site1/shared:/data\nx"), "illegal character"),
    "control character": (("-v", "/site1/shared:/da\x1bta"), "illegal character"),
    "tab": (("-v", "/site1/\tshared:/data"), "illegal character"),
    "not UTF-8": (("-v", "/site1/shared:/d\udcffata"), "illegal character"),
    "no target": (("-v", "/site1/shared"), "no target given"),
    # perNodeCache sizes and counts
    "cache 1e": (("-v", "/x:/data:perNodeCache=size=1e"), "exceeds perNodeCacheSizeLimit"),
    "cache 0": (("-v", "/x:/data:perNodeCache=size=0"), "must be positive"),
    "cache huge": (("-v", "/x:/data:perNodeCache=size=" + "9" * 400), "too many digits"),
    "cache huge exact": (("-v", "/x:/data:perNodeCache=size=" + "9" * 30 + "e"), "exceeds perNodeCacheSizeLimit"),
    "cache negative": (("-v", "/x:/data:perNodeCache=size=-1"), "invalid byte size"),
    "cache not numeric": (("-v", "/x:/data:perNodeCache=size=lots"), "invalid byte size"),
    "cache no size": (("-v", "/x:/data:perNodeCache"), "needs size"),
    "cache fs": (("-v", "/x:/data:perNodeCache=size=1G,fs=ext4"), "only xfs"),
    "cache unknown key": (("-v", "/x:/data:perNodeCache=size=1G,color=red"), "unknown perNodeCache option"),
    "many caches": (tuple(a for i in range(5) for a in ("-v", f"/x:/c{i}:perNodeCache=size=300M")),
                    "more than perNodeCacheMaxCount 4"),
    # modules
    "unknown module": (("-m", "nosuchmodule"), "unknown shifter module"),
    "many modules": (("-m", ",".join(f"m{i}" for i in range(2000))), "unknown shifter module"),
    "odd module name": (("-m", "../../etc"), "unknown shifter module"),
    "empty module name": (("-m", "a,,b"), "empty module name"),
    "none and more": (("-m", "none,x"), "cannot be combined"),
    # image arguments that look like options
    "image like an option": (("--", "id", "--config=/tmp/x"), "invalid image reference"),
}

# hostile .meta files next to a good squashfs
HOSTILE_META: dict[str, tuple[bytes, str]] = {
    "NUL in ENV": (b"FORMAT: squashfs\nENV: A=1\x00B\n", "control character '\\x00'"),
    "forged ACL line": (b"FORMAT: squashfs\nENV: A=1\x1cUSERACL: 4242\n", "ENV value"),
    "NEL separator": ("FORMAT: squashfs\nENV: A=1\x85WORKDIR: /etc\n".encode(), "control character"),
    "CRLF lines": (b"FORMAT: squashfs\r\nENV: A=1\r\n", "control character '\\r'"),
    "huge ENV": (b"FORMAT: squashfs\nENV: A=" + b"x" * 200_000 + b"\n", "longer than a process can receive"),
    "huge file": (b"FORMAT: squashfs\n" + b"# x\n" * (3 * 1024 * 1024), "larger than"),
    "bad WORKDIR": (b"FORMAT: squashfs\nWORKDIR: /w\x1b[2J\n", "WORKDIR value"),
    "not UTF-8": (b"FORMAT: squashfs\nENV: \xff\n", "is not UTF-8"),
    "bad ACL": (b"FORMAT: squashfs\nUSERACL: 1,x\n", "not a numeric id"),
    "huge ACL id": (b"FORMAT: squashfs\nUSERACL: " + b"9" * 5000 + b"\n", "out of range"),
    "unknown format": (b"FORMAT: ext3\n", "unsupported image FORMAT"),
}


def _assert_request_failure(site, result, what: str, fragment: str) -> None:
    assert result.returncode == 1, (what, result.returncode, result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setupRoot: "), (what, result.stderr[-500:])
    assert fragment in lines[0], (what, lines[0][:300])
    site.wait_no_loops()
    assert site.leftovers() == {}, (what, site.leftovers())


def test_malformed_requests_fail_the_request_and_never_the_node(clean_site, users):
    site, user = clean_site, users[0]
    for what, (args, fragment) in CASES.items():
        if args[0] == "--":
            result = site.setup("301", user, *args[:-2], image_type=args[-2], image=args[-1])
        else:
            result = site.setup("301", user, *args)
        _assert_request_failure(site, result, what, fragment)


@pytest.fixture
def hostile_meta_images(clean_site):
    made = []
    for number, (what, (data, fragment)) in enumerate(HOSTILE_META.items()):
        image_id = f"{number:02x}" + "e" * 62
        base = os.path.join(clean_site.images, image_id)
        os.link(os.path.join(clean_site.images, f"{IMAGE_ID}.squashfs"), base + ".squashfs")
        with open(base + ".meta", "wb") as fh:
            fh.write(data)
        made.append((what, image_id, fragment))
    yield made
    for _what, image_id, _fragment in made:
        for suffix in (".squashfs", ".meta"):
            os.unlink(os.path.join(clean_site.images, image_id + suffix))


def test_hostile_image_metadata_fails_the_request_and_never_the_node(clean_site, users, hostile_meta_images):
    site, user = clean_site, users[0]
    for what, image_id, fragment in hostile_meta_images:
        _assert_request_failure(site, site.setup("302", user, image=image_id), what, fragment)


def test_per_node_cache_limits_and_fs_types_come_from_udiroot_conf(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("perNodeCacheSizeLimit=400M\nperNodeCacheMaxCount=1\nperNodeCacheAllowedFsType=ext4\n")
    result = site.setup("303", user, "-v", "/x:/data:perNodeCache=size=300M")
    _assert_request_failure(site, result, "fs type",
                            "perNodeCache fs xfs is not allowed (perNodeCacheAllowedFsType: ext4)")
    site.write_config("perNodeCacheSizeLimit=400M\nperNodeCacheMaxCount=1\nperNodeCacheAllowedFsType=xfs\n")
    result = site.setup("303", user, "-v", "/x:/data:perNodeCache=size=500M")
    _assert_request_failure(site, result, "size", "exceeds perNodeCacheSizeLimit 419430400")
    result = site.setup("303", user, "-v", "/x:/a:perNodeCache=size=300M", "-v", "/x:/b:perNodeCache=size=300M")
    _assert_request_failure(site, result, "count", "more than perNodeCacheMaxCount 1")
    result = site.setup("303", user, "-v", "/x:/data:perNodeCache=size=300M")
    assert result.returncode == 0, result.stderr
