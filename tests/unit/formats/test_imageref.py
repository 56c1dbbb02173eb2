"""Image references: types, defaults, :latest, registries with ports, digests, malformed input."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.imageref import ImageRef, parse_image_ref, split_docker_tag

DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE_ID = "ab" * 32


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("docker:ubuntu:16.04", "docker", ImageRef("docker", "ubuntu:16.04")),
        # the original's vector: a non-type prefix means the default type and the whole text
        ("ubuntu:16.04", "docker", ImageRef("docker", "ubuntu:16.04")),
        ("ubuntu", "docker", ImageRef("docker", "ubuntu")),
        ("custom:myimage", "docker", ImageRef("custom", "myimage")),
        ("myimage", "custom", ImageRef("custom", "myimage")),
        (f"id:{IMAGE_ID}", "docker", ImageRef("id", IMAGE_ID)),
        ("local:/", "docker", ImageRef("local", "/")),
        ("local:/scratch/rootfs", "docker", ImageRef("local", "/scratch/rootfs")),
        ("localhost:5000/demo/busybox:latest", "docker",
         ImageRef("docker", "localhost:5000/demo/busybox:latest")),
        ("docker:registry.example.org/a/b/c:1.2_3-rc+4", "docker",
         ImageRef("docker", "registry.example.org/a/b/c:1.2_3-rc+4")),
        (f"docker:repo@{DIGEST}", "docker", ImageRef("docker", f"repo@{DIGEST}")),
        ("  docker:ubuntu  ", "docker", ImageRef("docker", "ubuntu")),
    ],
)
def test_parse(text, default, expected):
    assert parse_image_ref(text, default) == expected


@pytest.mark.parametrize(
    ("tag", "image_type", "lookup"),
    [
        ("ubuntu", "docker", "ubuntu:latest"),
        ("ubuntu:16.04", "docker", "ubuntu:16.04"),
        ("library/ubuntu", "docker", "library/ubuntu:latest"),
        ("host:5000/repo", "docker", "host:5000/repo:latest"),
        ("host:5000/repo:1.0", "docker", "host:5000/repo:1.0"),
        (f"repo@{DIGEST}", "docker", f"repo@{DIGEST}"),
        (f"host:5000/ns/repo@{DIGEST}", "docker", f"host:5000/ns/repo@{DIGEST}"),
        ("myimage", "custom", "myimage:latest"),
        (IMAGE_ID, "id", IMAGE_ID),
        ("/x", "local", "/x"),
    ],
)
def test_lookup_tag(tag, image_type, lookup):
    assert ImageRef(image_type, tag).lookup_tag == lookup


def test_str():
    assert str(parse_image_ref("ubuntu")) == "docker:ubuntu"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("ubuntu", (None, "ubuntu", "latest")),
        ("ubuntu:22.04", (None, "ubuntu", "22.04")),
        ("library/ubuntu:22.04", (None, "library/ubuntu", "22.04")),
        ("host:5000/repo", ("host:5000", "repo", "latest")),
        ("host:5000/ns/repo:1.0", ("host:5000", "ns/repo", "1.0")),
        ("localhost/repo:x", ("localhost", "repo", "x")),
        ("registry.example.org/repo", ("registry.example.org", "repo", "latest")),
        (f"ghcr.io/o/r@{DIGEST}", ("ghcr.io", "o/r", DIGEST)),
        (f"repo@{DIGEST}", (None, "repo", DIGEST)),
        ("localhost", (None, "localhost", "latest")),
    ],
)
def test_split_docker_tag(tag, expected):
    assert split_docker_tag(tag) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # the original silently dropped these characters ("custom:foo/bar" became "foobar")
        ("custom:foo/bar", "character(s) '/' not allowed in a custom tag"),
        ("ubuntu;rm -rf /", "character(s) ' ;' not allowed in a docker tag"),
        ("docker:ubuntu$(id)", "character(s) '$()' not allowed"),
        ("id:" + "AB" * 32, "an id is 64 lowercase hex digits"),
        ("id:abc", "an id is 64 lowercase hex digits"),
        ("", "no image given"),
        ("   ", "no image given"),
        ("docker:", "empty tag"),
        ("custom:", "empty tag"),
        ("a//b", "empty or relative path component"),
        ("repo/", "empty or relative path component"),
        ("../../etc", "bad registry '..'"),
        ("ns/../x", "empty or relative path component"),
        ("x:y:z", "bad tag 'y:z'"),
        ("ubuntu:", "bad tag ''"),
        ("repo@sha256:abc", "bad digest 'sha256:abc'"),
        ("repo@md5:" + "0" * 32, "bad digest"),
        ("host:port/x", "bad registry 'host:port'"),
        ("local:relative/path", "a local image is an absolute host path"),
        ("local:/a/../b", "a local image is an absolute host path"),
        ("custom::x", "empty name or tag"),
        ("ubüntu", "not allowed in a docker tag"),
    ],
)
def test_malformed_references(text, fragment):
    with pytest.raises(ShifterError) as err:
        parse_image_ref(text)
    assert fragment in str(err.value)
    if text.strip():
        assert repr(text) in str(err.value) or "an id" in str(err.value)


def test_unknown_default_type():
    with pytest.raises(ShifterError, match="unknown default image type 'rkt'"):
        parse_image_ref("ubuntu", "rkt")
