"""TOML configuration: the example loads, defaults, precise validation errors."""
from __future__ import annotations

import dataclasses
import pickle
import re
import textwrap
from pathlib import Path

import pytest

from switch import certs, config
from switch.config import Config, ConfigError, load_config

EXAMPLE = Path(config.__file__).with_name("isoswitch.example.toml")

# Two plain acquirers: enough for most bad-config cases to be otherwise valid.
BASE = """
[[acquirers]]
name = "a"
host = "10.0.0.1"
port = 7000

[[acquirers]]
name = "b"
host = "10.0.0.2"
port = 7000
"""


def write(tmp_path: Path, text: str, name: str = "isoswitch.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, **kw) -> Config:
    return load_config(write(tmp_path, text), **kw)


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value.problems


# --------------------------------------------------------------------------
# the example and the defaults


def test_example_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE.resolve()
    assert [l.name for l in cfg.listeners] == ["terminals", "local-plain"]
    assert [a.name for a in cfg.acquirers] == ["acq-visa", "acq-mc"]
    assert all(a.simulated for a in cfg.acquirers)
    assert cfg.acquirers[0].rewrite == {43: "ISOSWITCH TEST MERCHANT  LONDON       GB"}
    rule = cfg.routing.rules[0]
    assert rule.acquirers == (config.RouteTarget("acq-visa", 3.0), config.RouteTarget("acq-mc", 1.0))
    assert cfg.routing.rules[1].acquirers[0] == config.RouteTarget("acq-mc", 1.0)
    assert cfg.switch.state_dir == EXAMPLE.parent.resolve() / "state"
    assert cfg.warnings == ()


def _option_names(cls, skip=("dev_pki", "simulated", "source", "warnings")):
    names = set()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names.add(f.name)
    return names


SECTIONS = [config.SwitchConfig, config.JournalConfig, config.SecurityConfig,
            config.ListenerConfig, config.AcquirerConfig, config.BreakerConfig,
            config.RouteRule, config.RouteTarget, config.RoutingConfig,
            config.SimulatorsConfig, config.SimulatedAcquirer, config.ApiConfig,
            config.MetricsConfig, config.StoreForwardConfig]


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_example_documents_every_option(cls):
    text = EXAMPLE.read_text()
    for name in _option_names(cls):
        # set (possibly commented out) somewhere in the example
        pattern = rf"(^|[\s{{,#]){name} = |\[\[([a-z]+\.)?{name}\]\]"
        assert re.search(pattern, text, re.M), f"{cls.__name__}.{name} missing"


def test_defaults(tmp_path):
    cfg = Config.default(tmp_path / "st")
    st = (tmp_path / "st").resolve()
    assert cfg.source is None
    assert cfg.switch == config.SwitchConfig(state_dir=st)
    assert cfg.journal == config.JournalConfig(backend="sqlite", path=st / "journal.db")
    assert cfg.security.key_file == st / "keys.json"
    (lst,) = cfg.listeners
    pki = certs.dev_pki_paths(st)
    assert (lst.name, lst.host, lst.port, lst.tls) == ("terminals", "127.0.0.1", 8583, True)
    assert (lst.cert, lst.key, lst.client_ca, lst.dev_pki) == (pki.server_cert, pki.server_key, pki.ca_cert, True)
    assert (lst.framing, lst.max_frame, lst.terminal_timeout) == ("binary2", 8192, 30.0)
    assert cfg.uses_dev_pki
    assert [a.name for a in cfg.acquirers] == ["sim-a", "sim-b"]
    a = cfg.acquirer("sim-a")
    assert (a.host, a.port, a.simulated, a.tls) == ("127.0.0.1", 0, True, False)
    assert a.try_elsewhere_codes == ("91", "92", "96")
    assert a.breaker == config.BreakerConfig(5, 10.0, 1)
    assert cfg.simulators.embedded and [s.name for s in cfg.simulators.acquirers] == ["sim-a", "sim-b"]
    assert cfg.routing == config.RoutingConfig(None, ("sim-a", "sim-b"), ())
    assert not cfg.api.enabled and cfg.api.port == 8443 and cfg.api.idempotency_hours == 24.0
    assert (cfg.api.request_timeout, cfg.api.webhook_retention_days) == (30.0, 7.0)
    assert cfg.metrics.enabled
    assert cfg.store_and_forward == config.StoreForwardConfig(50, 86_400.0, 0.5, 60.0, ("30", "91", "96", "904", "907", "909"))


def test_load_config_none_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config.default("state")
    assert load_config(None).switch.state_dir == tmp_path.resolve() / "state"


def test_empty_file_uses_defaults_and_warns(tmp_path):
    cfg = load_text(tmp_path, "")
    assert [l.name for l in cfg.listeners] == ["terminals"]
    assert cfg.acquirers == ()
    assert cfg.routing.default_acquirers == ()
    assert any("92" in w for w in cfg.warnings)


def test_default_acquirers_default_to_all_in_order(tmp_path):
    assert load_text(tmp_path, BASE).routing.default_acquirers == ("a", "b")
    cfg = load_text(tmp_path, BASE + "[routing]\ndefault_acquirers = []\n")
    assert cfg.routing.default_acquirers == ()


def test_framings_match_core():
    framing = pytest.importorskip("core.framing")
    assert tuple(config.FRAMINGS) == tuple(framing.HEADER_KINDS)


def test_timeout_warning(tmp_path):
    cfg = load_text(tmp_path, BASE + "[[listeners]]\nterminal_timeout = 5.0\n")
    assert any("'a'" in w and "terminal_timeout" in w for w in cfg.warnings)


# --------------------------------------------------------------------------
# validation errors name the key path


BAD = [
    ("number-type",
     BASE + '[[acquirers]]\nname = "c"\nhost = "h"\nport = 1\ntimeout = "ten"\n',
     'acquirers[2].timeout: must be a number > 0, got "ten"'),
    ("number-range",
     BASE.replace('port = 7000\n\n', 'port = 7000\ntimeout = 0\n\n', 1),
     "acquirers[0].timeout: must be a number > 0, got 0"),
    ("number-nan",
     BASE + "[[listeners]]\nidle_timeout = nan\n",
     "listeners[0].idle_timeout: must be a number > 0, got nan"),
    ("framing",
     '[[listeners]]\nframing = "ascii5"\n',
     'listeners[0].framing: unknown framing "ascii5" (expected one of binary2, ascii4, bcd2, binary4)'),
    ("typo",
     '[[listeners]]\nframming = "ascii4"\n',
     'listeners[0].framming: unknown key (did you mean "framing"?)'),
    ("typo-top-level",
     '[listner]\nport = 1\n',
     "listner: unknown key"),
    ("typo-breaker",
     BASE + 'breaker = { failure_treshold = 3 }\n',
     'acquirers[1].breaker.failure_treshold: unknown key (did you mean "failure_threshold"?)'),
    ("port-range",
     '[[listeners]]\nport = 70000\n',
     "listeners[0].port: must be an integer between 0 and 65535, got 70000"),
    ("int-not-bool",
     BASE + "connections = true\n",
     "acquirers[1].connections: must be an integer between 1 and 1024, got true"),
    ("bool-type",
     '[[listeners]]\ntls = "yes"\n',
     'listeners[0].tls: must be true or false, got "yes"'),
    ("required",
     '[[acquirers]]\nname = "a"\nport = 7000\n',
     "acquirers[0].host: required"),
    ("reconnect-order",
     BASE + "reconnect_min = 40.0\n",
     "acquirers[1].reconnect_min: 40.0 is more than reconnect_max (30.0)"),
    ("try-elsewhere-length",
     BASE + 'try_elsewhere_codes = ["91", "9"]\n',
     'acquirers[1].try_elsewhere_codes[1]: must be a 2-character response code, got "9"'),
    ("try-elsewhere-type",
     BASE + "try_elsewhere_codes = [91]\n",
     "acquirers[1].try_elsewhere_codes[0]: must be a non-empty string, got 91"),
    ("try-elsewhere-approval",
     BASE + 'try_elsewhere_codes = ["00"]\n',
     'acquirers[1].try_elsewhere_codes[0]: must not be an approval code, got "00"'),
    ("duplicate-acquirer",
     BASE.replace('name = "b"', 'name = "a"'),
     'acquirers[1].name: duplicate name "a" (also acquirers[0])'),
    ("duplicate-listener",
     '[[listeners]]\nname = "t"\n[[listeners]]\nname = "t"\nport = 1\n',
     'listeners[1].name: duplicate name "t" (also listeners[0])'),
    ("same-socket",
     '[[listeners]]\nname = "t1"\n[[listeners]]\nname = "t2"\n',
     "listeners[1].port: 127.0.0.1:8583 is also used by listeners[0]"),
    ("rule-unknown-acquirer",
     BASE + '[[routing.rules]]\nname = "r1"\nacquirers = ["a", "zz"]\n',
     'routing.rules[0].acquirers[1].name: rule "r1" names unknown acquirer "zz" (configured: a, b)'),
    ("rule-no-acquirers",
     BASE + '[[routing.rules]]\nname = "r1"\nmti = ["0200"]\n',
     "routing.rules[0].acquirers: required"),
    ("rule-weight",
     BASE + '[[routing.rules]]\nname = "r1"\nacquirers = [{ name = "a", weight = 0 }]\n',
     "routing.rules[0].acquirers[0].weight: must be a number > 0, got 0"),
    ("rule-mti",
     BASE + '[[routing.rules]]\nname = "r1"\nmti = ["200"]\nacquirers = ["a"]\n',
     'routing.rules[0].mti[0]: must be 4 digits, got "200"'),
    ("rule-currency",
     BASE + '[[routing.rules]]\nname = "r1"\ncurrency = ["EUR"]\nacquirers = ["a"]\n',
     'routing.rules[0].currency[0]: must be an ISO 4217 numeric code as carried in DE49 (for example "978"), got "EUR"'),
    ("rule-amounts",
     BASE + '[[routing.rules]]\nname = "r1"\namount_min = 10\namount_max = 5\nacquirers = ["a"]\n',
     "routing.rules[0].amount_min: 10 is more than amount_max (5)"),
    ("rule-amount-float",
     BASE + '[[routing.rules]]\nname = "r1"\namount_max = 5.5\nacquirers = ["a"]\n',
     "routing.rules[0].amount_max: must be an integer >= 0, got 5.5"),
    ("rule-unknown-match-key",
     BASE + '[[routing.rules]]\nname = "r1"\nschemes = ["visa"]\nacquirers = ["a"]\n',
     'routing.rules[0].schemes: unknown key (did you mean "scheme"?)'),
    ("duplicate-rule",
     BASE + '[[routing.rules]]\nname = "r"\nacquirers = ["a"]\n[[routing.rules]]\nname = "r"\nacquirers = ["b"]\n',
     'routing.rules[1].name: duplicate name "r" (also routing.rules[0])'),
    ("default-acquirer",
     BASE + '[routing]\ndefault_acquirers = ["a", "c"]\n',
     'routing.default_acquirers[1]: unknown acquirer "c" (configured: a, b)'),
    ("postgres-needs-dsn",
     '[journal]\nbackend = "postgres"\n',
     'journal.dsn: required when backend = "postgres"'),
    ("journal-stale-after",  # heartbeats go every 0.5 s at most: a live process would count as dead
     '[journal]\nstale_after_seconds = 0.4\n',
     "journal.stale_after_seconds: must be a number >= 1.5, got 0.4"),
    ("journal-stan-blocks",  # a block must stay well above what a link keeps out of use
     '[journal]\nbackend = "postgres"\ndsn = "postgresql://127.0.0.1/x"\nstan_blocks = 64\n',
     "journal.stan_blocks: must be an integer between 1 and 32, got 64"),
    ("journal-stan-blocks-sqlite",
     '[journal]\nstan_blocks = 4\n',
     'journal.stan_blocks: only used with backend = "postgres" (backend is "sqlite")'),
    ("journal-backend",
     '[journal]\nbackend = "mysql"\n',
     'journal.backend: unknown journal backend "mysql" (expected one of sqlite, postgres, memory, none)'),
    ("log-level",
     '[switch]\nlog_level = "loud"\n',
     'switch.log_level: unknown log level "loud" (expected one of debug, info, warning, error, critical)'),
    ("max-frame-vs-framing",
     '[[listeners]]\nframing = "ascii4"\nmax_frame = 20000\n',
     "listeners[0].max_frame: 20000 is more than a ascii4 length header can declare (9999)"),
    ("max-frame-cap",
     '[[listeners]]\nframing = "binary4"\nmax_frame = 100000000\n',
     "listeners[0].max_frame: must be an integer between 1 and 1048576 "
     "(it bounds each connection's buffered memory), got 100000000"),
    ("port-zero-needs-simulator",
     '[[acquirers]]\nname = "a"\nhost = "h"\nport = 0\n',
     'acquirers[0].port: 0 is only allowed for an embedded simulator '
     '(no [[simulators.acquirers]] named "a" with embedded = true)'),
    ("tls-needs-ca",
     '[[acquirers]]\nname = "a"\nhost = "h"\nport = 1\ntls = true\n',
     "acquirers[0].ca: required when tls = true (the CA that signed the acquirer's certificate)"),
    ("tls-option-without-tls",
     '[[acquirers]]\nname = "a"\nhost = "h"\nport = 1\nserver_hostname = "x"\n',
     "acquirers[0].server_hostname: only used when tls = true"),
    ("rewrite-card-data",
     BASE + 'rewrite = { "35" = "x" }\n',
     "acquirers[1].rewrite.35: field 35 carries card data and cannot be rewritten"),
    ("rewrite-trace",
     BASE + 'rewrite = { "11" = "000001" }\n',
     "acquirers[1].rewrite.11: field 11 is set by the switch and cannot be rewritten"),
    ("rewrite-field",
     BASE + 'rewrite = { "de43" = "x" }\n',
     "acquirers[1].rewrite.de43: must be a field number 2-128"),
    ("institution-id",
     BASE + 'institution_id = "12AB"\n',
     'acquirers[1].institution_id: must be empty or 1 to 11 digits (DE32 is n..11), got "12AB"'),
    ("listeners-not-array",
     "listeners = 5\n",
     "listeners: must be an array of tables ([[listeners]]), got 5"),
    ("section-not-table",
     "api = true\n",
     "api: must be a table, got true"),
    ("dialect",
     '[[listeners]]\ndialect = "no-such-dialect"\n',
     'listeners[0].dialect: unknown dialect "no-such-dialect"'),
    ("empty-string",
     '[[listeners]]\nhost = ""\n',
     "listeners[0].host: must not be empty"),
    ("simulator-field",
     '[simulators]\nacquirers = [{ name = "s", latency_ms = -1 }]\n',
     "simulators.acquirers[0].latency_ms: must be a number >= 0, got -1"),
    ("saf-retry-approval",
     '[store_and_forward]\nretry_codes = ["91", "00"]\n',
     'store_and_forward.retry_codes[1]: must not be an approval code, got "00"'),
    ("saf-retry-1993-approval",
     '[store_and_forward]\nretry_codes = ["001"]\n',
     'store_and_forward.retry_codes[0]: must not be an approval code, got "001"'),
    ("saf-retry-form",
     '[store_and_forward]\nretry_codes = ["9"]\n',
     "store_and_forward.retry_codes[0]: must be a 2-character response code or a 3-digit"),
    ("saf-backoff",
     '[store_and_forward]\nbackoff_min = 5\nbackoff_max = 1\n',
     "store_and_forward.backoff_max: must be at least backoff_min (5.0)"),
    ("saf-attempts",
     '[store_and_forward]\nmax_attempts = 0\n',
     "store_and_forward.max_attempts: must be an integer >= 1, got 0"),
    ("api-idempotency-window",
     '[api]\nidempotency_hours = 0\n',
     "api.idempotency_hours: must be a number > 0, got 0"),
    ("api-webhook-retention",
     '[api]\nwebhook_retention_days = 0.5\n',
     "api.webhook_retention_days: must be a number >= 1, got 0.5"),
    ("api-request-timeout",
     '[api]\nrequest_timeout = 0\n',
     "api.request_timeout: must be a number > 0, got 0"),
]


@pytest.mark.parametrize("text, expected", [pytest.param(t, e, id=i) for i, t, e in BAD])
def test_validation_error_names_key_path(tmp_path, text, expected):
    problems = problems_of(tmp_path, text)
    assert any(p.startswith(expected) for p in problems), problems


def test_single_problem_message_is_exactly_the_problem(tmp_path):
    text = BASE + 'timeout = "ten"\n'
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert str(info.value) == 'acquirers[1].timeout: must be a number > 0, got "ten"'
    assert isinstance(info.value, ValueError)
    assert info.value.source == (tmp_path / "isoswitch.toml").resolve()


def test_all_problems_reported_at_once(tmp_path):
    problems = problems_of(tmp_path, """
        [switch]
        log_format = "xml"
        [[listeners]]
        port = -1
        framming = "ascii4"
        [[acquirers]]
        name = "a"
        host = "h"
        port = 1
        echo_misses = 0
    """)
    assert len(problems) == 4, problems
    assert [p.split(":")[0] for p in problems] == [
        "switch.log_format", "acquirers[0].echo_misses", "listeners[0].port", "listeners[0].framming",
    ]


def test_unknown_key_without_close_match(tmp_path):
    (problem,) = problems_of(tmp_path, "[metrics]\nzzz = 1\n")
    assert problem == "metrics.zzz: unknown key"


def test_dsn_is_never_echoed(tmp_path):
    secret = "postgresql://user:hunter2@db/isoswitch"
    (problem,) = problems_of(tmp_path, f'[journal]\nbackend = "sqlite"\ndsn = "{secret}"\n')
    assert problem.startswith("journal.dsn: only used with backend")
    assert "hunter2" not in problem
    (problem,) = problems_of(tmp_path, '[journal]\nbackend = "postgres"\ndsn = 12345\n')
    assert problem == "journal.dsn: must be a string, got a int"
    cfg = load_text(tmp_path, f'[journal]\nbackend = "postgres"\ndsn = "{secret}"\n')
    assert cfg.journal.dsn == secret and "hunter2" not in repr(cfg)


def test_listener_tls_files_all_or_none(tmp_path):
    (tmp_path / "s.crt").write_text("x")
    problems = problems_of(tmp_path, '[[listeners]]\ncert = "s.crt"\n')
    assert [p.split(":")[0] for p in problems] == ["listeners[0].key", "listeners[0].client_ca"]
    assert "development PKI" in problems[0]


def test_missing_file_is_named(tmp_path):
    (problem,) = problems_of(tmp_path, '[routing]\nbin_table = "bins.csv"\n')
    assert problem == f"routing.bin_table: file not found: {(tmp_path / 'bins.csv').resolve()}"
    cfg = load_text(tmp_path, '[routing]\nbin_table = "bins.csv"\n', check_files=False)
    assert cfg.routing.bin_table == (tmp_path / "bins.csv").resolve()


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"isoswitch.toml: not valid TOML: .*line 1"):
        load_text(tmp_path, "[switch\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_config_error_pickles():
    err = ConfigError(["a.b: bad", "c: worse"], Path("/x.toml"))
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and back.source == err.source and str(back) == str(err)


# --------------------------------------------------------------------------
# paths


def test_relative_paths_resolved_against_config_dir(tmp_path, monkeypatch):
    conf = tmp_path / "etc" / "isoswitch"
    for name in ("tls/s.crt", "tls/s.key", "tls/ca.crt", "tls/ca.crl", "tls/acq-ca.crt", "bins.csv"):
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text("x")
    (conf / "dialects").mkdir()
    (conf / "dialects" / "mine.json").write_text("{}")
    path = write(conf, """
        [switch]
        state_dir = "../../var/state"
        [journal]
        path = "db/journal.db"
        [security]
        key_file = "keys/k.json"
        [[listeners]]
        cert = "tls/s.crt"
        key = "tls/s.key"
        client_ca = "tls/ca.crt"
        crl = "tls/ca.crl"
        dialect = "dialects/mine.json"
        [[acquirers]]
        name = "a"
        host = "h"
        port = 1
        tls = true
        ca = "tls/acq-ca.crt"
        [routing]
        bin_table = "bins.csv"
    """)
    monkeypatch.chdir(tmp_path / "etc")  # the working directory must not matter
    cfg = load_config(path)
    conf = conf.resolve()
    assert cfg.switch.state_dir == tmp_path.resolve() / "var" / "state"
    assert cfg.journal.path == conf / "db" / "journal.db"
    assert cfg.security.key_file == conf / "keys" / "k.json"
    (lst,) = cfg.listeners
    assert (lst.cert, lst.key, lst.client_ca, lst.crl) == (
        conf / "tls/s.crt", conf / "tls/s.key", conf / "tls/ca.crt", conf / "tls/ca.crl")
    assert lst.dialect == str(conf / "dialects" / "mine.json")
    assert not lst.dev_pki
    assert cfg.acquirers[0].ca == conf / "tls/acq-ca.crt"
    assert cfg.routing.bin_table == conf / "bins.csv"
    assert not cfg.uses_dev_pki


def test_defaults_follow_state_dir(tmp_path):
    cfg = load_text(tmp_path, '[switch]\nstate_dir = "st"\n[api]\nenabled = true\n')
    st = (tmp_path / "st").resolve()
    pki = certs.dev_pki_paths(st)
    assert cfg.journal.path == st / "journal.db"
    assert cfg.security.key_file == st / "keys.json"
    assert cfg.listeners[0].client_ca == pki.ca_cert
    assert (cfg.api.cert, cfg.api.key, cfg.api.dev_pki) == (pki.server_cert, pki.server_key, True)
    # the paths the config points at are the ones ensure_dev_pki creates
    made = certs.ensure_dev_pki(st)
    assert (made.server_cert, made.server_key, made.ca_cert) == (
        cfg.listeners[0].cert, cfg.listeners[0].key, cfg.listeners[0].client_ca)


def test_simulated_acquirer_over_tls_uses_dev_ca(tmp_path):
    cfg = load_text(tmp_path, """
        [simulators]
        acquirers = [{ name = "s", port = 9000 }]
        [[acquirers]]
        name = "s"
        tls = true
    """)
    a = cfg.acquirers[0]
    assert (a.host, a.port, a.simulated, a.dev_pki) == ("127.0.0.1", 9000, True, True)
    assert a.ca == certs.dev_pki_paths(tmp_path.resolve() / "state").ca_cert
    assert cfg.uses_dev_pki


def test_simulators_not_embedded_means_real_address_required(tmp_path):
    problems = problems_of(tmp_path, """
        [simulators]
        embedded = false
        acquirers = [{ name = "s" }]
        [[acquirers]]
        name = "s"
    """)
    assert problems == ("acquirers[0].host: required", "acquirers[0].port: required")


def test_config_pickles(tmp_path):
    cfg = load_config(EXAMPLE)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
