"""udiRoot.conf: the original's parsing rules and test file, plus malformed input and file checks."""

import os

import pytest

from shifter.errors import ShifterError
from shifter.formats.config import ModuleConfig, load_config, parse_config
from shifter.formats.volumemap import PerNodeCache, VolumeMount

REQUIRED = """\
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
imagePath=/images
udiRootPath=/opt/shifter
etcPath=/etc/shifter/etc_files
rootfsType=tmpfs
"""

# The original's src/test/test_udiRoot.conf.in with its placeholders filled in.
ORIGINAL_TEST_CONF = """\
nodeContextPrefix=
udiMount=/var/udiMount
loopMount=/var/loopUdiMount
imagePath=/usr/syscom/shifter
modprobePath=/sbin/modprobe
insmodPath=/sbin/insmod
cpPath=/bin/cp
mvPath=/bin/mv
chmodPath=/bin/chmod
ddPath=/bin/dd
rootfsType=tmpfs
allowLocalChroot=1
autoLoadKernelModule=1
udiRootPath=/opt/shifter
sitePreMountHook=/etc/shifter/premount.sh
sitePostMountHook=/etc/shifter/postmount.sh
siteFs=/home;/mnt
optUdiImage=/opt/shifter/deps/udiImage
etcPath=/opt/shifter/etc_files
kmodBasePath=/opt/shifter/kmod
kmodCacheFile=/tmp/udiRootLoadedModules.txt
batchType=slurm
imageGateway=http://localhost:5000
system=testSystem
"""


def parse(extra: str = "", base: str = REQUIRED):
    return parse_config(base + extra, source="udiRoot.conf")


def test_original_test_file():
    config = parse_config(ORIGINAL_TEST_CONF, source="test_udiRoot.conf")
    assert config.udi_mount == "/var/udiMount"
    assert config.loop_mount == "/var/loopUdiMount"
    assert config.image_path == "/usr/syscom/shifter"
    assert config.udi_root_path == "/opt/shifter"
    assert config.etc_path == "/opt/shifter/etc_files"
    assert config.rootfs_type == "tmpfs"
    assert config.allow_local_chroot is True
    assert config.site_pre_mount_hook == "/etc/shifter/premount.sh"
    assert config.site_post_mount_hook == "/etc/shifter/postmount.sh"
    assert config.site_fs == [VolumeMount("/home", "/home"), VolumeMount("/mnt", "/mnt")]
    assert config.opt_udi_image == "/opt/shifter/deps/udiImage"
    assert config.batch_type == "slurm"
    assert config.image_gateways == ["http://localhost:5000"]
    assert config.system == "testSystem"
    assert config.cp_path == "/bin/cp" and config.dd_path == "/bin/dd"
    assert config.source == "test_udiRoot.conf"


def test_defaults():
    config = parse()
    assert config.mount_propagation_style == "private"
    assert config.default_image_type == "docker"
    assert config.gateway_timeout == 60
    assert config.max_group_count == 0
    assert config.allow_local_chroot is False
    assert config.populate_etc_dynamically is False
    assert config.mount_udi_root_writable is False
    assert config.per_node_cache_size_limit == 100 * 1024**3
    assert config.per_node_cache_max_count == 4 and config.per_node_cache_allowed_fs_type == ["xfs"]
    assert config.site_fs == [] and config.site_env == [] and config.modules == {}
    assert config.default_modules == []
    assert config.modprobe_path is None  # accepted, not required


def test_split_at_first_equals_and_trimmed():
    config = parse("siteEnv =  A=b=c  \n")
    assert config.site_env == ["A=b=c"]


def test_comment_only_in_column_zero():
    config = parse("#siteEnv=A=1\nsystem=cluster # not a comment\n   no equals sign here\n")
    assert config.site_env == []
    assert config.system == "cluster # not a comment"
    with pytest.raises(ShifterError, match=r"line 7: unknown key '# siteEnv'"):
        parse(" # siteEnv=A=1\n")


def test_backslash_continuation_joins_with_one_space():
    config = parse("siteEnv=A=1 \\\n     B=2\\\n#comment=skipped\n C=3\n")
    assert config.site_env == ["A=1", "B=2", "C=3"]
    config = parse("siteFs=/a:/a;\\\n  /b:/b:rec\n")
    assert [m.target for m in config.site_fs] == ["/a", "/b"]


def test_continuation_line_is_taken_whole():
    config = parse("system=one\\\nkey=value\n")
    assert config.system == "one key=value"


def test_repeatable_keys_append_others_last_wins():
    config = parse(
        "siteFs=/a\nsiteFs=/b:/c:ro\nsiteEnv=X=1\nsiteEnv=Y=2 Z=3\nsiteEnvAppend=PATH=/p\n"
        "siteEnvPrepend=PATH=/q\nsiteEnvUnset=A B\nsiteEnvUnset=C\nsystem=one\nsystem=two\n"
    )
    assert config.site_fs == [VolumeMount("/a", "/a"), VolumeMount("/b", "/c", read_only=True)]
    assert config.site_env == ["X=1", "Y=2", "Z=3"]
    assert config.site_env_append == ["PATH=/p"]
    assert config.site_env_prepend == ["PATH=/q"]
    assert config.site_env_unset == ["A", "B", "C"]
    assert config.system == "two"


def test_all_value_kinds():
    config = parse(
        "perNodeCachePath=/scratch/pnc\nperNodeCacheSizeLimit=200G\nperNodeCacheAllowedFsType=xfs ext4\n"
        "usersToImport=sshd nobody\nallowLibcPwdCalls=1\npopulateEtcDynamically=1\n"
        "mountPropagationStyle=slave\nmountUdiRootWritable=1\nmaxGroupCount=31\ngatewayTimeout=5\n"
        "imageGateway=http://a:5000 https://b\ndefaultImageType=custom\nmkfsXfsPath=/sbin/mkfs.xfs\n"
        "siteFs=/scratch:/scratch:perNodeCache=size=1G\n"
    )
    assert config.per_node_cache_path == "/scratch/pnc"
    assert config.per_node_cache_size_limit == 200 * 1024**3
    assert config.per_node_cache_allowed_fs_type == ["xfs", "ext4"]
    assert config.users_to_import == ["sshd", "nobody"]
    assert config.allow_libc_pwd_calls and config.populate_etc_dynamically and config.mount_udi_root_writable
    assert config.mount_propagation_style == "slave"
    assert config.max_group_count == 31
    assert config.gateway_timeout == 5
    assert config.image_gateways == ["http://a:5000", "https://b"]
    assert config.default_image_type == "custom"
    assert config.mkfs_xfs_path == "/sbin/mkfs.xfs"
    assert config.site_fs[0].per_node_cache == PerNodeCache(size=1024**3)


def test_empty_values_leave_defaults():
    config = parse(
        "allowLocalChroot=\nmaxGroupCount=\nperNodeCacheSizeLimit=\nsiteFs=\nsiteEnv=\nsitePreMountHook=\n"
        "mountPropagationStyle=\ndefaultModules=\nimageGateway=\nmodule_x_enabled=\n"
    )
    assert config.replace(modules={}) == parse()
    assert config.modules["x"].enabled is True


def test_deprecated_keys_accepted_and_ignored():
    config = parse(
        "optionalSshdAsRoot=1\nautoLoadKernelModule=1\nkmodBasePath=/x\nkmodCacheFile=/y\nnodeContextPrefix=\n"
    )
    assert config == parse()


def test_modules():
    config = parse(
        "module_mpich_siteFs=/opt/cray:/opt/cray\n"
        "module_mpich_siteEnv=A=1\nmodule_mpich_siteEnv=B=2\n"
        "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64\n"
        "module_mpich_siteEnvAppend=PATH=/opt/mpich/bin\nmodule_mpich_siteEnvUnset=FOO\n"
        "module_mpich_copyPath=/opt/mpich-abi\nmodule_mpich_roothook=/etc/shifter/mpich-root.sh\n"
        "module_mpich_userhook=/opt/udiImage/modules/mpich/user.sh\nmodule_mpich_conflict=openmpi cuda\n"
        "module_openmpi_enabled=0\nmodule_cuda-11.2_siteEnv=CUDA=1\ndefaultModules=mpich, cuda-11.2\n"
    )
    mpich = config.modules["mpich"]
    assert mpich == ModuleConfig(
        name="mpich",
        site_fs=[VolumeMount("/opt/cray", "/opt/cray")],
        site_env=["A=1", "B=2"],
        site_env_append=["PATH=/opt/mpich/bin"],
        site_env_prepend=["LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64"],
        site_env_unset=["FOO"],
        copy_path="/opt/mpich-abi",
        roothook="/etc/shifter/mpich-root.sh",
        userhook="/opt/udiImage/modules/mpich/user.sh",
        conflict=["openmpi", "cuda"],
        enabled=True,
    )
    assert config.modules["openmpi"].enabled is False
    assert config.modules["cuda-11.2"].site_env == ["CUDA=1"]
    assert config.default_modules == ["mpich", "cuda-11.2"]


def test_records_are_immutable():
    config = parse()
    with pytest.raises(AttributeError):
        config.udi_mount = "/elsewhere"  # type: ignore[misc]
    assert config.replace(system="x").system == "x"


# --- malformed input: the error names the file, the line and the key -----------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("bogusKey=1\n", "udiRoot.conf line 7: unknown key 'bogusKey'"),
        ("udimount=/x\n", "line 7: unknown key 'udimount'"),
        ("allowLocalChroot=yes\n", "line 7: bad value for 'allowLocalChroot': must be an integer, got 'yes'"),
        ("maxGroupCount=-1\n", "line 7: bad value for 'maxGroupCount': must not be negative"),
        ("gatewayTimeout=10s\n", "line 7: bad value for 'gatewayTimeout'"),
        ("mountPropagationStyle=shared\n", "bad value for 'mountPropagationStyle': must be private or slave"),
        ("perNodeCacheSizeLimit=lots\n", "line 7: bad value for 'perNodeCacheSizeLimit': invalid byte size"),
        ("siteFs=/x:/etc\n", "line 7: bad value for 'siteFs': volume '/x:/etc'"),
        ("siteFs=/x:/y:bogus\n", "line 7: bad value for 'siteFs': volume '/x:/y:bogus': unknown flag"),
        ("siteEnv=NOVALUE\n", "line 7: bad value for 'siteEnv': item 'NOVALUE' is not NAME=value"),
        ("siteEnvAppend==x\n", "line 7: bad value for 'siteEnvAppend'"),
        ("siteEnvUnset=A=1\n", "bad value for 'siteEnvUnset': item 'A=1' must be a bare variable name"),
        ("defaultImageType=rkt\n", "line 7: bad value for 'defaultImageType': must be one of"),
        ("imageGateway=imagegw:5000\n", "line 7: bad value for 'imageGateway'"),
        ("etcPath=relative/etc\n", "line 7: bad value for 'etcPath': must be an absolute path"),
        ("sitePreMountHook=hook.sh\n", "line 7: bad value for 'sitePreMountHook'"),
        ("module_mpich_copypath=/x\n", "unknown module subkey 'copypath' in 'module_mpich_copypath'; did"),
        ("module_mpich_color=red\n", "line 7: unknown module subkey 'color'"),
        ("module_mpich=1\n", "line 7: unknown key 'module_mpich'"),
        ("module__siteEnv=A=1\n", "line 7: unknown key 'module__siteEnv'"),
        ("module_my_mod_siteEnv=A=1\n", "line 7: unknown module subkey 'mod_siteEnv'"),
        ("module_a/b_siteEnv=A=1\n", "line 7: invalid module name 'a/b'"),
        ("module_none_siteEnv=A=1\n", "line 7: invalid module name 'none'"),
        ("module_x_enabled=maybe\n", "line 7: bad value for 'module_x_enabled'"),
        ("system=a\\\n", "line 7: key 'system' ends in a '\\' continuation at end of file"),
        ("defaultModules=ghost\n", "defaultModules names unknown module 'ghost'"),
    ],
)
def test_malformed_config(extra, fragment):
    with pytest.raises(ShifterError) as err:
        parse(extra)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


REQUIRED_KEYS = ["udiMount", "loopMount", "imagePath", "udiRootPath", "etcPath", "rootfsType"]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_required_keys(key):
    text = "".join(line + "\n" for line in REQUIRED.splitlines() if not line.startswith(key + "="))
    with pytest.raises(ShifterError, match=f"required key '{key}' is not set"):
        parse_config(text, source="udiRoot.conf")
    with pytest.raises(ShifterError, match=f"required key '{key}' is not set"):
        parse_config(text + f"{key}=\n", source="udiRoot.conf")


def test_line_number_of_continued_entry_is_its_first_line():
    with pytest.raises(ShifterError, match="line 8: bad value for 'siteEnv'"):
        parse("system=x\nsiteEnv=A=1 \\\n  B\n")


# --- load_config: file checks -------------------------------------------------------------------


@pytest.fixture
def conf_file(tmp_path):
    path = tmp_path / "udiRoot.conf"
    path.write_text(REQUIRED)
    os.chmod(path, 0o644)
    return path


def test_load_config_reads_root_owned_file(conf_file):
    if os.geteuid() != 0:
        pytest.skip("needs root: the file must be owned by uid 0")
    config = load_config(str(conf_file))
    assert config.udi_mount == "/var/udiMount"
    assert config.source == str(conf_file)


def test_load_config_refuses_non_root_owner(conf_file):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the file to another user")
    os.chown(conf_file, 65534, 65534)
    with pytest.raises(ShifterError, match="must be owned by root") as err:
        load_config(str(conf_file))
    assert str(conf_file) in str(err.value)
    assert load_config(str(conf_file), check_owner=False).udi_mount == "/var/udiMount"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_load_config_refuses_group_or_other_writable(conf_file, mode):
    os.chmod(conf_file, mode)
    with pytest.raises(ShifterError, match="must not be group- or other-writable") as err:
        load_config(str(conf_file), check_owner=False)
    assert str(conf_file) in str(err.value)


def test_load_config_missing_file(tmp_path):
    missing = tmp_path / "nope.conf"
    with pytest.raises(ShifterError, match="does not exist") as err:
        load_config(str(missing))
    assert str(missing) in str(err.value)


def test_load_config_directory(tmp_path):
    with pytest.raises(ShifterError, match="not a regular file"):
        load_config(str(tmp_path))


def test_load_config_errors_name_the_path_and_line(conf_file):
    conf_file.write_text(REQUIRED + "frobnicate=1\n")
    with pytest.raises(ShifterError, match=f"{conf_file} line 7: unknown key 'frobnicate'"):
        load_config(str(conf_file), check_owner=False)


def test_load_config_not_utf8(conf_file):
    conf_file.write_bytes(REQUIRED.encode() + b"system=\xff\n")
    with pytest.raises(ShifterError, match="not UTF-8"):
        load_config(str(conf_file), check_owner=False)


def test_format_modules_import_light_under_isolated_python():
    """The launcher imports these on every task start: no dataclasses/typing/re/ast/inspect."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "import shifter.formats.config, shifter.formats.meta, shifter.formats.reuse, shifter.formats.volumemap, "
        "shifter.formats.environment, shifter.formats.command, shifter.formats.modules, shifter.formats.imageref, "
        "shifter.formats.hostsfile; "
        "print(' '.join(m for m in ('dataclasses', 'typing', 're', 'ast', 'inspect') if m in sys.modules))"
    )
    argv = [sys.executable, "-I", "-S", "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_site_resources_and_gpu_recipe():
    """The original's documented GPU setting loads; the recipe names shipped data."""
    config = parse_config(REQUIRED + "siteResources=/opt/shifter/site-resources/\ngpuRecipe=nvidia\n"
                          "gpuDriverRoot=/run/nvidia/driver\n")
    assert config.site_resources == "/opt/shifter/site-resources"
    assert config.gpu_recipe == "nvidia" and config.gpu_driver_root == "/run/nvidia/driver"
    plain = parse_config(REQUIRED + "siteResources=/opt/shifter/site-resources\n")
    assert plain.gpu_recipe is None and plain.gpu_driver_root == "/"
    assert parse_config(REQUIRED + "siteResources=/sr\ngpuRecipe=none\n").gpu_recipe is None


@pytest.mark.parametrize("extra, message", [
    ("siteResources=opt/x\n", "line 7: bad value for 'siteResources': must be an absolute path inside the container"),
    ("siteResources=/opt/../etc\n", "without '.' or '..'"),
    ("siteResources=/\n", "must name a directory below /"),
    ("siteResources=/dev/gpu\n", "/dev/gpu is where the container's own files are"),
    ("siteResources=/etc\n", "/etc is where the container's own files are"),
    ("siteResources=/sr\ngpuRecipe=cuda\n", "line 8: bad value for 'gpuRecipe': unknown GPU recipe 'cuda' "
                                            "(known: amd, nvidia, none)"),
    ("gpuRecipe=nvidia\n", "gpuRecipe=nvidia needs siteResources"),
    ("siteResources=/sr\ngpuRecipe=nvidia\ngpuDriverRoot=run/nvidia\n", "'gpuDriverRoot': must be an absolute path"),
])
def test_bad_gpu_settings_are_one_line_errors(extra, message):
    with pytest.raises(ShifterError) as info:
        parse_config(REQUIRED + extra, source="udiRoot.conf")
    assert message in str(info.value) and "\n" not in str(info.value)
