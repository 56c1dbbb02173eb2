"""imagemanager.json: the original gateway's keys, strictly checked.

The original silently ignored unknown or misspelt keys (its own code read
``PullUpdateTime`` and ``ConvertOptions``); here an unknown key, a missing
required key or a value of the wrong type stops the gateway at start-up with a
message naming the key (and the closest known key for a typo).

Keys added by this implementation (documented in docs/gateway.md):
``Store``, ``Listen``, ``AccessLog``, ``LogFile``, ``ImagePlatform``, ``MaxImageBytes``, ``ExaminerTimeout``,
``GatewayAddresses``, ``UnboundCredentials``, ``APIProcesses``.

The validated result is a gateway.config.GatewayConfig (the types live there, so the
modules that only read a configuration need not import the reader).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

from gateway.config import GatewayConfig, LocationConfig, PlatformConfig, SshConfig
from shifter.errors import ShifterError

IMAGE_FORMATS = ("squashfs", "cramfs", "ext4", "mock")
AUTH_MODES = ("munge", "mock")
UNBOUND_MODES = ("reject", "read-only", "accept")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical")


# -- schema ------------------------------------------------------------------

_TOP_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "DefaultImageLocation": (str, False),
    "DefaultImageFormat": (str, False),
    "PullUpdateTimeout": ((int, float), False),
    "ImageExpirationTimeout": ((str, int), False),
    "MongoDBURI": (str, False),
    "MongoDB": (str, False),
    "CacheDirectory": (str, True),
    "ExpandDirectory": (str, True),
    "Locations": (dict, False),
    "Platforms": (dict, True),
    "ImportUsers": ((str, list), False),
    "ConverterOptions": (dict, False),
    "WorkerThreads": (int, False),
    "Metrics": (bool, False),
    "examiner": ((str, type(None)), False),
    "LogLevel": (str, False),
    "Authentication": (str, False),
    "DefaultLustreReplication": ((int, str), False),
    "DefaultOstCount": ((int, str), False),
    # extensions
    "Store": (str, False),
    "Listen": ((list, str), False),
    "AccessLog": ((str, type(None)), False),
    "LogFile": ((str, type(None)), False),
    "ImagePlatform": (str, False),
    "MaxImageBytes": (int, False),
    "ExaminerTimeout": ((int, float), False),
    "GatewayAddresses": (list, False),
    "UnboundCredentials": (str, False),
    "PullDeadline": ((int, float), False),
    "MaxImagePaths": (int, False),
    "APIProcesses": (int, False),
}

_LOCATION_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "remotetype": (str, False),
    "url": (str, False),
    "authentication": (str, False),  # accepted for compatibility; the original never used it
    "sslcacert": (str, False),
    "authMethod": (str, False),
}

_PLATFORM_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "mungeSocketPath": (str, False),
    "accesstype": (str, True),
    "admins": (list, False),
    "local": (dict, False),
    "host": (list, False),
    "ssh": (dict, False),
    "use_external": (bool, False),
    "policy_file": (str, False),
    "usergroupService": (str, False),  # ignored by the original too
    "mountCommand": (str, False),  # ignored by the original too
}

_SSH_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "username": (str, False),
    "key": (str, False),
    "imageDir": (str, True),
    "sshCmdOptions": (list, False),
    "scpCmdOptions": (list, False),
}

_LOCAL_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {"imageDir": (str, True)}


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in types)


def _json_type(value: Any) -> str:
    return {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_object(
    obj: Any, schema: dict[str, tuple[type | tuple[type, ...], bool]], where: str, source: str
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ShifterError(f"{source}: {where or 'the document'} must be an object, got {_json_type(obj)}")
    prefix = f"{where}." if where else ""
    for key, value in obj.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ShifterError(f"{source}: unknown key {prefix}{key}{hint}")
        expected, _required = schema[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ShifterError(
                f"{source}: key {prefix}{key} must be {_type_name(expected)}, got {_json_type(value)}"
            )
    for key, (_t, required) in schema.items():
        if required and key not in obj:
            raise ShifterError(f"{source}: missing required key {prefix}{key}")
    return obj


def _str_list(value: list[Any], name: str, source: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in value):
        raise ShifterError(f"{source}: key {name} must be a list of strings")
    return tuple(value)


def parse_duration(value: str | int, name: str, source: str) -> float:
    """The original's ``"D:H:M:S"`` (fewer fields count from the right), or seconds."""
    if isinstance(value, int):
        if value < 0:
            raise ShifterError(f"{source}: key {name} must not be negative")
        return float(value)
    parts = value.strip().split(":")
    if not 1 <= len(parts) <= 4 or not all(p.strip().isdigit() for p in parts):
        raise ShifterError(f'{source}: key {name} must be "D:H:M:S", got {value!r}')
    scale = (86400, 3600, 60, 1)[-len(parts) :]
    return float(sum(int(p) * s for p, s in zip(parts, scale, strict=True)))


def _parse_listen(value: list[Any] | str, source: str) -> tuple[tuple[str, int], ...]:
    items = [value] if isinstance(value, str) else value
    result = []
    for item in items:
        if not isinstance(item, str):
            raise ShifterError(f'{source}: key Listen must be a list of "host:port" strings')
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ShifterError(f"{source}: key Listen has a bad address {item!r} (want host:port)")
        result.append((host, int(port)))
    if not result:
        raise ShifterError(f"{source}: key Listen must name at least one address")
    return tuple(result)


def _parse_addresses(value: list[Any], source: str) -> tuple[str, ...]:
    """``GatewayAddresses``: the host:port names clients use for this gateway (imageGateway URLs)."""
    result = []
    for item in value:
        host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ShifterError(f"{source}: key GatewayAddresses has a bad address {item!r} (want host:port)")
        result.append(f"{host.strip('[]').lower()}:{int(port)}")
    return tuple(result)


def _parse_location(name: str, obj: Any, source: str) -> LocationConfig:
    _check_object(obj, _LOCATION_KEYS, f"Locations.{name}", source)
    remotetype = obj.get("remotetype", "dockerv2")
    if remotetype != "dockerv2":
        raise ShifterError(
            f'{source}: key Locations.{name}.remotetype must be "dockerv2", got {remotetype!r}'
        )
    method = obj.get("authMethod", "token")
    if method not in ("token", "basic"):
        raise ShifterError(f'{source}: key Locations.{name}.authMethod must be "token" or "basic"')
    url = obj.get("url") or f"https://{name}"
    if not url.startswith(("http://", "https://")):
        raise ShifterError(f"{source}: key Locations.{name}.url must start with http:// or https://")
    return LocationConfig(
        name=name,
        url=url.rstrip("/"),
        remotetype=remotetype,
        sslcacert=obj.get("sslcacert"),
        auth_method=method,
    )


def _parse_platform(name: str, obj: Any, source: str) -> PlatformConfig:
    where = f"Platforms.{name}"
    _check_object(obj, _PLATFORM_KEYS, where, source)
    access = obj["accesstype"]
    admins = _str_list(obj.get("admins", []), f"{where}.admins", source)
    hosts = _str_list(obj.get("host", []), f"{where}.host", source)
    ssh = None
    if "ssh" in obj:
        s = _check_object(obj["ssh"], _SSH_KEYS, f"{where}.ssh", source)
        ssh = SshConfig(
            username=s.get("username"),
            key=s.get("key"),
            image_dir=s["imageDir"],
            ssh_options=_str_list(s.get("sshCmdOptions", []), f"{where}.ssh.sshCmdOptions", source),
            scp_options=_str_list(s.get("scpCmdOptions", []), f"{where}.ssh.scpCmdOptions", source),
        )
    if access == "local":
        if "local" not in obj:
            raise ShifterError(f"{source}: missing required key {where}.local (accesstype is local)")
        image_dir = _check_object(obj["local"], _LOCAL_KEYS, f"{where}.local", source)["imageDir"]
    elif access == "remote":
        if ssh is None or not hosts:
            raise ShifterError(f"{source}: {where} with accesstype remote needs keys host and ssh")
        if "local" in obj:
            _check_object(obj["local"], _LOCAL_KEYS, f"{where}.local", source)
        image_dir = ssh.image_dir
    else:
        raise ShifterError(f'{source}: key {where}.accesstype must be "local" or "remote", got {access!r}')
    if not os.path.isabs(image_dir):
        raise ShifterError(f"{source}: key {where} imageDir must be an absolute path")
    return PlatformConfig(
        name=name,
        munge_socket=obj.get("mungeSocketPath"),
        accesstype=access,
        admins=admins,
        image_dir=image_dir,
        hosts=hosts,
        ssh=ssh,
        use_external=obj.get("use_external", False),
        policy_file=obj.get("policy_file"),
    )


def _parse_converter_options(obj: dict[str, Any], source: str) -> dict[str, tuple[str, ...]]:
    result = {}
    for fmt, opts in obj.items():
        if fmt not in IMAGE_FORMATS:
            raise ShifterError(
                f"{source}: unknown key ConverterOptions.{fmt} (formats: {', '.join(IMAGE_FORMATS)})"
            )
        if isinstance(opts, str):
            result[fmt] = tuple(opts.split())
        elif isinstance(opts, list) and all(isinstance(o, str) for o in opts):
            result[fmt] = tuple(opts)
        else:
            raise ShifterError(f"{source}: key ConverterOptions.{fmt} must be a string or a list of strings")
    if "squashfs" in result:  # refuse unknown compressor options now, not at the first pull
        from gateway.convert import compressor_options

        try:
            compressor_options(list(result["squashfs"]))
        except ShifterError as err:
            raise ShifterError(f"{source}: {err}") from None
    return result


def parse_config(text: str, source: str = "imagemanager.json") -> GatewayConfig:
    """Validate the JSON text of an imagemanager.json; ShifterError names the offending key."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ShifterError(f"{source}: not valid JSON: {err}") from None
    _check_object(doc, _TOP_KEYS, "", source)
    platforms = {n: _parse_platform(n, p, source) for n, p in doc["Platforms"].items()}
    if not platforms:
        raise ShifterError(f"{source}: key Platforms must name at least one system")
    for n in platforms:
        if not n or "/" in n or n.strip() != n:
            raise ShifterError(f"{source}: bad system name {n!r} in Platforms")
    locations = {n: _parse_location(n, loc, source) for n, loc in doc.get("Locations", {}).items()}
    default_location = doc.get("DefaultImageLocation", "registry-1.docker.io")
    fmt = doc.get("DefaultImageFormat", "squashfs")
    if fmt != "squashfs":  # the only format the pipeline builds: anything else rebuilt on every pull
        raise ShifterError(f'{source}: key DefaultImageFormat must be "squashfs" (the only format'
                           f" this gateway builds), got {fmt!r}")
    auth = doc.get("Authentication", "munge")
    if auth not in AUTH_MODES:
        raise ShifterError(f'{source}: key Authentication must be "munge" or "mock", got {auth!r}')
    level = doc.get("LogLevel", "info").lower()
    if level not in LOG_LEVELS:
        raise ShifterError(f"{source}: key LogLevel must be one of {', '.join(LOG_LEVELS)}")
    threads = doc.get("WorkerThreads", 2)
    if not 1 <= threads <= 64:
        raise ShifterError(f"{source}: key WorkerThreads must be between 1 and 64")
    pull_timeout = float(doc.get("PullUpdateTimeout", 300))
    if pull_timeout <= 0:
        raise ShifterError(f"{source}: key PullUpdateTimeout must be positive")
    expiration = None
    if "ImageExpirationTimeout" in doc:
        expiration = parse_duration(doc["ImageExpirationTimeout"], "ImageExpirationTimeout", source)
    import_users: str | tuple[str, ...] | None = None
    if "ImportUsers" in doc:
        iu = doc["ImportUsers"]
        if isinstance(iu, str):
            if iu.lower() not in ("all", "none"):
                raise ShifterError(f'{source}: key ImportUsers must be "all", "none" or a list of user names')
            import_users = "all" if iu.lower() == "all" else None
        else:
            import_users = _str_list(iu, "ImportUsers", source)
    cache_dir, expand_dir = doc["CacheDirectory"], doc["ExpandDirectory"]
    for key, value in (("CacheDirectory", cache_dir), ("ExpandDirectory", expand_dir)):
        if not os.path.isabs(value):
            raise ShifterError(f"{source}: key {key} must be an absolute path")
    store = doc.get("Store", "sqlite:")
    if store == "sqlite:":
        store = "sqlite:///" + os.path.join(cache_dir, "gateway.db").lstrip("/")
    elif store == "mongodb":
        if "MongoDBURI" not in doc:
            raise ShifterError(f'{source}: key Store is "mongodb" but MongoDBURI is missing')
        store = doc["MongoDBURI"]
    if not (store.startswith("sqlite:///") and len(store) > len("sqlite:///")) and not store.startswith(
        ("mongodb://", "mongodb+srv://")
    ):
        raise ShifterError(
            f'{source}: key Store must be "sqlite:", "sqlite:///<path>", "mongodb" or a '
            f"mongodb:// URI, got {store!r}"
        )
    replication, ostcount = doc.get("DefaultLustreReplication", 1), doc.get("DefaultOstCount", 0)
    try:
        replication, ostcount = int(replication), int(ostcount)
    except ValueError:
        raise ShifterError(
            f"{source}: keys DefaultLustreReplication/DefaultOstCount must be integers"
        ) from None
    plat = doc.get("ImagePlatform", "linux/amd64").split("/")
    if not 2 <= len(plat) <= 3 or not all(plat):
        raise ShifterError(f'{source}: key ImagePlatform must be "os/arch[/variant]", e.g. "linux/amd64"')
    max_bytes = doc.get("MaxImageBytes", 64 << 30)
    if max_bytes <= 0:
        raise ShifterError(f"{source}: key MaxImageBytes must be positive")
    unbound = doc.get("UnboundCredentials", "read-only")
    if unbound not in UNBOUND_MODES:
        raise ShifterError(f"{source}: key UnboundCredentials must be one of {', '.join(UNBOUND_MODES)}")
    examiner_timeout = float(doc.get("ExaminerTimeout", 600))
    if examiner_timeout <= 0:
        raise ShifterError(f"{source}: key ExaminerTimeout must be positive")
    pull_deadline = float(doc.get("PullDeadline", 3600))
    if not 0 < pull_deadline <= 7 * 86400:  # also refuses NaN
        raise ShifterError(f"{source}: key PullDeadline must be between 0 and 604800 seconds")
    max_paths = doc.get("MaxImagePaths", 4_000_000)
    if not 1000 <= max_paths <= 100_000_000:
        raise ShifterError(f"{source}: key MaxImagePaths must be between 1000 and 100000000")
    api_processes = doc.get("APIProcesses", 1)
    if not 1 <= api_processes <= 64:
        raise ShifterError(f"{source}: key APIProcesses must be between 1 and 64, got {api_processes}")
    return GatewayConfig(
        api_processes=api_processes,
        image_platform=(plat[0], plat[1], plat[2] if len(plat) == 3 else None),
        max_image_bytes=max_bytes,
        path=source,
        platforms=platforms,
        locations=locations,
        default_location=default_location,
        default_format=fmt,
        cache_dir=cache_dir,
        expand_dir=expand_dir,
        pull_update_timeout=pull_timeout,
        expiration_timeout=expiration,
        worker_threads=threads,
        authentication=auth,
        import_users=import_users,
        converter_options=_parse_converter_options(doc.get("ConverterOptions", {}), source),
        examiner=doc.get("examiner") or None,
        examiner_timeout=examiner_timeout,
        pull_deadline=pull_deadline,
        max_image_paths=max_paths,
        metrics=doc.get("Metrics", False),
        log_level=level,
        store=store,
        mongodb_uri=doc.get("MongoDBURI"),
        mongodb_name=doc.get("MongoDB", "Shifter"),
        listen=_parse_listen(doc["Listen"], source) if "Listen" in doc else (("0.0.0.0", 5000),),
        access_log=doc.get("AccessLog"),
        log_file=doc.get("LogFile"),
        replication=replication,
        ostcount=ostcount,
        gateway_addresses=_parse_addresses(doc.get("GatewayAddresses", []), source),
        unbound_credentials=unbound,
    )


def load_config(path: str) -> GatewayConfig:
    """Read and validate ``path``; the error names the file and the key."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise ShifterError(f"cannot read gateway config {path}: {err.strerror}") from None
    return parse_config(text, path)
