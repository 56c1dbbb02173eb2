"""A small getopt for the commands on the hot path.

The stdlib ``getopt`` imports ``gettext`` (and with it ``re``, ``locale`` and ``enum``): ~5 ms
per start, more than the interpreter itself.  This one has getopt_long's semantics: short
options ``"ab:c::"`` (``:`` takes a value, ``::`` an optional attached value), long options
``["flag", "name=", "opt=?"]`` (``=`` a value, ``=?`` an optional ``--opt=value``), ``--``
ends the options, and with ``permute`` False parsing stops at the first non-option
(POSIXLY_CORRECT, as the original launcher did).
"""

from __future__ import annotations

from shifter.errors import ShifterError

TYPE_CHECKING = False  # typing itself is not imported: this module is on the launcher's path
if TYPE_CHECKING:
    from collections.abc import Callable


def _short_spec(shortopts: str) -> dict[str, str]:
    """letter -> "" (flag), ":" (value) or "::" (optional value)."""
    spec: dict[str, str] = {}
    i = 0
    while i < len(shortopts):
        letter = shortopts[i]
        colons = ""
        while i + 1 < len(shortopts) and shortopts[i + 1] == ":" and len(colons) < 2:
            colons += ":"
            i += 1
        spec[letter] = colons
        i += 1
    return spec


def _long_spec(longopts: list[str]) -> dict[str, str]:
    spec: dict[str, str] = {}
    for item in longopts:
        if item.endswith("=?"):
            spec[item[:-2]] = "::"
        elif item.endswith("="):
            spec[item[:-1]] = ":"
        else:
            spec[item] = ""
    return spec


def getopt(args: list[str], shortopts: str, longopts: list[str], *,
           permute: bool = True) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Return ([(option, value or None)], operands); ShifterError names a bad option."""
    shorts, longs = _short_spec(shortopts), _long_spec(longopts)
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            kind = longs.get(name)
            if kind is None:
                raise ShifterError(f"unrecognized option '--{name}'")
            if kind == ":" and not eq:
                if i >= len(args):
                    raise ShifterError(f"option '--{name}' requires a value")
                value, i = args[i], i + 1
            elif kind == "" and eq:
                raise ShifterError(f"option '--{name}' takes no value")
            opts.append((f"--{name}", value if (eq or kind == ":") else None))
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                kind = shorts.get(letter)
                if kind is None:
                    raise ShifterError(f"invalid option -- '{letter}'")
                rest = arg[j + 1:]
                if kind == ":":
                    if not rest:
                        if i >= len(args):
                            raise ShifterError(f"option -{letter} requires a value")
                        rest, i = args[i], i + 1
                    opts.append((f"-{letter}", rest))
                    break
                if kind == "::":
                    opts.append((f"-{letter}", rest or None))
                    break
                opts.append((f"-{letter}", None))
                j += 1
        elif permute:
            operands.append(arg)
        else:
            operands.extend(args[i - 1:])
            break
    return opts, operands


def exit_fast(main: Callable[[], int]) -> None:
    """Run a root command's main and leave with os._exit: skips the interpreter's teardown (a few ms)."""
    import os
    import sys

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
