"""The OpenAPI 3.0 description of the gateway's HTTP API (served at /api/openapi.json)."""

from __future__ import annotations

from typing import Any

# The original's record shape; api.py fills exactly these keys.
RECORD_KEYS = (
    "id", "system", "itype", "tag", "status", "userACL", "groupACL",
    "ENV", "ENTRY", "WORKDIR", "LABELS", "last_pull", "status_message",
)

STATUSES = [
    "INIT",
    "PENDING",
    "PULLING",
    "EXAMINATION",
    "CONVERSION",
    "TRANSFER",
    "READY",
    "FAILURE",
    "EXPIRING",
    "EXPIRED",
    "HASHING",
]
_MISSING: dict[str, Any] = {"type": "string", "enum": ["MISSING"]}


def _or_missing(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _MISSING]}


_RECORD: dict[str, Any] = {
    "type": "object",
    "description": "An image record: always exactly these 13 keys; an absent value is the string MISSING.",
    "required": list(RECORD_KEYS),
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "system": {"type": "string"},
        "itype": {"type": "string"},
        "tag": {"type": "array", "items": {"type": "string"}},
        "status": {"type": "string", "enum": STATUSES},
        "userACL": _or_missing({"type": "array", "items": {"type": "integer"}}),
        "groupACL": _or_missing({"type": "array", "items": {"type": "integer"}}),
        "ENV": _or_missing({"type": "array", "items": {"type": "string"}}),
        "ENTRY": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
        "WORKDIR": {"type": "string"},
        "LABELS": _or_missing({"type": "object", "additionalProperties": {"type": "string"}}),
        "last_pull": _or_missing({"type": "number"}),
        "status_message": {"type": "string"},
    },
}

_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["status", "error", "message"],
    "properties": {"status": {"type": "integer"}, "error": {"type": "string"}, "message": {"type": "string"}},
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, schema: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
    if description is not None:
        param["description"] = description
    return param


_SYSTEM = _path_param("system", {"type": "string"}, "A system named in Platforms of imagemanager.json.")
_ITYPE = _path_param("itype", {"type": "string", "enum": ["docker", "custom"]})
_TAG = _path_param(
    "tag",
    {"type": "string"},
    "The image tag, URL-escaped (e.g. ubuntu%3A22.04); a trailing slash is accepted.",
)
_AUTHED = {
    "401": _err("missing or bad munge credential"),
    "404": _err("unknown system or image"),
    "400": _err("malformed request"),
}
_RECORD_REF = {"$ref": "#/components/schemas/Record"}
_ACL_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "allowed_uids": {
                        "type": "string",
                        "description": "comma-separated uids",
                        "example": "1000,1001",
                    },
                    "allowed_gids": {"type": "string", "description": "comma-separated gids"},
                    "refresh": {
                        "type": "boolean",
                        "description": "re-check the registry even if the tag is fresh",
                    },
                },
            }
        }
    },
}
_IMPORT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["filepath"],
                "properties": {
                    "filepath": {"type": "string"},
                    "format": {"type": "string", "enum": ["squashfs"]},
                    "allowed_uids": {"type": "string"},
                    "allowed_gids": {"type": "string"},
                },
            }
        }
    },
}


def _image_op(
    summary: str,
    method: str,
    ok: dict[str, Any],
    extra: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [_SYSTEM, _ITYPE, _TAG],
        "responses": {"200": ok, **_AUTHED, **(extra or {})},
    }
    if body:
        op["requestBody"] = body
    return {method: op}


def _system_op(
    summary: str,
    ok: dict[str, Any],
    extra: dict[str, Any] | None = None,
    query: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": [_SYSTEM, *(query or [])],
            "responses": {"200": ok, **_AUTHED, **(extra or {})},
        }
    }


def openapi_document(systems: list[str] | None = None) -> dict[str, Any]:
    """The API description; with ``systems`` the system parameter lists this gateway's Platforms."""
    doc = _document()
    if systems:
        system = {**_SYSTEM, "schema": {"type": "string", "enum": sorted(systems)}}
        for item in doc["paths"].values():
            for op in item.values():
                op["parameters"] = [system if p is _SYSTEM else p for p in op.get("parameters", [])]
    return doc


def _document() -> dict[str, Any]:
    forbidden = {"403": _err("caller is not an admin / import user")}
    paths = {
        "/api/lookup/{system}/{itype}/{tag}": _image_op(
            "The READY image a tag names", "get", _ok(_RECORD_REF)
        ),
        "/api/pull/{system}/{itype}/{tag}": _image_op(
            "Start a pull, or poll the one in flight (idempotent)", "post", _ok(_RECORD_REF), body=_ACL_BODY
        ),
        "/api/doimport/{system}/{itype}/{tag}": _image_op(
            "Import a squashfs file readable by the gateway",
            "post",
            _ok(_RECORD_REF),
            forbidden,
            _IMPORT_BODY,
        ),
        "/api/expire/{system}/{itype}/{tag}": _image_op(
            "Queue removal of an image",
            "get",
            _ok({"type": "object", "properties": {"status": {"type": "boolean"}}}),
            forbidden,
        ),
        "/api/list/{system}": _system_op(
            "READY images the caller may read",
            _ok(
                {
                    "type": "object",
                    "required": ["list"],
                    "properties": {"list": {"type": "array", "items": _RECORD_REF}},
                }
            ),
        ),
        "/api/autoexpire/{system}": _system_op(
            "Expire images past their time",
            _ok({"type": "object", "properties": {"status": {"type": "array", "items": {"type": "string"}}}}),
            forbidden,
        ),
        "/api/metrics/{system}": _system_op(
            "Last lookups (Metrics: true)",
            _ok({"type": "array", "items": {"type": "object"}}),
            forbidden,
            [
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                }
            ],
        ),
        "/api/queue/{system}": _system_op(
            "Records not READY",
            _ok(
                {
                    "type": "object",
                    "properties": {
                        "list": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"status": {"type": "string"}, "image": {"type": "string"}},
                            },
                        }
                    },
                }
            ),
        ),
        "/api/status": {
            "get": {
                "summary": "Health",
                "security": [],
                "responses": {
                    "200": _ok({"type": "object", "properties": {"status": {"type": "string"}}}),
                    "503": _err("store unavailable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Shifter image gateway",
            "version": "1.0",
            "description": "Routes of the original Shifter image gateway; every route also answers with a "
            "trailing slash.",
        },
        "paths": paths,
        "security": [{"munge": []}],
        "components": {
            "securitySchemes": {
                "munge": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "authentication",
                    "description": "a fresh munge credential per request",
                }
            },
            "schemas": {"Record": _RECORD, "Error": _ERROR},
        },
    }
