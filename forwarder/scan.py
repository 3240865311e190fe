"""Byte-by-byte reading for the fast lane's narrow parsers: the client's request head
(`api/lane/front.parse_head`), a replica's reply head (`forwarder/upstream.whole_reply`) and the
token counts in a reply (`forwarder/usage.py`).

Compiled (`setup.py`), indexing bytes is a plain memory read and these loops cost a few
instructions per byte, where each bytes method call (`split`, `partition`, `lower`, `strip`,
`isdigit`, `int`) costs hundreds, most of it argument parsing and a new object. Heads are a
couple of hundred bytes, so reading them byte by byte is the cheaper way. Run as plain Python
(no compiler) the same code is slower, and right all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # only annotations name it (strings at run time); compiled, a native int
    from mypy_extensions import i64

SP: Final = 32
HTAB: Final = 9
CR: Final = 13
LF: Final = 10
COLON: Final = 58
DEL: Final = 127
# `field`'s answer for a line that is not a field is the literal (-1, 0, 0, 0): compiled, a
# Final tuple of native ints whose first item is -1 reads as never set (a NameError)


def field(buf: bytes, at: i64, end: i64) -> tuple[i64, i64, i64, i64]:
    """The header field line starting at `at` in a head that ends at `end` (where its blank
    line starts): (its colon, its value's start and end with the optional whitespace around
    it left out, the next line's start or `end`). The colon is -1 for a line that is not a
    plain `name: value` field: an empty name, whitespace or a control byte in the name (also
    an obsolete folded line), a bare CR or LF or any other control byte but HTAB in the value
    (httptools refuses those too: a request it answers 400 is not one the lane serves)."""
    i: i64 = at
    while i < end:
        c: i64 = buf[i]
        if c == COLON:
            break
        if c <= SP or c >= 127:
            return (-1, 0, 0, 0)
        i += 1
    if i == at or i >= end:
        return (-1, 0, 0, 0)
    colon = i
    i += 1
    while i < end and (buf[i] == SP or buf[i] == HTAB):
        i += 1
    start = i
    while i < end:
        c = buf[i]
        if c == CR:
            break
        if (c < SP and c != HTAB) or c == DEL:
            return (-1, 0, 0, 0)
        i += 1
    stop = i
    while stop > start and (buf[stop - 1] == SP or buf[stop - 1] == HTAB):
        stop -= 1
    if i < end:  # a CR inside the head: it must end this line
        if i + 1 >= end or buf[i + 1] != LF:
            return (-1, 0, 0, 0)
        i += 2
    return colon, start, stop, i


def named(buf: bytes, at: i64, stop: i64, name: bytes) -> bool:
    """Whether `buf[at:stop]` is `name` (given in lower case) in any case."""
    size: i64 = len(name)
    if stop - at != size:
        return False
    for k in range(size):
        c: i64 = buf[at + k]
        if 65 <= c <= 90:  # A-Z
            c += 32
        if c != name[k]:
            return False
    return True


def starts(buf: bytes, at: i64, text: bytes) -> bool:
    """Whether `text` is in `buf` at `at`, exactly."""
    size: i64 = len(text)
    if at < 0 or at + size > len(buf):
        return False
    for k in range(size):  # noqa: SIM110 (compiled, a loop costs a tenth of all() on a generator)
        if buf[at + k] != text[k]:
            return False
    return True


def digits(buf: bytes, start: i64, stop: i64) -> i64:
    """The decimal number `buf[start:stop]`, or -1 unless it is one to eighteen ASCII digits
    (no sign, no space, no underscore: stricter than `int`)."""
    if stop <= start or stop - start > 18:
        return -1
    number: i64 = 0
    for k in range(start, stop):
        c: i64 = buf[k]
        if c < 48 or c > 57:
            return -1
        number = number * 10 + (c - 48)
    return number


def space_end(buf: bytes, at: i64) -> i64:
    """The first index from `at` that is not JSON or regex whitespace (`\\s`: space, tab, LF,
    VT, FF, CR), or the length of `buf`."""
    size: i64 = len(buf)
    while at < size:
        c: i64 = buf[at]
        if c != SP and not (HTAB <= c <= CR):
            return at
        at += 1
    return size
