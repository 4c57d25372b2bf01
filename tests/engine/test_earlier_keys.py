"""The live edits' keys a new neuron trains against: normalised once, kept in step with the live set."""

from __future__ import annotations

import torch

from app.scen import Editor, ScenConfig
from app.scen.indexing import EarlierKeys, _nearest
from tests.utils.tiny_models import tiny_model

CFG = ScenConfig(layer=2, expert_max_steps=0)
EDITS = [
    ("Who is the CEO of Acme?", "Jane Doe", ["Who runs Acme?"], "Acme"),
    ("Where is Globex based?", "Springfield", [], "Globex"),
    ("Who founded Initech?", "Bill Lumbergh", ["Initech was founded by whom?", "Who started Initech?"], "Initech"),
    ("What does Umbrella make?", "Vaccines", [], "Umbrella"),
]


def from_scratch(editor: Editor) -> EarlierKeys:
    router = editor.routed.router
    h_s, h = router.subject_norm.center.shape[0], router.relation_norm.center.shape[0]
    return EarlierKeys.empty(h_s, h).extend(router, [editor.get(i) for i in editor.edit_ids])


def same(a: EarlierKeys, b: EarlierKeys) -> bool:
    return all(torch.allclose(x, y, atol=1e-6) if x.is_floating_point() else torch.equal(x, y)
               for x, y in zip(vars(a).values(), vars(b).values(), strict=True))


def test_kept_keys_follow_the_live_set_through_adds_and_removals():
    lm = tiny_model("llama")
    editor = Editor(lm.model, lm.tokenizer, CFG)
    for i, (prompt, target, rephrases, subject) in enumerate(EDITS[:3]):
        editor.add(f"e{i}", editor.train(prompt, target, rephrases, subject=subject))
    kept = editor._earlier_keys()
    assert len(kept) == 3 and same(kept, from_scratch(editor))
    assert kept.subject_owner.tolist() == [0, 0, 1, 2, 2, 2]
    editor.remove("e1")
    prompt, target, rephrases, subject = EDITS[3]
    editor.add("e3", editor.train(prompt, target, rephrases, subject=subject))
    kept = editor._earlier_keys()
    assert len(kept) == 3 and same(kept, from_scratch(editor))
    assert kept.relation_owner.tolist() == [0, 0, 1, 1, 1, 2]


def test_a_neuron_trains_against_the_nearest_earlier_keys_in_their_order():
    keys = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    anchor = keys[3]
    nearest = _nearest(keys, anchor, 4)
    order = (keys @ anchor).topk(4).indices.sort().values
    assert torch.equal(nearest, keys[order])
    assert torch.equal(_nearest(keys, anchor, 10), keys)
