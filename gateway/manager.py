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
  heartbeat, so a record left by a dead gateway is recognised: at start-up it is
  re-queued once (FAILURE after a second interruption), its scratch files removed.
* Lookups do not write to the store: expiration refreshes are batched every few seconds.
* Images never looked up expire too (the original kept them forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway import examine, importer, pipeline, registry
from gateway.auth import Session
from gateway.config import GatewayConfig, PlatformConfig
from gateway.metrics import Metrics
from gateway.store import INFLIGHT, Doc, Store, new_id
from shifter.errors import ShifterError
from shifter.imageref import split_docker_tag
from shifter.meta import ImageMeta, read_meta, write_meta

log = logging.getLogger("gateway.manager")

RECENT_SECONDS = 10.0  # an import of the same file this recent is answered with its READY record
FAILURE_HOLD_SECONDS = 3.0  # a FAILURE stays visible to polling clients (every 0.5 s), then a retry starts
HEARTBEAT_SECONDS = 10.0
STALE_HEARTBEAT_SECONDS = 90.0
FLUSH_SECONDS = 5.0
BLOB_GRACE_SECONDS = 3600.0  # cached blobs this recent are never pruned
MAX_ATTEMPTS = 2  # runs of one pull record (a crash during the first run re-queues it once)
DOCKER_HUB = ("registry-1.docker.io", "index.docker.io", "docker.io")
_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.+-@/")
IMAGE_TYPES = ("docker", "custom")


class NotFound(Exception):
    """404: unknown system, unknown image, or an image the caller may not read."""


class Forbidden(Exception):
    """403: the caller may not do this (not an admin, not an import user)."""


class BadRequest(Exception):
    """400: the request itself is malformed (names the problem)."""


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()[19].decode()


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str

    def as_doc(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "start": self.start}


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
        text = str(item).strip()
        if isinstance(item, bool) or not text.lstrip("-").isdigit():
            raise BadRequest(f"{name}: {str(item)[:40]!r} is not a numeric id")
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
        self._touch_lock = threading.Lock()
        self._touches: dict[str, float] = {}
        self._metric_docs: list[Doc] = []
        # Registry credentials from the munge payload are needed by the worker but must never
        # be written to the store: they stay in memory, keyed by a random reference.
        self._token_lock = threading.Lock()
        self._tokens: dict[str, dict[str, str]] = {}
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
            return _proc_start_time(pid) == str(owner.get("start"))
        return heartbeat is not None and time.time() - heartbeat < STALE_HEARTBEAT_SECONDS

    def recover(self) -> None:
        """Records in flight whose owner is dead: re-queue once, else FAILURE; remove scratch files."""
        live: set[str] = set()
        for rec in self.store.find(statuses=INFLIGHT):
            if self.owner_alive(rec.get("owner"), rec.get("last_heartbeat")):
                live.add(rec["_id"])
                continue
            self._take_over(rec)
        for rec in self.store.find(statuses=("EXPIRING",)):
            if not self.owner_alive(rec.get("owner"), rec.get("last_heartbeat")):
                self._enqueue_expire(rec)
        self._clean_scratch(live)

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
            )
            self.metrics.inc("shifter_gateway_pulls_total", outcome="interrupted")
            log.warning("record %s (%s) left by a dead gateway: FAILURE", rec["_id"], rec.get("pulltag"))
            return False
        if self.store.update(
            rec["_id"],
            {
                "status": "PENDING",
                "owner": self.owner.as_doc(),
                "last_heartbeat": time.time(),
                "attempts": attempts + 1,
                "status_message": "re-queued after a gateway restart",
            },
            only_if_status=INFLIGHT,
        ):
            log.warning("record %s (%s) left by a dead gateway: re-queued", rec["_id"], rec.get("pulltag"))
            self._jobs.put(("pull", rec["_id"]))
            return True
        # another record took the slot meanwhile: this one is abandoned
        self.store.update(
            rec["_id"],
            {
                "status": "FAILURE",
                "last_pull": time.time(),
                "status_message": "interrupted: superseded by another pull",
            },
            only_if_status=INFLIGHT,
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
        if rec is None or not session.may_read(rec.get("private"), rec.get("userACL"), rec.get("groupACL")):
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
        return rec

    def flush(self) -> None:
        """Write batched expiration refreshes and metric documents."""
        with self._touch_lock:
            touches, self._touches = self._touches, {}
            docs, self._metric_docs = self._metric_docs, []
        try:
            self.store.touch(touches)
            self.store.add_metrics(docs)
        except Exception:
            log.exception("could not write lookup refreshes")

    def list_images(self, session: Session) -> list[Doc]:
        return [
            r
            for r in self.store.find(system=session.system, statuses=("READY",))
            if session.may_read(r.get("private"), r.get("userACL"), r.get("groupACL"))
        ]

    def queue_list(self, system: str) -> list[dict[str, Any]]:
        self.platform(system)
        return [
            {"status": r["status"], "image": r.get("pulltag")}
            for r in self.store.find(system=system)
            if r["status"] not in ("READY", "EXPIRED")
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
        now = time.time()
        for _ in range(5):
            current = self.store.find_inflight(system, itype, tag)
            if current is not None:
                if self.owner_alive(current.get("owner"), current.get("last_heartbeat")):
                    return current
                log.warning("pull %s of %s: its gateway died; starting over", current["_id"], tag)
                self.store.delete(current["_id"])
                continue
            ready = self.store.find_ready(system, itype, tag)
            if ready is not None and not refresh:
                fresh = now - float(ready.get("last_pull") or 0) < self.config.pull_update_timeout
                # A new ACL on a private image is applied at once (the original ignored it for 10 s
                # after a pull and still answered READY); polls repeat the same ACL, so no loop.
                acl_changed = bool(ready.get("private")) and (
                    set(ready.get("userACL") or []) != set(user_acl)
                    or set(ready.get("groupACL") or []) != set(group_acl)
                )
                if fresh and not acl_changed:
                    return ready
            failures = self.store.find(system=system, itype=itype, pulltag=tag, statuses=("FAILURE",))
            if failures:
                newest = max(failures, key=lambda r: float(r.get("last_pull") or 0))
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
            "last_heartbeat": now,
            "owner": self.owner.as_doc(),
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
            except Exception:
                log.exception("%s job %s crashed", kind, rid)
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
            log.exception("pull %s (%s) failed unexpectedly", rid, rec.get("pulltag"))
            self._fail(rid, f"internal error: {type(err).__name__}: {err}", started, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _fail(self, rid: str, message: str, started: float, work_dir: str | None = None) -> None:
        """FAILURE with a one-line reason; scratch files go first, so a settled record never has any."""
        if work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        self.store.update(
            rid,
            {
                "status": "FAILURE",
                "status_message": message.splitlines()[0][:500] if message else "failed",
                "last_pull": time.time(),
            },
        )
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
        private = bool(resolved.private)
        user_acl = list(rec.get("userACL") or []) if private else []
        group_acl = list(rec.get("groupACL") or []) if private else []
        image_id = resolved.image_id
        fmt = rec.get("format") or "squashfs"
        target = self.target(platform)
        fields = _config_fields(resolved.config)
        existing = self.store.find_ready_by_image_id(system, image_id)
        if existing is not None and self._published(platform, image_id, fmt):
            shutil.rmtree(spec.expand_dir, ignore_errors=True)
            acl_changed = (
                bool(existing.get("private")) != private
                or set(existing.get("userACL") or []) != set(user_acl)
                or set(existing.get("groupACL") or []) != set(group_acl)
            )
            if acl_changed:
                self._set(rid, "TRANSFER", "updating the image's ACLs")
                self._rewrite_acl(platform, image_id, user_acl, group_acl)
            self._merge(existing, rec, private, user_acl, group_acl)
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
        meta = built.meta.replace(user_acl=user_acl, group_acl=group_acl)
        self._set(rid, "TRANSFER", "publishing the image")
        pipeline.publish(built, image_id, meta, target)
        shutil.rmtree(spec.expand_dir, ignore_errors=True)
        self._complete(rec, image_id, private, user_acl, group_acl, {
            "last_heartbeat": time.time(),
            "manifest_digest": resolved.manifest_digest,
            "layers": [layer.get("digest") for layer in resolved.layers if isinstance(layer, dict)],
            **fields,
        })
        self.metrics.inc("shifter_gateway_pulls_total", outcome="ready")
        self.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)

    def _complete(
        self, rec: Doc, image_id: str, private: bool, user_acl: list[int], group_acl: list[int], fields: Doc
    ) -> Doc | None:
        """Mark the pull or import READY, or merge it into the published image with the same id (returned)."""
        existing = self.store.find_ready_by_image_id(rec["system"], image_id)
        if existing is not None:
            self._merge(existing, rec, private, user_acl, group_acl)
            return existing
        self.store.update(rec["_id"], {
            "status": "READY", "status_message": "", "id": image_id, "private": private,
            "userACL": user_acl, "groupACL": group_acl, "last_pull": time.time(), **fields,
        })
        self.store.add_tag(rec["_id"], rec["pulltag"])
        return None

    def _merge(
        self, existing: Doc, rec: Doc, private: bool, user_acl: list[int], group_acl: list[int]
    ) -> None:
        """The pulled tag names an already published image: move the tag there, drop the pull record."""
        self.store.update(
            existing["_id"],
            {"last_pull": time.time(), "private": private, "userACL": user_acl, "groupACL": group_acl},
        )
        self.store.add_tag(existing["_id"], rec["pulltag"])
        self.store.delete(rec["_id"])

    def _rewrite_acl(
        self, platform: PlatformConfig, image_id: str, user_acl: list[int], group_acl: list[int]
    ) -> None:
        if platform.accesstype != "local":
            raise ShifterError(
                "changing the ACLs of an image on a remote system needs a full re-pull; "
                "expire the image first"
            )
        path = os.path.join(platform.image_dir, f"{image_id}.meta")
        write_meta(path, read_meta(path).replace(user_acl=user_acl, group_acl=group_acl))

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
        self.store.update(
            rec["_id"], {"status": "EXPIRING", "owner": self.owner.as_doc(), "last_heartbeat": time.time()}
        )
        self._jobs.put(("expire", rec["_id"]))

    def _run_expire(self, rid: str) -> None:
        rec = self.store.get(rid)
        if rec is None or rec["status"] != "EXPIRING" or not rec.get("id"):
            return
        platform = self.platform(rec["system"])
        try:
            pipeline.remove_published(rec["id"], self.target(platform))
        except ShifterError as err:
            self.store.update(rid, {"status": "READY", "status_message": f"expiry failed: {err}"})
            return
        self.store.update(rid, {"status": "EXPIRED", "status_message": "", "tag": []})

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

        The cache is ``<CacheDirectory>/blobs/sha256/<hex>`` (gateway.registry.BlobCache). Files
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
        removed = registry.prune_cache(self.config.cache_dir, keep, BLOB_GRACE_SECONDS)
        if removed:
            log.info("pruned %d unreferenced blobs from %s", len(removed), self.config.cache_dir)
        return len(removed)

    # -- import -----------------------------------------------------------------------------------

    def doimport(self, session: Session, itype: str, tag: str, body: dict[str, Any]) -> Doc:
        """ImportUsers only: publish a squashfs file the caller can read; id = the original's fasthash.

        Idempotent like pull (clients poll with it): an import in flight, a recent FAILURE
        or a just-finished import of the same file is returned instead of starting again.
        """
        if not self.config.import_allowed(session.user):
            raise Forbidden(f"user {session.user} may not import images (ImportUsers)")
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
        current = self.store.find_inflight(session.system, itype, tag)
        if current is not None and self.owner_alive(current.get("owner"), current.get("last_heartbeat")):
            return current
        ready = self.store.find_ready(session.system, itype, tag)
        if (
            ready is not None
            and ready.get("imported_from") == filepath
            and (now - float(ready.get("last_pull") or 0) < RECENT_SECONDS)
        ):
            return ready
        failures = self.store.find(system=session.system, itype=itype, pulltag=tag, statuses=("FAILURE",))
        recent = [f for f in failures if now - float(f.get("last_pull") or 0) < FAILURE_HOLD_SECONDS]
        if recent:
            return max(recent, key=lambda r: float(r.get("last_pull") or 0))
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
        private = bool(user_acl or group_acl)
        try:
            self._set(rid, "HASHING", "copying and checking the file")
            gids = set(requester.get("groups") or []) | {int(requester.get("gid", -1))}
            importer.check_readable_by(filepath, int(requester.get("uid", -1)), gids)
            copy = importer.copy_for_import(filepath, work_dir)
            importer.check_squashfs(copy, filepath)
            image_id = importer.fasthash(copy)
            meta = ImageMeta(
                format="squashfs", user=requester.get("user"), user_acl=user_acl, group_acl=group_acl
            )
            self._set(rid, "TRANSFER", "publishing the image")
            pipeline.publish(pipeline.BuiltImage(copy, meta), image_id, meta, self.target(platform))
            shutil.rmtree(work_dir, ignore_errors=True)
            existing = self._complete(rec, image_id, private, user_acl, group_acl, {"ENV": []})
            if existing is not None:
                self.store.update(existing["_id"], {"imported_from": filepath})
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
        """Heartbeats for running jobs, batched lookup writes."""
        last_beat = 0.0
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()
            now = time.time()
            if now - last_beat >= HEARTBEAT_SECONDS:
                last_beat = now
                with contextlib.suppress(Exception):
                    for rec in self.store.find(statuses=INFLIGHT | {"EXPIRING"}):
                        if rec.get("owner") == self.owner.as_doc():
                            self.store.update(
                                rec["_id"], {"last_heartbeat": now}, only_if_status=INFLIGHT | {"EXPIRING"}
                            )


def _config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """ENV/ENTRY/WORKDIR/LABELS for the record from an OCI image config document."""
    conf = config.get("config") if isinstance(config.get("config"), dict) else config
    conf = conf or {}
    env = conf.get("Env") or []
    entry = conf.get("Entrypoint")
    return {
        "ENV": [e for e in env if isinstance(e, str)] if isinstance(env, list) else [],
        "ENTRY": entry if isinstance(entry, list | str) else None,
        "WORKDIR": conf.get("WorkingDir") if isinstance(conf.get("WorkingDir"), str) else None,
        "LABELS": conf.get("Labels") if isinstance(conf.get("Labels"), dict) else None,
    }
