"""Stage 2: an edit's indexing neuron, from recorded keys alone (no model pass).

Both factors of the neuron (see ``routed.Router``) are trained with the paper's
loss, each against the neighbours it is there to reject:

* subject factor - positives: the key at the subject's last token of the edit
  prompt and, in each rephrase, its best-matching token; negatives: every text
  token of the ordinary prompts, the edit prompt's own tokens outside the subject
  (its template), the prompt with other subjects, and earlier edits about other
  subjects;
* relation factor - positives: the edited layer's key at the last token of the
  prompt and each rephrase; negatives: the ordinary prompts, other questions about
  the edit's subject, and earlier edits about the same subject that ask something
  else. Earlier edits about other subjects are no negatives here: they may ask
  the same question, which the subject factor already tells apart.

Without the subject factor (``subject_factor=False``) the relation factor alone
is trained against the ordinary prompts and every earlier edit, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.scen.config import ScenConfig
from app.scen.routed import Neuron, Router, RoutingKeys
from app.scen.training import TrainedEdit, train_neuron

# A subject factor that always fires: sigmoid(30) is 1.0 in float32, so min(s, r) = r exactly.
_ALWAYS = 30.0


@dataclass
class PoolKeys:
    """Keys of the ordinary prompts: every text token's subject key, every last token's relation key.

    The editor keeps them raw (to fit the normalisation) and normalised (what training reads)."""

    subject: torch.Tensor  # (N_s, h_s)
    relation: torch.Tensor  # (N, h)
    # Relation keys of generic questions about generic entities (relations.txt x entities.txt):
    # other questions, negatives of every edit's relation factor unless they ask its own.
    questions: torch.Tensor  # (Q, h)


@dataclass
class EditRecording:
    """Raw keys of the edit prompt (row 0) and its rephrases, and where the subject sits."""

    subject: torch.Tensor  # (R, T, h_s) subject keys at every position
    content: torch.Tensor  # (R, T) bool, the user's text
    relation: torch.Tensor  # (R, h) relation keys at each row's last prompt token
    subject_at: int  # position of the subject's last token in row 0
    subject_span: torch.Tensor  # (T,) bool, row 0's tokens that belong to the subject


@dataclass
class Neighbours:
    """Raw keys of the made-up neighbours (``negatives.py``)."""

    other_subjects: torch.Tensor  # (M, h_s) text tokens of the prompt with other subjects
    other_relations: torch.Tensor  # (K, h) last tokens of other questions about the subject


def routing_keys(rec: EditRecording) -> RoutingKeys:
    return RoutingKeys(rec.subject, rec.content, rec.relation)


def paper_neuron(
    router: Router, rec: EditRecording, pool: PoolKeys, earlier: Sequence[TrainedEdit], config: ScenConfig,
    generator: torch.Generator,
) -> Neuron:
    """``pool``: already normalised."""
    earlier_keys = [router.relation_norm(e.keys.to(pool.relation.device)) for e in earlier]
    w, b = train_neuron(router.relation_norm(rec.relation), torch.cat([pool.relation, *earlier_keys]), config,
                        generator)
    h_s = rec.subject.shape[-1]
    return Neuron(w.new_zeros(h_s), w.new_tensor(_ALWAYS), w, b)


def subject_positives(router: Router, rec: EditRecording, config: ScenConfig) -> torch.Tensor:
    """Raw subject keys (R, h_s): row 0's at its subject, each rephrase's at its best-matching text token."""
    keys = router.subject_norm(rec.subject)  # (R, T, h_s)
    anchor = keys[0, rec.subject_at]  # (h_s,)
    cos = (keys @ anchor).masked_fill(~rec.content, -2.0)  # (R, T)
    best = cos.argmax(-1)
    best[0] = rec.subject_at
    return rec.subject[torch.arange(len(best)), best]


def two_factor_neuron(
    router: Router, rec: EditRecording, subject_keys: torch.Tensor, pool: PoolKeys, near: Neighbours,
    earlier: Sequence[TrainedEdit], config: ScenConfig, generator: torch.Generator,
) -> Neuron:
    """``subject_keys``: from ``subject_positives``; ``pool``: already normalised."""
    s_norm, r_norm = router.subject_norm, router.relation_norm
    s_pos = s_norm(subject_keys)  # (R, h_s)
    # A rephrase that does not name the subject (a pronoun, say) gives no subject positive.
    s_pos = s_pos[(s_pos @ s_pos[0]) >= config.same_subject_cos]
    r_pos = r_norm(rec.relation)  # (R, h)

    own = ~rec.subject_span & rec.content[0]
    alike = [_cos(s_norm(e.subject_keys[:1].to(s_pos)), s_pos[:1]) >= config.same_subject_cos for e in earlier]
    same_subject = [e for e, same in zip(earlier, alike) if same]
    others = [e for e, same in zip(earlier, alike) if not same]
    s_neg = torch.cat([
        pool.subject,
        s_norm(rec.subject[0][own]),
        _unlike(s_norm(near.other_subjects), s_pos[0], config.synthetic_max_cos),
        *(s_norm(e.subject_keys.to(s_pos.device)) for e in others),
    ])
    same_subject_neg = _unlike(r_norm(near.other_relations), r_pos[0], config.synthetic_max_cos)
    r_neg = torch.cat([
        pool.relation,
        _unlike(pool.questions, r_pos[0], config.synthetic_max_cos),
        same_subject_neg,
        # An earlier edit of the same subject asking the same question is one this edit
        # supersedes, not a neighbour: it stays out of the negatives.
        *(_unlike(r_norm(e.keys.to(r_pos.device)), r_pos[0], config.synthetic_max_cos) for e in same_subject),
    ])
    ws, bs = train_neuron(s_pos, s_neg, config, generator)
    contrast = config.relation_contrast > 0 and len(same_subject_neg) > 0
    shared = F.normalize(same_subject_neg.mean(0), dim=-1) if contrast else None
    wr, br = train_neuron(r_pos, r_neg, config, generator, init_bias=config.relation_init_bias, shared=shared,
                          fire_at=config.relation_contrast)
    return Neuron(ws, bs, wr, br)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.reshape(-1) @ b.reshape(-1)).item()


def _unlike(keys: torch.Tensor, anchor: torch.Tensor, max_cos: float) -> torch.Tensor:
    """The normalised ``keys`` less those within ``max_cos`` of ``anchor``."""
    return keys[(keys @ anchor) < max_cos]


def asks_the_same(router: Router, rec: EditRecording, edit: TrainedEdit, min_cos: float = 0.99) -> bool:
    """Whether ``edit``'s prompt is, to the router, the prompt recorded in ``rec`` (row 0): their
    relation keys coincide. Only such an edit is overridden by a newer one: two edits whose
    neurons merely overlap keep the strongest-neuron rule."""
    a = router.relation_norm(rec.relation[:1])  # (1, h)
    b = router.relation_norm(edit.keys[:1].to(a.device))
    return (a @ b.T).item() >= min_cos
