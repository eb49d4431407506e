"""Which slot each request names: pure bookkeeping, tested without a server."""

from __future__ import annotations

from rtagent._slots import Choice, Slots


def slot_of(slots: Slots, prompt: list[str]) -> Choice:
    with slots.take(prompt) as choice:
        assert choice is not None
        return choice


def test_slots_keep_a_conversation_where_its_prompt_is_cached() -> None:
    slots = Slots(3)
    with slots.take(["agent", "hi"]) as first, slots.take(["agent", "bye"]) as other:
        assert first is not None
        assert other is not None
        assert other.index != first.index  # held: a concurrent request goes elsewhere
    assert slot_of(slots, ["agent", "hi", "hello!", "how are you?"]) == first  # a turn later
    fresh = slot_of(slots, ["another agent"])
    assert fresh.index not in (first.index, other.index)  # the least recently used of the rest
    with slots.take(["a"]), slots.take(["b"]), slots.take(["c"]), slots.take(["d"]) as none_left:
        assert none_left is None  # llama.cpp's own choice


def test_a_new_conversation_starts_from_the_kept_prefix_in_a_slot_of_its_own() -> None:
    slots = Slots(3)
    prefix = ["tools", "example", "call"]
    warmed = slot_of(slots, prefix)
    slots.kept(prefix, "prefix.bin")
    first = slot_of(slots, [*prefix, "hi"])
    assert first == warmed  # the warmed slot holds all of it: go on there, nothing to restore
    second = slot_of(slots, [*prefix, "hello"])
    assert second.index != first.index
    assert second.restore == "prefix.bin"  # into an empty slot, not over the first conversation
    assert slot_of(slots, [*prefix, "hi", "hi!", "thanks"]) == first
    assert slot_of(slots, [*prefix, "hello", "hey", "bye"]) == Choice(second.index)
    third = slot_of(slots, [*prefix, "a"])
    assert third.restore == "prefix.bin"
    fourth = slot_of(slots, [*prefix, "b"])
    assert fourth.index == first.index  # no empty slot left: the least recently used
    assert fourth.restore is None  # whose cache starts with the prefix: llama.cpp keeps that part
    assert slot_of(slots, ["other instructions", "hi"]) == Choice(second.index)  # nothing kept starts it
    assert slot_of(slots, [*prefix, "a", "x"]) == Choice(third.index)
    assert slot_of(slots, [*prefix, "b", "y"]) == Choice(first.index)
    # The least recently used slot now holds another prompt: the prefix is restored over it.
    assert slot_of(slots, [*prefix, "c"]) == Choice(second.index, "prefix.bin")
