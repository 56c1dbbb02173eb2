"""Reading what the MPI test program of demo/mpich (tests/data/mpi_ring.c) prints in a job.

Shared by the MPI and module integration tests: each rank prints one ``mpi_ring ...`` line,
the job scripts print ``== <name>`` before each step and ``step exit <status>`` after it.
"""

from __future__ import annotations

import re

from .testing import Cluster

MPICH_REPO = "demo/mpich"
PMI = "pmi2"  # Debian's MPICH speaks PMI-1/PMI-2; with --mpi=pmix every rank is a singleton
RANK_LINE = re.compile(
    r"^mpi_ring rank=(?P<rank>\d+) size=(?P<size>\d+) host=(?P<host>\S+) ring=(?P<ring>\S+) "
    r"all_pairs=(?P<all_pairs>\S+) local_size=(?P<local_size>\d+) local_peer=(?P<local_peer>-?\d+) "
    r"local_peer_host=(?P<local_peer_host>\S+) local_exchange=(?P<local_exchange>\S+) libmpi=(?P<libmpi>\S+)$",
    re.MULTILINE)
STEP_EXIT = re.compile(r"^step exit (\d+)$", re.MULTILINE)


def mpich_reference(cluster: Cluster) -> str | None:
    """The registry reference of demo/mpich, or None when the cluster was started without it."""
    try:
        return cluster.image(MPICH_REPO)
    except KeyError:
        return None


def step(name: str, command: str) -> str:
    """Job script lines running `command` as the section `name`, then printing its exit status."""
    return f"echo '== {name}'\n{command}; echo \"step exit $?\"\n"


def sections(output: str) -> dict[str, str]:
    """A job's output split at its ``== name`` lines."""
    parts: dict[str, str] = {}
    name = ""
    for line in output.splitlines(keepends=True):
        if line.startswith("== "):
            name = line[3:].strip()
            parts[name] = ""
        elif name:
            parts[name] += line
    return parts


def step_exit(section: str) -> int | None:
    """The exit status printed in one section, None unless exactly one was printed."""
    found = STEP_EXIT.findall(section)
    return int(found[0]) if len(found) == 1 else None


def ranks(text: str) -> dict[int, dict[str, str]]:
    """The rank lines of `text`, by rank; a rank printed twice raises ValueError."""
    found: dict[int, dict[str, str]] = {}
    for match in RANK_LINE.finditer(text):
        rank = int(match["rank"])
        if rank in found:
            raise ValueError(f"rank {rank} reported twice")
        found[rank] = match.groupdict()
    return found


def two_by_two_problems(found: dict[int, dict[str, str]], nodes: list[str]) -> list[str]:
    """What is wrong with a 2 nodes x 2 tasks run (empty when every rank of it passed every check)."""
    if sorted(found) != [0, 1, 2, 3]:
        return [f"ranks {sorted(found)} reported, expected 0-3"]
    problems = []
    per_host: dict[str, list[int]] = {}
    for rank, fields in sorted(found.items()):
        per_host.setdefault(fields["host"], []).append(rank)
        for key, expected in (("size", "4"), ("ring", "ok"), ("all_pairs", "ok"), ("local_size", "2"),
                              ("local_exchange", "ok"), ("local_peer_host", fields["host"])):
            if fields[key] != expected:
                problems.append(f"rank {rank}: {key}={fields[key]}, expected {expected}")
    if sorted(per_host) != sorted(nodes) or any(len(members) != 2 for members in per_host.values()):
        problems.append(f"ranks per host {per_host}, expected 2 on each of {nodes}")
    for rank, fields in found.items():  # the node-local peer is the other rank on that host
        peer = int(fields["local_peer"])
        if peer == rank or peer not in per_host.get(fields["host"], []):
            problems.append(f"rank {rank}: local peer {peer} is not the other rank on {fields['host']}")
    return problems
