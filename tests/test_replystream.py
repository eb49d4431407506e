"""Reading an adapted model's stream (call scanner, loop guard) and the reply's Responses events."""

from __future__ import annotations

import json

from openai.types.responses import ResponseCompletedEvent

from rtagent._replyevents import ReplyEvents
from rtagent._replystream import CallScanner, LoopGuard


def test_the_call_scanner_streams_arguments_and_closes_with_them() -> None:
    scanner = CallScanner()
    head = ['{"', "name", '": "', "look", "up", '", "', "arguments"]
    pieces = [*head, '": {"q": "a } \\" {', '", "n": [1, {}]}', "}"]
    seen = [scanner.feed(piece) for piece in pieces]
    assert seen[:7] == [(None, "", False)] * 7  # nothing until the name is whole
    assert seen[7] == ("lookup", '{"q": "a } \\" {', False)  # braces and quotes inside strings
    assert seen[8] == (None, '", "n": [1, {}]}', True)
    assert json.loads(seen[7][1] + seen[8][1]) == {"q": 'a } " {', "n": [1, {}]}


def test_the_loop_guard_stops_repeats_but_not_tables_or_short_replies() -> None:
    def loops(text: str, size: int = 3) -> bool:
        guard = LoopGuard()
        return any(guard.looping(text[i : i + size]) for i in range(0, len(text), size))

    assert loops("The sky is blue today. It is nice. The sky is blue today. ")
    assert loops("Answer: A: A: A: A: A: A: A:")
    assert not loops("Yes. Yes. Thanks! Thanks!")
    assert not loops("| a | b | c | d |\n| --- | --- | --- | --- |\n| 1 | 2 | 3 | 4 |\n")
    assert not loops("Paris is the capital of France. Berlin is the capital of Germany.")


def test_reply_events_follow_the_responses_api_order() -> None:
    reply = ReplyEvents("m")
    events = [*reply.start(), *reply.text("Hi"), *reply.text(" there"), *reply.text_done(), reply.completed()]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output_text == "Hi there"
