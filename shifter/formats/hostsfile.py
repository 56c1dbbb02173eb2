"""The job's node list: setupRoot's ``-N "host/count ..."`` and ``/var/hostsfile``.

The prolog turns Slurm's compressed lists (``SLURM_JOB_NODELIST=n[1-3,5]``,
``SLURM_JOB_CPUS_PER_NODE=2(x3),1``) into the original's node spec, and
setupRoot writes each host ``count`` times, one per line, into the container's
``/var/hostsfile`` (what MPI launchers and the sshd users read).  Expanding the
lists here avoids running ``scontrol show hostnames`` on every node.
"""

from __future__ import annotations

from shifter.errors import ShifterError

MAX_HOSTS = 100_000
MAX_SLOTS_PER_HOST = 65_536
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")


def _check_host(name: str, context: str) -> str:
    if not name or any(c not in _HOST_CHARS for c in name) or name[0] in ".-":
        raise ShifterError(f"invalid host name {name!r} in {context!r}")
    return name


def _positive_int(text: str, what: str, context: str, limit: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise ShifterError(f"invalid {what} {text!r} in {context!r}")
    value = int(text)
    if value <= 0:
        raise ShifterError(f"{what} must be positive in {context!r}")
    if value > limit:
        raise ShifterError(f"{what} {value} exceeds the limit of {limit} in {context!r}")
    return value


def parse_node_spec(text: str) -> list[tuple[str, int]]:
    """``"host/24 host2/24"`` -> [("host", 24), ("host2", 24)]; each token is name/count, count > 0."""
    tokens = text.split()
    if not tokens:
        raise ShifterError("empty node list (expected 'host/count ...')")
    nodes: list[tuple[str, int]] = []
    for token in tokens:
        name, slash, count = token.partition("/")
        if not slash:
            raise ShifterError(f"node {token!r} has no '/count' (expected host/count)")
        slots = _positive_int(count, "slot count", token, MAX_SLOTS_PER_HOST)
        nodes.append((_check_host(name, token), slots))
    return nodes


def hostsfile_text(spec: str | list[tuple[str, int]]) -> str:
    """Each host ``count`` times, one per line (the original's /var/hostsfile)."""
    nodes = parse_node_spec(spec) if isinstance(spec, str) else spec
    return "".join(f"{name}\n" * count for name, count in nodes)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts: list[str] = []
    depth, start = 0, 0
    for pos, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ShifterError(f"nested '[' in host list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ShifterError(f"unbalanced ']' in host list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:pos])
            start = pos + 1
    if depth:
        raise ShifterError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_list(body: str, context: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        low, dash, high = item.partition("-")
        if not low.isdigit() or not low.isascii() or (dash and (not high.isdigit() or not high.isascii())):
            raise ShifterError(f"invalid range {item!r} in host list {context!r}")
        if not dash:
            values.append(low)
            continue
        first, last = int(low), int(high)
        if last < first:
            raise ShifterError(f"descending range {item!r} in host list {context!r}")
        if last - first + len(values) >= MAX_HOSTS:
            raise ShifterError(f"host list {context!r} expands to more than {MAX_HOSTS} hosts")
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(first, last + 1))
    return values


def _expand_pattern(pattern: str, context: str) -> list[str]:
    names = [""]
    rest = pattern
    while rest:
        opening = rest.find("[")
        if opening < 0:
            names = [n + rest for n in names]
            break
        closing = rest.find("]", opening)
        prefix, body, rest = rest[:opening], rest[opening + 1:closing], rest[closing + 1:]
        choices = _expand_range_list(body, context)
        if len(names) * len(choices) > MAX_HOSTS:
            raise ShifterError(f"host list {context!r} expands to more than {MAX_HOSTS} hosts")
        names = [n + prefix + c for n in names for c in choices]
    return [_check_host(n, context) for n in names]


def expand_hostlist(text: str) -> list[str]:
    """Slurm hostlist syntax ``n[1-3,5],gpu[01-02],x`` -> the host names, in order."""
    text = text.strip()
    if not text:
        return []
    hosts: list[str] = []
    for part in _split_top_level(text):
        if not part:
            raise ShifterError(f"empty entry in host list {text!r}")
        hosts.extend(_expand_pattern(part, text))
        if len(hosts) > MAX_HOSTS:
            raise ShifterError(f"host list {text!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def expand_cpus_per_node(text: str) -> list[int]:
    """``SLURM_JOB_CPUS_PER_NODE`` format ``2(x3),1`` -> [2, 2, 2, 1]."""
    text = text.strip()
    if not text:
        return []
    counts: list[int] = []
    for item in text.split(","):
        value, paren, repeat = item.partition("(")
        cpus = _positive_int(value, "cpu count", text, MAX_SLOTS_PER_HOST)
        times = 1
        if paren:
            if not repeat.startswith("x") or not repeat.endswith(")"):
                raise ShifterError(f"invalid repeat {item!r} in cpus per node {text!r}")
            times = _positive_int(repeat[1:-1], "repeat count", text, MAX_HOSTS)
        if len(counts) + times > MAX_HOSTS:
            raise ShifterError(f"cpus per node {text!r} lists more than {MAX_HOSTS} nodes")
        counts.extend([cpus] * times)
    return counts
