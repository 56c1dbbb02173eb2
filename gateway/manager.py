"""The front the API calls: lookups and lists, the worker threads, the housekeeper.

The work itself lives in one module per concern, all sharing one gateway.context.Context
(config, store, metrics, owner, job queue):

* gateway.pulls: starting and running pulls (INIT -> ... -> READY or FAILURE);
* gateway.imports: starting and running imports (PENDING -> HASHING -> TRANSFER -> READY);
* gateway.expiry: expire, autoexpire, blob pruning (READY -> EXPIRING -> EXPIRED);
* gateway.recovery: leases, taking over a dead owner's records, scratch and partial files;
* gateway.tagging: a tag's access merged into its image under the id's lock, what a caller sees.

Lookups do not write to the store: expiration refreshes are batched every few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from gateway.access import effective, for_tag
from gateway.auth import Session
from gateway.checks import Forbidden, NotFound, check_tag
from gateway.config import GatewayConfig
from gateway.context import HEARTBEAT_SECONDS, RECLAIM_SECONDS, Context, yield_to_requests
from gateway.expiry import Expiry
from gateway.imports import Imports
from gateway.metrics import Metrics
from gateway.pulls import Pulls
from gateway.recovery import Recovery
from gateway.store.base import Doc, Store, outage
from gateway.tagging import Tagging, access_fields, private_view, requested_by
from shifter.errors import ShifterError

log = logging.getLogger("gateway.manager")

FLUSH_SECONDS = 5.0


class ImageManager:
    """Owns the workers; the API calls its methods with an authenticated Session."""

    def __init__(self, config: GatewayConfig, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        self.ctx = Context(config, store, self.metrics)
        self.tagging = Tagging(self.ctx)
        self.pulls = Pulls(self.ctx, self.tagging)
        self.imports = Imports(self.ctx, self.tagging, self.pulls.new_record)
        self.expiry = Expiry(self.ctx, self.tagging, self.flush)
        self.recovery = Recovery(self.ctx)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._touch_lock = threading.Lock()
        self._touches: dict[str, float] = {}
        self._metric_docs: list[Doc] = []
        self._last_reclaim = 0.0
        self.metrics.gauge("shifter_gateway_queue_depth", "Pulls waiting for a worker.", self.ctx.jobs.qsize)
        self.metrics.gauge(
            "shifter_gateway_pulls_running", "Pulls being worked on.", lambda: len(self.ctx.running)
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a dead predecessor left, then start the workers and the housekeeper."""
        for d in (self.config.cache_dir, self.config.expand_dir):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as err:
                raise ShifterError(f"cannot create {d}: {err.strerror}") from None
        self.recovery.recover()
        for i in range(self.config.worker_threads):
            t = threading.Thread(target=self._worker, name=f"pull-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeeper, name="housekeeper", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; running jobs are abandoned to recovery (their records say who owned them),
        their conversion processes killed."""
        self._stop.set()
        self.ctx.builds.stop()
        for _ in self._threads:
            self.ctx.jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.flush()

    # -- what the API calls ------------------------------------------------------------------

    def lookup(self, session: Session, itype: str, tag: str) -> Doc:
        """The READY record for tag if the caller may read it; refreshes its expiration (batched)."""
        tag = check_tag(itype, tag)
        rec = self.store.find_ready(session.system, itype, tag)
        if rec is None or not session.may_read(*access_fields(for_tag(rec, tag))):
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
        return private_view(rec, session)

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
            view = private_view(rec, session)
            if view["tag"] or session.may_read(*access_fields(effective(rec))):
                views.append(view)
        return views

    def queue_list(self, session: Session) -> list[dict[str, Any]]:
        """Unsettled records: a user sees their own requests, an admin every request."""
        self.ctx.platform(session.system)
        return [
            {"status": r["status"], "image": r.get("pulltag")}
            for r in self.store.find(system=session.system)
            if r["status"] not in ("READY", "EXPIRED") and requested_by(r, session)
        ]

    def metric_docs(self, session: Session, limit: int) -> list[Doc]:
        if not session.admin:
            raise Forbidden("only admins may read the lookup metrics")
        self.flush()
        return self.store.metrics(session.system, limit)

    def pull(
        self,
        session: Session,
        itype: str,
        tag: str,
        allowed_uids: list[int],
        allowed_gids: list[int],
        refresh: bool = False,
    ) -> Doc:
        """Start a pull or join the one in flight (gateway.pulls)."""
        return self.pulls.pull(session, itype, tag, allowed_uids, allowed_gids, refresh)

    def doimport(self, session: Session, itype: str, tag: str, body: dict[str, Any]) -> Doc:
        """Start an import or join the one in flight (gateway.imports)."""
        return self.imports.doimport(session, itype, tag, body)

    def expire(self, session: Session, itype: str, tag: str) -> bool:
        """Admins only: queue removal of the image the tag names (gateway.expiry)."""
        return self.expiry.expire(session, itype, tag)

    def autoexpire(self, session: Session) -> list[str]:
        """Admins only: expire images past their time, drop stale records, prune blobs (gateway.expiry)."""
        return self.expiry.autoexpire(session)

    # -- workers ----------------------------------------------------------------------------------

    def _worker(self) -> None:
        yield_to_requests()
        ctx = self.ctx
        runners = {"pull": self.pulls.run, "expire": self.expiry.run, "import": self.imports.run}
        while not self._stop.is_set():
            job = ctx.jobs.get()
            if job is None:
                return
            kind, rid = job
            with ctx.running_lock:
                ctx.running.add(rid)
            try:
                runners[kind](rid)
            except Exception as err:
                down = outage(err)
                if down is None:
                    log.exception("%s job %s crashed", kind, rid)
                else:
                    log.warning("%s job %s stopped: %s", kind, rid, down)
                if down is not None or kind != "expire":  # its record still says in flight: settle it later
                    with ctx.running_lock:  # (an expiry again only if the store was the cause, not a bug)
                        ctx.unsettled.setdefault(rid, (kind, f"interrupted: {down or 'the job crashed'}; try again"))
            finally:
                with ctx.running_lock:
                    ctx.running.discard(rid)

    def _housekeeper(self) -> None:
        """Heartbeats and leases for running jobs, batched lookup writes, records of dead owners."""
        last_beat = 0.0
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()
            self.recovery.settle()
            now = time.time()
            if now - last_beat >= HEARTBEAT_SECONDS:
                last_beat = now
                with contextlib.suppress(Exception):
                    self.recovery.renew_leases()
            if now - self._last_reclaim >= RECLAIM_SECONDS:
                self._last_reclaim = now
                try:
                    self.recovery.clean_scratch(self.recovery.reclaim())  # a dead owner's scratch goes with it
                except Exception as err:
                    if (down := outage(err)) is None:
                        log.exception("could not check the owners of records in flight")
                    else:
                        log.warning("records in flight not checked: %s", down)
