"""Where the local cluster keeps everything, and how big it is.

One frozen object holds every path the cluster uses, so the daemons, the templates, the
cleanup and the tests agree on them.  `up` saves it as `cluster.json` in the state dir;
`down`, `env` and `status` read it back, so they act on the cluster that is running, not on
whatever the command line says today.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/shifter-cluster")
DEFAULT_PREFIX = Path("/opt/shifter-slurm")
IMAGE_CACHE_DIR = Path("/var/cache/shifter-slurm")
BRIDGE = "shbr0"
BRIDGE_ADDR = "10.254.0.1"
NETMASK_BITS = 24
REGISTRY_ADDR = "127.0.0.1:5000"
DEFAULT_GATEWAY_PORT = 5555
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
TEST_USERS = ("shifter-u1", "shifter-u2")
MAX_NODES = 200
MAX_FAKE_GPUS = 8
MAX_GATEWAYS = 4


@dataclass(frozen=True)
class Settings:
    """Sizes and locations of one local cluster."""

    state_dir: Path = DEFAULT_STATE_DIR
    prefix: Path = DEFAULT_PREFIX
    sysconfdir: Path = DEFAULT_PREFIX / "etc"
    nodes: int = 2
    controller_host: str = ""
    gateway_port: int = DEFAULT_GATEWAY_PORT
    fake_gpus: int = 0  # per node: fake NVIDIA GPUs (localcluster/fakegpu.py) as Slurm GRES, 0 none
    gateways: int = 2  # gateway services on ports gateway_port, gateway_port + 1, ... sharing one store

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"NODES must be between 1 and {MAX_NODES}, got {self.nodes}")
        if not 0 <= self.fake_gpus <= MAX_FAKE_GPUS:
            raise ValueError(f"FAKE_GPUS must be between 0 and {MAX_FAKE_GPUS}, got {self.fake_gpus}")
        if not 1 <= self.gateways <= MAX_GATEWAYS:
            raise ValueError(f"GATEWAYS must be between 1 and {MAX_GATEWAYS}, got {self.gateways}")
        if not self.controller_host:
            object.__setattr__(self, "controller_host", socket.gethostname())

    # --- nodes -------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @staticmethod
    def node_index(node: str) -> int:
        return int(node[1:])

    @staticmethod
    def netns(node: str) -> str:
        return f"shifter-{node}"

    @staticmethod
    def node_addr(node: str) -> str:
        return f"10.254.0.{10 + Settings.node_index(node)}"

    @staticmethod
    def host_veth(node: str) -> str:
        return f"shv{Settings.node_index(node)}"

    # --- files and directories ----------------------------------------------
    @property
    def settings_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "cluster.env"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def munge_dir(self) -> Path:
        return self.state_dir / "munge"

    @property
    def slurm_dir(self) -> Path:
        return self.state_dir / "slurm"

    @property
    def slurm_conf(self) -> Path:
        return self.slurm_dir / "slurm.conf"

    @property
    def plugstack_conf(self) -> Path:
        return self.slurm_dir / "plugstack.conf"

    @property
    def registry_dir(self) -> Path:
        return self.state_dir / "registry"

    @property
    def gateway_dir(self) -> Path:
        return self.state_dir / "gateway"

    @property
    def imagemanager_json(self) -> Path:
        """The first gateway's config (each gateway has its own: imagemanager_json_of)."""
        return self.imagemanager_json_of(0)

    @staticmethod
    def gateway_name(index: int) -> str:
        """The pid-registry and file name of gateway ``index`` (0-based): gateway, gateway-2, ..."""
        return "gateway" if index == 0 else f"gateway-{index + 1}"

    def imagemanager_json_of(self, index: int) -> Path:
        suffix = "" if index == 0 else f"-{index + 1}"
        return self.gateway_dir / f"imagemanager{suffix}.json"

    def gateway_port_of(self, index: int) -> int:
        return self.gateway_port + index

    @property
    def image_path(self) -> Path:
        return self.state_dir / "images"

    @property
    def etc_path(self) -> Path:
        return self.state_dir / "etc"

    @property
    def node_hosts_file(self) -> Path:
        """The /etc/hosts every node sees (bind-mounted in its own mount namespace)."""
        return self.state_dir / "node" / "hosts"

    @property
    def site_fs_dir(self) -> Path:
        return self.state_dir / "sitefs"

    @property
    def udi_mount(self) -> Path:
        return self.state_dir / "node" / "udiMount"

    @property
    def loop_mount(self) -> Path:
        return self.state_dir / "node" / "loopMount"

    @property
    def node_tmp(self) -> Path:
        """Slurm's TmpFS: a private tmpfs per node (PMIx's client dirs would collide in /tmp)."""
        return self.state_dir / "node" / "tmp"

    @property
    def per_node_cache(self) -> Path:
        return self.state_dir / "node" / "perNodeCache"

    @property
    def fake_gpu_driver(self) -> Path:
        """The fake GPU driver tree (gpuDriverRoot) when fake_gpus is set."""
        return self.state_dir / "fake_gpu_driver"

    @property
    def udiroot_conf(self) -> Path:
        return self.sysconfdir / "udiRoot.conf"

    @property
    def plugin_so(self) -> Path:
        return self.prefix / "lib" / "shifter" / "shifter_spank.so"

    @property
    def venv_python(self) -> Path:
        return self.prefix / "venv" / "bin" / "python3"

    def installed_module(self, relative: str) -> bool:
        """Whether the installed package has this file (parts of it land at different times)."""
        return any((self.prefix / "venv" / "lib").glob(f"python3*/site-packages/{relative}"))

    @property
    def gateway_url(self) -> str:
        """The first gateway (SHIFTER_GATEWAY): tests that talk to one gateway use this one."""
        return self.gateway_urls[0]

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway on the test network, as udiRoot.conf's imageGateway lists them."""
        return [f"http://{BRIDGE_ADDR}:{self.gateway_port_of(i)}" for i in range(self.gateways)]

    @property
    def gateway_local_url(self) -> str:
        return self.gateway_local_url_of(0)

    def gateway_local_url_of(self, index: int) -> str:
        return f"http://127.0.0.1:{self.gateway_port_of(index)}"

    # --- persistence ---------------------------------------------------------
    def save(self) -> None:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        self.settings_file.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> Settings | None:
        """The settings the running (or crashed) cluster was started with, if any."""
        try:
            data = json.loads((state_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(
            state_dir=Path(data["state_dir"]),
            prefix=Path(data["prefix"]),
            sysconfdir=Path(data["sysconfdir"]),
            nodes=int(data["nodes"]),
            controller_host=data["controller_host"],
            gateway_port=int(data.get("gateway_port", DEFAULT_GATEWAY_PORT)),
            fake_gpus=int(data.get("fake_gpus", 0)),
            gateways=int(data.get("gateways", 1)),
        )
