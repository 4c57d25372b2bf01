"""The router's subject index: with it, routing decides as reading every neuron does."""

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F

from app.scen.blas import core_for
from app.scen.routed import Neuron, Router, RoutingKeys
from app.scen.router_index import IndexSettings, SubjectIndex

H_S, H, T = 64, 32, 8
# Every router reads all neurons from 0 up; small clusters so that a few hundred rows fill many.
INDEXED = IndexSettings(min_neurons=0, rows_per_list=4, probes=8)


def unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def routers(index: IndexSettings = INDEXED) -> tuple[Router, Router]:
    """The same rules twice: reading every neuron, and through the index; subjects checked whole."""
    made = []
    for settings in (None, index):
        r = Router(H_S, H, theta=0.65, subject_margin=1.0, subject_span_cos=0.5, index=settings)
        made.append(r)
    return made[0], made[1]


def neuron(subject: torch.Tensor, relation: torch.Tensor, length: int = 1, bias: float = -8.0) -> Neuron:
    """A cosine detector on each factor, as a trained neuron starts."""
    return Neuron(20 * subject, torch.tensor(bias), 20 * relation, torch.tensor(-5.0), torch.tensor(length), subject)


def prompts(subjects: torch.Tensor, relations: torch.Tensor, g: torch.Generator, B: int = 48) -> RoutingKeys:
    """B prompts of random keys; most name one of ``subjects`` at a random position and ask
    one of ``relations`` around it, some name none."""
    s, r = unit(B, T, H_S, g=g), unit(B, T, H, g=g)
    content = torch.ones(B, T, dtype=torch.bool)
    content[:, :2] = False  # the template
    for row in range(B):
        if row % 6 == 5:
            continue
        e = int(torch.randint(len(subjects), (), generator=g))
        at = int(torch.randint(2, T, (), generator=g))
        s[row, at] = F.normalize(subjects[e] + 0.15 * unit(H_S, g=g), dim=0)
        r[row, 2:] = relations[int(torch.randint(len(relations), (), generator=g))] + 0.3 * r[row, 2:]
    return RoutingKeys(s, content, r, torch.full((B,), T - 1))


def same(a, b) -> bool:
    return torch.equal(a.slots, b.slots)


@pytest.mark.parametrize("index", [INDEXED, dataclasses.replace(INDEXED, probe_floor=0.3)], ids=["all-probes", "floor"])
def test_indexed_routing_decides_as_the_full_product_on_planted_matches(index):
    g = torch.Generator().manual_seed(0)
    dense, indexed = routers(index)
    subjects, relations = unit(120, H_S, g=g), unit(6, H, g=g)
    # 360 neurons: three edits per subject, each asking one of six questions.
    for e in range(360):
        n = neuron(subjects[e // 3], relations[e % 6], length=1 + e % 2)
        dense.append(n)
        indexed.append(n)
    keys = prompts(subjects, relations, g)
    want, got = dense.route(keys), indexed.route(keys)
    assert (want.slots >= 0).sum() >= 20, "the planted prompts route"
    assert (want.slots < 0).sum() >= 8
    assert same(want, got)
    routed = want.slots >= 0
    assert torch.allclose(got.activations[routed], want.activations[routed])
    assert len(indexed.index.stored_labels()) == 360


@pytest.mark.parametrize("h", [46, 48, 62, 64, 576, 1536])  # the rows' width in blocks of 16: odd and even
def test_the_index_finds_exactly_the_rows_above_the_bound_when_every_cluster_is_scanned(h):
    g = torch.Generator().manual_seed(h)
    n = 200
    w, b = 20 * unit(n, h, g=g), -8.0 + torch.randn(n, generator=g)
    index = SubjectIndex(h, IndexSettings(min_neurons=0, rows_per_list=8, probes=4096, slack=0.0))
    index.build(w, b, torch.arange(n) * 3)
    # Keys near a few rows, so that some scores pass the bound and most do not.
    keys = F.normalize(w[:6] / 20 + 0.05 * unit(6, h, g=g), dim=-1)
    scores = keys @ w.T + b  # (6, n)
    for bound in (-2.0, 0.0, 2.0):
        # Rows within the 8-bit codes' precision of the bound may fall either way (the bias's
        # code alone is 32/255 logit wide here).
        sure = (scores > bound + 0.25).any(0).nonzero().flatten() * 3
        possible = set(((scores > bound - 0.25).any(0).nonzero().flatten() * 3).tolist())
        found = index.search(keys, bound)
        assert set(sure.tolist()) <= set(found.tolist()) <= possible


def test_a_token_scans_only_clusters_its_key_meets_at_the_probe_floor():
    g = torch.Generator().manual_seed(5)
    _, indexed = routers(dataclasses.replace(INDEXED, probe_floor=0.5))
    subjects = unit(200, H_S, g=g)
    for e in range(200):
        indexed.append(neuron(subjects[e], unit(H, g=g)))
    index = indexed.index
    index.sync(indexed.subject_w, indexed.subject_b)
    floor = float(torch.logit(torch.tensor(0.65))) + 1.0
    assert index.candidates(subjects[[7, 42]], indexed.subject_w, indexed.subject_b, floor).tolist() == [7, 42]
    # A key far from every cluster (here: opposite a subject) scans none of them.
    assert index.candidates(-subjects[:1], indexed.subject_w, indexed.subject_b, floor).tolist() == []


def test_appends_and_pops_keep_the_index_on_the_live_slots():
    g = torch.Generator().manual_seed(1)
    dense, indexed = routers()
    subjects, relations = unit(200, H_S, g=g), unit(5, H, g=g)
    live: list[int] = []  # subject of each live slot
    for step in range(400):
        if live and step % 5 == 4:
            slot = int(torch.randint(len(live), (), generator=g))
            dense.pop(slot)
            indexed.pop(slot)
            del live[slot]
        else:
            e = step % 200
            n = neuron(subjects[e], relations[step % 5])
            dense.append(n)
            indexed.append(n)
            live.append(e)
        if step % 50 == 49:  # routes in between: the index is built, grown and kept up
            keys = prompts(subjects[live], relations, g, B=16)
            assert same(dense.route(keys), indexed.route(keys))
            assert torch.equal(indexed.index.stored_labels(), indexed.index.live_labels())
    assert len(indexed) == len(live) == len(indexed.index.live_labels())
    keys = prompts(subjects[live], relations, g)
    assert same(dense.route(keys), indexed.route(keys))


def test_a_newer_edit_overrides_the_older_among_candidates():
    g = torch.Generator().manual_seed(2)
    dense, indexed = routers()
    subjects, relations = unit(100, H_S, g=g), unit(4, H, g=g)
    for e in range(300):
        n = neuron(subjects[e // 3], relations[e % 4])
        dense.append(n)
        indexed.append(n)
    # A correction of slot 7's fact: the same subject and question, a weaker neuron.
    weaker = neuron(subjects[7 // 3], relations[7 % 4], bias=-9.0)
    for r in (dense, indexed):
        r.append(weaker, overrides=[7])
    keys = prompts(subjects[7 // 3 : 7 // 3 + 1], relations[7 % 4 : 7 % 4 + 1], g, B=12)
    want, got = dense.route(keys), indexed.route(keys)
    named = torch.arange(12) % 6 != 5
    assert (want.slots[named] == 300).all(), "the newer edit takes over where both fire"
    assert same(want, got)
    dense.pop(300)
    indexed.pop(300)  # the correction rolled back: the older edit serves again
    want, got = dense.route(keys), indexed.route(keys)
    assert (want.slots[named] == 7).all() and same(want, got)


def test_neurons_without_a_subject_factor_are_candidates_for_every_prompt():
    g = torch.Generator().manual_seed(3)
    dense, indexed = routers()
    subjects, relations = unit(100, H_S, g=g), unit(4, H, g=g)
    for e in range(200):
        for r in (dense, indexed):
            r.append(neuron(subjects[e // 2], relations[e % 4]))
    # The paper's single neuron: its subject factor always fires; only the question decides.
    always = Neuron(torch.zeros(H_S), torch.tensor(30.0), 20 * relations[1], torch.tensor(-5.0), torch.tensor(0),
                    torch.zeros(H_S))
    for r in (dense, indexed):
        r.append(always)
    keys = prompts(subjects, relations, g)
    want, got = dense.route(keys), indexed.route(keys)
    assert (want.slots == 200).any() and same(want, got)


def test_the_index_is_off_below_its_size_and_rebuilt_as_the_live_set_grows():
    g = torch.Generator().manual_seed(4)
    settings = IndexSettings(min_neurons=100, rows_per_list=4, probes=8)
    dense, indexed = routers(settings)
    subjects, relations = unit(300, H_S, g=g), unit(3, H, g=g)
    for e in range(99):
        for r in (dense, indexed):
            r.append(neuron(subjects[e], relations[e % 3]))
    keys = prompts(subjects[:99], relations, g, B=12)
    assert same(dense.route(keys), indexed.route(keys))
    assert len(indexed.index.stored_labels()) == 0, "below min_neurons every neuron is read, no index built"
    assert indexed.empty_like().index.settings == settings
    for e in range(99, 300):
        for r in (dense, indexed):
            r.append(neuron(subjects[e], relations[e % 3]))
        if e in (120, 299):
            keys = prompts(subjects[: e + 1], relations, g, B=12)
            assert same(dense.route(keys), indexed.route(keys))
    assert torch.equal(indexed.index.stored_labels(), torch.arange(300))


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_the_subject_margin_read_at_routing_moves_the_bound(margin):
    g = torch.Generator().manual_seed(5)
    dense, indexed = routers()
    subjects, relations = unit(150, H_S, g=g), unit(3, H, g=g)
    for e in range(300):
        for r in (dense, indexed):
            r.append(neuron(subjects[e // 2], relations[e % 3], bias=-6.0))
    keys = prompts(subjects, relations, g)
    for r in (dense, indexed):
        r.subject_margin = margin
    assert same(dense.route(keys), indexed.route(keys))


def test_a_copied_router_rebuilds_its_index_and_routes_the_same():
    g = torch.Generator().manual_seed(6)
    _, indexed = routers()
    subjects, relations = unit(100, H_S, g=g), unit(3, H, g=g)
    for e in range(200):
        indexed.append(neuron(subjects[e // 2], relations[e % 3]))
    keys = prompts(subjects, relations, g)
    want = indexed.route(keys)  # builds the index
    for other in (copy.deepcopy(indexed), pickle.loads(pickle.dumps(indexed))):
        assert same(other.route(keys), want)
        assert torch.equal(other.index.stored_labels(), indexed.index.stored_labels())


def test_openblas_core_is_named_from_the_cpu_flags():
    assert core_for({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) == "SkylakeX"
    assert core_for({"avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 without the parts SkylakeX uses
    assert core_for({"sse4_2", "avx"}) is None
