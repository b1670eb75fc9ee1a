"""TOML configuration: load, validate, resolve.

``load_config(path)`` reads a TOML file (``tomllib``) and returns a frozen
:class:`Config`; ``load_config(None)`` and ``Config.default(state_dir)`` give
the embedded defaults: one mTLS terminal listener on 127.0.0.1:8583 using the
development PKI, two in-process simulated acquirers ``sim-a`` and ``sim-b``
and a SQLite journal under the state directory. ``switch/isoswitch.example.toml``
documents every option with its default.

Validation is strict because a payment switch that quietly ignores
``timout = 5`` runs with the wrong timeout: every problem in the file is
collected and reported in one :class:`ConfigError`, one line per problem,
each naming the full key path::

    acquirers[1].timeout: must be a number > 0, got "ten"
    listeners[0].framing: unknown framing "ascii5" (expected one of binary2, ascii4, bcd2, binary4)
    listeners[0].framming: unknown key (did you mean "framing"?)

Values that might hold secrets (``journal.dsn``) are never echoed.

Relative paths are resolved against the directory of the config file (for
the embedded defaults: the current directory), so every path in a
:class:`Config` is absolute. Files named by the config (certificates, CRLs,
the BIN table, dialect files) must exist unless ``check_files=False``; files
the switch creates itself (journal, key file, the development PKI) need not.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from switch.certs import dev_pki_paths

__all__ = [
    "AcquirerConfig",
    "ApiConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "FRAMINGS",
    "JournalConfig",
    "ListenerConfig",
    "MetricsConfig",
    "RouteRule",
    "RouteTarget",
    "RoutingConfig",
    "SecurityConfig",
    "SimulatedAcquirer",
    "SimulatorsConfig",
    "SwitchConfig",
    "load_config",
]

# Length-header kinds and the largest payload each can declare; must match
# core.framing.HEADER_KINDS (tests/test_config.py checks).
FRAMINGS = {"binary2": 0xFFFF, "ascii4": 9999, "bcd2": 9999, "binary4": 0xFFFFFFFF}
# The decoder buffers a whole frame before returning it, so max_frame bounds
# each connection's memory; ISO 8583 messages are a few KB, and 10,000
# connections at this cap are already 10 GiB.
MAX_FRAME_CAP = 1 << 20
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")
JOURNAL_BACKENDS = ("sqlite", "postgres", "memory", "none")
CARD_TYPES = ("credit", "debit", "prepaid")
# The switch assigns DE11 per acquirer link (trace numbers 000001-999999), so
# a link can never have more requests outstanding than there are traces.
MAX_TRACE_IN_FLIGHT = 999_999
# Fields a rewrite may not set: 1 is the secondary bitmap, 11 is the trace
# number the switch assigns per link (DESIGN invariant 8), and card data
# (PAN, expiry, tracks, PIN block, ICC data) must come from the card.
_SWITCH_MANAGED_FIELDS = frozenset((1, 11))
_CARD_DATA_FIELDS = frozenset((2, 14, 34, 35, 36, 45, 52, 55))
# Approved / approved-with-id codes can never mean "try another acquirer".
_APPROVAL_CODES = frozenset(("00", "08", "10", "11", "16"))

_DIGITS = re.compile(r"^[0-9]+$")


# --------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """One or more configuration problems, each ``"<key path>: <what is wrong>"``.

    ``problems`` lists them all; ``source`` is the file (None for built-in
    defaults). ``str()`` is the problems, one per line.
    """

    def __init__(self, problems: list[str] | tuple[str, ...] | str, source: Path | None = None):
        if isinstance(problems, str):
            problems = (problems,)
        self.problems = tuple(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems, self.source))


# --------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class SwitchConfig:
    state_dir: Path
    log_level: str = "info"
    log_format: str = "json"
    uvloop: bool = True
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class JournalConfig:
    backend: str  # "sqlite" | "postgres" | "memory" | "none" (bench only: nothing durable)
    path: Path | None  # sqlite only
    dsn: str | None = field(default=None, repr=False)  # postgres only; may hold a password
    group_commit_ms: float = 0.0
    retention_days: float = 0.0  # 0 keeps everything; else finished history older than this is pruned
    # seconds without a heartbeat before a switch process counts as dead (its
    # unknown outcomes are then reversed by whichever process finds them)
    stale_after_seconds: float = 30.0
    # PostgreSQL: the trace numbers (DE11) are split into this many blocks and
    # each process sharing the journal assigns from its own (1: no split)
    stan_blocks: int = 16


@dataclass(frozen=True)
class SecurityConfig:
    key_file: Path


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 8583
    tls: bool = True
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    crl: Path | None = None
    dialect: str = "default"
    framing: str = "binary2"
    tpdu: bool = False
    max_frame: int = 8192
    idle_timeout: float = 300.0
    max_in_flight: int = 64
    max_connections: int = 10000
    terminal_timeout: float = 30.0
    # mTLS: a request's DE41 must equal the client certificate's CN (else 63)
    bind_terminal_id: bool = False
    # True when cert/key/client_ca are the development PKI's files, so start-up
    # must call certs.ensure_dev_pki(state_dir) before building the context.
    dev_pki: bool = False


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_seconds: float = 10.0
    half_open_max: int = 1


@dataclass(frozen=True)
class AcquirerConfig:
    name: str
    host: str
    port: int  # 0 only for an embedded simulator: its real port is known at start-up
    connections: int = 2
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_hostname: str | None = None  # None: check the certificate against host
    dialect: str = "default"
    # the message header (dialect field "h", e.g. BASE24's "ISO025000070") on
    # every message sent to this acquirer; "" for a dialect without one
    message_header: str = ""
    framing: str = "binary2"
    tpdu: bool = False
    max_frame: int = 8192
    timeout: float = 10.0
    max_in_flight: int = 256
    sign_on: bool = True
    echo_interval: float = 30.0  # 0 disables echo tests
    echo_misses: int = 3
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    try_elsewhere_codes: tuple[str, ...] = ("91", "92", "96")
    institution_id: str = ""  # DE32, "" = leave as received
    forwarding_id: str = ""  # DE33, "" = leave as received
    # field number -> value set on every request sent to this acquirer; a
    # plain dict (picklable) that nothing may mutate
    rewrite: dict[int, str] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # True when an embedded simulator of the same name serves this acquirer.
    simulated: bool = False
    dev_pki: bool = False  # ca (and cert/key) are the development PKI's files


@dataclass(frozen=True)
class RouteTarget:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class RouteRule:
    """A routing rule; an empty match tuple / None bound matches anything."""

    name: str
    acquirers: tuple[RouteTarget, ...]
    mti: tuple[str, ...] = ()
    processing_code: tuple[str, ...] = ()  # prefixes of DE3
    amount_min: int | None = None  # DE4, minor units, inclusive
    amount_max: int | None = None
    currency: tuple[str, ...] = ()  # DE49, ISO 4217 numeric
    scheme: tuple[str, ...] = ()  # from the BIN table
    country: tuple[str, ...] = ()  # from the BIN table
    card_type: tuple[str, ...] = ()  # from the BIN table
    route: tuple[str, ...] = ()  # the BIN table row's route
    merchant: tuple[str, ...] = ()  # DE42
    terminal: tuple[str, ...] = ()  # DE41


@dataclass(frozen=True)
class RoutingConfig:
    bin_table: Path | None = None  # None: the built-in sample table
    default_acquirers: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()


@dataclass(frozen=True)
class SimulatedAcquirer:
    name: str
    port: int = 0
    latency_ms: float = 1.0
    approve_below: int | None = None  # DE4 minor units; None approves every amount


@dataclass(frozen=True)
class SimulatorsConfig:
    embedded: bool = True
    acquirers: tuple[SimulatedAcquirer, ...] = ()


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8443
    tls: bool = True
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # None: no client certificates asked for
    dev_pki: bool = False
    webhook_url: str = ""  # "" = no webhooks; else transaction outcomes are POSTed here
    webhook_secret_file: Path | None = None  # HMAC-SHA256 signing secret (>= 16 chars)
    webhook_ca: Path | None = None  # CA file the https receiver's certificate is checked against (None: system CAs)
    webhook_retention_days: float = 7.0  # delivered events are deleted from the outbox after this
    idempotency_hours: float = 24.0  # how long an Idempotency-Key is remembered
    request_timeout: float = 30.0  # seconds a request's head and body have to arrive (else 408)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True


# Acknowledgements that mean "not applied, send it again": the acquirer (or
# the issuer behind it) was inoperative or failed (91, 96), or could not read
# the reversal (30 format error). ISO 8583:1987 response codes and their ISO
# 8583:1993 action codes (907, 909, 904); switch.reversal's default too.
DEFAULT_SF_RETRY_CODES = ("30", "91", "96", "904", "907", "909")


@dataclass(frozen=True)
class StoreForwardConfig:
    """The durable queue of reversals and advices (switch/reversal.py)."""

    max_attempts: int = 50  # then parked (kept, counted, re-queueable), never deleted
    max_age_seconds: float = 86_400.0  # likewise, counted from when it was queued
    backoff_min: float = 0.5  # seconds before the first repeat; doubles per attempt
    backoff_max: float = 60.0
    retry_codes: tuple[str, ...] = DEFAULT_SF_RETRY_CODES


@dataclass(frozen=True)
class Config:
    switch: SwitchConfig
    journal: JournalConfig
    security: SecurityConfig
    listeners: tuple[ListenerConfig, ...]
    acquirers: tuple[AcquirerConfig, ...]
    routing: RoutingConfig
    simulators: SimulatorsConfig
    api: ApiConfig
    metrics: MetricsConfig
    store_and_forward: StoreForwardConfig = field(default_factory=StoreForwardConfig)
    source: Path | None = None  # the file it came from; None for defaults
    # Legal but probably unintended settings, for the log at start-up.
    warnings: tuple[str, ...] = ()

    @classmethod
    def default(cls, state_dir: Path | str = "state") -> "Config":
        """The embedded defaults (``state_dir`` relative to the current directory)."""
        return _build(_default_document(Path(state_dir)), base_dir=Path.cwd(), source=None,
                      check_files=False)

    def acquirer(self, name: str) -> AcquirerConfig:
        for a in self.acquirers:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def uses_dev_pki(self) -> bool:
        """Whether start-up must call ``certs.ensure_dev_pki(switch.state_dir)``."""
        return (
            any(l.dev_pki for l in self.listeners)
            or any(a.dev_pki for a in self.acquirers)
            or (self.api.enabled and self.api.dev_pki)
        )


def _default_document(state_dir: Path) -> dict[str, Any]:
    sims = [{"name": "sim-a"}, {"name": "sim-b"}]
    return {
        "switch": {"state_dir": str(state_dir)},
        "listeners": [{"name": "terminals"}],
        "acquirers": [dict(s) for s in sims],
        "simulators": {"embedded": True, "acquirers": sims},
    }


def load_config(path: Path | str | None, *, check_files: bool = True) -> Config:
    """Read, validate and resolve a TOML config file; None gives the defaults."""
    if path is None:
        return Config.default()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", path) from None
    return _build(doc, base_dir=path.resolve().parent, source=path.resolve(),
                  check_files=check_files)


# --------------------------------------------------------------------------
# Reading tables with precise errors


class _Required:
    def __repr__(self):
        return "<required>"


REQUIRED: Any = _Required()
_ABSENT: Any = object()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = f"{value} ({type(value).__name__})"
    return text if len(text) <= 80 else text[:77] + "..."


def _fmt_range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


class _Problems(list):
    def add(self, key: str, message: str) -> None:
        self.append(f"{key}: {message}")


class _Table:
    """A TOML table being read: typed getters record problems and return None."""

    def __init__(self, data: dict, path: str, problems: _Problems, base_dir: Path, check_files: bool):
        self.data = data
        self.where = path
        self.problems = problems
        self.base_dir = base_dir
        self.check_files = check_files
        self.used: set[str] = set()
        self.bad: set[str] = set()

    # -- plumbing

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.data

    def fail(self, name: str, message: str) -> None:
        self.bad.add(name)
        self.problems.add(self.key(name), message)

    def _raw(self, name: str, default: Any) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is REQUIRED:
            self.fail(name, "required")
        return _ABSENT

    def finish(self) -> None:
        """Report keys nobody asked for: typo protection."""
        for name in self.data:
            if name not in self.used:
                close = difflib.get_close_matches(name, sorted(self.used), n=1, cutoff=0.75)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.problems.add(self.key(name), f"unknown key{hint}")

    def sub(self, data: dict, path: str) -> "_Table":
        return _Table(data, path, self.problems, self.base_dir, self.check_files)

    # -- scalars

    def str(self, name: str, default: Any = REQUIRED, *, choices: tuple[str, ...] | None = None,
            what: str | None = None, lower: bool = False, nonempty: bool = True,
            pattern: re.Pattern | None = None, expect: str = "", secret: bool = False) -> Any:
        v = self._raw(name, default)
        if v is _ABSENT:
            return None if default is REQUIRED else default
        if not isinstance(v, str):
            got = f"a {type(v).__name__}" if secret else _show(v)
            self.fail(name, f"must be a string, got {got}")
            return None
        if lower:
            v = v.lower()
        if choices is not None and v not in choices:
            self.fail(name, f"unknown {what or name} {_show(v)} (expected one of {', '.join(choices)})")
            return None
        if nonempty and not v.strip():
            self.fail(name, "must not be empty")
            return None
        if pattern is not None and v and not pattern.match(v):
            self.fail(name, f"must be {expect}, got {_show(v)}")
            return None
        return v

    def bool(self, name: str, default: Any = REQUIRED) -> Any:
        v = self._raw(name, default)
        if v is _ABSENT:
            return None if default is REQUIRED else default
        if not isinstance(v, bool):
            self.fail(name, f"must be true or false, got {_show(v)}")
            return None
        return v

    def int(self, name: str, default: Any = REQUIRED, *, lo: int | None = None,
            hi: int | None = None, why: str = "") -> Any:
        v = self._raw(name, default)
        if v is _ABSENT:
            return None if default is REQUIRED else default
        return self.check_int(name, v, lo=lo, hi=hi, why=why)

    def check_int(self, name: str, v: Any, *, lo: int | None = None, hi: int | None = None,
                  why: str = "") -> Any:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if ok and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            ok = False
        if not ok:
            rng = _fmt_range(lo, hi)
            why = f" ({why})" if why else ""
            self.fail(name, f"must be an integer{' ' + rng if rng else ''}{why}, got {_show(v)}")
            return None
        return v

    def number(self, name: str, default: Any = REQUIRED, *, gt: float | None = None,
               ge: float | None = None) -> Any:
        v = self._raw(name, default)
        if v is _ABSENT:
            return None if default is REQUIRED else default
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and ((gt is not None and not v > gt) or (ge is not None and not v >= ge)):
            ok = False
        if not ok:
            cond = f" > {gt}" if gt is not None else f" >= {ge}" if ge is not None else ""
            self.fail(name, f"must be a number{cond}, got {_show(v)}")
            return None
        return float(v)

    def port(self, name: str, default: Any = REQUIRED) -> Any:
        return self.int(name, default, lo=0, hi=65535)

    def path(self, name: str, default: Any = None, *, must_exist: bool = True) -> Any:
        v = self._raw(name, default)
        if v is _ABSENT:
            if default is REQUIRED or default is None:
                return None
            return (self.base_dir / Path(default)).resolve()
        if not isinstance(v, str) or not v.strip():
            self.fail(name, f"must be a non-empty path string, got {_show(v)}")
            return None
        p = (self.base_dir / Path(v).expanduser()).resolve()
        if must_exist and self.check_files and not p.exists():
            self.fail(name, f"file not found: {p}")
            return None
        return p

    # -- lists and tables

    def str_list(self, name: str, default: Any = (), *,
                 check: Callable[[str], str | None] | None = None) -> Any:
        """A list of strings (a lone string counts as a list of one).

        ``check(item)`` returns None when the item is fine, else what it must be.
        """
        v = self._raw(name, default)
        if v is _ABSENT:
            return None if default is REQUIRED else tuple(default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            self.fail(name, f"must be a list of strings, got {_show(v)}")
            return None
        out, ok = [], True
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item:
                self.problems.add(f"{self.key(name)}[{i}]", f"must be a non-empty string, got {_show(item)}")
                ok = False
                continue
            problem = check(item) if check else None
            if problem:
                self.problems.add(f"{self.key(name)}[{i}]", f"{problem}, got {_show(item)}")
                ok = False
                continue
            out.append(item)
        if not ok:
            self.bad.add(name)
            return None
        dupes = sorted({x for x in out if out.count(x) > 1})
        if dupes:
            self.fail(name, f"lists {', '.join(_show(d) for d in dupes)} more than once")
            return None
        return tuple(out)

    def table(self, name: str) -> "_Table | None":
        v = self._raw(name, {})
        if v is _ABSENT:
            v = {}
        if not isinstance(v, dict):
            self.fail(name, f"must be a table, got {_show(v)}")
            return None
        return self.sub(v, self.key(name))

    def table_list(self, name: str, default: Any = ()) -> "list[_Table] | None":
        v = self._raw(name, default)
        if v is _ABSENT:
            v = list(default)
        if not isinstance(v, list):
            self.fail(name, f"must be an array of tables ([[{self.key(name)}]]), got {_show(v)}")
            return None
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                self.problems.add(f"{self.key(name)}[{i}]", f"must be a table, got {_show(item)}")
                self.bad.add(name)
                continue
            out.append(self.sub(item, f"{self.key(name)}[{i}]"))
        return out


def _digits(lo: int, hi: int) -> Callable[[str], str | None]:
    def check(s: str) -> str | None:
        if _DIGITS.match(s) and lo <= len(s) <= hi:
            return None
        return f"must be {lo} digits" if lo == hi else f"must be {lo} to {hi} digits"
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(s: str) -> str | None:
        return None if s in choices else f"must be one of {', '.join(choices)}"
    return check


def _dialect_checker() -> Callable[[str], str | None]:
    """Dialect names must be loadable by core.dialect (when it is importable)."""
    try:
        from core.dialect import list_dialects
        known = tuple(list_dialects())
    except (ImportError, AttributeError, OSError):
        known = None

    def check(name: str) -> str | None:
        if known is not None and name not in known:
            return f"unknown dialect {_show(name)} (available: {', '.join(known) or 'none'})"
        return None
    return check


def _message_header_problem(dialect: str, header: str) -> str | None:
    """An acquirer's ``message_header`` checked against its dialect's header
    field ("h"): required when the dialect has one (max_len > 0), the exact
    length and encoding the link will send; not allowed when it has none.
    A dialect that does not load is not judged here (the link reports it)."""
    try:
        from core import iso8583
        spec = iso8583.load_dialect(dialect)
        h = spec["h"]
        size = h["max_len"]
    except (ImportError, ValueError, OSError, KeyError, TypeError):
        return None
    name = _show(dialect)
    if size <= 0:
        if header:
            return f"dialect {name} has no message header (its \"h\" max_len is 0); remove message_header"
        return None
    unit = "nibbles" if h.get("len_count") == "nibbles" else "bytes"
    what = (f"{'exactly' if not h.get('len_type') else 'up to'} {size} {unit}, "
            f"encoding {h.get('data_enc')}" + (" as hex text" if h.get("data_enc") == "b" else ""))
    if not header:
        return (f"required: dialect {name} has a message header (\"h\", {what}) in front of every "
                'message; set the one this switch sends, e.g. "ISO025000070" for BASE24')
    try:
        iso8583.encode({"h": header, "t": "0800"}, spec, strict=True)
    except iso8583.EncodeError as e:
        if e.field != "h":
            return None  # the dialect's MTI, not the header: not this key's problem
        return f"{_show(header)} does not fit dialect {name}'s message header ({what}): {e.msg}"
    except ValueError:  # a spec the codec cannot compile: the link reports it
        return None
    return None


def _is_dialect_path(name: str) -> bool:
    # core.dialect treats these as file paths rather than names.
    return name.endswith(".json") or "/" in name


def _unique(problems: _Problems, items: list, key: Callable, path: str, what: str) -> None:
    seen: dict[Any, int] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k is None:
            continue
        if k in seen:
            problems.add(f"{path}[{i}].{what}", f"duplicate {what} {_show(k)} (also {path}[{seen[k]}])")
        else:
            seen[k] = i


# --------------------------------------------------------------------------
# Sections


class _Builder:
    def __init__(self, doc: dict, base_dir: Path, check_files: bool):
        self.problems = _Problems()
        self.warnings: list[str] = []
        self.root = _Table(doc, "", self.problems, base_dir, check_files)
        self.dialect_check = _dialect_checker()
        self.state_dir: Path = (base_dir / "state").resolve()

    def dialect(self, t: _Table, name: str = "dialect") -> Any:
        v = t.str(name, "default")
        if v is None:
            return None
        if _is_dialect_path(v):
            p = t.path(name, None)
            return None if p is None else str(p)
        problem = self.dialect_check(v)
        if problem:
            t.fail(name, problem)
            return None
        return v

    def framing(self, t: _Table) -> tuple[Any, Any]:
        framing = t.str("framing", "binary2", choices=tuple(FRAMINGS), what="framing")
        max_frame = t.int("max_frame", 8192, lo=1, hi=MAX_FRAME_CAP,
                          why="it bounds each connection's buffered memory")
        if framing is not None and max_frame is not None and max_frame > FRAMINGS[framing]:
            t.fail("max_frame", f"{max_frame} is more than a {framing} length header can declare "
                                f"({FRAMINGS[framing]})")
            max_frame = None
        return framing, max_frame

    # [switch]
    def switch(self) -> SwitchConfig | None:
        t = self.root.table("switch")
        if t is None:
            return None
        state_dir = t.path("state_dir", "./state", must_exist=False)
        if state_dir is not None:
            self.state_dir = state_dir
        out = dict(
            state_dir=self.state_dir,
            log_level=t.str("log_level", "info", choices=LOG_LEVELS, what="log level", lower=True),
            log_format=t.str("log_format", "json", choices=LOG_FORMATS, what="log format"),
            uvloop=t.bool("uvloop", True),
            shutdown_grace=t.number("shutdown_grace", 10.0, ge=0),
        )
        t.finish()
        return None if t.bad else SwitchConfig(**out)

    # [journal]
    def journal(self) -> JournalConfig | None:
        t = self.root.table("journal")
        if t is None:
            return None
        backend = t.str("backend", "sqlite", choices=JOURNAL_BACKENDS, what="journal backend")
        path = t.path("path", None, must_exist=False)
        dsn = t.str("dsn", None, secret=True)
        gc = t.number("group_commit_ms", 0.0, ge=0)
        retention = t.number("retention_days", 0.0, ge=0)
        # a heartbeat goes every third of it, but never more often than every
        # 0.5 s: below 1.5 s a live process is found dead between heartbeats
        # (and its requests in flight reversed by its peers)
        stale = t.number("stale_after_seconds", 30.0, ge=1.5)
        # at most 32: a block (999999 / blocks) must stay well above the
        # numbers a link keeps out of use (10,000 timed out, plus in flight)
        blocks = t.int("stan_blocks", 16, lo=1, hi=32)
        if backend == "none" and t.has("retention_days") and retention:
            t.fail("retention_days", 'nothing is kept with backend = "none"')
        if backend == "sqlite":
            path = path or self.state_dir / "journal.db"
        elif t.has("path") and "path" not in t.bad:
            t.fail("path", f'only used with backend = "sqlite" (backend is {_show(backend)})')
        if backend == "postgres":
            if dsn is None and "dsn" not in t.bad:
                t.fail("dsn", 'required when backend = "postgres"')
        elif t.has("dsn") and "dsn" not in t.bad:
            t.fail("dsn", f'only used with backend = "postgres" (backend is {_show(backend)})')
        if backend != "postgres" and t.has("stan_blocks") and "stan_blocks" not in t.bad:
            t.fail("stan_blocks", f'only used with backend = "postgres" (backend is {_show(backend)})')
        t.finish()
        if t.bad:
            return None
        return JournalConfig(backend=backend, path=path if backend == "sqlite" else None,
                             dsn=dsn if backend == "postgres" else None, group_commit_ms=gc,
                             retention_days=retention, stale_after_seconds=stale, stan_blocks=blocks)

    # [security]
    def security(self) -> SecurityConfig | None:
        t = self.root.table("security")
        if t is None:
            return None
        key_file = t.path("key_file", None, must_exist=False) or self.state_dir / "keys.json"
        t.finish()
        return None if t.bad else SecurityConfig(key_file=key_file)

    # [simulators]
    def simulators(self) -> SimulatorsConfig | None:
        t = self.root.table("simulators")
        if t is None:
            return None
        embedded = t.bool("embedded", True)
        tables = t.table_list("acquirers")
        sims = []
        for s in tables or ():
            out = dict(
                name=s.str("name"),
                port=s.port("port", 0),
                latency_ms=s.number("latency_ms", 1.0, ge=0),
                approve_below=s.int("approve_below", None, lo=0),
            )
            s.finish()
            sims.append(None if s.bad else SimulatedAcquirer(**out))
        _unique(self.problems, [s and s.name for s in sims], lambda n: n, t.key("acquirers"), "name")
        t.finish()
        if t.bad or None in sims:
            return None
        return SimulatorsConfig(embedded=embedded, acquirers=tuple(sims))

    # [[acquirers]]
    def acquirers(self, sims: SimulatorsConfig | None) -> list[AcquirerConfig | None] | None:
        tables = self.root.table_list("acquirers")
        if tables is None:
            return None
        running = {s.name: s for s in sims.acquirers} if sims and sims.embedded else {}
        dev = dev_pki_paths(self.state_dir)
        out: list[AcquirerConfig | None] = []
        for t in tables:
            name = t.str("name")
            sim = running.get(name)
            host = t.str("host", "127.0.0.1" if sim else REQUIRED)
            port = t.port("port", sim.port if sim else REQUIRED)
            if port == 0 and sim is None and "port" not in t.bad:
                t.fail("port", "0 is only allowed for an embedded simulator "
                               f"(no [[simulators.acquirers]] named {_show(name)} with embedded = true)")
            if sim is not None and port is not None and sim.port and port != sim.port:
                t.fail("port", f"{port} differs from the embedded simulator's port {sim.port}")
            tls = t.bool("tls", False)
            ca = t.path("ca")
            cert = t.path("cert")
            key = t.path("key")
            server_hostname = t.str("server_hostname", None)
            dev_pki = False
            if tls:
                if ca is None and "ca" not in t.bad:
                    if sim is not None:
                        ca, dev_pki = dev.ca_cert, True
                    else:
                        t.fail("ca", "required when tls = true (the CA that signed the acquirer's certificate)")
                self._pair(t, cert, key)
            elif tls is False:
                for k in ("ca", "cert", "key", "server_hostname"):
                    if t.has(k) and k not in t.bad:
                        t.fail(k, "only used when tls = true")
            framing, max_frame = self.framing(t)
            reconnect_min = t.number("reconnect_min", 0.5, gt=0)
            reconnect_max = t.number("reconnect_max", 30.0, gt=0)
            if reconnect_min is not None and reconnect_max is not None and reconnect_min > reconnect_max:
                t.fail("reconnect_min", f"{reconnect_min} is more than reconnect_max ({reconnect_max})")
            codes = t.str_list("try_elsewhere_codes", ("91", "92", "96"), check=_response_code)
            dialect = self.dialect(t)
            header = t.str("message_header", "", nonempty=False)
            if dialect is not None and header is not None:
                problem = _message_header_problem(dialect, header)
                if problem:
                    t.fail("message_header", problem)
            item = dict(
                name=name, host=host, port=port,
                connections=t.int("connections", 2, lo=1, hi=1024),
                tls=tls, ca=ca, cert=cert, key=key, server_hostname=server_hostname,
                dialect=dialect, message_header=header, framing=framing,
                tpdu=t.bool("tpdu", False), max_frame=max_frame,
                timeout=t.number("timeout", 10.0, gt=0),
                max_in_flight=t.int("max_in_flight", 256, lo=1, hi=MAX_TRACE_IN_FLIGHT,
                                    why="trace numbers per link run 000001-999999"),
                sign_on=t.bool("sign_on", True),
                echo_interval=t.number("echo_interval", 30.0, ge=0),
                echo_misses=t.int("echo_misses", 3, lo=1),
                reconnect_min=reconnect_min, reconnect_max=reconnect_max,
                try_elsewhere_codes=codes,
                institution_id=t.str("institution_id", "", nonempty=False, pattern=_ID_FIELD,
                                     expect="empty or 1 to 11 digits (DE32 is n..11)"),
                forwarding_id=t.str("forwarding_id", "", nonempty=False, pattern=_ID_FIELD,
                                    expect="empty or 1 to 11 digits (DE33 is n..11)"),
                rewrite=self.rewrite(t),
                breaker=self.breaker(t),
                simulated=sim is not None,
                dev_pki=dev_pki,
            )
            t.finish()
            out.append(None if t.bad else AcquirerConfig(**item))
        _unique(self.problems, [t.data.get("name") for t in tables], lambda n: n if isinstance(n, str) else None,
                "acquirers", "name")
        return out

    def _pair(self, t: _Table, cert: Any, key: Any) -> None:
        if (cert is None) != (key is None) and not t.bad & {"cert", "key"}:
            missing = "key" if cert is not None else "cert"
            t.fail(missing, f"required when {'cert' if missing == 'key' else 'key'} is set")

    def rewrite(self, t: _Table) -> Any:
        r = t.table("rewrite")
        if r is None:
            return None
        out = {}
        for k, v in r.data.items():
            r.used.add(k)
            n = int(k) if _DIGITS.match(k) else None
            if n is None or not 1 <= n <= 128:
                r.fail(k, "must be a field number 2-128")
            elif n in _SWITCH_MANAGED_FIELDS:
                r.fail(k, f"field {n} is set by the switch and cannot be rewritten")
            elif n in _CARD_DATA_FIELDS:
                r.fail(k, f"field {n} carries card data and cannot be rewritten")
            elif not isinstance(v, str):
                r.fail(k, f"must be a string, got {_show(v)}")
            else:
                out[n] = v
        if r.bad:
            t.bad.add("rewrite")
            return None
        return out

    def breaker(self, t: _Table) -> Any:
        b = t.table("breaker")
        if b is None:
            return None
        out = dict(
            failure_threshold=b.int("failure_threshold", 5, lo=1),
            open_seconds=b.number("open_seconds", 10.0, gt=0),
            half_open_max=b.int("half_open_max", 1, lo=1),
        )
        b.finish()
        if b.bad:
            t.bad.add("breaker")
            return None
        return BreakerConfig(**out)

    # [[listeners]]
    def listeners(self) -> list[ListenerConfig | None] | None:
        tables = self.root.table_list("listeners", [{"name": "terminals"}])
        if tables is None:
            return None
        dev = dev_pki_paths(self.state_dir)
        out: list[ListenerConfig | None] = []
        for i, t in enumerate(tables):
            name = t.str("name", f"listener{i}")
            tls = t.bool("tls", True)
            cert, key, client_ca, crl = t.path("cert"), t.path("key"), t.path("client_ca"), t.path("crl")
            dev_pki = False
            if tls:
                given = [k for k in ("cert", "key", "client_ca") if t.has(k)]
                if not given:
                    cert, key, client_ca, dev_pki = dev.server_cert, dev.server_key, dev.ca_cert, True
                else:
                    for k in ("cert", "key", "client_ca"):
                        if k not in given:
                            t.fail(k, f"required when {', '.join(given)} is set (terminals use mutual "
                                      "TLS; the development PKI is used only when none of cert, key, "
                                      "client_ca is set)")
            elif tls is False:
                for k in ("cert", "key", "client_ca", "crl"):
                    if t.has(k) and k not in t.bad:
                        t.fail(k, "only used when tls = true")
            framing, max_frame = self.framing(t)
            item = dict(
                name=name, host=t.str("host", "127.0.0.1"), port=t.port("port", 8583),
                tls=tls, cert=cert, key=key, client_ca=client_ca, crl=crl,
                dialect=self.dialect(t), framing=framing,
                tpdu=t.bool("tpdu", False), max_frame=max_frame,
                idle_timeout=t.number("idle_timeout", 300.0, gt=0),
                max_in_flight=t.int("max_in_flight", 64, lo=1),
                max_connections=t.int("max_connections", 10000, lo=1),
                terminal_timeout=t.number("terminal_timeout", 30.0, gt=0),
                bind_terminal_id=t.bool("bind_terminal_id", False),
                dev_pki=dev_pki,
            )
            if item["bind_terminal_id"] and not tls:
                t.fail("bind_terminal_id", "needs tls = true (the identity is the client certificate)")
            t.finish()
            out.append(None if t.bad else ListenerConfig(**item))
        _unique(self.problems, [t.data.get("name", f"listener{i}") for i, t in enumerate(tables)],
                lambda n: n if isinstance(n, str) else None, "listeners", "name")
        return out

    # [routing]
    def routing(self, acquirers: list[AcquirerConfig | None] | None) -> RoutingConfig | None:
        t = self.root.table("routing")
        if t is None:
            return None
        # Names as written, valid or not, so a rule naming a badly configured
        # acquirer is not reported twice.
        names = [a.get("name") for a in self.root.data.get("acquirers", []) if isinstance(a, dict)]
        names = [n for n in names if isinstance(n, str)]
        listing = ", ".join(names) or "none"
        bin_table = t.path("bin_table")
        defaults = t.str_list("default_acquirers", tuple(names))
        for i, n in enumerate(defaults or ()):
            if n not in names:
                self.problems.add(f"{t.key('default_acquirers')}[{i}]",
                                  f"unknown acquirer {_show(n)} (configured: {listing})")
                t.bad.add("default_acquirers")
        rules = []
        for r in t.table_list("rules") or ():
            rules.append(self.rule(r, names, listing))
        _unique(self.problems, [r.data.get("name") for r in t.table_list("rules") or ()],
                lambda n: n if isinstance(n, str) else None, t.key("rules"), "name")
        t.finish()
        if t.bad or None in rules:
            return None
        return RoutingConfig(bin_table=bin_table, default_acquirers=defaults, rules=tuple(rules))

    def rule(self, r: _Table, names: list[str], listing: str) -> RouteRule | None:
        name = r.str("name")
        out = dict(
            name=name,
            mti=r.str_list("mti", check=_digits(4, 4)),
            processing_code=r.str_list("processing_code", check=_digits(1, 6)),
            amount_min=r.int("amount_min", None, lo=0),
            amount_max=r.int("amount_max", None, lo=0),
            currency=r.str_list("currency", check=_currency),
            scheme=r.str_list("scheme"),
            country=r.str_list("country"),
            card_type=r.str_list("card_type", check=_one_of(CARD_TYPES)),
            route=r.str_list("route"),
            merchant=r.str_list("merchant"),
            terminal=r.str_list("terminal"),
        )
        lo, hi = out["amount_min"], out["amount_max"]
        if lo is not None and hi is not None and lo > hi:
            r.fail("amount_min", f"{lo} is more than amount_max ({hi})")
        targets = []
        raw = r._raw("acquirers", REQUIRED)
        if raw is not _ABSENT:
            if not isinstance(raw, list) or not raw:
                r.fail("acquirers", f"must be a non-empty list of acquirer names or "
                                    f"{{name, weight}} tables, got {_show(raw)}")
            else:
                for i, item in enumerate(raw):
                    path = f"{r.key('acquirers')}[{i}]"
                    if isinstance(item, str):
                        item = {"name": item}
                    if not isinstance(item, dict):
                        self.problems.add(path, f"must be an acquirer name or a {{name, weight}} table, "
                                                f"got {_show(item)}")
                        r.bad.add("acquirers")
                        continue
                    a = r.sub(item, path)
                    target = dict(name=a.str("name"), weight=a.number("weight", 1.0, gt=0))
                    a.finish()
                    if target["name"] is not None and target["name"] not in names:
                        a.fail("name", f"rule {_show(name or '?')} names unknown acquirer "
                                       f"{_show(target['name'])} (configured: {listing})")
                    if a.bad:
                        r.bad.add("acquirers")
                    else:
                        targets.append(RouteTarget(**target))
                _unique(self.problems, targets, lambda x: x.name, r.key("acquirers"), "name")
                if len({x.name for x in targets}) != len(targets):
                    r.bad.add("acquirers")
        r.finish()
        return None if r.bad else RouteRule(acquirers=tuple(targets), **out)

    # [api]
    def api(self) -> ApiConfig | None:
        t = self.root.table("api")
        if t is None:
            return None
        tls = t.bool("tls", True)
        cert, key, client_ca = t.path("cert"), t.path("key"), t.path("client_ca")
        dev_pki = False
        if tls:
            if cert is None and key is None and not t.bad & {"cert", "key"}:
                dev = dev_pki_paths(self.state_dir)
                cert, key, dev_pki = dev.server_cert, dev.server_key, True
            else:
                self._pair(t, cert, key)
        elif tls is False:
            for k in ("cert", "key", "client_ca"):
                if t.has(k) and k not in t.bad:
                    t.fail(k, "only used when tls = true")
        webhook_url = t.str("webhook_url", "")
        secret_file = t.path("webhook_secret_file")
        if webhook_url and not webhook_url.startswith(("http://", "https://")):
            t.fail("webhook_url", f"must be an http:// or https:// URL, got {webhook_url!r}")
        if webhook_url and secret_file is None and "webhook_secret_file" not in t.bad:
            t.fail("webhook_secret_file", "is required when webhook_url is set")
        webhook_ca = t.path("webhook_ca")
        if webhook_ca is not None and not webhook_url.startswith("https://"):
            t.fail("webhook_ca", "only used with an https:// webhook_url")
        out = dict(enabled=t.bool("enabled", False), host=t.str("host", "127.0.0.1"),
                   port=t.port("port", 8443), tls=tls, cert=cert, key=key, client_ca=client_ca,
                   dev_pki=dev_pki, webhook_url=webhook_url, webhook_secret_file=secret_file, webhook_ca=webhook_ca,
                   webhook_retention_days=t.number("webhook_retention_days", 7.0, ge=1),
                   idempotency_hours=t.number("idempotency_hours", 24.0, gt=0),
                   request_timeout=t.number("request_timeout", 30.0, gt=0))
        t.finish()
        return None if t.bad else ApiConfig(**out)

    def metrics(self) -> MetricsConfig | None:
        t = self.root.table("metrics")
        if t is None:
            return None
        out = dict(enabled=t.bool("enabled", True))
        t.finish()
        return None if t.bad else MetricsConfig(**out)

    # [store_and_forward]
    def store_and_forward(self) -> StoreForwardConfig | None:
        t = self.root.table("store_and_forward")
        if t is None:
            return None
        out = dict(
            max_attempts=t.int("max_attempts", 50, lo=1),
            max_age_seconds=t.number("max_age_seconds", 86_400.0, gt=0),
            backoff_min=t.number("backoff_min", 0.5, gt=0),
            backoff_max=t.number("backoff_max", 60.0, gt=0),
            retry_codes=t.str_list("retry_codes", DEFAULT_SF_RETRY_CODES, check=_retry_code),
        )
        if "backoff_min" not in t.bad and "backoff_max" not in t.bad and out["backoff_max"] < out["backoff_min"]:
            t.fail("backoff_max", f"must be at least backoff_min ({_show(out['backoff_min'])})")
        t.finish()
        return None if t.bad else StoreForwardConfig(**out)

    # cross-section checks
    def cross_checks(self, listeners, acquirers, api) -> None:
        sockets: dict[tuple[str, int], str] = {}
        for i, l in enumerate(listeners):
            if l is None or l.port == 0:
                continue
            where = f"listeners[{i}]"
            other = sockets.setdefault((l.host, l.port), where)
            if other != where:
                self.problems.add(f"{where}.port", f"{l.host}:{l.port} is also used by {other}")
        if api is not None and api.enabled and api.port:
            other = sockets.get((api.host, api.port))
            if other:
                self.problems.add("api.port", f"{api.host}:{api.port} is also used by {other}")

        good_acqs = [a for a in acquirers if a is not None]
        if not acquirers:
            self.warnings.append("no [[acquirers]] configured: every request will be answered 92 (no route)")
        timeouts = [l.terminal_timeout for l in listeners if l is not None]
        if timeouts:
            shortest = min(timeouts)
            for a in good_acqs:
                if a.timeout >= shortest:
                    self.warnings.append(
                        f"acquirer {a.name!r}: timeout {a.timeout}s is not shorter than the shortest "
                        f"listener terminal_timeout ({shortest}s); terminals will be answered 91 "
                        "before this acquirer times out"
                    )


_ID_FIELD = re.compile(r"^[0-9]{0,11}$")


def _response_code(s: str) -> str | None:
    if len(s) != 2 or not s.isascii() or not s.isalnum():
        return "must be a 2-character response code"
    if s in _APPROVAL_CODES:
        return "must not be an approval code"
    return None


def _retry_code(s: str) -> str | None:
    if not (len(s) == 2 and s.isascii() and s.isalnum()) and not (len(s) == 3 and s.isascii() and s.isdigit()):
        return "must be a 2-character response code or a 3-digit ISO 8583:1993 action code"
    if s in _APPROVAL_CODES or (len(s) == 3 and s[0] == "0"):
        return "must not be an approval code"
    return None


def _currency(s: str) -> str | None:
    if _DIGITS.match(s) and len(s) == 3:
        return None
    return 'must be an ISO 4217 numeric code as carried in DE49 (for example "978")'


def _build(doc: dict, *, base_dir: Path, source: Path | None, check_files: bool) -> Config:
    b = _Builder(doc, base_dir, check_files)
    switch = b.switch()  # first: other defaults live under state_dir
    journal = b.journal()
    security = b.security()
    simulators = b.simulators()
    acquirers = b.acquirers(simulators)
    listeners = b.listeners()
    routing = b.routing(acquirers)
    api = b.api()
    metrics = b.metrics()
    store_and_forward = b.store_and_forward()
    b.root.finish()
    if listeners is not None and acquirers is not None:
        b.cross_checks(listeners, acquirers, api)
    if b.problems:
        raise ConfigError(list(b.problems), source)
    return Config(
        switch=switch, journal=journal, security=security,
        listeners=tuple(listeners), acquirers=tuple(acquirers), routing=routing,
        simulators=simulators, api=api, metrics=metrics, store_and_forward=store_and_forward,
        source=source, warnings=tuple(b.warnings),
    )
