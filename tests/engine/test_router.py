import pytest
import torch

from app.scen.routed import Router


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
    router = Router(h, theta=0.65)
    router.fit(X, shrinkage=0.1)
    expected = shrunk_inverse_sqrt(X, 0.1)
    assert torch.allclose(router.whiten.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert torch.allclose(router.center, X.mean(0), atol=1e-5)
