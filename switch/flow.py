"""The transaction flow: check, de-duplicate, route, forward, fail over or reverse, answer.

Invariants (DESIGN.md): every well-formed request gets exactly one response
within its terminal timeout (#1); failover only when the request certainly
did not reach the acquirer or was answered "try elsewhere" (#3); an unknown
outcome is reversed at that acquirer and answered 91 (#4); a retransmission
is replayed, never forwarded twice (#6); each link assigns its own STAN and
the terminal gets its own DE11 back (#8).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from switch.acquirer import AcquirerLink, NotSent, OutcomeUnknown
from switch.messages import (
    FINANCIAL_REQUESTS,
    NETWORK_REQUESTS,
    NEVER_ECHO,
    RC_FORMAT_ERROR,
    RC_INOPERATIVE,
    RC_NO_ROUTE,
    RC_SYSTEM_ERROR,
    REVERSAL_REQUESTS,
    mask_pan,
    original_mti,
    pan_of,
    response_mti,
    switch_response,
)
from switch.reversal import ReversalQueue
from switch.router import Router

log = logging.getLogger("isoswitch.flow")

# Fields a financial request must carry for the switch to route and answer it
REQUIRED = {
    "0100": ("3", "4", "11", "41"),
    "0200": ("3", "4", "11", "41"),
    "0220": ("3", "4", "11", "41"),
    "0400": ("3", "4", "11", "41"),
    "0401": ("3", "4", "11", "41"),
    "0420": ("3", "4", "11", "41"),
    "0421": ("3", "4", "11", "41"),
}
_DUP_MEMORY = 100_000


@dataclass(slots=True)
class RequestContext:
    listener: str
    terminal_identity: str | None  # mTLS certificate CN
    received: float  # time.monotonic()
    deadline: float  # time.monotonic() by which the terminal must have its answer


class TransactionFlow:
    def __init__(self, router: Router, links: dict[str, AcquirerLink], reversals: ReversalQueue,
                 *, response_fields: frozenset[str] | None = None):
        self.router = router
        self.links = links
        self.reversals = reversals
        self.counters = collections.Counter()
        # retransmission detection: (DE41, DE11, DE7) -> future of the response
        self._recent: collections.OrderedDict[tuple, asyncio.Future] = collections.OrderedDict()
        # terminal key of an original -> (acquirer, acquirer-side doc), for 0400 routing
        self._originals: collections.OrderedDict[tuple, tuple[str, dict]] = collections.OrderedDict()
        # margin kept between the acquirer timeout and the terminal deadline
        self.answer_margin = 0.05

    # -- entry point -----------------------------------------------------------

    async def process(self, req: dict, ctx: RequestContext) -> dict:
        """The terminal-side response for one decoded request; never raises."""
        mti = req.get("t", "")
        # a repeat (0201) of a request already seen is that request again
        key = (req.get("41"), req.get("11"), req.get("7"), original_mti(mti))
        if key[0] is not None and key[1] is not None:
            prior = self._recent.get(key)
            if prior is not None:
                self.counters["retransmissions"] += 1
                # in flight: wait for the original's answer; done: replay it
                return dict(await asyncio.shield(prior))
            fut = asyncio.get_running_loop().create_future()
            self._recent[key] = fut
            if len(self._recent) > _DUP_MEMORY:
                self._recent.popitem(last=False)
        else:
            fut = None
        try:
            resp = await self._process(req, ctx)
        except Exception:  # a bug must still produce an answer (invariant 1)
            log.exception("flow failed for MTI %s", mti)
            self.counters["system_errors"] += 1
            resp = switch_response(req, RC_SYSTEM_ERROR)
        if fut is not None and not fut.done():
            fut.set_result(resp)
        return resp

    async def _process(self, req: dict, ctx: RequestContext) -> dict:
        mti = req.get("t", "")
        if mti in NETWORK_REQUESTS:
            self.counters["network"] += 1
            return switch_response(req, "00") | ({"70": req["70"]} if "70" in req else {})
        if mti not in FINANCIAL_REQUESTS and mti not in REVERSAL_REQUESTS:
            self.counters["format_errors"] += 1
            return switch_response(req, RC_FORMAT_ERROR)
        for f in REQUIRED.get(original_mti(mti), ()):
            if not req.get(f):
                self.counters["format_errors"] += 1
                return switch_response(req, RC_FORMAT_ERROR)
        if not pan_of(req) and mti in FINANCIAL_REQUESTS:
            self.counters["format_errors"] += 1
            return switch_response(req, RC_FORMAT_ERROR)
        if mti in REVERSAL_REQUESTS:
            return await self._terminal_reversal(req, ctx)
        return await self._forward(req, ctx)

    # -- forwarding ------------------------------------------------------------

    def _acquirer_doc(self, req: dict, link: AcquirerLink) -> dict:
        out = dict(req)
        out.pop("p", None)
        out.pop("1", None)
        cfg = link.cfg
        if cfg.institution_id:
            out["32"] = cfg.institution_id
        if cfg.forwarding_id:
            out["33"] = cfg.forwarding_id
        for field, value in cfg.rewrite.items():
            out[str(field)] = value
        _translate_track2(out, link.spec)
        return out

    def _terminal_doc(self, acq_resp: dict, req: dict) -> dict:
        resp = {k: v for k, v in acq_resp.items() if k not in NEVER_ECHO and k not in ("p", "1")}
        resp["11"] = req["11"]  # the terminal's own trace number (invariant 8)
        for k in ("32", "33"):
            if k in req:
                resp[k] = req[k]
            else:
                resp.pop(k, None)
        for k in ("41", "42"):
            if k in req:
                resp[k] = req[k]
        return resp

    async def _forward(self, req: dict, ctx: RequestContext) -> dict:
        decision = self.router.route(req)
        if not decision.configured:
            self.counters["no_route"] += 1
            return switch_response(req, RC_NO_ROUTE)
        last_answer = None
        for name in decision.ordered:
            link = self.links.get(name)
            if link is None:
                continue
            now = time.monotonic()
            remaining = ctx.deadline - now - self.answer_margin
            if remaining <= 0:
                break
            if not link.health.allow_request(now):
                continue
            acq_doc = self._acquirer_doc(req, link)
            try:
                reply = await link.request(acq_doc, min(link.cfg.timeout, remaining))
            except NotSent as e:
                # certainly not received: safe to try the next candidate
                self.counters["failover_not_sent"] += 1
                link.health.record_failure("write" if e.reason != "link down" else "connect",
                                           time.monotonic())
                log.info("not sent to %s (%s), trying next candidate", name, e.reason)
                continue
            except OutcomeUnknown as e:
                # possibly received: reverse there, never re-send elsewhere
                link.health.record_failure("timeout", time.monotonic())
                self.counters["unknown_outcome"] += 1
                self.reversals.enqueue(name, e.sent_doc, e.reason)
                log.warning("outcome unknown at %s (%s) for pan %s: reversal queued",
                            name, e.reason, mask_pan(pan_of(req)))
                return switch_response(req, RC_INOPERATIVE)
            rc = reply.doc.get("39", "")
            if rc in link.cfg.try_elsewhere_codes:
                link.health.record_failure("try_elsewhere", time.monotonic())
                self.counters["failover_try_elsewhere"] += 1
                last_answer = reply
                continue
            link.health.record_success(reply.latency, time.monotonic())
            self._remember_original(req, name, reply.sent_doc)
            self.counters["answered"] += 1
            return self._terminal_doc(reply.doc, req)
        if last_answer is not None:
            # every candidate declined with a "try elsewhere" code: pass the last one on
            return self._terminal_doc(last_answer.doc, req)
        self.counters["no_acquirer"] += 1
        return switch_response(req, RC_INOPERATIVE)

    def _remember_original(self, req: dict, acquirer: str, sent: dict) -> None:
        key = (req.get("41"), req.get("11"), req.get("7"))
        self._originals[key] = (acquirer, sent)
        if len(self._originals) > _DUP_MEMORY:
            self._originals.popitem(last=False)

    async def _terminal_reversal(self, req: dict, ctx: RequestContext) -> dict:
        """A terminal's own 0400/0420: acknowledge it and reverse at the right acquirer.

        The reversal goes through the store-and-forward queue (it must reach
        the acquirer even if the link is down now); the terminal is answered
        at once, as acquirers answer reversals.
        """
        de90 = req.get("90", "")
        orig_key = (req.get("41"), de90[4:10] if len(de90) >= 10 else req.get("11"),
                    de90[10:20] if len(de90) >= 20 else req.get("7"))
        original = self._originals.get(orig_key)
        if original is None:
            # not seen by this process: route it as the original would have gone
            decision = self.router.route(req)
            if not decision.configured:
                return switch_response(req, RC_NO_ROUTE)
            name = (decision.ordered or decision.configured)[0]
            link = self.links.get(name)
            if link is None:
                return switch_response(req, RC_NO_ROUTE)
            sent = self._acquirer_doc(req, link)
            sent["t"] = "0200" if req["t"].startswith("04") else req["t"]
        else:
            name, sent = original
        self.reversals.enqueue(name, sent, "terminal reversal")
        self.counters["terminal_reversals"] += 1
        resp = switch_response(req, "00")
        resp["t"] = response_mti(req["t"])
        return resp


def _translate_track2(doc: dict, spec: dict) -> None:
    """Track 2 separator: '=' in text dialects, nibble 'D' in BCD dialects."""
    t2 = doc.get("35")
    if t2 is None:
        return
    fs = spec.get("35")
    if fs is None:
        return
    if fs.get("data_enc") == "b":
        doc["35"] = t2.replace("=", "D")
    else:
        doc["35"] = t2.replace("D", "=").replace("d", "=")
