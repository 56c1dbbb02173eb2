"""The pull state machine: records in the store, jobs on worker threads, expiry and recovery.

A pull moves INIT -> PENDING -> PULLING -> CONVERSION -> [EXAMINATION] -> TRANSFER -> READY
(or FAILURE); an import PENDING -> HASHING -> TRANSFER -> READY; an expiry
READY -> EXPIRING -> EXPIRED. What differs from the original and why:

* De-duplication is atomic (Store.claim): concurrent pulls of one tag, from any number
  of requests or gateway processes sharing the store, share one job.
* Before downloading anything the worker resolves the tag to its image id (one manifest
  request). If that image is already published, the pull only re-tags it (and rewrites
  the ACLs in ``.meta`` if they changed): an unchanged tag is re-pulled in milliseconds.
* Every in-flight record names its owner (host, pid, process start time) and carries a
  heartbeat and a lease (``lease_until``), so a record left by a dead gateway (a zombie
  counts as dead) is recognised, at start-up and by the housekeeper every half minute:
  it is re-queued once (FAILURE after a second interruption), its scratch files removed.
  Taking a record over is a compare-and-set on its owner, so of two gateways starting
  together only one adopts it.
* Access belongs to tags (gateway.access): a docker tag only ever comes from a registry,
  a custom tag belongs to the user who imported it, and no pull or import moves a tag
  another owner holds. Work on one image id (publish, merge, expire) holds that id's
  lock, so one id has one READY record and its files go only when nothing uses them.
* A store that stops answering ends the pulls that needed it FAILURE, written as soon as it
  answers again: no record stays in flight with a lease its live owner keeps renewing.
* Lookups do not write to the store: expiration refreshes are batched every few seconds.
* Images never looked up expire too (the original kept them forever).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway import blobcache, examine, importer, pipeline, publish
from gateway.access import REGISTRY_OWNER, Access, combine, effective, for_tag, import_owner, owner_of
from gateway.auth import Session
from gateway.config import GatewayConfig, PlatformConfig
from gateway.metrics import Metrics
from gateway.store.base import INFLIGHT, Doc, Store, new_id, outage
from shifter.errors import ShifterError
from shifter.formats.imageref import split_docker_tag
from shifter.formats.meta import ImageMeta, read_meta

log = logging.getLogger("gateway.manager")

RECENT_SECONDS = 10.0  # an import of the same file this recent is answered with its READY record
FAILURE_HOLD_SECONDS = 3.0  # a FAILURE stays visible to polling clients (every 0.5 s), then a retry starts
HEARTBEAT_SECONDS = 10.0
STALE_HEARTBEAT_SECONDS = 90.0
LEASE_SECONDS = STALE_HEARTBEAT_SECONDS  # renewed with every heartbeat
RECLAIM_SECONDS = 30.0  # the housekeeper looks for records of dead owners this often
MAX_ENV_ENTRIES = 4096
MAX_ENV_BYTES = 256 << 10
MAX_ENTRY_BYTES = 64 << 10
MAX_LABELS = 256
MAX_LABEL_BYTES = 64 << 10
FLUSH_SECONDS = 5.0
BLOB_GRACE_SECONDS = 3600.0  # cached blobs this recent are never pruned
MAX_ATTEMPTS = 2  # runs of one pull record (a crash during the first run re-queues it once)
DOCKER_HUB = ("registry-1.docker.io", "index.docker.io", "docker.io")
_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.+-@/")
IMAGE_TYPES = ("docker", "custom")



PULL_NICENESS = 10  # how much lower than the API's the CPU priority of pulls, expiries and their tools is


def _yield_to_requests() -> None:
    """Lower this worker thread's CPU priority, and so that of every thread and tool it starts.

    Lookups decide how fast jobs are submitted; a pull or an expiry can wait.  On Linux the nice
    value is per thread and inherited by the threads and processes a thread creates, so one
    call here covers downloads, the flattener, pigz, tar2sqfs and the examiner.
    """
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PULL_NICENESS))

class NotFound(Exception):
    """404: unknown system, unknown image, or an image the caller may not read."""


class Forbidden(Exception):
    """403: the caller may not do this (not an admin, not an import user)."""


class BadRequest(Exception):
    """400: the request itself is malformed (names the problem)."""


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a live process from a reused pid (None: no such process)."""
    fields = _proc_stat(pid)
    return fields[19].decode() if fields else None


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()


def _process_alive(pid: int, start: str | None = None) -> bool:
    """A zombie or dead task is not alive, whatever its parent does with it."""
    fields = _proc_stat(pid)
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return False
    return start is None or fields[19].decode() == start


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str

    def as_doc(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "start": self.start}


def _requested_by(rec: Doc, session: Session) -> bool:
    return session.admin or (rec.get("requester") or {}).get("uid") == session.uid


def _private_view(rec: Doc, session: Session) -> Doc:
    """What a caller sees of a record: tags they may read; others' status messages withheld."""
    view = dict(rec)
    if not session.admin:
        tags = view.get("tag")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        view["tag"] = [t for t in tags if session.may_read(*_fields(for_tag(rec, t)))]
        if rec.get("status") != "READY" and not _requested_by(rec, session):
            view["status_message"] = ""
            view["userACL"], view["groupACL"] = [], []
    view.pop("tag_access", None)
    return view


def _fields(access: Access) -> tuple[bool, list[int], list[int]]:
    return access.private, list(access.user_acl), list(access.group_acl)

def check_tag(itype: str, tag: str) -> str:
    """Validate a request's type and tag; returns the tag as stored (docker: ``:latest`` added)."""
    if itype not in IMAGE_TYPES:
        raise BadRequest(f"unsupported image type {itype!r} (use docker or custom)")
    if not tag or len(tag) > 512 or any(c not in _TAG_CHARS for c in tag):
        raise BadRequest(f"invalid image tag {tag!r}")
    if itype == "custom" and "/" in tag:
        raise BadRequest(f"invalid image tag {tag!r}: '/' is not allowed in a custom tag")
    if ".." in tag.split("/") or tag.startswith("/") or tag.endswith("/") or "//" in tag:
        raise BadRequest(f"invalid image tag {tag!r}")
    last = tag.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        tag += ":latest"
    return tag


def parse_acl(value: Any, name: str) -> list[int]:
    """The original's ``"1000,1001"`` strings (lists of ints accepted too); ids <= 0 dropped."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest(f"{name} must be a comma-separated string of ids")
    result = []
    for item in items:
        text = str(item).strip() if isinstance(item, str | int) and not isinstance(item, bool) else ""
        digits = text[1:] if text.startswith("-") else text
        # ASCII only (str.isdigit also takes "²" and "١٢٣"), short enough for int()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10:
            raise BadRequest(f"{name}: {str(item)[:40]!r} is not a numeric id")
        if int(text) >= 0xFFFFFFFF:
            raise BadRequest(f"{name}: {text} is not a valid id (must be below 4294967295)")
        if int(text) > 0:
            result.append(int(text))
    if len(result) > 1000:
        raise BadRequest(f"{name}: more than 1000 ids")
    return sorted(set(result))


class ImageManager:
    """Owns the workers; the API calls its methods with an authenticated Session."""

    def __init__(self, config: GatewayConfig, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        pid = os.getpid()
        self.owner = Owner(socket.gethostname(), pid, _proc_start_time(pid) or "0")
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        # jobs that ended without settling their record because the store did not answer:
        # {rid: (kind, message)}, settled by the housekeeper once the store answers again
        self._unsettled: dict[str, tuple[str, str]] = {}
        self._touch_lock = threading.Lock()
        self._touches: dict[str, float] = {}
        self._metric_docs: list[Doc] = []
        # Registry credentials from the munge payload are needed by the worker but must never
        # be written to the store: they stay in memory, keyed by a random reference.
        self._token_lock = threading.Lock()
        self._tokens: dict[str, dict[str, str]] = {}
        self._last_reclaim = 0.0
        self.metrics.gauge("shifter_gateway_queue_depth", "Pulls waiting for a worker.", self._jobs.qsize)
        self.metrics.gauge(
            "shifter_gateway_pulls_running", "Pulls being worked on.", lambda: len(self._running)
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a dead predecessor left, then start the workers and the housekeeper."""
        for d in (self.config.cache_dir, self.config.expand_dir):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as err:
                raise ShifterError(f"cannot create {d}: {err.strerror}") from None
        self.recover()
        for i in range(self.config.worker_threads):
            t = threading.Thread(target=self._worker, name=f"pull-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeeper, name="housekeeper", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; running jobs are abandoned to recovery (their records say who owned them)."""
        self._stop.set()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.flush()

    def owner_alive(self, owner: Any, heartbeat: float | None) -> bool:
        """Is the process that owns an in-flight record still working on it?"""
        if not isinstance(owner, dict):
            return False
        if owner.get("host") == self.owner.host:
            pid = owner.get("pid")
            if not isinstance(pid, int):
                return False
            if pid == self.owner.pid:
                return str(owner.get("start")) == self.owner.start
            return _process_alive(pid, str(owner.get("start")))
        return heartbeat is not None and time.time() - heartbeat < STALE_HEARTBEAT_SECONDS

    def _record_alive(self, rec: Doc) -> bool:
        """Its owner works on it: a live process here, else an unexpired lease (or fresh heartbeat)."""
        owner = rec.get("owner")
        if isinstance(owner, dict) and owner.get("host") == self.owner.host:
            return self.owner_alive(owner, rec.get("last_heartbeat"))
        lease = rec.get("lease_until")
        if isinstance(lease, int | float):
            return time.time() < lease
        return self.owner_alive(owner, rec.get("last_heartbeat"))

    def recover(self) -> None:
        """Records in flight whose owner is dead: re-queue once, else FAILURE; remove scratch files."""
        live = self.reclaim()
        self._clean_scratch(live)
        self._clean_partials(others_busy=bool(live))

    def reclaim(self) -> set[str]:
        """Take over every record whose owner is dead; returns the ids of records still being worked on."""
        live: set[str] = set()
        for rec in self.store.find(statuses=INFLIGHT):
            if rec.get("owner") == self.owner.as_doc() or self._record_alive(rec):
                live.add(rec["_id"])
                continue
            if not self._take_over(rec):
                current = self.store.get(rec["_id"])
                if current and current.get("status") in INFLIGHT and current.get("owner") != rec.get("owner"):
                    live.add(rec["_id"])  # another gateway won the lease: its scratch files are in use
        for rec in self.store.find(statuses=("EXPIRING",)):
            if (
                rec.get("owner") != self.owner.as_doc()
                and not self._record_alive(rec)
                and self.store.update(
                    rec["_id"], self._lease(), only_if_status=("EXPIRING",), expect={"owner": rec.get("owner")}
                )
            ):
                self._jobs.put(("expire", rec["_id"]))
        return live

    def _lease(self) -> Doc:
        now = time.time()
        return {"owner": self.owner.as_doc(), "last_heartbeat": now, "lease_until": now + LEASE_SECONDS}

    def _clean_partials(self, others_busy: bool) -> None:
        """Partial files of dead writers: published-image partials of this host's dead gateways,
        and the blob cache's partial downloads unless another live gateway is pulling now."""
        for platform in self.config.platforms.values():
            target = self.target(platform)
            try:
                if target.remote:
                    removed = publish.remove_remote_leftovers(target, _process_alive)
                elif target.image_dir:
                    removed = publish.remove_leftovers(target.image_dir, _process_alive)
                else:
                    removed = []
            except ShifterError as err:  # an unreachable system must not stop the gateway
                log.warning("partial files in %s not checked: %s", target.image_dir, err)
                continue
            for name in removed:
                log.warning("removed %s left in %s by a dead gateway", name, target.image_dir)
        blobs = os.path.join(self.config.cache_dir, "blobs", "sha256")
        try:
            names = os.listdir(blobs)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and ".partial-" in name:
                path = os.path.join(blobs, name)
                with contextlib.suppress(OSError):
                    if others_busy and time.time() - os.lstat(path).st_mtime < STALE_HEARTBEAT_SECONDS:
                        continue
                    os.unlink(path)
                    log.warning("removed the partial download %s", name)

    def _take_over(self, rec: Doc) -> bool:
        """Adopt a dead owner's in-flight record; returns True if it was re-queued."""
        attempts = int(rec.get("attempts", 1))
        kind = "import" if rec.get("filepath") else "pull"
        if attempts >= MAX_ATTEMPTS or kind == "import":
            self.store.update(
                rec["_id"],
                {
                    "status": "FAILURE",
                    "last_pull": time.time(),
                    "status_message": "interrupted: the gateway stopped during this " + kind + "; try again",
                },
                only_if_status=INFLIGHT,
                expect={"owner": rec.get("owner")},
            )
            self.metrics.inc("shifter_gateway_pulls_total", outcome="interrupted")
            log.warning("record %s (%s) left by a dead gateway: FAILURE", rec["_id"], rec.get("pulltag"))
            return False
        if self.store.update(
            rec["_id"],
            {
                "status": "PENDING",
                **self._lease(),
                "attempts": attempts + 1,
                "status_message": "re-queued after a gateway restart",
            },
            only_if_status=INFLIGHT,
            expect={"owner": rec.get("owner")},
        ):
            log.warning("record %s (%s) left by a dead gateway: re-queued", rec["_id"], rec.get("pulltag"))
            self._jobs.put(("pull", rec["_id"]))
            return True
        current = self.store.get(rec["_id"])
        if current is None or current.get("owner") != rec.get("owner"):
            return False  # another gateway holds the lease now
        # another record took the slot meanwhile: this one is abandoned
        self.store.update(
            rec["_id"],
            {
                "status": "FAILURE",
                "last_pull": time.time(),
                "status_message": "interrupted: superseded by another pull",
            },
            only_if_status=INFLIGHT,
            expect={"owner": rec.get("owner")},
        )
        return False

    def _job_dir(self, rid: str) -> str:
        return os.path.join(self.config.expand_dir, f"job-{rid}")

    def _clean_scratch(self, live: set[str]) -> None:
        """Remove ``job-<rid>`` scratch directories no live pull uses (unmounting an examiner's tree first)."""
        try:
            names = os.listdir(self.config.expand_dir)
        except OSError:
            return
        for name in names:
            if name.startswith("job-") and name[4:] not in live:
                with self._running_lock:
                    if name[4:] in self._running:
                        continue
                path = os.path.join(self.config.expand_dir, name)
                errors = examine.unmount_under(path)
                if errors:  # never delete through a mount: leave the directory for the next start
                    log.error("scratch %s kept: %s", path, "; ".join(errors))
                    continue
                shutil.rmtree(path, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------

    def platform(self, system: str) -> PlatformConfig:
        try:
            return self.config.platforms[system]
        except KeyError:
            raise NotFound(f"unknown system {system!r}") from None

    def target(self, platform: PlatformConfig) -> pipeline.PublishTarget:
        if platform.accesstype == "remote" and platform.ssh is not None:
            return pipeline.PublishTarget(
                image_dir=platform.ssh.image_dir,
                host=platform.hosts[0],
                user=platform.ssh.username,
                ssh_key=platform.ssh.key,
                ssh_options=list(platform.ssh.ssh_options),
                scp_options=list(platform.ssh.scp_options),
            )
        return pipeline.PublishTarget(image_dir=platform.image_dir)

    def _published(self, platform: PlatformConfig, image_id: str, fmt: str) -> bool:
        if platform.accesstype != "local":
            return True  # a remote system's files are trusted from the record
        base = os.path.join(platform.image_dir, image_id)
        return os.path.isfile(f"{base}.{fmt}") and os.path.isfile(f"{base}.meta")

    def _set(self, rid: str, status: str, message: str = "", **fields: Any) -> None:
        fields.update(status=status, status_message=message, last_heartbeat=time.time())
        self.store.update(rid, fields)

    # -- lookup / list ------------------------------------------------------------------------

    def lookup(self, session: Session, itype: str, tag: str) -> Doc:
        """The READY record for tag if the caller may read it; refreshes its expiration (batched)."""
        tag = check_tag(itype, tag)
        rec = self.store.find_ready(session.system, itype, tag)
        if rec is None or not session.may_read(*_fields(for_tag(rec, tag))):
            self.metrics.inc("shifter_gateway_lookups_total", result="not_found")
            raise NotFound(f"image not found: {itype}:{tag}")
        self.metrics.inc("shifter_gateway_lookups_total", result="found")
        now = time.time()
        if self.config.expiration_timeout is not None:
            with self._touch_lock:
                self._touches[rec["_id"]] = now + self.config.expiration_timeout
        if self.config.metrics:
            with self._touch_lock:
                self._metric_docs.append(
                    {
                        "user": session.user,
                        "uid": session.uid,
                        "system": session.system,
                        "type": itype,
                        "tag": tag,
                        "id": rec.get("id"),
                        "time": now,
                    }
                )
        return _private_view(rec, session)

    def flush(self) -> None:
        """Write batched expiration refreshes and metric documents."""
        with self._touch_lock:
            touches, self._touches = self._touches, {}
            docs, self._metric_docs = self._metric_docs, []
        try:
            self.store.touch(touches)
            self.store.add_metrics(docs)
        except Exception as err:
            if (down := outage(err)) is None:
                log.exception("could not write lookup refreshes")
            else:
                log.warning("lookup refreshes not written: %s", down)

    def list_images(self, session: Session) -> list[Doc]:
        """READY images the caller may read, each showing only the tags the caller may read."""
        views = []
        for rec in self.store.find(system=session.system, statuses=("READY",)):
            view = _private_view(rec, session)
            if view["tag"] or session.may_read(*_fields(effective(rec))):
                views.append(view)
        return views

    def queue_list(self, session: Session) -> list[dict[str, Any]]:
        """Unsettled records: a user sees their own requests, an admin every request."""
        self.platform(session.system)
        return [
            {"status": r["status"], "image": r.get("pulltag")}
            for r in self.store.find(system=session.system)
            if r["status"] not in ("READY", "EXPIRED") and _requested_by(r, session)
        ]

    def metric_docs(self, session: Session, limit: int) -> list[Doc]:
        if not session.admin:
            raise Forbidden("only admins may read the lookup metrics")
        self.flush()
        return self.store.metrics(session.system, limit)

    # -- pull ---------------------------------------------------------------------------------

    def pull(
        self,
        session: Session,
        itype: str,
        tag: str,
        allowed_uids: list[int],
        allowed_gids: list[int],
        refresh: bool = False,
    ) -> Doc:
        """Start a pull or join the one in flight; idempotent, so clients poll with it."""
        if itype != "docker":
            raise BadRequest(f"cannot pull an image of type {itype!r} (only docker)")
        tag = check_tag(itype, tag)
        system = session.system
        self.platform(system)
        user_acl = sorted(set(allowed_uids) | {session.uid})
        group_acl = sorted(set(allowed_gids) | {session.gid}) if allowed_gids else []
        wanted = Access.of(True, user_acl, group_acl)
        now = time.time()
        for _ in range(5):
            current = self.store.find_inflight(system, itype, tag)
            if current is not None:
                if self._record_alive(current):
                    return _private_view(current, session)
                log.warning("pull %s of %s: its gateway died; starting over", current["_id"], tag)
                self.store.delete(current["_id"])
                continue
            ready = self.store.find_ready(system, itype, tag)
            if ready is not None and not refresh:
                fresh = now - float(ready.get("last_pull") or 0) < self.config.pull_update_timeout
                # A private tag that does not yet grant what this caller asks for is pulled again
                # with the caller's credentials (the original ignored a new ACL for 10 s after a
                # pull); the registry decides, and the ACLs add up. Polls ask the same: no loop.
                if fresh and for_tag(ready, tag).covers(wanted):
                    return _private_view(ready, session)
            failures = self.store.find(system=system, itype=itype, pulltag=tag, statuses=("FAILURE",))
            own = [f for f in failures if _requested_by(f, session)]
            if own:  # another user's failure (and its message) is theirs; this caller tries anew
                newest = max(own, key=lambda r: float(r.get("last_pull") or 0))
                if now - float(newest.get("last_pull") or 0) < FAILURE_HOLD_SECONDS:
                    return newest
            doc = self._new_record(system, itype, tag, user_acl, group_acl, session)
            rec, inserted = self.store.claim(doc)
            if not inserted:
                self._take_tokens(doc)
                continue
            for old in failures:
                self.store.delete(old["_id"])
            self.store.update(rec["_id"], {"status": "PENDING"})
            rec["status"] = "PENDING"
            self._jobs.put(("pull", rec["_id"]))
            return rec
        raise ShifterError("could not start the pull (contention); try again")

    def _new_record(
        self, system: str, itype: str, tag: str, user_acl: list[int], group_acl: list[int], session: Session
    ) -> Doc:
        now = time.time()
        return {
            "_id": new_id(),
            "system": system,
            "itype": itype,
            "pulltag": tag,
            "tag": [],
            "status": "INIT",
            "status_message": "",
            "format": self.config.default_format,
            "arch": "amd64",
            "os": "linux",
            "location": "",
            "remotetype": "dockerv2",
            "ostcount": str(self.config.ostcount),
            "replication": str(self.config.replication),
            "userACL": user_acl,
            "groupACL": group_acl,
            "private": None,
            "last_pull": now,
            **self._lease(),
            "attempts": 1,
            "requester": {"user": session.user, "uid": session.uid, "gid": session.gid},
            # registry credentials live only in memory (see _tokens), never in the store
        } | ({"tokens_ref": self._remember_tokens(session.tokens)} if session.tokens else {})

    def _remember_tokens(self, tokens: dict[str, str]) -> str:
        ref = new_id()
        with self._token_lock:
            self._tokens[ref] = dict(tokens)
        return ref

    def _take_tokens(self, rec: Doc) -> dict[str, str]:
        ref = rec.get("tokens_ref")
        if not ref:
            return {}
        with self._token_lock:
            return self._tokens.pop(ref, {})

    def pull_spec(self, tag: str, tokens: dict[str, str], work_dir: str) -> pipeline.PullSpec:
        """Where ``tag`` lives and how to fetch it (the original's Location/DefaultImageLocation rule)."""
        first, slash, rest = tag.partition("/")
        if slash and first in self.config.locations:
            loc_name, remainder = first, rest
        else:
            host, _repo, _ref = split_docker_tag(tag)
            if host is not None:
                raise ShifterError(
                    f"registry {host!r} is not a configured location (Locations in imagemanager.json)"
                )
            loc_name, remainder = self.config.default_location, tag
        loc = self.config.locations.get(loc_name)
        location = pipeline.Location(
            url=loc.url if loc else f"https://{loc_name}",
            auth_method=loc.auth_method if loc else "token",
            cacert=loc.sslcacert if loc else None,
        )
        _reg, repository, reference = split_docker_tag(remainder)
        if loc_name in DOCKER_HUB and "/" not in repository:
            repository = "library/" + repository
        cred = tokens.get(loc_name) or tokens.get("default")
        credentials = None
        if cred:
            user, _, password = cred.partition(":")
            credentials = (user, password)
        return pipeline.PullSpec(
            location=location,
            repository=repository,
            reference=reference,
            credentials=credentials,
            cache_dir=self.config.cache_dir,
            expand_dir=work_dir,
            converter_options=list(self.config.converter_options.get("squashfs", ())) or None,
            platform=self.config.image_platform,
            max_image_bytes=self.config.max_image_bytes,
            pull_deadline=self.config.pull_deadline,
            max_image_paths=self.config.max_image_paths,
        )

    # -- workers ----------------------------------------------------------------------------------

    def _worker(self) -> None:
        _yield_to_requests()
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            kind, rid = job
            with self._running_lock:
                self._running.add(rid)
            try:
                if kind == "pull":
                    self._run_pull(rid)
                elif kind == "expire":
                    self._run_expire(rid)
                elif kind == "import":
                    self._run_import(rid)
            except Exception as err:
                down = outage(err)
                if down is None:
                    log.exception("%s job %s crashed", kind, rid)
                else:
                    log.warning("%s job %s stopped: %s", kind, rid, down)
                if down is not None or kind != "expire":  # its record still says in flight: settle it later
                    with self._running_lock:  # (an expiry again only if the store was the cause, not a bug)
                        self._unsettled.setdefault(rid, (kind, f"interrupted: {down or 'the job crashed'}; try again"))
            finally:
                with self._running_lock:
                    self._running.discard(rid)

    def _inflight_record(self, rid: str) -> Doc | None:
        """The record a queued job works on; None once it is gone or settled (nothing left to do)."""
        rec = self.store.get(rid)
        return rec if rec is not None and rec["status"] in INFLIGHT else None

    def _run_pull(self, rid: str) -> None:
        rec = self._inflight_record(rid)
        if rec is None:
            return
        started = time.monotonic()
        tokens = self._take_tokens(rec)
        work_dir = self._job_dir(rid)
        platform = self.platform(rec["system"])
        try:
            os.makedirs(work_dir, exist_ok=True)
            self._set(rid, "PULLING", "resolving the tag")
            spec = self.pull_spec(rec["pulltag"], tokens, work_dir)
            resolved = pipeline.resolve(spec)
            self._finish_pull(rec, platform, spec, resolved, started)
        except ShifterError as err:
            self._fail(rid, str(err), started, work_dir)
        except Exception as err:
            if (down := outage(err)) is not None:
                self._fail(rid, f"{down}; try again", started, work_dir)
            else:
                log.exception("pull %s (%s) failed unexpectedly", rid, rec.get("pulltag"))
                self._fail(rid, f"internal error: {type(err).__name__}: {err}", started, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _fail(self, rid: str, message: str, started: float, work_dir: str | None = None) -> None:
        """FAILURE with a one-line reason; scratch files go first, so a settled record never has any."""
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        message = message.splitlines()[0][:500] if message else "failed"
        try:
            self.store.update(rid, {"status": "FAILURE", "status_message": message, "last_pull": time.time()})
        except Exception as err:
            if outage(err) is None:
                raise
            log.warning("pull %s failed (%s); FAILURE written once the store answers", rid, message)
            with self._running_lock:
                self._unsettled[rid] = ("pull", message)
        self.metrics.inc("shifter_gateway_pulls_total", outcome="failure")
        self.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)
        log.info("pull %s failed: %s", rid, message)

    def _finish_pull(
        self,
        rec: Doc,
        platform: PlatformConfig,
        spec: pipeline.PullSpec,
        resolved: pipeline.ResolvedImage,
        started: float,
    ) -> None:
        rid, system = rec["_id"], rec["system"]
        image_id = resolved.image_id
        fmt = rec.get("format") or "squashfs"
        target = self.target(platform)
        fields = _config_fields(resolved.config)
        extra = {
            "last_heartbeat": time.time(),
            "manifest_digest": resolved.manifest_digest,
            "layers": [layer.get("digest") for layer in resolved.layers if isinstance(layer, dict)],
            **fields,
        }
        existing = self.store.find_ready_by_image_id(system, image_id)
        if existing is not None and self._published(platform, image_id, fmt):
            shutil.rmtree(spec.expand_dir, ignore_errors=True)
            self._set(rid, "TRANSFER", "adding the tag to the published image")
            self._attach(rec, platform, image_id, self._pull_access(rec, spec, resolved), extra, None)
            self.metrics.inc("shifter_gateway_pulls_total", outcome="unchanged")
            self.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)
            return
        self._set(rid, "CONVERSION", "downloading and converting layers")
        built_at = time.monotonic()
        built = pipeline.build_image(spec, resolved, self._progress(rid))
        self.metrics.observe("shifter_gateway_conversion_seconds", time.monotonic() - built_at)
        if self.config.examiner:
            self._set(rid, "EXAMINATION", f"running the examiner {os.path.basename(self.config.examiner)}")
            examine.examine(self.config.examiner, built.squashfs_path, image_id, spec.expand_dir,
                            self.config.examiner_timeout)
        # privacy only now: the download may have learnt that blobs needed the credentials
        access = self._pull_access(rec, spec, resolved)
        self._set(rid, "TRANSFER", "publishing the image")

        def publish_built(image: Access) -> None:
            meta = built.meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
            pipeline.publish(built, image_id, meta, target)
            shutil.rmtree(spec.expand_dir, ignore_errors=True)  # a READY record never has scratch files

        self._attach(rec, platform, image_id, access, extra, publish_built)
        shutil.rmtree(spec.expand_dir, ignore_errors=True)
        self.metrics.inc("shifter_gateway_pulls_total", outcome="ready")
        self.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)

    def _pull_access(self, rec: Doc, spec: pipeline.PullSpec, resolved: pipeline.ResolvedImage) -> Access:
        """Private to the requesters only if the registry required credentials for this tag.

        Layers taken from the blob cache were not asked for: where a private image uses one
        of them, the registry is asked for each layer before this tag may be public.
        """
        if not resolved.private and self._layers_private_elsewhere(rec["system"], resolved.layers):
            resolved.private = pipeline.layers_need_credentials(spec, resolved)
        if not resolved.private:
            return Access(False)
        return Access.of(True, rec.get("userACL"), rec.get("groupACL"))

    def _layers_private_elsewhere(self, system: str, layers: list[dict]) -> bool:
        digests = {d.get("digest") for d in layers if isinstance(d, dict)}
        return any(
            digests & set(r.get("layers") or []) and effective(r).private
            for r in self.store.find(system=system, statuses=("READY",))
        )

    @contextlib.contextmanager
    def _image_lock(self, system: str, image_id: str) -> Any:
        """One lock per image id, for threads and processes of this host (flock on one of 256
        lock files, chosen by the id: never more files, and never two ids held at once), then
        for the gateways of other hosts on the same store (the store's lease lock)."""
        directory = os.path.join(self.config.cache_dir, "locks")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        stripe = hashlib.sha256(f"{system}\0{image_id}".encode()).hexdigest()[:2]
        fd = os.open(os.path.join(directory, f"image-{stripe}"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.store.lock(f"image\x1f{system}\x1f{image_id}"):
                yield
        finally:
            os.close(fd)

    def _attach(
        self,
        rec: Doc,
        platform: PlatformConfig,
        image_id: str,
        access: Access,
        fields: Doc,
        publish_files: Any,
    ) -> Doc:
        """Give the record's tag to image ``image_id`` (published first if it is not there yet).

        Under the id's lock: the READY record of the id, if any, takes the tag and the pull
        record goes; else the pull record becomes READY. The tag's access combines with what
        it granted before; the image's ``.meta`` and file modes follow the combined access.
        Returns the READY record now carrying the tag.
        """
        system, itype, tag = rec["system"], rec["itype"], rec["pulltag"]
        owner = REGISTRY_OWNER if itype == "docker" else import_owner(int((rec.get("requester") or {}).get("uid", -1)))
        before = self.store.find_ready(system, itype, tag)
        with self._image_lock(system, image_id):
            existing = self.store.find_ready_by_image_id(system, image_id)
            holder = existing or {**rec, "tag": [], "tag_access": []}
            same = before is not None and before.get("id") == image_id
            tag_access = combine(for_tag(before, tag) if same and before else None, access)
            image_before = effective(holder) if existing is not None else None
            image_after = effective({
                **holder,
                "tag": [t for t in holder.get("tag") or [] if t != tag] + [tag],
                "tag_access": [e for e in holder.get("tag_access") or [] if e.get("tag") != tag]
                + [{"tag": tag, **tag_access.as_fields()}],
            })
            fresh = existing is None or not self._published(platform, image_id, rec.get("format") or "squashfs")
            if fresh:
                if publish_files is None:
                    raise ShifterError(f"image {image_id} is not published and was not built")
                publish_files(image_after)
            settle = None
            if existing is None:
                # READY in the same write as the tag: a record settled but not yet tagged would
                # look to a concurrent pull (at any gateway) like no image at all
                settle = {
                    "status": "READY", "status_message": "", "id": image_id, "last_pull": time.time(),
                    **image_after.as_fields(), **fields,
                }
                target = rec["_id"]
            else:
                target = existing["_id"]
            # the tag first: a refused tag never widens the image's .meta or record
            if not self.store.add_tag(target, tag, owner, tag_access.as_fields(), settle):
                if existing is None:  # published for nothing: nothing else uses these files
                    self.store.update(rec["_id"], {"status": "FAILURE", "tag": []})
                    pipeline.remove_published(image_id, self.target(platform))
                raise ShifterError(f"{itype}:{tag} belongs to another user")
            if existing is not None:
                if image_after != image_before and not fresh:
                    self._rewrite_acl(platform, image_id, image_after)
                self.store.update(target, {"last_pull": time.time(), **image_after.as_fields()})
                self.store.delete(rec["_id"])
        if before is not None and before.get("id") != image_id:
            self._refresh_access(platform, before["_id"])  # the tag left that image
        return self.store.get(target) or {}

    def _refresh_access(self, platform: PlatformConfig, rid: str) -> None:
        """Re-derive an image's access after one of its tags moved away."""
        rec = self.store.get(rid)
        if rec is None or rec.get("status") != "READY" or not rec.get("id"):
            return
        with self._image_lock(rec["system"], rec["id"]):
            rec = self.store.get(rid)
            if rec is None or rec.get("status") != "READY":
                return
            now = effective(rec)
            if now != Access.of(rec.get("private"), rec.get("userACL"), rec.get("groupACL")):
                with contextlib.suppress(ShifterError):
                    self._rewrite_acl(platform, rec["id"], now)
                self.store.update(rid, now.as_fields())

    def _rewrite_acl(self, platform: PlatformConfig, image_id: str, image: Access) -> None:
        """New ``.meta``; the files' modes follow (0600 private, 0644 public)."""
        target = self.target(platform)
        if target.remote:
            raise ShifterError(
                "changing the access of an image on a remote system needs a full re-pull; "
                "expire the image first"
            )
        meta = read_meta(os.path.join(platform.image_dir, f"{image_id}.meta"))
        meta = meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
        publish.republish_meta(image_id, meta, target)

    def _progress(self, rid: str) -> Any:
        """The pipeline's progress callback: phase and counters into the record.

        A new phase is written at once; counters within a phase at most twice a second.
        """
        last = {"time": 0.0, "phase": ""}

        def report(phase: str, info: dict[str, Any]) -> None:
            now = time.monotonic()
            if phase == last["phase"] and now - float(last["time"]) < 0.5:
                return
            last["time"], last["phase"] = now, phase
            status = phase if phase in ("PULLING", "EXAMINATION", "CONVERSION", "TRANSFER") else None
            detail = ", ".join(
                f"{k}={v}" for k, v in sorted(info.items()) if isinstance(v, int | float | str)
            )
            fields: dict[str, Any] = {
                "status_message": f"{phase.lower()}: {detail}"[:300],
                "progress": {k: v for k, v in info.items() if isinstance(v, int | float | str)},
                "last_heartbeat": time.time(),
            }
            if status:
                fields["status"] = status
            self.store.update(rid, fields, only_if_status=INFLIGHT)

        return report

    # -- expiry -----------------------------------------------------------------------------------

    def expire(self, session: Session, itype: str, tag: str) -> bool:
        """Admins only: queue removal of the image the tag names."""
        if not session.admin:
            raise Forbidden(f"user {session.user} is not an admin of {session.system}")
        tag = check_tag(itype, tag)
        rec = self.store.find_ready(session.system, itype, tag)
        if rec is None:
            raise NotFound(f"image not found: {itype}:{tag}")
        self._enqueue_expire(rec)
        return True

    def _enqueue_expire(self, rec: Doc) -> None:
        if self.store.update(rec["_id"], {"status": "EXPIRING", **self._lease()}, only_if_status=("READY",)):
            self._jobs.put(("expire", rec["_id"]))

    def _run_expire(self, rid: str) -> None:
        """The record goes first; the files only if no other READY record of the id uses them."""
        rec = self.store.get(rid)
        if rec is None or rec["status"] != "EXPIRING" or not rec.get("id"):
            return
        platform = self.platform(rec["system"])
        with self._image_lock(rec["system"], rec["id"]):
            if self.store.find_ready_by_image_id(rec["system"], rec["id"]) is not None:
                self.store.update(rid, {"status": "EXPIRED", "status_message": "", "tag": [], "tag_access": []})
                return
            try:
                pipeline.remove_published(rec["id"], self.target(platform))
            except ShifterError as err:
                self.store.update(rid, {"status": "READY", "status_message": f"expiry failed: {err}"})
                return
            self.store.update(rid, {"status": "EXPIRED", "status_message": "", "tag": [], "tag_access": []})

    def autoexpire(self, session: Session) -> list[str]:
        """Admins only: expire images past their time, drop stale records, prune unreferenced blobs."""
        if not session.admin:
            raise Forbidden(f"user {session.user} is not an admin of {session.system}")
        self.flush()
        now = time.time()
        expired: list[str] = []
        for rec in self.store.find(system=session.system):
            status = rec["status"]
            if self._stale(rec, now):
                self.store.delete(rec["_id"])
            elif status == "READY" and self.config.expiration_timeout is not None:
                when = rec.get("expiration")
                if when is None:
                    when = float(rec.get("last_pull") or now) + self.config.expiration_timeout
                if now > float(when):
                    self._enqueue_expire(rec)
                    expired.append(rec.get("id") or rec["_id"])
        self.prune_blobs()
        return expired

    def _stale(self, rec: Doc, now: float) -> bool:
        """An in-flight record nobody works on, or a FAILURE clients have had time to see."""
        if rec["status"] in INFLIGHT:
            return not self.owner_alive(rec.get("owner"), rec.get("last_heartbeat"))
        return rec["status"] == "FAILURE" and now - float(rec.get("last_pull") or 0) > FAILURE_HOLD_SECONDS

    def prune_blobs(self) -> int:
        """Remove cached blobs no READY image uses (the original never cleaned its cache).

        The cache is ``<CacheDirectory>/blobs/sha256/<hex>`` (gateway.blobcache.BlobCache). Files
        touched in the last hour are kept, so a pull running in another gateway process that
        shares the cache never loses a blob it has just fetched; nothing is pruned while a pull
        of this store is in flight. Config blobs are tiny and fetched again when needed.
        """
        if self.store.find(statuses=INFLIGHT):
            return 0
        keep = {
            d
            for rec in self.store.find(statuses=("READY", "EXPIRING"))
            for d in rec.get("layers") or []
            if isinstance(d, str) and d.startswith("sha256:")
        }
        removed = blobcache.prune_cache(self.config.cache_dir, keep, BLOB_GRACE_SECONDS)
        if removed:
            log.info("pruned %d unreferenced blobs from %s", len(removed), self.config.cache_dir)
        return len(removed)

    # -- import -----------------------------------------------------------------------------------

    def doimport(self, session: Session, itype: str, tag: str, body: dict[str, Any]) -> Doc:
        """ImportUsers only: publish a squashfs file the caller can read as a custom tag they own.

        The id is the sha256 of the file's content. A docker tag only ever comes from a
        registry, and a custom tag that another user imported stays theirs.

        Idempotent like pull (clients poll with it): an import in flight, a recent FAILURE
        or a just-finished import of the same file is returned instead of starting again.
        """
        if not session.importer:
            raise Forbidden(f"user {session.user} may not import images (ImportUsers)")
        if itype != "custom":
            raise Forbidden(f"imports go only into custom: tags ({itype}: tags come only from a registry)")
        tag = check_tag(itype, tag)
        filepath, fmt = body.get("filepath"), body.get("format", "squashfs")
        if not isinstance(filepath, str) or not os.path.isabs(filepath) or "\0" in filepath:
            raise BadRequest('doimport needs "filepath": an absolute path')
        if fmt != "squashfs":
            raise BadRequest(f"cannot import format {fmt!r} (only squashfs)")
        self.platform(session.system)
        user_acl = parse_acl(body.get("allowed_uids"), "allowed_uids")
        group_acl = parse_acl(body.get("allowed_gids"), "allowed_gids")
        now = time.time()
        mine = import_owner(session.uid)
        current = self.store.find_inflight(session.system, itype, tag)
        if current is not None and self._record_alive(current):
            if not _requested_by(current, session):
                raise Forbidden(f"custom:{tag} is being imported by another user")
            return current
        ready = self.store.find_ready(session.system, itype, tag)
        if ready is not None and owner_of(ready, tag) not in (None, mine):
            raise Forbidden(f"custom:{tag} belongs to another user")
        if (
            ready is not None
            and ready.get("imported_from") == filepath
            and (now - float(ready.get("last_pull") or 0) < RECENT_SECONDS)
        ):
            return ready
        failures = self.store.find(system=session.system, itype=itype, pulltag=tag, statuses=("FAILURE",))
        recent = [f for f in failures if now - float(f.get("last_pull") or 0) < FAILURE_HOLD_SECONDS]
        if recent:
            newest = max(recent, key=lambda r: float(r.get("last_pull") or 0))
            if _requested_by(newest, session):
                return newest
        doc = self._new_record(session.system, itype, tag, user_acl, group_acl, session)
        doc.update(filepath=filepath, imported_from=filepath, status="PENDING", format="squashfs")
        doc["requester"]["groups"] = sorted(session.groups)
        rec, inserted = self.store.claim(doc)
        if inserted:
            for old in failures:
                self.store.delete(old["_id"])
            self._jobs.put(("import", rec["_id"]))
        return rec

    def _run_import(self, rid: str) -> None:
        rec = self._inflight_record(rid)
        if rec is None:
            return
        started = time.monotonic()
        work_dir = self._job_dir(rid)
        platform = self.platform(rec["system"])
        requester = rec.get("requester") or {}
        filepath = rec["filepath"]
        user_acl, group_acl = list(rec.get("userACL") or []), list(rec.get("groupACL") or [])
        try:
            self._set(rid, "HASHING", "copying and checking the file")
            gids = set(requester.get("groups") or []) | {int(requester.get("gid", -1))}
            fd = importer.open_as_user(filepath, int(requester.get("uid", -1)), int(requester.get("gid", -1)), gids)
            try:
                copy, image_id = importer.copy_for_import(fd, filepath, work_dir, self.config.max_image_bytes)
            finally:
                os.close(fd)
            importer.check_squashfs(copy, filepath, self.config.max_image_paths, self.config.pull_deadline)
            meta = ImageMeta(format="squashfs", user=requester.get("user"))
            target = self.target(platform)

            def publish_copy(image: Access) -> None:
                acl = meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
                pipeline.publish(pipeline.BuiltImage(copy, acl), image_id, acl, target)
                shutil.rmtree(work_dir, ignore_errors=True)

            self._set(rid, "TRANSFER", "publishing the image")
            fields = {"ENV": [], "imported_from": filepath, "fasthash": importer.fasthash(copy)}
            ready = self._attach(rec, platform, image_id, Access.of(True, user_acl, group_acl), fields,
                                 publish_copy)
            self.store.update(ready["_id"], {"imported_from": filepath})
            self.metrics.inc("shifter_gateway_pulls_total", outcome="imported")
        except ShifterError as err:
            self._fail(rid, str(err), started, work_dir)
        except Exception as err:
            log.exception("import %s failed unexpectedly", rid)
            self._fail(rid, f"internal error: {type(err).__name__}: {err}", started, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    # -- housekeeping -------------------------------------------------------------------------------

    def _housekeeper(self) -> None:
        """Heartbeats and leases for running jobs, batched lookup writes, records of dead owners."""
        last_beat = 0.0
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()
            self._settle()
            now = time.time()
            if now - last_beat >= HEARTBEAT_SECONDS:
                last_beat = now
                with contextlib.suppress(Exception):
                    for rec in self.store.find(statuses=INFLIGHT | {"EXPIRING"}):
                        if rec.get("owner") == self.owner.as_doc() and rec["_id"] not in self._unsettled:
                            self.store.update(
                                rec["_id"], self._lease(), only_if_status=INFLIGHT | {"EXPIRING"},
                                expect={"owner": self.owner.as_doc()},
                            )
            if now - self._last_reclaim >= RECLAIM_SECONDS:
                self._last_reclaim = now
                try:
                    self._clean_scratch(self.reclaim())  # a dead owner's scratch goes with its record
                except Exception as err:
                    if (down := outage(err)) is None:
                        log.exception("could not check the owners of records in flight")
                    else:
                        log.warning("records in flight not checked: %s", down)


    def _settle(self) -> None:
        """Write what jobs could not when the store was down: a record this process owns is
        never left in flight with nobody working on it (its lease would be renewed forever).
        A pull or import ends FAILURE with its reason; an expiry is queued again."""
        with self._running_lock:
            pending = dict(self._unsettled)
        for rid, (kind, message) in pending.items():
            try:
                if kind == "expire":
                    self._jobs.put(("expire", rid))
                else:
                    self.store.update(
                        rid,
                        {"status": "FAILURE", "status_message": message, "last_pull": time.time()},
                        only_if_status=INFLIGHT,
                        expect={"owner": self.owner.as_doc()},
                    )
                    log.warning("record %s: FAILURE written now that the store answers: %s", rid, message)
            except Exception as err:
                if outage(err) is None:
                    log.exception("could not settle record %s", rid)
                return  # still down: the next pass tries again
            with self._running_lock:
                self._unsettled.pop(rid, None)


def _config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """ENV/ENTRY/WORKDIR/LABELS for the record from an OCI image config document."""
    conf = config.get("config") if isinstance(config.get("config"), dict) else config
    conf = conf or {}
    env = conf.get("Env") or []
    env = [e for e in env if isinstance(e, str)] if isinstance(env, list) else []
    entry = conf.get("Entrypoint")
    entry = entry if isinstance(entry, list | str) else None
    workdir = conf.get("WorkingDir") if isinstance(conf.get("WorkingDir"), str) else None
    # Every record goes into every /api/list: the environment and the entry point are bounded
    # (the image is refused, cutting them would change what runs), labels are only information
    # and are cut, whole entries in key order, to what fits.
    env_bytes = sum(len(e.encode("utf-8", "replace")) for e in env)
    if len(env) > MAX_ENV_ENTRIES or env_bytes > MAX_ENV_BYTES:
        raise ShifterError(
            f"image config: Env has {len(env)} entries, {env_bytes} bytes "
            f"(at most {MAX_ENV_ENTRIES} entries, {MAX_ENV_BYTES} bytes)"
        )
    if len(json.dumps([entry, workdir])) > MAX_ENTRY_BYTES:
        raise ShifterError(f"image config: Entrypoint and WorkingDir exceed {MAX_ENTRY_BYTES} bytes")
    labels = conf.get("Labels") if isinstance(conf.get("Labels"), dict) else None
    if labels is not None:
        kept: dict[str, Any] = {}
        size = 0
        for key in sorted(labels)[:MAX_LABELS]:
            value = labels[key] if isinstance(labels[key], str) else str(labels[key])
            size += len(key.encode("utf-8", "replace")) + len(value.encode("utf-8", "replace"))
            if size > MAX_LABEL_BYTES:
                break
            kept[key] = value
        labels = kept
    return {"ENV": env, "ENTRY": entry, "WORKDIR": workdir, "LABELS": labels}
