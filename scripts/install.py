#!/usr/bin/python3
"""`make install`: the installed layout of docs/internals.md under PREFIX.

- ``$PREFIX/venv``: a virtualenv of /usr/bin/python3 (reused when present) with this package
  installed non-editable.  Dependencies are installed the first time and whenever
  pyproject.toml's dependency list changes; otherwise only our code is reinstalled
  (``--no-deps``), which keeps a reinstall to a few seconds.
- The generated ``shifter/buildinfo.py`` inside the installed package (PREFIX, CONFIG_FILE).
- The wrapper commands: the launcher, setupRoot, unsetupRoot and the SPANK hook start with
  ``python3 -IS`` (isolated, no site: nothing from the environment, no .pth files) and
  append the venv's site-packages themselves; shifterimg and the gateway use the site.
- ``bin/shifter``: the interpreter-free launcher (shifter/launch/fastlaunch.c), which execs the Python
  launcher ``libexec/shifter/shifter`` for everything but the prepared environment's common case.
- The SPANK plugin, when it has been built.
- Everything under PREFIX root-owned and world-readable, because unprivileged users run
  the launcher while the repository itself may live in a 0700 home directory.

Stdlib only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_PYTHON = "/usr/bin/python3"

# name -> (directory under PREFIX, module, function, isolated without site)
WRAPPERS = {
    "shifter": ("libexec/shifter", "shifter.launch.cli", "main", True),
    "shifterimg": ("bin", "shifter.client.shifterimg", "main", False),
    "setupRoot": ("sbin", "setuproot.__main__", "main", True),
    "unsetupRoot": ("sbin", "unsetuproot.__main__", "main", True),
    "shifter-gateway": ("sbin", "gateway.service", "main", False),
    "spank-hook": ("libexec/shifter", "spank_plugin.hooks", "main", True),
}

FAST_EXIT = {"setupRoot", "unsetupRoot"}


def run(argv: list[str]) -> None:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.exit(f"install: {' '.join(argv)} failed:\n{result.stdout[-4000:]}")


def venv_python(prefix: Path) -> Path:
    return prefix / "venv" / "bin" / "python3"


def ensure_venv(prefix: Path) -> None:
    python = venv_python(prefix)
    cfg = prefix / "venv" / "pyvenv.cfg"
    if python.exists() and cfg.exists() and "home = /usr/bin" in cfg.read_text():
        return
    shutil.rmtree(prefix / "venv", ignore_errors=True)
    run([BASE_PYTHON, "-m", "venv", str(prefix / "venv")])
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "setuptools>=64", "wheel"])


def dependency_stamp() -> str:
    """What the dependency install depends on: the [project] dependencies of pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("dependencies = [")
    # the list's own closing bracket: the first "]" would be the one of "uvicorn[standard]"
    return hashlib.sha256(text[start:text.index("\n]", start)].encode()).hexdigest()


def install_package(prefix: Path, sysconfdir: Path) -> None:
    python = str(venv_python(prefix))
    stamp_file = prefix / "venv" / ".shifter-deps"
    stamp = dependency_stamp()
    deps_current = stamp_file.exists() and stamp_file.read_text() == stamp
    argv = [python, "-m", "pip", "install", "--quiet", "--no-build-isolation"]
    if deps_current:  # same version number: force pip to replace our code, and only our code
        argv += ["--no-deps", "--force-reinstall"]
    # Build from a private copy: pip would otherwise write build/ and *.egg-info into the
    # repository, and the repository may be shared with other users' editable checkouts.
    build_dir = prefix / "venv" / ".build-src"
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.copytree(REPO, build_dir, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "tests"))
    # The build info goes into the copy before pip installs it: a prolog running during a
    # reinstall must never see the repository's defaults (it would look under /usr/local).
    (build_dir / "shifter" / "buildinfo.py").write_text(buildinfo_text(prefix, sysconfdir))
    try:
        run([*argv, str(build_dir)])
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    stamp_file.write_text(stamp)


def site_packages(prefix: Path) -> Path:
    out = subprocess.run([str(venv_python(prefix)), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def buildinfo_text(prefix: Path, sysconfdir: Path) -> str:
    return ('"""Where this installation lives (generated by make install; do not edit)."""\n\n'
            f"PREFIX = {str(prefix)!r}\n"
            f"CONFIG_FILE = {str(sysconfdir / 'udiRoot.conf')!r}\n")


def write_wrappers(prefix: Path, purelib: Path) -> None:
    python = venv_python(prefix)
    for name, (directory, module, function, isolated) in WRAPPERS.items():
        if isolated:
            header = (f"#!{python} -IS\n"
                      f'"""{name}: generated by make install; stdlib start-up, no site, no .pth files."""\n'
                      "import sys\n"
                      f"sys.path.append({str(purelib)!r})\n")
        else:
            header = f"#!{python} -I\n\"\"\"{name}: generated by make install.\"\"\"\nimport sys\n"
        if name in FAST_EXIT:  # root commands: skip the interpreter's teardown on every prolog/epilog
            body = f"from shifter.cmdline import exit_fast\nfrom {module} import {function}\n\nexit_fast({function})\n"
        else:
            body = f"from {module} import {function}\n\nsys.exit({function}())\n"
        write(prefix / directory / name, header + body, 0o755)


def install_binary(source: Path, target: Path) -> None:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, target)  # a new inode: running slurmds and tasks keep the old mapping intact


def install_service_unit(prefix: Path, sysconfdir: Path) -> None:
    """The gateway's systemd unit, for admins to copy into /etc/systemd/system."""
    template = (REPO / "templates" / "shifter-gateway.service.j2").read_text()
    text = template.replace("{{ prefix }}", str(prefix)).replace("{{ sysconfdir }}", str(sysconfdir))
    write(prefix / "share" / "shifter" / "shifter-gateway.service", text, 0o644)
    for doc in ("admin-guide.md", "user-guide.md"):
        source = REPO / "docs" / doc
        if source.exists():
            write(prefix / "share" / "doc" / "shifter-slurm" / doc, source.read_text(), 0o644)


def install_id(prefix: Path) -> None:
    """A digest of what was installed, so the cluster knows when to restart the gateway."""
    digest = hashlib.sha256()
    for package in ("shifter", "setuproot", "unsetuproot", "spank_plugin", "gateway"):
        for path in sorted((REPO / package).rglob("*.py")):
            digest.update(path.read_bytes())
    (prefix / "install-id").write_text(digest.hexdigest() + "\n")


def make_world_readable(prefix: Path) -> None:
    for root, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if os.path.islink(path):
                continue
            if st.st_uid != 0 or st.st_gid != 0:
                os.chown(path, 0, 0)
            mode = st.st_mode & 0o7777
            wanted = (mode | 0o444 | (0o111 if (mode & 0o100 or name in dirs) else 0)) & ~0o022
            if wanted != mode:
                os.chmod(path, wanted)
    os.chown(prefix, 0, 0)
    os.chmod(prefix, 0o755)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="/opt/shifter-slurm")
    parser.add_argument("--sysconfdir", default="")
    parser.add_argument("--plugin", default=str(REPO / "build" / "shifter_spank.so"))
    parser.add_argument("--launcher", default=str(REPO / "build" / "shifter"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("install: run as root (the installed tree must be root-owned)")
    os.umask(0o022)
    started = time.monotonic()
    prefix = Path(args.prefix).resolve()
    sysconfdir = Path(args.sysconfdir).resolve() if args.sysconfdir else prefix / "etc"
    prefix.mkdir(mode=0o755, parents=True, exist_ok=True)
    ensure_venv(prefix)
    install_package(prefix, sysconfdir)
    purelib = site_packages(prefix)
    write_wrappers(prefix, purelib)
    if not Path(args.launcher).exists():
        sys.exit(f"install: {args.launcher} does not exist: build it with `make launcher`")
    install_binary(Path(args.launcher), prefix / "bin" / "shifter")
    if Path(args.plugin).exists():
        install_binary(Path(args.plugin), prefix / "lib" / "shifter" / "shifter_spank.so")
    sysconfdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    install_service_unit(prefix, sysconfdir)
    install_id(prefix)
    make_world_readable(prefix)
    print(f"install: {prefix} ready in {time.monotonic() - started:.1f} s "
          f"(config {sysconfdir / 'udiRoot.conf'})")


if __name__ == "__main__":
    main()
