"""Exponential moving average of the trainable weights (Polyak averaging).

A model trained for a few thousand noisy CPU steps at a high learning rate jumps from one
validation to the next (the tiny* learning curves of benchmarks/README.md swung by 0.2 AJI
between epochs); the running average of its recent weights is a steadier and usually better
model. The average is what validation scores and what the model folder's weights hold; the
optimiser keeps stepping the raw weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """EMA of a model's trainable weights.

    Parameters
    ----------
    model : AmaSam
        Anything with ``trainable_state_dict`` / ``load_trainable_state_dict`` and
        ``named_parameters``.
    decay : float
        Per-step decay in (0, 1). Early steps use ``min(decay, (1 + n) / (10 + n))`` so the
        average does not remember the random initialisation for long.
    """

    def __init__(self, model, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.average = model.trainable_state_dict()
        params = dict(model.named_parameters())
        # A trainable state may hold buffers too (a CA-SAM task's routing-VAE statistics):
        # they are not stepped by the optimiser, so they are taken as they are, not averaged.
        buffers = dict(model.named_buffers())
        self._params = {name: params[name] for name in self.average if name in params}
        self._buffers = {name: buffers[name] for name in self.average if name not in params}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call after each optimiser step)."""
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        averages = [self.average[name] for name in self._params]
        params = [param.detach().to(average.dtype)
                  for param, average in zip(self._params.values(), averages, strict=True)]
        # one multi-tensor kernel instead of a lerp per parameter (~140 for tiny_conv)
        torch._foreach_lerp_(averages, params, 1.0 - decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged trainable weights, buffers as they are now (detached copies, the
        layout of ``trainable_state_dict``)."""
        return {name: (self._buffers[name] if name in self._buffers else value).detach().clone()
                for name, value in self.average.items()}

    def state_dict(self) -> dict:
        return {"average": self.weights(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["average"].items():
            self.average[name].copy_(value)
        self.updates = int(state["updates"])

    @contextmanager
    def applied(self, model) -> Iterator[None]:
        """Run a block (validation) with the averaged weights in ``model``, then put the raw
        weights back."""
        raw = model.trainable_state_dict()
        model.load_trainable_state_dict(self.weights(), "averaged weights")
        try:
            yield
        finally:
            model.load_trainable_state_dict(raw, "training weights")
