"""Stage 2: an edit's indexing neuron, from recorded keys alone (no model pass).

Both factors of the neuron (see ``routed.Router``) are trained with the paper's
loss, each against the neighbours it is there to reject:

* subject factor - positives: the key at the subject's last token of the edit
  prompt and, in each rephrase, its best-matching token; negatives: every text
  token of the ordinary prompts, the edit prompt's own tokens outside the subject
  (its template), the prompt with other subjects, and earlier edits about other
  subjects;
* relation factor - positives: the question keys of the prompt and each rephrase
  (their text less the subject, found where the trained subject factor peaks);
  negatives: the ordinary prompts, generic questions with their entity left out
  (another question, whoever it is about), and earlier edits about the same
  subject that ask something else. Earlier edits about other subjects are no
  negatives here: they may ask the same question, which the subject factor
  already tells apart.

Without the subject factor (``subject_factor=False``) the relation factor alone
reads the last token's key and is trained against the ordinary prompts and every
earlier edit, as in the paper.

Earlier edits' keys come normalised once and stacked (``EarlierKeys``), and of them at most
``earlier_negatives``, those nearest the new edit's own key, are negatives: an edit's cost then
stays flat however many edits are live.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from app.scen.config import ScenConfig
from app.scen.routed import Neuron, Router, RoutingKeys, question_keys, question_span, subject_window
from app.scen.training import TrainedEdit, train_neuron

# A subject factor that always fires: sigmoid(30) is 1.0 in float32, so min(s, r) = r exactly.
_ALWAYS = 30.0


@dataclass
class PoolKeys:
    """Keys of the ordinary prompts: every text token's subject key, each prompt's relation key.

    The editor keeps them raw (to fit the normalisation) and normalised (what training reads)."""

    subject: torch.Tensor  # (N_s, h_s)
    relation: torch.Tensor  # (N, h)
    # Relation keys of generic questions about generic entities (relations.txt x entities.txt),
    # the entity left out: other questions, negatives of every edit's relation factor unless
    # they ask its own.
    questions: torch.Tensor  # (Q, h)
    # Relation keys of generic questions in several wordings, each less the mean key of its
    # wordings: what rewording a question changes (``KeyNorm.discount``); raw keys only.
    rephrasings: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (P, h)


@dataclass
class EditRecording:
    """Raw keys of the edit prompt (row 0) and its rephrases, and where the subject sits."""

    subject: torch.Tensor  # (R, T, h_s) subject keys at every position
    content: torch.Tensor  # (R, T) bool, the user's text
    relation: torch.Tensor  # (R, T, h) relation keys at every position
    at: torch.Tensor  # (R,) each row's last prompt token
    subject_at: int  # position of the subject's last token in row 0
    subject_span: torch.Tensor  # (T,) bool, row 0's tokens that belong to the subject
    sentence: torch.Tensor | None = None  # (R, T) long, where each position's sentence starts (Batch.sentence)
    ids: torch.Tensor | None = None  # (R, T) token ids


@dataclass
class EarlierKeys:
    """The live edits' keys, normalised once and stacked, in live order: what a new edit's
    neuron is trained against. Each row names its edit (``*_owner``, an index into the live
    edits); an edit's first subject row is its prompt's, its own subject key."""

    subject: torch.Tensor  # (M_s, h_s)
    subject_owner: torch.Tensor  # (M_s,) long
    relation: torch.Tensor  # (M_r, h)
    relation_owner: torch.Tensor  # (M_r,) long

    @classmethod
    def empty(cls, h_s: int, h: int, device: torch.device | None = None) -> EarlierKeys:
        long = torch.zeros(0, dtype=torch.long, device=device)
        return cls(torch.zeros(0, h_s, device=device), long, torch.zeros(0, h, device=device), long)

    def __len__(self) -> int:
        return int(self.subject_owner[-1]) + 1 if len(self.subject_owner) else 0

    def first_subject_rows(self) -> torch.Tensor:
        """(M_s,) bool: the rows that are an edit's own subject key, one per edit in live order."""
        first = torch.ones_like(self.subject_owner, dtype=torch.bool)
        first[1:] = self.subject_owner[1:] != self.subject_owner[:-1]
        return first

    def extend(self, router: Router, edits: Sequence[TrainedEdit]) -> EarlierKeys:
        """These keys followed by those of ``edits`` (normalised here, all in one product)."""
        if not edits:
            return self
        device = self.subject.device
        n = len(self)
        subject = router.subject_norm(torch.cat([e.subject_keys for e in edits]).to(device))
        relation = router.relation_norm(torch.cat([e.keys for e in edits]).to(device))
        s_owner = _owners([len(e.subject_keys) for e in edits], n, device)
        r_owner = _owners([len(e.keys) for e in edits], n, device)
        return EarlierKeys(
            torch.cat([self.subject, subject]), torch.cat([self.subject_owner, s_owner]),
            torch.cat([self.relation, relation]), torch.cat([self.relation_owner, r_owner]),
        )

    def without(self, slot: int) -> EarlierKeys:
        """These keys less those of the edit at ``slot``; later edits move one place up."""
        if slot >= len(self):
            return self
        s_keep, r_keep = self.subject_owner != slot, self.relation_owner != slot
        s_owner, r_owner = self.subject_owner[s_keep], self.relation_owner[r_keep]
        return EarlierKeys(self.subject[s_keep], s_owner - (s_owner > slot).long(),
                           self.relation[r_keep], r_owner - (r_owner > slot).long())


def _owners(rows: list[int], first: int, device: torch.device) -> torch.Tensor:
    counts = torch.tensor(rows, device=device)
    return torch.arange(first, first + len(rows), device=device).repeat_interleave(counts)


def routing_keys(rec: EditRecording) -> RoutingKeys:
    return RoutingKeys(rec.subject, rec.content, rec.relation, rec.at, rec.sentence, rec.ids)


def paper_neuron(
    router: Router, rec: EditRecording, pool: PoolKeys, earlier: EarlierKeys, config: ScenConfig,
    generator: torch.Generator,
) -> tuple[Neuron, torch.Tensor]:
    """The neuron and the raw relation keys (R, h) it was trained on; ``pool``: already normalised."""
    keys = routing_keys(rec).last()
    w, b = _paper_relation(router, keys, pool, earlier, config, generator)
    h_s = rec.subject.shape[-1]
    return Neuron(w.new_zeros(h_s), w.new_tensor(_ALWAYS), w, b, torch.tensor(0), w.new_zeros(h_s)), keys


def _paper_relation(
    router: Router, keys: torch.Tensor, pool: PoolKeys, earlier: EarlierKeys, config: ScenConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    r_pos = router.relation_norm(keys)
    earlier_keys = _nearest(earlier.relation, r_pos[0], config.earlier_negatives)
    return train_neuron(r_pos, torch.cat([pool.relation, earlier_keys]), config, generator)


def subject_positives(router: Router, rec: EditRecording, config: ScenConfig) -> torch.Tensor:
    """Raw subject keys (R, h_s): row 0's at its subject, each rephrase's at its best-matching text token."""
    keys = router.subject_norm(rec.subject)  # (R, T, h_s)
    anchor = keys[0, rec.subject_at]  # (h_s,)
    cos = (keys @ anchor).masked_fill(~rec.content, -2.0)  # (R, T)
    best = cos.argmax(-1)
    best[0] = rec.subject_at
    return rec.subject[torch.arange(len(best)), best]


def two_factor_neuron(
    router: Router, rec: EditRecording, subject_keys: torch.Tensor, pool: PoolKeys, other_subjects: torch.Tensor,
    earlier: EarlierKeys, config: ScenConfig, generator: torch.Generator,
) -> tuple[Neuron, torch.Tensor]:
    """The neuron and the raw question keys (R, h) its relation factor was trained on.

    ``subject_keys``: from ``subject_positives``; ``pool``: already normalised;
    ``other_subjects``: raw subject keys (M, h_s) of the prompt with other subjects."""
    s_norm = router.subject_norm
    s_pos = s_norm(subject_keys)  # (R, h_s)
    # A rephrase that does not name the subject (a pronoun, say) gives no subject positive.
    s_pos = s_pos[(s_pos @ s_pos[0]) >= config.same_subject_cos]

    own = ~rec.subject_span & rec.content[0]
    alike = _same_subject(earlier, s_pos[0], config)
    others = earlier.subject[~alike[earlier.subject_owner]]
    s_neg = torch.cat([
        pool.subject,
        s_norm(rec.subject[0][own]),
        _unlike(s_norm(other_subjects), s_pos[0], config.synthetic_max_cos),
        _nearest(others, s_pos[0], config.earlier_negatives),
    ])
    ws, bs = train_neuron(s_pos, s_neg, config, generator)

    # The question's key leaves out the subject where the trained subject factor finds it,
    # as routing will (Router.relation_factor).
    length = _run_length(rec.subject_span, rec.subject_at)
    peaks = (s_norm(rec.subject) @ ws).masked_fill(~rec.content, -torch.inf).argmax(-1)  # (R,)
    peaks[0] = rec.subject_at
    length_t = torch.tensor(length, device=peaks.device)
    keys = question_keys(rec.relation, question_span(rec.content, peaks, length_t, rec.sentence))  # (R, h)
    wr, br = _relation_factor(router, keys, alike, pool, earlier, config, generator)
    window = subject_window(peaks[:1], length_t, rec.content.shape[1])[0]
    span = F.normalize(s_norm(rec.subject[0][window]).sum(0), dim=-1)  # the whole name, as Router reads it
    return Neuron(ws, bs, wr, br, torch.tensor(length), span, own_question(router, rec, length)), keys


def own_question(router: Router, rec: EditRecording, length: int) -> torch.Tensor:
    """The edit prompt's question as the router's question encoder reads it (the ``length``
    tokens ending at the subject's last left out), (d,); empty without an encoder."""
    if router.questions is None or rec.ids is None:
        return torch.zeros(0)
    read = router.questions.first_row(rec.ids, rec.content, rec.sentence, rec.subject_at, length)
    return read.to(rec.subject.device)


def _same_subject(earlier: EarlierKeys, subject: torch.Tensor, config: ScenConfig) -> torch.Tensor:
    """(N,) bool: the earlier edits about the subject with normalised key ``subject``, by their own subject key."""
    return (earlier.subject @ subject)[earlier.first_subject_rows()] >= config.same_subject_cos


def _relation_factor(
    router: Router, keys: torch.Tensor, alike: torch.Tensor, pool: PoolKeys, earlier: EarlierKeys,
    config: ScenConfig, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relation factor's weights and bias from the raw question keys (R, h) of the prompt and
    rephrases; ``alike`` (N,): the earlier edits about the same subject."""
    r_pos = router.relation_norm(keys)
    r_neg = torch.cat([
        pool.relation,
        _unlike(pool.questions, r_pos[0], config.synthetic_max_cos),
        # An earlier edit of the same subject asking the same question is one this edit
        # supersedes, not a neighbour: it stays out of the negatives.
        _unlike(earlier.relation[alike[earlier.relation_owner]], r_pos[0], config.synthetic_max_cos),
    ])
    return train_neuron(r_pos, r_neg, config, generator, init_bias=config.relation_init_bias, lr=config.relation_lr)


def refit_relation(
    router: Router, edit: TrainedEdit, pool: PoolKeys, earlier: EarlierKeys, config: ScenConfig,
    generator: torch.Generator,
) -> Neuron:
    """``edit``'s neuron with its relation factor trained again from the raw keys it keeps, as the
    router now reads relation keys: for an edit trained under another relation map (another
    ``rephrase_invariance``, say), whose stored factor would be read in the wrong space. The
    subject factor is kept. ``pool``: already normalised; ``earlier``: the edits live before it."""
    device = pool.relation.device
    n, keys = edit.neuron.to(device), edit.keys.to(device)
    if not config.subject_factor or edit.subject is None:
        wr, br = _paper_relation(router, keys, pool, earlier, config, generator)
    else:
        alike = _same_subject(earlier, router.subject_norm(edit.subject_keys[:1].to(device))[0], config)
        wr, br = _relation_factor(router, keys, alike, pool, earlier, config, generator)
    return Neuron(n.subject, n.subject_bias, wr, br, n.subject_len, n.subject_span, n.question)


def _run_length(span: torch.Tensor, end: int) -> int:
    """Tokens of ``span`` (T,) bool in the unbroken run ending at ``end``."""
    n = 0
    while end - n >= 0 and bool(span[end - n]):
        n += 1
    return max(n, 1)


def _nearest(keys: torch.Tensor, anchor: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows of the normalised ``keys`` nearest ``anchor``, in their order; all when fewer.
    Far rows barely move a neuron that starts as a detector around its own key, so training on
    the nearest alone keeps an edit's cost flat however many edits are live."""
    if len(keys) <= k:
        return keys
    return keys[(keys @ anchor).topk(k).indices.sort().values]


def _unlike(keys: torch.Tensor, anchor: torch.Tensor, max_cos: float) -> torch.Tensor:
    """The normalised ``keys`` less those within ``max_cos`` of ``anchor``."""
    return keys[(keys @ anchor) < max_cos]


def asks_the_same(router: Router, relation_keys: torch.Tensor, edit: TrainedEdit, min_cos: float = 0.99) -> bool:
    """Whether ``edit``'s prompt asks, to the router, what the prompt with raw relation keys
    ``relation_keys`` (row 0) asks: their relation keys coincide. Only such an edit is
    overridden by a newer one: two edits whose neurons merely overlap keep the
    strongest-neuron rule."""
    a = router.relation_norm(relation_keys[:1])  # (1, h)
    b = router.relation_norm(edit.keys[:1].to(a.device))
    return (a @ b.T).item() >= min_cos
