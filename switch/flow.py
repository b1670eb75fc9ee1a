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
from collections.abc import Callable
from dataclasses import dataclass

from core import iso8583
from switch.acquirer import (
    CANNOT_ENCODE,
    HOST_NETWORK_OK,
    HOST_SIGN_OFF,
    HOST_SIGN_ON,
    NOT_SENT_LATE,
    AcquirerLink,
    NotSent,
    OutcomeUnknown,
)
from switch.journal import SF_CANCELLED, DuplicateTransaction, Journal, JournalError, OutcomeTooLate, TxnRecord
from switch.logs import RateLimitedLog
from switch.messages import (
    FINANCIAL_REQUESTS,
    NETWORK_REQUESTS,
    NEVER_ECHO,
    RC_APPROVED,
    RC_DUPLICATE,
    RC_FORMAT_ERROR,
    RC_INOPERATIVE,
    RC_NO_ROUTE,
    RC_SYSTEM_ERROR,
    REVERSAL_REQUESTS,
    is_advice_mti,
    mask_pan,
    original_mti,
    pan_of,
    response_mti,
    spec_is_1993,
    switch_response,
    transmission_time,
)
from switch.reversal import ReversalQueue, advice_payload, reversal_payload
from switch.router import Router

log = logging.getLogger("isoswitch.flow")

# Journal write failures (a full disk, the writer down) fail every request
# while they last: each is counted (counters "journal_errors"), but logged at
# a bounded rate -- the first with its traceback, then one line each, a few
# per minute, then "suppressed K similar messages" (RateLimitedLog).
_L_JOURNAL = "journal write failed"
_L_TIMEOUT_MARK = "timeout not journaled"
_L_FLOW = "flow failed"
# One per transaction while an acquirer times out or misbehaves: counted in
# ``counters`` every time, logged at the same bounded rate
_L_UNKNOWN = "outcome unknown, reversal queued"
_L_NOT_ENCODABLE = "answer not encodable for the terminal"
_L_ORIGINAL_UNKNOWN = "terminal reversal names no journaled request"

# Fields a financial request must carry for the switch to route and answer it
REQUIRED = {
    "0100": ("3", "4", "11", "41"),
    "0200": ("3", "4", "11", "41"),
    "0120": ("3", "4", "11", "41"),
    "0220": ("3", "4", "11", "41"),
    "0400": ("3", "4", "11", "41"),
    "0401": ("3", "4", "11", "41"),
    "0420": ("3", "4", "11", "41"),
    "0421": ("3", "4", "11", "41"),
    "1100": ("3", "4", "11", "41"),
    "1200": ("3", "4", "11", "41"),
    "1120": ("3", "4", "11", "41"),
    "1220": ("3", "4", "11", "41"),
    "1420": ("3", "4", "11", "41"),
    "1421": ("3", "4", "11", "41"),
}
# Network management codes the switch acknowledges for a terminal (0800 DE70,
# 1804 DE24): sign-on, sign-off, echo, cut-over; the same set as for a host
NETWORK_CODES_OK = HOST_SIGN_ON | HOST_SIGN_OFF | HOST_NETWORK_OK
# How far back a reversal that names no transmission time looks for its
# original by trace number (a terminal's STANs wrap after 999,999 requests)
_REVERSAL_LOOKBACK_S = 86_400.0
# How often a retransmission of a request in flight elsewhere (another
# process, or before a restart) looks for the original's journaled outcome.
_DUP_POLL_S = 0.05


# response fields a terminal never gets back: track data and PIN blocks an
# acquirer echoed, its message header (the listener puts the terminal's own
# on), and the bitmaps (re-encoded anyway). DE55 is not among them: in an
# answer it is the issuer's EMV response data (tag 91 issuer authentication
# data, 71/72 scripts), which the card needs for its second GENERATE AC; a
# chip terminal without it fails issuer authentication. It is never
# journaled (journal.NEVER_STORED), so a replay from the journal lacks it.
_NOT_TO_TERMINAL = (NEVER_ECHO - {"55"}) | {"p", "1", "h"}

@dataclass(slots=True)
class RequestContext:
    listener: str
    terminal_identity: str | None  # mTLS certificate CN
    received: float  # time.monotonic()
    deadline: float  # time.monotonic() by which the terminal must have its answer
    # Set by a channel that assigns its own trace numbers (the REST API, whose
    # clients retry with Idempotency-Key): its requests are new by
    # construction, keyed in their own namespace "<channel>:<DE41>" so they can
    # never be taken for a terminal's retransmission (or a terminal's request
    # for theirs), and a key already known means the channel's trace number
    # collided (several processes, a restart within the second):
    # TraceCollision, never a replay of someone else's answer.
    channel: str | None = None
    # Called with the answer right before its outcome write is submitted, so a
    # channel can journal its own record with it: what it returns (a journal
    # ``api_put_params`` tuple, or None) is written in the outcome's own
    # transaction.
    before_outcome: Callable[[dict], tuple | None] | None = None
    # Set by the flow: its outcome (and whatever was attached to it) could not
    # be journaled, so the answer became 96 (91 when the journal refused it as
    # too late for the terminal) and the acquirer's is reversed.
    outcome_failed: bool = False
    # A follow-up of an earlier request of this terminal (a channel's capture
    # or refund): (its MTI, DE11, DE7). It goes to the acquirer that had that
    # request. A terminal's advice names its original in DE90 instead.
    original: tuple[str, str, str] | None = None


class TraceCollision(Exception):
    """A channel-assigned request (RequestContext.channel) reused a known key; nothing was sent.
    The channel picks a new trace number and tries again."""


# The listener answers 91 itself this long before a request's deadline when
# the flow has not answered yet (invariant 1's safety net).
GUARD_LEAD = 0.01
# An outcome journaled later than this before the deadline may not reach the
# terminal (the guard answers instead): it is treated as not delivered.
LATE_LEAD = 2 * GUARD_LEAD


class TransactionFlow:
    def __init__(self, router: Router, links: dict[str, AcquirerLink], reversals: ReversalQueue,
                 journal: Journal):
        self.router = router
        self.links = links
        self.reversals = reversals
        self.journal = journal
        self.counters = collections.Counter()
        # Retransmissions of a request still in flight in this process wait on
        # its future; everything older is answered from the journal. Only
        # in-flight entries are kept, so memory does not grow with traffic.
        self._in_flight: dict[tuple, asyncio.Future] = {}
        # margin kept between the acquirer timeout and the terminal deadline
        self.answer_margin = 0.05
        # Load shedding: a request that waited more than this share of its
        # terminal budget inside the switch before its processing began is
        # answered 91 at once, unforwarded and unjournaled (nothing moved), so
        # an overloaded switch spends its time answering rather than falling
        # further behind (invariant 1 under overload; measured in bench sweep).
        self.shed_after = 0.5
        # observers (metrics), plain callbacks so observing costs no extra coroutine:
        # on_transaction(mti, acquirer, rc, seconds), on_recent(req, ctx, acquirer, rc, seconds),
        # on_acquirer(acquirer, seconds) after each answered acquirer round trip
        self.on_transaction = None
        self.on_recent = None
        self.on_acquirer = None
        # listener name -> its dialect is ISO 8583:1993 (register_listener)
        self.listener_v1993: dict[str, bool] = {}
        self._listener_spec: dict[str, dict] = {}
        self._translated: dict[str, frozenset] = {}
        self.log_limiter = RateLimitedLog(log)

    # -- entry point -----------------------------------------------------------

    async def process(self, req: dict, ctx: RequestContext) -> dict:
        """The terminal-side response for one decoded request; never raises, except
        TraceCollision for a channel's request (``ctx.channel``)."""
        mti = req.get("t", "")
        # a repeat (0201) of a request already seen is that request again
        key = (_key_terminal(req, ctx), req.get("11"), _transmission_key(req), original_mti(mti))
        if key[0] is None or key[1] is None or mti in NETWORK_REQUESTS:
            key = fut = None
        else:
            prior = self._in_flight.get(key)
            if prior is not None:
                if ctx.channel is not None:
                    self.counters["trace_collisions"] += 1
                    raise TraceCollision(key[1])
                self.counters["retransmissions"] += 1
                return dict(await asyncio.shield(prior))
            fut = self._in_flight[key] = asyncio.get_running_loop().create_future()
        try:
            resp = await self._process(req, ctx, key)
        except TraceCollision:  # nothing was sent; nobody waits on a channel's key
            raise
        except Exception as exc:  # a bug or a journal failure must still produce an answer (invariant 1)
            self.counters["system_errors"] += 1
            if isinstance(exc, JournalError):
                self.counters["journal_errors"] += 1
                self.log_limiter.error(_L_JOURNAL, "%s (MTI %s answered 96)", exc, mti, exc_info=exc,
                                       traceback_first=True)
            else:
                self.log_limiter.error(_L_FLOW, "flow failed for MTI %s", mti, exc_info=exc)
            resp = switch_response(req, RC_SYSTEM_ERROR)
        finally:
            if fut is not None:
                del self._in_flight[key]
        if fut is not None:
            fut.set_result(resp)
        return resp

    def register_listener(self, name: str, spec: dict) -> None:
        """Tell the flow a terminal listener's dialect, so a request of the
        other ISO 8583 version (not translated) is answered in the listener's own."""
        self.listener_v1993[name] = spec_is_1993(spec)
        # acquirers whose dialect differs from this listener's: their answers
        # are checked to encode for the terminal before the outcome is journaled
        self._listener_spec[name] = spec
        self._translated[name] = frozenset(n for n, link in self.links.items() if link.spec != spec)

    def _version_mismatch(self, req: dict, v1993: bool) -> dict:
        """A format error for a request whose version is not its listener's:
        an ISO 8583:1993 (1xxx) request on a 1987 listener, or the reverse.
        Answered with the listener's own kind of code (a 3-digit action code
        does not fit a 1987 DE39), never forwarded."""
        self.counters["version_mismatch"] += 1
        resp = switch_response(req, RC_FORMAT_ERROR)
        resp["39"] = "904" if v1993 else RC_FORMAT_ERROR
        return resp

    def _network(self, req: dict) -> dict:
        """A terminal's network management (0800 DE70, 1804 DE24): echo,
        sign-on, sign-off, cut-over are acknowledged; other codes (key
        exchange) are not supported here (12); no code or no trace number is
        a format error (30)."""
        field = "24" if req["t"].startswith("1") else "70"
        code = req.get(field)
        if not code or not req.get("11"):
            self.counters["format_errors"] += 1
            return switch_response(req, RC_FORMAT_ERROR)
        self.counters["network"] += 1
        rc = "00" if code in NETWORK_CODES_OK else "12"
        resp = switch_response(req, rc)
        resp[field] = code
        return resp

    async def _process(self, req: dict, ctx: RequestContext, key) -> dict:
        mti = req.get("t", "")
        v1993 = self.listener_v1993.get(ctx.listener)
        if v1993 is not None and mti.startswith("1") != v1993:
            return self._version_mismatch(req, v1993)
        if mti in NETWORK_REQUESTS:
            return self._network(req)
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
        now = time.monotonic()
        if now - ctx.received > self.shed_after * (ctx.deadline - ctx.received):
            self.counters["shed"] += 1
            return switch_response(req, RC_INOPERATIVE)

        t0 = time.monotonic()
        txn = self._txn_record(req, ctx, key)
        try:
            sent = None  # the request as an acquirer answered it
            if mti in REVERSAL_REQUESTS:
                txn_id = await self.journal.record_received(txn)
                resp, acquirer = await self._terminal_reversal(req, ctx, txn_id)
            else:
                txn_id, resp, acquirer, sent = await self._forward(req, ctx, txn)
                if txn_id is None:  # answered without forwarding (92, 91): journal it now
                    txn_id = await self.journal.record_received(txn)
        except DuplicateTransaction:
            if ctx.channel is not None:  # nothing was sent; the channel retries with a new trace number
                self.counters["trace_collisions"] += 1
                raise TraceCollision(key[1]) from None
            # a retransmission of a request journaled before (another process,
            # before a restart): nothing was sent; the original's answer is replayed
            replay = await self._journaled_answer(req, ctx, key)
            return replay if replay is not None else switch_response(req, RC_DUPLICATE)
        if sent is not None and acquirer in self._translated.get(ctx.listener, ()):
            resp, sent = await self._deliverable(req, ctx, resp, acquirer, sent, txn_id)
        elapsed = time.monotonic() - t0
        attach = None
        if ctx.before_outcome is not None:
            try:
                attach = ctx.before_outcome(resp)
            except Exception:  # the channel's problem; the outcome is journaled regardless
                log.exception("before_outcome hook failed")
        # The outcome is durable before the terminal hears it (invariant 2).
        # An acquirer's answer is journaled only while the terminal can still
        # get it (deliver_by, on the wall clock the journal judges it by):
        # journaled later, the reversal queued next in a second write left a
        # crash between the two with money moved behind the 91 the terminal
        # got, and no restart reverses a row with an outcome.
        deliver_by = None if sent is None else time.time() + (ctx.deadline - LATE_LEAD - time.monotonic())
        refused = False
        try:
            if attach is None:
                await self.journal.record_outcome(txn_id, resp.get("39"), resp.get("38"), resp, elapsed * 1000.0,
                                                  deliver_by=deliver_by)
            else:
                await self.journal.record_outcome(txn_id, resp.get("39"), resp.get("38"), resp, elapsed * 1000.0,
                                                  attach, deliver_by=deliver_by)
        except OutcomeTooLate:
            # Nothing journaled (nor the channel's record): the row stays
            # without an outcome, so a crash before the reversal below is
            # journaled leaves it to start-up recovery (DESIGN.md #7).
            ctx.outcome_failed = refused = True
            self.counters["outcome_too_late"] += 1
            await self.reversals.enqueue_or_hold(acquirer, sent, "answer too late: journaling outlasted "
                                                 "the terminal's deadline", txn_id)
            resp = switch_response(req, RC_INOPERATIVE)
        except Exception:
            ctx.outcome_failed = True
            if sent is not None:
                # The acquirer answered, but the terminal will hear 96 instead:
                # whatever the acquirer approved must be undone there. (A restart
                # would queue this reversal too, DESIGN.md #7; the switch may run
                # on for long after a passing journal failure.)
                self.counters["outcome_not_journaled"] += 1
                await self.reversals.enqueue_or_hold(acquirer, sent, "answer not delivered: its outcome could "
                                                     "not be journaled", txn_id)
            raise
        if not refused and time.monotonic() >= ctx.deadline - LATE_LEAD:
            # Journaling outlasted the terminal's time (a stalled disk or
            # database): the listener's guard answers 91, so whatever the
            # acquirer approved must not stand. (An acquirer's answer lands
            # here only when its write ran in time and its commit did not.)
            self.counters["outcome_too_late"] += 1
            if sent is not None:
                await self.reversals.enqueue_or_hold(acquirer, sent, "answer too late: journaling outlasted "
                                                     "the terminal's deadline", txn_id)
            resp = switch_response(req, RC_INOPERATIVE)
        if self.on_transaction is not None:
            seconds = time.monotonic() - ctx.received
            self.on_transaction(mti, acquirer, resp.get("39", ""), seconds)
            if self.on_recent is not None:
                self.on_recent(req, ctx, acquirer, resp.get("39", ""), seconds)
        return resp

    async def _deliverable(self, req: dict, ctx: RequestContext, resp: dict, acquirer: str, sent: dict,
                           txn_id: int) -> tuple[dict, dict | None]:
        """An acquirer's answer from another dialect than the terminal's may
        not fit it (a longer field, another format): the listener could then
        only send a bare 96, and the acquirer's approval would stand behind
        the terminal's back. Checked here, before the outcome is journaled:
        such an answer becomes 96 and the request is reversed there."""
        spec = self._listener_spec[ctx.listener]
        try:
            iso8583.encode({k: v for k, v in resp.items() if k in spec}, spec)
        except iso8583.EncodeError as e:
            self.counters["answer_not_encodable"] += 1
            self.log_limiter.warning(_L_NOT_ENCODABLE,
                                     "answer from %s cannot be encoded for listener %s (%s, field %s): 96, "
                                     "reversal queued", acquirer, ctx.listener, e.msg, e.field)
            await self.reversals.enqueue_or_hold(acquirer, sent, "answer cannot be encoded for the terminal",
                                                 txn_id)
            return switch_response(req, RC_SYSTEM_ERROR), None
        return resp, sent

    def _txn_record(self, req: dict, ctx: RequestContext, key) -> TxnRecord:
        amount = req.get("4")
        return TxnRecord(
            listener=ctx.listener, terminal_id=key[0], terminal_stan=key[1], terminal_tx_time=key[2],
            mti=key[3], rrn=req.get("37"), amount=int(amount) if amount and amount.isdigit() else None,
            currency=req.get("49"), pan=pan_of(req), proc_code=req.get("3"),
        )

    async def _journaled_answer(self, req: dict, ctx: RequestContext, key) -> dict | None:
        """The replay for a retransmission known to the journal, else None.

        A request in flight elsewhere (another process) is waited for until
        its outcome is journaled or the deadline nears; then 94.
        """
        while True:
            state, replay = await self.journal.find_duplicate(*key)
            if state is None:
                return None
            self.counters["retransmissions"] += 1
            if state == "done":
                if replay is None:  # outcome unknown (recovered after a crash): no replay possible
                    return switch_response(req, RC_DUPLICATE)
                return self._replay(replay, req)
            if time.monotonic() + _DUP_POLL_S > ctx.deadline - self.answer_margin:
                return switch_response(req, RC_DUPLICATE)
            await asyncio.sleep(_DUP_POLL_S)

    @staticmethod
    def _replay(stored: dict, req: dict) -> dict:
        # the journal keeps DE2 masked: the replay carries the request's own
        resp = dict(stored)
        if "2" in req:
            resp["2"] = req["2"]
        else:
            resp.pop("2", None)
        resp["11"] = req["11"]
        return resp

    # -- forwarding ------------------------------------------------------------

    def _acquirer_doc(self, req: dict, link: AcquirerLink, txn: TxnRecord | None = None) -> dict:
        out = dict(req)
        out.pop("p", None)
        out.pop("1", None)
        if txn is not None and not out.get("7"):
            # DE7 is mandatory towards a host, and with the link's DE11 it is
            # what names the transaction there (a reversal's DE90). A terminal
            # that sends none gets the time the switch received it: journaled
            # (received_at), so a later reversal can name the same DE7.
            out["7"] = transmission_time(txn.received_at)
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
        resp = dict(acq_resp)
        for k in _NOT_TO_TERMINAL.intersection(resp):  # usually none: a C-level check
            del resp[k]
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

    async def _forward(self, req: dict, ctx: RequestContext,
                       txn: TxnRecord) -> tuple[int | None, dict, str, dict | None]:
        """(txn_id or None if nothing was journaled, response, acquirer, the
        request as sent to the acquirer whose answer this is, else None)."""
        decision = self.router.route(req)
        if not decision.configured:
            self.counters["no_route"] += 1
            return None, switch_response(req, RC_NO_ROUTE), "", None
        advice = is_advice_mti(req.get("t"))
        pinned = await self._original_acquirer(req, ctx) if advice or ctx.original is not None else None
        if advice:
            return await self._forward_advice(req, ctx, txn, decision, pinned)
        # a follow-up goes where its original went: a refund of a purchase
        # another acquirer holds would settle with the wrong one
        ordered = (pinned,) if pinned is not None else decision.ordered
        journal = self.journal
        journaled: list[int] = []  # the txn_id once the first forwarding is journaled
        last_answer = None
        v1993 = req["t"].startswith("1")
        speaks_version = False  # a candidate of the request's ISO 8583 version was seen
        candidates = unencodable = 0  # ... and how many of those its dialect could not carry
        for name in ordered:
            link = self.links.get(name)
            if link is None:
                continue
            if link.v1993 != v1993:  # no translation between 1987 and 1993: never sent there
                self.counters["skipped_version"] += 1
                continue
            speaks_version = True
            candidates += 1
            now = time.monotonic()
            remaining = ctx.deadline - now - self.answer_margin
            if remaining <= 0:
                break
            if link.draining:  # taken out of service by an operator: not a failure
                self.counters["skipped_draining"] += 1
                continue
            if not link.health.allow_request(now):
                continue
            acq_doc = self._acquirer_doc(req, link, txn)

            async def journal_forwarding(stan, sent, name=name):
                # one durable write before any byte leaves (DESIGN.md #2); a
                # DuplicateTransaction here aborts the send (DESIGN.md #6)
                # only what a reversal needs is kept (encrypted) -- data minimization
                fields = reversal_payload(sent)
                if journaled:
                    await journal.record_forwarded(journaled[0], name, stan, fields)
                else:
                    journaled.append(await journal.record_received_forwarded(txn, name, stan, fields))

            try:
                reply = await link.request(acq_doc, min(link.cfg.timeout, remaining), journal_forwarding)
            except NotSent as e:
                # certainly not received: safe to try the next candidate
                self.counters["failover_not_sent"] += 1
                if e.reason.startswith(CANNOT_ENCODE):
                    # the request's fault, not the acquirer's: counted as a
                    # failure, a few such requests from one terminal would
                    # open every breaker and turn everyone's traffic away
                    unencodable += 1
                    link.health.release(time.monotonic())
                # the journal's slowness is not the acquirer's failure (but a
                # half-open breaker's trial must end, so it counts there)
                elif e.reason != NOT_SENT_LATE or link.health.half_open_trials:
                    link.health.record_failure("write" if e.reason != "link down" else "connect",
                                               time.monotonic())
                log.info("not sent to %s (%s), trying next candidate", name, e.reason)
                continue
            except OutcomeUnknown as e:
                # possibly received: reverse there, never re-send elsewhere
                if e.reason == "timeout":  # a lost link counted itself, once (AcquirerLink)
                    link.health.record_failure("timeout", time.monotonic())
                self.counters["unknown_outcome"] += 1
                txn_id = journaled[0]
                try:
                    await journal.record_timeout(txn_id)
                except Exception as exc:  # the reversal below matters more than this mark
                    self.counters["journal_errors"] += 1
                    self.log_limiter.error(_L_TIMEOUT_MARK, "txn %s: timeout not journaled (%s)", txn_id, exc)
                await self.reversals.enqueue_or_hold(name, e.sent_doc, e.reason, txn_id)
                self.log_limiter.warning(_L_UNKNOWN, "outcome unknown at %s (%s) for pan %s: reversal queued",
                                         name, e.reason, mask_pan(pan_of(req)))
                return txn_id, switch_response(req, RC_INOPERATIVE), name, None
            except BaseException:
                # Nothing was sent, and not for the acquirer's sake (a
                # retransmission the journal already holds, a journal failure):
                # a half-open trial slot allow_request() took is given back, or
                # with no outcome ever recorded the breaker would refuse this
                # acquirer every request from now on.
                link.health.release(time.monotonic())
                raise
            if self.on_acquirer is not None:
                self.on_acquirer(name, reply.latency)
            rc = reply.doc.get("39", "")
            if not rc.strip():
                # An answer without a response code says nothing about the
                # outcome: the acquirer may have approved. Unknown, so as after
                # a timeout: reversed there, never sent elsewhere (DESIGN.md #3).
                link.health.record_failure("timeout", time.monotonic())
                self.counters["answer_without_rc"] += 1
                txn_id = journaled[0]
                await self.reversals.enqueue_or_hold(name, reply.sent_doc, "answer without a response code",
                                                     txn_id)
                self.log_limiter.warning(_L_UNKNOWN,
                                         "answer from %s without a response code (MTI %s) for pan %s: reversal queued",
                                         name, reply.doc.get("t"), mask_pan(pan_of(req)))
                return txn_id, switch_response(req, RC_SYSTEM_ERROR), name, None
            if rc in link.try_elsewhere:
                link.health.record_failure("try_elsewhere", time.monotonic())
                self.counters["failover_try_elsewhere"] += 1
                last_answer = reply
                continue
            link.health.record_success(reply.latency, time.monotonic())
            self.counters["answered"] += 1
            return journaled[0], self._terminal_doc(reply.doc, req), name, reply.sent_doc
        txn_id = journaled[0] if journaled else None
        if last_answer is not None:
            # every candidate declined with a "try elsewhere" code: pass the last one on
            return (txn_id, self._terminal_doc(last_answer.doc, req), last_answer.acquirer,
                    last_answer.sent_doc)
        if not speaks_version and decision.ordered:
            self.counters["no_route"] += 1
            return txn_id, switch_response(req, RC_NO_ROUTE), "", None
        if unencodable and unencodable == candidates:
            # no candidate's dialect can carry it (a field too long, not hex):
            # a format error, never sent anywhere (DESIGN.md #9)
            self.counters["format_errors"] += 1
            return txn_id, switch_response(req, RC_FORMAT_ERROR), "", None
        self.counters["no_acquirer"] += 1
        return txn_id, switch_response(req, RC_INOPERATIVE), "", None

    async def _original_acquirer(self, req: dict, ctx: RequestContext) -> str | None:
        """The acquirer that had the request ``req`` follows up (a completion
        advice's authorization, a channel's refund of its purchase), found in
        the journal by the terminal's own key; None when unknown."""
        if ctx.original is not None:
            mti, stan, tkey = ctx.original
            row = await self.journal.find_txn(_key_terminal(req, ctx), stan, tkey, original_mti(mti)) \
                if mti and stan and tkey else None
        elif req["t"].startswith("1"):
            de56 = req.get("56", "")
            if len(de56) < 10 or not de56[:10].isdigit():
                return None
            row = await self.journal.find_latest_txn(_key_terminal(req, ctx), de56[4:10], original_mti(de56[:4]),
                                                     time.time() - _REVERSAL_LOOKBACK_S)
        else:
            de90 = req.get("90", "")
            if len(de90) < 20 or not de90[:20].isdigit():
                return None
            row = await self.journal.find_txn(_key_terminal(req, ctx), de90[4:10], de90[10:20],
                                              original_mti(de90[:4]))
        if row is None or row.get("forwarded_at") is None or not row.get("acquirer"):
            return None
        return row["acquirer"] if row["acquirer"] in self.links else None

    async def _forward_advice(self, req: dict, ctx: RequestContext, txn: TxnRecord,
                              decision, pinned: str | None = None) -> tuple[int | None, dict, str, None]:
        """An advice (x120/x220: a completion, a stand-in authorization) reports
        what has happened, so it is delivered, never reversed, and never sent
        to another acquirer than its own: the one that had the request it
        names (``pinned``: DE90/DE56, or a channel's ``ctx.original``), else
        the first the routing rule names that this switch has a link to.

        When that link takes it now, the acquirer's acknowledgement is passed
        on. Otherwise -- link down, drained, circuit open, not sent, timed out,
        lost, or acknowledged with a store-and-forward retry code -- it is
        stored and forwarded: the terminal gets 00 once the entry is durable
        (the switch owns its delivery from there) and the queue repeats it
        (x121/x221) until the acquirer acknowledges it. A crash in between is
        recovered the same way (DESIGN.md #7, an advice instead of a reversal).
        Never returns the request as sent: an acknowledged advice is not
        reversed when its outcome cannot be journaled.
        """
        name = pinned or next((n for n in decision.configured if n in self.links), None)
        if name is None or self.links[name].v1993 != req["t"].startswith("1"):
            # (its own acquirer speaks the other ISO 8583 version: no translation, never sent)
            self.counters["no_route"] += 1
            return None, switch_response(req, RC_NO_ROUTE), "", None
        link = self.links[name]
        journal = self.journal
        acq_doc = self._acquirer_doc(req, link, txn)
        journaled: list[int] = []

        async def journal_forwarding(stan, sent):
            journaled.append(await journal.record_received_forwarded(txn, name, stan, advice_payload(sent)))

        now = time.monotonic()
        remaining = ctx.deadline - now - self.answer_margin
        if link.draining:
            reason = "acquirer drained"
        elif remaining <= 0:  # (before allow_request, which may take a half-open trial slot)
            reason = "no time left to send it"
        elif not link.health.allow_request(now):
            reason = "acquirer circuit open"
        else:
            try:
                reply = await link.request(acq_doc, min(link.cfg.timeout, remaining), journal_forwarding)
            except NotSent as e:
                if e.reason.startswith(CANNOT_ENCODE):
                    # never deliverable by its only acquirer: stored, it would be
                    # parked at once while the terminal heard 00 (see _forward)
                    link.health.release(time.monotonic())
                    self.counters["format_errors"] += 1
                    txn_id = journaled[0] if journaled else await journal.record_received(txn)
                    return txn_id, switch_response(req, RC_FORMAT_ERROR), "", None
                if e.reason != NOT_SENT_LATE or link.health.half_open_trials:
                    link.health.record_failure("write" if e.reason != "link down" else "connect",
                                               time.monotonic())
                reason = f"not sent ({e.reason})"
            except OutcomeUnknown as e:
                if e.reason == "timeout":
                    link.health.record_failure("timeout", time.monotonic())
                txn_id = journaled[0]
                try:
                    await journal.record_timeout(txn_id)
                except Exception as exc:
                    self.counters["journal_errors"] += 1
                    self.log_limiter.error(_L_TIMEOUT_MARK, "txn %s: timeout not journaled (%s)", txn_id, exc)
                return await self._store_advice(req, name, e.sent_doc, e.reason, txn_id)
            except BaseException:  # not sent, not the acquirer's doing (see _forward)
                link.health.release(time.monotonic())
                raise
            else:
                rc = reply.doc.get("39", "")
                # the breaker hears every answer, as in _forward (a half-open
                # trial ends here, whatever the advice's fate)
                if not rc.strip():
                    link.health.record_failure("timeout", time.monotonic())
                elif rc in link.try_elsewhere:
                    link.health.record_failure("try_elsewhere", time.monotonic())
                else:
                    link.health.record_success(reply.latency, time.monotonic())
                if rc.strip() and rc not in self.reversals.retry_codes:
                    self.counters["answered"] += 1
                    return journaled[0], self._terminal_doc(reply.doc, req), name, None
                return await self._store_advice(req, name, reply.sent_doc,
                                                f"acknowledged {rc or 'without a response code'}: not applied",
                                                journaled[0])
        txn_id = journaled[0] if journaled else await journal.record_received(txn)
        return await self._store_advice(req, name, acq_doc, reason, txn_id, was_sent=False)

    async def _store_advice(self, req: dict, name: str, sent: dict, reason: str, txn_id: int, *,
                            was_sent: bool = True) -> tuple[int, dict, str, None]:
        wire = None
        if was_sent:
            # it may have arrived: every delivery from the queue is a repeat
            # (x121/x221) of that message, with its DE11 and DE7, so that the
            # acquirer holds one message whichever arrived, and a void of it
            # names that one
            sent = dict(sent, t=sent["t"][:3] + "1")
            wire = (sent.get("11"), sent.get("7"))
        await self.reversals.enqueue_or_hold(name, sent, reason, txn_id, kind="advice", wire=wire)
        self.counters["advices_stored"] += 1
        return txn_id, switch_response(req, RC_APPROVED), name, None

    async def _terminal_reversal(self, req: dict, ctx: RequestContext,
                                 txn_id: int) -> tuple[dict, str]:
        """A terminal's own 0400/0420: acknowledge it and reverse at the right acquirer.

        The original is found in the journal by the terminal's own key (its
        DE41 with DE90's MTI, STAN and DE7, or 1993's DE56), so a terminal can
        only ever reverse its own requests. Then:

        * forwarded by this switch: reversed at that acquirer, under the trace
          number and DE7 the acquirer saw, through the durable queue (so it
          goes out even while the link is down); the terminal is answered at
          once, as acquirers answer reversals. A reversal already queued for
          it (the switch's own after a timeout, or the terminal's earlier
          one) is not queued again;
        * journaled but never forwarded (answered 91/92 by the switch, or
          declined before it left): nothing moved, nothing to send, 00;
        * an advice the switch stored to forward (its acquirer could not take
          it then): see _void_stored_advice;
        * unknown: 25 (unable to locate the original), nothing sent -- a
          terminal's trace numbers are not the link's, and sending them on
          could name another terminal's transaction at the acquirer.

        Without a durable journal (the bench's backend "none") nothing can be
        looked up: the reversal is routed as its original would have been.
        """
        terminal = _key_terminal(req, ctx)
        if req["t"].startswith("1"):
            # ISO 8583:1993 DE56: original MTI n4, STAN n6, local date/time n12, ...
            de56 = req.get("56", "")
            orig_mti = de56[0:4] if len(de56) >= 10 and de56[0:4].isdigit() else "1200"
            orig_stan = de56[4:10] if len(de56) >= 10 else req.get("11")
            times = [req.get("7"), "L" + de56[10:22] if len(de56) >= 22 else None]
        else:
            de90 = req.get("90", "")
            orig_mti = de90[0:4] if len(de90) >= 20 and de90[0:4].isdigit() else "0200"
            orig_stan = de90[4:10] if len(de90) >= 20 else req.get("11")
            times = [de90[10:20] if len(de90) >= 20 else req.get("7")]
        # a terminal that sent no DE7 with its original is keyed by its local time (or date)
        times.append(_transmission_key(req))
        orig_mti = original_mti(orig_mti)
        await self._original_settled(terminal, orig_stan, orig_mti, times, ctx, req["t"].startswith("1"))
        if not getattr(self.journal, "durable", True):
            return await self._reversal_unjournaled(req, orig_mti, orig_stan, times[0], txn_id)
        original = None
        for orig_time in dict.fromkeys(t for t in times if t):
            original = await self.journal.find_txn(terminal, orig_stan, orig_time, orig_mti)
            if original is not None:
                break
        else:
            if orig_stan:  # no time that names it (1993's DE56 has none): the newest of today's
                original = await self.journal.find_latest_txn(terminal, orig_stan, orig_mti,
                                                              time.time() - _REVERSAL_LOOKBACK_S)
        resp = switch_response(req, "00")
        resp["t"] = response_mti(req["t"])
        if original is None:
            self.counters["reversal_original_unknown"] += 1
            self.log_limiter.warning(_L_ORIGINAL_UNKNOWN,
                                     "terminal reversal (MTI %s) names no request this switch journaled for the "
                                     "terminal: answered 25, nothing sent", req["t"])
            return switch_response(req, "25") | {"t": resp["t"]}, ""
        if original.get("reversal_queued") and is_advice_mti(original.get("mti")):
            # (its queued advice set the mark: it says nothing of a reversal)
            entry = await self.journal.sf_for_txn(original["txn_id"], "advice")
            if entry is not None:
                return await self._void_stored_advice(req, resp, original, entry)
        name = original.get("acquirer")
        if not name or not original.get("link_stan") or original.get("forwarded_at") is None:
            self.counters["reversal_not_forwarded"] += 1
            return resp, ""
        if original.get("reversal_queued"):
            self.counters["reversal_already_queued"] += 1
            return resp, name
        key_time = original.get("terminal_tx_time") or ""
        # the DE7 the acquirer saw: the terminal's own, or the switch's (see _acquirer_doc)
        de7 = key_time if key_time[:1].isdigit() else transmission_time(original["received_at"])
        # queued against the original: marks it reversed in the same write
        if not await self._queue_reversal(req, name, original.get("mti") or orig_mti, original["link_stan"], de7,
                                          original["txn_id"]):
            return switch_response(req, RC_NO_ROUTE), ""
        return resp, name

    async def _void_stored_advice(self, req: dict, resp: dict, original: dict, entry) -> tuple[dict, str]:
        """A terminal's void (0420/1420) of an advice the switch stored and
        forwards (``entry``): answered 00 either way, and the advice must not
        stand -- it was delivered after the void, charging the customer.

        * no attempt of it can have reached the acquirer (the flow never
          wrote it, the queue has not, and is not sending it right now): the
          entry is ended, nothing is sent;
        * otherwise it is reversed at its acquirer behind it (FIFO), naming it
          as it went out (the queue fills in the DE11/DE7 of its first
          attempt when the reversal goes: NAMES_ADVICE); a parked one is ended
          too, so that no requeue delivers it after the void.
        """
        name = entry.acquirer
        if entry.state == "acked" and (entry.last_error or "").startswith(SF_CANCELLED):
            self.counters["advice_void_not_needed"] += 1  # (voided before: nothing went out)
            return resp, name
        if original.get("forwarded_at") is None and await self.journal.sf_cancel_unsent(
                entry.id, f"voided by the terminal ({req['t']}) before it was sent"):
            self.counters["advices_voided_unsent"] += 1
            log.info("advice %d for %s voided by the terminal before it was sent: ended, nothing sent",
                     entry.id, name)
            return resp, name
        stan = de7 = None
        if original.get("forwarded_at") is not None and original.get("link_stan"):
            # the flow's own attempt (the queue names the first of its own
            # when the advice has no such record)
            stan = original["link_stan"]
            key_time = original.get("terminal_tx_time") or ""
            de7 = key_time if key_time[:1].isdigit() else transmission_time(original["received_at"])
        if not await self._queue_reversal(req, name, original.get("mti") or original_mti(req["t"]), stan, de7,
                                          original["txn_id"], names_advice=entry.id):
            return switch_response(req, RC_NO_ROUTE), ""
        self.counters["advices_voided"] += 1
        if entry.state == "parked":
            await self.journal.sf_cancel_parked(entry.id, f"voided by the terminal ({req['t']}); reversed")
        return resp, name

    async def _original_settled(self, terminal, orig_stan, orig_mti: str, times: list, ctx: RequestContext,
                                any_time: bool) -> None:
        """Wait, within this reversal's own time, for its original to finish
        when it is still in flight here (the terminal gave up on it first).
        Queued now, the reversal could reach the acquirer before the original
        is done there: the host answers 25 (original not found), which
        acknowledges the reversal, then approves the original -- money moved
        behind a reversed sale. Once the original's outcome is known it is
        either reversed after it or already queued for reversal (a timeout)."""
        in_flight = self._in_flight
        if not in_flight:
            return
        prior = None
        for t in times:
            if t:
                prior = in_flight.get((terminal, orig_stan, t, orig_mti))
                if prior is not None:
                    break
        if prior is None and any_time:
            # 1993's DE56 names no DE7: any original of that STAN in flight
            prior = next((f for k, f in in_flight.items()
                          if k[0] == terminal and k[1] == orig_stan and k[3] == orig_mti), None)
        if prior is None:
            return
        self.counters["reversal_waited_for_original"] += 1
        wait = ctx.deadline - time.monotonic() - self.answer_margin
        if wait > 0:
            try:
                await asyncio.wait_for(asyncio.shield(prior), wait)
            except asyncio.TimeoutError:
                pass

    async def _reversal_unjournaled(self, req: dict, orig_mti: str, orig_stan, orig_time,
                                    txn_id: int) -> tuple[dict, str]:
        decision = self.router.route(req)
        name = (decision.ordered or decision.configured or ("",))[0]
        if not await self._queue_reversal(req, name, orig_mti, orig_stan, orig_time, txn_id):
            return switch_response(req, RC_NO_ROUTE), ""
        resp = switch_response(req, "00")
        resp["t"] = response_mti(req["t"])
        return resp, name

    async def _queue_reversal(self, req: dict, name: str, orig_mti: str, stan, de7, txn_id, *,
                              names_advice: int | None = None) -> bool:
        """Queue the reversal a terminal asked for at acquirer ``name``, naming
        the original as that acquirer knows it (MTI, DE11, DE7, which the queue
        turns into DE90/DE56). False when there is no such link."""
        link = self.links.get(name)
        if link is None:
            return False
        sent = self._acquirer_doc(req, link)
        sent["t"] = orig_mti
        sent["7"] = de7
        sent["11"] = stan
        de56 = req.get("56", "")
        if orig_mti.startswith("1") and len(de56) >= 22 and de56[10:22].isdigit():
            # 1993's DE56 names the original by its local date and time (DE12),
            # which the switch forwarded as the terminal sent it; the 1420's
            # own DE12 is the reversal's time, and an acquirer matching on it
            # finds no original (25), which acknowledges the reversal
            sent["12"] = de56[10:22]
        sent.pop("90", None)
        sent.pop("56", None)
        if stan is None and names_advice is not None:  # named when it goes
            del sent["7"], sent["11"]
        await self.reversals.enqueue(name, sent, "terminal reversal", txn_id, names_advice=names_advice)
        self.counters["terminal_reversals"] += 1
        return True


def _key_terminal(req: dict, ctx: RequestContext) -> str | None:
    """The terminal part of the retransmission key: DE41, namespaced for a channel."""
    tid = req.get("41")
    if ctx.channel is None or tid is None:
        return tid
    return f"{ctx.channel}:{tid}"


def _transmission_key(req: dict) -> str:
    """The "transmission time" part of the retransmission key (DESIGN.md #6).

    DE7 when the terminal sends it; many terminal protocols send only the
    local date and time (DE13 + DE12) instead; failing both, today's UTC date,
    so a STAN reused after wrap-around on another day is not a "duplicate".
    """
    de7 = req.get("7")
    if de7:
        return de7
    local = req.get("13", "") + req.get("12", "")
    if local:
        return "L" + local
    return "D" + time.strftime("%y%m%d", time.gmtime())


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
