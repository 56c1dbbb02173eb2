"""The ``shifterimg`` command against the real gateway, registry (one public, one behind
htpasswd) and munged: output formats of the original, exit codes, login and private images."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_registry import PYTHON, REPO, GatewayProcess, Munged, Registry, gateway_config, have, run_shifterimg

from localcluster import oci
from shifter.client import munge
from shifter.formats.meta import read_meta

missing = have("munged", "docker-registry", "tar2sqfs")
pytestmark = [
    pytest.mark.skipif(missing is not None, reason=f"needs {missing}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: udiRoot.conf must be root-owned"),
]
NOBODY = 65534
PRIVATE_LOGIN = ("alice", "s3cret:with:colons")


class Site:
    def __init__(
        self, shared: Path, munged: Munged, public: Registry, private: Registry, gateway: GatewayProcess
    ) -> None:
        self.shared = shared
        self.munged = munged
        self.public = public
        self.private = private
        self.gateway = gateway
        self.conf = shared / "udiRoot.conf"

    def run(
        self,
        *args: str,
        uid: int = 0,
        stdin: str | None = None,
        home: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        home = home or self.shared / f"home-{uid}"
        home.mkdir(exist_ok=True)
        if uid:
            os.chown(home, uid, uid)
        return run_shifterimg(self.conf, self.munged.socket, *args, home=home, uid=uid, stdin=stdin)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("shifterimg")
    shared = Path(tempfile.mkdtemp(prefix="shifter-test-site-"))  # reachable by other uids
    os.chmod(shared, 0o755)
    munged = Munged().start()
    public = Registry(root, "public").start()
    private = Registry(root, "private", htpasswd=PRIVATE_LOGIN).start()
    gateway = None
    try:
        layer = oci.tar_bytes([oci.file("bin/hello", b"hello\n", 0o755)])
        oci.push_image(public.url, "test/small", "v1", [oci.gzip_bytes(layer)], oci.image_config([layer]))
        secret = oci.tar_bytes([oci.file("secret.txt", b"private data\n")])
        oci.push_image(
            private.url,
            "secret/app",
            "v1",
            [oci.gzip_bytes(secret)],
            oci.image_config([secret]),
            auth=PRIVATE_LOGIN,
        )
        config = gateway_config(root, public, munged.socket)
        config["Locations"][private.addr] = {"url": private.url, "authMethod": "basic"}
        gateway = GatewayProcess(root, config).start()
        site = Site(shared, munged, public, private, gateway)
        site.conf.write_text(
            "system=testsys\n"
            f"imageGateway=http://127.0.0.1:1 {gateway.url}\n"  # the first one is down: failover
            "udiMount=/var/udiMount\nloopMount=/var/udiLoopMount\n"
            f"imagePath={root / 'images'}\nudiRootPath=/usr/local\netcPath=/usr/local/etc\nrootfsType=tmpfs\n"
        )
        os.chmod(site.conf, 0o644)
        yield site
    finally:
        if gateway is not None:
            gateway.stop()
        private.stop()
        public.stop()
        munged.stop()
        shutil.rmtree(shared, ignore_errors=True)


PULL_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d Pulling Image: docker:test/small:v1, status: [A-Z]+$")


def test_pull_prints_the_original_status_lines_and_lookup_prints_the_id(site: Site) -> None:
    result = site.run("pull", "test/small:v1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(PULL_LINE.match(line) for line in lines), lines
    assert lines[-1].endswith("status: READY")
    result = site.run("lookup", "docker:test/small:v1")
    assert result.returncode == 0, result.stderr
    image_id = result.stdout.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{64}", image_id)
    verbose = site.run("-v", "lookup", "test/small:v1")
    assert verbose.stdout.splitlines()[0].startswith("Message: {")
    # the original's contract: the id is the first line without ':'
    assert [line for line in verbose.stdout.splitlines() if ":" not in line][0] == image_id


def test_lookup_of_a_missing_image_fails_with_one_line(site: Site) -> None:
    result = site.run("lookup", "test/nothing:here")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "shifterimg: image not found: docker:test/nothing:here"


def test_bad_reference_is_refused_before_any_request(site: Site) -> None:
    result = site.run("lookup", "docker:bad tag")
    assert result.returncode == 1
    assert result.stderr.startswith("shifterimg: invalid image reference") and len(result.stderr.splitlines()) == 1


def test_failed_pull_exits_non_zero_with_the_reason(site: Site) -> None:
    result = site.run("pull", "test/absent:v1")
    assert result.returncode == 1
    assert "status: FAILURE" in result.stdout
    assert "shifterimg: pull of docker:test/absent:v1 ended with status FAILURE" in result.stderr
    assert "not found" in result.stderr


def test_pullnb_prints_one_line(site: Site) -> None:
    result = site.run("pullnb", "test/small:v1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and PULL_LINE.match(result.stdout.strip())


def test_images_columns_and_json(site: Site) -> None:
    assert site.run("pull", "test/small:v1").returncode == 0
    result = site.run("images")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if "test/small:v1" in ln)
    assert re.fullmatch(
        r"testsys    docker     READY    [0-9a-f]{10}   \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d "
        r"test/small:v1 {17}",
        line,
    ), repr(line)
    records = json.loads(site.run("images", "--json").stdout)
    assert any("test/small:v1" in r["tag"] for r in records)


def test_expire_and_autoexpire_need_an_admin(site: Site) -> None:
    assert site.run("pull", "test/small:v1").returncode == 0
    result = site.run("expire", "test/small:v1", uid=NOBODY)
    assert result.returncode == 1 and "HTTP 403" in result.stderr
    assert site.run("autoexpire", uid=NOBODY).returncode == 1
    assert site.run("autoexpire").returncode == 0


def test_login_writes_the_original_cred_format(site: Site, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = site.run("login", "registry.example.org", stdin="bob\npw1\n", home=home)
    assert first.returncode == 0, first.stderr
    again = site.run("login", "registry.example.org", stdin="bob\npw2\n", home=home)
    assert again.returncode == 0, again.stderr
    cred = home / ".udiRoot" / ".cred"
    assert oct(cred.stat().st_mode & 0o777) == "0o600" and oct(cred.parent.stat().st_mode & 0o777) == "0o700"
    lines = cred.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testsys:registry.example.org=MUNGE:")
    _uid, _gid, payload = munge.decode(lines[0].split("=", 1)[1], site.munged.socket, accept_stale=True)
    assert payload == b"bob:pw2"


def test_private_image_needs_login_and_is_hidden_from_others(site: Site) -> None:
    tag = f"{site.private.addr}/secret/app:v1"
    home = site.shared / "home-0"
    no_login = site.run("pull", tag, home=site.shared / "home-nologin")
    assert no_login.returncode == 1 and "FAILURE" in no_login.stdout
    login = site.run("login", site.private.addr, stdin="\n".join(PRIVATE_LOGIN) + "\n", home=home)
    assert login.returncode == 0, login.stderr
    import time

    time.sleep(3.5)  # a FAILURE stays visible to polling clients for 3 s before a new pull may start
    pulled = site.run("pull", tag, home=home)
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout
    image_id = site.run("lookup", tag, home=home).stdout.strip()
    meta = read_meta(str(Path(site.gateway.config["Platforms"]["testsys"]["local"]["imageDir"]) / f"{image_id}.meta"))
    assert meta.user_acl == [0]
    hidden = site.run("lookup", tag, uid=NOBODY)
    assert hidden.returncode == 1 and "image not found" in hidden.stderr
    assert tag not in site.run("images", uid=NOBODY).stdout
    shared = site.run("--user", str(NOBODY), "pull", tag, home=home)
    assert shared.returncode == 0, shared.stderr
    assert site.run("lookup", tag, uid=NOBODY).stdout.strip() == image_id
    meta = read_meta(str(Path(site.gateway.config["Platforms"]["testsys"]["local"]["imageDir"]) / f"{image_id}.meta"))
    assert sorted(meta.user_acl) == [0, NOBODY]


def test_pull_on_a_terminal_redraws_one_progress_line(site: Site) -> None:
    import pty

    big = oci.tar_bytes([oci.file(f"d/{i}", os.urandom(2 << 20)) for i in range(4)])
    oci.push_image(site.public.url, "test/tty", "v1", [oci.gzip_bytes(big)], oci.image_config([big]))
    master, slave = pty.openpty()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(site.shared / "home-0"),
        "SHIFTER_UDIROOT_CONF": str(site.conf),
        "SHIFTER_MUNGE_SOCKET": site.munged.socket,
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.Popen(
        [PYTHON, "-m", "shifter.client.shifterimg", "pull", "test/tty:v1"],
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
    )
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    os.close(master)
    text = output.decode()
    assert text.startswith("\r\x1b[2K") and text.count("\r\x1b[2K") >= 1
    assert "Pulling Image: docker:test/tty:v1, status: READY" in text and text.endswith("\n")
