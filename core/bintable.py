"""BIN routing table (public selector) and the holder the router swaps.

See core/_bintable_py.py for the matching rules (longest prefix, then the
narrower range, then the lower ``low``), the CSV format and the error rules;
the Cython extension core._bintable behaves identically.
"""
from __future__ import annotations

import threading

from core import _select

_impl = _select.load("bintable")
IMPLEMENTATION = _select.implementation(_impl)

BinTable = _impl.BinTable
BinRecord = _impl.BinRecord
BinTableError = _impl.BinTableError
COLUMNS = _impl.COLUMNS
CARD_TYPES = _impl.CARD_TYPES
MIN_DIGITS = _impl.MIN_DIGITS
MAX_DIGITS = _impl.MAX_DIGITS
MIN_PAN_DIGITS = _impl.MIN_PAN_DIGITS
MAX_PAN_DIGITS = _impl.MAX_PAN_DIGITS


class BinTableHolder:
    """The router's reference to the current BIN table, swapped atomically.

    Tables are immutable, so readers take no lock: ``holder.table`` is one
    attribute read, and a lookup in flight keeps using whichever table it
    got even if a reload swaps in another one meanwhile. Writers
    (``swap``/``reload_from_csv``) are serialised by a lock so two reloads
    cannot interleave; a reload builds the new table completely before the
    swap, so a bad file raises and leaves the old table in place.

    ``table_cls`` is the BinTable class used by ``reload_from_csv`` (default:
    the selected implementation; the bench passes each one explicitly).
    """

    __slots__ = ("_table", "_lock", "_table_cls", "generation")

    def __init__(self, table=None, *, table_cls=None):
        self._table_cls = table_cls if table_cls is not None else BinTable
        if table is None:
            table = self._table_cls.from_rows(())
        self._check(table)
        self._table = table
        self._lock = threading.Lock()
        self.generation = 0  # swaps so far; handy for metrics and logs

    @staticmethod
    def _check(table):
        if not callable(getattr(table, "lookup", None)):
            raise TypeError(f"expected a BinTable, not {type(table).__name__}")

    @property
    def table(self):
        """The current table (immutable; safe to keep for one lookup)."""
        return self._table

    def lookup(self, pan):
        """``self.table.lookup(pan)``: one read of the current table."""
        return self._table.lookup(pan)

    def swap(self, new_table):
        """Make ``new_table`` current and return the previous table."""
        self._check(new_table)
        with self._lock:
            old = self._table
            self._table = new_table
            self.generation += 1
        return old

    def reload_from_csv(self, path_or_file):
        """Build a table from CSV, then swap it in; return the old table.

        Raises BinTableError (or OSError) and keeps the current table if the
        file is bad. The build runs outside the lock: readers are never
        blocked, and only the swap itself is serialised.
        """
        new_table = self._table_cls.from_csv(path_or_file)
        return self.swap(new_table)


__all__ = [
    "IMPLEMENTATION",
    "BinTable",
    "BinRecord",
    "BinTableError",
    "BinTableHolder",
    "COLUMNS",
    "CARD_TYPES",
    "MIN_DIGITS",
    "MAX_DIGITS",
    "MIN_PAN_DIGITS",
    "MAX_PAN_DIGITS",
]
