"""CA-SAM as a model kind (``ModelConfig.kind = "ca-sam"``, method.md 3.2).

Frozen SAM encoder (no adapters) -> alignment layer A_t -> the decoder heads of
:class:`AmaSam` (coarse head + HR-Decoder on SAM's frozen two-way transformer). A_t is the
only path of the encoder features E into the decoder: the coarse head, the HR-Decoder's
transformer and its full-resolution fusion all see A_t(E), and the HR-Decoder's early-feature
path (F_early from inside the encoder) is removed::

    images -> frozen ViT -> E: B,256,h,h --route--> A_t(E)  (t = 0..T-1)  or  E (base path)
    -> coarse head, HR-Decoder (as AmaSam) -> fine B,1,S,S + distance B,2,S,S

Continual learning (``training.continual``): task 0 trains A_0 and the heads; each later task
adds A_t (initialised as a copy of A_0) and a VAE V_t, and trains A_t only, so the weights that
earlier tasks use never change. At inference each image (tile) is routed by
``model.task_router.TaskRouter``; ``AmaSamOutput.task`` says where it went. In training mode
(and whenever ``active_task`` is set) routing is off and the newest (or active) task is used.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from .amasam import AmaSam
from .task_router import BASE_PATH, TaskRouter, pooled_features
from .variants import AlignmentLayer

ROUTER_PREFIX = "router."


class CaSam(AmaSam):
    """Frozen SAM + per-task alignment layers + routed inference.

    Parameters
    ----------
    cfg : ModelConfig
        ``kind == "ca-sam"``; ``num_tasks`` alignment layers of ``alignment_layer_blocks``.
    sam : Sam
        SAM parts with their final weights.

    Attributes
    ----------
    active_task : int or None
        Force this task (-1: base path) for every image; None routes by the VAEs in eval
        mode and uses the newest task in training mode.
    """

    def __init__(self, cfg: ModelConfig, sam: Sam):
        super().__init__(cfg, sam)
        self.hr_decoder.early_up = None  # encoder features reach the decoder only through A_t
        channels = self.sam.image_encoder.neck[0].out_channels
        self.alignment_layers = nn.ModuleList(
            AlignmentLayer(cfg.alignment_layer_blocks, channels) for _ in range(cfg.num_tasks)
        )
        self.router = TaskRouter(cfg.num_tasks, 2 * channels)
        self.router.requires_grad_(False)  # fitted after the task's training, not by it
        self.active_task: int | None = None
        self._trainable_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    @property
    def num_tasks(self) -> int:
        return len(self.alignment_layers)

    def align_features(self, embedding: torch.Tensor, early: torch.Tensor):
        """(E, F_early) -> (A_task(E) per image, None, (B,) task index; -1 = base path).

        F_early is dropped: the alignment layer is the only path of encoder features into
        the decoder.
        """
        aligned, tasks = self.align_embedding(embedding)
        return aligned, None, tasks

    def align_embedding(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E (B, 256, h, w) -> (A_task(E) per image, (B,) task index; -1 = base path)."""
        batch = embedding.shape[0]
        task = self.active_task
        if task is None and self.training:
            task = self.num_tasks - 1
        if task is not None:
            tasks = torch.full((batch,), task, dtype=torch.long, device=embedding.device)
            return (embedding if task == BASE_PATH else self.alignment_layers[task](embedding)), tasks
        tasks = self.router.route(embedding)
        out = embedding.clone()
        for t in sorted(set(tasks.tolist())):
            if t == BASE_PATH:
                continue
            rows = (tasks == t).nonzero().squeeze(1)
            out[rows] = self.alignment_layers[t](embedding[rows]).to(out.dtype)
        return out, tasks

    @torch.no_grad()
    def task_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) 0-255 -> (B, 512) pooled frozen-encoder features (routing input)."""
        from .adapters import encode_with_early_features

        embedding, _ = encode_with_early_features(
            self.sam.image_encoder, self.preprocess(images), self.early_index
        )
        return pooled_features(embedding)

    def freeze_except_task(self, task: int) -> None:
        """Training a later task: only ``alignment_layers[task]`` (and a discriminator, a
        training-only part) keep gradients; the heads and earlier tasks stay as they are."""
        self.requires_grad_(False)
        self.alignment_layers[task].requires_grad_(True)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(True)

    # ----------------------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained weights plus the router (VAEs, their feature statistics and thresholds)."""
        state = super().trainable_state_dict()
        for name, tensor in self.router.state_dict(prefix=ROUTER_PREFIX).items():
            state[name] = tensor.detach().clone()
        return state

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor],
                                  source: str = "trainable weights") -> None:
        router = {k[len(ROUTER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ROUTER_PREFIX)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(ROUTER_PREFIX)}
        super().load_trainable_state_dict(rest, source)
        expected = set(self.router.state_dict())
        if set(router) != expected:
            missing = sorted(expected - set(router)) or sorted(set(router) - expected)
            raise CheckpointError(
                f"{source}: task router does not match this model's {self.num_tasks} task(s) "
                f"({ROUTER_PREFIX}{missing[0]})"
            )
        self.router.load_state_dict(router)

    def parameter_report(self) -> dict:
        report = super().parameter_report()
        report["modules"].pop("encoder adapters", None)
        per_task = sum(p.numel() for p in self.alignment_layers[0].parameters())
        report["modules"]["alignment layers"] = per_task * self.num_tasks
        report["modules"]["task VAEs (not trained by gradient of the task loss)"] = sum(
            p.numel() for p in self.router.parameters()
        )
        report["per_task"] = per_task + sum(p.numel() for p in self.router.vaes[0].parameters())
        return report
