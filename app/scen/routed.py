"""The routed down projection that replaces ``W_down`` in the edited layer.

It computes ``down(k)`` exactly as before, reads the key of each sequence at its
routing position, and for sequences whose top neuron fires above theta adds that
edit's expert delta. One batch can therefore mix base-model rows and rows served
by different experts. Routing is decided once per sequence, at prefill, and held
for every generated token (a *routing session*).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.scen.experts import Expert


@dataclass
class Routing:
    slots: torch.Tensor  # (B,) expert slot per sequence, -1 = base model
    activations: torch.Tensor  # (B,) top neuron activation per sequence (0 when no neurons)


class Router(nn.Module):
    """Indexing neurons over normalised keys.

    Raw keys of one layer are nearly collinear with large norms: a neuron on raw
    keys cannot tell prompts apart. Keys are therefore whitened against a pool of
    ordinary prompts (centred on their mean, decorrelated with a shrunk covariance
    estimate) and scaled to unit length; directions every prompt shares stop
    dominating, and a rephrase lands near its edit's key while unrelated prompts
    do not. Each neuron has a bias, so it fires on a cap around its key instead of
    on a half-space.
    """

    def __init__(self, h: int, theta: float, device: torch.device | None = None):
        super().__init__()
        self.theta = theta
        self.register_buffer("center", torch.zeros(h, device=device))  # (h,)
        self.register_buffer("whiten", torch.eye(h, device=device))  # (h, h)
        self.register_buffer("neurons", torch.zeros(0, h, device=device))  # W_merge, (E, h)
        self.register_buffer("biases", torch.zeros(0, device=device))  # (E,)

    @torch.no_grad()
    def fit(self, pool_keys: torch.Tensor, shrinkage: float) -> None:
        """Set the key normalisation from raw keys of ordinary prompts, (N, h)."""
        X = pool_keys.double()
        self.center = X.mean(0).float()
        X = X - X.mean(0)
        N, h = X.shape
        # The covariance X'X/N has rank <= N (120 pool prompts against h = 1536 on SmolLM2), hence
        # the shrinkage to a scaled identity: (1 - s) X'X/N + s m I, m its mean variance. Its
        # eigenvectors are X's right singular vectors V plus any basis of their complement, so
        # the inverse square root comes from a thin SVD (N x h) instead of an h x h eigh.
        _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # Vh: (r, h)
        var = S.square() / N
        floor = (shrinkage * var.sum() / h).clamp_min(1e-12)
        inside = ((1 - shrinkage) * var + floor).clamp_min(1e-12).rsqrt()
        outside = floor.rsqrt()
        whiten = (Vh.T * (inside - outside)) @ Vh
        whiten.diagonal().add_(outside)
        self.whiten = whiten.float()

    def normalise(self, keys: torch.Tensor) -> torch.Tensor:
        return F.normalize((keys.float() - self.center) @ self.whiten, dim=-1)

    def activations(self, keys: torch.Tensor) -> torch.Tensor:  # (B, h) -> (B, E)
        return torch.sigmoid(self.normalise(keys) @ self.neurons.T + self.biases)

    def route(self, keys: torch.Tensor) -> Routing:
        B = keys.shape[0]
        if self.neurons.shape[0] == 0:
            return Routing(keys.new_full((B,), -1, dtype=torch.long), keys.new_zeros(B, dtype=torch.float))
        top, slot = self.activations(keys).max(dim=-1)
        return Routing(torch.where(top > self.theta, slot, -1), top)


class RoutedDown(nn.Module):
    def __init__(self, base: nn.Module, router: Router):
        super().__init__()
        self.base = base
        self.router = router
        self.experts = nn.ModuleList()  # slot i <-> router.neurons[i]
        self._session: dict | None = None
        self._bypass = False
        self._forced: torch.Tensor | None = None

    def forward(self, k: torch.Tensor) -> torch.Tensor:  # (B, T, h) -> (B, T, d)
        out = self.base(k)
        if self._bypass:
            return out
        routing = self._routing(k)
        if routing is None:
            return out
        for slot in routing.slots.unique().tolist():
            if slot < 0:
                continue
            rows = routing.slots == slot
            out[rows] = out[rows] + self.experts[slot](k[rows])
        return out

    def _routing(self, k: torch.Tensor) -> Routing | None:
        if self._forced is not None:
            return Routing(self._forced, torch.ones_like(self._forced, dtype=torch.float))
        if len(self.experts) == 0:
            return None
        session = self._session
        if session is not None and session.get("routing") is not None:
            return session["routing"]  # decode step: keep the prefill decision
        B, T, _ = k.shape
        at = session.get("at") if session is not None else None
        at = torch.full((B,), T - 1, device=k.device) if at is None else at.to(k.device)
        routing = self.router.route(k[torch.arange(B, device=k.device), at])  # keys: (B, h)
        if session is not None:
            session["routing"] = routing
        return routing

    # ---- contexts used by the editor -------------------------------------------------

    @contextlib.contextmanager
    def session(self, at: torch.Tensor | None = None):
        """Route each sequence once (at ``at``, default its last position) and hold it.

        Yields a dict whose ``routing`` entry holds the decision after the first forward.
        """
        self._session = {"at": at, "routing": None}
        try:
            yield self._session
        finally:
            self._session = None

    @contextlib.contextmanager
    def forced(self, slots: torch.Tensor):
        """Use the given slot per sequence (-1 = base), bypassing the neurons."""
        self._forced = slots
        try:
            yield
        finally:
            self._forced = None

    @contextlib.contextmanager
    def bypassed(self):
        """Routing off: the base model's output, for recording keys and hidden states."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    # ---- live set ----------------------------------------------------------------------

    def append(self, expert: Expert, neuron: torch.Tensor, bias: torch.Tensor) -> int:
        self.experts.append(expert)
        self.router.neurons = torch.cat([self.router.neurons, neuron.reshape(1, -1)])
        self.router.biases = torch.cat([self.router.biases, bias.reshape(1)])
        return len(self.experts) - 1

    def pop(self, slot: int) -> None:
        del self.experts[slot]
        keep = [i for i in range(self.router.neurons.shape[0]) if i != slot]
        self.router.neurons = self.router.neurons[keep]
        self.router.biases = self.router.biases[keep]
