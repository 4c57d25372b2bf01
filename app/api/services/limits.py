"""Checking a posted edit against the engine's token limits without waiting for the model."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

from app.scen import Editor
from app.scen.prompts import check_limits


class EditLimits:
    """The engine's checks of an edit's texts, with a tokenizer of its own.

    The editor's tokenizer may only be used under the editor's lock, which generation and
    training hold for seconds at a time; a post must not wait for them only to count tokens.
    This copy has its own lock (a fast tokenizer refuses use from two threads at once),
    which only posts take, each for a few milliseconds.
    """

    def __init__(self, editor: Editor):
        self._tokenizer = copy.deepcopy(editor.tokenizer)
        self._config = editor.config
        self._lock = threading.Lock()

    def check(self, prompt: str, target: str, rephrases: Sequence[str] = (), subject: str | None = None) -> None:
        """Raise ``InvalidEditError`` when the edit cannot be trained."""
        with self._lock:
            check_limits(self._tokenizer, self._config, prompt, target, rephrases, subject)
