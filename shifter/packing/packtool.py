"""The udiImage and site module builder behind ``python -m shifter.packtool`` (shifter/packtool.py).

An admin's tool, run once per software update on a build host (not a hot path, so click):

    python -m shifter.packtool udiimage /usr/lib/shifter/opt/udiImage
    python -m shifter.packtool module /usr/lib/shifter/modules/mpich \\
        /usr/lib/x86_64-linux-gnu/libmpich.so.12 --alias libmpi.so.12=libmpich.so.12 \\
        --plugin-dir /usr/lib/x86_64-linux-gnu/ucx

See docs/modules-and-sshd.md.
"""

from __future__ import annotations

import sys

import click

from shifter.errors import ShifterError
from shifter.packing.relocate import GLIBC_SONAMES, LIB_DIR, build_module, build_udi_image


def _alias(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        alias, sep, target = value.partition("=")
        if not sep or not alias or not target:
            raise click.BadParameter(f"{value!r}: expected NAME=PACKED, e.g. libmpi.so.12=libmpich.so.12")
        pairs.append((alias, target))
    return pairs


@click.group()
def cli() -> None:
    """Make host binaries and libraries relocatable for /opt/udiImage."""


@cli.command()
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def udiimage(dest: str, force: bool) -> None:
    """Assemble DEST: the host's OpenSSH sshd, ssh, ssh-keygen, sftp-server, every library they
    load (C library and loader included) and sshd_config/ssh_config for /opt/udiImage."""
    libs = build_udi_image(dest, replace=force)
    click.echo(f"{dest}: sshd, ssh, ssh-keygen, sftp-server and {len(libs)} libraries in {LIB_DIR}")


@cli.command()
@click.argument("dest", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--alias", "aliases", multiple=True, callback=_alias, metavar="NAME=PACKED",
              help="Also provide PACKED under NAME in lib64 (repeatable).")
@click.option("--plugin-dir", "plugin_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Also pack this directory's shared objects (plugins loaded by path at run time, "
                   "e.g. /usr/lib/x86_64-linux-gnu/ucx) into lib64/<its name> (repeatable).")
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def module(dest: str, sources: tuple[str, ...], aliases: list[tuple[str, str]], plugin_dirs: tuple[str, ...],
           force: bool) -> None:
    """Pack SOURCES (libraries into lib64, programs into bin) with their dependencies into DEST,
    leaving out the C library family, which the image provides."""
    libs = build_module(dest, sources, aliases=aliases, plugin_dirs=plugin_dirs, replace=force)
    click.echo(f"{dest}: {len(libs)} libraries in {LIB_DIR} ({', '.join(libs)}); "
               f"not packed: {', '.join(sorted(GLIBC_SONAMES))}")


def main() -> None:
    try:
        cli.main(prog_name="packtool", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except ShifterError as err:
        print(f"packtool: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
