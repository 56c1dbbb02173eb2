"""The gateway's validated configuration: frozen dataclasses that every gateway module reads.

Apart from the reader of imagemanager.json (gateway.configfile) because most modules only
read a configuration; the keys, their checks and their defaults from the file are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LocationConfig:
    """One registry the gateway may pull from (``Locations.<name>``)."""

    name: str
    url: str
    remotetype: str = "dockerv2"
    sslcacert: str | None = None
    auth_method: str = "token"


@dataclass(frozen=True)
class SshConfig:
    """How a ``remote`` platform is reached (``Platforms.<sys>.ssh``)."""

    username: str | None
    key: str | None
    image_dir: str
    ssh_options: tuple[str, ...] = ()
    scp_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlatformConfig:
    """One system served by the gateway (``Platforms.<name>``)."""

    name: str
    munge_socket: str | None
    accesstype: str
    admins: tuple[str, ...]
    image_dir: str
    hosts: tuple[str, ...] = ()
    ssh: SshConfig | None = None
    use_external: bool = False
    policy_file: str | None = None


@dataclass(frozen=True)
class GatewayConfig:
    """The whole validated imagemanager.json."""

    path: str
    platforms: dict[str, PlatformConfig]
    locations: dict[str, LocationConfig]
    default_location: str
    default_format: str
    cache_dir: str
    expand_dir: str
    pull_update_timeout: float = 300.0
    expiration_timeout: float | None = None
    worker_threads: int = 2
    authentication: str = "munge"
    import_users: str | tuple[str, ...] | None = None
    converter_options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    examiner: str | None = None
    examiner_timeout: float = 600.0
    metrics: bool = False
    log_level: str = "info"
    store: str = ""
    mongodb_uri: str | None = None
    mongodb_name: str = "Shifter"
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 5000),)
    access_log: str | None = None
    log_file: str | None = None
    replication: int = 1
    ostcount: int = 0
    image_platform: tuple[str, str, str | None] = ("linux", "amd64", None)
    max_image_bytes: int = 64 << 30
    gateway_addresses: tuple[str, ...] = ()
    unbound_credentials: str = "read-only"
    pull_deadline: float = 3600.0
    max_image_paths: int = 4_000_000
    api_processes: int = 1  # gateway processes serving the Listen sockets (gateway.service)

    def import_allowed(self, user: str | None) -> bool:
        """ImportUsers: "all", "none"/absent, or a list of user names."""
        if self.import_users is None or user is None:
            return False
        if isinstance(self.import_users, str):
            return self.import_users == "all"
        return user in self.import_users
