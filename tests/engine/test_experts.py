import torch

from app.scen.experts import Expert, FullExpert, LowRankExpert, low_rank_of


def full_expert(delta: torch.Tensor) -> FullExpert:
    expert = FullExpert(*delta.shape)
    with torch.no_grad():
        expert.delta.copy_(delta)
    return expert.requires_grad_(False)


def test_a_delta_of_low_rank_is_kept_exactly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 3, generator=g) @ torch.randn(3, 40, generator=g)
    low = low_rank_of(full_expert(delta), 3)
    keys = torch.randn(5, 40, generator=g)
    assert isinstance(low, LowRankExpert) and low.a.shape == (3, 40) and low.b.shape == (24, 3)
    assert torch.allclose(low(keys), keys @ delta.T, atol=1e-3)


def test_a_larger_rank_keeps_the_leading_directions():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(24, 4, generator=g)).Q
    v = torch.linalg.qr(torch.randn(40, 4, generator=g)).Q
    delta = u @ torch.diag(torch.tensor([9.0, 4.0, 0.5, 0.1])) @ v.T
    low = low_rank_of(full_expert(delta), 2)
    best = u[:, :2] @ torch.diag(torch.tensor([9.0, 4.0])) @ v[:, :2].T
    assert torch.allclose(low.b @ low.a, best, atol=1e-4)


def test_the_same_delta_gives_the_same_factors_and_leaves_the_global_generator_alone():
    delta = torch.randn(16, 32)
    torch.manual_seed(5)
    first = low_rank_of(full_expert(delta), 4)
    after = torch.rand(1)
    torch.manual_seed(5)
    second = low_rank_of(full_expert(delta), 4)
    assert torch.equal(first.a, second.a) and torch.equal(first.b, second.b)
    assert torch.equal(torch.rand(1), after)


def test_an_expert_round_trips_through_its_tensors():
    low = low_rank_of(full_expert(torch.randn(6, 12)), 2)
    copy = Expert.from_tensors(low.tensors())
    assert torch.equal(copy.a, low.a) and torch.equal(copy.b, low.b)
