"""Recording one decoder layer and replaying only the layers above it.

An edit changes layer l alone, so every layer below l is frozen: one forward pass
that stops right after layer l records what training needs (the layer's output
and what its down projections saw), and each training step then runs only the
layers above l, with layer l replaced by a stand-in that returns a recomputed
output. The engine and the evaluation's baselines both train this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class _Stop(Exception):
    """Raised from the recorded layer once its output is kept: nothing above is needed."""


@torch.no_grad()
def record(
    model: nn.Module, layer: nn.Module, taps: Sequence[nn.Module], inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``model`` on ``inputs`` up to ``layer``.

    Returns the layer's output (B, T, d) and, for each module of ``taps`` (down
    projections at or below the layer), the (input, output) it saw last.
    """
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kept: dict[str, torch.Tensor] = {}

    def tap(i: int):
        def hook(module, args, output):
            seen[i] = (args[0].detach(), output.detach())

        return hook

    def stop(module, args, output):
        kept["out"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Stop

    handles = [m.register_forward_hook(tap(i)) for i, m in enumerate(taps)]
    handles.append(layer.register_forward_hook(stop))
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return kept["out"], [seen[i] for i in range(len(taps))]


class _PassThrough(nn.Module):
    """Stands in for a layer below l: its output is already part of the recording."""

    def __init__(self, like: nn.Module):
        super().__init__()
        # Some models pick the attention mask by the layer's attention type.
        if hasattr(like, "attention_type"):
            self.attention_type = like.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Replay(_PassThrough):
    """Stands in for layer l: ``output()`` recomputes its output from the recording."""

    def __init__(self, like: nn.Module, output: Callable[[], torch.Tensor]):
        super().__init__(like)
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output()  # (B, T, d)


@contextlib.contextmanager
def replay_above(layers: nn.ModuleList, layer: int, output: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block a forward pass of the model runs only the layers above ``layer``;
    layer ``layer`` returns ``output()``."""
    saved = [layers[i] for i in range(layer + 1)]
    for i in range(layer):
        layers[i] = _PassThrough(saved[i])
    layers[layer] = Replay(saved[layer], output)
    try:
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module
