"""CommandWatch, sans-IO: what a client inside the tunnel sends reaches the MTA, except the commands
certproxy hides (XCLIENT, XFORWARD); message content is never inspected, and is content only once the
MTA has said so (354). A two-sided harness: client bytes in, MTA replies in, what went out checked."""

from __future__ import annotations

import pytest

import certproxy

EHLO_CHUNKING = [b"250-mx\r\n", b"250-PIPELINING\r\n", b"250 CHUNKING\r\n"]
EHLO_PLAIN = [b"250-mx\r\n", b"250 PIPELINING\r\n"]


class Pair:
    """The client's side feeds bytes, the MTA's side answers; ``sent`` is what the MTA received."""

    def __init__(self) -> None:
        self.watch = certproxy.CommandWatch()
        self.sent = b""

    def client(self, data: bytes) -> None:
        self.sent += self.watch.feed(data)

    def mta(self, code: int, lines: list[bytes] | None = None) -> None:
        self.sent += self.watch.reply(code, lines or [f"{code} ok\r\n".encode()])


@pytest.mark.parametrize("line", [b"XCLIENT ADDR=1.2.3.4 LOGIN=postmaster\r\n", b"xclient LOGIN=a\r\n",
                                  b" \tXcLiEnT LOGIN=a\r\n", b"XFORWARD ADDR=1.2.3.4\r\n", b"XCLIENT\r\n",
                                  b"\x0bXCLIENT LOGIN=a\n", b"XCLIENT\tLOGIN=a\r\n"])
def test_hidden_commands_never_pass(line):
    p = Pair()
    p.client(b"EHLO laptop\r\nMAIL FROM:<a@b>\r\n" + line + b"RCPT TO:<c@d>\r\n")
    assert p.watch.stop is not None and p.watch.stop[0].startswith(b"421 4.7.0 ")
    assert line.strip().split()[0].upper() not in p.sent.upper()
    p.client(b"NOOP\r\n")  # nothing more passes once stopped
    p.mta(250)
    assert b"NOOP" not in p.sent and b"RCPT" not in p.sent


@pytest.mark.parametrize("line", [b"XCLIENTS LOGIN=a\r\n", b"NOOP XCLIENT\r\n", b"X-CLIENT LOGIN=a\r\n"])
def test_near_misses_pass(line):
    p = Pair()
    p.client(line)
    assert p.watch.stop is None and p.sent == line


def test_content_after_354_passes_untouched_and_commands_resume_after_its_end():
    p = Pair()
    p.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    body = b"Subject: x\r\n\r\nXCLIENT LOGIN=postmaster\r\n..leading dot\r\n.\r\n"
    p.client(body)  # a client that does not wait for the 354: held, not passed
    assert p.sent == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" and p.watch.hold
    p.mta(250)
    p.mta(250)
    assert p.watch.hold  # still DATA's reply to come
    p.mta(354, [b"354 go ahead\r\n"])
    assert p.sent.endswith(body) and not p.watch.hold
    p.client(b"XCLIENT LOGIN=a\r\n")
    assert p.watch.stop is not None


def test_refused_data_leaves_what_followed_as_commands():
    p = Pair()
    p.client(b"DATA\r\nXCLIENT LOGIN=postmaster\r\n.\r\n")
    p.mta(554, [b"554 5.5.1 no valid recipients\r\n"])
    assert p.watch.stop is not None and b"XCLIENT" not in p.sent


@pytest.mark.parametrize("end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"])
def test_content_ends_at_the_earliest_dot_line_any_mta_could_see(end):
    """SMTP smuggling: whatever end of content some MTA accepts ends it here too, so a command behind it
    is judged as one."""
    p = Pair()
    p.client(b"DATA\r\n")
    p.mta(354)
    p.client(b"Subject: x\r\n\r\nbody" + end + b"XCLIENT LOGIN=postmaster\r\n")
    assert p.watch.stop is not None and b"XCLIENT" not in p.sent


def test_end_of_content_split_across_reads():
    p = Pair()
    p.client(b"DATA\r\n")
    p.mta(354)
    for piece in (b"line one\r", b"\n", b".", b"\r", b"\n", b"QUIT\r\n"):
        p.client(piece)
    assert p.sent == b"DATA\r\nline one\r\n.\r\nQUIT\r\n" and p.watch.stop is None
    p.mta(250)  # the message
    p.mta(221)


def test_a_dot_at_the_very_start_of_content_ends_it():
    p = Pair()
    p.client(b"DATA\r\n")
    p.mta(354)
    p.client(b".\r\nXFORWARD NAME=x\r\n")
    assert p.watch.stop is not None


@pytest.mark.parametrize("offered, passes", [(EHLO_CHUNKING, True), (EHLO_PLAIN, False)])
def test_bdat_chunks_skip_by_length_only_if_the_mta_offered_chunking(offered, passes):
    p = Pair()
    p.client(b"EHLO laptop\r\n")
    p.mta(250, offered)
    chunk = b"XCLIENT LOGIN=postmaster\r\n"
    p.client(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert (p.watch.stop is None) is passes
    if passes:
        assert p.sent.endswith(chunk)
        p.client(b"XCLIENT LOGIN=x\r\n")  # the chunk is over: a command again
        assert p.watch.stop is not None


def test_a_354_nobody_asked_for_ends_the_session():
    p = Pair()
    p.client(b"NOOP\r\n")
    p.mta(354)
    assert p.watch.stop is not None and p.watch.stop[0].startswith(b"421")


def test_an_overlong_command_line_ends_the_session():
    p = Pair()
    p.client(b"NOOP " + b"a" * 5000)
    assert p.watch.stop is not None and p.sent == b""


def test_pipelined_transaction_passes_whole():
    p = Pair()
    script = b"EHLO l\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    p.client(script)
    for _ in range(4):
        p.mta(250, EHLO_PLAIN)
    p.mta(354)
    p.client(b"hello\r\n.\r\nQUIT\r\n")
    assert p.sent == script + b"hello\r\n.\r\nQUIT\r\n" and p.watch.stop is None


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

tricky = st.lists(st.sampled_from([b"\r", b"\n", b".", b"X", b"XCLIENT ", b"\r\n", b"QUIT\r\n"]),
                  max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(tricky, st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_how_the_bytes_are_cut_changes_nothing(body, cuts):
    """Message content fed whole or cut anywhere: the same bytes pass, the same end is found, the same
    verdict on what follows (content ends and hidden commands are judged across reads alike)."""
    def run(pieces):
        p = Pair()
        p.client(b"DATA\r\n")
        p.mta(354)
        for piece in pieces:
            p.client(piece)
        stopped = p.watch.stop is not None  # once stopped, nothing is read any more
        return p.sent, stopped, p.watch._mode, b"" if stopped else bytes(p.watch._buf)

    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]
    assert run(pieces) == run([body])
