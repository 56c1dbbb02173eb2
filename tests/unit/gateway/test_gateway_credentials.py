"""Who may decode a client's gateway credentials, and what each one names (no daemons needed)."""

from __future__ import annotations

import os
import pwd

import pytest

from shifter.client.gatewayclient import resolve_gateway_uid
from shifter.errors import ShifterError
from shifter.formats import requestbinding
from shifter.formats.config import parse_config

BASE = "udiMount=/u\nloopMount=/l\nimagePath=/i\nudiRootPath=/r\netcPath=/e\nrootfsType=tmpfs\n"


def test_gateway_user_key_names_a_user_or_a_uid() -> None:
    assert parse_config(BASE).image_gateway_user is None
    assert parse_config(BASE + "imageGatewayUser=shifter\n").image_gateway_user == "shifter"
    assert resolve_gateway_uid("4242") == 4242
    assert resolve_gateway_uid(7) == 7
    me = pwd.getpwuid(os.getuid()).pw_name
    assert resolve_gateway_uid(me) == os.getuid()


def test_gateway_user_unset_is_the_shifter_account_else_root() -> None:
    try:
        expected = pwd.getpwnam("shifter").pw_uid
    except KeyError:
        expected = 0
    assert resolve_gateway_uid(None) == expected


def test_unknown_gateway_user_is_one_clear_error() -> None:
    with pytest.raises(ShifterError, match="imageGatewayUser 'no-such-user-x': no such user"):
        resolve_gateway_uid("no-such-user-x")


def test_claim_names_method_target_body_and_gateway() -> None:
    bound = requestbinding.claim("post", "/api/pull/s/docker/a%3Ab/", b'{"x":1}', "gw:5000")
    assert bound["method"] == "POST" and bound["target"] == "/api/pull/s/docker/a%3Ab/"
    assert bound["body"] == requestbinding.body_digest(b'{"x":1}') != requestbinding.body_digest(b"")
    assert requestbinding.body_digest(b"") == "sha256:" + __import__("hashlib").sha256(b"").hexdigest()
    assert requestbinding.gateway_name("[::1]", 80) == "::1:80"
    assert requestbinding.gateway_name("GW.Example", 5000) == "gw.example:5000"
