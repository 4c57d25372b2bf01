"""SCEN as an evaluation method: the engine's ``Editor`` on its own model copy."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.eval.datasets import EditRecord
from app.eval.method import EditMethod
from app.eval.sweep_options import INFERENCE_OPTIONS
from app.scen import Editor, Route, ScenConfig
from app.scen.prompts import Batch


class _RoutingProbe:
    def __init__(self, routes_of: Callable[[int], list[Route]]):
        self.routes_of = routes_of

    def served_by(self, rows: int) -> list[str | None]:
        return [route.edit_id for route in self.routes_of(rows)]


class ScenMethod(EditMethod):
    name = "scen"
    routes = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ScenConfig,
                 use_rephrases: bool = False):
        super().__init__(model, tokenizer)
        self.editor = Editor(model, tokenizer, config)
        self.use_rephrases = use_rephrases

    @property
    def layer(self) -> int:
        return self.editor.layer

    def apply(self, edit_id: str, record: EditRecord) -> dict[str, Any]:
        start = time.perf_counter()
        # Training on the rephrases would leak the generality test set into the edit.
        rephrases = record.rephrases if self.use_rephrases else ()
        # The data's subject, as locate-then-edit methods use it; inferred where it is missing
        # or not written in the prompt as given.
        subject = record.subject if record.subject and record.subject.casefold() in record.prompt.casefold() else None
        trained = self.editor.train(record.prompt, record.target, rephrases, subject=subject)
        self.editor.add(edit_id, trained)
        m = trained.metrics
        return {
            "seconds": time.perf_counter() - start,
            "steps": m.get("steps"),
            "loss": m.get("loss"),
            "converged": m.get("converged"),
            "activation": m.get("activation"),
        }

    @contextlib.contextmanager
    def probe(self, batch: Batch) -> Iterator[_RoutingProbe]:
        with self.editor.routing(batch) as routes_of:
            yield _RoutingProbe(routes_of)

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.editor.config) | {"resolved_layer": self.editor.layer}

    def set_option(self, name: str, value: float) -> None:
        if name not in INFERENCE_OPTIONS[self.name]:
            super().set_option(name, value)
        setattr(self.editor.routed.router, name, float(value))

    def routing_scores(self, prompts: list[str]) -> torch.Tensor:
        return self.editor.activations(prompts)

    def close(self) -> None:
        self.editor.detach()
        del self.editor
        super().close()
