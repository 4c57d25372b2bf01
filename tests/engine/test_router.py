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
    assert torch.allclose(norm.whiten.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert torch.allclose(norm.center, X.mean(0), atol=1e-5)


def test_pool_keys_are_cached_per_model_and_reused(tmp_path):
    from app.scen import Editor, ScenConfig
    from tests.utils.tiny_models import tiny_model

    cfg = ScenConfig(layer=2)
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
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    d = Editor(tiny_model("llama").model, first.tokenizer, cfg, cache_dir=tmp_path)  # unreadable: recomputed
    assert _same(d._pool, a._pool)


def _pool():
    from app.scen.negatives import pool_prompts

    return pool_prompts()


def _same(a, b) -> bool:
    return torch.equal(a.subject, b.subject) and torch.equal(a.relation, b.relation)
