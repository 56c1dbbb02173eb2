"""The container environment of a task, with the original's precedence (reference section 2.9).

Later steps override earlier ones:

1. the caller's environment (``--clearenv`` passes an empty one);
2. ``SHIFTER_IMAGEREQUEST`` and ``SHIFTER_IMAGE``;
3. the image's ENV (replace);
4. ``--env-file`` entries (replace);
5. ``--env`` entries (replace);
6. for each active module in order: siteEnv (replace), siteEnvAppend
   (``VAR=old:new``), siteEnvPrepend (``VAR=new:old``), siteEnvUnset;
7. the global siteEnv, siteEnvAppend, siteEnvPrepend, siteEnvUnset.

As in the original, an entry without ``=`` or with an empty value is ignored
when it comes from the image or the site, and is an error when the user gave it;
appending or prepending to a missing or empty variable just sets it.
"""

from __future__ import annotations

from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only
    from shifter.formats.config import ModuleConfig, UdiRootConfig


def _split(item: str) -> tuple[str, str] | None:
    name, sep, value = item.partition("=")
    if not name or not sep or not value or "\0" in item:
        return None
    return name, value


def _user_entry(item: str, origin: str) -> tuple[str, str]:
    pair = _split(item)
    if pair is None:
        raise ShifterError(f"improperly formatted environment variable from {origin}: {item!r} (want X=Y)")
    return pair


# One environment change: ("=", name, value) set, ("+", ...) append, ("^", ...) prepend, ("-", name, "") unset,
# ("%", name, "1,3") renumber device indices (see renumber_devices).
# The site's and the image's changes are kept in this form so that setupRoot can hand them to the
# interpreter-free launcher (shifter/formats/launchplan.py), which replays them in the same order.
Operation = tuple[str, str, str]


def _site_operations(setting: list[str], append: list[str], prepend: list[str], unset: list[str]) -> list[Operation]:
    ops: list[Operation] = []
    for kind, items in (("=", setting), ("+", append), ("^", prepend)):
        for item in items:
            pair = _split(item)
            if pair:
                ops.append((kind, pair[0], pair[1]))
    ops.extend(("-", name, "") for name in unset)
    return ops


def image_operations(image_env: list[str]) -> list[Operation]:
    """The image's ENV: malformed entries are ignored, as in the original."""
    return [("=", *pair) for pair in map(_split, image_env) if pair]


def site_operations(modules: list[ModuleConfig], config: UdiRootConfig) -> list[Operation]:
    """Each active module's siteEnv settings in order, then the global ones."""
    ops: list[Operation] = []
    for module in modules:
        ops += _site_operations(module.site_env, module.site_env_append, module.site_env_prepend,
                                module.site_env_unset)
    return ops + _site_operations(config.site_env, config.site_env_append, config.site_env_prepend,
                                  config.site_env_unset)


def renumber_devices(value: str, ids: str) -> str:
    """``CUDA_VISIBLE_DEVICES=3`` with the job's GPUs ``1,3`` -> ``1``: each node index becomes its
    place in ``ids`` (the GPUs the container shows); an index not in it is dropped (never widened);
    anything else (``GPU-<uuid>``, ``MIG-...``) names a device the same way everywhere and is kept.
    fastlaunch.c does the same for the prepared path."""
    places = {item: str(place) for place, item in enumerate(ids.split(","))}
    out = []
    for item in value.split(","):
        if item.isascii() and item.isdigit():
            if str(int(item)) in places:
                out.append(places[str(int(item))])
        elif item:
            out.append(item)
    return ",".join(out)


def apply_operations(env: dict[str, str], ops: list[Operation]) -> None:
    """Appending or prepending to a missing or empty variable just sets it."""
    for kind, name, value in ops:
        if kind == "-":
            env.pop(name, None)
            continue
        if kind == "%":
            if name in env:
                env[name] = renumber_devices(env[name], value)
            continue
        old = env.get(name)
        if kind == "+" and old:
            value = f"{old}:{value}"
        elif kind == "^" and old:
            value = f"{value}:{old}"
        env[name] = value


def build_environment(
    base: dict[str, str],
    image_request: str | None,
    image_id: str | None,
    image_env: list[str],
    env_file: list[str],
    cli_env: list[str],
    modules: list[ModuleConfig],
    config: UdiRootConfig,
) -> dict[str, str]:
    """The environment the command is executed with; ``base`` is not modified."""
    env = dict(base)
    if image_request:
        env["SHIFTER_IMAGEREQUEST"] = image_request
    if image_id:
        env["SHIFTER_IMAGE"] = image_id
    apply_operations(env, image_operations(image_env))
    for origin, items in (("--env-file", env_file), ("--env", cli_env)):
        for item in items:
            name, value = _user_entry(item, origin)
            env[name] = value
    apply_operations(env, site_operations(modules, config))
    return env


def parse_env_file(text: str, source: str = "--env-file") -> list[str]:
    """``--env-file`` lines: blank and ``#`` lines skipped, others must hold ``=``; quotes stay literal."""
    entries: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if "=" not in line:
            raise ShifterError(f"{source} line {number}: {line!r} is not NAME=value")
        entries.append(line)
    return entries
