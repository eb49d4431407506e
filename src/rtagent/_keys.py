"""The line typed while a reply streams.

prompt_toolkit reads keys only while its prompt is up. During a reply the terminal is in raw mode
instead (nothing is echoed, and Ctrl-C is a key like any other) and the keys are read here, into a
one-line editor: the screen shows the line only where it cannot garble the reply, and Enter sends it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TextIO

from prompt_toolkit.input import Input
from prompt_toolkit.input.typeahead import get_typeahead
from prompt_toolkit.key_binding import KeyPress
from prompt_toolkit.keys import Keys

# Enter is "\r" in raw mode; "\n" (Ctrl-J) is what a pasted or scripted line ends with.
_ENTER = frozenset({Keys.ControlM, Keys.ControlJ})
# Both Backspace codes ("\x7f" and "\b") arrive as Ctrl-H.
_BACKSPACE = Keys.ControlH
_BRACKETED_PASTE = ("\x1b[?2004h", "\x1b[?2004l")


class LineEditor:
    """A one-line editor fed key by key: text, Backspace, Ctrl-W (word), Ctrl-U (line) and paste.

    Enter hands over the line (if there is one) and Ctrl-C asks to interrupt; other keys (arrows,
    Escape, Ctrl-D, ...) do nothing.
    """

    def __init__(
        self,
        *,
        on_change: Callable[[str], object],
        on_enter: Callable[[str], object],
        on_interrupt: Callable[[], object],
    ) -> None:
        self.text = ""
        self._on_change = on_change
        self._on_enter = on_enter
        self._on_interrupt = on_interrupt

    def feed(self, press: KeyPress) -> None:
        key, before = press.key, self.text
        if key in _ENTER:
            line = before.strip()
            self._edit("")
            if line:
                self._on_enter(line)
        elif key == Keys.ControlC:
            self._on_interrupt()
        elif key == _BACKSPACE:
            self._edit(before[:-1])
        elif key == Keys.ControlW:
            kept = before.rstrip()
            self._edit(kept[: kept.rfind(" ") + 1])
        elif key == Keys.ControlU:
            self._edit("")
        elif key == Keys.BracketedPaste:
            # One message per paste: line breaks (and tabs) become spaces.
            pasted = press.data.replace("\r\n", "\n")
            self._edit(before + "".join(c if c.isprintable() else " " for c in pasted))
        elif not isinstance(key, Keys) and key.isprintable():
            self._edit(before + key)

    def _edit(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self._on_change(text)


@contextlib.contextmanager
def reading(input: Input, editor: LineEditor, *, paste: TextIO | None = None) -> Iterator[None]:
    """Feed ``editor`` the keys typed until the block ends, with the terminal in raw mode.

    Keys the prompt read after its Enter come first. ``paste``, the terminal's output, gets
    bracketed paste turned on, so a pasted block is one message, not one per line. The terminal's
    mode, paste setting and reader are restored however the block ends.
    """

    def ready() -> None:
        for press in input.read_keys():
            editor.feed(press)

    with contextlib.ExitStack() as restore:
        restore.enter_context(input.raw_mode())
        restore.enter_context(input.attach(ready))
        if paste is not None:
            _write(paste, _BRACKETED_PASTE[0])
            restore.callback(_write, paste, _BRACKETED_PASTE[1])
        # Half an escape sequence left in the parser would reach the next prompt as garbage.
        restore.callback(input.flush_keys)
        for press in get_typeahead(input):
            editor.feed(press)
        yield


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()
