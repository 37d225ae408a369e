"""Meta-learning on few-shot episodes: MAML / first-order MAML and Prototypical Networks.

`EpisodicLearner` is the one LightningModule: it runs an algorithm on a meta-batch of
episodes, takes the cross-entropy on the query images, and reports per-episode accuracy —
for evaluation the mean over a fixed set of episodes with its 95% confidence interval, as
the literature does. Algorithms are small objects with one call:
`algorithm(model, support, support_labels, query, ways, training) -> query logits (B, Q, ways)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from posttrain.errors import require, require_choice, require_known_options, require_positive
from posttrain.methods.metrics import DivergenceGuard, EpochMeans, ValidationTracker, log_step_loss
from posttrain.methods.optim import configure_optimization
from posttrain.regularizers import RegularizerSet

Params = dict[str, Tensor]


class ProtoNet:
    """Snell et al. 2017: prototypes are mean support embeddings; logits are minus the squared
    Euclidean distance from each query embedding to each prototype."""

    def __call__(
        self,
        model: nn.Module,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        ways: int,
        training: bool,
    ) -> Tensor:
        tasks = support.shape[0]
        support_emb = model.features(support.flatten(0, 1)).view(tasks, support.shape[1], -1)
        query_emb = model.features(query.flatten(0, 1)).view(tasks, query.shape[1], -1)
        one_hot = F.one_hot(support_labels, ways).to(support_emb.dtype)  # (B, S, W)
        prototypes = one_hot.transpose(1, 2) @ support_emb / one_hot.sum(1).unsqueeze(-1)
        return -torch.cdist(query_emb, prototypes).pow(2)


class MAML:
    """Finn et al. 2017: adapt all weights with a few gradient steps on the support set, then
    score the query set with the adapted weights; the outer loss trains the initialization.

    The inner loop is functional (`torch.func.functional_call`), never a module clone, in two
    forms over the same maths: `loop` (per task, `torch.autograd.grad`) and `vmap` (all tasks
    of a meta-batch at once, `torch.func.grad`). `auto` picks the faster for the device:
    the loop on CPU (measured here), vmap on GPU. `first_order` drops the second-order term
    (FOMAML). BatchNorm uses each task's batch statistics, as in the paper (torch.func's
    `replace_all_batch_norm_modules_`, which vmap needs anyway).

    Known limit, found by our tests: second-order gradients through BatchNorm under `vmap`
    are wrong in torch.func (torch 2.14: ~1% off finite differences, the loop matches them).
    So `auto` uses vmap only where it is exact, and asking for that combination is refused.
    """

    FORMS: ClassVar[tuple[str, ...]] = ("auto", "loop", "vmap")

    def __init__(
        self,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        first_order: bool = False,
        eval_inner_steps: int = 3,
        inner_loop: str = "auto",
    ) -> None:
        require_positive("method.inner_steps", inner_steps)
        require_positive("method.inner_lr", inner_lr)
        require_positive("method.eval_inner_steps", eval_inner_steps)
        require_choice("method.inner_loop", inner_loop, self.FORMS)
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.eval_inner_steps, self.inner_loop = eval_inner_steps, inner_loop

    def prepare(self, model: nn.Module) -> None:
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
        if self.inner_loop != "auto":
            return self.inner_loop
        return "vmap" if device.type == "cuda" and not self.vmap_inexact else "loop"

    def adapt_loop(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        second_order: bool,
    ) -> Params:
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
            params = {
                n: p - self.inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)
            }
        return params

    def adapt_func(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        second_order: bool,
    ) -> Params:
        def support_loss(weights: Params) -> Tensor:
            return F.cross_entropy(functional_call(model, (weights, buffers), (x,)), y)

        for _ in range(steps):
            grads = torch.func.grad(support_loss)(params)
            if not second_order:
                grads = {n: g.detach() for n, g in grads.items()}
            params = {n: p - self.inner_lr * grads[n] for n, p in params.items()}
        return params

    def query_logits(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        adapt: Callable,
        steps: int,
        second_order: bool,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
    ) -> Tensor:
        adapted = adapt(model, params, buffers, support, support_labels, steps, second_order)
        return functional_call(model, (adapted, buffers), (query,))

    def __call__(
        self,
        model: nn.Module,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        ways: int,
        training: bool,
    ) -> Tensor:
        steps = self.inner_steps if training else self.eval_inner_steps
        second_order = training and not self.first_order
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        if not training:  # evaluation adapts too: it needs autograd inside no-grad loops
            with torch.inference_mode(False), torch.enable_grad():
                inputs = support.clone(), support_labels.clone(), query.clone()
                return self.run(model, params, buffers, steps, False, *inputs).detach()
        return self.run(model, params, buffers, steps, second_order, support, support_labels, query)

    def run(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        steps: int,
        second_order: bool,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
    ) -> Tensor:
        if self.form(support.device) == "vmap":

            def one_task(s: Tensor, sl: Tensor, q: Tensor) -> Tensor:
                return self.query_logits(
                    model, params, buffers, self.adapt_func, steps, second_order, s, sl, q
                )

            return torch.func.vmap(one_task, randomness="different")(support, support_labels, query)
        return torch.stack(
            [
                self.query_logits(
                    model, params, buffers, self.adapt_loop, steps, second_order, s, sl, q
                )
                for s, sl, q in zip(support, support_labels, query, strict=True)
            ]
        )


ALGORITHMS: dict[str, type] = {"maml": MAML, "protonet": ProtoNet}


def confidence_interval_95(values: Tensor) -> float:
    """Half-width of the normal 95% interval of the mean (1.96 standard errors)."""
    if values.numel() < 2:
        return float("nan")
    return float(1.96 * values.float().std() / math.sqrt(values.numel()))


class EpisodicLearner(L.LightningModule):
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
        super().__init__()
        self.save_hyperparameters(ignore=["model", "regularizers"])
        require_choice("method.algorithm", algorithm, ALGORITHMS)
        require_known_options(ALGORITHMS[algorithm], algorithm_options, "method")
        self.algorithm = ALGORITHMS[algorithm](**algorithm_options)
        if hasattr(self.algorithm, "prepare"):
            self.algorithm.prepare(model)
        self.model = model
        self.regularizers = regularizers or RegularizerSet()
        self.tracker = ValidationTracker()
        self.means = EpochMeans(["train/loss", "train/penalty", "val/loss", "test/loss"])
        self.episode_accuracies: dict[str, list[Tensor]] = {s: [] for s in ("train", "val", "test")}
        self.divergence = DivergenceGuard()

    def setup(self, stage: str) -> None:
        from posttrain.data.episodes import EpisodicDataModule

        datamodule = getattr(self.trainer, "datamodule", None)
        require(
            datamodule is None or isinstance(datamodule, EpisodicDataModule),
            f"`method.algorithm={self.hparams.algorithm}` learns from few-shot episodes, but "
            "the data config serves plain batches. Use episodic data: `data=episodes_digits`, "
            "`data=omniglot` or `data=episodes_imagefolder`.",
        )

    def episode_step(self, batch: tuple[Tensor, ...], split: str) -> Tensor:
        support, support_labels, query, query_labels = batch
        ways = int(support_labels.max()) + 1
        training = split == "train"
        logits = self.algorithm(self.model, support, support_labels, query, ways, training)
        smoothing = self.regularizers.label_smoothing if training else 0.0
        loss = F.cross_entropy(
            logits.flatten(0, 1), query_labels.flatten(), label_smoothing=smoothing
        )
        accuracy = (logits.argmax(-1) == query_labels).float().mean(-1)  # one per episode
        self.episode_accuracies[split].append(accuracy.detach())
        self.means.update(f"{split}/loss", loss, len(accuracy))
        if training:
            log_step_loss(self, loss)
            penalty = self.regularizers.penalty(self.model)
            if penalty is not None:
                self.means.update("train/penalty", penalty)
                loss = loss + penalty
            self.divergence.observe(loss)
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.episode_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.episode_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.episode_step(batch, "test")

    def gather_accuracies(self, split: str) -> Tensor:
        """Every episode's accuracy of this epoch, from all ranks."""
        local = torch.cat(self.episode_accuracies[split])
        self.episode_accuracies[split] = []
        gathered = self.all_gather(local)
        return gathered.flatten() if gathered.ndim > 1 else gathered

    def on_train_epoch_end(self) -> None:
        self.divergence.check(self.current_epoch)
        train_acc = self.gather_accuracies("train").mean()
        means = self.means.compute_and_reset("train/")
        self.log_dict({"train/acc": train_acc, **means, **self.tracker.gap(train_acc)})

    def on_validation_epoch_end(self) -> None:
        accuracies = self.gather_accuracies("val")
        means = self.means.compute_and_reset("val/")
        if self.trainer.sanity_checking:
            return
        values = {
            **means,
            "val/acc": accuracies.mean(),
            "val/acc_ci95": torch.tensor(confidence_interval_95(accuracies)),
        }
        values.update(self.tracker.after_validation(values["val/acc"]))
        self.log_dict(values, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        accuracies = self.gather_accuracies("test")
        self.log_dict(
            {
                **self.means.compute_and_reset("test/"),
                "test/acc": accuracies.mean(),
                "test/acc_ci95": torch.tensor(confidence_interval_95(accuracies)),
                "test/episodes": torch.tensor(float(accuracies.numel())),
            }
        )

    def configure_callbacks(self) -> list[Any]:
        return self.regularizers.callbacks()

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.hparams.optimizer, self.hparams.scheduler)
