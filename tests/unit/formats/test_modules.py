"""Module selection: defaults, replacement, none, unknown, disabled and conflicting modules."""

import pytest

from shifter.errors import ShifterError
from shifter.formats.config import parse_config
from shifter.formats.modules import module_names, select_modules

BASE = """\
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
imagePath=/images
udiRootPath=/opt/shifter
etcPath=/etc/shifter/etc_files
rootfsType=tmpfs
module_mpich_siteEnv=MPICH=1
module_openmpi_siteEnv=OMPI=1
module_openmpi_conflict=mpich
module_cuda_siteEnv=CUDA=1
module_gpu_conflict=cuda
module_old_enabled=0
"""


def config(extra: str = ""):
    return parse_config(BASE + extra, source="udiRoot.conf")


def test_defaults_when_nothing_requested():
    cfg = config("defaultModules=mpich,cuda\n")
    assert module_names(select_modules(cfg, None)) == ["mpich", "cuda"]
    assert module_names(select_modules(cfg, "")) == ["mpich", "cuda"]
    assert module_names(select_modules(config(), None)) == []


def test_request_replaces_defaults():
    cfg = config("defaultModules=mpich\n")
    assert module_names(select_modules(cfg, "cuda")) == ["cuda"]
    assert module_names(select_modules(cfg, "cuda, mpich,cuda")) == ["cuda", "mpich"]


def test_none_disables_everything():
    cfg = config("defaultModules=mpich\n")
    assert select_modules(cfg, "none") == []


def test_returns_module_configs():
    (mod,) = select_modules(config(), "mpich")
    assert mod.name == "mpich" and mod.site_env == ["MPICH=1"]


@pytest.mark.parametrize(
    ("requested", "fragment"),
    [
        ("ghost", "unknown shifter module 'ghost'"),
        ("mpich,ghost", "unknown shifter module 'ghost'"),
        ("old", "shifter module 'old' is disabled"),
        ("mpich,openmpi", "shifter modules 'mpich' and 'openmpi' conflict"),
        ("openmpi,mpich", "shifter modules 'openmpi' and 'mpich' conflict"),
        ("cuda,gpu", "shifter modules 'cuda' and 'gpu' conflict"),
        ("none,mpich", "module 'none' cannot be combined"),
        ("mpich,,cuda", "empty module name"),
        ("../etc", "unknown shifter module '../etc'"),
    ],
)
def test_bad_requests(requested, fragment):
    with pytest.raises(ShifterError) as err:
        select_modules(config(), requested)
    assert fragment in str(err.value)


def test_disabled_default_is_an_error():
    with pytest.raises(ShifterError, match="shifter module 'old' is disabled"):
        select_modules(config("defaultModules=old\n"), None)
