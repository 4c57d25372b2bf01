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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.scen.config import ScenConfig
from app.scen.routed import Neuron, Router, RoutingKeys, question_keys, subject_window
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


@dataclass
class EditRecording:
    """Raw keys of the edit prompt (row 0) and its rephrases, and where the subject sits."""

    subject: torch.Tensor  # (R, T, h_s) subject keys at every position
    content: torch.Tensor  # (R, T) bool, the user's text
    relation: torch.Tensor  # (R, T, h) relation keys at every position
    at: torch.Tensor  # (R,) each row's last prompt token
    subject_at: int  # position of the subject's last token in row 0
    subject_span: torch.Tensor  # (T,) bool, row 0's tokens that belong to the subject


def routing_keys(rec: EditRecording) -> RoutingKeys:
    return RoutingKeys(rec.subject, rec.content, rec.relation, rec.at)


def paper_neuron(
    router: Router, rec: EditRecording, pool: PoolKeys, earlier: Sequence[TrainedEdit], config: ScenConfig,
    generator: torch.Generator,
) -> tuple[Neuron, torch.Tensor]:
    """The neuron and the raw relation keys (R, h) it was trained on; ``pool``: already normalised."""
    keys = routing_keys(rec).last()
    earlier_keys = [router.relation_norm(e.keys.to(pool.relation.device)) for e in earlier]
    w, b = train_neuron(router.relation_norm(keys), torch.cat([pool.relation, *earlier_keys]), config, generator)
    h_s = rec.subject.shape[-1]
    return Neuron(w.new_zeros(h_s), w.new_tensor(_ALWAYS), w, b, torch.tensor(0)), keys


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
    earlier: Sequence[TrainedEdit], config: ScenConfig, generator: torch.Generator,
) -> tuple[Neuron, torch.Tensor]:
    """The neuron and the raw question keys (R, h) its relation factor was trained on.

    ``subject_keys``: from ``subject_positives``; ``pool``: already normalised;
    ``other_subjects``: raw subject keys (M, h_s) of the prompt with other subjects."""
    s_norm, r_norm = router.subject_norm, router.relation_norm
    s_pos = s_norm(subject_keys)  # (R, h_s)
    # A rephrase that does not name the subject (a pronoun, say) gives no subject positive.
    s_pos = s_pos[(s_pos @ s_pos[0]) >= config.same_subject_cos]

    own = ~rec.subject_span & rec.content[0]
    alike = [_cos(s_norm(e.subject_keys[:1].to(s_pos)), s_pos[:1]) >= config.same_subject_cos for e in earlier]
    same_subject = [e for e, same in zip(earlier, alike) if same]
    others = [e for e, same in zip(earlier, alike) if not same]
    s_neg = torch.cat([
        pool.subject,
        s_norm(rec.subject[0][own]),
        _unlike(s_norm(other_subjects), s_pos[0], config.synthetic_max_cos),
        *(s_norm(e.subject_keys.to(s_pos.device)) for e in others),
    ])
    ws, bs = train_neuron(s_pos, s_neg, config, generator)

    # The question's key leaves out the subject where the trained subject factor finds it,
    # as routing will (Router.relation_factor).
    length = _run_length(rec.subject_span, rec.subject_at)
    peaks = (s_norm(rec.subject) @ ws).masked_fill(~rec.content, -torch.inf).argmax(-1)  # (R,)
    peaks[0] = rec.subject_at
    window = subject_window(peaks, torch.tensor(length, device=peaks.device), rec.content.shape[1])
    keep = rec.content & ~window  # (R, T)
    keys = question_keys(rec.relation, keep)  # (R, h)
    r_pos = r_norm(keys)
    r_neg = torch.cat([
        pool.relation,
        _unlike(pool.questions, r_pos[0], config.synthetic_max_cos),
        # An earlier edit of the same subject asking the same question is one this edit
        # supersedes, not a neighbour: it stays out of the negatives.
        *(_unlike(r_norm(e.keys.to(r_pos.device)), r_pos[0], config.synthetic_max_cos) for e in same_subject),
    ])
    wr, br = train_neuron(r_pos, r_neg, config, generator, init_bias=config.relation_init_bias)
    return Neuron(ws, bs, wr, br, torch.tensor(length)), keys


def _run_length(span: torch.Tensor, end: int) -> int:
    """Tokens of ``span`` (T,) bool in the unbroken run ending at ``end``."""
    n = 0
    while end - n >= 0 and bool(span[end - n]):
        n += 1
    return max(n, 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.reshape(-1) @ b.reshape(-1)).item()


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
