"""What a gateway credential is bound to: one request to one gateway.

A munge credential only proves who made it and when; replayed at another gateway
of a failover list (each munged has its own replay cache), or with another path
or body, it would prove the same. So the client puts the request it is meant for
into the payload, and the gateway accepts it only for exactly that request:

    {"shifter_request": {"method": "POST", "target": "/api/pull/sys/docker/x%3A1/",
                         "body": "sha256:<hex of the body bytes>", "gateway": "host:port"},
     "authorized_locations": {...}}        # only with a pull

``target`` is the request target as sent (path and query, still escaped) and
``gateway`` the host:port of the URL the client used. Shared by the client (stdlib
only: the submission hook imports it) and the gateway, so both spell it alike.
"""

from __future__ import annotations

KEY = "shifter_request"
_EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def body_digest(body: bytes) -> str:
    """``sha256:<hex>`` of the body; lookups send none, so hashlib loads only for bodies."""
    if not body:
        return _EMPTY_SHA256
    import hashlib

    return "sha256:" + hashlib.sha256(body).hexdigest()


def gateway_name(host: str, port: int) -> str:
    """host:port as both sides compare it (lower case, IPv6 without brackets)."""
    return f"{host.strip('[]').lower()}:{port}"


def claim(method: str, target: str, body: bytes, gateway: str) -> dict[str, str]:
    """The ``shifter_request`` object for one request."""
    return {"method": method.upper(), "target": target, "body": body_digest(body), "gateway": gateway}
