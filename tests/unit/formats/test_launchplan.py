"""The launch plan setupRoot writes for bin/shifter: the records and their order."""

import os

from shifter.formats.launchplan import VERSION, config_identity, plan_records, write_plan
from shifter.formats.meta import ImageMeta
from shifter.formats.modules import select_modules
from tests.unit.formats import test_environment

SITE_ENV = """\
siteEnv=SITE=1
siteEnvAppend=PATH=/site/bin
siteEnvUnset=SECRET
module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64
defaultModules=mpich
"""


def test_records_hold_the_request_and_the_changes_in_the_launchers_order(tmp_path):
    conf = tmp_path / "udiRoot.conf"
    conf.write_text(test_environment.BASE + SITE_ENV)
    config = test_environment.config(SITE_ENV)
    meta = ImageMeta(env=["PATH=/usr/bin", "BROKEN", "EMPTY="], workdir="/work")
    info = os.stat(conf)
    records = plan_records(info, 1001, "a" * 64, "/scratch:/data:ro", "", meta,
                           select_modules(config, None), config)
    assert records == [
        VERSION, f"c{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}", "u1001", "i" + "a" * 64,
        "v/scratch:/data:ro", "m", "w/work",
        "=PATH=/usr/bin",  # image ENV (malformed entries ignored, as by the launcher)
        "^LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64",  # the module's, then the site's
        "=SITE=1", "+PATH=/site/bin", "-SECRET",
    ]
    assert config_identity(info) == records[1][1:]


def test_written_whole_with_nul_terminated_records(tmp_path):
    path = tmp_path / "launch.plan"
    write_plan(str(path), [VERSION, "u1", "w"])
    assert path.read_bytes() == VERSION.encode() + b"\0u1\0w\0"
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["launch.plan"]
