"""MAML inner-loop speed: vmap vs per-task loop vs module cloning, side by side in one run.

Same maths three ways on one meta-batch (convnet4, 5-way 1-shot, 15 queries, meta-batch 16,
1 inner step, 28x28): `loop` and `vmap` are posttrain's functional forms
(`method.inner_loop`), `clone` is the module-cloning style of older libraries
(learn2learn-like: a differentiable copy of the module per task, updated in place).
Prints ms per meta-batch (forward + backward), ratios, and whether the meta-gradients agree;
writes benchmarks/results/maml_speed.json. Forms alternate in rounds so load on a shared machine
hits all of them alike.

    python -m benchmarks.maml_speed [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.common import bench_command, write_result
from posttrain.methods.meta import MAML, FewShotTasks
from posttrain.models import build_classifier


def module_tensor(module: nn.Module, name: str) -> Tensor:
    for part in name.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def replace_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Swap a parameter (or an earlier replacement) for a plain, differentiable tensor."""
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters.pop(leaf, None)
    setattr(module, leaf, value)


def clone_style_logits(model: nn.Module, maml: MAML, support, support_labels, query) -> Tensor:
    """Per task: deep-copy the module with differentiable parameter clones (learn2learn's
    `clone_module`), SGD-update the copy's tensors in place, run the query through it."""
    names = [n for n, _ in model.named_parameters()]
    outputs = []
    for s, sl, q in zip(support, support_labels, query, strict=True):
        learner = copy.deepcopy(model)
        for name, source in model.named_parameters():
            replace_tensor(learner, name, source.clone())
        for _ in range(maml.inner_steps):
            tensors = [module_tensor(learner, n) for n in names]
            loss = F.cross_entropy(learner(s), sl)
            grads = torch.autograd.grad(loss, tensors, create_graph=not maml.first_order)
            for name, tensor, grad in zip(names, tensors, grads, strict=True):
                replace_tensor(learner, name, tensor - maml.inner_lr * grad)
        outputs.append(learner(q))
    return torch.stack(outputs)


def meta_batch(
    device: torch.device, tasks: int = 16, ways: int = 5, shots: int = 1, queries: int = 15
):
    torch.manual_seed(0)
    support = torch.randn(tasks, ways * shots, 1, 28, 28, device=device)
    query = torch.randn(tasks, ways * queries, 1, 28, 28, device=device)
    support_labels = torch.arange(ways, device=device).repeat_interleave(shots).expand(tasks, -1)
    query_labels = torch.arange(ways, device=device).repeat_interleave(queries).expand(tasks, -1)
    return support, support_labels, query, query_labels


def step(form: str, first_order: bool, device: torch.device) -> tuple[float, list[Tensor]]:
    torch.manual_seed(0)
    model = build_classifier("convnet4", num_classes=5, in_channels=1).to(device)
    maml = MAML(inner_steps=1, inner_lr=0.4, first_order=first_order)
    maml.prepare(model)
    # Measured for vmap second-order too, though training refuses it (inexact with BatchNorm).
    maml.inner_loop = "loop" if form == "clone" else form
    support, support_labels, query, query_labels = meta_batch(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if form == "clone":
        logits = clone_style_logits(model, maml, support, support_labels, query)
    else:
        logits = maml(model, FewShotTasks(support, support_labels, query, 5), training=True)
    F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, [
        p.grad.detach().clone() for p in model.parameters()
    ]


def markdown_table(result: dict) -> str:
    """The README table: median ms per meta-batch of each inner-loop form for MAML and
    FOMAML (with the speed-up over cloning), and whether its gradients equal the loop's."""
    forms = ("loop", "vmap", "clone")
    lines = ["| | " + " | ".join(forms) + " |", "|---" * (len(forms) + 1) + "|"]
    for label in ("MAML", "FOMAML"):
        cells = [
            f"{result[label]['ms_per_meta_batch'][f]:.0f}"
            + (
                ""
                if f == "clone"
                else f" ({result[label]['speedup_vs_clone'][f]:.2f}× clone's speed)"
            )
            for f in forms
        ]
        lines.append(f"| {label} ms | " + " | ".join(cells) + " |")
    for label in ("MAML", "FOMAML"):
        match = result[label]["gradients_match_loop"]
        cells = ["—" if f == "loop" else ("yes" if match[f] else "no") for f in forms]
        lines.append(f"| {label} gradients equal to loop | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    forms = ("loop", "vmap", "clone")
    results = {}
    for first_order in (False, True):
        label = "FOMAML" if first_order else "MAML"
        times: dict[str, list[float]] = {f: [] for f in forms}
        grads: dict[str, list[Tensor]] = {}
        for form in forms:  # warm-up, and the gradients to compare
            _, grads[form] = step(form, first_order, device)
        for _ in range(args.rounds):
            for form in forms:
                times[form].append(step(form, first_order, device)[0])
        median = {f: statistics.median(t) for f, t in times.items()}
        agree = {
            f: all(
                torch.allclose(a, b, rtol=1e-3, atol=1e-5)
                for a, b in zip(grads["loop"], grads[f], strict=True)
            )
            for f in forms
        }
        results[label] = {
            "ms_per_meta_batch": median,
            "gradients_match_loop": agree,
            "speedup_vs_clone": {f: median["clone"] / median[f] for f in forms},
        }
        print(
            f"\n{label} on {device}, convnet4 5-way 1-shot, 15 queries, meta-batch 16, "
            f"1 inner step (median of {args.rounds})"
        )
        for form in forms:
            print(
                f"  {form:<6} {median[form]:8.1f} ms   {median['clone'] / median[form]:5.2f}x "
                f"vs clone   gradients match loop: {agree[form]}"
            )
    path = write_result(
        "maml_speed",
        bench_command("maml_speed", argv),
        {"device": str(device), "rounds": args.rounds, **results},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
