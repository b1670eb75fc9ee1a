"""Property-based run of the OpenAPI document against the live API (schemathesis 4).

A real switch with simulators and the API (HTTPS, dev PKI) run on a
background event loop; schemathesis generates requests for every operation
from switch/api/openapi.json and checks each response: no 5xx, a documented
status code and content type, documented headers present, and a body that
conforms to the response schema.
"""
from __future__ import annotations

import time
import uuid

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from switch.api.server import OPENAPI_PATH  # noqa: E402
from tests.test_api import ApiThread  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


def test_openapi_document_is_valid_and_covers_every_route(tmp_path):
    import json

    from aiohttp import web

    from switch.api import ApiKeyStore, make_app

    doc = json.loads(OPENAPI_PATH.read_text())
    app = make_app(None, keys=ApiKeyStore())
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and isinstance(r.resource, (web.PlainResource, web.DynamicResource))}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    schema = schemathesis.openapi.from_path(OPENAPI_PATH)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) == len(documented)


def test_schemathesis_no_5xx_and_conforming_responses(tmp_path):
    schema = schemathesis.openapi.from_path(OPENAPI_PATH)

    @schema.transport.serializer("text/csv")
    def _csv(ctx, value):  # the BIN table body is CSV text
        return {"data": value.encode("utf-8") if isinstance(value, str) else value}

    failures = []
    started = time.monotonic()
    with ApiThread(tmp_path) as api:
        ca = str(tmp_path / "state" / "pki" / "ca.crt")
        session = requests.Session()
        session.verify = ca
        headers = {"Authorization": f"Bearer {api.keys['both']}"}
        counts = {}
        def make_runner(op, **fixed):
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(**fixed))
            def run_case(case):
                case.headers = {**(case.headers or {}), **headers}
                response = case.call(base_url=api.url, session=session, timeout=15, verify=ca)
                counts[op.label] = counts.get(op.label, 0) + 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as e:  # collect every operation's failures, report together
                    failures.append(f"{op.label}: {e}")
                    raise
            return run_case

        def real_payment(kind: str) -> str:
            from tests.test_api import payment

            r = session.post(f"{api.url}/v1/payments", json=payment(type=kind), verify=ca,
                             headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
            assert r.status_code == 201, r.text
            return r.json()["id"]

        for result in schema.get_all_operations():
            op = result.ok()
            runs = [{}]
            if "{id}" in op.path and not op.path.startswith("/v1/admin/"):
                # random ids only ever find nothing: also aim at real transactions
                runs.append({"path_parameters": {"id": real_payment("authorization")}})
                runs.append({"path_parameters": {"id": real_payment("purchase")}})
            for fixed in runs:
                try:
                    make_runner(op, **fixed)()
                except Exception as e:
                    if not failures or not failures[-1].startswith(op.label):
                        failures.append(f"{op.label}: {type(e).__name__}: {e}")
        assert not failures, "\n\n".join(failures[:5])
        assert all(counts.get(r.ok().label, 0) >= 1 for r in schema.get_all_operations()), counts
        assert sum(counts.values()) >= 10 * len(counts), counts
        # the payments the generator made went through the switch
        assert len(api.store) > 0
    assert time.monotonic() - started < 150
