"""The interface the runner drives: one editing method on its own copy of the model.

A method applies edits one at a time (``apply``), and offers ``probe`` for the
shared scorer in ``app.eval.scoring``. Each method gets a fresh deep copy of the
unedited model, so methods never see each other's changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.datasets import EditRecord
from app.eval.scoring import Probe
from app.scen.prompts import Batch


class EditMethod:
    name: str = "method"
    # Whether "served_by" means a routing decision (SCEN neurons, GRACE radius).
    routes: bool = False

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    def apply(self, edit_id: str, record: EditRecord) -> dict[str, Any]:
        """Edit the model so it answers ``record.prompt`` with ``record.target``; returns training metrics."""
        raise NotImplementedError

    def probe(self, batch: Batch) -> AbstractContextManager[Probe | None]:
        """Context around one scoring forward pass or ``generate`` call on ``batch`` (its
        ``prompt_last``: where each row's prompt ends; ``content``: the user's text)."""
        return _nothing()

    def config(self) -> dict[str, Any]:
        return {}

    def set_option(self, name: str, value: float) -> None:
        """Change an inference-time setting in place (for sweeps that need no retraining)."""
        raise ValueError(f"method {self.name} has no sweepable setting {name!r}")

    def routing_scores(self, prompts: list[str]) -> torch.Tensor | None:
        """Per prompt, per live edit, the routing score (for heatmaps); None if the method has none."""
        return None

    def close(self) -> None:
        """Drop references to the model copy; the method is not used afterwards."""
        del self.model


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield None
