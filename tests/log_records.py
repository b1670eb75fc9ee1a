"""A logging handler for tests that keeps every record, and each as the switch's JSON line."""
from __future__ import annotations

import logging

from switch.logs import JsonFormatter


class Records(logging.Handler):
    """Keeps every record that reaches it, and each as the switch's JSON log line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.fmt = JsonFormatter()

    def emit(self, record):
        self.records.append(record)
        self.lines.append(self.fmt.format(record))

    def messages(self, name: str | None = None) -> list[str]:
        """The records' messages, those of logger ``name`` only when given."""
        return [r.getMessage() for r in self.records if name is None or r.name == name]
