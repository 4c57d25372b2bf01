"""Engine settings: one frozen dataclass, values chosen by measurement on SmolLM2-135M."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ScenConfig:
    # Layer whose down projection is edited and whose key routes. None: about 5/6
    # of the depth (layer 25 of 30 on SmolLM2), the best of a sweep there.
    layer: int | None = None
    # A sequence uses an expert when its neuron's activation exceeds theta.
    theta: float = 0.65

    # Routing. True: an activation is min(subject factor, relation factor) (see routed.Router);
    # False: the relation factor alone, trained against every earlier edit (the paper's neuron).
    subject_factor: bool = True
    # Layer whose keys carry the subject. None: a third of the depth (layer 10 of 30 on SmolLM2),
    # where the subject's last token separates one entity from another best.
    subject_layer: int | None = None
    # Earlier edits whose subject key is at least this similar (cosine of normalised keys)
    # count as the same subject: negatives of the relation factor instead of the subject factor.
    same_subject_cos: float = 0.7
    # The subject factor is read this much stricter (a logit margin over its neuron's bias): it
    # fires only where its neuron is sure the subject is named. Each subject factor's small
    # false-positive rate on other entities adds up over the live edits, while a rephrase naming
    # its own subject keeps a factor near 1. Read at routing, so it applies to stored edits alike.
    # At 1,000 edits 0 -> 3 took CounterFact's neighbourhood prompts routed from 14 % to 4 % and
    # ZsRE's other-subject probes from 10.7 % to 0.1 %, rephrases unchanged; 5 lost a rephrase
    # that names its subject elsewhere in the sentence (bench/results/specificity/README.md).
    subject_margin: float = 3.0
    # The subject factor reads the subject's last token, where names sharing it look alike
    # ("Sonitpur district" fired on "Thanjavur district is located in", "Lucian Freud" on "Anna
    # Freud"): most of what still leaked at 1,000 CounterFact edits. A prompt reaches an edit
    # only where its tokens ending at the factor's peak, as many as the edit's subject has, also
    # read as that subject as a whole: their summed keys' cosine with the edit's is at least this
    # (0: unchecked). Read at routing. At 1,000 edits (routing only, relation_margin -2.5),
    # 0.5 took CounterFact's neighbourhood prompts routed from 4.2 % to 2.0 % and its paraphrases
    # reached from 26.2 % to 25.5 %, while ZsRE's rephrases reached rose from 81.0 % to 81.6 %
    # (another edit sharing a last token no longer outbid their own); 0.6 cost CounterFact's
    # paraphrases 2 points more for 0.5 point of neighbourhood (bench/results/specificity/README.md).
    subject_span_cos: float = 0.5
    # Layer whose keys, averaged over the question less its subject, say what is asked (the
    # relation factor). None: a fifth of the depth (layer 6 of 30 on SmolLM2). On 200 records
    # of each development file this key told a paraphrase from another question about the same
    # subject far better than any layer's key at the last token (bench/question_keys.py).
    relation_layer: int | None = None
    # Made-up neighbours per edit (see negatives.py): the prompt with other subjects. Those
    # closer to the edit's own key than ``synthetic_max_cos`` are dropped: they may ask the
    # edited question itself. The same bound drops generic questions (another question about
    # any subject) too close to the edit's question.
    synthetic_subjects: int = 4
    synthetic_max_cos: float = 0.8
    # A new neuron is trained against at most this many keys of earlier edits (those nearest its
    # own): beyond it, its cost stops growing with the live edits. Below it, every earlier key
    # counts, as in the paper.
    earlier_negatives: int = 4096
    # Initial bias of the relation factor (with neuron_init_scale 20 it fires from a cosine of
    # about 0.27 to the edit's question key): the trade between rephrases reached and other
    # questions about the subject caught. On 100 ZsRE edits (routing only) -8 / -6 / -5 / -4 / -3
    # routed 54 / 60 / 67 / 73 / 78 % of the held-out rephrases and 1 / 4 / 6 / 7 / 10 % of the
    # same-subject probes; on CounterFact -5 kept the neighbourhood prompts routed at 3 %, -4 at 5 %.
    relation_init_bias: float = -5.0
    # The relation factor is read this much stricter at routing (negative: more lenient). Like
    # ``subject_margin`` it applies to stored edits and is swept without retraining. With the
    # rewording discount below, -2.5 reached the rephrases the discount brings closer
    # (bench/results/specificity/README.md); beside the question encoder, which reaches more of
    # them, -2.0 (see ``question_cos``).
    relation_margin: float = -2.0
    # Adam's step size for the relation factor (None: ``neuron_lr``). Read leniently, a factor
    # trained at 1e-3 barely moves off its starting cap and keeps firing on questions it was
    # trained against: "Where is Globex Corporation headquartered?" reached the chief
    # executive's edit at 0.785. 3e-3 pushes those known negatives below theta (0.61) and keeps
    # the rephrases; 1e-2 also tightens the cap around the prompt, losing rephrases (ZsRE, 300
    # edits, routing only: 0.80 of rephrases reached with 4.7 % of same-subject questions caught,
    # against 0.83 and 5.3 % at 1e-3; bench/routing_probes.py).
    relation_lr: float | None = 3e-3
    # Read the question also with a sentence encoder (all-MiniLM-L6-v2, ``app.scen.questions``):
    # an edit's question counts as asked where the relation factor or the encoder says so, the
    # encoder at a cosine of at least ``question_cos`` to the edit prompt's question, both with
    # their subject replaced by a placeholder. Read at routing, like the margins. At 300 edits
    # (routing only, bench/question_encoder.py), the relation factor alone at -2.5 reached 81.0 %
    # of ZsRE's rephrases with 4.0 % of its same-subject probes routed, and 33.3 % of
    # CounterFact's paraphrases with 9.0 %; with the encoder at 0.5 and the relation factor at
    # -2.0: 90.0 % with 5.0 %, and 35.3 % with 10.7 %. The encoder alone reached 89.3 % of ZsRE's
    # rephrases but only 23.0 % of CounterFact's, whose paraphrases often ask in other words
    # than the question's; 0.45 caught more probes for little, 0.55 and 0.6 lost rephrases.
    question_encoder: bool = True
    question_cos: float = 0.5
    # Below ``question_cos`` an edit's question still counts as asked where the encoder reads
    # the prompt's question nearer the edit's by ``question_lead`` than every generic question
    # that asks something else (``relations.txt``, ``rephrasings.txt``; "something else": none
    # of its wordings within ``rival_cos`` of the edit's question), at a cosine of at least
    # ``question_floor``. None: the cut alone. Read at routing.
    question_lead: float | None = 0.0
    question_floor: float = 0.3
    rival_cos: float = 0.5

    # Stage 1, the expert. "full" trains a dense copy of W_down (the paper); "lowrank" keeps
    # that copy's change at rank r (``training.fit_expert``): 1/38 of the storage at r=8
    # (93 KB instead of 3.5 MB on SmolLM2). At 200 sequential edits of each development file
    # rank 8 matched the full expert on every figure but one (ZsRE generality 0.802 against
    # 0.800), in 0.15-0.22 more steps an edit (bench/results/expert_size.json).
    expert: Literal["full", "lowrank"] = "lowrank"
    rank: int = 8
    # Adam's step size for the expert. At 200 sequential edits of each development file, 1e-2
    # met the stopping rule in 3.5-3.7 steps where 2e-3 took 13-14, with every reliability,
    # generality and locality figure within one record; targets of 64 and 128 tokens, which
    # hit the step limit at 2e-3 without reproducing, converge (bench/results/expert_lr/).
    expert_lr: float = 1e-2
    expert_max_steps: int = 40
    # Keep training past the first exact reproduction until every target token
    # has at least this probability; a confident expert carries better to rephrases.
    expert_min_prob: float = 0.8
    # Noisy copies of the recorded hidden states trained alongside the prompt
    # (noise relative to each vector's RMS): a rephrase reaches the expert with
    # hidden states near the prompt's, not equal to them.
    expert_noise: float = 0.0
    expert_noise_copies: int = 0
    # Train the expert also on its prompt as the last turn of a conversation (under another
    # system message: chats.TRAINING_CONVERSATION), one more row of the same batch. Trained on
    # the prompt alone, an expert routed correctly inside a client's chat often missed its target
    # there: the conversation moves the edited layer's keys at the answer. Only for models with a
    # chat template.
    expert_in_conversation: bool = True

    # Stage 2, the indexing neuron (paper loss: alpha, beta, m).
    alpha: float = 0.7
    beta: float = 0.3
    margin_weight: float = 2.0
    neuron_lr: float = 1e-3
    neuron_steps: int = 50
    # A neuron starts as a cosine detector around its own normalised key:
    # sigmoid(scale * cos + bias), i.e. active above cos = -bias/scale (0.4).
    neuron_init_scale: float = 20.0
    neuron_init_bias: float = -8.0
    # Gaussian copies of the edit's normalised key as extra positives (0 = none:
    # on ZsRE they widened the neuron onto unrelated prompts more than onto rephrases).
    positive_noise: float = 0.1
    positive_copies: int = 0
    # Shrinkage of the pool covariance used to whiten keys (the pool is far
    # smaller than the key size, so the raw estimate is singular).
    key_shrinkage: float = 0.1
    # How far the relation keys discount what rewording a question changes (0: not at all,
    # the pool's whitening alone), learnt from generic questions in several wordings
    # (``rephrasings.txt``, ``KeyNorm.discount``). At 1,000 edits with relation_margin -2.5,
    # 0.2 reached ZsRE generality 0.903 with 4 % of same-subject questions caught, 0 reached
    # 0.897 with 8.6 % (bench/results/specificity/README.md). The relation map turns dense.
    # Stored edits trained under another value have their relation factor refit as they come
    # live (``Editor.add``).
    rephrase_invariance: float = 0.2

    # Request limits, in tokens.
    max_prompt_tokens: int = 512
    max_target_tokens: int = 512

    seed: int = 0

    def resolved_layer(self, n_layers: int) -> int:
        return self.layer if self.layer is not None else round(n_layers * 5 / 6)

    def resolved_subject_layer(self, n_layers: int) -> int:
        return self.subject_layer if self.subject_layer is not None else round(n_layers / 3)

    def resolved_relation_layer(self, n_layers: int) -> int:
        if not self.subject_factor:
            return self.resolved_layer(n_layers)  # the paper: the edited layer's own key
        return self.relation_layer if self.relation_layer is not None else round(n_layers / 5)

    def replace(self, **changes) -> ScenConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_overrides(cls, overrides: typing.Iterable[str], base: ScenConfig | None = None) -> ScenConfig:
        """Build from ``key=value`` strings (CLI ``--set``), converting to each field's type."""
        base = base or cls()
        hints = typing.get_type_hints(cls)
        changes = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(cls))
                raise ValueError(f"bad setting {item!r}: expected key=value with key one of {known}")
            changes[key] = parse_value(raw.strip(), hints[key], key)
        return dataclasses.replace(base, **changes)


def parse_value(raw: str, hint, key: str):
    """``raw`` as a value of the type ``hint`` (``none`` for an optional one); ValueError names ``key``."""
    args = typing.get_args(hint)
    if raw.lower() == "none" and type(None) in args:
        return None
    if typing.get_origin(hint) is Literal:
        if raw not in args:
            raise ValueError(f"bad value for {key}: {raw!r}, expected one of {list(args)}")
        return raw
    kinds = [a for a in args if a is not type(None)] or [hint]
    if kinds[0] is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"bad value for {key}: {raw!r}, expected true or false")
        return raw.lower() in ("true", "1")
    try:
        return kinds[0](raw)
    except ValueError as exc:
        raise ValueError(f"bad value for {key}: {raw!r} ({exc})") from None
