"""Leases and recovery: records left by dead gateways, their scratch and partial files.

Every in-flight record names its owner (host, pid, process start time) and carries a
heartbeat and a lease (``lease_until``), so a record left by a dead gateway (a zombie
counts as dead) is recognised, at start-up and by the housekeeper every half minute: it
is re-queued once (FAILURE after a second interruption), its scratch files removed.
Taking a record over is a compare-and-set on its owner, so of two gateways starting
together only one adopts it. A store that stops answering ends the pulls that needed it
FAILURE, written as soon as it answers again (``settle``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

from gateway import examine, publish
from gateway.context import STALE_HEARTBEAT_SECONDS, Context, process_alive
from gateway.store.base import INFLIGHT, Doc, outage
from shifter.errors import ShifterError

log = logging.getLogger("gateway.manager")

MAX_ATTEMPTS = 2  # runs of one pull record (a crash during the first run re-queues it once)


class Recovery:
    """Takes over what dead owners left, renews this process's leases, settles what the store missed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def recover(self) -> None:
        """Records in flight whose owner is dead: re-queue once, else FAILURE; remove scratch files."""
        live = self.reclaim()
        self.clean_scratch(live)
        self.clean_partials(others_busy=bool(live))

    def reclaim(self) -> set[str]:
        """Take over every record whose owner is dead; returns the ids of records still being worked on."""
        ctx, store = self.ctx, self.ctx.store
        live: set[str] = set()
        for rec in store.find(statuses=INFLIGHT):
            if rec.get("owner") == ctx.owner.as_doc() or ctx.record_alive(rec):
                live.add(rec["_id"])
                continue
            if not self.take_over(rec):
                current = store.get(rec["_id"])
                if current and current.get("status") in INFLIGHT and current.get("owner") != rec.get("owner"):
                    live.add(rec["_id"])  # another gateway won the lease: its scratch files are in use
        for rec in store.find(statuses=("EXPIRING",)):
            if (
                rec.get("owner") != ctx.owner.as_doc()
                and not ctx.record_alive(rec)
                and store.update(
                    rec["_id"], ctx.lease(), only_if_status=("EXPIRING",), expect={"owner": rec.get("owner")}
                )
            ):
                ctx.jobs.put(("expire", rec["_id"]))
        return live

    def clean_partials(self, others_busy: bool) -> None:
        """Partial files of dead writers: published-image partials of this host's dead gateways,
        and the blob cache's partial downloads unless another live gateway is pulling now."""
        for platform in self.ctx.config.platforms.values():
            target = self.ctx.target(platform)
            try:
                if target.remote:
                    removed = publish.remove_remote_leftovers(target, process_alive)
                elif target.image_dir:
                    removed = publish.remove_leftovers(target.image_dir, process_alive)
                else:
                    removed = []
            except ShifterError as err:  # an unreachable system must not stop the gateway
                log.warning("partial files in %s not checked: %s", target.image_dir, err)
                continue
            for name in removed:
                log.warning("removed %s left in %s by a dead gateway", name, target.image_dir)
        blobs = os.path.join(self.ctx.config.cache_dir, "blobs", "sha256")
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

    def take_over(self, rec: Doc) -> bool:
        """Adopt a dead owner's in-flight record; returns True if it was re-queued."""
        ctx, store = self.ctx, self.ctx.store
        attempts = int(rec.get("attempts", 1))
        kind = "import" if rec.get("filepath") else "pull"
        if attempts >= MAX_ATTEMPTS or kind == "import":
            store.update(
                rec["_id"],
                {
                    "status": "FAILURE",
                    "last_pull": time.time(),
                    "status_message": "interrupted: the gateway stopped during this " + kind + "; try again",
                },
                only_if_status=INFLIGHT,
                expect={"owner": rec.get("owner")},
            )
            ctx.metrics.inc("shifter_gateway_pulls_total", outcome="interrupted")
            log.warning("record %s (%s) left by a dead gateway: FAILURE", rec["_id"], rec.get("pulltag"))
            return False
        if store.update(
            rec["_id"],
            {
                "status": "PENDING",
                **ctx.lease(),
                "attempts": attempts + 1,
                "status_message": "re-queued after a gateway restart",
            },
            only_if_status=INFLIGHT,
            expect={"owner": rec.get("owner")},
        ):
            log.warning("record %s (%s) left by a dead gateway: re-queued", rec["_id"], rec.get("pulltag"))
            ctx.jobs.put(("pull", rec["_id"]))
            return True
        current = store.get(rec["_id"])
        if current is None or current.get("owner") != rec.get("owner"):
            return False  # another gateway holds the lease now
        # another record took the slot meanwhile: this one is abandoned
        store.update(
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

    def clean_scratch(self, live: set[str]) -> None:
        """Remove ``job-<rid>`` scratch directories no live pull uses (unmounting an examiner's tree first).

        ``live`` was read before the directory was listed: a pull that another gateway on this
        host (or another API process) started in between is not in it, so each candidate's
        record is read again, after the listing, before anything is removed.
        """
        try:
            names = os.listdir(self.ctx.config.expand_dir)
        except OSError:
            return
        for name in names:
            if name.startswith("job-") and name[4:] not in live:
                with self.ctx.running_lock:
                    if name[4:] in self.ctx.running:
                        continue
                if self._worked_on(name[4:]):
                    continue
                path = os.path.join(self.ctx.config.expand_dir, name)
                errors = examine.unmount_under(path)
                if errors:  # never delete through a mount: leave the directory for the next start
                    log.error("scratch %s kept: %s", path, "; ".join(errors))
                    continue
                shutil.rmtree(path, ignore_errors=True)

    def _worked_on(self, rid: str) -> bool:
        """Is the record of this scratch directory in flight with a live owner now?"""
        rec = self.ctx.store.get(rid)
        return rec is not None and rec["status"] in INFLIGHT and self.ctx.record_alive(rec)

    def renew_leases(self) -> None:
        """Heartbeat and lease of every record this process works on (not those waiting to settle)."""
        ctx = self.ctx
        for rec in ctx.store.find(statuses=INFLIGHT | {"EXPIRING"}):
            if rec.get("owner") == ctx.owner.as_doc() and rec["_id"] not in ctx.unsettled:
                ctx.store.update(
                    rec["_id"], ctx.lease(), only_if_status=INFLIGHT | {"EXPIRING"},
                    expect={"owner": ctx.owner.as_doc()},
                )

    def settle(self) -> None:
        """Write what jobs could not when the store was down: a record this process owns is
        never left in flight with nobody working on it (its lease would be renewed forever).
        A pull or import ends FAILURE with its reason; an expiry is queued again."""
        ctx = self.ctx
        with ctx.running_lock:
            pending = dict(ctx.unsettled)
        for rid, (kind, message) in pending.items():
            try:
                if kind == "expire":
                    ctx.jobs.put(("expire", rid))
                else:
                    ctx.store.update(
                        rid,
                        {"status": "FAILURE", "status_message": message, "last_pull": time.time()},
                        only_if_status=INFLIGHT,
                        expect={"owner": ctx.owner.as_doc()},
                    )
                    log.warning("record %s: FAILURE written now that the store answers: %s", rid, message)
            except Exception as err:
                if outage(err) is None:
                    log.exception("could not settle record %s", rid)
                return  # still down: the next pass tries again
            with ctx.running_lock:
                ctx.unsettled.pop(rid, None)
