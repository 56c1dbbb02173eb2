"""The job sshd's host key: one ECDSA P-256 key per job, the same on every node of the job.

Every node's container trusts exactly the job's key (``StrictHostKeyChecking yes``), so
every node must know every other node's key without talking to it.  Each node derives the
private key from a secret that root holds on every node of the cluster and nobody else can
read (munge's key: Slurm needs it identical everywhere), the job id and the job's uid:
HMAC-SHA256 with a label of its own, so nothing else ever uses the secret the same way.  The
job's user may read the key (the daemon runs as them); anyone else cannot compute it, so a
program of another user listening on the job's port cannot pass for the job's sshd.

The public half is computed by the host's own ``ssh-keygen -y`` (never the container's),
from a copy in a directory only root can enter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from shifter.errors import NodeError

SECRET_FILE = "/etc/munge/munge.key"
HOST_SSH_KEYGEN = "/usr/bin/ssh-keygen"
_LABEL = b"shifter job sshd host key v1"
# the order of the P-256 group; a scalar in [1, n-1] is a private key
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# SEC1 ECPrivateKey: SEQUENCE { version 1, OCTET STRING d (32 bytes), [0] OID prime256v1 }
_SEC1_HEAD = bytes.fromhex("30310201010420")
_SEC1_TAIL = bytes.fromhex("a00a06082a8648ce3d030107")


def _secret() -> bytes:
    try:
        fd = os.open(SECRET_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NodeError(f"the job sshd's host key needs {SECRET_FILE}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o077 or info.st_uid not in (0, _munge_uid()):
            raise NodeError(f"{SECRET_FILE} must be readable by its owner only")
        secret = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    if len(secret) < 32:
        raise NodeError(f"{SECRET_FILE} holds fewer than 32 bytes")
    return secret


def _munge_uid() -> int:
    import pwd

    try:
        return pwd.getpwnam("munge").pw_uid
    except KeyError:
        return 0


def private_key_pem(jobid: str, uid: int) -> bytes:
    """The job's private host key (PEM, as OpenSSH reads it), the same on each node."""
    digest = hmac.new(_secret(), _LABEL + b"\0" + jobid.encode() + b"\0" + str(uid).encode(), hashlib.sha512).digest()
    scalar = int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1  # 512 bits: no measurable bias
    der = _SEC1_HEAD + scalar.to_bytes(32, "big") + _SEC1_TAIL
    return b"-----BEGIN EC PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END EC PRIVATE KEY-----\n"


def public_key_line(private_pem: bytes) -> str:
    """``ecdsa-sha2-nistp256 AAAA...`` for the key, by the host's ssh-keygen."""
    import shutil
    import subprocess
    import tempfile

    if not os.path.isfile(HOST_SSH_KEYGEN):
        raise NodeError(f"an sshd was requested but this node has no {HOST_SSH_KEYGEN}")
    work = tempfile.mkdtemp(prefix="shifter-hostkey-")  # 0700, root's
    try:
        path = os.path.join(work, "key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem)
        result = subprocess.run([HOST_SSH_KEYGEN, "-y", "-f", path], env={"PATH": "/usr/bin:/bin"}, cwd=work,
                                stdin=subprocess.DEVNULL, capture_output=True, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    line = result.stdout.decode(errors="replace").strip()
    if result.returncode != 0 or not line.startswith("ecdsa-sha2-nistp256 ") or "\n" in line:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise NodeError(f"ssh-keygen -y failed on the job's host key (status {result.returncode})"
                        + (f": {detail[-1]}" if detail else ""))
    return line
