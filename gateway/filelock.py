"""One gateway per state directory and per SQLite file: an exclusive lock held while the gateway runs.

Two gateways on one journal would replay and delete each other's batches;
two on one SQLite file would both hold the lease and do the once-only work
twice. The lock is on a file of its own beside what it guards, taken with
``flock``: the kernel drops it when the process ends, however it ends, so
a gateway killed with SIGKILL leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import BinaryIO

from gateway.errors import StartupError


def hold(lock_path: Path, names: str, guarded: Path) -> BinaryIO:
    """Lock `lock_path` for as long as the returned file stays open; a StartupError starting with `names`
    (the setting that chose `guarded`) if another process holds it."""
    try:
        lock = lock_path.open("ab")
    except OSError as e:
        raise StartupError(f"{names}: cannot open {lock_path}: {e.strerror or e}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartupError(
            f"{names}: {guarded} is in use by another gateway (each gateway needs its own state.dir and "
            "SQLite file; several gateways share a PostgreSQL store)"
        ) from None
    except OSError as e:  # e.g. a network file system without locks
        lock.close()
        raise StartupError(f"{names}: cannot lock {lock_path}: {e.strerror or e}") from e
    return lock
