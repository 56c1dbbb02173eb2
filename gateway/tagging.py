"""Who may read what: a tag's access merged into its image, under that image id's lock.

Access belongs to tags (gateway.access): a docker tag only ever comes from a registry, a
custom tag belongs to the user who imported it, and no pull or import moves a tag another
owner holds. Work on one image id (publish, merge, expire) holds that id's lock, so one id
has one READY record and its files go only when nothing uses them. Also what a caller is
shown of a record (``private_view``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from typing import Any

from gateway import pipeline, publish
from gateway.access import REGISTRY_OWNER, Access, combine, effective, for_tag, import_owner
from gateway.auth import Session
from gateway.config import PlatformConfig
from gateway.context import Context
from gateway.store.base import Doc
from shifter.errors import ShifterError
from shifter.formats.meta import read_meta


def requested_by(rec: Doc, session: Session) -> bool:
    return session.admin or (rec.get("requester") or {}).get("uid") == session.uid


def access_fields(access: Access) -> tuple[bool, list[int], list[int]]:
    return access.private, list(access.user_acl), list(access.group_acl)


def private_view(rec: Doc, session: Session) -> Doc:
    """What a caller sees of a record: tags they may read; others' status messages withheld."""
    view = dict(rec)
    if not session.admin:
        tags = view.get("tag")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        view["tag"] = [t for t in tags if session.may_read(*access_fields(for_tag(rec, t)))]
        if rec.get("status") != "READY" and not requested_by(rec, session):
            view["status_message"] = ""
            view["userACL"], view["groupACL"] = [], []
    view.pop("tag_access", None)
    return view


class Tagging:
    """Gives tags to images and keeps an image's ``.meta`` and file modes in step with its access."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @contextlib.contextmanager
    def image_lock(self, system: str, image_id: str) -> Any:
        """One lock per image id, for threads and processes of this host (flock on one of 256
        lock files, chosen by the id: never more files, and never two ids held at once), then
        for the gateways of other hosts on the same store (the store's lease lock)."""
        directory = os.path.join(self.ctx.config.cache_dir, "locks")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        stripe = hashlib.sha256(f"{system}\0{image_id}".encode()).hexdigest()[:2]
        fd = os.open(os.path.join(directory, f"image-{stripe}"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self.ctx.store.lock(f"image\x1f{system}\x1f{image_id}"):
                yield
        finally:
            os.close(fd)

    def attach(
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
        store = self.ctx.store
        system, itype, tag = rec["system"], rec["itype"], rec["pulltag"]
        owner = REGISTRY_OWNER if itype == "docker" else import_owner(int((rec.get("requester") or {}).get("uid", -1)))
        before = store.find_ready(system, itype, tag)
        with self.image_lock(system, image_id):
            existing = store.find_ready_by_image_id(system, image_id)
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
            fresh = existing is None or not self.ctx.published(platform, image_id, rec.get("format") or "squashfs")
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
            if not store.add_tag(target, tag, owner, tag_access.as_fields(), settle):
                if existing is None:  # published for nothing: nothing else uses these files
                    store.update(rec["_id"], {"status": "FAILURE", "tag": []})
                    pipeline.remove_published(image_id, self.ctx.target(platform))
                raise ShifterError(f"{itype}:{tag} belongs to another user")
            if existing is not None:
                if image_after != image_before and not fresh:
                    self.rewrite_acl(platform, image_id, image_after)
                store.update(target, {"last_pull": time.time(), **image_after.as_fields()})
                store.delete(rec["_id"])
        if before is not None and before.get("id") != image_id:
            self.refresh_access(platform, before["_id"])  # the tag left that image
        return store.get(target) or {}

    def refresh_access(self, platform: PlatformConfig, rid: str) -> None:
        """Re-derive an image's access after one of its tags moved away."""
        store = self.ctx.store
        rec = store.get(rid)
        if rec is None or rec.get("status") != "READY" or not rec.get("id"):
            return
        with self.image_lock(rec["system"], rec["id"]):
            rec = store.get(rid)
            if rec is None or rec.get("status") != "READY":
                return
            now = effective(rec)
            if now != Access.of(rec.get("private"), rec.get("userACL"), rec.get("groupACL")):
                with contextlib.suppress(ShifterError):
                    self.rewrite_acl(platform, rec["id"], now)
                store.update(rid, now.as_fields())

    def rewrite_acl(self, platform: PlatformConfig, image_id: str, image: Access) -> None:
        """New ``.meta``; the files' modes follow (0600 private, 0644 public)."""
        target = self.ctx.target(platform)
        if target.remote:
            raise ShifterError(
                "changing the access of an image on a remote system needs a full re-pull; "
                "expire the image first"
            )
        meta = read_meta(os.path.join(platform.image_dir, f"{image_id}.meta"))
        meta = meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
        publish.republish_meta(image_id, meta, target)
