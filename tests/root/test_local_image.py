"""Which directories may be a ``local:`` image (allowLocalChroot=1): root's, and readable by the user."""

from __future__ import annotations

import os
import shutil


def _tree(site, name: str) -> str:
    tree = os.path.join(site.base, name)
    os.makedirs(os.path.join(tree, "etc"))
    with open(os.path.join(tree, "etc/os-release"), "w") as fh:
        fh.write("NAME=LocalTree\n")
    return tree


def test_local_root_must_be_roots_readable_and_without_links(clean_site, users):
    site, user = clean_site, users[0]
    site.write_config("allowLocalChroot=1\n")
    owned = _tree(site, "local-owned")
    os.chown(owned, user.uid, user.gid)
    hidden_parent = os.path.join(site.base, "local-hidden")
    os.mkdir(hidden_parent, 0o700)
    hidden = _tree(site, "local-hidden/tree")
    linked = os.path.join(site.base, "local-link")
    os.symlink(_tree(site, "local-target"), linked)
    cases = {owned: "must be owned by root", hidden: "Permission denied", linked: "without symlinks",
             "/no/such/dir": "No such file"}
    try:
        for tree, message in cases.items():
            result = site.setup("821", user, image=tree, image_type="local")
            assert result.returncode == 1, (tree, result.stderr)
            assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
            site.wait_no_loops()
            assert site.leftovers() == {}, (tree, site.leftovers())
        result = site.setup("821", user, image=os.path.join(site.base, "local-target"), image_type="local")
        assert result.returncode == 0, result.stderr
    finally:
        assert site.unsetup("--job-id", "821").returncode == 0
        for path in (owned, hidden_parent, os.path.join(site.base, "local-target")):
            shutil.rmtree(path)
        os.unlink(linked)
