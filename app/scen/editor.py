"""The editor: one owner of a live model's edits.

It wraps a loaded causal LM, swaps the edited layer's down projection for a
``RoutedDown`` and offers small verbs: ``train`` an edit (no change to the live
model), ``add`` / ``remove`` it, ``sync`` to a wanted set, and ``generate`` /
``route`` / ``teacher_forced`` for serving and evaluation. All model access goes
through one lock, so threads can share an editor safely.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.scen import keycache
from app.scen.adapters import adapter_for
from app.scen.config import ScenConfig
from app.scen.errors import UnknownEditError
from app.scen.experts import new_expert
from app.scen.layers import record
from app.scen.prompts import Batch, check_limits, encode, prompt_ids
from app.scen.routed import RoutedDown, Router
from app.scen.training import Timer, TrainedEdit, train_expert, train_neuron


@dataclass
class Route:
    edit_id: str | None
    activation: float


@dataclass
class Generation:
    text: str
    edit_id: str | None
    activation: float
    model_version: int  # the live set that answered


def pool_prompts() -> list[str]:
    text = resources.files("app.scen").joinpath("pool.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


class Editor:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: ScenConfig | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ):
        """``cache_dir``: where to keep the pool's keys between runs (see ``keycache``); None: never."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or ScenConfig()
        self.batch_size = batch_size
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layer_list(model)
        L = len(self.layers)
        self.layer = self.config.resolved_layer(L)
        if not 0 <= self.layer < L:
            raise ValueError(f"layer {self.layer} out of range: the model has {L} layers (0..{L - 1})")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos token and a pad token")
        self.device = next(model.parameters()).device
        self._lock = threading.RLock()
        self._ids: list[str] = []  # slot -> edit id
        self._edits: dict[str, TrainedEdit] = {}
        self._version = 0
        self._generator = torch.Generator().manual_seed(self.config.seed)

        layer_module = self.layers[self.layer]
        down = self.adapter.get_down(layer_module)
        if isinstance(down, RoutedDown):
            raise ValueError("this model already has an editor attached")
        h = self.adapter.down_weight(down).shape[1]
        self.routed = RoutedDown(down, Router(h, self.config.theta, self.device))
        self.adapter.set_down(layer_module, self.routed)
        self._pool_keys = self._pool_keys_cached(cache_dir)  # (N, h)
        self.routed.router.fit(self._pool_keys, self.config.key_shrinkage)

    # ---- state ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def edit_ids(self) -> list[str]:
        return list(self._ids)

    def get(self, edit_id: str) -> TrainedEdit:
        try:
            return self._edits[edit_id]
        except KeyError:
            raise UnknownEditError(edit_id) from None

    # ---- editing --------------------------------------------------------------------------

    def validate(self, prompt: str, target: str, rephrases: Sequence[str] = ()) -> None:
        """Raise ``InvalidEditError`` when the edit cannot be trained; changes nothing."""
        with self._lock:  # a fast tokenizer refuses use from two threads at once ("Already borrowed")
            check_limits(self.tokenizer, self.config, prompt, target, rephrases)

    def train(self, prompt: str, target: str, rephrases: Sequence[str] = ()) -> TrainedEdit:
        """Train the expert and indexing neuron of one edit against the live edits.

        The live model is not changed; ``add`` the result to serve it.
        """
        self.validate(prompt, target, rephrases)
        rephrases = tuple(rephrases)
        texts = [prompt, *rephrases]
        with self._lock, torch.no_grad():
            timer = Timer()
            batch = encode(self.tokenizer, texts, [target] * len(texts)).to(self.device)
            out, keys = self._record(batch)  # (B, T, d), (B, T, h)
            d, h = out.shape[-1], keys.shape[-1]
            expert = new_expert(self.config.expert, d, h, self.config.rank, self._generator).to(self.device)
            metrics = train_expert(
                self.model, self.layers, self.layer, batch, out, keys, expert, self.config, self._generator
            )
            metrics["expert_seconds"] = timer.seconds

            edit_keys = keys[torch.arange(len(texts)), batch.prompt_last]  # (R, h)
            router = self.routed.router
            neuron, bias = train_neuron(router.normalise(edit_keys), self._negatives(), self.config, self._generator)
            a = torch.sigmoid(router.normalise(edit_keys) @ neuron + bias)
            if self._ids:
                # Older neurons are not retrained: the new neuron must win on its own
                # prompt. How strongly the strongest older one fires there is recorded.
                metrics["older_max_activation"] = router.activations(edit_keys[:1]).max().item()
            metrics.update(
                activation=a[0].item(),
                rephrase_activations=a[1:].tolist(),
                seconds=timer.seconds,
            )
        return TrainedEdit(prompt, target, rephrases, self.layer, expert, neuron, bias, edit_keys.cpu(), metrics)

    def add(self, edit_id: str, edit: TrainedEdit) -> bool:
        """Append an edit to the live model. False (no change) if it is already live."""
        if edit.layer != self.layer:
            raise ValueError(f"edit {edit_id} was trained at layer {edit.layer}; this editor edits layer {self.layer}")
        with self._lock:
            if edit_id in self._edits:
                return False
            self.routed.append(edit.expert.to(self.device), edit.neuron.to(self.device), edit.bias.to(self.device))
            self._ids.append(edit_id)
            self._edits[edit_id] = edit
            self._version += 1
            return True

    def remove(self, edit_id: str) -> bool:
        """Take an edit out of the live model. False (no change) if it is not live."""
        with self._lock:
            if edit_id not in self._edits:
                return False
            slot = self._ids.index(edit_id)
            self.routed.pop(slot)
            del self._ids[slot]
            del self._edits[edit_id]
            self._version += 1
            return True

    def sync(self, wanted: Sequence[str], load: Callable[[str], TrainedEdit]) -> tuple[list[str], list[str]]:
        """Make the live set equal ``wanted``; returns (added, removed) ids."""
        with self._lock:
            wanted_set = set(wanted)
            removed = [i for i in self._ids if i not in wanted_set]
            for edit_id in removed:
                self.remove(edit_id)
            added = [i for i in wanted if i not in self._edits]
            for edit_id in added:
                self.add(edit_id, load(edit_id))
            return added, removed

    # ---- inference ------------------------------------------------------------------------

    @contextlib.contextmanager
    def routing(self, at: torch.Tensor | None = None) -> Iterator[Callable[[int], list[Route]]]:
        """Route every forward pass of ``model`` inside the block as ``generate`` does.

        Each sequence is routed once, at position ``at`` (B,) or its last, and keeps that
        expert through later decode steps. Yields ``routes(n)``: the routes taken by the
        block's n sequences once a forward pass has run. Holds the editor's lock.
        """
        with self._lock, self.routed.session(at=at) as session:
            yield lambda n: self._routes(session.get("routing"), n)

    def detach(self) -> None:
        """Give the model its own down projection back: it is the unedited model again and
        this editor is done."""
        with self._lock:
            self.adapter.set_down(self.layers[self.layer], self.routed.base)
            self._ids, self._edits = [], {}
            self._version += 1

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[Generation]:
        results: list[Generation] = []
        for chunk in _chunks(prompts, self.batch_size):
            with self.routing() as routes_of:
                batch = encode(self.tokenizer, chunk).to(self.device)
                version = self._version
                if seed is not None:
                    torch.manual_seed(seed)
                sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
                out = self.model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **sampling,
                )
                routes = routes_of(len(chunk))
                texts = self.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            results += [Generation(t, r.edit_id, r.activation, version) for t, r in zip(texts, routes)]
        return results

    @torch.no_grad()
    def activations(self, prompts: Sequence[str]) -> torch.Tensor:
        """Every live neuron's activation on each prompt, (n, E), columns in ``edit_ids`` order."""
        with self._lock:
            return self.routed.router.activations(self._prompt_keys(prompts)).cpu()

    # ---- internals --------------------------------------------------------------------------

    def _routes(self, routing, n: int) -> list[Route]:
        if routing is None:
            return [Route(None, 0.0)] * n
        return [
            Route(self._ids[s] if s >= 0 else None, a)
            for s, a in zip(routing.slots.tolist(), routing.activations.tolist())
        ]

    def _record(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited layer's base output and keys for a batch, without running the layers above."""
        with self.routed.bypassed():
            out, [(keys, _)] = record(self.model, self.layers[self.layer], [self.routed], batch.model_inputs())
        return out, keys

    def _prompt_keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Raw keys (n, h) at the last token of each formatted prompt."""
        parts = []
        with self._lock, torch.no_grad():
            for chunk in _chunks(prompts, self.batch_size):
                _, keys = self._record(encode(self.tokenizer, chunk).to(self.device))
                parts.append(keys[:, -1])
        return torch.cat(parts)

    def _pool_keys_cached(self, cache_dir: str | os.PathLike | None) -> torch.Tensor:
        prompts = pool_prompts()
        if cache_dir is None or self.device.type != "cpu":
            return self._prompt_keys(prompts)
        key = keycache.fingerprint(self.model, [prompt_ids(self.tokenizer, p) for p in prompts], self.layer)
        keys = keycache.load(Path(cache_dir), key)
        if keys is None or keys.shape[0] != len(prompts):
            keys = self._prompt_keys(prompts)
            keycache.save(Path(cache_dir), key, keys)
        return keys.to(self.device)

    def _negatives(self) -> torch.Tensor:
        """Normalised keys a new neuron must not fire on: ordinary prompts and live edits."""
        keys = [self._pool_keys] + [e.keys.to(self.device) for e in self._edits.values()]
        return self.routed.router.normalise(torch.cat(keys))


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
