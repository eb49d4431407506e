"""Reading an adapted model's stream (call scanner, loop guard) and the reply's Responses events."""

from __future__ import annotations

import json

from openai.types.responses import ResponseCompletedEvent, ResponseFunctionToolCall

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


def test_the_call_scanner_follows_calls_one_per_line_however_the_chunks_fall() -> None:
    scanner = CallScanner()
    pieces = ['{"name": "a", "arguments": {"q": "}\\n{"', "}", '}\n{"name": "b", "arg', 'uments": {}', "}"]
    seen = [scanner.feed(piece) for piece in pieces]
    assert seen[:2] == [("a", '{"q": "}\\n{"', False), (None, "}", True)]
    assert seen[2] == (None, "", False)  # the next head is not whole yet
    assert seen[3] == ("b", "{}", True)
    assert seen[4] == (None, "", False)  # the brace closing the last call
    # A close, the separator and the next head in one delta: the rest waits for the next feed.
    scanner = CallScanner()
    first = scanner.feed('{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"x": 1}')
    assert [first, scanner.feed("")] == [("a", "{}", True), ("b", '{"x": 1}', True)]


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


def test_reply_events_number_each_call_and_list_them_all() -> None:
    reply = ReplyEvents("m", parallel_tool_calls=True)
    events = [*reply.start(), *reply.text("Checking."), *reply.text_done()]
    for name, arguments in [("a", '{"q": 1}'), ("b", "{}")]:
        events += [reply.call_added(name), reply.call_delta(arguments), *reply.call_done()]
    events.append(reply.completed())
    assert [event.sequence_number for event in events] == list(range(len(events)))
    indexed = [(event.type, getattr(event, "output_index", None)) for event in events[2:-1]]
    assert [index for kind, index in indexed if kind.startswith("response.function_call")] == [1, 1, 2, 2]
    assert [index for kind, index in indexed if kind.startswith("response.output_item")] == [0, 0, 1, 1, 2, 2]
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.parallel_tool_calls is True
    message, *called = completed.response.output
    assert message.type == "message"
    assert [(c.name, c.arguments) for c in called if isinstance(c, ResponseFunctionToolCall)] == [
        ("a", '{"q": 1}'),
        ("b", "{}"),
    ]
    assert len({c.call_id for c in called if isinstance(c, ResponseFunctionToolCall)}) == 2
