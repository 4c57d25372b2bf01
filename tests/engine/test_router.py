import dataclasses

import pytest
import torch

from app.scen.routed import KeyNorm


def shrunk_inverse_sqrt(X: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """The definition: (shrunk covariance)^(-1/2) by a full eigendecomposition."""
    X = X.double() - X.double().mean(0)
    cov = X.T @ X / X.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    eigval, eigvec = torch.linalg.eigh(cov)
    return eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T


@pytest.mark.parametrize("n,h", [(12, 48), (200, 48)])  # fewer and more pool prompts than key dimensions
def test_whitening_equals_the_shrunk_inverse_square_root(n, h):
    torch.manual_seed(0)
    X = torch.randn(n, h) * torch.linspace(0.1, 3.0, h) + 2.0
    norm = KeyNorm(h)
    norm.fit(X, shrinkage=0.1)
    expected = shrunk_inverse_sqrt(X, 0.1)
    assert torch.allclose(norm.matrix().double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert torch.allclose(norm.center, X.mean(0), atol=1e-5)


@pytest.mark.parametrize("n,form", [(12, "low-rank"), (200, "dense")])
def test_both_forms_whiten_alike_and_survive_a_state_dict(n, form):
    torch.manual_seed(0)
    h = 48
    norm = KeyNorm(h)
    norm.fit(torch.randn(n, h) * torch.linspace(0.1, 3.0, h) + 2.0, shrinkage=0.1)
    assert (norm.whiten.numel() == 0) == (form == "low-rank")
    keys = torch.randn(3, 5, h) * 4
    expected = (keys.double() - norm.center.double()) @ norm.matrix().double()
    assert torch.allclose(norm.whitened(keys).double(), expected, rtol=1e-4, atol=1e-4)
    copy = KeyNorm(h)
    copy.load_state_dict(norm.state_dict())
    assert torch.equal(copy.whitened(keys), norm.whitened(keys))


def test_discounting_rewordings_brings_wordings_together_and_keeps_questions_apart():
    torch.manual_seed(0)
    h = 32
    norm = KeyNorm(h)
    norm.fit(torch.randn(400, h), shrinkage=0.1)
    # Rewording moves a key along the first 4 coordinates; the questions differ in the rest.
    wording = torch.zeros(h)
    wording[:4] = 1.0
    question, other = torch.randn(h), torch.randn(h)
    variation = torch.randn(300, 1) * wording
    before = KeyNorm(h)
    before.load_state_dict(norm.state_dict())
    norm.discount(variation, weight=0.5)
    assert norm.whiten.shape == (h, h) and norm.basis.numel() == 0

    def cos(n: KeyNorm, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((n(a) * n(b)).sum())

    reworded = question + 2 * wording
    assert cos(norm, question, reworded) > cos(before, question, reworded) + 0.1
    assert cos(norm, question, other) == pytest.approx(cos(before, question, other), abs=0.1)
    copy = KeyNorm(h)
    copy.load_state_dict(norm.state_dict())
    assert torch.equal(copy.whitened(question), norm.whitened(question))


def test_pool_keys_are_cached_per_model_and_reused(tmp_path):
    from app.scen import Editor, ScenConfig
    from tests.utils.tiny_models import tiny_model

    cfg = ScenConfig(layer=2, rephrase_invariance=0.0)
    first = tiny_model("llama")
    a = Editor(first.model, first.tokenizer, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = tiny_model("llama")
    b = Editor(again.model, again.tokenizer, cfg, cache_dir=tmp_path)
    assert _same(a._pool, b._pool) and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert _same(b._pool, b._pool_keys(_pool()))  # the cache holds what a forward pass gives
    other = tiny_model("llama", seed=1)  # other weights: other keys, never the cached ones
    c = Editor(other.model, other.tokenizer, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not _same(c._pool, a._pool)
    Editor(tiny_model("llama").model, first.tokenizer, cfg.replace(layer=1), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # another layer
    # The rewordings' keys are read, and cached apart, only where they are used.
    assert a._pool.rephrasings.numel() == 0
    reworded = cfg.replace(rephrase_invariance=0.2)
    e = Editor(tiny_model("llama").model, first.tokenizer, reworded, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 and e._pool.rephrasings.numel() > 0
    f = Editor(tiny_model("llama").model, first.tokenizer, reworded, cache_dir=tmp_path)
    assert _same(e._pool, f._pool) and len(list(tmp_path.glob("*.safetensors"))) == 4
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    d = Editor(tiny_model("llama").model, first.tokenizer, cfg, cache_dir=tmp_path)  # unreadable: recomputed
    assert _same(d._pool, a._pool)


def _pool():
    from app.scen.negatives import pool_prompts

    return pool_prompts()


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("subject", "relation", "questions", "rephrasings"))


def test_relation_factor_reads_the_question_less_the_subject_where_the_subject_factor_peaks():
    from app.scen.routed import Neuron, Router, RoutingKeys, question_keys, subject_window

    torch.manual_seed(0)
    B, T, h_s, h, E = 3, 7, 8, 12, 4
    router = Router(h_s, h, theta=0.5)
    router.subject_norm.fit(torch.randn(50, h_s), 0.1)
    router.relation_norm.fit(torch.randn(50, h), 0.1)
    for length in (1, 2, 3, 1):
        router.append(Neuron(torch.randn(h_s), torch.randn(()), 5 * torch.randn(h), torch.randn(()),
                             torch.tensor(length), torch.randn(h_s)))
    content = torch.ones(B, T, dtype=torch.bool)
    content[0, :2] = False  # left padding and template tokens are not the user's text
    content[:, -1] = False
    # Row 1 holds a second sentence from position 4, row 2 a third from position 5.
    sentence = torch.zeros(B, T, dtype=torch.long)
    sentence[1, 4:], sentence[2, 3:], sentence[2, 5:] = 4, 3, 5
    keys = RoutingKeys(torch.randn(B, T, h_s), content, torch.randn(B, T, h), torch.full((B,), T - 1), sentence)
    _, peaks = router.subject_factor(keys.subject, keys.content)  # (B, E)
    got = router.relation_factor(keys, peaks)
    for e in range(E):  # the definition: each edit's question key, then its neuron
        # The sentence the subject ends in, less the subject.
        keep = content & ~subject_window(peaks[:, e], router.subject_len[e], T)
        own = keep & (sentence == sentence[torch.arange(B), peaks[:, e]][:, None])
        keep = torch.where(own.any(1, keepdim=True), own, keep)  # nothing left: the whole text
        key = router.relation_norm(question_keys(keys.relation, keep))  # (B, h)
        want = torch.sigmoid(key @ router.relation_w[e] + router.relation_b[e])
        assert torch.allclose(got[:, e], want, atol=1e-5)
    # Without sentences the whole text less the subject counts.
    whole = router.relation_factor(dataclasses.replace(keys, sentence=None), peaks)
    assert torch.allclose(whole[0], got[0]) and not torch.allclose(whole, got)


def test_question_span_is_the_subjects_sentence_unless_nothing_would_be_left():
    from app.scen.routed import question_span

    content = torch.ones(3, 6, dtype=torch.bool)
    sentence = torch.tensor([[0, 0, 2, 2, 2, 2], [0, 0, 0, 0, 4, 4], [0, 0, 0, 3, 3, 3]])
    # Row 0: "Hi. [Globex] runs what" - the preamble goes; row 1: "Who runs it? [Globex Corp]" -
    # the subject's sentence holds nothing else, so the question before it counts; row 2:
    # "I read [Globex]. Who runs Initech" - the question after is about another subject.
    at, length = torch.tensor([2, 5, 2]), torch.tensor([1, 2, 1])
    got = question_span(content, at, length, sentence)
    assert got.int().tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert question_span(content, at, length, None).int().tolist() == [
        [1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]]


def test_question_span_is_the_sentence_of_the_subjects_last_token():
    from app.scen.routed import question_span

    # "Hi. [Kenneth Cragg] holds what": the edit prompt spelled the subject in three tokens
    # ("K", "enneth", " Cragg"), here it takes two, so its first token would fall on the preamble.
    content = torch.ones(1, 6, dtype=torch.bool)
    sentence = torch.tensor([[0, 0, 2, 2, 2, 2]])
    got = question_span(content, torch.tensor([3]), torch.tensor([3]), sentence)
    assert got.int().tolist() == [[0, 0, 0, 0, 1, 1]]


def test_subject_window_ends_at_the_peak():
    from app.scen.routed import subject_window

    w = subject_window(torch.tensor([3, 0]), torch.tensor(2), 6)
    assert w.tolist() == [[False, False, True, True, False, False], [True, False, False, False, False, False]]


def test_subject_margin_makes_the_subject_factor_stricter_and_leaves_the_relation_factor():
    from app.scen.routed import Neuron, Router, RoutingKeys

    torch.manual_seed(0)
    T, h_s, h = 5, 8, 12
    lenient, strict = Router(h_s, h, theta=0.65), Router(h_s, h, theta=0.65, subject_margin=5.0)
    subject = torch.nn.functional.normalize(torch.randn(h_s), dim=0)
    # A cosine detector: logit 20 cos - 8, so the margin moves where it fires from cos 0.43 to 0.68.
    neuron = Neuron(20 * subject, torch.tensor(-8.0), torch.zeros(h), torch.tensor(5.0), torch.tensor(1),
                    torch.zeros(h_s))
    for router in (lenient, strict):
        router.append(neuron)
    other = torch.nn.functional.normalize(torch.randn(h_s), dim=0)
    other = other - (other @ subject) * subject
    near = 0.55 * subject + (1 - 0.55**2) ** 0.5 * torch.nn.functional.normalize(other, dim=0)  # cos 0.55
    keys = torch.zeros(3, T, h_s)
    keys[0, 2], keys[1, 2], keys[2, 2] = subject, near, -subject
    rk = RoutingKeys(keys, torch.ones(3, T, dtype=torch.bool), torch.randn(3, T, h), torch.full((3,), T - 1))
    assert lenient.route(rk).slots.tolist() == [0, 0, -1]
    assert strict.route(rk).slots.tolist() == [0, -1, -1]  # the entity merely like the subject is let go
    at = torch.full((3, 1), 2)
    assert torch.equal(lenient.relation_factor(rk, at), strict.relation_factor(rk, at))


def test_a_name_sharing_only_the_subjects_last_token_is_not_the_subject():
    from app.scen.routed import Neuron, Router, RoutingKeys

    T, h_s, h = 5, 8, 6
    last, first, other = torch.eye(h_s)[:3]  # "district", "Sonitpur", "Thanjavur"
    span = torch.nn.functional.normalize(first + last, dim=0)
    whole = Router(h_s, h, theta=0.65, subject_span_cos=0.6)
    unchecked = Router(h_s, h, theta=0.65)
    for router in (whole, unchecked):
        router.append(Neuron(20 * last, torch.tensor(-8.0), torch.zeros(h), torch.tensor(5.0), torch.tensor(2), span))
    keys = torch.zeros(3, T, h_s)
    keys[:, 3] = last
    keys[0, 2], keys[1, 2], keys[2, 2] = first, other, 0.8 * first + 0.6 * other  # cos 0.9 with the span
    rk = RoutingKeys(keys, torch.ones(3, T, dtype=torch.bool), torch.randn(3, T, h), torch.full((3,), T - 1))
    assert unchecked.route(rk).slots.tolist() == [0, 0, 0]
    assert whole.route(rk).slots.tolist() == [0, -1, 0]
    assert whole.empty_like().subject_span_cos == 0.6
    # An edit stored before its subject's span was kept (zeros) stays unchecked.
    legacy = Router(h_s, h, theta=0.65, subject_span_cos=0.6)
    legacy.append(Neuron(20 * last, torch.tensor(-8.0), torch.zeros(h), torch.tensor(5.0), torch.tensor(2),
                         torch.zeros(h_s)))
    assert legacy.route(rk).slots.tolist() == [0, 0, 0]


def test_relation_margin_moves_the_relation_factor_only_and_carries_to_an_empty_copy():
    from app.scen.routed import Neuron, Router, RoutingKeys

    torch.manual_seed(0)
    T, h_s, h = 4, 6, 8
    strict, lenient = Router(h_s, h, theta=0.65), Router(h_s, h, theta=0.65, relation_margin=-2.0)
    neuron = Neuron(torch.randn(h_s), torch.tensor(0.0), torch.randn(h), torch.tensor(0.0), torch.tensor(1),
                    torch.randn(h_s))
    for router in (strict, lenient):
        router.append(neuron)
    rk = RoutingKeys(torch.randn(2, T, h_s), torch.ones(2, T, dtype=torch.bool), torch.randn(2, T, h),
                     torch.full((2,), T - 1))
    s, at = strict.subject_factor(rk.subject, rk.content)
    assert torch.equal(s, lenient.subject_factor(rk.subject, rk.content)[0])
    logit = torch.logit(strict.relation_factor(rk, at))
    assert torch.allclose(torch.logit(lenient.relation_factor(rk, at)), logit + 2.0, atol=1e-4)
    probe = lenient.empty_like()
    assert len(probe) == 0 and probe.relation_margin == -2.0 and probe.relation_norm is lenient.relation_norm


def test_appends_and_pops_keep_every_neuron_in_its_slot_without_copying_the_live_set_each_time():
    from app.scen.routed import Neuron, Router, RoutingKeys

    torch.manual_seed(0)
    h_s, h = 6, 10
    router, want = Router(h_s, h, theta=0.5), []
    grown = []
    for step in range(60):
        if want and step % 7 == 3:
            slot = int(torch.randint(len(want), ()))
            router.pop(slot)
            del want[slot]
            continue
        neuron = Neuron(torch.randn(h_s), torch.randn(()), torch.randn(h), torch.randn(()), torch.tensor(step % 3 + 1),
                        torch.randn(h_s))
        router.append(neuron)
        want.append(neuron)
        grown.append(router.capacity)
    assert len(router) == len(want)
    assert torch.equal(router.subject_w, torch.stack([n.subject for n in want]))
    assert torch.equal(router.relation_b, torch.stack([n.relation_bias for n in want]))
    assert router.subject_len.tolist() == [int(n.subject_len) for n in want]
    assert len(set(grown)) <= 4  # capacity doubles: 16, 32, 64
    fresh = Router(h_s, h, theta=0.5)
    for n in want:
        fresh.append(n)
    keys = RoutingKeys(torch.randn(4, 5, h_s), torch.ones(4, 5, dtype=torch.bool), torch.randn(4, 5, h),
                       torch.full((4,), 4))
    assert torch.equal(router.activations(keys), fresh.activations(keys))
