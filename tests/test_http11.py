"""The HTTP/1.1 grammar module (:mod:`meetinity_gateway.http11`), alone.

Each check's verdict is compared with a reference regular expression built here, rule by rule,
from the ABNF of RFC 9110 / RFC 9112 (copied in the comments), independently of the module's
own patterns. Where the gateway is deliberately stricter than the ABNF (no BWS in chunk
extensions, at most 16 hexadecimal digits of chunk size, 18 decimal digits of length, one
Content-Length line), the reference says so. End-to-end, the same rules are checked for
requests (tests/test_server.py: 400) and for upstream responses (tests/test_wire.py,
tests/test_proxy_hostile.py: 502).
"""
from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meetinity_gateway import http11

PROPERTY = settings(max_examples=400, deadline=None, print_blob=True)

# -- the reference, from the ABNF -----------------------------------------------------------

# RFC 5234 B.1: ALPHA = %x41-5A / %x61-7A; DIGIT = %x30-39; HEXDIG = DIGIT / "A"-"F"
# (ABNF strings are case-insensitive: a-f too); VCHAR = %x21-7E; SP = %x20; HTAB = %x09.
ALPHA = "A-Za-z"
DIGIT = "0-9"
HEXDIG = "0-9A-Fa-f"
VCHAR = "\\x21-\\x7e"
# RFC 9110 §5.5: obs-text = %x80-FF
OBS_TEXT = "\\x80-\\xff"
# RFC 9110 §5.6.1: OWS = *( SP / HTAB )
OWS = "[ \\t]*"
# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#                          "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA;  token = 1*tchar
TCHAR = "[" + "".join(re.escape(c) for c in "!#$%&'*+-.^_`|~") + DIGIT + ALPHA + "]"
TOKEN = TCHAR + "+"
# RFC 9110 §5.5: field-value = *field-content
#   field-content = field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ]
#   field-vchar = VCHAR / obs-text
# (*field-content written as the same set without nested repetition, which a backtracking
# engine would take exponential time to refuse.)
FIELD_VCHAR = "[" + VCHAR + OBS_TEXT + "]"
FIELD_VALUE = "(?:" + FIELD_VCHAR + "(?:[ \\t" + VCHAR + OBS_TEXT + "]*" + FIELD_VCHAR + ")?)?"
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS; field-name = token
FIELD_LINE = "(" + TOKEN + "):" + OWS + "(" + FIELD_VALUE + ")" + OWS
# RFC 9112 §6.3 / RFC 9110 §8.6: Content-Length = 1*DIGIT (the gateway: at most 18 digits)
CONTENT_LENGTH = "[" + DIGIT + "]{1,18}"
# RFC 9110 §5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE
#   qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
#   quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
QDTEXT = "[\\t \\x21\\x23-\\x5b\\x5d-\\x7e" + OBS_TEXT + "]"
QUOTED_PAIR = "\\\\[\\t " + VCHAR + OBS_TEXT + "]"
QUOTED_STRING = '"(?:' + QDTEXT + "|" + QUOTED_PAIR + ')*"'
# RFC 9112 §7.1: chunk-size = 1*HEXDIG (the gateway: at most 16 digits)
#   chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
#   chunk-ext-name = token; chunk-ext-val = token / quoted-string
#   (the gateway: no BWS, as waitress and the stricter parsers)
CHUNK_EXT = "(?:;" + TOKEN + "(?:=(?:" + TOKEN + "|" + QUOTED_STRING + "))?)*"
CHUNK_SIZE_LINE = "([" + HEXDIG + "]{1,16})" + CHUNK_EXT


def ref(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("latin-1"))


REF_TOKEN = ref(TOKEN)
REF_FIELD_VALUE = ref(OWS + FIELD_VALUE + OWS)
REF_FIELD_LINE = ref(FIELD_LINE)
REF_CONTENT_LENGTH = ref(CONTENT_LENGTH)
REF_CHUNK_SIZE_LINE = ref(CHUNK_SIZE_LINE)


def verdict(check, *args):
    try:
        return True, check(*args)
    except http11.FramingError:
        return False, None


# -- inputs: random bytes, and bytes near the grammar ---------------------------------------

NEAR = "aZ09-_!#$%&'*+.^`|~ \t:;=,\"\\()<>@/[]?{}xX\r\n\x00\x01\x0b\x1f\x7f\x80\xe9\xff"


def near(alphabet: str = NEAR, max_size: int = 24) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size) | st.text(alphabet, max_size=max_size).map(
        lambda text: text.encode("latin-1"))


# -- token, field value, field line ---------------------------------------------------------

@PROPERTY
@given(near())
@example(b"")
@example(b"X-A\n")  # "$" would let a trailing newline through; the grammar does not
def test_token_is_exactly_the_abnf(value):
    expected = REF_TOKEN.fullmatch(value) is not None
    assert http11.is_token(value) is expected
    assert http11.is_token(value.decode("latin-1")) is expected


@PROPERTY
@given(st.text(max_size=12))
def test_token_text_outside_latin1_is_never_a_token(value):
    # Text from configuration: any non-ASCII letter or digit (e.g. "é", "٥") is not a tchar.
    expected = all(ord(c) < 0x100 for c in value) and REF_TOKEN.fullmatch(
        value.encode("latin-1")) is not None
    assert http11.is_token(value) is expected


@PROPERTY
@given(near())
def test_field_value_is_exactly_the_abnf(value):
    expected = REF_FIELD_VALUE.fullmatch(value) is not None
    assert http11.is_field_value(value) is expected
    assert http11.is_field_value(value.decode("latin-1")) is expected


tokenish = st.text("aZ09-_!#$%&'*+.^`|~", min_size=1, max_size=10).map(str.encode)


@PROPERTY
@given(near(max_size=10) | tokenish, near(max_size=20))
@example(b"X-A", b" b\t")
@example(b" X-A", b"b")  # obs-fold
@example(b"X-A ", b"b")  # whitespace before the colon
def test_field_line_is_exactly_the_abnf(name, value):
    line = name + b":" + value
    match = REF_FIELD_LINE.fullmatch(line)
    ok, got = verdict(http11.field_line, line)
    assert ok is (match is not None), line
    if ok:
        assert got == (match.group(1), match.group(2))


# -- Content-Length -------------------------------------------------------------------------

@PROPERTY
@given(near("0123456789 ,+-_xe\t\xd9\xa5", max_size=22))
@example(b"0" * 18)
@example(b"0" * 19)
@example(b"5, 5")
def test_content_length_is_exactly_the_abnf(value):
    match = REF_CONTENT_LENGTH.fullmatch(value)
    ok, got = verdict(http11.content_length, [value])
    assert ok is (match is not None), value
    if ok:
        assert got == int(value)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([b"5", b"5", b"6", b"05"]), min_size=2, max_size=4))
def test_more_than_one_content_length_line_is_refused(values):
    assert not verdict(http11.content_length, values)[0]
    assert not verdict(http11.body_framing, (1, 1), values, [])[0]


def test_no_content_length_no_framing():
    assert http11.content_length([]) is None
    assert http11.body_framing((1, 0), [], []) is None


# -- Transfer-Encoding ----------------------------------------------------------------------

@pytest.mark.parametrize("version, lengths, codings, expected", [
    ((1, 1), [], [b"chunked"], http11.CHUNKED),
    ((1, 1), [], [b"CHUNKED"], http11.CHUNKED),
    ((1, 1), [], [b"gzip, chunked"], None),
    ((1, 1), [], [b"chunked, gzip"], None),
    ((1, 1), [], [b"chunked, chunked"], None),
    ((1, 1), [], [b", chunked"], None),
    ((1, 1), [], [b"chunked", b"chunked"], None),
    ((1, 1), [b"5"], [b"chunked"], None),
    ((1, 0), [], [b"chunked"], None),
    ((2, 0), [], [b"chunked"], None),
    ((1, 1), [b"5"], [], 5),
])
def test_transfer_encoding(version, lengths, codings, expected):
    ok, got = verdict(http11.body_framing, version, lengths, codings)
    assert (ok, got) == (expected is not None, expected)


# -- chunk-size lines -----------------------------------------------------------------------

ext_value = st.sampled_from([b"v", b"x-1", b'"a b"', b'"q\\"t"', b'""', b"\"\xe9\""])
ext = st.builds(lambda name, value: b";" + name + (b"=" + value if value else b""),
                st.sampled_from([b"a", b"name", b"x-y"]), st.none() | ext_value)
good_line = st.builds(lambda digits, exts: digits + b"".join(exts),
                      st.text("0123456789abcdefABCDEF", min_size=1, max_size=18).map(
                          lambda text: text.encode("ascii")),
                      st.lists(ext, max_size=3))


def mutate(line: bytes, position: int, byte: bytes) -> bytes:
    position %= len(line) + 1
    return line[:position] + byte + line[position:]


chunk_line = (near("0123456789abcdefABCDEFxX+-_ \t;=\"\\\r\n\x00\x7f\x80", max_size=24)
              | good_line
              | st.builds(mutate, good_line, st.integers(0, 40),
                          st.sampled_from([b" ", b"\t", b"0x", b"+", b"-", b"_", b";", b"=",
                                           b'"', b"\\", b"\r", b"\n", b"\x00", b","])))


@PROPERTY
@given(chunk_line)
@example(b"0x10")
@example(b"-0")
@example(b" 10")
@example(b"10 ")
@example(b"1" * 16)
@example(b"1" * 17)
@example(b"5;a=" + b"b" * http11.MAX_CHUNK_LINE)
def test_chunk_size_line_is_exactly_the_abnf(line):
    match = REF_CHUNK_SIZE_LINE.fullmatch(line)
    expected = match is not None and len(line) <= http11.MAX_CHUNK_LINE
    ok, got = verdict(http11.chunk_size, line)
    assert ok is expected, line
    if ok:
        assert got == int(match.group(1), 16)
