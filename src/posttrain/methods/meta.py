"""Meta-learning on few-shot episodes: MAML / first-order MAML and Prototypical Networks.

`EpisodicLearner` is the one LightningModule: it runs an algorithm on a meta-batch of
episodes, takes the cross-entropy on the query images, and reports per-episode accuracy —
for evaluation the mean over a fixed set of episodes with its 95% confidence interval, as
the literature does. Algorithms are small objects with one call:
`algorithm(model, FewShotTasks(support, support_labels, query, ways), training)` -> query
logits (B, Q, ways).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partialmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torchmetrics import CatMetric

from posttrain.errors import (
    require,
    require_bool,
    require_choice,
    require_count,
    require_known_options,
    require_positive,
)
from posttrain.methods.core import SPLITS, MethodCore, StepOutput
from posttrain.regularizers import RegularizerSet
from posttrain.regularizers.base import ModelParts

Params = dict[str, Tensor]


@dataclass(frozen=True)
class FewShotTasks:
    """What an algorithm sees of a meta-batch: labelled support images and the query images
    of `B` tasks, each `ways`-way (support (B, S, ...), labels (B, S), query (B, Q, ...))."""

    support: Tensor
    support_labels: Tensor
    query: Tensor
    ways: int


class ProtoNet:
    """Snell et al. 2017: prototypes are mean support embeddings; logits are minus the squared
    Euclidean distance from each query embedding to each prototype. The embedding is the
    model's `embed` (after `head_dropout`); the linear head is unused."""

    has_head = False

    def __call__(self, model: nn.Module, tasks: FewShotTasks, training: bool) -> Tensor:
        def embed(images: Tensor) -> Tensor:  # (B, N, ...) -> (B, N, D)
            return model.embed(images.flatten(0, 1)).view(*images.shape[:2], -1)

        support_emb, query_emb = embed(tasks.support), embed(tasks.query)
        one_hot = F.one_hot(tasks.support_labels, tasks.ways).to(support_emb.dtype)  # (B, S, W)
        prototypes = one_hot.transpose(1, 2) @ support_emb / one_hot.sum(1).unsqueeze(-1)
        return -torch.cdist(query_emb, prototypes).pow(2)


def support_gradients(
    loss: Callable[[Params], Tensor], params: Params, second_order: bool, functional: bool
) -> Params:
    """Gradients of `loss` at `params`; kept in the graph only for second-order MAML."""
    if functional:
        grads = torch.func.grad(loss)(params)
        return grads if second_order else {n: g.detach() for n, g in grads.items()}
    values = torch.autograd.grad(loss(params), list(params.values()), create_graph=second_order)
    return dict(zip(params, values, strict=True))


def task_logits(
    model: nn.Module, weights: Params, buffers: Params, x: Tensor, ways: int | None
) -> Tensor:
    """The model's logits with `weights`, over the task's `ways` classes: the head's first
    `ways` outputs. A head trained on more ways than an episode has (`data.ways` below
    `data.train_ways`, or eval.py's `data.ways=3` on a 5-way model) otherwise predicted
    classes the episode does not have (11% of the predictions of 3-way episodes)."""
    return functional_call(model, (weights, buffers), (x,))[..., :ways]


class MAML:
    """Finn et al. 2017: adapt all weights with a few gradient steps on the support set, then
    score the query set with the adapted weights; the outer loss trains the initialization.

    The inner loop is functional (`torch.func.functional_call`), never a module clone, in two
    forms over the same maths: `loop` (per task, `torch.autograd.grad`) and `vmap` (all tasks
    of a meta-batch at once, `torch.func.grad`). `first_order` drops the second-order term
    (FOMAML). BatchNorm uses each task's batch statistics, as in the paper (torch.func's
    `replace_all_batch_norm_modules_`, which vmap needs anyway).

    `auto` is the loop, on every device: it is the form whose gradients are checked (against
    finite differences, and against vmap), and the faster one on CPU. For first-order MAML,
    vmap's gradients equal the loop's in float64 (to 1e-14, tested; float32 rounding leaves
    ~1e-3 relative differences in the first conv layer); on a GPU vmap may be faster, which
    is unmeasured here, so it is used only when asked for (`method.inner_loop=vmap`).
    Second-order gradients through BatchNorm under vmap are wrong in torch.func (torch 2.14:
    ~1% off finite differences, the loop matches them), so that combination is refused.
    """

    FORMS: ClassVar[tuple[str, ...]] = ("auto", "loop", "vmap")
    has_head = True

    def __init__(
        self,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        first_order: bool = False,
        eval_inner_steps: int = 3,
        inner_loop: str = "auto",
    ) -> None:
        require_count("method.inner_steps", inner_steps, 1)  # 1.5 failed in range()
        require_positive("method.inner_lr", inner_lr)
        require_count("method.eval_inner_steps", eval_inner_steps, 1)
        require_bool("method.first_order", first_order)  # `no` is truthy: it ran first-order
        require_choice("method.inner_loop", inner_loop, self.FORMS)
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.eval_inner_steps, self.inner_loop = eval_inner_steps, inner_loop

    def prepare(self, model: nn.Module) -> None:
        require(
            not getattr(model, "compiled", False),
            "`model.compile=true` does not apply to MAML: its inner loop calls the model with "
            "adapted weights through `torch.func.functional_call`, and torch.compile cannot "
            'take the second-order gradients MAML trains with ("does not currently support '
            'double backward"); it is not offered for first-order MAML either, where its '
            "effect is untested. Leave `model.compile=false` (ProtoNet and the other methods "
            "accept it).",
        )
        self.has_batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        require(
            not (self.inner_loop == "vmap" and self.vmap_inexact),
            "`method.inner_loop=vmap` with second-order MAML on a model with BatchNorm gives "
            "wrong meta-gradients in torch.func (checked against finite differences). Use "
            "`method.inner_loop=loop` (or auto), or `method.first_order=true`.",
        )
        torch.func.replace_all_batch_norm_modules_(model)

    @property
    def vmap_inexact(self) -> bool:
        return not self.first_order and getattr(self, "has_batch_norm", True)

    def form(self, device: torch.device) -> str:
        """The loop unless vmap is asked for (see the class docstring for why)."""
        return "vmap" if self.inner_loop == "vmap" else "loop"

    def adapt(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        second_order: bool,
        functional: bool = False,
        ways: int | None = None,
    ) -> Params:
        """`steps` gradient steps on the support loss over the task's `ways` classes (all of
        the head's outputs if None). `functional` takes the gradients with `torch.func.grad`
        (composable with vmap), else with `torch.autograd.grad`."""

        def support_loss(weights: Params) -> Tensor:
            return F.cross_entropy(task_logits(model, weights, buffers, x, ways), y)

        for _ in range(steps):
            grads = support_gradients(support_loss, params, second_order, functional)
            params = {n: p - self.inner_lr * grads[n] for n, p in params.items()}
        return params

    adapt_loop = partialmethod(adapt, functional=False)
    adapt_func = partialmethod(adapt, functional=True)

    def __call__(self, model: nn.Module, tasks: FewShotTasks, training: bool) -> Tensor:
        steps = self.inner_steps if training else self.eval_inner_steps
        second_order = training and not self.first_order
        inputs = tasks.support, tasks.support_labels, tasks.query
        if not training:  # evaluation adapts too: it needs autograd inside no-grad loops
            with torch.inference_mode(False), torch.enable_grad():
                inputs = tuple(t.clone() for t in inputs)
                return self.run(model, steps, False, tasks.ways, *inputs).detach()
        return self.run(model, steps, second_order, tasks.ways, *inputs)

    def run(
        self,
        model: nn.Module,
        steps: int,
        second_order: bool,
        ways: int,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
    ) -> Tensor:
        """Query logits (B, Q, ways) of every task after adapting to its support set: all
        tasks at once under `vmap`, or one after the other."""
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        functional = self.form(support.device) == "vmap"

        def one_task(s: Tensor, sl: Tensor, q: Tensor) -> Tensor:
            adapted = self.adapt(
                model, params, buffers, s, sl, steps, second_order, functional, ways
            )
            return task_logits(model, adapted, buffers, q, ways)

        if functional:
            return torch.func.vmap(one_task, randomness="different")(support, support_labels, query)
        return torch.stack(
            [one_task(*task) for task in zip(support, support_labels, query, strict=True)]
        )


ALGORITHMS: dict[str, type] = {"maml": MAML, "protonet": ProtoNet}


def confidence_interval_95(values: Tensor) -> float:
    """Half-width of the normal 95% interval of the mean (1.96 standard errors)."""
    if values.numel() < 2:
        return float("nan")
    return float(1.96 * values.float().std() / math.sqrt(values.numel()))


class EpisodeMetrics(nn.Module):
    """Per-episode query accuracy of each split, gathered from every rank (`CatMetric`):
    `<split>/acc` is their mean; evaluation adds the 95% interval and the episode count."""

    def __init__(self) -> None:
        super().__init__()
        self.by_split = nn.ModuleDict({f"{split}_episodes": CatMetric() for split in SPLITS})

    def update(self, split: str, accuracies: Tensor) -> None:
        self.by_split[f"{split}_episodes"].update(accuracies.detach().float())

    def compute_and_reset(self, split: str) -> dict[str, Tensor]:
        metric = self.by_split[f"{split}_episodes"]
        accuracies = metric.compute().flatten()
        metric.reset()
        values = {f"{split}/acc": accuracies.mean()}
        # One episode has no spread, so no interval: its NaN made metrics.json invalid JSON.
        if split != "train" and accuracies.numel() > 1:
            values[f"{split}/acc_ci95"] = torch.tensor(confidence_interval_95(accuracies))
        if split != "train":  # what the evaluation covered (`trainer.limit_*_batches`)
            values[f"{split}/episodes"] = torch.tensor(float(accuracies.numel()))
        return values


class EpisodicLearner(MethodCore):
    """Meta-trains `model` with an algorithm (`maml` or `protonet`) on episodic batches."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        algorithm: str = "protonet",
        regularizers: RegularizerSet | None = None,
        **algorithm_options: Any,
    ) -> None:
        require_choice("method.algorithm", algorithm, ALGORITHMS)
        require_known_options(ALGORITHMS[algorithm], algorithm_options, "method")
        super().__init__(model, optimizer, scheduler, regularizers, EpisodeMetrics())
        self.algorithm = ALGORITHMS[algorithm](**algorithm_options)
        if hasattr(self.algorithm, "prepare"):
            self.algorithm.prepare(model)
        if not self.algorithm.has_head:
            # ProtoNet never calls the linear head, so it never trained; left trainable, DDP
            # expects a gradient for it and stopped the first step ("parameters that were not
            # used in producing the loss"). Kept in the model so checkpoints keep their keys.
            model.head.requires_grad_(False)

    @property
    def method_name(self) -> str:
        return self.hparams.algorithm

    @property
    def offers(self) -> frozenset[str]:
        """Episodes are not plain batches (no augmentation/mixing); only MAML has a head."""
        heads = {"classifier_heads"} if self.algorithm.has_head else set()
        return self.OFFERS | {"embedding_dropout", "cross_entropy"} | heads

    def regularized_parts(self) -> ModelParts:
        heads = [self.model.head] if self.algorithm.has_head else []
        return ModelParts(self.model, self.model.features, heads)

    def setup(self, stage: str) -> None:
        from posttrain.data.episodes import EpisodicDataModule

        datamodule = getattr(self.trainer, "datamodule", None)
        require(
            datamodule is None or isinstance(datamodule, EpisodicDataModule),
            f"`method.algorithm={self.hparams.algorithm}` learns from few-shot episodes, but "
            "the data config serves plain batches. Use episodic data: `data=episodes_digits`, "
            "`data=omniglot` or `data=episodes_imagefolder`.",
        )
        if datamodule is not None:
            self.check_ways(datamodule.ways)

    def check_ways(self, ways: int) -> None:
        """MAML's head has as many outputs as training episodes had ways, so validation and
        test episodes may have at most that many: checked at set-up, before the validation
        of `data.ways=5 data.train_ways=3` ended in torch's 'Target 3 is out of bounds'."""
        outputs = self.model.head.out_features
        require(
            not self.algorithm.has_head or ways <= outputs,
            f"`data.ways={ways}`: this MAML model's head predicts {outputs} classes (its "
            f"training episodes are {outputs}-way, `data.train_ways`), so it validates and "
            f"tests episodes of at most {outputs} ways; fewer ways use the head's first "
            "outputs. ProtoNet evaluates any number of ways.",
        )

    def gap_is_like_for_like(self) -> bool:
        """Train and validation episodes compare only with equal ways and, for MAML, equal
        adaptation steps; otherwise `val/acc_gap` would subtract unlike numbers."""
        datamodule = getattr(self.trainer, "datamodule", None)
        same_ways = datamodule is None or datamodule.train_ways == datamodule.ways
        algorithm = self.algorithm
        same_steps = not isinstance(algorithm, MAML) or (
            algorithm.inner_steps == algorithm.eval_inner_steps
        )
        return same_ways and same_steps

    def step(self, batch: tuple[Tensor, ...], split: str) -> StepOutput:
        support, support_labels, query, query_labels = batch
        tasks = FewShotTasks(support, support_labels, query, ways=int(support_labels.max()) + 1)
        logits = self.algorithm(self.model, tasks, training=split == "train")
        loss = F.cross_entropy(
            logits.flatten(0, 1), query_labels.flatten(), label_smoothing=self.label_smoothing
        )
        accuracy = (logits.argmax(-1) == query_labels).float().mean(-1)  # one per episode
        self.metrics.update(split, accuracy)
        return StepOutput(loss, len(accuracy))
