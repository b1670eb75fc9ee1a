"""BIN table: matching rules, CSV errors, bad PANs, differential tests, holder."""
import io
import pickle
import threading

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from core import bintable
from tests.conftest import _impls

IMPLS = _impls("bintable")
HEADER = "low,high,route,scheme,country,card_type,issuer\n"


def row(low, high="", route="r", scheme="visa", country="US", card_type="credit", issuer=""):
    return (low, high, route, scheme, country, card_type, issuer)


def csv_text(*lines):
    return io.StringIO(HEADER + "".join(line + "\n" for line in lines))


def pan(prefix, length=16):
    return (prefix + "0" * length)[:length]


# -- matching rules -----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_longest_prefix_wins(impl):
    t = impl.BinTable.from_rows([
        row("400000", route="six"),
        row("40000012", route="eight"),
        row("4000001234", route="ten"),
    ])
    assert t.lookup(pan("4000001234")).route == "ten"
    assert t.lookup(pan("4000001234")).prefix_len == 10
    assert t.lookup(pan("4000001299")).route == "eight"
    assert t.lookup(pan("4000001299")).prefix_len == 8
    assert t.lookup(pan("4000009")).route == "six"
    assert t.lookup(pan("400001")) is None
    assert len(t) == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_range_counts_by_its_digit_count(impl):
    t = impl.BinTable.from_rows([
        row("40000000", "49999999", route="wide8"),
        row("453998", route="six"),
    ])
    # the 8-digit range beats the 6-digit prefix even though it is wider
    assert t.lookup(pan("45399812")).route == "wide8"
    assert t.lookup(pan("39999999")) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_range_boundaries(impl):
    t = impl.BinTable.from_rows([row("45399800000", "45399899999", route="r11")])
    assert t.lookup(pan("45399800000")).route == "r11"  # low
    assert t.lookup(pan("45399899999")).route == "r11"  # high
    assert t.lookup(pan("45399799999")) is None  # low - 1
    assert t.lookup(pan("45399900000")) is None  # high + 1
    assert t.lookup("4539989999999999999").route == "r11"  # 19 digits


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_boundaries_in_eleven_digit_space(impl):
    t = impl.BinTable.from_rows([row("123456", route="p"), row("123458", "123460", route="r")])
    assert t.lookup("123456000000").route == "p"
    assert t.lookup("123456999999").route == "p"
    assert t.lookup("123455999999") is None
    assert t.lookup("123457000000") is None
    assert t.lookup("123458000000").route == "r"
    assert t.lookup("123460999999").route == "r"
    assert t.lookup("123461000000") is None


@pytest.mark.parametrize("impl", IMPLS)
def test_overlapping_ranges_narrower_wins_then_lower_low(impl):
    t = impl.BinTable.from_rows([
        row("400000", "499999", route="wide"),
        row("450000", "459999", route="narrow"),
        row("452000", "452009", route="a10"),  # same width as b10, lower low
        row("452005", "452014", route="b10"),
    ])
    assert t.lookup(pan("410000")).route == "wide"
    assert t.lookup(pan("451000")).route == "narrow"
    assert t.lookup(pan("452004")).route == "a10"
    assert t.lookup(pan("452007")).route == "a10"  # overlap: lower low wins
    assert t.lookup(pan("452012")).route == "b10"
    assert t.lookup(pan("452015")).route == "narrow"
    assert t.lookup(pan("460000")).route == "wide"


@pytest.mark.parametrize("impl", IMPLS)
def test_row_order_does_not_matter(impl):
    rows = [
        row("400000", "499999", route="wide"),
        row("452000", "452009", route="a10"),
        row("452005", "452014", route="b10"),
        row("45200712", route="eight"),
    ]
    a = impl.BinTable.from_rows(rows)
    b = impl.BinTable.from_rows(rows[::-1])
    for p in ("4520000000000000", "4520070000000000", "4520071200000000", "4520130000000000"):
        assert a.lookup(p) == b.lookup(p)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_zeros_are_digits(impl):
    t = impl.BinTable.from_rows([row("000001", route="zero6"), row("0000012", route="zero7")])
    assert t.lookup("0000010000000").route == "zero6"
    assert t.lookup("0000012000000").route == "zero7"
    assert t.lookup("0000020000000") is None


@pytest.mark.parametrize("impl", IMPLS)
def test_records_deduplicated_and_normalised(impl):
    t = impl.BinTable.from_rows([
        row("400000", route="a", country="gb", card_type="Debit", issuer="Bank"),
        row("400001", route="a", country="GB", card_type="debit", issuer="Bank"),
        row("400002", route="a", country="826", card_type="prepaid"),
        {"low": "400003", "route": "a", "scheme": "visa", "country": "826", "card_type": "prepaid"},
    ])
    r0 = t.lookup(pan("400000"))
    assert r0 == impl.BinRecord("a", "visa", "GB", "debit", "Bank", 6)
    assert t.lookup(pan("400001")) is r0
    r2 = t.lookup(pan("400002"))
    assert r2.issuer is None and r2.country == "826"
    assert t.lookup(pan("400003")) is r2
    assert t.record_count == 2
    assert t.records == (r0, r2)
    with pytest.raises(AttributeError):
        r0.route = "b"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_table(impl):
    t = impl.BinTable.from_rows([])
    assert len(t) == 0 and t.lookup(pan("400000")) is None
    t = impl.BinTable.from_csv(io.StringIO(HEADER))
    assert len(t) == 0 and t.lookup(pan("400000")) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_values(impl):
    t = impl.BinTable.from_rows([row("99999999999", route="top"), row("000000", "999999", route="all")])
    assert t.lookup("9999999999999999999").route == "top"
    assert t.lookup("9999999999899999999").route == "all"
    assert t.lookup("000000000000").route == "all"


@pytest.mark.parametrize("impl", IMPLS)
def test_not_constructible_directly(impl):
    with pytest.raises(TypeError):
        impl.BinTable()


# -- bad PANs ---------------------------------------------------------------------

BAD_PANS = [
    None, 4000001234567890, b"4000001234567890", bytearray(b"4000001234567890"),
    "", "40000012345", "40000012345678901234", "4000 0012 3456 7890",
    "4000001234567890\n", " 4000001234567890", "400000123456789x", "-400000123456789",
    "+400000123456789", "4000001234567\u0660890", "\uff14000001234567890",
    "4000001234567\x00890", "40000012345\U0001d7ce7890", 4.0, [], object(),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", BAD_PANS, ids=range(len(BAD_PANS)))
def test_bad_pans_return_none(impl, bad):
    t = impl.BinTable.from_rows([row("000000", "999999", route="all")])
    assert t.lookup(bad) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_pan_lengths(impl):
    t = impl.BinTable.from_rows([row("000000", "999999", route="all")])
    for n in range(0, 25):
        assert (t.lookup("4" * n) is not None) == (12 <= n <= 19)


@pytest.mark.parametrize("impl", IMPLS)
def test_str_subclass_pan(impl):
    class S(str):
        pass

    t = impl.BinTable.from_rows([row("400000", route="a")])
    assert t.lookup(S(pan("400000"))).route == "a"


# -- CSV loading and errors ---------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_from_csv_path_and_file(impl, tmp_path):
    text = "\ufeff" + HEADER + "400000,,visa_a,visa,US,credit,\n\n 45399800000 , 45399899999 ,r11,visa,NL,debit,ING\n"
    path = tmp_path / "bins.csv"
    path.write_text(text, encoding="utf-8")
    for source in (path, str(path), io.StringIO(text.lstrip("\ufeff"))):
        t = impl.BinTable.from_csv(source)
        assert len(t) == 2
        assert t.lookup(pan("400000")).route == "visa_a"
        assert t.lookup(pan("45399850")) == impl.BinRecord("r11", "visa", "NL", "debit", "ING", 11)


@pytest.mark.parametrize("impl", IMPLS)
def test_header_any_order_issuer_optional_extra_ignored(impl):
    f = io.StringIO("route,scheme,country,card_type,low,high,note\nr,mc,US,debit,510000,,hello\n")
    t = impl.BinTable.from_csv(f)
    assert t.lookup(pan("510000")) == impl.BinRecord("r", "mc", "US", "debit", None, 6)


BAD_LINES = [
    ("40000a,,r,visa,US,credit,", 2, "low must contain only digits 0-9"),
    ("40000,,r,visa,US,credit,", 2, "low has 5 digits, expected 6 to 11"),
    ("400000123456,,r,visa,US,credit,", 2, "low has 12 digits, expected 6 to 11"),
    (",,r,visa,US,credit,", 2, "low is empty"),
    ("\u0664\u0660\u0660\u0660\u0660\u0660,,r,visa,US,credit,", 2, "low must contain only digits 0-9"),
    ("400000,4000001,r,visa,US,credit,", 2,
     "high has 7 digits and low has 6; a range needs bounds with the same digit count"),
    ("400009,400000,r,visa,US,credit,", 2, "low is greater than high"),
    ("400000,40000x,r,visa,US,credit,", 2, "high must contain only digits 0-9"),
    ("400000,,r,visa,US,credit", 2, "expected 7 fields, got 6"),
    ("400000,,,visa,US,credit,", 2, "route is empty"),
    ("400000,,r,,US,credit,", 2, "scheme is empty"),
    ("400000,,r,visa,USA,credit,", 2, "country must be an ISO 3166 alpha-2 code or 3 digits"),
    ("400000,,r,visa,US,charge,", 2, "card_type must be one of credit, debit, prepaid"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("line,lineno,msg", BAD_LINES, ids=range(len(BAD_LINES)))
def test_bad_csv_line(impl, line, lineno, msg):
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(csv_text(line))
    assert (ei.value.line, ei.value.msg) == (lineno, msg)
    assert str(ei.value) == f"line {lineno}: {msg}"
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_line_number_counts_header_and_blank_lines(impl):
    f = csv_text("400000,,r,visa,US,credit,", "", "400001,,r,visa,US,credit,", "4x0002,,r,visa,US,credit,")
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(f)
    assert ei.value.line == 5


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_never_echo_field_values(impl):
    full_pan = "4111111111111111"
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(csv_text(f"{full_pan},,r,visa,US,credit,"))
    assert full_pan not in str(ei.value) and full_pan not in repr(ei.value)
    assert "16 digits" in ei.value.msg


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates_name_both_lines(impl):
    f = csv_text(
        "400000,499999,a,visa,US,credit,",
        "510000,,b,mc,US,debit,",
        "400000,499999,c,visa,US,credit,",  # line 4 duplicates line 2
        "510000,,d,mc,US,debit,",  # line 5 duplicates line 3
        "400000,499999,e,visa,US,credit,",
    )
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(f)
    assert (ei.value.line, ei.value.msg) == (4, "duplicate entry: same digits and range as line 2")
    # same digits, different digit count: not a duplicate
    t = impl.BinTable.from_rows([row("400000"), row("4000000")])
    assert len(t) == 2
    # a prefix equals the range low-low
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_rows([row("400000"), row("400000", "400000")])
    assert ei.value.line == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_row_errors_come_before_duplicates(impl):
    f = csv_text("400000,,a,visa,US,credit,", "400000,,a,visa,US,credit,", "4000,,a,visa,US,credit,")
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(f)
    assert ei.value.line == 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text,msg", [
    ("", "no header row; expected low,high,route,scheme,country,card_type,issuer"),
    ("low,route,scheme,country,card_type\n", "header is missing column(s) high; expected low,high,route,scheme,country,card_type,issuer"),
    ("low,high,low,route,scheme,country,card_type\n", "header repeats column low"),
])
def test_bad_header(impl, text, msg):
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_csv(io.StringIO(text))
    assert (ei.value.line, ei.value.msg) == (1, msg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,line,msg", [
    ([row("400000"), ("400001", "")], 2, "expected 6 or 7 fields, got 2"),
    ([row("400000"), 42], 2, "a row must be a tuple, list or dict, not int"),
    ([{"low": "400000", "route": "r", "scheme": "v", "country": "US"}], 1, "missing field card_type"),
    ([(400000, None, "r", "visa", "US", "credit")], 1, "low must be a str, not int"),
    ([("400000", None, "r", "visa", None, "credit")], 1, "country must be a str, not NoneType"),
])
def test_from_rows_errors(impl, rows, line, msg):
    with pytest.raises(impl.BinTableError) as ei:
        impl.BinTable.from_rows(rows)
    assert (ei.value.line, ei.value.msg) == (line, msg)


def test_error_pickles():
    e = bintable.BinTableError(7, "low is empty")
    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.line, e2.msg, str(e2)) == (type(e), 7, "low is empty", "line 7: low is empty")


def test_public_module_reexports():
    assert bintable.IMPLEMENTATION in ("cython", "python")
    t = bintable.BinTable.from_rows([row("400000")])
    assert isinstance(t.lookup(pan("400000")), bintable.BinRecord)


# -- differential: Cython == Python == brute force -------------------------------


def reference_lookup(rows, p):
    """Brute force over the documented rules."""
    if not isinstance(p, str) or not 12 <= len(p) <= 19 or not (p.isascii() and p.isdigit()):
        return None
    best = None
    for r in rows:
        low, high = r[0], r[1] or r[0]
        n = len(low)
        if int(low) <= int(p[:n]) <= int(high):
            key = (-n, int(high) - int(low), int(low))
            if best is None or key < best[0]:
                best = (key, r)
    if best is None:
        return None
    r = best[1]
    return (r[2], r[3], r[4].upper(), r[5].lower(), r[6] or None, len(r[0]))


# Entries concentrated on a few leading digits so that ranges of all digit
# counts overlap each other and the PANs hit them.
BASES = ["45399812345", "45399899999", "45390000000", "40000000000", "99999999999", "00000000000"]


@st.composite
def entries(draw):
    n = draw(st.integers(6, 11))
    v = int(draw(st.sampled_from(BASES))[:n]) + draw(st.integers(-3, 3))
    v = min(max(v, 0), 10**n - 1)
    low = str(v).zfill(n)
    if draw(st.booleans()):
        return (low, "")
    width = draw(st.integers(0, 10 ** draw(st.integers(0, n - 2))))
    high = str(min(v + width, 10**n - 1)).zfill(n)
    return (low, high)


@st.composite
def tables(draw):
    keys = draw(st.lists(entries(), max_size=25, unique_by=lambda e: (e[0], e[1] or e[0])))
    out = []
    for i, (low, high) in enumerate(keys):
        out.append((low, high, f"route{draw(st.integers(0, 3))}", "visa", draw(st.sampled_from(["US", "gb", "840"])),
                    draw(st.sampled_from(["credit", "Debit", "prepaid"])), draw(st.sampled_from(["", "Bank"]))))
    return out


def pans_for(rows):
    pans = st.text("0123456789", min_size=12, max_size=19)
    near = []
    for r in rows:
        for b in (r[0], r[1] or r[0]):
            v = int(b)
            for d in (-1, 0, 1):
                if 0 <= v + d < 10 ** len(b):
                    near.append(str(v + d).zfill(len(b)))
    if near:
        pans = pans | st.builds(
            lambda b, tail: (b + tail)[:19], st.sampled_from(near), st.text("0123456789", min_size=12, max_size=13)
        )
    near_bases = st.builds(
        lambda b, d, tail: str(min(max(int(b) + d, 0), 10**11 - 1)).zfill(11) + tail,
        st.sampled_from(BASES), st.integers(-10**6, 10**6), st.text("0123456789", min_size=1, max_size=8),
    )
    return pans | near_bases | near_bases | st.sampled_from(["4539", "45399800000x0000", "4" * 20])


def as_tuple(rec):
    return None if rec is None else tuple(rec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rows=tables())
def test_differential_against_reference(data, rows):
    impls = [p.values[0] for p in IMPLS]
    built = [m.BinTable.from_rows(rows) for m in impls]
    segs = {t.segment_count for t in built}
    assert len(segs) == 1
    ps = data.draw(st.lists(pans_for(rows), min_size=1, max_size=40))
    for p in ps:
        want = reference_lookup(rows, p)
        for t in built:
            assert as_tuple(t.lookup(p)) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.text("0123456789x ", max_size=13), st.text("0123456789 ", max_size=12),
    st.sampled_from(["r", ""]), st.sampled_from(["visa", ""]),
    st.sampled_from(["US", "us", "840", "U", "8400"]), st.sampled_from(["credit", "DEBIT", "x"]),
), max_size=8))
def test_differential_errors(rows):
    """Both implementations accept or reject the same input, with the same error."""
    outcomes = []
    for m in [p.values[0] for p in IMPLS]:
        try:
            t = m.BinTable.from_rows(rows)
            outcomes.append(("ok", len(t), t.segment_count, t.records))
        except m.BinTableError as e:
            outcomes.append(("err", e.line, e.msg))
    assert all(o == outcomes[0] for o in outcomes)


# -- holder -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_holder_swap_and_reload(impl, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "400000,,new,visa,US,credit,\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "400000,,new,visa,US,credit,\n4000,,x,visa,US,credit,\n")

    first = impl.BinTable.from_rows([row("400000", route="old")])
    holder = bintable.BinTableHolder(first, table_cls=impl.BinTable)
    got = holder.table  # an in-flight lookup holds this reference
    assert holder.lookup(pan("400000")).route == "old"

    with pytest.raises(impl.BinTableError) as ei:
        holder.reload_from_csv(bad)
    assert ei.value.line == 3
    assert holder.table is first and holder.generation == 0
    with pytest.raises(FileNotFoundError):
        holder.reload_from_csv(tmp_path / "missing.csv")
    assert holder.table is first

    old = holder.reload_from_csv(good)
    assert old is first and holder.generation == 1
    assert holder.lookup(pan("400000")).route == "new"
    assert got.lookup(pan("400000")).route == "old"  # the old table still works

    assert holder.swap(first).lookup(pan("400000")).route == "new"
    assert holder.table is first
    with pytest.raises(TypeError):
        holder.swap("not a table")


def test_holder_default_is_empty_table():
    holder = bintable.BinTableHolder()
    assert len(holder.table) == 0 and holder.lookup(pan("400000")) is None


def test_holder_concurrent_reads_during_swaps():
    a = bintable.BinTable.from_rows([row("400000", route="a")])
    b = bintable.BinTable.from_rows([row("400000", route="b")])
    holder = bintable.BinTableHolder(a)
    stop = threading.Event()
    seen = set()

    def reader():
        while not stop.is_set():
            seen.add(holder.lookup(pan("400000")).route)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(2000):
        holder.swap(b if i % 2 == 0 else a)
    stop.set()
    for t in threads:
        t.join()
    assert seen <= {"a", "b"} and holder.generation == 2000
