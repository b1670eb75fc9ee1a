"""Store-and-forward of reversals: FIFO per acquirer, retried with backoff until acknowledged.

DESIGN.md #4: every request whose outcome is unknown is reversed at the
acquirer it may have reached; the first attempt goes as 0400, repeats as
0401 with the first attempt's DE11 and DE7 (the same message but for the
MTI); nothing is dropped: an entry past its attempt or age limit is parked
and stays visible (`parked`) until re-queued. "Repeat" means an earlier
attempt may have reached the acquirer (written to the link, or claimed by a
process that died): one that never left the switch (NotSent) counts toward
the limits but leaves the next send an 0400. An answer with a retry code
(default 30/91/96, 1993: 904/907/909) did not apply it: it is sent again.

Advices (x120/x220) go through the same queue when their acquirer cannot
take them at once (``kind="advice"``): repeated as x121/x221 until
acknowledged, never reversed by the switch. A terminal's void of one (its
0420/1420) ends it while no attempt of it can have reached the acquirer
(``Journal.sf_cancel_unsent``); otherwise a reversal is queued behind it
that names it as it went out (``NAMES_ADVICE``).

Entries live in the journal database (switch/journal.py), so they survive
a crash and several processes sharing a PostgreSQL journal drain one queue.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from switch.config import DEFAULT_SF_RETRY_CODES
from switch.journal import SF_CANCELLED
from switch.logs import RateLimitedLog
from switch.messages import transmission_time

log = logging.getLogger("isoswitch.reversal")

# One line per reversal queued or held is one line per transaction while an
# acquirer is down or the journal refuses writes: every one is counted (and
# the queue is in the journal), but logged a few per kind per minute, then
# "suppressed K similar messages" (RateLimitedLog).
_L_QUEUED = "store-and-forward entry queued"
_L_HELD = "reversal held in memory"

# Fields a reversal carries from the original request (the rest is not needed
# to locate the original at the acquirer, and card data is kept to a minimum).
REVERSAL_FIELDS = ("2", "3", "4", "12", "13", "14", "22", "32", "33", "37", "41", "42", "49")
# (DE12 also feeds 1993's DE56; DE7 and DE11 of the original feed DE90)

# Acknowledgements that did not apply the reversal (config's [store_and_forward] retry_codes default)
DEFAULT_RETRY_CODES = DEFAULT_SF_RETRY_CODES

# A reversal payload's reference to the queued advice it reverses (its entry
# id): the DE11/DE7 that advice went out with are known only once its first
# attempt is about to be written, which may be after the void was queued
# (the advice was being sent right then); it is ahead in the acquirer's FIFO
# queue, so it is settled by the time the reversal goes.
NAMES_ADVICE = "advice_entry"


def _track2_pan_expiry(t2) -> tuple[str | None, str | None]:
    """(PAN, expiry YYMM) from track 2 equivalent data (DE35): PAN, separator
    '=' or 'D', YYMM, service code, discretionary data; an optional ';' start
    and '?' end sentinel. (None, None) when it does not look like track 2."""
    if isinstance(t2, (bytes, bytearray)):
        try:
            t2 = bytes(t2).decode("ascii")
        except UnicodeDecodeError:
            return None, None
    if not isinstance(t2, str):
        return None, None
    t2 = t2.strip().lstrip(";").rstrip("?").rstrip("Ff")  # BCD padding
    for i, ch in enumerate(t2):
        if ch in "=Dd":
            break
    else:
        return None, None
    pan, rest = t2[:i], t2[i + 1:]
    if not (pan.isascii() and pan.isdigit() and 12 <= len(pan) <= 19):
        return None, None
    exp = rest[:4]
    return pan, exp if len(exp) == 4 and exp.isascii() and exp.isdigit() else None


def _with_card_from_track2(doc: dict, out: dict) -> None:
    """ISO practice: a reversal carries DE2 (and DE14), which a card-present
    original sent only inside track 2 (DE35): taken from there into ``out``
    where ``doc`` has none. Track 2 itself is never copied (PCI DSS 3.3.1)."""
    if out.get("2") and out.get("14"):
        return
    pan, exp = _track2_pan_expiry(doc.get("35"))
    if pan is None:
        return
    if not out.get("2"):
        out["2"] = pan
    elif str(out["2"]) != pan:
        return  # another card's track: take nothing from it
    if exp is not None and not out.get("14"):
        out["14"] = exp


def build_reversal(original: dict, repeat: bool) -> dict:
    """The reversal of `original`.

    ISO 8583:1987: 0400 (repeats 0401) with DE90 original data elements.
    ISO 8583:1993 (a 1xxx original): 1420 reversal advice (repeats 1421) with
    DE24 function code 400 (full reversal) and DE56 original data elements.
    """
    v1993 = original.get("t", "0200").startswith("1")
    if v1993:
        rev = {"t": "1421" if repeat else "1420", "24": "400"}
    else:
        rev = {"t": "0401" if repeat else "0400"}
    for k in REVERSAL_FIELDS:
        v = original.get(k)
        if v is not None:
            rev[k] = v
    _with_card_from_track2(original, rev)
    rev["7"] = transmission_time()
    if v1993:
        # DE56: original MTI n4 + STAN n6 + local date/time n12 + LL acquirer id
        acq = original.get("32", "")
        rev["56"] = (original.get("t", "1200") + original.get("11", "000000")
                     + original.get("12", "000000000000").zfill(12)[-12:] + f"{len(acq):02d}" + acq)
        return rev
    # DE90: original MTI (4) + STAN (6) + transmission time (10) + acquiring
    # and forwarding institution ids (11 each, zero-filled): n42
    de90 = (
        original.get("t", "0200")
        + original.get("11", "000000")
        + original.get("7", "0000000000")
        + original.get("32", "").zfill(11)[-11:]
        + original.get("33", "").zfill(11)[-11:]
    )
    rev["90"] = de90
    return rev


def build_advice(original: dict, repeat: bool) -> dict:
    """An advice as stored (x120/x220), or its repeat (x121/x221): the same
    fields again, DE11 assigned by the link as for every message. One stored
    as a repeat (it may have reached the acquirer before) always goes as one."""
    adv = dict(original)
    mti = str(adv.get("t", "0220"))
    adv["t"] = mti[:3] + ("1" if repeat or mti[3:] == "1" else "0")
    return adv


def advice_payload(sent: dict) -> dict:
    """What the queue keeps of an advice as sent: all of it (the journal drops
    track data, PIN blocks and ICC data before anything is stored)."""
    return dict(sent)


def reversal_payload(sent: dict) -> dict:
    """What the queue keeps of a request as sent: enough to build its reversal.

    DE2 and DE14 come from track 2 (DE35) when the request carried only that;
    track 2 itself is not kept (the journal encrypts what is kept)."""
    out = {k: sent[k] for k in ("t", "7", "11", *REVERSAL_FIELDS) if k in sent}
    _with_card_from_track2(sent, out)
    return out


class ReversalQueue:
    """Durable store-and-forward of reversals in the journal database.

    One sender task per acquirer per process. Entries are claimed from the
    journal (SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL), so several
    switch processes can drain one queue and each reversal goes out once.
    FIFO per acquirer: after a failed attempt the sender waits out that
    entry's backoff before claiming again, so the head is retried before
    anything queued behind it.
    """

    def __init__(self, journal, *, max_attempts: int = 50, max_age: float = 86_400.0,
                 backoff_min: float = 0.5, backoff_max: float = 60.0, lease_s: float = 60.0,
                 poll_s: float = 0.5, worker_id: str | None = None,
                 retry_codes: tuple[str, ...] = DEFAULT_RETRY_CODES):
        import os
        import socket

        self.journal = journal
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.lease_s = lease_s
        self.poll_s = poll_s
        # an acknowledgement with one of these codes (or none) did not apply it: sent again
        self.retry_codes = frozenset(retry_codes)
        # (the journal also records its boot_id with each lease, so start-up
        # recovery knows a dead process's leases; shown here for the operator)
        boot = getattr(journal, "boot_id", None)
        self.worker_id = worker_id or ":".join(
            [socket.gethostname(), str(os.getpid()), *([boot] if boot else []), f"{id(self):x}"])
        self.links: dict = {}
        self.counters = collections.Counter()
        self.log_limiter = RateLimitedLog(log)
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._depth: dict[str, int] = {}
        self._parked: list = []  # (the first 1,000, for the admin API)
        self._parked_count = 0
        self._held: collections.deque = collections.deque()  # reversals the journal could not take yet
        self._held_task: asyncio.Task | None = None
        self._stopping = False

    def bind(self, links: dict) -> None:
        self.links = links

    async def start(self) -> None:
        for name in self.links:
            self._ensure_worker(name)
        await self.refresh()

    async def refresh(self) -> None:
        """Update the cached depth and parked list (for metrics and the admin API)."""
        for name in self.links:
            self._depth[name] = await self.journal.sf_depth(name)
        self._parked = await self.journal.sf_list(parked=True)
        # counted, not the list's length: the list stops at its page size
        self._parked_count = await self.journal.sf_parked_count()

    def depth(self, acquirer: str | None = None) -> int:
        if acquirer is not None:
            return self._depth.get(acquirer, 0)
        return sum(self._depth.values())

    @property
    def parked(self) -> list:
        return list(self._parked)

    @property
    def parked_count(self) -> int:
        """Entries parked (all of them; ``parked`` lists the first 1,000)."""
        return self._parked_count

    async def enqueue(self, acquirer: str, original: dict, reason: str, txn_id: int | None = None,
                      kind: str = "reversal", *, wire: tuple | None = None,
                      names_advice: int | None = None) -> int | None:
        """Queue the reversal of ``original`` (the request as sent), or with
        ``kind="advice"`` the advice ``original`` itself, for ``acquirer``.
        ``wire``: (DE11, DE7) the advice went out with already (its repeats
        carry them). ``names_advice``: the queued advice entry the reversal
        reverses (it names that advice as it went out; see NAMES_ADVICE)."""
        advice = kind == "advice"
        payload = advice_payload(original) if advice else reversal_payload(original)
        if names_advice is not None:
            payload[NAMES_ADVICE] = int(names_advice)
        entry_id, new = await self.journal.sf_enqueue_once(acquirer, kind, txn_id, payload, wire=wire)
        if not new:
            # already queued for this transaction (the terminal's own reversal
            # came first, a peer's crash recovery): it goes out once
            self.counters["already_queued"] += 1
            log.info("%s for transaction %s already queued (entry %s); not queued again (%s)",
                     kind, txn_id, entry_id, reason)
            return entry_id
        self.counters["advices_queued" if advice else "queued"] += 1
        self._depth[acquirer] = self._depth.get(acquirer, 0) + 1
        self.log_limiter.warning(_L_QUEUED, "%s %d queued for %s (%s)", kind, entry_id, acquirer, reason)
        self._ensure_worker(acquirer)
        self._wake[acquirer].set()
        return entry_id

    async def enqueue_or_hold(self, acquirer: str, original: dict, reason: str, txn_id: int | None = None,
                              kind: str = "reversal", *, wire: tuple | None = None) -> None:
        """``enqueue``, or when the journal refuses the write (writer down, disk
        full): keep the reversal in memory and offer it again every second
        until the journal takes it. Never dropped while the process lives; if
        the process ends first, start-up recovery (DESIGN.md #7) queues every
        forwarded request whose outcome is not journaled."""
        try:
            await self.enqueue(acquirer, original, reason, txn_id, kind, wire=wire)
        except Exception as exc:
            payload = advice_payload(original) if kind == "advice" else reversal_payload(original)
            self._held.append((acquirer, payload, reason, txn_id, kind, wire))
            self.counters["held"] += 1
            self.log_limiter.critical(_L_HELD, "reversal for %s (%s) not journaled (%s); held in memory (%d held), "
                                      "retried every second",
                                      acquirer, reason, exc, len(self._held))
            if self._held_task is None or self._held_task.done():
                self._held_task = asyncio.get_running_loop().create_task(self._offer_held(), name="reversals-held")

    @property
    def held(self) -> int:
        """Reversals waiting in memory for the journal to take them."""
        return len(self._held)

    async def _offer_first_held(self) -> None:
        """Journal the oldest held reversal (raises while the journal refuses).
        A refused write may still have committed (the writer died between its
        COMMIT and the reply): a transaction that has an entry of this kind
        already is not queued again. (Its ``reversal_queued`` mark does not
        tell: a queued advice sets it too, and the held void of that advice
        was then dropped.)"""
        acquirer, payload, reason, txn_id, kind, wire = self._held[0]
        if txn_id is None or await self.journal.sf_for_txn(txn_id, kind) is None:
            await self.enqueue(acquirer, payload, reason, txn_id, kind, wire=wire)
        self._held.popleft()
        self.counters["held_journaled"] += 1

    async def _offer_held(self) -> None:
        while self._held:
            await asyncio.sleep(1.0)
            while self._held:
                try:
                    await self._offer_first_held()
                except Exception:
                    break  # the journal still refuses: next second

    async def requeue_parked(self, entry_id: int) -> bool:
        entry = await self.journal.sf_get(entry_id)
        ok = await self.journal.sf_requeue(entry_id)
        if ok and entry is not None:
            self._ensure_worker(entry.acquirer)
            self._wake[entry.acquirer].set()
        await self.refresh()
        return ok

    def _ensure_worker(self, acquirer: str) -> None:
        if acquirer not in self._wake:
            self._wake[acquirer] = asyncio.Event()
        t = self._tasks.get(acquirer)
        if (t is None or t.done()) and not self._stopping:
            self._tasks[acquirer] = asyncio.get_running_loop().create_task(
                self._drain(acquirer), name=f"reversals-{acquirer}")

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        if self._held_task is not None:
            tasks.append(self._held_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._held:  # a last offer before the journal closes
            try:
                await self._offer_first_held()
            except Exception:
                log.critical("%d reversal(s) could not be journaled before stopping; start-up recovery "
                             "queues those whose outcome is not journaled", len(self._held))
                break

    async def wait_empty(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.journal.sf_depth() == 0:
                await self.refresh()
                return True
            await asyncio.sleep(0.05)
        return False

    async def _drain(self, acquirer: str) -> None:
        """The acquirer's sender: one entry at a time, oldest first. Nothing
        that goes wrong ends it (a journal write failing while the writer
        restarts, a bug): the entry's lease runs out and it goes again."""
        wake = self._wake[acquirer]
        while not self._stopping:
            try:
                await self._send_next(acquirer, wake)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counters["sender_errors"] += 1
                log.exception("store-and-forward sender for %s failed; going on", acquirer)
                await asyncio.sleep(self.poll_s)

    async def _name_advice(self, entry) -> bool:
        """Name the queued advice a terminal's void reverses as it went out (its
        first attempt's DE11 and DE7, recorded before the first byte) in
        ``entry.payload``. False when ``entry`` was dealt with here instead:
        acknowledged without sending when none of the advice ever went out
        (it is ended, so it never goes), parked when it cannot be named."""
        p = entry.payload
        adv = await self.journal.sf_get(int(p[NAMES_ADVICE]))
        if adv is not None and adv.wire_stan is not None:
            p["11"] = adv.wire_stan
            if adv.wire_time is not None:
                p["7"] = adv.wire_time
            return True
        if p.get("11"):  # the flow's own attempt, journaled with its transaction
            return True
        if adv is not None and adv.state == "queued":
            # ahead of this entry in FIFO order (requeued meanwhile): it goes first
            await self.journal.sf_retry(entry.id, time.time() + self.poll_s, "waiting for the advice it reverses",
                                        sent=False)
            return False
        never_sent = adv is not None and (
            (adv.state == "parked" and adv.sent == 0)
            or (adv.state == "acked" and (adv.last_error or "").startswith(SF_CANCELLED)))
        if never_sent:
            if adv.state == "parked":
                await self.journal.sf_cancel_parked(adv.id, "voided by the terminal; never sent")
            await self.journal.sf_ack(entry.id)
            self.counters["reversals_not_needed"] += 1
            self._depth[entry.acquirer] = max(0, self._depth.get(entry.acquirer, 1) - 1)
            log.info("reversal %d for %s not sent: the advice %d it voids never went out (ended)",
                     entry.id, entry.acquirer, adv.id)
            await self.refresh()
            return False
        await self.journal.sf_park(entry.id, "the advice it reverses left no record of the DE11/DE7 it went "
                                   "out with; reverse it by hand if it was delivered", sent=False)
        self.counters["parked"] += 1
        log.error("reversal %d for %s parked: cannot name the advice it reverses", entry.id, entry.acquirer)
        await self.refresh()
        return False

    async def _send_next(self, acquirer: str, wake: asyncio.Event) -> None:
        from switch.acquirer import CANNOT_ENCODE, NotSent, OutcomeUnknown

        try:
            entry = await self.journal.sf_claim(acquirer, self.worker_id, self.lease_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store-and-forward claim failed for %s", acquirer)
            await asyncio.sleep(self.poll_s)
            return
        if entry is None:
            self._depth[acquirer] = await self.journal.sf_depth(acquirer)
            # (other processes on a shared journal park and requeue too)
            self._parked_count = await self.journal.sf_parked_count()
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            return
        if entry.requeued_at is not None and any(p.id == entry.id for p in self._parked):
            # requeued from elsewhere (`isoswitch queue requeue`, a peer's admin
            # API): the parked list, and the parked metric read from it, still
            # showed it
            await self.refresh()
        # the attempt limit counts attempts that reached the link: an acquirer
        # that was unreachable for a while gets its reversals once it is back
        # (the age limit still parks what waits too long); both count from an
        # operator's requeue, if any
        if entry.sent_since_requeue >= self.max_attempts or time.time() - entry.limits_from > self.max_age:
            # parked before this claim's attempt: it did not send anything
            await self.journal.sf_park(entry.id, f"gave up after {entry.attempts} attempts "
                                       f"({entry.sent} sent)", sent=False)
            self.counters["parked"] += 1
            log.error("%s %d for %s parked after %d attempts", entry.kind, entry.id, acquirer, entry.attempts)
            await self.refresh()
            return
        link = self.links.get(acquirer)
        advice = entry.kind == "advice"
        if not advice and entry.payload.get(NAMES_ADVICE) is not None and not await self._name_advice(entry):
            return
        # a repeat only once an attempt may have reached the acquirer: one
        # that never left the switch (NotSent) leaves the next a 0400
        repeat = entry.repeat
        rev = build_advice(entry.payload, repeat) if advice else build_reversal(entry.payload, repeat)
        # every attempt is the first one again but for the MTI: the same DE11
        # and DE7, so the acquirer can tell a repeat of what it may have
        # applied (and its duplicate check holds); recorded before the first
        # byte of the first attempt goes out
        before_write = None
        if entry.wire_stan is not None:
            if entry.wire_time is not None:
                rev["7"] = entry.wire_time
        else:
            entry_id = entry.id

            async def before_write(stan, out):
                await self.journal.sf_mark_wire(entry_id, stan, out.get("7"))
        written = True
        try:
            if link is None:
                raise NotSent(acquirer, "no such link")
            reply = await link.request(rev, link.cfg.timeout, before_write, draining_ok=True,
                                       stan=entry.wire_stan)
        except NotSent as exc:
            if exc.reason.startswith(CANNOT_ENCODE):
                # it never will be: parked at once, visible, with the reason
                await self.journal.sf_park(entry.id, str(exc), sent=False)
                self.counters["parked"] += 1
                log.error("%s %d for %s parked: %s", entry.kind, entry.id, acquirer, exc)
                await self.refresh()
                return
            problem = str(exc)
            written = False
            self.counters["not_sent"] += 1
        except OutcomeUnknown as exc:
            problem = str(exc)
        else:
            rc = reply.doc.get("39") or ""
            problem = None
            if not rc.strip() or rc in self.retry_codes:
                self.counters["retry_codes"] += 1
                problem = f"answered {rc or 'without a response code'}: not applied"
        if problem is not None:
            # (the exponent is capped: an acquirer down for hours runs up over
            # a thousand attempts, and 2.0 ** 1024 overflows a float)
            delay = min(self.backoff_min * (2.0 ** min(entry.attempts, 64)), self.backoff_max)
            # NotSent still counts toward max_attempts (and backs off), never toward repeats
            await self.journal.sf_retry(entry.id, time.time() + delay, problem, sent=written)
            self.counters["retries"] += 1
            await asyncio.sleep(delay)  # FIFO: the head goes again before anything behind it
            return
        # Any other answer acknowledges the reversal (00 reversed, 25
        # original not found: either way the acquirer now knows it must
        # not stand); ``retry_codes`` say it was not applied.
        await self.journal.sf_ack(entry.id)
        self.counters["advices_acknowledged" if advice else "acknowledged"] += 1
        self._depth[acquirer] = max(0, self._depth.get(acquirer, 1) - 1)
        log.info("%s %d acknowledged by %s (rc %s)", entry.kind, entry.id, acquirer, reply.doc.get("39"))
