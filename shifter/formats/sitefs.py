"""Which host directories a container shows, to explain a volume source it does not show.

A volume's source is looked up inside the container: in the image or in a site file system
(siteFs) bound at its path.  A user who names a directory of the login node or the compute
node outside those sees "no such directory" although `ls` shows it; these helpers say why,
and where the data could live instead.
"""

from __future__ import annotations

import os

from shifter.errors import ShifterError
from shifter.formats.volumemap import VolumeMount

# Bound from the node itself at the same path (container.py); node-local, so a login node
# cannot tell what a compute node's /tmp holds.
NODE_BOUND = ("/tmp", "/var/tmp")


def _under(path: str, top: str) -> bool:
    top = top.rstrip("/") or "/"
    return top == "/" or path == top or path.startswith(top + "/")


def hidden_in_container(site_fs: list[VolumeMount], source: str) -> bool:
    """True when no site file system (nor the node's /tmp) covers ``source`` in the container."""
    path = os.path.normpath(source)
    tops = [m.target for m in site_fs] + list(NODE_BOUND)
    return not any(_under(path, top) for top in tops)


def describe_site_fs(site_fs: list[VolumeMount]) -> str:
    """The site file systems as a user sees them: their container path, and the host's when it differs."""
    names = [m.target if m.source.rstrip("/") == m.target.rstrip("/") else f"{m.target} (the host's {m.source})"
             for m in site_fs]
    return ", ".join(names) or "none on this system"


def hidden_source_message(site_fs: list[VolumeMount], source: str) -> str:
    return (f"source {source} exists on the host but is not visible in the container: a volume comes from "
            f"the image or a site file system ({describe_site_fs(site_fs)}); put the data under one of those")


def refuse_hidden_sources(site_fs: list[VolumeMount], mounts: list[VolumeMount]) -> None:
    """At submission: refuse a source that is the user's own directory on this host but not in any
    site file system (an image cannot hold it, so the job would fail on every node).

    Other host directories may also exist in the image (/usr/share, /opt...): those are left to
    setupRoot, which sees the image.
    """
    for mount in mounts:
        if mount.per_node_cache is not None or not hidden_in_container(site_fs, mount.source):
            continue
        try:
            owned = os.stat(mount.source).st_uid == os.getuid()
        except OSError:
            continue
        if owned:
            raise ShifterError(f"volume {mount.source}:{mount.target}: "
                               + hidden_source_message(site_fs, mount.source))
