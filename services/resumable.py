"""Resumable streams: what a server-sent event's id holds, and how a Last-Event-ID is read back.

Every event of a completion stream carries an id, `<response id>/<since>/<cursor>`:

- the response id (`chatcmpl-...`, `cmpl-...`), made by the gateway that took the request. It names that gateway,
  whose reply stream holds every item of the request, and ends in 128 random bits: only a client that was given
  the stream can name it.
- since: the reply-stream entry of the request's first item, where a replay starts.
- cursor: for each choice, how many of its items the events so far covered (the next item's seq), or `done`
  once the usage chunk went out.

A client whose stream broke sends the same request again with `Last-Event-ID`, to any gateway of the deployment.
That gateway replays the request's items from the original gateway's reply stream through a fresh
ResponseBuilder (usage and logprob offsets come out as before), shows the client only what lies past the cursor,
and follows the stream to its end (PipelineClient.resume); the request is that gateway's from then on
(schemas.messages.Resume). A gateway that dies leaves its requests resumable for --resume-grace seconds; after
that the scheduler aborts those nobody took over, and deletes the dead gateway's reply stream.

A client that closes its connection, or whose connection its gateway sees fail, has its request cancelled at
once, as OpenAI's API does (its KV blocks are freed within a plan). What is left to resume is a stream whose
gateway died, or whose connection broke without the gateway noticing (the resuming gateway takes it over; the
old one lets go).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CHOICES = 4096                  # a cursor longer than this is no request's (prompts x n is far less)

_EVENT_ID = re.compile(r"(?P<response_id>(?:chatcmpl|cmpl)-(?P<gateway>gw-[0-9a-f]{8})-\d{1,18}-[0-9a-f]{32})"
                       r"/(?P<since>\d{1,20}-\d{1,20})/(?P<cursor>done|\d{1,9}(?:\.\d{1,9})*)")


@dataclass(frozen=True)
class EventId:
    response_id: str
    gateway: str                    # the gateway that made the response id: its reply stream has the items
    since: str                      # a reply-stream entry id: the request's first item is at or after it
    cursor: tuple[int, ...] | None  # per choice, the seq of the first item the client has not seen; None: done

    def __str__(self) -> str:
        cursor = "done" if self.cursor is None else ".".join(map(str, self.cursor))
        return f"{self.response_id}/{self.since}/{cursor}"


def parse_event_id(value: str) -> EventId:
    """The EventId a Last-Event-ID header holds; ValueError saying why it is not one of ours."""
    match = _EVENT_ID.fullmatch(value.strip())
    if match is None:
        raise ValueError("Last-Event-ID is not the id of an event this server sent")
    cursor = None if match["cursor"] == "done" else tuple(map(int, match["cursor"].split(".")))
    if cursor is not None and len(cursor) > MAX_CHOICES:
        raise ValueError("Last-Event-ID is not the id of an event this server sent")
    return EventId(match["response_id"], match["gateway"], match["since"], cursor)


class StreamPosition:
    """How far a stream's events have gone: each choice's next seq. Resuming, it starts from the client's cursor
    and says which items the client has already seen (they are replayed for the builder's sake, not shown)."""

    def __init__(self, response_id: str, since: str, num_choices: int, seen: tuple[int, ...] | None = None):
        self.response_id, self.since = response_id, since
        self.next_seq = [0] * num_choices
        self.seen = seen                     # the client's cursor when resuming, else None

    @property
    def resumed(self) -> bool:
        return self.seen is not None

    def take(self, choice: int, seq: int) -> bool:
        """Count an item in; True if the client has not seen it yet."""
        self.next_seq[choice] = max(self.next_seq[choice], seq + 1)
        return self.seen is None or seq >= self.seen[choice]

    def event_id(self) -> str:
        return str(EventId(self.response_id, "", self.since, tuple(self.next_seq)))

    def done_id(self) -> str:
        return str(EventId(self.response_id, "", self.since, None))
