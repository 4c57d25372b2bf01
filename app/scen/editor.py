"""The editor: one owner of a live model's edits.

It wraps a loaded causal LM, swaps the edited layer's down projection for a
``RoutedDown`` and offers small verbs: ``train`` an edit (no change to the live
model), ``add`` / ``remove`` it, ``sync`` to a wanted set, and ``generate`` /
``routing`` / ``activations`` for serving and evaluation. All model access,
tokenization included, goes through one lock, so threads can share an editor.

Each live edit's neuron and keys stay resident; its expert is held by the routed
layer's expert cache, which ``page_experts`` bounds (by default it holds them all). An edit
may be added with its expert ``NOT_LOADED`` (read from its routing part alone): the cache's
loader reads the expert when a prompt is first routed to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.scen import keycache, negatives
from app.scen.adapters import adapter_for
from app.scen.chats import Prompt, encode_answered, in_conversation
from app.scen.config import ScenConfig
from app.scen.errors import UnknownEditError
from app.scen.expert_cache import NOT_LOADED, ExpertCache, InCache
from app.scen.experts import Expert
from app.scen.indexing import (
    EarlierKeys,
    EditRecording,
    PoolKeys,
    asks_the_same,
    paper_neuron,
    refit_relation,
    routing_keys,
    subject_positives,
    two_factor_neuron,
)
from app.scen.layers import record
from app.scen.prompts import Batch, check_limits, encode, prompt_ids, prompt_tokens, subject_positions
from app.scen.questions import QuestionReader, bundled_encoder
from app.scen.routed import ApartKeys, Neuron, RoutedDown, Router, Routing, RoutingKeys, question_keys
from app.scen.training import Timer, TrainedEdit, fit_expert

log = logging.getLogger(__name__)


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


@dataclass
class _Recorded:
    out: torch.Tensor  # (B, T, d) the edited layer's base output
    keys: torch.Tensor  # (B, T, h) its keys
    subject: torch.Tensor  # (B, T, h_s) the subject layer's keys
    relation: torch.Tensor  # (B, T, h_r) the relation layer's keys


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
        self.subject_layer = self.config.resolved_subject_layer(L)
        self.relation_layer = self.config.resolved_relation_layer(L)
        if not 0 <= self.layer < L:
            raise ValueError(f"layer {self.layer} out of range: the model has {L} layers (0..{L - 1})")
        for name, at in (("subject", self.subject_layer), ("relation", self.relation_layer)):
            if not 0 <= at <= self.layer:
                raise ValueError(f"{name} layer {at} out of range: 0..{self.layer} (the edited layer)")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs an eos token and a pad token")
        self.device = next(model.parameters()).device
        self._lock = threading.RLock()
        self._ids: list[str] = []  # slot -> edit id
        self._edits: dict[str, TrainedEdit] = {}  # without their experts (see ``get``)
        # The keys of the first len(...) live edits, normalised for training (see ``_earlier_keys``).
        self._earlier: EarlierKeys | None = None
        self._version = 0
        self.refits = 0  # edits whose relation factor was refit as they came live (see ``add``)
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._rng = random.Random(self.config.seed)
        self._conversation_row = self.config.expert_in_conversation and bool(getattr(tokenizer, "chat_template", None))

        layer_module = self.layers[self.layer]
        down = self.adapter.get_down(layer_module)
        if isinstance(down, RoutedDown):
            raise ValueError("this model already has an editor attached")
        subject_down = self.adapter.get_down(self.layers[self.subject_layer])
        relation_down = self.adapter.get_down(self.layers[self.relation_layer])
        h_r = self.adapter.down_weight(relation_down).shape[1]
        h_s = self.adapter.down_weight(subject_down).shape[1]
        cfg = self.config
        questions = None
        if cfg.question_encoder and cfg.subject_factor:
            rivals = negatives.question_templates() if cfg.question_lead is not None else ()
            questions = QuestionReader(bundled_encoder(str(self.device)), tokenizer, rivals)
        router = Router(
            h_s, h_r, cfg.theta, pooled=cfg.subject_factor, subject_margin=cfg.subject_margin,
            relation_margin=cfg.relation_margin, subject_span_cos=cfg.subject_span_cos, device=self.device,
            questions=questions, question_cos=cfg.question_cos, question_lead=cfg.question_lead,
            question_floor=cfg.question_floor, rival_cos=cfg.rival_cos,
        )
        self.routed = RoutedDown(down, router, subject_down, relation_down)
        self._subject_down, self._relation_down = subject_down, relation_down
        self.adapter.set_down(layer_module, self.routed)
        self._pool = self._pool_keys_cached(cache_dir)
        self.routed.router.subject_norm.fit(self._pool.subject, self.config.key_shrinkage)
        self.routed.router.relation_norm.fit(self._pool.relation, self.config.key_shrinkage)
        if self.config.rephrase_invariance > 0:
            self.routed.router.relation_norm.discount(self._pool.rephrasings, self.config.rephrase_invariance)
        # Every edit trains against the pool: normalise it once.
        router = self.routed.router
        self._pool_normal = PoolKeys(
            router.subject_norm(self._pool.subject), router.relation_norm(self._pool.relation),
            router.relation_norm(self._pool.questions),
        )
        self.relation_map = self._relation_map_id(self.config.rephrase_invariance)
        # Edits stored before the map was recorded were trained without the rewording discount.
        self._legacy_relation_map = self._relation_map_id(0.0)

    # ---- state ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def edit_ids(self) -> list[str]:
        return list(self._ids)

    def get(self, edit_id: str) -> TrainedEdit:
        """A live edit with its expert, loaded if it is paged out (``ExpertUnavailableError``
        when that fails)."""
        with self._lock:
            try:
                record = self._edits[edit_id]
            except KeyError:
                raise UnknownEditError(edit_id) from None
            return dataclasses.replace(record, expert=self.routed.experts[self._ids.index(edit_id)])

    def routing_part(self, edit_id: str) -> TrainedEdit:
        """A live edit as ``get`` gives it, but with its expert only if it is resident, else
        ``NOT_LOADED``: adding it again reads nothing."""
        with self._lock:
            try:
                record = self._edits[edit_id]
            except KeyError:
                raise UnknownEditError(edit_id) from None
            resident = self.expert_cache.peek(edit_id)
            return dataclasses.replace(record, expert=NOT_LOADED if resident is None else resident)

    @property
    def expert_cache(self) -> ExpertCache:
        return self.routed.experts.cache

    def page_experts(self, budget_bytes: int | None, load: Callable[[str], Expert] | None) -> None:
        """Hold the live experts within ``budget_bytes`` (None: no bound), the least recently
        used out first, and load one again with ``load(edit_id)`` when a prompt is routed to
        it. Without ``load`` every expert stays resident, whatever the budget."""
        loader = None if load is None else (lambda edit_id: self._resident(load(edit_id)))
        with self._lock:
            self.expert_cache.configure(budget_bytes, loader)

    def provide_expert(self, edit_id: str, expert: Expert) -> None:
        """Hand a live edit's expert to the cache again, e.g. once its file, which failed to load
        while serving, reads again."""
        with self._lock:
            if edit_id not in self._edits:
                raise UnknownEditError(edit_id)
            self.expert_cache.put(edit_id, self._resident(expert))

    def _resident(self, expert: Expert) -> Expert:
        """An expert as the cache holds it: on this editor's device, frozen."""
        return expert.to(self.device).requires_grad_(False)

    # ---- editing --------------------------------------------------------------------------

    def validate(
        self, prompt: str, target: str, rephrases: Sequence[str] = (), subject: str | None = None
    ) -> None:
        """Raise ``InvalidEditError`` when the edit cannot be trained; changes nothing."""
        with self._lock:  # a fast tokenizer refuses use from two threads at once ("Already borrowed")
            check_limits(self.tokenizer, self.config, prompt, target, rephrases, subject)

    def train(
        self, prompt: str, target: str, rephrases: Sequence[str] = (), subject: str | None = None
    ) -> TrainedEdit:
        """Train the expert and indexing neuron of one edit against the live edits.

        ``subject``: the entity the fact is about, as written in the prompt; inferred when
        not given. The live model is not changed; ``add`` the result to serve it.
        """
        self.validate(prompt, target, rephrases, subject)
        rephrases = tuple(rephrases)
        texts: list[Prompt] = [prompt, *rephrases]
        # The expert alone also learns the prompt inside a conversation; routing is trained on
        # the texts the user gave (the batch's first rows).
        expert_rows = texts + [in_conversation(prompt)] if self._conversation_row else texts
        with self._lock, torch.no_grad():
            timer = Timer()
            batch = encode_answered(self.tokenizer, expert_rows, target).to(self.device)
            rec = self._record(batch)
            expert, metrics = fit_expert(
                self.model, self.layers, self.layer, batch, rec.out, rec.keys, self.config, self._generator
            )
            metrics["expert_seconds"], metrics["expert_rows"] = timer.seconds, len(expert_rows)
            edit_rec, subject = self._edit_recording(batch.head(len(texts)), rec, prompt, subject)
            neuron, subject_keys, relation_keys = self._train_neuron(edit_rec, prompt, subject)
            metrics |= self._neuron_metrics(edit_rec, neuron, subject_keys, relation_keys)
            metrics["seconds"] = timer.seconds
        return TrainedEdit(
            prompt, target, rephrases, self.layer, expert, neuron, relation_keys.cpu(), subject_keys.cpu(),
            subject, metrics, self.relation_map,
        )

    def add(self, edit_id: str, edit: TrainedEdit) -> bool:
        """Append an edit to the live model. False (no change) if it is already live."""
        if edit.layer != self.layer:
            raise ValueError(f"edit {edit_id} was trained at layer {edit.layer}; this editor edits layer {self.layer}")
        with self._lock:
            if edit_id in self._edits:
                return False
            if (edit.relation_map or self._legacy_relation_map) != self.relation_map:
                edit = self._refit_relation(edit)
                self.refits += 1
            if edit.subject and self.config.subject_factor and not edit.neuron.subject_span.any():
                # Stored before the subject's span was kept: read it off the prompt once.
                edit = self._with_subject_span(edit)
                self.refits += 1
            if edit.subject and self._reads_question_of(edit):
                # Trained without the question encoder: its question read off the prompt once.
                edit = self._with_question(edit)
            # It takes over from the live edits it was found to cover when it was trained.
            overrides = [self._ids.index(i) for i in edit.metrics.get("overrides", ()) if i in self._edits]
            self.routed.append(edit.expert.to(self.device), edit.neuron.to(self.device), overrides, edit_id)
            self._ids.append(edit_id)
            # The expert is the cache's to hold or let go; the rest of the record stays.
            self._edits[edit_id] = dataclasses.replace(edit, expert=_IN_CACHE)
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
            if self._earlier is not None:
                self._earlier = self._earlier.without(slot)
            self._version += 1
            return True

    def sync(self, wanted: Sequence[str], load: Callable[[str], TrainedEdit]) -> tuple[list[str], list[str]]:
        """Make the live set equal ``wanted`` (in that order: later ids take precedence);
        returns (added, removed) ids."""
        with self._lock:
            wanted_set = set(wanted)
            removed = [i for i in self._ids if i not in wanted_set]
            for edit_id in removed:
                self.remove(edit_id)
            added = [i for i in wanted if i not in self._edits]
            self.routed.router.reserve(len(self._ids) + len(added))
            refits, timer = self.refits, Timer()
            for edit_id in added:
                self.add(edit_id, load(edit_id))
            if self.refits > refits:
                log.info("%d edits trained under another relation map had their relation factor refit "
                         "as %d came live in %.1f s", self.refits - refits, len(added), timer.seconds)
            return added, removed

    # ---- inference ------------------------------------------------------------------------

    @contextlib.contextmanager
    def routing(self, batch: Batch) -> Iterator[Callable[[int], list[Route]]]:
        """Route every forward pass of ``model`` on ``batch`` inside the block as ``generate`` does.

        Each sequence is routed once, from its user's text (the router reads the subject
        and the question there), at its last prompt token, and keeps that expert through
        later decode steps and any target tokens. Yields ``routes(n)``: the routes taken by
        the block's n sequences once a forward pass has run. Holds the editor's lock.
        """
        with self._lock, self.routed.routing_session(
            batch.prompt_last, batch.content, batch.sentence, self._apart(batch), batch.input_ids
        ) as session:
            yield lambda n: self._routes(session.routing, n)

    def detach(self) -> None:
        """Give the model its own down projection back: it is the unedited model again and
        this editor is done."""
        with self._lock:
            self.adapter.set_down(self.layers[self.layer], self.routed.base)
            self.routed.detach_taps()
            self.routed.experts.clear()
            self._ids, self._edits, self._earlier = [], {}, None
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
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        for chunk in _chunks(prompts, self.batch_size):
            with self._lock:
                batch = encode(self.tokenizer, chunk).to(self.device)
                with self.routing(batch) as routes_of:
                    if seed is not None:
                        torch.manual_seed(seed)
                    out = self.model.generate(  # type: ignore[operator]  # GenerationMixin, untyped in torch
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        **sampling,
                    )
                    routes = routes_of(len(chunk))
                texts = self.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
                version = self._version
            results += [Generation(t, r.edit_id, r.activation, version) for t, r in zip(texts, routes)]
        return results

    @torch.no_grad()
    def activations(self, prompts: Sequence[str]) -> torch.Tensor:
        """Every live neuron's activation on each prompt, (n, E), columns in ``edit_ids`` order."""
        with self._lock:
            parts = [self.routed.router.activations(self.routing_keys(chunk)).cpu()
                     for chunk in _chunks(prompts, self.batch_size)]
            return torch.cat(parts)

    @torch.no_grad()
    def routing_keys(self, prompts: Sequence[str]) -> RoutingKeys:
        """What the router reads of ``prompts`` (one padded batch); runs only up to the edited layer."""
        batch = encode(self.tokenizer, prompts).to(self.device)
        rec = self._record(batch)
        return RoutingKeys(
            rec.subject, batch.content, rec.relation, batch.prompt_last, batch.sentence, batch.input_ids
        )

    # ---- internals --------------------------------------------------------------------------

    def _routes(self, routing: Routing | None, n: int) -> list[Route]:
        if routing is None:
            return [Route(None, 0.0)] * n
        return [
            Route(self._ids[s] if s >= 0 else None, a)
            for s, a in zip(routing.slots.tolist(), routing.activations.tolist())
        ]

    def _record(self, batch: Batch) -> _Recorded:
        """The edited layer's base output and keys, and the subject layer's keys, for a batch,
        without running the layers above."""
        with self.routed.bypassed():
            out, [(subject, _), (relation, _), (keys, _)] = record(
                self.model, self.layers[self.layer], [self._subject_down, self._relation_down, self.routed],
                batch.model_inputs(),
            )
        apart = self._apart(batch)
        if apart is not None:
            subject, relation = apart.over_subject(subject), apart.over_relation(relation)
        return _Recorded(out, keys, subject, relation)

    def _apart(self, batch: Batch) -> ApartKeys | None:
        """The subject and relation layers' keys of the rows of ``batch`` whose user's text runs to
        several sentences, each sentence read alone (``ApartKeys``); one more pass, up to the higher
        of the two layers, for those rows only. None where there are none, or where the router
        reads the last token's key (the paper's neuron)."""
        rows = batch.several_sentences().nonzero().flatten()
        if not self.routed.router.pooled or not len(rows):
            return None
        with self.routed.bypassed():
            _, [(subject, _), (relation, _)] = record(
                self.model, self.layers[max(self.subject_layer, self.relation_layer)],
                [self._subject_down, self._relation_down], batch.select(rows).sentences_apart(self.model.dtype),
            )
        return ApartKeys(rows, subject, relation)

    def _subject_keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Subject keys (N, h_s) of every text token of ``prompts``; runs only up to the subject layer."""
        parts = []
        for chunk in _chunks(prompts, self.batch_size):
            batch = encode(self.tokenizer, chunk).to(self.device)
            parts.append(self._subject_layer_keys(batch)[batch.content])
        h_s = self.adapter.down_weight(self._subject_down).shape[1]
        return torch.cat(parts) if parts else torch.zeros(0, h_s, device=self.device)

    def _subject_layer_keys(self, batch: Batch) -> torch.Tensor:
        """Subject keys (B, T, h_s) at every position of ``batch``; runs only up to the subject layer."""
        with self.routed.bypassed():
            _, [(keys, _)] = record(
                self.model, self.layers[self.subject_layer], [self._subject_down], batch.model_inputs()
            )
        apart = self._apart(batch)
        return keys if apart is None else apart.over_subject(keys)

    def _relation_keys(self, texts: Sequence[tuple[str, str | None]]) -> torch.Tensor:
        """Relation keys (n, h_r) of (prompt, entity) pairs as routing reads them (``_read_relation``);
        runs only up to the relation layer."""
        parts = []
        for chunk, batch in self._batches(texts):
            with self.routed.bypassed():
                _, [(relation, _)] = record(
                    self.model, self.layers[self.relation_layer], [self._relation_down], batch.model_inputs()
                )
            apart = self._apart(batch)
            if apart is not None:
                relation = apart.over_relation(relation)
            parts.append(self._read_relation(batch, relation, chunk))
        h_r = self.adapter.down_weight(self._relation_down).shape[1]
        return torch.cat(parts) if parts else torch.zeros(0, h_r, device=self.device)

    def _batches(self, texts: Sequence[tuple[str, str | None]]):
        for chunk in _chunks(texts, self.batch_size):
            yield chunk, encode(self.tokenizer, [p for p, _ in chunk]).to(self.device)

    def _read_relation(
        self, batch: Batch, relation: torch.Tensor, texts: Sequence[tuple[str, str | None]]
    ) -> torch.Tensor:
        """Each row's relation key (B, h_r) from the relation layer's keys (B, T, h_r): the question's
        key, its entity left out (Router), or, for the paper's neuron, the last token's key."""
        if not self.routed.router.pooled:
            return relation[:, -1]
        keep = batch.content.clone()
        T = keep.shape[1]
        for row, (prompt, entity) in enumerate(texts):
            tokens = prompt_tokens(self.tokenizer, prompt)
            for i in subject_positions(tokens, entity) if entity else []:
                keep[row, T - len(tokens.ids) + i] = False
        return question_keys(relation, keep)

    def _edit_recording(
        self, batch: Batch, rec: _Recorded, prompt: str, subject: str | None
    ) -> tuple[EditRecording, str | None]:
        """The edit's routing keys, with its subject located (or inferred) in row 0; ``rec`` may
        hold more rows than ``batch``, those after it are left out."""
        R, T = batch.input_ids.shape
        tokens = prompt_tokens(self.tokenizer, prompt)
        start = T - int(batch.attention_mask[0].sum())  # row 0's left padding
        if not self.config.subject_factor:
            at, span = len(tokens.ids) - 1, []
        elif subject is not None:
            span = subject_positions(tokens, subject)
            at = span[-1]
        else:
            norm = self.routed.router.subject_norm
            pool = self._pool_normal.subject  # (N_s, h_s)
            keys = norm(rec.subject[0, start : start + len(tokens.ids)])  # (P, h_s)
            novelty = (1 - (keys @ pool.T).amax(-1)).tolist()
            at, subject = negatives.infer_subject(tokens, novelty)
            span = subject_positions(tokens, subject) or [at]
        in_span = torch.zeros(T, dtype=torch.bool, device=self.device)
        in_span[[start + i for i in span]] = True
        return EditRecording(
            rec.subject[:R], batch.content, rec.relation[:R], batch.prompt_last, start + at, in_span, batch.sentence,
            batch.input_ids,
        ), subject

    def _train_neuron(self, rec: EditRecording, prompt: str, subject: str | None):
        """The neuron, the raw subject keys and the raw relation keys it was trained on."""
        router, cfg, earlier = self.routed.router, self.config, self._earlier_keys()
        if not cfg.subject_factor or subject is None:
            neuron, relation_keys = paper_neuron(router, rec, self._pool_normal, earlier, cfg, self._generator)
            return neuron, rec.subject[:, rec.subject_at], relation_keys
        other_subjects = self._subject_keys(
            negatives.other_subjects(prompt, subject, cfg.synthetic_subjects, self._rng)
        )
        subject_keys = subject_positives(router, rec, cfg)
        neuron, relation_keys = two_factor_neuron(
            router, rec, subject_keys, self._pool_normal, other_subjects, earlier, cfg, self._generator
        )
        return neuron, subject_keys, relation_keys

    def _relation_map_id(self, rephrase_invariance: float) -> str:
        """Names what the relation keys' normalisation is fitted from (at ``rephrase_invariance``):
        a neuron trained under another map reads its relation keys in another space."""
        fitted_from: dict = {
            "layer": self.relation_layer, "pooled": self.routed.router.pooled, "pool": negatives.pool_prompts(),
            "questions": negatives.generic_questions(), "key_shrinkage": self.config.key_shrinkage,
        }
        # Not named: texts read with their sentences apart (``_apart``). Every text the map is fitted
        # from is one sentence, which that reading leaves as it was.
        if rephrase_invariance > 0:  # named only when used: the map without it keeps its name
            fitted_from |= {"rephrase_invariance": rephrase_invariance, "reworded": negatives.rephrasing_groups()}
        return hashlib.sha256(json.dumps(fitted_from, sort_keys=True).encode()).hexdigest()[:16]

    def _refit_relation(self, edit: TrainedEdit) -> TrainedEdit:
        """``edit`` with its relation factor trained again under this editor's relation map, against
        the edits live now (see ``indexing.refit_relation``). Deterministic for an edit and its place."""
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            neuron = refit_relation(
                self.routed.router, edit, self._pool_normal, self._earlier_keys(), self.config, generator
            )
        return dataclasses.replace(edit, neuron=neuron, relation_map=self.relation_map)

    def _with_subject_span(self, edit: TrainedEdit) -> TrainedEdit:
        """``edit`` with its neuron's ``subject_span`` read from its prompt, as training reads it:
        the ``subject_len`` tokens ending at the subject's last. Left unknown (zeros) where the
        prompt does not spell its subject."""
        found = self._subject_in_prompt(edit)
        if found is None:
            return edit
        batch, end = found
        with torch.no_grad():
            keys = self._subject_layer_keys(batch)
        window = keys[0, end - int(edit.neuron.subject_len) + 1 : end + 1]
        span = F.normalize(self.routed.router.subject_norm(window).sum(0), dim=-1)
        return dataclasses.replace(edit, neuron=dataclasses.replace(edit.neuron, subject_span=span.cpu()))

    def _reads_question_of(self, edit: TrainedEdit) -> bool:
        """Whether the router reads questions with an encoder and ``edit`` lacks its own reading."""
        questions = self.routed.router.questions
        return questions is not None and (edit.neuron.question.shape != (questions.dim,)
                                           or not bool(edit.neuron.question.any()))

    def _with_question(self, edit: TrainedEdit) -> TrainedEdit:
        """``edit`` with its neuron's ``question`` read from its prompt, as training reads it (no
        model pass). Left unknown where the prompt does not spell its subject."""
        found = self._subject_in_prompt(edit)
        questions = self.routed.router.questions
        if found is None or questions is None:
            return edit
        batch, end = found
        length = int(edit.neuron.subject_len)
        question = questions.first_row(batch.input_ids, batch.content, batch.sentence, end, length)
        return dataclasses.replace(edit, neuron=dataclasses.replace(edit.neuron, question=question.cpu()))

    def _subject_in_prompt(self, edit: TrainedEdit) -> tuple[Batch, int] | None:
        """The edit's prompt as a batch of one, and the position of its subject's last token there;
        None where the prompt does not spell its subject."""
        assert edit.subject is not None
        tokens = prompt_tokens(self.tokenizer, edit.prompt)
        positions = subject_positions(tokens, edit.subject)
        if not positions:
            return None
        batch = encode(self.tokenizer, [edit.prompt]).to(self.device)
        return batch, batch.input_ids.shape[1] - len(tokens.ids) + positions[-1]

    def _earlier_keys(self) -> EarlierKeys:
        """The live edits' keys, normalised: kept between trainings and extended by the edits
        added since, so that each edit's keys are normalised once."""
        router = self.routed.router
        if self._earlier is None:
            self._earlier = EarlierKeys.empty(router.subject_norm.center.shape[0],
                                              router.relation_norm.center.shape[0], self.device)
        new = [self._edits[i] for i in self._ids[len(self._earlier):]]
        self._earlier = self._earlier.extend(router, new)
        return self._earlier

    def _neuron_metrics(
        self, rec: EditRecording, neuron: Neuron, subject_keys: torch.Tensor, relation_keys: torch.Tensor
    ) -> dict:
        """Activation of the new neuron on its prompt and rephrases, and which live edits fire there."""
        router = self.routed.router
        probe = router.empty_like()
        probe.append(neuron)
        a = probe.activations(routing_keys(rec))[:, 0]
        metrics: dict = {"activation": a[0].item(), "rephrase_activations": a[1:].tolist()}
        if self._ids:
            # Older neurons are not retrained. One that fires on this very prompt is a correction
            # this edit replaces: this edit overrides it (see Router).
            older = router.activations(routing_keys(rec))[0]
            metrics["older_max_activation"] = older.max().item()
            fires = [self._ids[i] for i in (older > self.config.theta).nonzero().flatten().tolist()]
            metrics["fires_on_prompt"] = fires
            metrics["overrides"] = [i for i in fires if asks_the_same(router, relation_keys, self._edits[i])]
        return metrics

    def _pool_keys_cached(self, cache_dir: str | os.PathLike | None) -> PoolKeys:
        prompts = negatives.pool_prompts()
        if cache_dir is None or self.device.type != "cpu":
            return self._pool_keys(prompts)
        questions = [q for q, _ in negatives.generic_questions()]
        reworded = [q for group in self._rephrasing_groups() for q, _ in group]
        key = keycache.fingerprint(
            self.model, [prompt_ids(self.tokenizer, p) for p in [*prompts, *questions, *reworded]],
            f"{self.subject_layer},{self.relation_layer},{self.layer},pooled={self.routed.router.pooled}",
        )
        cached = keycache.load(Path(cache_dir), key)
        # Every field of PoolKeys, the rewordings' keys only where they are read.
        names = [f.name for f in dataclasses.fields(PoolKeys) if reworded or f.name != "rephrasings"]
        if cached is None or set(cached) != set(names) or len(cached["relation"]) != len(prompts):
            pool = self._pool_keys(prompts)
            keycache.save(Path(cache_dir), key, {n: getattr(pool, n) for n in names})
            return pool
        return PoolKeys(**{n: cached[n].to(self.device) for n in names})

    def _rephrasing_groups(self) -> list[list[tuple[str, str]]]:
        # Their keys cost four times the rest of the pool's: read only where they are used.
        return negatives.rephrasing_groups() if self.config.rephrase_invariance > 0 else []

    def _pool_keys(self, prompts: Sequence[str]) -> PoolKeys:
        with torch.no_grad():
            subject, relation = [], []
            for chunk, batch in self._batches([(p, None) for p in prompts]):  # one pass reads both layers
                rec = self._record(batch)
                subject.append(rec.subject[batch.content])
                relation.append(self._read_relation(batch, rec.relation, chunk))
            pool = PoolKeys(torch.cat(subject), torch.cat(relation), self._relation_keys(negatives.generic_questions()))
            groups = self._rephrasing_groups()
            if groups:
                reworded = self._relation_keys([q for group in groups for q in group])
                # Each wording less its group's mean key.
                pool.rephrasings = torch.cat([k - k.mean(0) for k in reworded.split([len(g) for g in groups])])
            return pool


_IN_CACHE = InCache()


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
