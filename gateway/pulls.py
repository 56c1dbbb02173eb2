"""Pulls: INIT -> PENDING -> PULLING -> CONVERSION -> [EXAMINATION] -> TRANSFER -> READY (or FAILURE).

* De-duplication is atomic (Store.claim): concurrent pulls of one tag, from any number
  of requests or gateway processes sharing the store, share one job.
* Before downloading anything the worker resolves the tag to its image id (one manifest
  request). If that image is already published, the pull only re-tags it (and rewrites
  the ACLs in ``.meta`` if they changed): an unchanged tag is re-pulled in milliseconds.
* The download and conversion run in a process of their own (gateway.buildproc), so that
  they never hold the API process's GIL.
* Privacy is decided after the build, from what the registry actually required.
* Registry credentials from the munge payload stay in memory, never in the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from typing import Any

from gateway import examine, pipeline
from gateway.access import Access, effective, for_tag
from gateway.auth import Session
from gateway.buildproc import Cancelled
from gateway.checks import BadRequest, check_tag
from gateway.config import PlatformConfig
from gateway.context import FAILURE_HOLD_SECONDS, Context
from gateway.store.base import INFLIGHT, Doc, new_id, outage
from gateway.tagging import Tagging, private_view, requested_by
from shifter.errors import ShifterError
from shifter.formats.imageref import split_docker_tag

log = logging.getLogger("gateway.manager")

MAX_ENV_ENTRIES = 4096
MAX_ENV_BYTES = 256 << 10
MAX_ENTRY_BYTES = 64 << 10
MAX_LABELS = 256
MAX_LABEL_BYTES = 64 << 10
DOCKER_HUB = ("registry-1.docker.io", "index.docker.io", "docker.io")


class Pulls:
    """Starts pulls (idempotent, clients poll with it) and runs them on a worker."""

    def __init__(self, ctx: Context, tagging: Tagging) -> None:
        self.ctx = ctx
        self.tagging = tagging
        # Registry credentials from the munge payload are needed by the worker but must never
        # be written to the store: they stay in memory, keyed by a random reference.
        self._token_lock = threading.Lock()
        self._tokens: dict[str, dict[str, str]] = {}

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
        ctx, store = self.ctx, self.ctx.store
        if itype != "docker":
            raise BadRequest(f"cannot pull an image of type {itype!r} (only docker)")
        tag = check_tag(itype, tag)
        system = session.system
        ctx.platform(system)
        user_acl = sorted(set(allowed_uids) | {session.uid})
        group_acl = sorted(set(allowed_gids) | {session.gid}) if allowed_gids else []
        wanted = Access.of(True, user_acl, group_acl)
        now = time.time()
        for _ in range(5):
            current = store.find_inflight(system, itype, tag)
            if current is not None:
                if ctx.record_alive(current):
                    return private_view(current, session)
                log.warning("pull %s of %s: its gateway died; starting over", current["_id"], tag)
                store.delete(current["_id"])
                continue
            ready = store.find_ready(system, itype, tag)
            if ready is not None and not refresh:
                fresh = now - float(ready.get("last_pull") or 0) < ctx.config.pull_update_timeout
                # A private tag that does not yet grant what this caller asks for is pulled again
                # with the caller's credentials (the original ignored a new ACL for 10 s after a
                # pull); the registry decides, and the ACLs add up. Polls ask the same: no loop.
                if fresh and for_tag(ready, tag).covers(wanted):
                    return private_view(ready, session)
            failures = store.find(system=system, itype=itype, pulltag=tag, statuses=("FAILURE",))
            own = [f for f in failures if requested_by(f, session)]
            if own:  # another user's failure (and its message) is theirs; this caller tries anew
                newest = max(own, key=lambda r: float(r.get("last_pull") or 0))
                if now - float(newest.get("last_pull") or 0) < FAILURE_HOLD_SECONDS:
                    return newest
            doc = self.new_record(system, itype, tag, user_acl, group_acl, session)
            rec, inserted = store.claim(doc)
            if not inserted:
                self._take_tokens(doc)
                continue
            for old in failures:
                store.delete(old["_id"])
            store.update(rec["_id"], {"status": "PENDING"})
            rec["status"] = "PENDING"
            ctx.jobs.put(("pull", rec["_id"]))
            return rec
        raise ShifterError("could not start the pull (contention); try again")

    def new_record(
        self, system: str, itype: str, tag: str, user_acl: list[int], group_acl: list[int], session: Session
    ) -> Doc:
        config = self.ctx.config
        now = time.time()
        return {
            "_id": new_id(),
            "system": system,
            "itype": itype,
            "pulltag": tag,
            "tag": [],
            "status": "INIT",
            "status_message": "",
            "format": config.default_format,
            "arch": "amd64",
            "os": "linux",
            "location": "",
            "remotetype": "dockerv2",
            "ostcount": str(config.ostcount),
            "replication": str(config.replication),
            "userACL": user_acl,
            "groupACL": group_acl,
            "private": None,
            "last_pull": now,
            **self.ctx.lease(),
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
        config = self.ctx.config
        first, slash, rest = tag.partition("/")
        if slash and first in config.locations:
            loc_name, remainder = first, rest
        else:
            host, _repo, _ref = split_docker_tag(tag)
            if host is not None:
                raise ShifterError(
                    f"registry {host!r} is not a configured location (Locations in imagemanager.json)"
                )
            loc_name, remainder = config.default_location, tag
        loc = config.locations.get(loc_name)
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
            cache_dir=config.cache_dir,
            expand_dir=work_dir,
            converter_options=list(config.converter_options.get("squashfs", ())) or None,
            platform=config.image_platform,
            max_image_bytes=config.max_image_bytes,
            pull_deadline=config.pull_deadline,
            max_image_paths=config.max_image_paths,
        )

    def run(self, rid: str) -> None:
        ctx = self.ctx
        rec = ctx.inflight_record(rid)
        if rec is None:
            return
        started = time.monotonic()
        tokens = self._take_tokens(rec)
        work_dir = ctx.job_dir(rid)
        platform = ctx.platform(rec["system"])
        try:
            os.makedirs(work_dir, exist_ok=True)
            ctx.set(rid, "PULLING", "resolving the tag")
            spec = self.pull_spec(rec["pulltag"], tokens, work_dir)
            resolved = pipeline.resolve(spec)
            self._finish(rec, platform, spec, resolved, started)
        except Cancelled:  # the gateway is stopping: the record is left to recovery, as for a crash
            log.info("pull %s (%s) stopped with the gateway", rid, rec.get("pulltag"))
        except ShifterError as err:
            ctx.fail(rid, str(err), started, work_dir)
        except Exception as err:
            if (down := outage(err)) is not None:
                ctx.fail(rid, f"{down}; try again", started, work_dir)
            else:
                log.exception("pull %s (%s) failed unexpectedly", rid, rec.get("pulltag"))
                ctx.fail(rid, f"internal error: {type(err).__name__}: {err}", started, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _finish(
        self,
        rec: Doc,
        platform: PlatformConfig,
        spec: pipeline.PullSpec,
        resolved: pipeline.ResolvedImage,
        started: float,
    ) -> None:
        ctx = self.ctx
        rid, system = rec["_id"], rec["system"]
        image_id = resolved.image_id
        fmt = rec.get("format") or "squashfs"
        target = ctx.target(platform)
        fields = config_fields(resolved.config)
        extra = {
            "last_heartbeat": time.time(),
            "manifest_digest": resolved.manifest_digest,
            "layers": [layer.get("digest") for layer in resolved.layers if isinstance(layer, dict)],
            **fields,
        }
        existing = ctx.store.find_ready_by_image_id(system, image_id)
        if existing is not None and ctx.published(platform, image_id, fmt):
            shutil.rmtree(spec.expand_dir, ignore_errors=True)
            ctx.set(rid, "TRANSFER", "adding the tag to the published image")
            self.tagging.attach(rec, platform, image_id, self._access(rec, spec, resolved), extra, None)
            ctx.metrics.inc("shifter_gateway_pulls_total", outcome="unchanged")
            ctx.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)
            return
        ctx.set(rid, "CONVERSION", "downloading and converting layers")
        built_at = time.monotonic()
        built = ctx.builds.build(spec, resolved, self._progress(rid))  # in a process of its own
        ctx.metrics.observe("shifter_gateway_conversion_seconds", time.monotonic() - built_at)
        if ctx.config.examiner:
            ctx.set(rid, "EXAMINATION", f"running the examiner {os.path.basename(ctx.config.examiner)}")
            examine.examine(ctx.config.examiner, built.squashfs_path, image_id, spec.expand_dir,
                            ctx.config.examiner_timeout)
        # privacy only now: the download may have learnt that blobs needed the credentials
        access = self._access(rec, spec, resolved)
        ctx.set(rid, "TRANSFER", "publishing the image")

        def publish_built(image: Access) -> None:
            meta = built.meta.replace(user_acl=list(image.user_acl), group_acl=list(image.group_acl))
            pipeline.publish(built, image_id, meta, target)
            shutil.rmtree(spec.expand_dir, ignore_errors=True)  # a READY record never has scratch files

        self.tagging.attach(rec, platform, image_id, access, extra, publish_built)
        shutil.rmtree(spec.expand_dir, ignore_errors=True)
        ctx.metrics.inc("shifter_gateway_pulls_total", outcome="ready")
        ctx.metrics.observe("shifter_gateway_pull_seconds", time.monotonic() - started)

    def _access(self, rec: Doc, spec: pipeline.PullSpec, resolved: pipeline.ResolvedImage) -> Access:
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
            for r in self.ctx.store.find(system=system, statuses=("READY",))
        )

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
            self.ctx.store.update(rid, fields, only_if_status=INFLIGHT)

        return report


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
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
