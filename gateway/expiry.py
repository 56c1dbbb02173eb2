"""Expiry: READY -> EXPIRING -> EXPIRED, autoexpire of images past their time, blob pruning.

Images never looked up expire too (the original kept them forever). An image's files go
only when no other READY record of the same id uses them (under the id's lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway import blobcache, pipeline
from gateway.auth import Session
from gateway.checks import Forbidden, NotFound, check_tag
from gateway.context import FAILURE_HOLD_SECONDS, Context
from gateway.store.base import INFLIGHT, Doc
from gateway.tagging import Tagging
from shifter.errors import ShifterError

log = logging.getLogger("gateway.manager")

BLOB_GRACE_SECONDS = 3600.0  # cached blobs this recent are never pruned


class Expiry:
    """Queues and runs expiries; ``flush`` writes the batched lookup refreshes first."""

    def __init__(self, ctx: Context, tagging: Tagging, flush: Callable[[], None]) -> None:
        self.ctx = ctx
        self.tagging = tagging
        self.flush = flush

    def expire(self, session: Session, itype: str, tag: str) -> bool:
        """Admins only: queue removal of the image the tag names."""
        if not session.admin:
            raise Forbidden(f"user {session.user} is not an admin of {session.system}")
        tag = check_tag(itype, tag)
        rec = self.ctx.store.find_ready(session.system, itype, tag)
        if rec is None:
            raise NotFound(f"image not found: {itype}:{tag}")
        self.enqueue(rec)
        return True

    def enqueue(self, rec: Doc) -> None:
        if self.ctx.store.update(rec["_id"], {"status": "EXPIRING", **self.ctx.lease()}, only_if_status=("READY",)):
            self.ctx.jobs.put(("expire", rec["_id"]))

    def run(self, rid: str) -> None:
        """The record goes first; the files only if no other READY record of the id uses them."""
        store = self.ctx.store
        rec = store.get(rid)
        if rec is None or rec["status"] != "EXPIRING" or not rec.get("id"):
            return
        platform = self.ctx.platform(rec["system"])
        with self.tagging.image_lock(rec["system"], rec["id"]):
            if store.find_ready_by_image_id(rec["system"], rec["id"]) is not None:
                store.update(rid, {"status": "EXPIRED", "status_message": "", "tag": [], "tag_access": []})
                return
            try:
                pipeline.remove_published(rec["id"], self.ctx.target(platform))
            except ShifterError as err:
                store.update(rid, {"status": "READY", "status_message": f"expiry failed: {err}"})
                return
            store.update(rid, {"status": "EXPIRED", "status_message": "", "tag": [], "tag_access": []})

    def autoexpire(self, session: Session) -> list[str]:
        """Admins only: expire images past their time, drop stale records, prune unreferenced blobs."""
        if not session.admin:
            raise Forbidden(f"user {session.user} is not an admin of {session.system}")
        self.flush()
        now = time.time()
        expired: list[str] = []
        timeout = self.ctx.config.expiration_timeout
        for rec in self.ctx.store.find(system=session.system):
            status = rec["status"]
            if self.stale(rec, now):
                self.ctx.store.delete(rec["_id"])
            elif status == "READY" and timeout is not None:
                when = rec.get("expiration")
                if when is None:
                    when = float(rec.get("last_pull") or now) + timeout
                if now > float(when):
                    self.enqueue(rec)
                    expired.append(rec.get("id") or rec["_id"])
        self.prune_blobs()
        return expired

    def stale(self, rec: Doc, now: float) -> bool:
        """An in-flight record nobody works on, or a FAILURE clients have had time to see."""
        if rec["status"] in INFLIGHT:
            return not self.ctx.owner_alive(rec.get("owner"), rec.get("last_heartbeat"))
        return rec["status"] == "FAILURE" and now - float(rec.get("last_pull") or 0) > FAILURE_HOLD_SECONDS

    def prune_blobs(self) -> int:
        """Remove cached blobs no READY image uses (the original never cleaned its cache).

        The cache is ``<CacheDirectory>/blobs/sha256/<hex>`` (gateway.blobcache.BlobCache). Files
        touched in the last hour are kept, so a pull running in another gateway process that
        shares the cache never loses a blob it has just fetched; nothing is pruned while a pull
        of this store is in flight. Config blobs are tiny and fetched again when needed.
        """
        store = self.ctx.store
        if store.find(statuses=INFLIGHT):
            return 0
        keep = {
            d
            for rec in store.find(statuses=("READY", "EXPIRING"))
            for d in rec.get("layers") or []
            if isinstance(d, str) and d.startswith("sha256:")
        }
        removed = blobcache.prune_cache(self.ctx.config.cache_dir, keep, BLOB_GRACE_SECONDS)
        if removed:
            log.info("pruned %d unreferenced blobs from %s", len(removed), self.ctx.config.cache_dir)
        return len(removed)
