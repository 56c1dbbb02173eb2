"""Make host binaries and libraries relocatable into a directory copied into containers.

The original built a static sshd from source for ``/opt/udiImage``; here there is no
source, so the installed Debian binaries are taken together with every shared library they
load, and patchelf rewrites where they look for them:

* **udiImage** (``build_udi_image``): the sshd, ssh, ssh-keygen and sftp-server run inside
  images whose C library may be any version, so *everything* is packed, the C library and
  the loader included.  Executables get the absolute interpreter
  ``/opt/udiImage/lib64/ld-linux-x86-64.so.2`` (PT_INTERP cannot be relative) and every
  object a DT_RPATH of ``$ORIGIN``-relative paths.  DT_RPATH, not DT_RUNPATH, on purpose:
  the loader searches DT_RPATH *before* ``LD_LIBRARY_PATH``, so a user's or an image's
  ``LD_LIBRARY_PATH`` cannot pull the image's libraries into the sshd.
* **modules** (``build_module``): a site library (MPICH ABI: ``libmpi.so.12``) is injected
  into the image's own programs, which already run on the image's C library; so the glibc
  family (``GLIBC_SONAMES``) is left out and everything else the library needs is packed,
  with a DT_RUNPATH of ``$ORIGIN`` so each packed object finds its dependencies next to it.

Dependencies are found without ``ldd`` (which runs the loader on the file): a small ELF
reader lists DT_NEEDED, DT_RPATH/DT_RUNPATH and PT_INTERP, and names are looked up the way
the loader does, in the object's own rpath, then the host's ld.so.conf directories, then the
default ones.  ``check_packed`` verifies the result: every dependency of every packed ELF
file resolves inside the directory or is an excluded glibc name.
"""

from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from shifter.errors import ShifterError

UDI_IMAGE_MOUNT = "/opt/udiImage"
LIB_DIR = "lib64"
SSH_PORT = 1204

#: What a module never packs: the C library's own objects.  They must match the image's
#: loader and libc exactly (they share GLIBC_PRIVATE symbols), and the image's program has
#: already loaded the image's copies before the module's library is looked up.
GLIBC_SONAMES: frozenset[str] = frozenset({
    "ld-linux-x86-64.so.2", "ld-linux.so.2", "ld-linux-aarch64.so.1",
    "libc.so.6", "libm.so.6", "libmvec.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
    "libresolv.so.2", "libutil.so.1", "libanl.so.1", "libBrokenLocale.so.1", "libthread_db.so.1",
    "libnss_files.so.2", "libnss_dns.so.2", "libnss_compat.so.2", "libnss_hesiod.so.2",
    "libc_malloc_debug.so.0",
})

#: The OpenSSH pieces of the udiImage: host path -> path inside the udiImage directory.
OPENSSH_PROGRAMS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/sshd", "sbin/sshd"),
    ("/usr/bin/ssh", "bin/ssh"),
    ("/usr/bin/ssh-keygen", "bin/ssh-keygen"),
    ("/usr/lib/openssh/sftp-server", "libexec/sftp-server"),  # the sftp subsystem (scp uses it too)
)
OPENSSH_MODULI = "/etc/ssh/moduli"
# One host key, ECDSA P-256: setupRoot derives it from the job, identically on every node, so each
# node's clients can check it strictly (setuproot/hostkey.py); other HostKey lines are dropped.
HOST_KEY_TYPES = ("ecdsa",)

_DEFAULT_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                         "/lib", "/usr/lib")


# -- reading ELF files ------------------------------------------------------------------------

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 1, 5, 14, 15, 29


@dataclass(frozen=True)
class ElfFile:
    """What the dynamic loader reads from one ELF file."""

    path: str
    elf_class: int            # 1: 32-bit, 2: 64-bit
    byte_order: str           # "<" or ">"
    machine: int
    interpreter: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]

    def loadable_with(self, other: ElfFile) -> bool:
        """True when the loader would accept ``self`` as a dependency of ``other``."""
        return (self.elf_class, self.byte_order, self.machine) == (other.elf_class, other.byte_order,
                                                                   other.machine)


def is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def read_elf(path: str) -> ElfFile:
    """Parse the header, program headers and dynamic section of ``path`` (no ldd, no readelf)."""
    try:
        with open(path, "rb") as fh:
            return _parse_elf(fh, path)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as err:
        raise ShifterError(f"{path}: not a readable ELF file ({err})") from None


def _parse_elf(fh, path: str) -> ElfFile:
    ident = fh.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ValueError("bad ELF header")
    is64, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
    if is64:
        _type, machine, _ver, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = struct.unpack(
            order + "HHIQQQIHHH", fh.read(42))
        phdr_fmt, dyn_fmt = order + "IIQQQQQQ", order + "qQ"
    else:
        _type, machine, _ver, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = struct.unpack(
            order + "HHIIIIIHHH", fh.read(30))
        phdr_fmt, dyn_fmt = order + "IIIIIIII", order + "iI"
    segments = []  # (type, offset, vaddr, filesz)
    for index in range(phnum):
        fh.seek(phoff + index * phentsize)
        fields = struct.unpack(phdr_fmt, fh.read(struct.calcsize(phdr_fmt)))
        if is64:
            p_type, _pflags, offset, vaddr, _paddr, filesz = fields[:6]
        else:
            p_type, offset, vaddr, _paddr, filesz = fields[:5]
        segments.append((p_type, offset, vaddr, filesz))
    interpreter = None
    for p_type, offset, _vaddr, filesz in segments:
        if p_type == _PT_INTERP:
            fh.seek(offset)
            interpreter = fh.read(filesz).split(b"\0", 1)[0].decode()
    entries: list[tuple[int, int]] = []
    for p_type, offset, _vaddr, filesz in segments:
        if p_type == _PT_DYNAMIC:
            fh.seek(offset)
            raw = fh.read(filesz)
            size = struct.calcsize(dyn_fmt)
            for pos in range(0, len(raw) - size + 1, size):
                tag, value = struct.unpack_from(dyn_fmt, raw, pos)
                if tag == 0:
                    break
                entries.append((tag, value))
    strtab = next((value for tag, value in entries if tag == _DT_STRTAB), None)

    def string(value: int) -> str:
        for p_type, offset, vaddr, filesz in segments:
            if p_type == _PT_LOAD and vaddr <= strtab + value < vaddr + filesz:
                fh.seek(strtab + value - vaddr + offset)
                return _read_cstring(fh)
        raise ValueError("dynamic string outside the file")

    def strings(wanted: int) -> list[str]:
        return [string(value) for tag, value in entries if tag == wanted] if strtab is not None else []

    def paths(wanted: int) -> tuple[str, ...]:
        return tuple(part for text in strings(wanted) for part in text.split(":") if part)

    sonames = strings(_DT_SONAME)
    return ElfFile(path, ident[4], order, machine, interpreter, tuple(strings(_DT_NEEDED)),
                   sonames[0] if sonames else None, paths(_DT_RPATH), paths(_DT_RUNPATH))


def _read_cstring(fh) -> str:
    chunks = []
    while True:
        chunk = fh.read(256)
        if not chunk:
            raise ValueError("unterminated dynamic string")
        end = chunk.find(b"\0")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks).decode()
        chunks.append(chunk)


# -- finding libraries the way the loader does ----------------------------------------------------

def host_library_dirs(conf: str = "/etc/ld.so.conf") -> list[str]:
    """The directories of ld.so.conf (with its includes), then the loader's default ones."""
    found: list[str] = []
    _read_ld_so_conf(conf, found, set())
    for default in _DEFAULT_LIBRARY_DIRS:
        if default not in found:
            found.append(default)
    return [path for path in found if os.path.isdir(path)]


def _read_ld_so_conf(path: str, found: list[str], seen: set[str]) -> None:
    if path in seen or not os.path.isfile(path):
        return
    seen.add(path)
    with open(path) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include "):
                for pattern in line.split()[1:]:
                    pattern = os.path.join(os.path.dirname(path), pattern)
                    for included in sorted(glob.glob(pattern)):
                        _read_ld_so_conf(included, found, seen)
            elif line.startswith("/") and line not in found:
                found.append(line)


def _expand_origin(entry: str, obj: ElfFile) -> str | None:
    """``$ORIGIN`` is the directory of the object; other dynamic tokens are not followed."""
    origin = os.path.dirname(os.path.abspath(obj.path))
    entry = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
    return None if "$" in entry else entry


def find_library(name: str, obj: ElfFile, search_dirs: Sequence[str]) -> ElfFile:
    """The file the loader would map for DT_NEEDED ``name`` of ``obj`` on this host."""
    if "/" in name:
        return read_elf(name)
    own = (obj.rpath if not obj.runpath else ()) + obj.runpath
    dirs = [d for d in (_expand_origin(entry, obj) for entry in own) if d] + list(search_dirs)
    for directory in dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and is_elf(candidate):
            lib = read_elf(candidate)
            if lib.loadable_with(obj):
                return lib
    raise ShifterError(f"{obj.path} needs {name}, which is in none of {', '.join(dirs)}")


def resolve_closure(roots: Iterable[ElfFile], search_dirs: Sequence[str],
                    skip: Callable[[str], bool] = lambda name: False) -> dict[str, ElfFile]:
    """Every library the roots load, transitively: DT_NEEDED name -> host file.

    Names for which ``skip`` is true are neither packed nor followed.
    """
    found: dict[str, ElfFile] = {}
    queue = list(roots)
    for root in queue:
        if root.soname:
            found.setdefault(root.soname, root)
    while queue:
        obj = queue.pop()
        for name in obj.needed:
            if name in found or skip(name):
                continue
            lib = find_library(name, obj, search_dirs)
            found[name] = lib
            queue.append(lib)
    return found


def is_glibc(name: str) -> bool:
    return os.path.basename(name) in GLIBC_SONAMES


# -- copying and patching ---------------------------------------------------------------------------

def _patchelf(*args: str) -> None:
    try:
        result = subprocess.run(["patchelf", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ShifterError("patchelf is not installed (apt-get install patchelf)") from None
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise ShifterError(f"patchelf {' '.join(args)}: {message}")


def _copy(source: str, target: str, mode: int) -> None:
    """Copy the file's content (symlinks followed), writable by the owner for patchelf."""
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    shutil.copyfile(source, target)
    os.chmod(target, mode)


@dataclass(frozen=True)
class Relink:
    """How packed objects are rewritten: the rpath of libraries and of programs, and for
    programs the directory of their interpreter (None keeps the one of the image)."""

    library_rpath: str
    program_rpath: str
    interpreter_dir: str | None
    force_rpath: bool
    skip: Callable[[str], bool]


#: Programs of the udiImage get the absolute library directory: their interpreter is absolute
#: anyway, and the loader expands a program's ``$ORIGIN`` through /proc/self/exe, which a
#: container may not have yet when the sshd starts (a library's ``$ORIGIN`` needs no /proc).
UDI_IMAGE_RELINK = Relink(library_rpath="$ORIGIN", program_rpath=f"{UDI_IMAGE_MOUNT}/{LIB_DIR}",
                          interpreter_dir=f"{UDI_IMAGE_MOUNT}/{LIB_DIR}",
                          force_rpath=True, skip=lambda name: False)
MODULE_RELINK = Relink(library_rpath="$ORIGIN", program_rpath=f"$ORIGIN/../{LIB_DIR}", interpreter_dir=None,
                       force_rpath=False, skip=is_glibc)


def pack(dest: str, programs: Sequence[tuple[str, str]], libraries: Sequence[str], relink: Relink,
         search_dirs: Sequence[str] | None = None, plugin_dirs: Sequence[str] = ()) -> list[str]:
    """Copy ``programs`` (host path, relative target), ``libraries`` and the shared objects of
    ``plugin_dirs`` (loaded by path at run time, e.g. UCX's transports: copied to
    ``lib64/<dir name>/``) with their closure into ``dest`` (which must exist), and rewrite
    them; returns the library names packed in lib64."""
    dirs = host_library_dirs() if search_dirs is None else list(search_dirs)
    program_elves = [read_elf(source) for source, _ in programs]
    library_elves = [read_elf(source) for source in libraries]
    plugins = [(entry, os.path.join(LIB_DIR, os.path.basename(os.path.normpath(top)), entry.name))
               for top in plugin_dirs for entry in _plugin_entries(top)]
    plugin_elves = [read_elf(entry.path) for entry, _ in plugins if not entry.is_symlink()]
    closure = resolve_closure(program_elves + library_elves + plugin_elves, dirs, relink.skip)
    plugin_paths = {elf.path for elf in plugin_elves}
    closure = {name: elf for name, elf in closure.items() if elf.path not in plugin_paths}
    loaders = set()
    if relink.interpreter_dir:
        for elf in program_elves:
            if not elf.interpreter:
                raise ShifterError(f"{elf.path}: a static or non-executable file, not a program to pack")
            loaders.add(os.path.basename(elf.interpreter))
            closure.setdefault(os.path.basename(elf.interpreter), read_elf(elf.interpreter))
    for elf in library_elves:  # asked-for libraries go under their soname, what programs ask for
        closure.setdefault(elf.soname or os.path.basename(elf.path), elf)
    for name, elf in sorted(closure.items()):
        target = os.path.join(dest, LIB_DIR, name)
        _place(elf.path, target, relink, relink.library_rpath, loader=name in loaders)
    for entry, relative in plugins:
        if entry.is_symlink():  # keep the directory's names: the plugin loader looks them up
            os.makedirs(os.path.dirname(os.path.join(dest, relative)), 0o755, exist_ok=True)
            os.symlink(os.path.basename(os.path.realpath(entry.path)), os.path.join(dest, relative))
        else:
            _place(entry.path, os.path.join(dest, relative), relink, "$ORIGIN:$ORIGIN/..")
    for (source, relative), elf in zip(programs, program_elves, strict=True):
        interpreter = os.path.basename(elf.interpreter or "")
        _place(source, os.path.join(dest, relative), relink, _program_rpath(relink, relative),
               interpreter=interpreter)
    return sorted(closure)


def _plugin_entries(top: str) -> list[os.DirEntry]:
    """The shared objects of a plugin directory and the symlinks to them inside it."""
    if not os.path.isdir(top):
        raise ShifterError(f"{top}: not a directory")
    with os.scandir(top) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    kept = []
    for entry in entries:
        real = os.path.realpath(entry.path)
        if ".so" in entry.name and os.path.dirname(real) == os.path.realpath(top) and is_elf(real):
            kept.append(entry)
    return kept


def _place(source: str, target: str, relink: Relink, rpath: str, *, loader: bool = False,
           interpreter: str | None = None) -> None:
    """Copy one object and rewrite its rpath (and a program's interpreter, named by its file
    name).  The loader is only copied: it has no dependencies, and patching it is asking for
    trouble."""
    _copy(source, target, 0o755)
    if loader:
        return
    interp = ()
    if interpreter and relink.interpreter_dir:
        interp = ("--set-interpreter", f"{relink.interpreter_dir}/{interpreter}")
    _patchelf(*interp, "--set-rpath", rpath, *_force(relink), target)
    if interpreter is None:
        os.chmod(target, 0o644)


def _force(relink: Relink) -> tuple[str, ...]:
    return ("--force-rpath",) if relink.force_rpath else ()


def _program_rpath(relink: Relink, relative: str) -> str:
    """``relink.program_rpath`` with ``$ORIGIN/../lib64`` adjusted to the program's depth."""
    if not relink.program_rpath.startswith("$ORIGIN"):
        return relink.program_rpath
    depth = len(os.path.normpath(relative).split(os.sep)) - 1
    return "$ORIGIN/" + "/".join([".."] * depth + [LIB_DIR]) if depth else f"$ORIGIN/{LIB_DIR}"


# -- checking a packed directory ---------------------------------------------------------------------

def check_packed(dest: str, mount_point: str, allowed_missing: Callable[[str], bool]) -> list[str]:
    """Problems with ``dest`` as it will be seen at ``mount_point``: a dependency that is found
    neither inside through the object's own rpath nor in ``allowed_missing``, an rpath or an
    interpreter that points outside.  An empty list means nothing outside is loaded."""
    problems: list[str] = []
    for dirpath, _dirs, files in os.walk(dest):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not is_elf(path):
                continue
            elf = read_elf(path)
            shown = os.path.relpath(path, dest)
            # libc.so.6 also has a PT_INTERP, used only when it is run as a program
            if elf.interpreter and not elf.soname and not allowed_missing(elf.interpreter):
                inside = _inside(dest, mount_point, elf.interpreter)
                if inside is None or not os.path.isfile(inside):
                    problems.append(f"{shown}: interpreter {elf.interpreter} is not in the directory")
            search = []
            for entry in (elf.rpath if not elf.runpath else ()) + elf.runpath:
                expanded = _inside(dest, mount_point, entry) or _expand_origin(entry, elf)
                if expanded is None or not os.path.abspath(expanded).startswith(os.path.abspath(dest) + "/"):
                    problems.append(f"{shown}: rpath entry {entry} points outside the directory")
                elif expanded:
                    search.append(expanded)
            for needed in elf.needed:
                if allowed_missing(needed):
                    continue
                if not any(os.path.isfile(os.path.join(d, needed)) for d in search):
                    problems.append(f"{shown}: needs {needed}, not found through its rpath inside")
    return problems


def _inside(dest: str, mount_point: str, path: str) -> str | None:
    if not path.startswith(mount_point.rstrip("/") + "/"):
        return None
    return os.path.join(dest, path[len(mount_point.rstrip("/")) + 1:])


# -- the two directories an admin builds --------------------------------------------------------------

def sshd_config_text() -> str:
    """The container sshd's configuration; setupRoot replaces ``AllowUsers ToBeReplaced``.

    The sshd runs as the job's user, so it can only log that user in, needs no privilege
    separation user or /run/sshd, and writes its pid where setupRoot lets the user write.
    """
    keys = "".join(f"HostKey {UDI_IMAGE_MOUNT}/etc/ssh_host_{kind}_key\n" for kind in HOST_KEY_TYPES)
    return (
        f"Port {SSH_PORT}\n"
        f"{keys}"
        "StrictModes yes\n"
        "PermitRootLogin no\n"
        f"AuthorizedKeysFile {UDI_IMAGE_MOUNT}/etc/user_auth_keys\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "X11Forwarding yes\n"
        "PermitUserEnvironment no\n"
        "UseDNS no\n"
        f"PidFile {UDI_IMAGE_MOUNT}/var/run/sshd.pid\n"
        f"ModuliFile {UDI_IMAGE_MOUNT}/etc/moduli\n"
        f"Subsystem sftp {UDI_IMAGE_MOUNT}/libexec/sftp-server\n"
        "AcceptEnv PBS_HOSTFILE SLURM_JOB_NODELIST SLURM_NODELIST BASIL_RESERVATION_ID *\n"
        "AllowUsers ToBeReplaced\n"
    )


def ssh_config_text() -> str:
    """The client configuration setupRoot installs as the container's /etc/ssh/ssh_config.

    Only the job's host key (written by setupRoot, the same on every node) is trusted: a
    program of another user on the sshd's port cannot pass for the job's sshd.
    """
    return (
        "Host *\n"
        "    StrictHostKeyChecking yes\n"
        "    UserKnownHostsFile /dev/null\n"
        f"    GlobalKnownHostsFile {UDI_IMAGE_MOUNT}/etc/ssh_known_hosts\n"
        "    LogLevel ERROR\n"
        f"    Port {SSH_PORT}\n"
        "    IdentityFile ~/.udiRoot/id_rsa.key\n"
    )


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)


def build_udi_image(dest: str, *, replace: bool = False,
                    search_dirs: Sequence[str] | None = None) -> list[str]:
    """Assemble the udiImage directory (sshd, ssh, ssh-keygen, sftp-server, their libraries and
    configuration) at ``dest``; returns the packed library names."""
    for source, _ in OPENSSH_PROGRAMS:
        if not os.path.isfile(source):
            raise ShifterError(f"{source} is missing: install openssh-server, openssh-client and "
                               "openssh-sftp-server")

    def fill(stage: str) -> list[str]:
        libs = pack(stage, OPENSSH_PROGRAMS, (), UDI_IMAGE_RELINK, search_dirs)
        _write(os.path.join(stage, "etc/sshd_config"), sshd_config_text())
        _write(os.path.join(stage, "etc/ssh_config"), ssh_config_text())
        if os.path.isfile(OPENSSH_MODULI):
            _copy(OPENSSH_MODULI, os.path.join(stage, "etc/moduli"), 0o644)
        os.makedirs(os.path.join(stage, "var/run"), 0o755)
        _fail_on_problems(stage, check_packed(stage, UDI_IMAGE_MOUNT, lambda name: False))
        return libs

    return _publish(dest, fill, replace)


def build_module(dest: str, sources: Sequence[str], *, aliases: Sequence[tuple[str, str]] = (),
                 plugin_dirs: Sequence[str] = (), replace: bool = False,
                 search_dirs: Sequence[str] | None = None) -> list[str]:
    """Assemble a module directory: libraries into lib64 (programs into bin) with their closure
    minus the glibc family; ``aliases`` are extra names (e.g. libmpi.so.12 -> libmpich.so.12);
    ``plugin_dirs`` are directories of run-time plugins (see ``pack``)."""
    programs, libraries = [], []
    for source in sources:
        if not os.path.isfile(source) or not is_elf(source):
            raise ShifterError(f"{source}: not an ELF file")
        if is_glibc(os.path.basename(os.path.realpath(source))) or is_glibc(os.path.basename(source)):
            raise ShifterError(f"{source}: part of the C library, which a module never packs")
        elf = read_elf(source)
        if elf.interpreter and not elf.soname:
            programs.append((source, os.path.join("bin", os.path.basename(source))))
        else:
            libraries.append(source)
    for alias, target in aliases:
        for name in (alias, target):
            if not name or "/" in name or name in (".", ".."):
                raise ShifterError(f"bad alias {alias}={target}: both sides are file names in {LIB_DIR}")

    def fill(stage: str) -> list[str]:
        libs = pack(stage, programs, libraries, MODULE_RELINK, search_dirs, plugin_dirs)
        for alias, target in aliases:
            if target not in libs:
                raise ShifterError(f"alias {alias}={target}: {target} is not packed ({', '.join(libs)})")
            os.symlink(target, os.path.join(stage, LIB_DIR, alias))
        _fail_on_problems(stage, check_packed(stage, UDI_IMAGE_MOUNT, is_glibc))
        return libs

    return _publish(dest, fill, replace)


def _fail_on_problems(stage: str, problems: list[str]) -> None:
    if problems:
        raise ShifterError(f"packed directory would load files from outside: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _publish(dest: str, fill: Callable[[str], list[str]], replace: bool) -> list[str]:
    """Build next to ``dest`` and rename into place, so a failure leaves nothing half-made."""
    dest = os.path.abspath(dest)
    if os.path.lexists(dest) and not replace:
        raise ShifterError(f"{dest} already exists (use --force to replace it)")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise ShifterError(f"{parent}: no such directory")
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=parent)
    try:
        os.chmod(stage, 0o755)
        libs = fill(stage)
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old.", dir=parent)
            os.rename(dest, os.path.join(old, "tree"))
            os.rename(stage, dest)
            shutil.rmtree(old)
        else:
            os.rename(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return libs
