"""``shifterimg``: ask the image gateway to pull, look up, list, expire or import images.

Compatible with the original C client's command line and outputs: ``lookup`` prints the
image id as the first stdout line (Slurm and scripts parse it), ``images`` prints the
original's columns, ``pull`` prints the original's status line when stdout is not a
terminal, ``login`` writes the original's ``~/.udiRoot/.cred``. Differences: ``pull``
exits non-zero when the pull fails, a terminal gets a live progress line (phase,
layers, bytes), ``import`` exists, and errors are one line on stderr.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

from shifter.client import munge
from shifter.client.gatewayclient import GatewayClient, cred_path
from shifter.errors import ShifterError
from shifter.formats.imageref import ImageRef, parse_image_ref

IN_PROGRESS = ("MISSING", "INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER", "HASHING")
POLL_SECONDS = 0.5


class Context:
    """What every subcommand needs: the site config, the client, the options before the mode."""

    def __init__(self, verbose: bool, users: str | None, groups: str | None) -> None:
        self.verbose = verbose
        self.users = users
        self.groups = groups
        self._config: Any = None
        self._client: GatewayClient | None = None

    @property
    def config(self) -> Any:
        if self._config is None:
            from shifter.formats.config import config_path, load_config

            self._config = load_config(config_path(dict(os.environ)))
        return self._config

    def client(self) -> GatewayClient:
        """One client per command: a pull's polls keep away from a gateway that did not answer."""
        if self._client is None:
            cfg = self.config
            if not cfg.system:
                raise ShifterError("udiRoot.conf does not set system")
            self._client = GatewayClient(
                cfg.image_gateways, cfg.system, float(cfg.gateway_timeout or 60),
                gateway_user=cfg.image_gateway_user,
                warn=lambda line: click.echo(f"shifterimg: {line}", err=True),
            )
        return self._client

    def ref(self, text: str) -> ImageRef:
        ref = parse_image_ref(text, self.config.default_image_type)
        if ref.type not in ("docker", "custom"):
            raise ShifterError(f"the image gateway manages docker and custom images, not {ref.type}: {text}")
        return ref

    def acl(self) -> tuple[list[int], list[int]]:
        return _ids(self.users, pwd.getpwnam, "user"), _ids(self.groups, grp.getgrnam, "group")


def _ids(text: str | None, lookup: Callable[[str], Any], what: str) -> list[int]:
    """Comma list of names or numbers (the original's rule: ids <= 0 are dropped)."""
    result: list[int] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item.lstrip("-").isdigit():
            number = int(item)
        else:
            try:
                entry = lookup(item)
            except KeyError:
                raise ShifterError(f"unknown {what} {item!r}") from None
            number = entry[2]
        if number > 0 and number not in result:
            result.append(number)
    return result


def fail(message: str) -> NoReturn:
    click.echo(f"shifterimg: {message}", err=True)
    sys.exit(1)


def _run(action: Callable[[], int | None]) -> None:
    try:
        code = action()
    except ShifterError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted")
    sys.exit(code or 0)


def status_line(ref: ImageRef, status: str, when: float | None = None) -> str:
    """The original's poll line: ``%Y-%m-%dT%H:%M:%S Pulling Image: <type>:<tag>, status: <STATUS>``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when if when is not None else time.time()))
    return f"{stamp} Pulling Image: {ref.type}:{ref.tag}, status: {status}"


def _progress_detail(message: str) -> str:
    """``layers 2/3, 120.4/310.0 MB`` from the gateway's ``phase: k=v, ...`` status message."""
    _phase, _, rest = message.partition(": ")
    fields = {}
    for part in rest.split(", "):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    out = []
    if "layers" in fields:
        out.append(f"layers {fields.get('layers_done', '0')}/{fields['layers']}")
    try:
        if "bytes_total" in fields:
            out.append(f"{int(fields.get('bytes', 0)) / 1e6:.1f}/{int(fields['bytes_total']) / 1e6:.1f} MB")
    except ValueError:
        pass
    return ", ".join(out)


def format_images(records: list[dict[str, Any]]) -> list[str]:
    """The original's ``images`` lines: one per tag, sorted by tag."""
    rows = []
    for rec in records:
        tags = rec.get("tag")
        tags = [tags] if isinstance(tags, str) else [t for t in tags or [] if isinstance(t, str)]
        last = rec.get("last_pull")
        when = float(last) if isinstance(last, int | float) and not isinstance(last, bool) else 0.0
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
        image_id = rec.get("id") if isinstance(rec.get("id"), str) else ""
        for tag in tags:
            rows.append(
                (
                    tag,
                    f"{str(rec.get('system', '')):<10} {str(rec.get('itype', '')):<10} "
                    f"{str(rec.get('status', '')):<8} {image_id[:10]}   {stamp} {tag:<30}",
                )
            )
    return [line for _tag, line in sorted(rows, key=lambda r: r[0].encode())]


# -- the command line ------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show the gateway's raw responses.")
@click.option("-u", "--user", "users", metavar="LIST", help="Users (names or uids) allowed to use it.")
@click.option("-g", "--group", "groups", metavar="LIST", help="Groups (names or gids) allowed to use it.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, users: str | None, groups: str | None) -> None:
    """Manage images on the Shifter image gateway (gateways and system come from udiRoot.conf)."""
    ctx.obj = Context(verbose, users, groups)


@cli.command()
@click.argument("image")
@click.pass_obj
def lookup(obj: Context, image: str) -> None:
    """Print the id of a READY image (first line of stdout)."""

    def run() -> None:
        rec = obj.client().lookup(obj.ref(image))
        if obj.verbose:
            click.echo(f"Message: {json.dumps(rec)}")
        click.echo(rec["id"])

    _run(run)


def _pull_once(obj: Context, ref: ImageRef) -> dict[str, Any]:
    uids, gids = obj.acl()
    rec = obj.client().pull(ref, uids, gids)
    if obj.verbose:
        click.echo(f"Message: {json.dumps(rec)}")
    return rec


@cli.command()
@click.argument("image")
@click.pass_obj
def pull(obj: Context, image: str) -> None:
    """Pull an image and wait until it is READY (exit 1 if the pull fails)."""

    def run() -> int:
        ref = obj.ref(image)
        rec = _pull_once(obj, ref)
        tty = sys.stdout.isatty() and not obj.verbose
        last_status = None
        while True:
            status = str(rec.get("status"))
            if tty:
                detail = _progress_detail(str(rec.get("status_message") or ""))
                line = status_line(ref, status) + (f" ({detail})" if detail else "")
                click.echo(f"\r\x1b[2K{line}", nl=False)
            elif obj.verbose or status != last_status:
                click.echo(status_line(ref, status))
            last_status = status
            if status not in IN_PROGRESS:
                break
            time.sleep(POLL_SECONDS)
            rec = _pull_once(obj, ref)
        if tty:
            click.echo("")
        if status != "READY":
            message = rec.get("status_message")
            fail(f"pull of {ref} ended with status {status}" + (f": {message}" if message else ""))
        return 0

    _run(run)


@cli.command()
@click.argument("image")
@click.pass_obj
def pullnb(obj: Context, image: str) -> None:
    """Start a pull and return at once (prints one status line)."""

    def run() -> int:
        ref = obj.ref(image)
        rec = _pull_once(obj, ref)
        click.echo(status_line(ref, str(rec.get("status"))))
        return 1 if rec.get("status") == "FAILURE" else 0

    _run(run)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.pass_obj
def images(obj: Context, as_json: bool) -> None:
    """List the READY images you may use."""

    def run() -> None:
        records = obj.client().images()
        if as_json:
            click.echo(json.dumps(records, indent=2))
            return
        for line in format_images(records):
            click.echo(line)

    _run(run)


@cli.command()
@click.argument("location", default="default")
@click.pass_obj
def login(obj: Context, location: str) -> None:
    """Store registry credentials for LOCATION (sealed with munge in ~/.udiRoot/.cred)."""

    def run() -> None:
        import getpass

        if not location or any(c in location for c in "=\n\r \t"):
            raise ShifterError(f"bad location name {location!r}")
        system = obj.config.system
        if not system:
            raise ShifterError("udiRoot.conf does not set system")
        username = _prompt(f"{location} username: ")
        password = getpass.getpass(f"{location} password: ")
        if not username or ":" in username or "\n" in username + password:
            raise ShifterError("the username must be non-empty and contain no ':'")
        # sealed for this uid only: the file's mode is not the only thing keeping the password
        cred = munge.encode(f"{username}:{password}".encode(), munge.client_socket(), decoder_uid=os.getuid())
        store_credential(cred_path(), system, location, cred)

    _run(run)


def _prompt(text: str) -> str:
    try:
        with open("/dev/tty", "r+", encoding="utf-8") as tty:
            tty.write(text)
            tty.flush()
            return tty.readline().strip()
    except OSError:
        sys.stderr.write(text)
        sys.stderr.flush()
        return sys.stdin.readline().strip()


def store_credential(path: str, system: str, location: str, cred: str) -> None:
    """Replace or add the ``<system>:<location>=<cred>`` line; dir 0700, file 0600, written atomically."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    key = f"{system}:{location}"
    lines = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [line.rstrip("\n") for line in fh if line.strip() and line.partition("=")[0] != key]
    except FileNotFoundError:
        pass
    lines.append(f"{key}={cred}")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.rename(tmp, path)


@cli.command()
@click.argument("image")
@click.pass_obj
def expire(obj: Context, image: str) -> None:
    """Remove an image from the system (gateway admins only)."""
    _run(lambda: obj.client().expire(obj.ref(image)) and None)


@cli.command()
@click.pass_obj
def autoexpire(obj: Context) -> None:
    """Expire every image past its expiration time (gateway admins only)."""

    def run() -> None:
        expired = obj.client().autoexpire()
        if obj.verbose:
            click.echo(f"Message: {json.dumps(expired)}")

    _run(run)


@cli.command(name="import")
@click.argument("path")
@click.argument("image")
@click.pass_obj
def import_(obj: Context, path: str, image: str) -> None:
    """Publish a squashfs file PATH (readable by the gateway) as IMAGE, e.g. custom:mytool (ImportUsers)."""

    def run() -> int:
        ref = parse_image_ref(image, "custom")
        uids, gids = obj.acl()
        client = obj.client()
        rec = client.doimport(ref, os.path.abspath(path), "squashfs", uids, gids)
        deadline = time.monotonic() + 3600
        while rec.get("status") in IN_PROGRESS and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            try:
                rec = client.lookup(ref)
            except ShifterError:
                rec = client.doimport(ref, os.path.abspath(path), "squashfs", uids, gids)
        if rec.get("status") != "READY":
            fail(f"import of {ref} ended with status {rec.get('status')}: {rec.get('status_message')}")
        click.echo(rec["id"])
        return 0

    _run(run)


def main() -> None:
    cli(prog_name="shifterimg")


if __name__ == "__main__":
    main()
