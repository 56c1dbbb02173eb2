"""Imports: PENDING -> HASHING -> TRANSFER -> READY for a squashfs file an ImportUsers member owns.

The file is opened as the requesting user and copied from that descriptor
(gateway.importer); the id is the sha256 of its content; the tag is a ``custom:`` tag the
importer owns (gateway.tagging refuses one another user holds).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from gateway import importer, pipeline
from gateway.access import Access, import_owner, owner_of
from gateway.auth import Session
from gateway.checks import BadRequest, Forbidden, check_tag, parse_acl
from gateway.context import FAILURE_HOLD_SECONDS, Context
from gateway.store.base import Doc
from gateway.tagging import Tagging, requested_by
from shifter.errors import ShifterError
from shifter.formats.meta import ImageMeta

log = logging.getLogger("gateway.manager")

RECENT_SECONDS = 10.0  # an import of the same file this recent is answered with its READY record

NewRecord = Callable[[str, str, str, list[int], list[int], Session], Doc]


class Imports:
    """Starts imports (idempotent, clients poll with it) and runs them on a worker."""

    def __init__(self, ctx: Context, tagging: Tagging, new_record: NewRecord) -> None:
        self.ctx = ctx
        self.tagging = tagging
        self.new_record = new_record

    def doimport(self, session: Session, itype: str, tag: str, body: dict[str, Any]) -> Doc:
        """ImportUsers only: publish a squashfs file the caller can read as a custom tag they own.

        The id is the sha256 of the file's content. A docker tag only ever comes from a
        registry, and a custom tag that another user imported stays theirs.

        Idempotent like pull (clients poll with it): an import in flight, a recent FAILURE
        or a just-finished import of the same file is returned instead of starting again.
        """
        ctx, store = self.ctx, self.ctx.store
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
        ctx.platform(session.system)
        user_acl = parse_acl(body.get("allowed_uids"), "allowed_uids")
        group_acl = parse_acl(body.get("allowed_gids"), "allowed_gids")
        now = time.time()
        mine = import_owner(session.uid)
        current = store.find_inflight(session.system, itype, tag)
        if current is not None and ctx.record_alive(current):
            if not requested_by(current, session):
                raise Forbidden(f"custom:{tag} is being imported by another user")
            return current
        ready = store.find_ready(session.system, itype, tag)
        if ready is not None and owner_of(ready, tag) not in (None, mine):
            raise Forbidden(f"custom:{tag} belongs to another user")
        if (
            ready is not None
            and ready.get("imported_from") == filepath
            and (now - float(ready.get("last_pull") or 0) < RECENT_SECONDS)
        ):
            return ready
        failures = store.find(system=session.system, itype=itype, pulltag=tag, statuses=("FAILURE",))
        recent = [f for f in failures if now - float(f.get("last_pull") or 0) < FAILURE_HOLD_SECONDS]
        if recent:
            newest = max(recent, key=lambda r: float(r.get("last_pull") or 0))
            if requested_by(newest, session):
                return newest
        doc = self.new_record(session.system, itype, tag, user_acl, group_acl, session)
        doc.update(filepath=filepath, imported_from=filepath, status="PENDING", format="squashfs")
        doc["requester"]["groups"] = sorted(session.groups)
        rec, inserted = store.claim(doc)
        if inserted:
            for old in failures:
                store.delete(old["_id"])
            ctx.jobs.put(("import", rec["_id"]))
        return rec

    def run(self, rid: str) -> None:
        ctx = self.ctx
        rec = ctx.inflight_record(rid)
        if rec is None:
            return
        started = time.monotonic()
        work_dir = ctx.job_dir(rid)
        platform = ctx.platform(rec["system"])
        requester = rec.get("requester") or {}
        filepath = rec["filepath"]
        user_acl, group_acl = list(rec.get("userACL") or []), list(rec.get("groupACL") or [])
        try:
            ctx.set(rid, "HASHING", "copying and checking the file")
            gids = set(requester.get("groups") or []) | {int(requester.get("gid", -1))}
            fd = importer.open_as_user(filepath, int(requester.get("uid", -1)), int(requester.get("gid", -1)), gids)
            try:
                copy, image_id = importer.copy_for_import(fd, filepath, work_dir, ctx.config.max_image_bytes)
            finally:
                os.close(fd)
            importer.check_squashfs(copy, filepath, ctx.config.max_image_paths, ctx.config.pull_deadline)
            meta = ImageMeta(format="squashfs", user=requester.get("user"))
            target = ctx.target(platform)

            def publish_copy(image: Access) -> None:
                acl = meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
                pipeline.publish(pipeline.BuiltImage(copy, acl), image_id, acl, target)
                shutil.rmtree(work_dir, ignore_errors=True)

            ctx.set(rid, "TRANSFER", "publishing the image")
            fields = {"ENV": [], "imported_from": filepath, "fasthash": importer.fasthash(copy)}
            ready = self.tagging.attach(rec, platform, image_id, Access.of(True, user_acl, group_acl), fields,
                                        publish_copy)
            ctx.store.update(ready["_id"], {"imported_from": filepath})
            ctx.metrics.inc("shifter_gateway_pulls_total", outcome="imported")
        except ShifterError as err:
            ctx.fail(rid, str(err), started, work_dir)
        except Exception as err:
            log.exception("import %s failed unexpectedly", rid)
            ctx.fail(rid, f"internal error: {type(err).__name__}: {err}", started, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
