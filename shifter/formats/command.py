"""Which argv a ``shifter`` invocation executes (the original's ``calculate_args``, section 2.1).

* arguments and no ``--entrypoint``: the arguments;
* ``--entrypoint`` without a value: the image ENTRYPOINT followed by the
  arguments, or by the image CMD when there are none (an error if the image has
  no ENTRYPOINT);
* ``--entrypoint=cmd``: cmd followed by the arguments (the image CMD is ignored);
* nothing at all: ``shell`` (the caller's ``$SHELL``), else ``/bin/sh``.
  The image CMD alone is never used without ``--entrypoint``.
"""

from __future__ import annotations

from shifter.errors import ShifterError

DEFAULT_SHELL = "/bin/sh"


def select_command(
    args: list[str],
    entrypoint: None | bool | str,
    image_entry: list[str] | None,
    image_cmd: list[str] | None,
    shell: str | None,
) -> list[str]:
    """The argv to exec; ``entrypoint`` is None/False (not given), True (``--entrypoint``) or a command."""
    if entrypoint is True:
        if not image_entry:
            raise ShifterError("--entrypoint: the image defines no ENTRYPOINT (use --entrypoint=<command>)")
        return [*image_entry, *(args or image_cmd or [])]
    if isinstance(entrypoint, str):
        if not entrypoint:
            raise ShifterError("--entrypoint=: empty command")
        return [entrypoint, *args]
    if args:
        return list(args)
    return [shell or DEFAULT_SHELL]
