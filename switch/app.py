"""The switch service: builds links, router, flow and listeners from a Config and runs them.

Start order: development PKI (if the config uses it), embedded simulators
(their real ports go into the acquirer configs), acquirer links, router,
listeners. Stop order (graceful): stop accepting, let in-flight requests
finish (up to shutdown_grace), then close links and simulators.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time

from switch import certs
from switch.acquirer import AcquirerLink
from switch.config import Config
from switch.flow import TransactionFlow
from switch.journal import make_journal, stan_block_range
from switch.keys import ensure_keys
from switch.listener import TerminalListener
from switch.reversal import ReversalQueue
from switch.router import Router

log = logging.getLogger("isoswitch")
_L_LATE_JOURNAL = "late response not journaled"


class Switch:
    def __init__(self, config: Config):
        self.config = config
        self.simulators: dict = {}
        self.links: dict[str, AcquirerLink] = {}
        self.listeners: list[TerminalListener] = []
        self.journal = None
        self.reversals: ReversalQueue | None = None
        self.recovered = 0
        self.router: Router | None = None
        self.flow: TransactionFlow | None = None
        self.pki = None
        self.late_responses = 0
        self.metrics = None
        self.api_runner = None
        self.webhooks = None
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._peer_recovery: asyncio.Task | None = None
        self.stan_block: int | None = None  # the trace-number block held on a shared journal

    async def start(self) -> "Switch":
        cfg = self.config
        cfg.switch.state_dir.mkdir(parents=True, exist_ok=True)
        keyring = await asyncio.to_thread(ensure_keys, cfg.security.key_file)
        self.journal = make_journal(cfg.journal, keyring)
        await self.journal.start()
        if cfg.journal.backend == "none":
            log.warning("journal backend 'none': nothing is durable (no crash recovery, no "
                        "replay after a restart); for measuring journal cost only")
        saf = cfg.store_and_forward
        self.reversals = ReversalQueue(self.journal, max_attempts=saf.max_attempts, max_age=saf.max_age_seconds,
                                       backoff_min=saf.backoff_min, backoff_max=saf.backoff_max,
                                       retry_codes=saf.retry_codes)
        if cfg.uses_dev_pki:
            self.pki = await asyncio.to_thread(certs.ensure_dev_pki, cfg.switch.state_dir)
        acquirers = list(cfg.acquirers)
        if cfg.simulators.embedded and cfg.simulators.acquirers:
            from switch.sim.acquirer import AcquirerSimulator

            for i, a in enumerate(acquirers):
                sim_cfg = next((s for s in cfg.simulators.acquirers if s.name == a.name), None)
                if sim_cfg is None:
                    continue
                ssl_ctx = None
                if a.tls:
                    pki = self.pki or certs.ensure_dev_pki(cfg.switch.state_dir)
                    ssl_ctx = certs.server_context(pki.acquirer_cert, pki.acquirer_key, None,
                                                   require_client_cert=False)
                sim = AcquirerSimulator(
                    name=a.name, port=sim_cfg.port, dialect=a.dialect, framing=a.framing,
                    tpdu=a.tpdu, max_frame=a.max_frame, ssl=ssl_ctx,
                    latency_ms=sim_cfg.latency_ms, approve_below=sim_cfg.approve_below,
                )
                await sim.start()
                self.simulators[a.name] = sim
                acquirers[i] = dataclasses.replace(a, port=sim.port, host="127.0.0.1")
        healths = {}
        for a in acquirers:
            ssl_ctx = certs.client_context(a.ca, a.cert, a.key) if a.tls else None
            link = AcquirerLink(a, ssl_context=ssl_ctx, on_late=self._on_late)
            self.links[a.name] = link
            healths[a.name] = link.health
        self.reversals.bind(self.links)
        await self._take_stan_block()
        self.router = Router(cfg.routing, healths)
        self.flow = TransactionFlow(self.router, self.links, self.reversals, self.journal)
        # DESIGN.md #7: whatever was forwarded without a journaled outcome
        # before this start (a crash) is reversed, exactly once.
        self.recovered = await self.journal.recover_and_enqueue()
        if self.recovered:
            # an advice's unknown outcome is repeated (x221), anything else reversed
            log.warning("crash recovery: %d store-and-forward %s queued for unknown outcomes (reversals, "
                        "and repeats of advices)", self.recovered, "entry" if self.recovered == 1 else "entries")
        for link in self.links.values():
            await link.start()
        await self.reversals.start()
        if cfg.journal.backend == "postgres":
            self._peer_recovery = asyncio.get_running_loop().create_task(
                self._recover_dead_peers(), name="journal-peer-recovery")
        if cfg.metrics.enabled or cfg.api.enabled:
            from switch.metrics import Metrics

            self.metrics = Metrics(self)
            self.metrics.instrument(self)
        for lc in cfg.listeners:
            ssl_ctx = None
            if lc.tls:
                ssl_ctx = certs.server_context(lc.cert, lc.key, lc.client_ca, crl=lc.crl)
            listener = TerminalListener(lc, self.flow, ssl_ctx)
            self.flow.register_listener(lc.name, listener.spec)
            await listener.start()
            self.listeners.append(listener)
        if cfg.api.enabled:
            from switch.api import ApiKeyStore, JournalTransactionStore, MemoryTransactionStore, start_api
            from switch.api.server import ApiSettings

            keys = ApiKeyStore(cfg.switch.state_dir / "api_keys.json")
            if cfg.api.webhook_url:
                from switch.api.webhooks import WebhookSender

                secret = cfg.api.webhook_secret_file.read_text().strip()
                # a receiver on a private CA is verified against it (TLS 1.2+),
                # else against the system's CAs
                hook_ssl = None if cfg.api.webhook_ca is None else certs.client_context(cfg.api.webhook_ca)
                self.webhooks = await WebhookSender(cfg.switch.state_dir / "webhooks.sqlite",
                                                    cfg.api.webhook_url, secret, ssl=hook_ssl,
                                                    metrics=self.metrics,
                                                    retention_s=cfg.api.webhook_retention_days * 86400.0
                                                    ).start()
            # API transactions and their (encrypted) cards survive a restart in the
            # journal; only the measuring-only "none" journal keeps them in memory
            store = (JournalTransactionStore(self.journal) if getattr(self.journal, "durable", True)
                     else MemoryTransactionStore())
            self.api_runner = await start_api(
                self, cfg.api, keys=keys, store=store, webhooks=self.webhooks, metrics=self.metrics,
                settings=ApiSettings(idempotency_window=cfg.api.idempotency_hours * 3600.0,
                                     request_timeout=cfg.api.request_timeout))
        # Start-up objects (specs, tables, certificates, modules) live forever:
        # keep them out of every later collection.
        gc.freeze()
        return self

    async def _take_stan_block(self) -> None:
        """Several switch processes on one PostgreSQL journal, each linked to
        the same acquirers: each assigns trace numbers (DE11) from a block of
        its own, so no two send the same number at once (a host's duplicate
        check, on DE11 and DE7, would refuse one of them as a repeat)."""
        blocks = self.config.journal.stan_blocks
        if self.config.journal.backend != "postgres" or blocks < 2 or not self.links:
            return
        block = await self.journal.claim_stan_block(blocks)
        if block is None:
            log.warning("trace numbers: all %d blocks are held by live switch processes on this journal; this "
                        "one assigns from the whole range, so two processes may send the same DE11 to an "
                        "acquirer at once (raise [journal] stan_blocks)", blocks)
            return
        lo, hi = stan_block_range(block, blocks)
        for link in self.links.values():
            link.set_stan_range(lo, hi)
        self.stan_block = block
        log.info("trace numbers: block %d of %d (%06d-%06d) on every acquirer link", block, blocks, lo, hi)

    def _on_late(self, acquirer: str, doc: dict) -> None:
        # DESIGN.md #5: a late response is counted and never reaches the
        # terminal; the reversal queued at the timeout still goes out.
        self.late_responses += 1
        task = asyncio.get_running_loop().create_task(self._journal_late(acquirer, doc))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _journal_late(self, acquirer: str, doc: dict) -> None:
        """Journal a late response. One the journal refuses is counted in the
        flow's counters (``late_journal_errors``, in the
        ``isoswitch_flow_events`` metric) and logged at a bounded rate: it was
        an unretrieved task exception before, logged whole or not at all."""
        try:
            await self.journal.record_late_response(acquirer, doc.get("11", ""), doc.get("39"), doc.get("t"))
        except Exception as exc:
            self.flow.counters["late_journal_errors"] += 1
            self.flow.log_limiter.error(_L_LATE_JOURNAL, "late response from %s not journaled (%s)", acquirer, exc)

    async def wait_links_up(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        for link in self.links.values():
            if not await link.wait_up(max(0.0, deadline - time.monotonic())):
                return False
        return True

    async def _recover_dead_peers(self) -> None:
        """DESIGN.md #7 for switch processes sharing a PostgreSQL journal.

        Start-up recovery takes over only the instances that are dead by
        then: a process restarted within ``stale_after`` of its crash (a new
        pid, so a new node) finds its previous life's heartbeat still fresh,
        and a process that is never restarted is found by no start-up at
        all. So every live process looks again each ``stale_after`` seconds:
        the dead instance's forwarded requests without an outcome are claimed
        (SKIP LOCKED) and marked in the same transaction as their queue
        entries, so each gets its reversal exactly once, whichever process
        finds it; the queue's senders pick the entries up as they poll.
        """
        period = max(1.0, self.journal.stale_after)
        while True:
            await asyncio.sleep(period)
            try:
                n = await self.journal.recover_and_enqueue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the journal is down: the next round tries again
                log.warning("recovery of stopped switch processes failed (%s); retried in %.0f s", exc, period)
                continue
            if n:
                self.recovered += n
                log.warning("recovery: %d store-and-forward %s queued for unknown outcomes of a switch "
                            "process that stopped", n, "entry" if n == 1 else "entries")
                await self.reversals.refresh()

    def reload_bin_table(self) -> None:
        self.router.reload_bins()
        log.info("BIN table reloaded")

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.config.switch.shutdown_grace if grace is None else grace
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        for lst in self.listeners:
            lst.stop_accepting()
        for lst in self.listeners:
            await lst.drain(grace)
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self._peer_recovery is not None:
            self._peer_recovery.cancel()
            await asyncio.gather(self._peer_recovery, return_exceptions=True)
        if self.reversals is not None:
            await self.reversals.stop()
        for link in self.links.values():
            await link.stop()
        for sim in self.simulators.values():
            await sim.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.journal is not None:
            await self.journal.close()
        self._stopped.set()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop(grace=1.0)
