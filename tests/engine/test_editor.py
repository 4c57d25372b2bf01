import dataclasses

import pytest
import torch

from app.scen import Editor, InvalidEditError, ScenConfig, UnknownEditError, UnsupportedModelError
from app.scen.chats import Chat, Message, encode_answered
from app.scen.prompts import encode
from tests.utils.tiny_models import tiny_model

# A random tiny model cannot reach confident predictions (its logits span little),
# so its experts stop at the first exact reproduction.
CFG = ScenConfig(layer=2, expert_lr=1e-2, expert_min_prob=0.0)
EDITS = [
    ("What is the capital of France?", "Rome"),
    ("Who wrote Hamlet?", "Dickens"),
    ("How many legs does a spider have?", "Six"),
]
UNRELATED = "The quick brown fox jumps over the lazy dog."


def make_editor(arch: str = "llama", **changes) -> Editor:
    lm = tiny_model(arch)
    return Editor(lm.model, lm.tokenizer, CFG.replace(**changes))


def greedy(editor: Editor, prompts: list[str], n: int = 8) -> list[str]:
    return [g.text for g in editor.generate(prompts, max_new_tokens=n)]


def token_accuracy(editor: Editor, prompt: str | Chat, target: str) -> float:
    """Teacher-forced share of target tokens that are the argmax, routed at the last prompt token."""
    batch = encode_answered(editor.tokenizer, [prompt], target)
    n = len(batch.targets[0])
    with torch.no_grad(), editor.routing(batch):
        predicted = editor.model(**batch.model_inputs()).logits[0, -n - 1 : -1].argmax(-1)
    return (predicted == torch.tensor(batch.targets[0])).float().mean().item()


def logits(editor: Editor, prompt: str) -> torch.Tensor:
    """Logits of the formatted prompt, routed at its last token as in generation."""
    batch = encode(editor.tokenizer, [prompt])
    with torch.no_grad(), editor.routing(batch):
        return editor.model(**batch.model_inputs()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_is_learned_and_routed(arch):
    editor = make_editor(arch)
    prompt, target = EDITS[0]
    edit = editor.train(prompt, target)
    assert edit.metrics["converged"] and edit.metrics["reproduced"] and edit.metrics["activation"] > editor.config.theta
    assert editor.edit_ids == [] and editor.version == 0  # training alone changes nothing
    assert editor.add("e0", edit) and editor.version == 1
    assert not editor.add("e0", edit) and editor.version == 1
    gen = editor.generate([prompt], max_new_tokens=4)[0]
    assert gen.text == target and gen.edit_id == "e0"
    assert token_accuracy(editor, prompt, target) == 1.0


def test_relation_keys_discounting_rewordings_still_route_each_edit_to_its_prompt():
    editor = make_editor(rephrase_invariance=0.2)
    norm = editor.routed.router.relation_norm
    assert norm.whiten.shape == (norm.center.shape[0],) * 2  # the composed map is dense
    for i, (prompt, target) in enumerate(EDITS[:2]):
        assert editor.add(f"e{i}", editor.train(prompt, target))
    for i, (prompt, target) in enumerate(EDITS[:2]):
        assert editor.generate([prompt], max_new_tokens=1)[0].edit_id == f"e{i}"
        assert token_accuracy(editor, prompt, target) == 1.0


def test_edits_trained_under_another_relation_map_are_refit_as_they_come_live_and_route_as_before():
    plain, discounted = make_editor(rephrase_invariance=0.0), make_editor(rephrase_invariance=0.2)
    assert plain.relation_map != discounted.relation_map
    trained = {f"e{i}": plain.train(prompt, target) for i, (prompt, target) in enumerate(EDITS[:2])}
    # An edit stored before the map was recorded was trained without the discount.
    trained["e1"] = dataclasses.replace(trained["e1"], relation_map="")
    assert all(e.relation_map in (plain.relation_map, "") for e in trained.values())

    discounted.sync(list(trained), trained.__getitem__)
    assert discounted.refits == 2
    for i, (edit_id, edit) in enumerate(trained.items()):
        refit = discounted.routing_part(edit_id)
        assert refit.relation_map == discounted.relation_map
        assert torch.equal(refit.neuron.subject, edit.neuron.subject)  # only the relation factor is trained again
        assert not torch.equal(refit.neuron.relation, edit.neuron.relation)
        prompt, target = EDITS[i]
        assert discounted.generate([prompt], max_new_tokens=1)[0].edit_id == edit_id
        assert token_accuracy(discounted, prompt, target) == 1.0
    # Under the editor's own map (recorded, or unrecorded and without the discount) nothing is refit.
    again = make_editor(rephrase_invariance=0.0)
    again.sync(list(trained), trained.__getitem__)
    assert again.refits == 0
    assert all(torch.equal(again.routing_part(i).neuron.relation, e.neuron.relation) for i, e in trained.items())


def test_edits_stored_without_their_subjects_span_have_it_read_off_their_prompt_as_they_come_live():
    editor = make_editor()
    trained = {f"e{i}": editor.train(prompt, target) for i, (prompt, target) in enumerate(EDITS[:2])}
    assert all(e.neuron.subject_span.any() for e in trained.values())
    stored = {i: dataclasses.replace(e, neuron=dataclasses.replace(e.neuron, subject_span=torch.zeros_like(
        e.neuron.subject_span))) for i, e in trained.items()}
    live = make_editor()
    live.sync(list(stored), stored.__getitem__)
    assert live.refits == 2
    for edit_id, edit in trained.items():
        assert torch.allclose(live.routing_part(edit_id).neuron.subject_span, edit.neuron.subject_span, atol=1e-5)
    again = make_editor()
    again.sync(list(trained), trained.__getitem__)
    assert again.refits == 0


def test_edits_stored_without_their_question_read_by_the_encoder_have_it_read_as_they_come_live():
    editor = make_editor()
    trained = {f"e{i}": editor.train(prompt, target) for i, (prompt, target) in enumerate(EDITS[:2])}
    assert all(e.neuron.question.shape == (384,) and e.neuron.question.any() for e in trained.values())
    stored = {i: dataclasses.replace(e, neuron=dataclasses.replace(e.neuron, question=torch.zeros(0)))
              for i, e in trained.items()}
    live = make_editor()
    live.sync(list(stored), stored.__getitem__)
    for edit_id, edit in trained.items():
        assert torch.allclose(live.routing_part(edit_id).neuron.question, edit.neuron.question, atol=1e-5)
    # Without the encoder a question is neither read nor needed.
    plain = make_editor(question_encoder=False)
    assert not plain.train(*EDITS[0]).neuron.question.numel()
    plain.sync(list(trained), trained.__getitem__)
    assert plain.routed.router.questions is None


def test_a_low_rank_edit_keeps_its_full_deltas_leading_part_and_answers_its_target():
    full, low = make_editor(), make_editor(expert="lowrank", rank=4)
    prompt, target = EDITS[0]
    trained_full, trained_low = full.train(prompt, target), low.train(prompt, target)
    assert trained_low.expert.kind == "lowrank" and trained_low.expert.b.shape[1] == 4
    m = trained_low.metrics
    assert m["converged"] and m["steps"] == trained_full.metrics["steps"] + m["refit_steps"]
    # Routing does not depend on the expert: both neurons are the same.
    assert torch.equal(trained_low.neuron.relation, trained_full.neuron.relation)
    low.add("e0", trained_low)
    assert greedy(low, [prompt], n=4) == [target]


def test_the_expert_also_learns_its_prompt_inside_a_conversation_and_routing_is_trained_as_before():
    prompt, target = EDITS[1]
    alone, in_chat = (make_editor(expert_in_conversation=flag) for flag in (False, True))
    edits = [e.train(prompt, target) for e in (alone, in_chat)]
    # The stopping rule covers every row: the conversation row reproduces the target too.
    assert [e.metrics["expert_rows"] for e in edits] == [1, 2]
    assert all(e.metrics["reproduced"] for e in edits)
    # Routing is trained on the user's texts only: the conversation row leaves the neuron as it was.
    for name in ("subject", "relation"):
        assert torch.allclose(getattr(edits[0].neuron, name), getattr(edits[1].neuron, name), atol=1e-4)
    torch.testing.assert_close(edits[0].keys, edits[1].keys, atol=1e-5, rtol=1e-4)
    in_chat.add("e0", edits[1])
    assert token_accuracy(in_chat, prompt, target) == 1.0
    # A model without a chat template trains on the prompt alone, as before.
    assert make_editor("gpt2").train(prompt, target).metrics["expert_rows"] == 1


def test_a_single_message_chat_is_encoded_as_the_plain_prompt():
    editor = make_editor()
    prompt, target = EDITS[0]
    plain, chat = (encode_answered(editor.tokenizer, [p], target) for p in (prompt, Chat((Message("user", prompt),))))
    assert torch.equal(plain.input_ids, chat.input_ids) and torch.equal(plain.content, chat.content)
    assert torch.equal(plain.input_ids, encode(editor.tokenizer, [prompt], [target]).input_ids)


def test_routing_picks_the_right_expert_among_several():
    editor = make_editor()
    for i, (prompt, target) in enumerate(EDITS):
        editor.add(f"e{i}", editor.train(prompt, target))
    routed = [g.edit_id for g in editor.generate([p for p, _ in EDITS] + [UNRELATED], max_new_tokens=1)]
    assert routed == ["e0", "e1", "e2", None]
    assert greedy(editor, [p for p, _ in EDITS]) == [t for _, t in EDITS]
    acts = editor.activations([p for p, _ in EDITS])
    assert acts.shape == (3, 3) and torch.equal(acts.argmax(-1), torch.arange(3))


def test_mixed_batch_equals_single_runs():
    editor = make_editor()
    for i, (prompt, target) in enumerate(EDITS[:2]):
        editor.add(f"e{i}", editor.train(prompt, target))
    prompts = [EDITS[0][0], UNRELATED, EDITS[1][0], "Which river flows through Cairo?"]
    batched = editor.generate(prompts, max_new_tokens=8)
    single = [editor.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.edit_id for g in batched] == ["e0", None, "e1", None] == [g.edit_id for g in single]


def test_routing_block_routes_any_forward_pass_and_detach_restores_the_model():
    editor = make_editor()
    prompt, target = EDITS[0]
    before = logits(editor, prompt)
    editor.add("e0", editor.train(prompt, target))
    batch = encode(editor.tokenizer, [prompt, UNRELATED])
    with editor.routing(batch) as routes_of, torch.no_grad():
        routed = editor.model(**batch.model_inputs()).logits
        assert [r.edit_id for r in routes_of(2)] == ["e0", None]
    assert routed[0, -1].argmax() == editor.tokenizer(target, add_special_tokens=False).input_ids[0]
    editor.detach()
    assert torch.equal(logits(editor, prompt), before)
    assert Editor(editor.model, editor.tokenizer, CFG).edit_ids == []  # the model can be edited afresh


def test_rollback_restores_base_outputs_exactly():
    editor = make_editor()
    prompt, target = EDITS[0]
    before = logits(editor, prompt)
    base_text = greedy(editor, [prompt])
    editor.add("e0", editor.train(prompt, target))
    editor.add("e1", editor.train(*EDITS[1]))
    assert not torch.equal(logits(editor, prompt), before)
    assert editor.remove("e0") and not editor.remove("e0")
    assert torch.equal(logits(editor, prompt), before)
    assert greedy(editor, [prompt]) == base_text
    assert editor.edit_ids == ["e1"] and greedy(editor, [EDITS[1][0]]) == [EDITS[1][1]]
    with pytest.raises(UnknownEditError):
        editor.get("e0")


@pytest.mark.parametrize("expert", ["full", "lowrank"])
def test_save_and_load_give_identical_outputs(tmp_path, expert):
    from app.scen import load_edit, save_edit

    editor = make_editor(expert=expert)
    digests = {}
    for i, (prompt, target) in enumerate(EDITS):
        edit = editor.train(prompt, target)
        digests[f"e{i}"] = save_edit(edit, tmp_path / f"e{i}.safetensors")
        editor.add(f"e{i}", edit)
    prompts = [p for p, _ in EDITS] + [UNRELATED]
    expected = [logits(editor, p) for p in prompts]

    rebuilt = make_editor(expert=expert)
    added, removed = rebuilt.sync(
        list(digests), lambda i: load_edit(tmp_path / f"{i}.safetensors", sha256=digests[i])
    )
    assert added == ["e0", "e1", "e2"] and removed == []
    for p, e in zip(prompts, expected):
        assert torch.equal(logits(rebuilt, p), e)
    assert greedy(rebuilt, prompts) == greedy(editor, prompts)


def test_sync_removes_and_keeps_order():
    editor = make_editor()
    trained = {f"e{i}": editor.train(p, t) for i, (p, t) in enumerate(EDITS)}
    editor.sync(["e0", "e1"], trained.__getitem__)
    added, removed = editor.sync(["e1", "e2"], trained.__getitem__)
    assert (added, removed) == (["e2"], ["e0"]) and editor.edit_ids == ["e1", "e2"]


@pytest.mark.parametrize(
    ("prompt", "target", "message"),
    [
        ("", "Rome", "prompt must be a non-empty string"),
        ("   ", "Rome", "prompt must be a non-empty string"),
        ("What is the capital of France?", "", "target must be a non-empty string"),
        ("What is the capital of France?", "word " * 600, "target is"),
        ("word " * 600, "Rome", "prompt is"),
    ],
)
def test_bad_edits_are_refused_and_change_nothing(prompt, target, message):
    editor = make_editor()
    editor.add("e0", editor.train(*EDITS[0]))
    before = logits(editor, UNRELATED)
    with pytest.raises(InvalidEditError, match=message):
        editor.train(prompt, target)
    assert editor.edit_ids == ["e0"] and editor.version == 1
    assert torch.equal(logits(editor, UNRELATED), before)


def test_unknown_architecture_is_named_with_the_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported model types: .*llama"):
        Editor(model, tiny_model().tokenizer)


def test_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="layer 9 out of range: the model has 4 layers"):
        make_editor(layer=9)


def test_a_tampered_edit_file_is_refused(tmp_path):
    from app.scen import IntegrityError, load_edit, save_edit

    editor = make_editor()
    path = tmp_path / "e.safetensors"
    digest = save_edit(editor.train(*EDITS[0]), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_edit(path, sha256=digest)
    path.write_bytes(b"not an edit")
    with pytest.raises(IntegrityError):
        load_edit(path)


def test_rephrases_train_the_expert_and_report_activations():
    editor = make_editor()
    edit = editor.train(EDITS[0][0], EDITS[0][1], rephrases=["Which city is the capital of France?"])
    assert len(edit.metrics["rephrase_activations"]) == 1 and edit.keys.shape[0] == 2
    editor.add("e0", edit)
    assert token_accuracy(editor, "Which city is the capital of France?", "Rome") == 1.0


def test_a_newer_correction_of_the_same_prompt_takes_over_and_rollback_restores_the_older():
    editor = make_editor()
    prompt = EDITS[0][0]
    editor.add("old", editor.train(prompt, "Rome"))
    newer = editor.train(prompt, "Madrid")
    assert newer.metrics["fires_on_prompt"] == newer.metrics["overrides"] == ["old"]
    editor.add("new", newer)
    gen = editor.generate([prompt], max_new_tokens=8)[0]
    assert (gen.text, gen.edit_id) == ("Madrid", "new")
    editor.remove("new")
    gen = editor.generate([prompt], max_new_tokens=8)[0]
    assert (gen.text, gen.edit_id) == ("Rome", "old")


def test_subject_is_located_or_inferred_and_a_missing_one_is_refused():
    editor = make_editor()
    given = editor.train("Who wrote Hamlet?", "Dickens", subject="Hamlet")
    inferred = editor.train("Who wrote Hamlet?", "Dickens")
    assert given.subject == inferred.subject == "Hamlet"
    with pytest.raises(InvalidEditError, match="subject 'Macbeth' does not occur in the prompt"):
        editor.train("Who wrote Hamlet?", "Dickens", subject="Macbeth")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_sentence_after_others_gives_the_same_keys_whatever_came_before(arch):
    editor = make_editor(arch)
    question = "Who wrote Hamlet?"
    prompts = [f"The quick brown fox jumps. {question}", f"Paris is the capital of France, they say. {question}"]
    keys = editor.routing_keys(prompts)
    assert keys.sentence is not None
    later = keys.content & (keys.sentence > 0)  # the question, in both rows
    for layer in (keys.subject, keys.relation):  # its name and its question alike
        torch.testing.assert_close(layer[0][later[0]], layer[1][later[1]], atol=1e-4, rtol=1e-4)


def test_routing_reads_a_prompt_of_several_sentences_alike_when_serving_and_when_probing():
    editor = make_editor()
    editor.add("e0", editor.train(*EDITS[0]))
    editor.add("e1", editor.train(*EDITS[1]))
    prompts = [f"{UNRELATED} {EDITS[0][0]}", f"Paris is big. {EDITS[1][0]}", EDITS[2][0]]
    probed = editor.activations(prompts)
    batch = encode(editor.tokenizer, prompts)
    with torch.no_grad(), editor.routing(batch) as routes_of:
        editor.model(**batch.model_inputs())
        served = routes_of(len(prompts))
    for row, route in enumerate(served):
        top = int(probed[row].argmax())
        assert route.activation == pytest.approx(float(probed[row, top]), abs=1e-5)
