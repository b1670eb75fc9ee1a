"""`[api]` in the config starts the REST shim, metrics and signed webhooks with the switch."""
import asyncio
import json
import ssl
import subprocess
import sys

from aiohttp import ClientSession, TCPConnector, web

from switch import certs
from switch.api.server import bound_port
from switch.api.webhooks import verify_signature
from switch.messages import TEST_PAN
from tests.switch_harness import run, running_switch


def test_config_starts_api_and_signed_webhooks(tmp_path):
    secret = "s3cret-s3cret-s3cret"
    (tmp_path / "hook.secret").write_text(secret)
    events = []

    async def hook(request):
        raw = await request.read()
        assert verify_signature(secret, request.headers.get("X-Isoswitch-Signature"), raw, tolerance_s=300)
        events.append(json.loads(raw))
        return web.Response(status=204)

    async def go():
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        hook_port = site._server.sockets[0].getsockname()[1]
        api = f"""
        [api]
        enabled = true
        port = 0
        webhook_url = "http://127.0.0.1:{hook_port}/hook"
        webhook_secret_file = "{tmp_path / 'hook.secret'}"
        """
        try:
            (tmp_path / "state").mkdir(exist_ok=True)
            key = subprocess.run([sys.executable, "-m", "switch.api.auth", "create", "--file",
                                  str(tmp_path / "state" / "api_keys.json"), "--name", "t", "--scopes",
                                  "payments"], capture_output=True, text=True, check=True).stdout.split()[-1]
            async with running_switch(tmp_path, {"acq-a": {}}, routing=api) as sw:
                port = bound_port(sw.api_runner)
                ctx = ssl.create_default_context(cafile=str(certs.dev_pki_paths(tmp_path / "state").ca_cert))
                async with ClientSession(connector=TCPConnector(ssl=ctx)) as s:
                    r = await s.post(f"https://localhost:{port}/v1/payments",
                                     json={"pan": TEST_PAN, "expiry": "2912", "amount": 1234,
                                           "currency": "USD", "type": "purchase"},
                                     headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "o-1"})
                    body = await r.json()
                    assert r.status == 201 and body["approved"] and body["masked_pan"] == "476173******0010"
                    m = await (await s.get(f"https://localhost:{port}/metrics")).text()
                    assert "isoswitch_transactions_total" in m and TEST_PAN not in m
                for _ in range(100):
                    if events:
                        break
                    await asyncio.sleep(0.05)
                assert events and events[0]["data"]["amount"] == 1234
                assert TEST_PAN not in json.dumps(events)
        finally:
            await runner.cleanup()

    run(go())
