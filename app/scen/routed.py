"""The routed down projection that replaces ``W_down`` in the edited layer.

It computes ``down(k)`` exactly as before, reads each sequence's routing keys,
and for sequences routed to an edit adds that edit's expert delta. One batch can
therefore mix base-model rows and rows served by different experts. Routing is
decided once per sequence, at prefill, and held for every generated token (a
*routing session*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.scen.expert_cache import ExpertCache, ExpertUnavailableError
from app.scen.experts import Expert
from app.scen.questions import QuestionReader
from app.scen.router_index import DEFAULT as DEFAULT_INDEX
from app.scen.router_index import IndexSettings, NeuronIndex

# The question factor's slope in cosine: from theta to 0.9 over 0.07 of cosine.
_QUESTION_SCALE = 20.0


@dataclass
class Routing:
    slots: torch.Tensor  # (B,) expert slot per sequence, -1 = base model
    activations: torch.Tensor  # (B,) activation of the chosen neuron, else the top one (0 when no neurons)


@dataclass
class RoutingKeys:
    """What one routing decision reads, per sequence."""

    subject: torch.Tensor  # (B, T, h_s) keys of the subject layer at every position
    content: torch.Tensor  # (B, T) bool, positions of the user's text
    relation: torch.Tensor  # (B, T, h) keys of the relation layer at every position
    at: torch.Tensor  # (B,) routing position (the last prompt token)
    # (B, T) long, where the sentence holding each position starts (``Batch.sentence``); None: one sentence
    sentence: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # (B, T) token ids, for the question's text (``Router.questions``)

    def rows(self, rows: torch.Tensor) -> RoutingKeys:
        sentence = None if self.sentence is None else self.sentence[rows]
        ids = None if self.ids is None else self.ids[rows]
        return RoutingKeys(self.subject[rows], self.content[rows], self.relation[rows], self.at[rows], sentence, ids)

    def last(self) -> torch.Tensor:  # (B, h) relation keys at the routing position
        return self.relation[torch.arange(len(self.at), device=self.at.device), self.at]


@dataclass
class ApartKeys:
    """The subject and relation layers' keys of the rows ``rows`` (n,) of a batch whose user's
    text runs to several sentences, each sentence read as if alone (``Batch.sentences_apart``):
    the sentences before cannot colour a later one's keys through attention, neither the name it
    holds ("... of Indira Gandhi. Where was Mahatma Gandhi born?") nor what it asks."""

    rows: torch.Tensor
    subject: torch.Tensor  # (n, T, h_s)
    relation: torch.Tensor  # (n, T, h)

    def over_subject(self, keys: torch.Tensor) -> torch.Tensor:
        """The whole batch's subject keys (B, T, h_s) with these rows' in their place."""
        return self._over(keys, self.subject)

    def over_relation(self, keys: torch.Tensor) -> torch.Tensor:
        """The whole batch's relation keys (B, T, h) with these rows' in their place."""
        return self._over(keys, self.relation)

    def _over(self, keys: torch.Tensor, apart: torch.Tensor) -> torch.Tensor:
        out = keys.clone()
        out[self.rows.to(out.device)] = apart.to(out.device, out.dtype)
        return out


@dataclass
class Neuron:
    """One edit's indexing neuron: two factors, each a vector over normalised keys and a bias."""

    subject: torch.Tensor  # (h_s,) fires on the edit's subject, at any position of the user's text
    subject_bias: torch.Tensor  # ()
    relation: torch.Tensor  # (h,) fires on the question asked (see Router)
    relation_bias: torch.Tensor  # ()
    subject_len: torch.Tensor  # () long, the subject's length in tokens: left out of the question's key
    # (h_s,) the edit's subject as a whole: its tokens' normalised subject keys summed, unit length;
    # zero where unknown (edits stored before it was kept, the paper's neuron): then unchecked.
    subject_span: torch.Tensor
    # (d,) the edit's question as the question encoder reads it (``questions``), its subject left
    # out; empty or zero where unknown: then the relation factor alone reads the question.
    question: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))

    def to(self, device: torch.device) -> Neuron:
        # Not dataclasses.astuple: it deep-copies every tensor first.
        return Neuron(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "neuron.") -> Neuron:
        """The neuron saved as ``prefix + field`` tensors. Files written before ``subject_span``
        was kept read it as zeros: those edits' subjects stay unchecked (see Router)."""
        fields = {f.name: tensors[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in tensors}
        fields.setdefault("subject_span", torch.zeros_like(fields["subject"]))
        fields.setdefault("question", torch.zeros(0))
        return cls(**fields)


class KeyNorm(nn.Module):
    """Whitening of one layer's keys, fitted on keys of ordinary prompts, then unit length.

    Raw keys of one layer are nearly collinear with large norms: a neuron on raw
    keys cannot tell prompts apart. Centred on the pool's mean and decorrelated
    with a shrunk covariance estimate, the directions every prompt shares stop
    dominating, and a rephrase lands near its edit's key while unrelated prompts
    do not.

    The map is kept in whichever of two equal forms costs fewer multiplications: a
    dense (h, h) matrix, or, for a pool of r < h/2 keys, a scaled identity plus a
    rank-r correction (2r per coordinate instead of h: on SmolLM2 the relation
    layer's pool of 120 prompts whitens a key 5x faster).
    """

    center: torch.Tensor
    whiten: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    outside: torch.Tensor

    def __init__(self, h: int, device: torch.device | None = None):
        super().__init__()
        self.register_buffer("center", torch.zeros(h, device=device))  # (h,)
        # Dense form: (x - center) @ whiten. Low-rank form (whiten empty):
        # outside * (x - center) + ((x - center) @ basis.T * scale) @ basis.
        self.register_buffer("whiten", torch.eye(h, device=device))  # (h, h), or (0, 0)
        self.register_buffer("basis", torch.zeros(0, h, device=device))  # (r, h), orthonormal rows
        self.register_buffer("scale", torch.zeros(0, device=device))  # (r,)
        self.register_buffer("outside", torch.ones((), device=device))

    @torch.no_grad()
    def fit(self, pool_keys: torch.Tensor, shrinkage: float) -> None:
        """Set the normalisation from raw keys of ordinary prompts, (N, h)."""
        X = pool_keys.double()
        self.center = X.mean(0).float()
        X = X - X.mean(0)
        N, h = X.shape
        # The covariance X'X/N has rank <= N (fewer pool keys than h), hence the shrinkage to a
        # scaled identity: (1 - s) X'X/N + s m I, m its mean variance. Its eigenvectors are X's
        # right singular vectors V plus any basis of their complement, so the inverse square
        # root is outside I + V diag(inside - outside) V', from a thin SVD (N x h) instead of an
        # h x h eigendecomposition.
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # Vh: (r, h)
        var = S.square() / N
        floor = (shrinkage * var.sum() / h).clamp_min(1e-12)
        inside = ((1 - shrinkage) * var + floor).clamp_min(1e-12).rsqrt()
        outside = floor.rsqrt()
        device = self.center.device
        self.outside = outside.float()
        if 2 * len(Vh) < h:
            self.whiten = torch.zeros(0, 0, device=device)
            self.basis, self.scale = Vh.float(), (inside - outside).float()
        else:
            whiten = (Vh.T * (inside - outside)) @ Vh
            whiten.diagonal().add_(outside)
            self.whiten = whiten.float()
            self.basis, self.scale = torch.zeros(0, h, device=device), torch.zeros(0, device=device)

    @torch.no_grad()
    def discount(self, variation: torch.Tensor, weight: float) -> None:
        """Weigh down the directions in which rewording a question moves its key.

        ``variation`` (N, h): raw keys of questions, each less the mean key of its wordings
        (the same question worded otherwise, ``negatives.rephrasing_groups``). After whitening,
        their covariance ``C`` says which directions a rewording moves; the map is followed by
        ``(weight C + (1 - weight) m I)^(-1/2)``, m the mean of C's diagonal, so those directions
        count for less in a cosine and the rest, what tells one question from another, for more.
        The map becomes dense."""
        d = self.whitened(variation.to(self.center.device)).double()
        C = d.T @ d / max(1, len(d))
        C = weight * C + (1 - weight) * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype, device=C.device)
        e, V = torch.linalg.eigh(C)
        rescale = (V * e.clamp_min(1e-12).rsqrt()) @ V.T
        # Scaled to keep the map's mean gain: only directions change weight, not the key's size.
        rescale /= rescale.diagonal().mean()
        self.whiten = (self.matrix().double() @ rescale).float()
        self.basis = torch.zeros(0, len(self.center), device=self.center.device)
        self.scale = torch.zeros(0, device=self.center.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The saved form sets the buffers' shapes.
        for name in ("whiten", "basis", "scale"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=self.center.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def matrix(self) -> torch.Tensor:
        """The map as a dense (h, h) matrix, whichever form it is kept in."""
        if self.whiten.numel():
            return self.whiten
        eye = torch.eye(len(self.center), device=self.center.device)
        return eye * self.outside + (self.basis.T * self.scale) @ self.basis

    def whitened(self, keys: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., h), not unit length
        x = keys.float() - self.center
        if self.whiten.numel():
            return x @ self.whiten
        return x * self.outside + (x @ self.basis.T * self.scale) @ self.basis

    def forward(self, keys: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., h)
        return F.normalize(self.whitened(keys), dim=-1)


def subject_window(at: torch.Tensor, length: torch.Tensor, T: int) -> torch.Tensor:
    """Positions (..., T) of a subject of ``length`` tokens ending at ``at``; both (...,)."""
    t = torch.arange(T, device=at.device)
    return (t <= at[..., None]) & (t > (at - length)[..., None])


def question_span(
    content: torch.Tensor, at: torch.Tensor, length: torch.Tensor, sentence: torch.Tensor | None,
) -> torch.Tensor:
    """Positions (..., B, T) whose keys make the question's key: the sentence that a subject of
    ``length`` tokens ending at ``at`` (..., B) ends in, less the subject, of the user's text
    (``content``, (B, T); ``sentence``, (B, T): where each position's sentence starts; None: one
    sentence). The other sentences ask nothing of that subject: a preamble ("I am writing a
    report. Who runs Globex?"), or a question about another one ("I read about Globex. Who runs
    Initech?"). Where nothing would be left ("Who runs it? Globex."), the whole text less the
    subject counts.

    The sentence is the one of the subject's last token, where its factor peaks: a subject's
    length in tokens is the edit prompt's, and differs where the subject is spelled otherwise
    ("Kenneth" opening a message is two tokens, " Kenneth" one), so its first token may fall
    in the sentence before."""
    T = content.shape[-1]
    keep = content & ~subject_window(at, length, T)
    if sentence is None:
        return keep
    rows = torch.arange(sentence.shape[0], device=sentence.device)
    start = sentence[rows, at.clamp(0, T - 1)]  # (..., B)
    own = keep & (sentence == start[..., None])
    return torch.where(own.any(-1, keepdim=True), own, keep)


def question_keys(keys: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Raw keys (..., T, h) averaged over the positions ``keep`` (..., T): the question's key."""
    w = keep.to(keys.dtype)
    return (keys * w[..., None]).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1.0)


class _Rows:
    """The live rows (the first ``len(router)``) of one of the router's per-neuron buffers."""

    NAMES = ("subject_w", "subject_b", "relation_w", "relation_b", "subject_len", "subject_span", "question")

    def __set_name__(self, owner: type, name: str) -> None:
        self.buffer = f"_{name}"

    def __get__(self, router: Router, owner: type | None = None) -> torch.Tensor:
        return getattr(router, self.buffer)[: router._n]


class Router(nn.Module):
    """The stacked indexing neurons (``W_merge``) and the routing rule.

    An edit's activation on a prompt is ``min(s, r)``: ``s``, the subject factor, is
    its best match over the positions of the user's text at an early layer (where a
    token's representation says which entity it names); ``r``, the relation factor,
    reads the *question's key*: the relation layer's keys averaged over the user's
    text less the edit's subject (the ``subject_len`` tokens ending where ``s`` peaks),
    which says what is asked of the subject and nothing of who it is. Only the sentence
    naming the subject counts ("I am writing a report. Who runs Globex?", ``question_span``):
    the others say nothing of what is asked of it, yet would weigh in the mean; and the keys of
    a text of several sentences are read with each sentence alone (``ApartKeys``), so that those
    before cannot colour the question's keys through attention either. Another subject
    with the same question fails ``s``; another question about the same subject fails
    ``r``. Each factor has a bias, so it fires on a cap around its key instead of on a
    half-space.

    With ``questions`` (a sentence encoder, ``app.scen.questions``) the question is also read
    as text: where an edit's subject factor passes theta, the subject's sentence with those
    ``subject_len`` tokens replaced by a placeholder is encoded, and ``q``, which passes theta at a
    cosine of ``question_cos`` with the edit's own question read alike, counts as well: the
    activation is ``min(s, max(r, q))``. The encoder places a rewording near its question where
    the model's keys at an early layer do not ("Which was the birthplace of Indira Gandhi?").
    With ``question_lead`` a reading below that cut counts too where it is nearer the edit's
    question than every generic question that asks something else (``QuestionReader.rival``)
    by that lead, at a cosine of at least ``question_floor``: how near a rewording comes
    differs from one question to the next ("X, a native speaker of" against "The mother
    tongue of X is"), and what it is nearer to says more than one cut for all.

    With ``pooled=False`` (the paper's single neuron) ``r`` reads the key at the
    routing position instead, and ``questions`` is not read.

    The subject factor is read ``subject_margin`` logits stricter than its neuron's own
    bias: over many edits, a subject factor only fairly sure of its entity fires on
    some other entity's name far too often. The relation factor is read
    ``relation_margin`` logits stricter (negative: more lenient), which trades rephrases
    reached against other questions about the subject caught.

    The subject factor reads one token, the subject's last, and names that share it ("Sonitpur
    district", "Thanjavur district"; "Lucian Freud", "Anna Freud") look alike there. So where
    ``subject_span_cos`` > 0 it also reads the whole name: the ``subject_len`` tokens ending
    where it peaks, their keys summed, must have at least that cosine with the edit's
    ``subject_span``, or the factor is 0 (checked where it passes theta).

    Of the edits whose activation exceeds theta, the strongest serves the sequence,
    except that an edit yields to any later one that overrides it and fires too: a
    later correction of the same fact takes over from the one it corrects, and
    rolling the correction back brings the older edit back.

    With ``index.min_neurons`` or more neurons (on the CPU) a prompt reads only the
    candidates an approximate index of the subject factors finds (``router_index``):
    the rule above is applied to them exactly, so a decision differs from reading
    every neuron only where the index misses an edit that fires. When no candidate
    fires, the activation reported is the best candidate's, not the best of all (and
    only its subject factor where no candidate's passes theta).
    """

    subject_w = _Rows()  # (E, h_s)
    subject_b = _Rows()  # (E,)
    relation_w = _Rows()  # W_merge, (E, h)
    relation_b = _Rows()  # (E,)
    subject_len = _Rows()  # (E,) long
    subject_span = _Rows()  # (E, h_s)
    question = _Rows()  # (E, d), d: the question encoder's size (0 without one)
    overrides: torch.Tensor

    def __init__(
        self, h_subject: int, h: int, theta: float, pooled: bool = True, subject_margin: float = 0.0,
        relation_margin: float = 0.0, subject_span_cos: float = 0.0, device: torch.device | None = None,
        index: IndexSettings | None = DEFAULT_INDEX, questions: QuestionReader | None = None,
        question_cos: float = 0.5, question_lead: float | None = None, question_floor: float = 0.3,
        rival_cos: float = 0.5,
    ):
        super().__init__()
        self.theta = theta
        self.questions = questions if pooled else None
        self.question_cos = question_cos
        self.question_lead = question_lead
        self.question_floor = question_floor
        self.rival_cos = rival_cos
        self.subject_margin = subject_margin
        self.relation_margin = relation_margin
        self.subject_span_cos = subject_span_cos
        self.pooled = pooled
        self.subject_norm = KeyNorm(h_subject, device)
        self.relation_norm = KeyNorm(h, device)
        # Each neuron's rows live in buffers with spare capacity that doubles when full: appending
        # one edit copies nothing, so adding N edits costs O(N) rather than O(N^2).
        self._n = 0
        self.register_buffer("_subject_w", torch.zeros(0, h_subject, device=device))
        self.register_buffer("_subject_b", torch.zeros(0, device=device))
        self.register_buffer("_relation_w", torch.zeros(0, h, device=device))
        self.register_buffer("_relation_b", torch.zeros(0, device=device))
        self.register_buffer("_subject_len", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("_subject_span", torch.zeros(0, h_subject, device=device))
        d = self.questions.dim if self.questions is not None else 0
        self.register_buffer("_question", torch.zeros(0, d, device=device))
        self.register_buffer("overrides", torch.zeros(0, 2, dtype=torch.long, device=device))  # (K, 2) newer, older
        self.index = NeuronIndex(h_subject, index)

    def __len__(self) -> int:
        return self._n

    def empty_like(self) -> Router:
        """A router with no neurons that reads keys as this one does (same norms, same rules)."""
        h_s, h = self.get_buffer("_subject_w").shape[1], self.get_buffer("_relation_w").shape[1]
        empty = Router(
            h_s, h, self.theta, self.pooled, self.subject_margin, self.relation_margin, self.subject_span_cos,
            device=self.get_buffer("_relation_w").device, index=self.index.settings, questions=self.questions,
            question_cos=self.question_cos, question_lead=self.question_lead, question_floor=self.question_floor,
            rival_cos=self.rival_cos,
        )
        empty.subject_norm, empty.relation_norm = self.subject_norm, self.relation_norm
        return empty

    @property
    def capacity(self) -> int:
        return self.get_buffer("_relation_w").shape[0]

    def subject_factor(
        self, subject: torch.Tensor, content: torch.Tensor, slots: torch.Tensor | None = None,
        normalised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each edit's subject factor (B, E) and the position where it peaks (B, E); with
        ``slots`` (K,), of those edits only (B, K). ``normalised``: ``subject`` is already
        ``subject_norm``'s output."""
        x = subject if normalised else self.subject_norm(subject)
        logits = x @ self._rows("subject_w", slots).T + (self._rows("subject_b", slots) - self.subject_margin)
        s, at = torch.sigmoid(logits).masked_fill(~content[..., None], 0.0).max(1)  # (B, E)
        if self.subject_span_cos > 0:
            # Checked only where the factor passes theta: elsewhere the edit cannot serve the row
            # anyway, and reading every edit's name would double the cost of a dense read.
            fired = (s > self.theta).any(0).nonzero().flatten()  # (K,) columns of s
            if len(fired):
                edits = fired if slots is None else slots[fired]
                s[:, fired] *= self._names_whole_subject(x * content[..., None], at[:, fired], edits)
        return s, at

    def _names_whole_subject(self, x: torch.Tensor, at: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """(B, E) bool: the ``subject_len`` tokens ending at ``at`` (B, E) read as each edit's
        ``subject_span``; ``x`` (B, T, h_s): normalised keys, zero outside the user's text."""
        span, length = self._rows("subject_span", slots), self._rows("subject_len", slots)  # (E, h_s), (E,)
        # A window's sum is a difference of prefix sums: of x . span for the numerator, and of
        # the Gram matrix x x' for the sum's squared norm (B, T, T), never a (B, E, h_s) tensor.
        hi = at + 1  # (B, E), prefix index just past the window
        lo = (hi - length).clamp_min(0)
        # In float64: over a long prompt the prefix sums grow far beyond the windows' own sums.
        dot = F.pad((x @ span.T).double().cumsum(1), (0, 0, 1, 0))  # (B, T + 1, E)
        dot = dot.gather(1, hi[:, None]).squeeze(1) - dot.gather(1, lo[:, None]).squeeze(1)
        gram = F.pad((x @ x.transpose(1, 2)).double().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)  # (B, (T+1)^2)
        n = x.shape[1] + 1

        def at_(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return gram.gather(1, i * n + j)

        sq = at_(hi, hi) - at_(lo, hi) - at_(hi, lo) + at_(lo, lo)
        known = span.abs().sum(-1) > 0  # (E,)
        return (dot >= self.subject_span_cos * sq.clamp_min(1e-12).sqrt()) | ~known

    def relation_factor(
        self, keys: RoutingKeys, subject_at: torch.Tensor, slots: torch.Tensor | None = None,
        whitened: torch.Tensor | None = None,
    ) -> torch.Tensor:  # -> (B, E), or (B, K) for ``slots``
        """``whitened``: ``relation_norm.whitened(keys.relation)`` where already computed."""
        relation_w, relation_b = self._rows("relation_w", slots), self._rows("relation_b", slots)
        if not self.pooled:
            logits = self.relation_norm(keys.last()) @ relation_w.T
            return torch.sigmoid(logits + (relation_b - self.relation_margin))
        # normalize(sum_t keep_t y_t) . w  =  sum_t keep_t (y_t . w) / sqrt(keep' G keep), G = y y':
        # one (B, T, E) product instead of a pooled (B, E, h) key per edit.
        y = self.relation_norm.whitened(keys.relation) if whitened is None else whitened  # (B, T, h)
        keep = question_span(
            keys.content, subject_at.transpose(0, 1), self._rows("subject_len", slots)[:, None], keys.sentence,
        ).permute(1, 2, 0).to(y.dtype)  # (B, T, E)
        dot = (keep * (y @ relation_w.T)).sum(1)  # (B, E)
        gram = y @ y.transpose(1, 2)  # (B, T, T)
        sq = torch.einsum("bse,bst,bte->be", keep, gram, keep)
        return torch.sigmoid(dot / sq.clamp_min(1e-12).sqrt() + (relation_b - self.relation_margin))

    def question_factor(
        self, keys: RoutingKeys, s: torch.Tensor, subject_at: torch.Tensor, slots: torch.Tensor | None = None,
    ) -> torch.Tensor:  # -> (B, E), or (B, K) for ``slots``
        """``q`` (see above) where the subject factor ``s`` (B, E) passes theta and the edit's
        question is known; 0 elsewhere, and everywhere without ``questions`` or token ids."""
        q = torch.zeros_like(s)
        if self.questions is None or keys.ids is None:
            return q
        question = self._rows("question", slots)  # (E, d)
        rows, cols = ((s > self.theta) & (question.abs().sum(-1) > 0)).nonzero().T
        if not len(rows):
            return q
        length = self._rows("subject_len", slots)[cols]
        read = self.questions(keys.ids, keys.content, keys.sentence, rows, subject_at[rows, cols], length)  # (P, d)
        read = read.to(question)
        cos = (read * question[cols]).sum(-1)
        above = cos - self.question_cos  # (P,) how far the reading clears its cut, in cosine
        if self.question_lead is not None:
            rival = self.questions.rival(read, question[cols], self.rival_cos)
            lead = torch.minimum(cos - rival - self.question_lead, cos - self.question_floor)
            above = torch.maximum(above, lead)
        at_theta = math.log(self.theta / (1 - self.theta))
        q[rows, cols] = torch.sigmoid(_QUESTION_SCALE * above + at_theta)
        return q

    def activations(self, keys: RoutingKeys) -> torch.Tensor:  # -> (B, E)
        s, at = self.subject_factor(keys.subject, keys.content)
        asked = torch.maximum(self.relation_factor(keys, at), self.question_factor(keys, s, at))
        return torch.minimum(s, asked)

    def route(self, keys: RoutingKeys) -> Routing:
        B = keys.relation.shape[0]
        if len(self) == 0:
            return Routing(keys.relation.new_full((B,), -1, dtype=torch.long), keys.relation.new_zeros(B))
        if self.index.active(len(self)) and self.subject_w.device.type == "cpu":
            return self._route_candidates(keys)
        a = self.activations(keys)  # (B, E)
        eligible = a > self.theta
        if len(self.overrides):
            newer, older = self.overrides.T  # (K,), (K,)
            yielded = torch.zeros_like(a).index_add_(1, older, eligible[:, newer].float())  # (B, E)
            eligible &= yielded == 0
        top, slot = a.masked_fill(~eligible, -1.0).max(-1)  # (B,)
        return Routing(torch.where(top >= 0, slot, -1), torch.where(top >= 0, top, a.amax(-1)))

    def _route_candidates(self, keys: RoutingKeys) -> Routing:
        """``route`` over the edits the index finds for any row of the batch: the same rule,
        applied to the candidates' exact activations (B, K)."""
        B = keys.relation.shape[0]
        content = keys.content
        # Only the user's text is read: the other positions stay zero, as in the full product,
        # where they are masked out.
        x = torch.zeros(keys.subject.shape, device=keys.subject.device)
        x[content] = self.subject_norm(keys.subject[content])  # (B, T, h_s)
        floor = math.log(self.theta / (1 - self.theta)) + self.subject_margin
        slots = self.index.candidates(x[content], self.subject_w, self.subject_b, floor)  # (K,)
        if not len(slots):
            return Routing(keys.relation.new_full((B,), -1, dtype=torch.long), keys.relation.new_zeros(B))
        s, at = self.subject_factor(x, content, slots, normalised=True)  # (B, K)
        # A row on which no candidate's subject factor passes theta routes nowhere, whatever
        # it asks: its relation keys are not even whitened, and its best subject factor stands
        # for its activation.
        a = s.clone()
        rows = (s > self.theta).any(1).nonzero().flatten()  # (B',)
        if len(rows):
            asked = keys.rows(rows)
            y = None
            if self.pooled:
                y = torch.zeros(asked.relation.shape, device=asked.relation.device)
                y[asked.content] = self.relation_norm.whitened(asked.relation[asked.content])  # (B', T, h)
            r = self.relation_factor(asked, at[rows], slots, whitened=y)
            q = self.question_factor(asked, s[rows], at[rows], slots)
            a[rows] = torch.minimum(s[rows], torch.maximum(r, q))
        eligible = a > self.theta
        pairs = _pairs_among(self.overrides, slots)
        if len(pairs):
            newer, older = pairs.T
            yielded = torch.zeros_like(a).index_add_(1, older, eligible[:, newer].float())  # (B, K)
            eligible &= yielded == 0
        top, at_k = a.masked_fill(~eligible, -1.0).max(-1)  # (B,)
        return Routing(torch.where(top >= 0, slots[at_k], -1), torch.where(top >= 0, top, a.amax(-1)))

    def index_now(self) -> None:
        """Build or update the index now rather than at the next prompt routed through it (after
        loading many edits at once, say)."""
        if self.index.active(len(self)):
            self.index.sync(self.subject_w, self.subject_b)

    def _rows(self, name: str, slots: torch.Tensor | None) -> torch.Tensor:
        rows = getattr(self, name)
        return rows if slots is None else rows[slots]

    def append(self, neuron: Neuron, overrides: Sequence[int] = ()) -> None:
        """Add a neuron in the next slot; it overrides the given older slots wherever both fire."""
        slot = self._n
        if overrides:
            # Copies every pair: paid only by the few edits that override others, so bringing many
            # ordinary edits live stays linear in their number.
            pairs = torch.tensor([[slot, o] for o in overrides], dtype=torch.long, device=self.overrides.device)
            self.overrides = torch.cat([self.overrides, pairs])
        if slot == self.capacity:
            self._reserve(max(16, 2 * slot))
        # An edit whose question the encoder did not read (or read at another size) keeps zeros.
        question = self.get_buffer("_question")[slot]
        question = neuron.question if neuron.question.shape == question.shape else torch.zeros_like(question)
        rows = (neuron.subject, neuron.subject_bias, neuron.relation, neuron.relation_bias, neuron.subject_len,
                neuron.subject_span, question)
        for name, value in zip(_Rows.NAMES, rows):
            getattr(self, f"_{name}")[slot] = value
        self._n += 1
        self.index.append(neuron.subject, neuron.subject_bias)

    def pop(self, slot: int) -> None:
        n = self._n
        for name in _Rows.NAMES:
            rows = getattr(self, f"_{name}")
            rows[slot : n - 1] = rows[slot + 1 : n].clone()
        self._n -= 1
        pairs = self.overrides[(self.overrides != slot).all(-1)]
        self.overrides = pairs - (pairs > slot).long()
        self.index.pop(slot)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` neurons at once (before adding many), instead of growing by doubling."""
        if n > self.capacity:
            self._reserve(n)

    def _reserve(self, capacity: int) -> None:
        for name in _Rows.NAMES:
            old = getattr(self, f"_{name}")
            new = old.new_zeros((capacity, *old.shape[1:]))
            new[: self._n] = old[: self._n]
            setattr(self, f"_{name}", new)


def _pairs_among(pairs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The (newer, older) slot pairs (P, 2) with both ends in ``slots`` (K,) sorted, as
    positions in ``slots``."""
    at = torch.searchsorted(slots, pairs).clamp_max(len(slots) - 1)  # (P, 2)
    return at[(slots[at] == pairs).all(-1)]


@dataclass
class RoutingSession:
    """One batch's routing: decided at the first forward pass (prefill), held for every later one."""

    at: torch.Tensor | None = None  # (B,) routing position per row; None: each row's last
    content: torch.Tensor | None = None  # (B, T) bool, the user's text; None: every position up to ``at``
    sentence: torch.Tensor | None = None  # (B, T) long, where each position's sentence starts; None: one
    apart: ApartKeys | None = None  # keys of the rows of several sentences, each read alone
    ids: torch.Tensor | None = None  # (B, T) token ids, for the question's text; None: not read
    routing: Routing | None = None
    experts: dict[int, Expert] | None = None  # slot -> expert, resolved with ``routing``


class SlotExperts:
    """The live experts in slot order (slot i <-> the router's neuron i), held in an
    ``ExpertCache`` by edit id: slots shift when an edit is removed, ids do not."""

    def __init__(self, cache: ExpertCache | None = None):
        self.cache = cache if cache is not None else ExpertCache()
        self._ids: list[str] = []
        self._unnamed = itertools.count()

    def __len__(self) -> int:
        return len(self._ids)

    def edit_id(self, slot: int) -> str:
        return self._ids[slot]

    def append(self, expert: Expert, edit_id: str | None = None) -> int:
        """Add an expert in the next slot, resident; returns the slot."""
        key = edit_id if edit_id is not None else f"<unnamed expert {next(self._unnamed)}>"
        self.cache.put(key, expert)
        self._ids.append(key)
        return len(self._ids) - 1

    def pop(self, slot: int) -> None:
        self.cache.drop(self._ids.pop(slot))

    def __delitem__(self, slot: int) -> None:
        self.pop(slot)

    def __getitem__(self, slot: int) -> Expert:
        expert = self.cache.get(self._ids[slot])
        if expert is None:
            raise ExpertUnavailableError(f"the expert of edit {self._ids[slot]} cannot be loaded")
        return expert

    def resolve(self, slots: Sequence[int]) -> dict[int, Expert | None]:
        """The expert of each slot, loaded where not resident; None where it cannot be."""
        return {slot: self.cache.get(self._ids[slot]) for slot in slots}

    def clear(self) -> None:
        self._ids.clear()
        self.cache.clear()


class RoutedDown(nn.Module):
    """Stands in for ``W_down`` of the edited layer: the base output plus, per sequence, the
    delta of the expert its routing chose.

    ``subject_down`` and ``relation_down`` are the down projections of the subject and
    relation layers (at or below this one; ``relation_down`` may be ``base`` itself):
    hooks keep the keys they saw in the current forward pass for the router.

    The experts a batch is routed to are resolved once, when it is routed, and held by its
    routing session until the session ends: the expert cache may page one out meanwhile
    without taking it from the batch. A slot whose expert cannot be loaded serves its
    rows with the base model, and the routing says so (slot -1).
    """

    def __init__(self, base: nn.Module, router: Router, subject_down: nn.Module, relation_down: nn.Module):
        super().__init__()
        self.base = base
        self.router = router
        self.experts = SlotExperts()
        self.session: RoutingSession | None = None
        self._bypass = False
        self._forced: torch.Tensor | None = None
        self._seen: dict[str, torch.Tensor] = {}
        self._taps = [
            module.register_forward_hook(self._keep(name))
            for name, module in (("subject", subject_down), ("relation", relation_down))
        ]

    def _keep(self, name: str):
        def hook(module, args, output) -> None:
            self._seen[name] = args[0]

        return hook

    def forward(self, k: torch.Tensor) -> torch.Tensor:  # (B, T, h) -> (B, T, d)
        out = self.base(k)
        if self._bypass:
            return out
        routed = self._routing(k)
        if routed is None:
            return out
        routing, experts = routed
        for slot, expert in experts.items():
            rows = routing.slots == slot
            out[rows] = out[rows] + expert(k[rows])
        return out

    def _routing(self, k: torch.Tensor) -> tuple[Routing, dict[int, Expert]] | None:
        if self._forced is not None:
            return self._resolved(Routing(self._forced, torch.ones_like(self._forced, dtype=torch.float)))
        if len(self.experts) == 0:
            return None
        session = self.session
        if session is not None and session.routing is not None and session.experts is not None:
            return session.routing, session.experts  # decode step: keep the prefill decision
        routing, experts = self._resolved(self.router.route(self.routing_keys(k, session)))
        if session is not None:
            session.routing, session.experts = routing, experts
        return routing, experts

    def _resolved(self, routing: Routing) -> tuple[Routing, dict[int, Expert]]:
        """The routing with the experts of its slots; rows of a slot whose expert cannot be
        loaded go to the base model."""
        found = self.experts.resolve([s for s in routing.slots.unique().tolist() if s >= 0])
        lost = [slot for slot, expert in found.items() if expert is None]
        if lost:
            base = torch.isin(routing.slots, torch.tensor(lost, device=routing.slots.device))
            routing = Routing(routing.slots.masked_fill(base, -1), routing.activations)
        return routing, {slot: expert for slot, expert in found.items() if expert is not None}

    def routing_keys(self, k: torch.Tensor, session: RoutingSession | None) -> RoutingKeys:
        """The keys of the forward pass in progress, given this layer's keys ``k`` (B, T, h)."""
        B, T, _ = k.shape
        at = session.at if session is not None and session.at is not None else None
        at = torch.full((B,), T - 1, device=k.device) if at is None else at.to(k.device)
        positions = torch.arange(T, device=k.device)[None, :]  # (1, T)
        content = session.content if session is not None else None
        content = positions <= at[:, None] if content is None else content.to(k.device)
        # A row without text of its own (an empty prompt) is matched at its routing position.
        content = content | (~content.any(1, keepdim=True) & (positions == at[:, None]))
        sentence = session.sentence.to(k.device) if session is not None and session.sentence is not None else None
        subject, relation = self._seen.get("subject", k), self._seen.get("relation", k)
        if session is not None and session.apart is not None:
            subject, relation = session.apart.over_subject(subject), session.apart.over_relation(relation)
        ids = session.ids.to(k.device) if session is not None and session.ids is not None else None
        return RoutingKeys(subject, content, relation, at, sentence, ids)

    def detach_taps(self) -> None:
        for tap in self._taps:
            tap.remove()

    # ---- contexts used by the editor -------------------------------------------------

    @contextlib.contextmanager
    def routing_session(
        self, at: torch.Tensor | None = None, content: torch.Tensor | None = None, sentence: torch.Tensor | None = None,
        apart: ApartKeys | None = None, ids: torch.Tensor | None = None,
    ):
        """Route each sequence once and hold it. Yields the session; its ``routing`` is set
        by the first forward pass."""
        self.session = RoutingSession(at, content, sentence, apart, ids)
        try:
            yield self.session
        finally:
            self.session = None

    @contextlib.contextmanager
    def forced(self, slots: torch.Tensor):
        """Use the given slot per sequence (-1 = base), bypassing the neurons."""
        self._forced = slots
        try:
            yield
        finally:
            self._forced = None

    @contextlib.contextmanager
    def bypassed(self):
        """Routing off: the base model's output, for recording keys and hidden states."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    # ---- live set ----------------------------------------------------------------------

    def append(
        self, expert: Expert, neuron: Neuron, overrides: Sequence[int] = (), edit_id: str | None = None
    ) -> int:
        slot = self.experts.append(expert, edit_id)
        self.router.append(neuron, overrides)
        return slot

    def pop(self, slot: int) -> None:
        del self.experts[slot]
        self.router.pop(slot)
