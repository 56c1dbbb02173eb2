"""Shifter modules: which ``module_<name>_*`` blocks of udiRoot.conf a job activates.

The original's rules (reference section 2.10): ``defaultModules`` apply unless
the request (``--module``, ``-m``, ``SHIFTER_MODULE``) names modules, which then
*replace* the defaults; ``none`` disables every module; an unknown or disabled
module is an error, and so is a conflict declared by either module of a pair.
The active names, in order, are part of the reuse marker.
"""

from __future__ import annotations

from shifter.errors import ShifterError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: keep config's import cost off this module
    from shifter.formats.config import ModuleConfig, UdiRootConfig


def _requested_names(config: UdiRootConfig, requested: str | None) -> list[str]:
    if requested is None or not requested.strip():
        names = list(config.default_modules)
    else:
        names = [name.strip() for name in requested.split(",")]
        if any(not name for name in names):
            raise ShifterError(f"empty module name in {requested!r}")
    if "none" in names:
        if len(names) > 1:
            raise ShifterError(f"module 'none' cannot be combined with other modules ({requested!r})")
        return []
    unique: list[str] = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def select_modules(config: UdiRootConfig, requested: str | None) -> list[ModuleConfig]:
    """The active modules, in request order; None or an empty request means defaultModules."""
    selected: list[ModuleConfig] = []
    for name in _requested_names(config, requested):
        module = config.modules.get(name)
        if module is None:
            known = ", ".join(sorted(config.modules)) or "none configured"
            raise ShifterError(f"unknown shifter module {name!r} (known: {known})")
        if not module.enabled:
            raise ShifterError(f"shifter module {name!r} is disabled on this system")
        selected.append(module)
    for index, first in enumerate(selected):
        for second in selected[index + 1:]:
            if second.name in first.conflict or first.name in second.conflict:
                raise ShifterError(f"shifter modules {first.name!r} and {second.name!r} conflict")
    return selected


def module_names(mods: list[ModuleConfig]) -> list[str]:
    """The names, in order, as they go into the reuse marker and SHIFTER_MODULE."""
    return [module.name for module in mods]
