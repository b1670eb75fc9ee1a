"""API keys (hashed, scoped, rate limited) and idempotency records for the REST shim.

Keys look like ``isk_<id>_<secret>``: ``id`` (8 hex) finds the record, the
whole key is checked against ``HMAC-SHA256(store salt, key)`` with a
constant-time compare. Only that digest is kept, in a JSON file written with
mode 0600; the clear key is returned once by ``create_key``. A keyed hash
rather than scrypt: keys carry 256 bits of randomness, so a slow hash adds
nothing against guessing and would cost milliseconds on every request at
thousands of requests per second.

Rate limits are token buckets per key (``rate_per_s`` refill, ``burst``
capacity); a refused request learns how many seconds until a token is back
(the 429's Retry-After).

Idempotency (``IdempotencyCache``): every POST carries an Idempotency-Key.
Records are per API key, bounded (LRU) and expire after a TTL. The same key
with the same request (method, path and body hash) replays the stored
response; with another request it is a conflict (422); while the first is
still running the second waits for it and replays its response.

Command line (the clear key is printed once)::

    python -m switch.api.auth create --file state/api_keys.json --name shop1 \\
        --scopes payments --rate 50 --burst 100 --terminal-id SHOP0001 \\
        --merchant-id SHOP00000000001
    python -m switch.api.auth list --file state/api_keys.json
    python -m switch.api.auth revoke --file state/api_keys.json --name shop1

A running switch reads the file again when it changes (``ApiKeyStore.refresh``,
checked every second), so a key revoked there stops working at once, not at
the next restart.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import collections
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from switch.keys import HmacSha256

__all__ = ["ApiKey", "ApiKeyStore", "ApiKeyError", "TokenBucket", "IdempotencyCache",
           "IdempotencyRecord", "SCOPES"]

SCOPES = frozenset({"payments", "admin"})
_KEY_RE = re.compile(r"^isk_([0-9a-f]{8})_([A-Za-z0-9_-]{20,128})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FILE_VERSION = 1


class ApiKeyError(ValueError):
    """A bad key definition or key file (never contains a key)."""


@dataclass
class ApiKey:
    id: str
    name: str
    digest: str  # hex HMAC-SHA256(store salt, clear key)
    scopes: tuple[str, ...]
    rate_per_s: float = 100.0
    burst: int = 200
    terminal_id: str = "APISHIM1"
    merchant_id: str = "APISHIM00000001"
    created: float = field(default_factory=time.time)
    disabled: bool = False

    def public(self) -> dict:
        d = asdict(self)
        d.pop("digest")
        d["scopes"] = list(self.scopes)
        return d


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float):
        self.rate = max(float(rate), 1e-9)
        self.capacity = max(float(capacity), 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """0.0 when a token was taken, else seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class ApiKeyStore:
    """Scoped API keys, persisted hashed in ``path`` (None: memory only, for tests)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else None
        self._salt = secrets.token_bytes(32)
        self._mac: tuple[bytes, HmacSha256] | None = None  # for the current salt
        self._keys: dict[str, ApiKey] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._stamp: tuple | None = None  # the key file as last read (or written) here
        if self.path is not None and self.path.exists():
            self._load()

    # -- persistence -------------------------------------------------------

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> None:
        self._stamp = self._file_stamp()
        try:
            st = self.path.stat()
            if st.st_mode & 0o077:
                raise ApiKeyError(f"{self.path}: mode {oct(st.st_mode & 0o777)} is too open (want 0600)")
            doc = json.loads(self.path.read_text("utf-8"))
            if doc.get("version") != FILE_VERSION:
                raise ApiKeyError(f"{self.path}: unsupported version {doc.get('version')!r}")
            salt = bytes.fromhex(doc["salt"])
            keys = {}
            for k in doc.get("keys", []):
                key = ApiKey(**{**k, "scopes": tuple(k["scopes"])})
                keys[key.id] = key
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, ApiKeyError):
                raise
            raise ApiKeyError(f"{self.path}: cannot read API key file ({type(e).__name__})") from None
        # all or nothing: a file that does not read keeps the keys in force
        self._salt, self._keys = salt, keys
        for kid in [kid for kid in self._buckets if kid not in keys]:
            del self._buckets[kid]

    def refresh(self) -> bool:
        """Read the key file again if it changed since this store last read or
        wrote it: keys created or revoked with the command line while the
        switch runs take effect without a restart (a revoked key that kept
        working until then could go on charging cards). True when it was
        read; raises ApiKeyError, once per change, for a file that does not
        read (the keys read before stay in force)."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._load()
        return True

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"version": FILE_VERSION, "salt": self._salt.hex(),
               "keys": [{**asdict(k), "scopes": list(k.scopes)} for k in self._keys.values()]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".api_keys.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._stamp = self._file_stamp()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # -- keys --------------------------------------------------------------

    def _digest(self, clear: str) -> str:
        mac = self._mac
        if mac is None or mac[0] != self._salt:
            mac = self._mac = (self._salt, HmacSha256(self._salt))
        return mac[1].digest(clear.encode("utf-8")).hex()

    def create_key(self, name: str, scopes, rate_per_s: float = 100.0, burst: int = 200, *,
                   terminal_id: str = "APISHIM1", merchant_id: str = "APISHIM00000001") -> str:
        """Add a key and return it in clear: the only time it is ever shown."""
        if not _NAME_RE.match(name or ""):
            raise ApiKeyError("name: 1-64 characters of A-Z a-z 0-9 . _ -")
        if any(k.name == name for k in self._keys.values()):
            raise ApiKeyError(f"name: a key named {name!r} exists")
        scopes = tuple(sorted(set(scopes)))
        if not scopes or not set(scopes) <= SCOPES:
            raise ApiKeyError(f"scopes: choose from {', '.join(sorted(SCOPES))}")
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)) or int(burst) < 1:
            raise ApiKeyError("rate_per_s must be > 0 and burst >= 1")
        if not (1 <= len(terminal_id) <= 8 and terminal_id.isascii() and terminal_id.isprintable()):
            raise ApiKeyError("terminal_id: 1-8 printable ASCII characters")
        if not (1 <= len(merchant_id) <= 15 and merchant_id.isascii() and merchant_id.isprintable()):
            raise ApiKeyError("merchant_id: 1-15 printable ASCII characters")
        kid = secrets.token_hex(4)
        while kid in self._keys:
            kid = secrets.token_hex(4)
        clear = f"isk_{kid}_{secrets.token_urlsafe(32)}"
        self._keys[kid] = ApiKey(kid, name, self._digest(clear), scopes, float(rate_per_s), int(burst),
                                 terminal_id, merchant_id)
        self.save()
        return clear

    def revoke(self, name: str) -> bool:
        for kid, k in list(self._keys.items()):
            if k.name == name:
                del self._keys[kid]
                self._buckets.pop(kid, None)
                self.save()
                return True
        return False

    def keys(self) -> list[ApiKey]:
        return list(self._keys.values())

    def authenticate(self, clear: str | None) -> ApiKey | None:
        """The key record for ``clear``, or None (unknown, malformed, revoked)."""
        if not clear:
            return None
        m = _KEY_RE.match(clear)
        if m is None:
            return None
        key = self._keys.get(m.group(1))
        if key is None or key.disabled:
            return None
        if not hmac.compare_digest(key.digest, self._digest(clear)):
            return None
        return key

    def check_rate(self, key: ApiKey, now: float | None = None) -> float:
        """0.0 when the request may go ahead, else seconds to wait (Retry-After)."""
        b = self._buckets.get(key.id)
        if b is None or b.rate != key.rate_per_s or b.capacity != max(float(key.burst), 1.0):
            b = self._buckets[key.id] = TokenBucket(key.rate_per_s, key.burst)
        return b.take(now)


# ---------------------------------------------------------------------------
# Idempotency


class SeenKeys:
    """A Bloom filter of the (API key id, Idempotency-Key) pairs journaled with a
    payment. "Not seen" is certain, so a new key -- nearly every request --
    needs no journal lookup; "seen" may be a false positive (about 3% at
    ``capacity`` keys, more beyond), which the journal lookup then settles.
    Keys are never removed (a filter cannot forget); it is rebuilt from the
    journal at every start.

    Blocked: a key's bits all lie in one 64-bit word, chosen by its hash, and
    are the AND of three more 64-bit slices of it (each bit set with
    probability 1/8: about 8 bits). A check or an add is then one word read
    or written: 2.4 us for a new key's check and add, measured, against 4.8 us
    for 8 positions spread over the whole filter, whose false positives at
    capacity were 1% instead of 3%.
    """

    __slots__ = ("_words", "_mask", "count", "_checked")

    def __init__(self, capacity: int = 3_000_000, false_positive: float = 0.01):
        m = max(1 << 16, int(-capacity * math.log(false_positive) / (math.log(2) ** 2)))
        words = 1 << ((m - 1).bit_length() - 6)  # a power of two: the word by mask
        self._words = array.array("Q", bytes(words * 8))
        self._mask = words - 1
        self.count = 0
        # the slots of keys found new, kept for their ``add`` (a payment checks
        # its key, then adds it): hashed once per payment; bounded, since a
        # request that fails makes no payment and adds nothing
        self._checked: dict[tuple[str, str], tuple[int, int]] = {}

    def _slot(self, owner: str, key: str) -> tuple[int, int]:
        h = hashlib.blake2b(f"{owner}\0{key}".encode("utf-8", "surrogatepass"), digest_size=32).digest()
        bits = int.from_bytes(h[8:16], "little") & int.from_bytes(h[16:24], "little") \
            & int.from_bytes(h[24:], "little")
        return int.from_bytes(h[:8], "little") & self._mask, bits or 1

    def add(self, owner: str, key: str) -> None:
        i, bits = self._checked.pop((owner, key), None) or self._slot(owner, key)
        self._words[i] |= bits
        self.count += 1

    def __contains__(self, pair: tuple[str, str]) -> bool:
        slot = self._slot(pair[0], pair[1])
        if self._words[slot[0]] & slot[1] == slot[1]:
            return True
        checked = self._checked
        if len(checked) >= 4096:
            checked.clear()
        checked[pair] = slot
        return False


@dataclass
class IdempotencyRecord:
    fingerprint: str
    created: float
    done: asyncio.Future
    status: int = 0
    body: bytes = b""
    content_type: str = "application/json"


class IdempotencyConflict(Exception):
    """Same Idempotency-Key, different request."""


class IdempotencyCache:
    """Per API key: Idempotency-Key -> the response of the first request that used it."""

    def __init__(self, *, per_key: int = 10_000, ttl: float = 86_400.0):
        self.per_key = per_key
        self.ttl = ttl
        self._by_key: dict[str, collections.OrderedDict[str, IdempotencyRecord]] = {}
        self._swept = 0.0  # expired records are swept at most once a second (and whenever over per_key)

    @staticmethod
    def fingerprint(method: str, path: str, body: bytes) -> str:
        h = hashlib.sha256()
        h.update(method.encode() + b"\0" + path.encode("utf-8", "replace") + b"\0")
        h.update(body)
        return h.hexdigest()

    def begin(self, api_key_id: str, idem_key: str, fingerprint: str
              ) -> tuple[IdempotencyRecord, bool]:
        """(record, is_new). Raises IdempotencyConflict for a different request."""
        now = time.time()
        records = self._by_key.get(api_key_id)
        if records is None:
            records = self._by_key[api_key_id] = collections.OrderedDict()
        rec = records.get(idem_key)
        if rec is not None and rec.done.done() and now - rec.created > self.ttl:
            del records[idem_key]
            rec = None
        if rec is not None:
            if not hmac.compare_digest(rec.fingerprint, fingerprint):
                raise IdempotencyConflict()
            records.move_to_end(idem_key)
            return rec, False
        rec = IdempotencyRecord(fingerprint, now, asyncio.get_running_loop().create_future())
        records[idem_key] = rec
        if len(records) <= self.per_key and now - self._swept < 1.0:
            return rec, True
        self._swept = now
        # bounded: forget the least recently used (and expired) finished
        # records from the front; an in-flight one stops the sweep, its
        # waiters need it (a brief overshoot is fine)
        while records:
            k, r = next(iter(records.items()))
            if not r.done.done() or (len(records) <= self.per_key and now - r.created <= self.ttl):
                break
            del records[k]
        return rec, True

    def finish(self, api_key_id: str, idem_key: str, rec: IdempotencyRecord, status: int,
               body: bytes, content_type: str) -> None:
        rec.status, rec.body, rec.content_type = status, body, content_type
        if status >= 500:
            # not a result: forget it so the client's retry runs again
            records = self._by_key.get(api_key_id)
            if records is not None and records.get(idem_key) is rec:
                del records[idem_key]
        if not rec.done.done():
            rec.done.set_result(None)

    def abandon(self, api_key_id: str, idem_key: str, rec: IdempotencyRecord) -> None:
        """The first request died without a response (cancelled): let waiters retry it."""
        records = self._by_key.get(api_key_id)
        if records is not None and records.get(idem_key) is rec:
            del records[idem_key]
        if not rec.done.done():
            rec.status = 0
            rec.done.set_result(None)


# ---------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m switch.api.auth", description="Manage REST API keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("--file", required=True, type=Path)
    c.add_argument("--name", required=True)
    c.add_argument("--scopes", default="payments", help="comma separated: payments,admin")
    c.add_argument("--rate", type=float, default=100.0, help="requests per second")
    c.add_argument("--burst", type=int, default=200)
    c.add_argument("--terminal-id", default="APISHIM1")
    c.add_argument("--merchant-id", default="APISHIM00000001")
    ls = sub.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--file", required=True, type=Path)
    rv = sub.add_parser("revoke", help="delete a key by name")
    rv.add_argument("--file", required=True, type=Path)
    rv.add_argument("--name", required=True)
    args = p.parse_args(argv)
    try:
        store = ApiKeyStore(args.file)
        if args.cmd == "create":
            clear = store.create_key(args.name, [s.strip() for s in args.scopes.split(",") if s.strip()],
                                     args.rate, args.burst, terminal_id=args.terminal_id,
                                     merchant_id=args.merchant_id)
            print(clear)
        elif args.cmd == "list":
            for k in store.keys():
                print(json.dumps(k.public()))
        elif args.cmd == "revoke":
            if not store.revoke(args.name):
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
    except ApiKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
