"""Node spec, /var/hostsfile and Slurm's compressed host and CPU lists."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.hostsfile import (
    MAX_HOSTS,
    expand_cpus_per_node,
    expand_hostlist,
    hostsfile_text,
    parse_node_spec,
)


def test_original_vectors():
    assert hostsfile_text("host1/4") == "host1\n" * 4
    text = hostsfile_text("host1/24 host2/24 host3/24")
    assert text == "host1\n" * 24 + "host2\n" * 24 + "host3\n" * 24
    with pytest.raises(ShifterError, match="has no '/count'"):
        hostsfile_text("host1 host2")


def test_parse_node_spec():
    assert parse_node_spec("nid00001/2  nid00002/32\n") == [("nid00001", 2), ("nid00002", 32)]
    assert hostsfile_text([("a", 1), ("b", 2)]) == "a\nb\nb\n"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("host1 host2", "node 'host1' has no '/count'"),
        ("host1/0", "slot count must be positive in 'host1/0'"),
        ("host1/x", "invalid slot count 'x'"),
        ("host1/-1", "invalid slot count '-1'"),
        ("/4", "invalid host name ''"),
        ("ho$t/4", "invalid host name 'ho$t'"),
        ("-host/4", "invalid host name '-host'"),
        ("host/999999999", "exceeds the limit"),
        ("", "empty node list"),
        ("host/2/3", "invalid slot count '2/3'"),
    ],
)
def test_malformed_node_specs(spec, fragment):
    with pytest.raises(ShifterError) as err:
        parse_node_spec(spec)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("n[1-3,5],gpu[01-02],x", ["n1", "n2", "n3", "n5", "gpu01", "gpu02", "x"]),
        ("node1", ["node1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("nid[0009-0011]", ["nid0009", "nid0010", "nid0011"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("[1-2]x", ["1x", "2x"]),
        ("n[7]", ["n7"]),
        ("", []),
        ("  c1  ", ["c1"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("n[1-3", "unbalanced '['"),
        ("n1-3]", "unbalanced ']'"),
        ("n[[1-2]]", "nested '['"),
        ("n[3-1]", "descending range '3-1'"),
        ("n[a-b]", "invalid range 'a-b'"),
        ("n[]", "invalid range ''"),
        ("n[1-]", "invalid range '1-'"),
        ("a,,b", "empty entry"),
        ("n[0-99999999]", f"more than {MAX_HOSTS} hosts"),
        ("bad host", "invalid host name 'bad host'"),
    ],
)
def test_malformed_hostlists(text, fragment):
    with pytest.raises(ShifterError) as err:
        expand_hostlist(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("2(x3),1", [2, 2, 2, 1]),
        ("36", [36]),
        ("4,8", [4, 8]),
        ("16(x2)", [16, 16]),
        ("", []),
    ],
)
def test_expand_cpus_per_node(text, counts):
    assert expand_cpus_per_node(text) == counts


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("2(3)", "invalid repeat '2(3)'"),
        ("2(x3", "invalid repeat"),
        ("x", "invalid cpu count 'x'"),
        ("0", "cpu count must be positive"),
        ("2(x0)", "repeat count must be positive"),
        ("2,,3", "invalid cpu count ''"),
        ("1(x999999999)", "exceeds the limit"),
    ],
)
def test_malformed_cpus_per_node(text, fragment):
    with pytest.raises(ShifterError) as err:
        expand_cpus_per_node(text)
    assert fragment in str(err.value)
