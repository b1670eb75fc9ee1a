"""Routing: BIN table lookup, then rules, then health order.

A request's candidates come from the first rule that matches it (MTI,
processing code, amount range, currency, and the BIN table's route, scheme,
country and card type, merchant or terminal); with no matching rule, the
default acquirers. Candidates are then ordered by acquirer health
(core.health.order_candidates): open breakers drop out, the first place
is split by weight; a half-open acquirer goes first so its trial request can
close the breaker again.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import NamedTuple

from core.bintable import BinRecord, BinTable, BinTableHolder
from core.health import HALF_OPEN, AcquirerHealth, order_candidates
from switch.config import RouteRule, RoutingConfig
from switch.messages import pan_of

SAMPLE_BIN_TABLE = Path(__file__).with_name("sample_bins.csv")


class RouteDecision(NamedTuple):
    """Immutable; a NamedTuple because one is built per transaction and a
    frozen dataclass's __init__ cost several times as much."""

    rule: str | None
    bin: BinRecord | None
    configured: tuple[str, ...]  # every acquirer the rule names, in rule order
    ordered: tuple[str, ...]  # those whose health allows a request now, best first


def _amount(doc: dict) -> int | None:
    v = doc.get("4")
    if v is None or not v.isdigit():
        return None
    return int(v)


def rule_matches(rule: RouteRule, doc: dict, rec: BinRecord | None) -> bool:
    if rule.mti:
        # a repeat (0201, 0221) is its original again: routed as the original
        # would be, or an advice's repeat could reach another acquirer
        mti = doc.get("t")
        if mti not in rule.mti and not (isinstance(mti, str) and mti[3:] == "1" and mti[:3] + "0" in rule.mti):
            return False
    if rule.processing_code:
        pc = doc.get("3", "")
        if not any(pc.startswith(p) for p in rule.processing_code):
            return False
    if rule.amount_min is not None or rule.amount_max is not None:
        amt = _amount(doc)
        if amt is None:
            return False
        if rule.amount_min is not None and amt < rule.amount_min:
            return False
        if rule.amount_max is not None and amt > rule.amount_max:
            return False
    if rule.currency and doc.get("49") not in rule.currency:
        return False
    if rule.merchant and doc.get("42", "").strip() not in rule.merchant:
        return False
    if rule.terminal and doc.get("41", "").strip() not in rule.terminal:
        return False
    if rule.scheme or rule.country or rule.card_type or rule.route:
        if rec is None:
            return False
        if rule.scheme and rec.scheme not in rule.scheme:
            return False
        if rule.country and rec.country not in rule.country:
            return False
        if rule.card_type and rec.card_type not in rule.card_type:
            return False
        if rule.route and rec.route not in rule.route:
            return False
    return True


class Router:
    def __init__(self, cfg: RoutingConfig, healths: dict[str, AcquirerHealth],
                 bins: BinTableHolder | None = None, *, rng: random.Random | None = None):
        self.cfg = cfg
        self.healths = healths
        if bins is None:
            bins = BinTableHolder(BinTable.from_csv(str(cfg.bin_table or SAMPLE_BIN_TABLE)))
        self.bins = bins
        self.rng = rng or random.Random()
        # (the configuration fills in every acquirer when the key is absent: an
        # explicit [] is "no route", 92, for whatever no rule matches)
        self.default = tuple(cfg.default_acquirers)

    def reload_bins(self, path: str | Path | None = None) -> None:
        """Build the new table fully, then swap it in; a bad file keeps the old one."""
        self.bins.reload_from_csv(str(path or self.cfg.bin_table or SAMPLE_BIN_TABLE))

    def route(self, doc: dict, now: float | None = None) -> RouteDecision:
        pan = pan_of(doc)
        rec = self.bins.lookup(pan) if pan else None
        names: tuple[str, ...] = self.default
        weights = None
        rule_name = None
        for rule in self.cfg.rules:
            if rule_matches(rule, doc, rec):
                names = tuple(t.name for t in rule.acquirers)
                weights = [t.weight for t in rule.acquirers]
                rule_name = rule.name
                break
        if not names:
            return RouteDecision(rule_name, rec, (), ())
        healths = [self.healths[n] for n in names if n in self.healths]
        if weights is not None:
            weights = [w for n, w in zip(names, weights) if n in self.healths]
        now = time.monotonic() if now is None else now
        ordered = order_candidates(healths, now, weights, self.rng.random())
        # A half-open acquirer needs its trial request to ever close again:
        # it goes first, and its breaker's allow_request() (half_open_max)
        # bounds how many requests take that risk at once.
        trial = [h for h in ordered if h.state == HALF_OPEN]
        if trial:
            ordered = trial + [h for h in ordered if h.state != HALF_OPEN]
        return RouteDecision(rule_name, rec, names, tuple([h.name for h in ordered]))
