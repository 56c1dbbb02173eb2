"""Which volume sources a container cannot show, and the submission check built on it."""

import os
import tempfile

import pytest

from shifter.errors import ShifterError
from shifter.formats.sitefs import describe_site_fs, hidden_in_container, refuse_hidden_sources
from shifter.formats.volumemap import parse_volume_map

SITE_FS = parse_volume_map("/home:/home;/scratch:/scratch;/var/lib/c/sitefs:/sitefs", site=True)


@pytest.mark.parametrize("source, hidden", [
    ("/home/u/exp1/data", False), ("/home", False), ("/scratch/u/out", False), ("/sitefs/x", False),
    ("/tmp/u", False), ("/var/tmp/u", False),
    ("/homework/u", True), ("/var/lib/c/sitefs/x", True), ("/opt/data", True), ("/home/../etc", True),
])
def test_hidden_in_container(source, hidden):
    assert hidden_in_container(SITE_FS, source) is hidden


def test_describe_names_the_host_path_only_where_it_differs():
    assert describe_site_fs(SITE_FS) == "/home, /scratch, /sitefs (the host's /var/lib/c/sitefs)"
    assert describe_site_fs([]) == "none on this system"


def test_refuses_own_host_directory_outside_every_site_filesystem():
    with tempfile.TemporaryDirectory(dir=_outside_every_site_filesystem()) as top:
        _check_refused(os.path.join(top, "data"))


def _outside_every_site_filesystem() -> str:
    """A directory we may write that neither SITE_FS nor the node's /tmp covers: this checkout's tests
    directory, unless the checkout itself lies under one of them (a clone in /tmp or /home)."""
    for base in (os.path.dirname(os.path.abspath(__file__)), "/dev/shm"):
        if os.access(base, os.W_OK) and hidden_in_container(SITE_FS, base):
            return base
    pytest.fail("no writable directory outside /home, /scratch, /sitefs and /tmp to test with")


def _check_refused(own: str) -> None:
    os.mkdir(own)
    mounts = parse_volume_map(f"{own}:/input", site=False)
    with pytest.raises(ShifterError) as err:
        refuse_hidden_sources(SITE_FS, mounts)
    assert str(err.value) == (f"volume {own}:/input: source {own} exists on the host but is not visible in the "
                              "container: a volume comes from the image or a site file system "
                              "(/home, /scratch, /sitefs (the host's /var/lib/c/sitefs)); "
                              "put the data under one of those")


def test_leaves_image_paths_and_site_paths_to_setuproot(tmp_path):
    others = tmp_path / "others"
    others.mkdir()
    os.chown(others, 65534, 65534)  # exists here but is not the user's: it may be in the image too
    mounts = parse_volume_map(f"{others}:/a;/no/such/dir:/b;/home/nobody/x:/c", site=False)
    refuse_hidden_sources(SITE_FS, mounts)
