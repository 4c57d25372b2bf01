"""The question as the sentence encoder reads it, and the router reading it beside the relation factor."""

import torch

from app.scen import ScenConfig
from app.scen.prompts import encode, prompt_tokens, subject_positions
from app.scen.questions import QuestionReader, bundled_encoder
from app.scen.routed import Neuron, Router, RoutingKeys
from app.scen.router_index import IndexSettings
from tests.utils.tiny_models import tiny_tokenizer


def located(tokenizer, prompts: list[str], subject: str):
    """The batch of ``prompts`` and, per row, the positions of the subject's first and last tokens."""
    batch = encode(tokenizer, prompts)
    T = batch.input_ids.shape[1]
    first, last = [], []
    for prompt in prompts:
        tokens = prompt_tokens(tokenizer, prompt)
        at = subject_positions(tokens, subject)
        first.append(T - len(tokens.ids) + at[0])
        last.append(T - len(tokens.ids) + at[-1])
    return batch, torch.tensor(first), torch.tensor(last)


def test_the_question_is_the_subjects_sentence_with_the_subject_replaced():
    tok = tiny_tokenizer()
    reader = QuestionReader(bundled_encoder(), tok)
    batch, first, last = located(tok, ["I am writing a report. Who wrote Hamlet?", "Hamlet: who wrote it?"], "Hamlet")
    row = [batch.input_ids[0], batch.content[0]]
    assert reader.text(*row, batch.sentence[0], int(first[0]), int(last[0])) == "Who wrote something?"
    # Read as one sentence, the preamble stays.
    assert reader.text(*row, None, int(first[0]), int(last[0])) == "I am writing a report. Who wrote something?"
    assert reader.text(batch.input_ids[1], batch.content[1], batch.sentence[1], int(first[1]), int(last[1])) == (
        "something: who wrote it?"
    )
    read = reader(batch.input_ids, batch.content, batch.sentence, torch.arange(2), last, last - first + 1)
    assert read.shape == (2, reader.dim) and torch.allclose(read.norm(dim=-1), torch.ones(2))
    # A subject counted one token longer than it is here (spelled otherwise in the edit prompt)
    # reaches into the preamble; its own sentence is still the one read.
    opening, first, last = located(tok, ["I am writing a report. Hamlet: who wrote it?"], "Hamlet")
    row = [opening.input_ids[0], opening.content[0], opening.sentence[0]]
    assert reader.text(*row, int(first[0]) - 1, int(last[0])) == "something: who wrote it?"


def test_the_encoder_places_a_rewording_above_the_cut_and_another_question_below():
    encoder, cut = bundled_encoder(), ScenConfig().question_cos
    asked, rewording, other = encoder([
        "Who is the chief executive officer of something?", "Who is the CEO of something?",
        "Where is something headquartered?",
    ])
    assert asked @ rewording > cut > asked @ other


def globex_edit(reader: QuestionReader, prompts: list[str]) -> tuple[RoutingKeys, Neuron]:
    """Keys of ``prompts`` whose subject keys name Globex, and an edit of the first prompt whose
    relation factor never fires: only the encoder's reading can route."""
    batch, first, last = located(reader.tokenizer, prompts, "Globex")
    B, T = batch.input_ids.shape
    h_s, h = 8, 6
    subject = torch.eye(h_s)[0]
    keys = torch.zeros(B, T, h_s)
    keys[torch.arange(B), last] = subject
    rk = RoutingKeys(keys, batch.content, torch.randn(B, T, h), batch.prompt_last, batch.sentence, batch.input_ids)
    length = last[0] - first[0] + 1
    question = reader.first_row(batch.input_ids, batch.content, batch.sentence, int(last[0]), int(length))
    return rk, Neuron(20 * subject, torch.tensor(-8.0), torch.zeros(h), torch.tensor(-30.0), length,
                      torch.zeros(h_s), question)


def test_the_router_routes_where_either_reading_of_the_question_fires():
    tok = tiny_tokenizer()
    reader = QuestionReader(bundled_encoder(), tok)
    prompts = [
        "Who is the chief executive officer of Globex?", "Who is the CEO of Globex?", "Where is Globex headquartered?",
    ]
    rk, neuron = globex_edit(reader, prompts)
    h_s, h = 8, 6
    reads, blind = Router(h_s, h, 0.65, questions=reader, question_cos=0.6), Router(h_s, h, 0.65)
    every_size = IndexSettings(min_neurons=0, rows_per_list=4, probes=8)
    indexed = Router(h_s, h, 0.65, questions=reader, question_cos=0.6, index=every_size)
    for router in (reads, blind, indexed):
        router.append(neuron)
    assert reads.route(rk).slots.tolist() == [0, 0, -1]
    assert indexed.route(rk).slots.tolist() == [0, 0, -1]  # through the subject index, the same rule
    assert blind.route(rk).slots.tolist() == [-1, -1, -1]
    # Without token ids (keys recorded before they were kept) the encoder is not read.
    assert reads.route(RoutingKeys(rk.subject, rk.content, rk.relation, rk.at, rk.sentence)).slots.tolist() == [-1] * 3
    # An edit whose question is unknown is read by its relation factor alone.
    unknown = Router(h_s, h, 0.65, questions=reader, question_cos=0.6)
    unknown.append(Neuron(*(getattr(neuron, f) for f in ("subject", "subject_bias", "relation", "relation_bias",
                                                           "subject_len", "subject_span"))))
    assert unknown.route(rk).slots.tolist() == [-1, -1, -1]


RIVALS = [["Who founded {}?", "Who started {}?"], ["Where is the headquarters of {}?", "Where is {} based?"],
          ["Who is the chief executive officer of {}?", "Who is the CEO of {}?"]]


def test_a_rival_is_the_nearest_generic_question_that_asks_something_else():
    encoder = bundled_encoder()
    reader = QuestionReader(encoder, tiny_tokenizer(), RIVALS)
    own, founded, started, leads = encoder([
        "Who is the chief executive officer of something?", "Who founded something?", "Who started something?",
        "Who leads something?",
    ])
    read = torch.stack([founded, leads])
    rival = reader.rival(read, own.expand(2, -1), unlike_cos=0.5)
    # The edit's own question in other words is no rival: the chief executive's group is left out.
    others = encoder([t.format("something") for group in RIVALS[:2] for t in group])
    assert torch.isclose(rival[0], torch.tensor(1.0), atol=1e-5)
    assert torch.isclose(rival[1], (others @ leads).max(), atol=1e-5)
    assert (others @ leads).max() < leads @ own  # nearer the edit's question than any rival
    alone = QuestionReader(encoder, tiny_tokenizer())
    assert alone.rival(read, own.expand(2, -1), 0.5).tolist() == [-1.0, -1.0]


def test_a_reading_below_the_cut_routes_where_it_is_nearer_the_edit_than_every_rival():
    tok = tiny_tokenizer()
    reader = QuestionReader(bundled_encoder(), tok, RIVALS)
    prompts = [
        "Who is the chief executive officer of Globex?", "Who leads Globex?", "Who founded Globex?",
        "Where is Globex headquartered?",
    ]
    rk, neuron = globex_edit(reader, prompts)
    h_s, h = 8, 6
    cut_alone = Router(h_s, h, 0.65, questions=reader, question_cos=0.5)
    leading = Router(h_s, h, 0.65, questions=reader, question_cos=0.5, question_lead=0.0, question_floor=0.3)
    for router in (cut_alone, leading):
        router.append(neuron)
    # "Who leads" is under the cut (0.47) but nearer the edit's question than any rival (0.37);
    # "Who founded" is a rival itself, and "headquartered" is nearer the headquarters' question.
    assert cut_alone.route(rk).slots.tolist() == [0, -1, -1, -1]
    assert leading.route(rk).slots.tolist() == [0, 0, -1, -1]
    leading.question_floor = 0.5
    assert leading.route(rk).slots.tolist() == [0, -1, -1, -1]
