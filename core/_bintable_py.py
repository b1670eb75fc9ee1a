"""BIN routing table, pure-Python twin of ``core._bintable``.

A table maps card-number prefixes ("BINs", 6 to 11 digits) and ranges of them
to a route record. It is built once (``from_csv`` / ``from_rows``) and never
changes afterwards; a reload builds a new table and the router swaps its
reference (see ``core.bintable.BinTableHolder``).

Entries
    ``low`` alone is a prefix; ``low``-``high`` is an inclusive range of
    prefixes with the same digit count (6..11). Leading zeros count as digits.
    A PAN matches an entry of ``n`` digits when its first ``n`` digits, read as
    a number, lie in ``[low, high]``.

Which entry wins (``lookup``)
    1. more digits wins (an 8-digit entry beats a 6-digit one; a range counts
       by the digit count of its bounds);
    2. among entries of the same digit count, the narrower range wins
       (``high - low`` smaller; a prefix is a range of width 0);
    3. among equally narrow overlapping ranges, the one with the lower
       ``low`` wins.
    The order of rows in the file never matters. Two rows with the same digit
    count, ``low`` and ``high`` are an error (``BinTableError`` naming the
    second line and the first).

Representation
    Every entry is scaled to 11-digit space (``low * 10**(11-n)`` ..
    ``(high+1) * 10**(11-n) - 1``) and the priority rules above are resolved
    once, at build time, by a sweep over the entry bounds. What remains is a
    step function: a sorted array of start points, each with the index of the
    record that holds from there to the next start (-1: no route). A lookup is
    one binary search on the PAN's first 11 digits. Route records are
    deduplicated, so a million rows sharing a few hundred routes store a few
    hundred ``BinRecord`` objects.

Card data
    ``lookup`` never raises for a bad PAN (not a str, not 12-19 ASCII digits):
    it returns None. The PAN is never stored, logged or put in an error.
    Error messages about CSV fields name the field and its digit count, never
    its value (a mistyped full PAN in a BIN file must not end up in a log).
"""
from __future__ import annotations

import csv
import heapq
import os
from array import array
from bisect import bisect_right
from typing import NamedTuple

MIN_DIGITS = 6
MAX_DIGITS = 11
MIN_PAN_DIGITS = 12
MAX_PAN_DIGITS = 19
CARD_TYPES = ("credit", "debit", "prepaid")
COLUMNS = ("low", "high", "route", "scheme", "country", "card_type", "issuer")
_REQUIRED = COLUMNS[:6]
# Lookup narrows its binary search to the steps that start within the PAN's
# 5-digit bucket of 11-digit space (see BinTable._bucket).
_BUCKETS = 100_000
_BUCKET_SPAN = 10 ** (MAX_DIGITS - 5)


class BinRecord(NamedTuple):
    """What a lookup returns: the route and what is known about the card range.

    ``prefix_len`` is the digit count of the entry that matched (6..11).
    """

    route: str
    scheme: str
    country: str
    card_type: str
    issuer: str | None
    prefix_len: int


class BinTableError(ValueError):
    """A bad BIN table row. ``line`` is the CSV line (1 = header) or, for
    ``from_rows``, the 1-based position of the row; ``msg`` says what is wrong.
    """

    def __init__(self, line: int, msg: str):
        super().__init__(line, msg)  # args = (line, msg): pickles cleanly
        self.line = line
        self.msg = msg

    def __str__(self) -> str:
        return f"line {self.line}: {self.msg}"


# --------------------------------------------------------------------------
# Helpers shared with the Cython implementation (cold paths: once per file,
# once per distinct route record, once per from_rows row). Sharing them keeps
# messages identical in both implementations by construction.


def _open_text(path_or_file):
    """(file, should_close) for a path or an already open text file."""
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        # utf-8-sig: a BOM written by a spreadsheet is not part of "low".
        return open(path_or_file, newline="", encoding="utf-8-sig"), True
    return path_or_file, False


def _column_indexes(header: list[str]) -> tuple[int, ...]:
    """Column positions of COLUMNS in this header; issuer may be absent (-1).

    Unknown columns are ignored, so a file may carry notes for humans.
    """
    names = [h.strip().lower() for h in header]
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    seen = set()
    for name in names:
        if name in COLUMNS:
            if name in seen:
                raise BinTableError(1, f"header repeats column {name}")
            seen.add(name)
    missing = [c for c in _REQUIRED if c not in seen]
    if missing:
        raise BinTableError(
            1,
            "header is missing column(s) " + ", ".join(missing)
            + "; expected " + ",".join(COLUMNS),
        )
    return tuple(names.index(c) if c in seen else -1 for c in COLUMNS)


def _digits_error(what: str, s: str) -> str | None:
    """Why the stripped field ``s`` is not a 6-11 digit BIN, or None."""
    if not s:
        return f"{what} is empty"
    if not (s.isascii() and s.isdigit()):
        return f"{what} must contain only digits 0-9"
    if not MIN_DIGITS <= len(s) <= MAX_DIGITS:
        return f"{what} has {len(s)} digits, expected {MIN_DIGITS} to {MAX_DIGITS}"
    return None


def _bounds_error(nlow: int, low: int, nhigh: int, high: int) -> str | None:
    if nhigh != nlow:
        return (
            f"high has {nhigh} digits and low has {nlow}; "
            "a range needs bounds with the same digit count"
        )
    if low > high:
        return "low is greater than high"
    return None


def _duplicate_msg(first_line: int) -> str:
    return f"duplicate entry: same digits and range as line {first_line}"


class _RecordCache:
    """Deduplicates route records; validates each distinct one once.

    Keyed by the raw (stripped) fields plus the digit count, so a million
    rows with a few hundred distinct routes validate a few hundred times.
    """

    __slots__ = ("by_raw", "by_record", "records")

    def __init__(self):
        self.by_raw: dict[tuple, int] = {}
        self.by_record: dict[BinRecord, int] = {}
        self.records: list[BinRecord] = []

    def index(self, line: int, key: tuple) -> int:
        idx = self.by_raw.get(key)
        if idx is not None:
            return idx
        route, scheme, country, card_type, issuer, n = key
        if not route:
            raise BinTableError(line, "route is empty")
        if not scheme:
            raise BinTableError(line, "scheme is empty")
        if not (
            (len(country) == 2 and country.isascii() and country.isalpha())
            or (len(country) == 3 and country.isascii() and country.isdigit())
        ):
            raise BinTableError(
                line, "country must be an ISO 3166 alpha-2 code or 3 digits"
            )
        card_type_norm = card_type.lower()
        if card_type_norm not in CARD_TYPES:
            raise BinTableError(
                line, "card_type must be one of " + ", ".join(CARD_TYPES)
            )
        rec = BinRecord(
            route, scheme, country.upper(), card_type_norm, issuer or None, n
        )
        idx = self.by_record.get(rec)
        if idx is None:
            idx = len(self.records)
            self.records.append(rec)
            self.by_record[rec] = idx
        self.by_raw[key] = idx
        return idx


_TUPLE_FIELDS = (6, 7)


def _row_fields(line: int, row) -> tuple[str, ...]:
    """One ``from_rows`` row (tuple/list or mapping) as 7 stripped strings."""
    if isinstance(row, dict):
        values = []
        for name in COLUMNS:
            if name in row:
                values.append(row[name])
            elif name in ("high", "issuer"):
                values.append(None)
            else:
                raise BinTableError(line, f"missing field {name}")
    elif isinstance(row, (tuple, list)):
        if len(row) not in _TUPLE_FIELDS:
            raise BinTableError(line, f"expected 6 or 7 fields, got {len(row)}")
        values = list(row)
        if len(values) == 6:
            values.append(None)
    else:
        raise BinTableError(
            line, f"a row must be a tuple, list or dict, not {type(row).__name__}"
        )
    out = []
    for name, value in zip(COLUMNS, values):
        if value is None and name in ("high", "issuer"):
            value = ""
        elif not isinstance(value, str):
            raise BinTableError(
                line, f"{name} must be a str, not {type(value).__name__}"
            )
        out.append(value.strip())
    return tuple(out)


# --------------------------------------------------------------------------


class _Builder:
    """Collects validated entries, then resolves priorities into a table."""

    __slots__ = ("cache", "n", "low", "high", "line", "rec")

    def __init__(self):
        self.cache = _RecordCache()
        self.n: list[int] = []
        self.low: list[int] = []
        self.high: list[int] = []
        self.line: list[int] = []
        self.rec: list[int] = []

    def add(self, line, low_s, high_s, route, scheme, country, card_type, issuer):
        err = _digits_error("low", low_s)
        if err:
            raise BinTableError(line, err)
        n = len(low_s)
        low = int(low_s)
        if high_s:
            err = _digits_error("high", high_s)
            if err:
                raise BinTableError(line, err)
            high = int(high_s)
            err = _bounds_error(n, low, len(high_s), high)
            if err:
                raise BinTableError(line, err)
        else:
            high = low
        rec = self.cache.index(line, (route, scheme, country, card_type, issuer, n))
        self.n.append(n)
        self.low.append(low)
        self.high.append(high)
        self.line.append(line)
        self.rec.append(rec)

    def build(self) -> "BinTable":
        count = len(self.n)
        ns, lows, highs, lines = self.n, self.low, self.high, self.line
        # Priority order: more digits, then narrower, then lower low; the line
        # only orders exact duplicates so the error names the earliest pair.
        order = sorted(
            range(count),
            key=lambda i: (-ns[i], highs[i] - lows[i], lows[i], lines[i]),
        )
        dup = None  # (second line, first line) with the smallest second line
        group_first = -1
        for k in range(1, count):
            a, b = order[k - 1], order[k]
            if ns[a] == ns[b] and lows[a] == lows[b] and highs[a] == highs[b]:
                if group_first < 0:
                    group_first = lines[a]
                    if dup is None or lines[b] < dup[0]:
                        dup = (lines[b], group_first)
            else:
                group_first = -1
        if dup is not None:
            raise BinTableError(dup[0], _duplicate_msg(dup[1]))

        # rank = position in priority order: smaller wins.
        lo11 = [0] * count
        hi11 = [0] * count
        rec = [0] * count
        for rank, i in enumerate(order):
            scale = 10 ** (MAX_DIGITS - ns[i])
            lo11[rank] = lows[i] * scale
            hi11[rank] = (highs[i] + 1) * scale - 1
            rec[rank] = self.rec[i]
        by_lo = sorted(range(count), key=lo11.__getitem__)
        ends = sorted(h + 1 for h in hi11)

        starts = array("q")
        recs = array("i")
        heap: list[int] = []
        i = j = 0
        last = -1
        while i < count or j < count:
            if i < count and (j >= count or lo11[by_lo[i]] <= ends[j]):
                x = lo11[by_lo[i]]
            else:
                x = ends[j]
            while i < count and lo11[by_lo[i]] == x:
                heapq.heappush(heap, by_lo[i])
                i += 1
            while j < count and ends[j] == x:
                j += 1
            while heap and hi11[heap[0]] < x:
                heapq.heappop(heap)
            cur = rec[heap[0]] if heap else -1
            if cur != last:
                starts.append(x)
                recs.append(cur)
                last = cur
        return BinTable._create(starts, recs, self.cache.records, count)


class BinTable:
    """Immutable BIN routing table. Build with ``from_csv`` or ``from_rows``."""

    __slots__ = ("_starts", "_recs", "_bucket", "_records", "_entries")

    def __init__(self):
        raise TypeError("use BinTable.from_csv() or BinTable.from_rows()")

    @classmethod
    def _create(cls, starts, recs, records, entries):
        self = object.__new__(cls)
        self._starts = starts
        self._recs = recs
        # _bucket[b] = first step whose start >= b * _BUCKET_SPAN
        bucket = array("i", bytes(4 * (_BUCKETS + 1)))
        b = 0
        for j, start in enumerate(starts):
            while b * _BUCKET_SPAN <= start:  # start falls in bucket b or later
                bucket[b] = j
                b += 1
        while b <= _BUCKETS:
            bucket[b] = len(starts)
            b += 1
        self._bucket = bucket
        self._records = tuple(records)
        self._entries = entries
        return self

    @classmethod
    def from_csv(cls, path_or_file) -> "BinTable":
        """Build from a CSV path or open text file.

        Header ``low,high,route,scheme,country,card_type,issuer`` (any column
        order; issuer optional; unknown columns ignored). Empty ``high`` means
        a prefix. Blank lines are skipped. Raises ``BinTableError`` for the
        first bad line, OSError if the file cannot be read.
        """
        f, should_close = _open_text(path_or_file)
        try:
            reader = csv.reader(f)
            header = None
            for header in reader:
                if header:
                    break
            if not header:
                raise BinTableError(1, "no header row; expected " + ",".join(COLUMNS))
            i_low, i_high, i_route, i_scheme, i_country, i_card, i_issuer = (
                _column_indexes(header)
            )
            ncols = len(header)
            builder = _Builder()
            add = builder.add
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) != ncols:
                    raise BinTableError(line, f"expected {ncols} fields, got {len(row)}")
                add(
                    line,
                    row[i_low].strip(),
                    row[i_high].strip(),
                    row[i_route].strip(),
                    row[i_scheme].strip(),
                    row[i_country].strip(),
                    row[i_card].strip(),
                    row[i_issuer].strip() if i_issuer >= 0 else "",
                )
        finally:
            if should_close:
                f.close()
        return builder.build()

    @classmethod
    def from_rows(cls, rows) -> "BinTable":
        """Build from an iterable of tuples ``(low, high, route, scheme,
        country, card_type[, issuer])`` or dicts with those keys (``high`` and
        ``issuer`` may be None or missing). Fields are str; ``BinTableError.line``
        is the 1-based position of the bad row.
        """
        builder = _Builder()
        for line, row in enumerate(rows, 1):
            builder.add(line, *_row_fields(line, row))
        return builder.build()

    def lookup(self, pan) -> BinRecord | None:
        """The record of the best entry for ``pan``, or None.

        ``pan`` must be a str of 12 to 19 ASCII digits; anything else returns
        None. Never raises for a bad PAN.
        """
        if not isinstance(pan, str) or not MIN_PAN_DIGITS <= len(pan) <= MAX_PAN_DIGITS:
            return None
        if not (pan.isascii() and pan.isdigit()):
            return None
        v = int(pan[:MAX_DIGITS])
        b = v // _BUCKET_SPAN
        i = bisect_right(self._starts, v, self._bucket[b], self._bucket[b + 1]) - 1
        if i < 0:
            return None
        r = self._recs[i]
        return None if r < 0 else self._records[r]

    def __len__(self) -> int:
        return self._entries

    @property
    def record_count(self) -> int:
        """Distinct route records."""
        return len(self._records)

    @property
    def segment_count(self) -> int:
        """Steps in the resolved lookup array."""
        return len(self._starts)

    @property
    def nbytes(self) -> int:
        """Bytes held by the lookup arrays (8-byte starts, 4-byte record ids,
        a 4-byte bucket index entry per 5-digit prefix)."""
        return len(self._starts) * 12 + (_BUCKETS + 1) * 4

    @property
    def records(self) -> tuple[BinRecord, ...]:
        """The distinct route records, in order of first appearance."""
        return self._records

    def __repr__(self) -> str:
        return (
            f"<BinTable entries={self._entries} records={len(self._records)} "
            f"segments={len(self._starts)}>"
        )
