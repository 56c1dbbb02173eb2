"""Scratch cleaning never removes the scratch directory of a pull that another process on this
host started after the cleaner read which pulls were live (several gateways, or API processes,
share ExpandDirectory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gateway.configfile import parse_config
from gateway.context import Context, Owner, proc_start_time
from gateway.metrics import Metrics
from gateway.recovery import Recovery
from gateway.store.base import new_id
from gateway.store.sqlite import SqliteStore


def _config(root: Path) -> str:
    for sub in ("cache", "expand", "images"):
        (root / sub).mkdir()
    return json.dumps({
        "DefaultImageLocation": "registry.invalid",
        "DefaultImageFormat": "squashfs",
        "CacheDirectory": str(root / "cache"),
        "ExpandDirectory": str(root / "expand"),
        "Locations": {"registry.invalid": {"remotetype": "dockerv2", "url": "https://registry.invalid"}},
        "Platforms": {"testsys": {"mungeSocketPath": "/nonexistent", "accesstype": "local",
                                  "local": {"imageDir": str(root / "images")}}},
        "Store": f"sqlite:///{root / 'gateway.db'}",
    })


def _pull_record(owner: Owner, tag: str) -> dict:
    now = time.time()
    return {"_id": new_id(), "system": "testsys", "itype": "docker", "tag": tag, "pulltag": tag,
            "status": "PULLING", "owner": owner.as_doc(), "last_heartbeat": now, "lease_until": now + 90}


def test_a_pull_started_after_the_live_set_was_read_keeps_its_scratch(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path))
    store = SqliteStore(str(tmp_path / "gateway.db"))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the other gateway
    try:
        recovery = Recovery(Context(config, store, Metrics()))
        live = recovery.reclaim()  # read before the other gateway's pull exists
        other_owner = Owner(os.uname().nodename, other.pid, proc_start_time(other.pid) or "0")
        started = store.insert(_pull_record(other_owner, "app:v1"))
        dead = store.insert(_pull_record(Owner(os.uname().nodename, 2**22 + 7, "0"), "app:v2"))  # no such process
        for rec in (started, dead):
            (tmp_path / "expand" / f"job-{rec['_id']}").mkdir()
        recovery.clean_scratch(live)
        assert (tmp_path / "expand" / f"job-{started['_id']}").is_dir()
        assert not (tmp_path / "expand" / f"job-{dead['_id']}").exists()
    finally:
        other.kill()
        other.wait()
        store.close()
