"""REST shim for the switch: payments, transactions, admin, webhooks, dashboard.

``make_app`` builds the aiohttp application; ``start_api`` serves it (HTTPS)
in the switch's own event loop. See switch/api/openapi.json for the API.
"""
from switch.api.auth import ApiKey, ApiKeyError, ApiKeyStore
from switch.api.server import (
    ApiSettings,
    JournalTransactionStore,
    MemoryTransactionStore,
    TransactionStore,
    bound_port,
    make_app,
    start_api,
)
from switch.api.webhooks import WebhookSender, verify_signature

__all__ = [
    "ApiKey", "ApiKeyError", "ApiKeyStore", "ApiSettings", "JournalTransactionStore", "MemoryTransactionStore",
    "TransactionStore",
    "WebhookSender", "bound_port", "make_app", "start_api", "verify_signature",
]
