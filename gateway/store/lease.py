"""Lease locks shared by every gateway on one store: the thread that keeps held leases alive.

Apart from the Store interface because it is threading, not storage: a backend only
takes, renews and drops one lock entry (Store._take_lock and friends); this renews the
ones a process holds, so a gateway that dies loses its locks once the lease runs out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

LOCK_LEASE_SECONDS = 30.0  # a lock of a gateway that stopped renewing it is taken over after this
LOCK_WAIT_SECONDS = 3600.0  # a publication of a large image may hold its id's lock for minutes


class LockRenewer:
    """One thread per store that extends the leases of the locks this process holds."""

    def __init__(self, renew: Callable[[str, str, float], None]) -> None:
        self.renew = renew  # the store's _renew_lock
        self.held: dict[str, tuple[str, float]] = {}
        self.mutex = threading.Lock()
        self.wake = threading.Event()
        self.renewing = threading.Lock()  # held while renewals run; stop() waits for it
        self.stopped = False
        self.thread: threading.Thread | None = None

    def hold(self, name: str, token: str, lease: float) -> None:
        with self.mutex:
            self.held[name] = (token, lease)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="store-lock-renewer", daemon=True)
                self.thread.start()
        self.wake.set()

    def release(self, name: str) -> None:
        with self.mutex:
            self.held.pop(name, None)

    def stop(self) -> None:
        """End the thread; once this returns no renewal runs (the store is closing)."""
        with self.mutex:
            self.stopped = True
            self.held.clear()
        self.wake.set()
        with self.renewing:
            pass

    def _run(self) -> None:
        # lives as long as the store: one thread (and, for SQLite, one connection) per store
        while True:
            with self.mutex:
                if self.stopped:
                    return
                held = dict(self.held)
            if not held:
                self.wake.wait()
                self.wake.clear()
                continue
            with self.renewing:
                if self.stopped:
                    return
                for name, (token, lease) in held.items():
                    try:
                        self.renew(name, token, lease)
                    except Exception:  # noqa: BLE001 - the store is down: the lease may lapse, retried next round
                        pass
            self.wake.clear()
            self.wake.wait(min(lease for _, lease in held.values()) / 3)
