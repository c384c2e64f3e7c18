"""The admin key: from GATEWAY_ADMIN_KEY, or generated once at first start.

A generated key is proposed by every replica with SET NX on its hash, so they agree on
one; the replica that wins writes the raw key to `<data dir>/admin-key` (mode 0600),
where the CLI finds it. The log names that file, never the key. Comparison is
constant-time, on SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from gateway.errors import Unauthorized
from gateway.store import Store

log = logging.getLogger(__name__)

ADMIN_HASH = "gw:admin"


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def data_dir() -> Path:
    return Path(os.environ.get("GATEWAY_DATA_DIR") or "gateway-data")


class AdminAuth:
    def __init__(self, store: Store, configured: str | None) -> None:
        self.store = store
        self.expected = digest(configured) if configured else None

    async def ensure(self) -> None:
        """Settle on the admin key; safe to call from every worker of every replica."""
        if self.expected:
            return
        candidate = "sk-gw-admin-" + secrets.token_urlsafe(32)

        async def propose() -> str:
            if await self.store.redis.set(ADMIN_HASH, digest(candidate), nx=True):
                _write_key_file(data_dir() / "admin-key", candidate)
            return str(await self.store.redis.get(ADMIN_HASH))

        self.expected = await self.store.call(propose)

    async def check(self, token: str) -> None:
        if self.expected is None:
            await self.ensure()  # the store was away at start-up
        if not hmac.compare_digest(digest(token), self.expected or ""):
            raise Unauthorized("invalid admin key", code="invalid_admin_key")


def _write_key_file(path: Path, raw: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(raw + "\n")
    os.replace(temporary, path)
    log.warning("generated an admin key; it is in %s (readable by this user only)", path)
