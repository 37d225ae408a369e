"""Few-shot accuracy: ProtoNet, MAML and first-order MAML, N-way K-shot, beside the papers.

On real Omniglot (the papers' Vinyals et al. split, `experiment=omniglot_*`,
`data.split=vinyals`) when `--root` names a folder holding it; on the embedded digits
(`experiment=digits_*`, digits cut 4/3/3 into meta-train/val/test, each with its 4 rotations
as classes, 16/12/12, so that 10-way episodes fit) otherwise:

    python -m benchmarks.fewshot --data omniglot --root DIR --budget-minutes 120
    python -m benchmarks.fewshot                       # embedded digits, 5- and 10-way
    python -m benchmarks.fewshot --data omniglot --root DIR --extra trainer=gpu
                                                       # the papers' schedules, no time limit

Training runs are Hydra multiruns of `python train.py -m experiment=... data.shots=1,5` (ProtoNet;
MAML with `method.first_order=false,true data.ways=...` swept in one multirun per recipe), in
job folders under outputs/bench/fewshot_<time>/ (or `--sweep-dir`):
- ProtoNet: one model per shot count (Omniglot: 60-way training episodes, as Snell et al.),
  evaluated at every `--ways`: a prototype classifier takes any number of classes.
- MAML and first-order MAML: one model per ways x shots, because MAML's output layer has the
  training ways (Finn et al. trained 20-way separately, with 5 inner steps, alpha 0.1, 16
  tasks per meta-batch: applied here on Omniglot). `--maml-ways 5` trains 5-way only; the
  table then says the 20-way rows were not run.

Other options: `--ways`, `--shots`, `--methods`, `--extra` (overrides for every training run,
e.g. `trainer=gpu`), `--eval-extra` (for eval.py, e.g. `data.test_episodes=1000`),
`--collect-only` (score the runs already in `--sweep-dir`).

`--budget-minutes N` is the meta-training time of the whole benchmark, split evenly over the
training runs (each gets Lightning's `trainer.max_time`; the experiment's own epochs stay the
upper bound: a run may end earlier). A run stopped by the clock still validates and writes
best.ckpt. Without it the experiments' own lengths run (the papers' schedules on Omniglot).

Every row is scored by `python eval.py ckpt_path=<best.ckpt> [data.ways=W]` on the fixed test
episodes (mean accuracy +- 95% CI); rows record the meta-training episodes seen and the
meta-training wall time (train start to train end, validation included; start-up and testing
excluded) measured by `MetaTrainingClock` inside the run. Writes benchmarks/results/fewshot.json
(or `--results-dir`); the README table is rendered from it by `markdown_table`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from benchmarks.common import OUT, QUIET, bench_command, run_command, write_result
from posttrain.run_names import override_value

METHODS = ("protonet", "maml", "fomaml")
LABELS = {"protonet": "ProtoNet", "maml": "MAML", "fomaml": "first-order MAML"}
EXPERIMENTS = {
    "digits": {"protonet": "digits_protonet", "maml": "digits_maml"},
    "omniglot": {"protonet": "omniglot_protonet", "maml": "omniglot_maml"},
}
# Data set-up of each mode: digits cut 4/3/3 by digit (a digit's 4 rotations in one split),
# 16/12/12 classes, so 10-way val and test fit.
DATA_OVERRIDES = {
    "digits": ["data.val_fraction=0.3", "data.test_fraction=0.3"],
    "omniglot": ["data.split=vinyals"],
}
DEFAULT_WAYS = {"digits": "5,10", "omniglot": "5,20"}
# MAML's recipe for more ways (Finn et al. 2017, appendix A.1: 20-way Omniglot trained and
# evaluated with 5 inner steps, alpha = 0.1, meta-batches of 16 tasks, 60k meta-iterations);
# 5-way is the experiment's own (1 step, alpha = 0.4, 3 steps at test, 32 tasks).
MAML_WAYS_RECIPE = {
    ("omniglot", 20): [
        "method.inner_steps=5",
        "method.eval_inner_steps=5",
        "method.inner_lr=0.1",
        "data.meta_batch_size=16",
        "data.train_episodes=16000",  # 1000 meta-iterations per epoch: 60k in 60 epochs
    ]
}
# Published Omniglot test accuracy (%), 20-way and 5-way, 1- and 5-shot.
PAPERS = {
    "protonet": {
        "source": "Snell et al. 2017",
        "acc": {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9},
    },
    "maml": {
        "source": "Finn et al. 2017",
        "acc": {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8, (20, 5): 98.9},
    },
    "fomaml": {
        "source": "Finn et al. 2017",
        "acc": {(5, 1): 98.3, (5, 5): 99.2, (20, 1): 89.4, (20, 5): 97.9},
    },
}
CLOCK_FILE = "meta_training.json"
CLOCK_TARGET = "benchmarks.fewshot.MetaTrainingClock"
# Job folders named by job number: the overrides would make names longer than a file name.
SUBDIR = "hydra.sweep.subdir=${hydra.job.num}"


class MetaTrainingClock(Callback):
    """Added to each training run: wall time from train start to train end (validation
    included) and the meta-training episodes (tasks) the optimizer saw, as JSON in `out`."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.started: float | None = None
        self.episodes = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = time.time()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.episodes += len(batch[0])  # a meta-batch: one leading entry per task

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        seconds = time.time() - (self.started or time.time())
        report = {"seconds": seconds, "episodes": self.episodes, "steps": trainer.global_step}
        self.out.write_text(json.dumps(report, indent=2) + "\n")


def paper_rows() -> list[dict]:
    """PAPERS as JSON rows (the result file records what the table compares against)."""
    return [
        {"method": m, "ways": w, "shots": k, "acc_percent": acc, "source": PAPERS[m]["source"]}
        for m in METHODS
        for (w, k), acc in PAPERS[m]["acc"].items()
    ]


def max_time(seconds: float) -> str:
    """Lightning's `DD:HH:MM:SS`, at least one second."""
    total = max(1, round(seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def training_plan(
    data: str, methods: list[str], maml_ways: list[int], shots: list[int]
) -> list[tuple[str, str, int, list[str]]]:
    """(folder name, experiment family, jobs, overrides) of each training multirun. ProtoNet
    sweeps the shots; MAML and first-order MAML share multiruns (`method.first_order` is
    swept) that sweep ways and shots, one per MAML recipe (20-way Omniglot has its own)."""
    shot_sweep = f"data.shots={','.join(map(str, shots))}"
    plan: list[tuple[str, str, int, list[str]]] = []
    if "protonet" in methods:
        plan.append(("protonet", "protonet", len(shots), [shot_sweep]))
    orders = [str(m == "fomaml").lower() for m in ("maml", "fomaml") if m in methods]
    if not orders:
        return plan
    groups: dict[tuple[str, ...], list[int]] = {}
    for w in maml_ways:
        groups.setdefault(tuple(MAML_WAYS_RECIPE.get((data, w), [])), []).append(w)
    for recipe, group in groups.items():
        name = "maml" if len(groups) == 1 else f"maml_{'_'.join(map(str, group))}way"
        overrides = [
            f"method.first_order={','.join(orders)}",
            f"data.ways={','.join(map(str, group))}",
            shot_sweep,
            *recipe,
        ]
        plan.append((name, "maml", len(orders) * len(group) * len(shots), overrides))
    return plan


def read_job(job: Path) -> dict:
    """A finished training job: its method, ways/shots, checkpoint, clock and metrics."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    metrics_file = job / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if metrics.get("status") != "completed":
        raise SystemExit(f"training job {job} did not complete: {metrics or 'no metrics.json'}")
    clock = json.loads((job / CLOCK_FILE).read_text())
    method = str(config.method.algorithm)
    if method == "maml" and config.method.get("first_order"):
        method = "fomaml"
    return {
        "method": method,
        "folder": str(job),
        "ways": int(config.data.ways),
        "train_ways": int(config.data.get("train_ways") or config.data.ways),
        "shots": int(config.data.shots),
        "ckpt": str(job / "checkpoints" / "best.ckpt"),
        "episodes": int(clock["episodes"]),
        "steps": int(clock["steps"]),
        "wall_seconds": round(float(clock["seconds"]), 1),
        "train_test_acc": metrics.get("test/acc"),
    }


def jobs_of(multirun: Path) -> list[Path]:
    return sorted(p for p in multirun.iterdir() if (p / ".hydra" / "config.yaml").is_file())


def train(sweep: Path, data: str, plan: list, common: list[str]) -> None:
    for name, family, _, overrides in plan:
        command = [
            "train.py",
            "-m",
            f"experiment={EXPERIMENTS[data][family]}",
            *overrides,
            *common,
            f"+callbacks.fewshot_clock._target_={CLOCK_TARGET}",
            f"+callbacks.fewshot_clock.out=${{paths.output_dir}}/{CLOCK_FILE}",
            f"hydra.sweep.dir={sweep / name}",
            SUBDIR,
        ]
        run_python(command, name)


def run_python(args: list[str], label: str) -> float:
    import sys

    print(f"[{label}] python {shlex.join(args)}", flush=True)
    started = time.time()
    run_command([sys.executable, *args], label)
    return time.time() - started


def evaluate(sweep: Path, name: str, ckpts: list[str], ways: list[int] | None, extra: list[str]):
    """`python eval.py -m ckpt_path=<each> [data.ways=<each>]`: one process for all."""
    command = [
        "eval.py",
        "-m",
        "ckpt_path=" + ",".join(override_value(c) for c in ckpts),
        *([f"data.ways={','.join(map(str, ways))}"] if ways else []),
        *extra,
        *QUIET,
        f"hydra.sweep.dir={sweep / name}",
        SUBDIR,
    ]
    run_python(command, name)
    from posttrain.report import read_overrides

    scores = {}
    for job in jobs_of(sweep / name):
        metrics = json.loads((job / "metrics.json").read_text())
        if metrics.get("status") != "completed":
            raise SystemExit(f"evaluation {job} did not complete: {metrics}")
        overrides = read_overrides(job)
        key = (overrides["ckpt_path"].strip("'\""), overrides.get("data.ways"))
        scores[key] = metrics
    return scores


def collect(sweep: Path, plan: list, ways: list[int], eval_extra: list[str]) -> list[dict]:
    """Score every training job's best.ckpt with eval.py: ProtoNet at every ways (one model per
    shot count), MAML at its training ways (its head has that many outputs)."""
    jobs = [read_job(job) for name, *_ in plan for job in jobs_of(sweep / name)]
    settings = []
    for family in dict.fromkeys(family for _, family, _, _ in plan):
        mine = [j for j in jobs if (j["method"] == "protonet") == (family == "protonet")]
        if family == "protonet":
            scores = evaluate(sweep, "eval_protonet", [j["ckpt"] for j in mine], ways, eval_extra)
            settings += [(j, w, scores[j["ckpt"], str(w)]) for j in mine for w in ways]
        else:
            scores = evaluate(sweep, "eval_maml", [j["ckpt"] for j in mine], None, eval_extra)
            settings += [(j, j["ways"], scores[j["ckpt"], None]) for j in mine]
    rows = []
    for job, w, metrics in settings:
        rows.append(
            {
                "method": job["method"],
                "ways": w,
                "shots": job["shots"],
                "test_acc": metrics["test/acc"],
                "ci95": metrics["test/acc_ci95"],
                "test_episodes": int(metrics["test/episodes"]),
                "train_ways": job["train_ways"],
                "episodes_seen": job["episodes"],
                "steps": job["steps"],
                "wall_seconds": job["wall_seconds"],
                # the training run's own test of the same checkpoint at its own setting
                "train_test_acc": job["train_test_acc"] if w == job["ways"] else None,
                "run": job["folder"],
            }
        )
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["ways"], r["shots"]))


def fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def markdown_table(result: dict) -> str:
    """The README table: one row per method x ways x shots, measured accuracy +- 95% CI
    beside the papers' Omniglot number, meta-training episodes and wall time."""
    papers = {(p["method"], p["ways"], p["shots"]): p for p in result.get("papers", [])}
    cells = {(r["method"], r["ways"], r["shots"]): r for r in result["rows"]}
    data = result.get("data", "digits")
    lines = [
        f"| method | ways | shots | test acc % ± 95% CI ({data}) | paper (Omniglot) "
        "| meta-training episodes | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    methods = result.get("methods") or sorted(
        {m for m, _, _ in cells}, key=lambda m: METHODS.index(m) if m in METHODS else 99
    )
    ways = result.get("ways") or sorted({w for _, w, _ in cells})
    shots = result.get("shots") or sorted({k for _, _, k in cells})
    missing = []
    for method in methods:
        for w in ways:
            for k in shots:
                paper = papers.get((method, w, k))
                paper_cell = f"{paper['acc_percent']:.1f} ({paper['source']})" if paper else "—"
                row = cells.get((method, w, k))
                if row is None:
                    missing.append(f"{LABELS.get(method, method)} {w}-way {k}-shot")
                    measured, episodes, wall = "not run", "—", "—"
                else:
                    measured = f"{100 * row['test_acc']:.1f} ± {100 * row['ci95']:.1f}"
                    episodes = f"{row['episodes_seen']:,}"
                    wall = fmt_seconds(row["wall_seconds"])
                label = LABELS.get(method, method)
                lines.append(
                    f"| {label} | {w} | {k} | {measured} | {paper_cell} | {episodes} | {wall} |"
                )
    notes = []
    if missing:
        notes.append(
            f"Not run: {', '.join(missing)} (MAML's output layer has its training ways, so "
            "each ways needs its own MAML model: `--maml-ways`)."
        )
    notes.append(
        "ProtoNet: one model per shot count, scored at every ways (wall time and episodes "
        "are that model's); MAML: one model per ways and shots."
    )
    if data != "omniglot":
        notes.append(
            f"The papers' numbers are Omniglot's, shown for scale: these rows are on {data}."
        )
    budget = result.get("budget_minutes")
    if budget is not None:
        notes.append(
            f"Budget: {budget:g} min of meta-training in all, `trainer.max_time` "
            f"{result['max_time_per_run']} per training run."
        )
    else:
        notes.append("No time budget: each run trained for its experiment's full length.")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("digits", "omniglot"), default=None,
                        help="default: omniglot with --root, else the embedded digits")  # fmt: skip
    parser.add_argument("--root", default=None, help="folder holding Omniglot (data.root)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="meta-training minutes in all, split over the runs")  # fmt: skip
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--ways", default=None, help="default: 5,20 (Omniglot), 5,10 (digits)")
    parser.add_argument("--maml-ways", default=None, help="ways MAML trains at (default: --ways)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every train run")
    parser.add_argument("--eval-extra", nargs="*", default=[], help="overrides for eval.py")
    parser.add_argument("--sweep-dir", default=None, help="default: outputs/bench/fewshot_<time>")
    parser.add_argument("--results-dir", default=None,
                        help="where fewshot.json goes (default: benchmarks/results)")  # fmt: skip
    parser.add_argument("--collect-only", action="store_true", help="score existing runs")
    args = parser.parse_args(argv)
    data = args.data or ("omniglot" if args.root else "digits")
    if data == "omniglot" and not args.root:
        parser.error("--data omniglot needs --root DIR (the folder holding Omniglot)")
    ways = [int(w) for w in (args.ways or DEFAULT_WAYS[data]).split(",")]
    maml_ways = [int(w) for w in args.maml_ways.split(",")] if args.maml_ways else ways
    shots = [int(k) for k in args.shots.split(",")]
    sweep = Path(args.sweep_dir or OUT / f"fewshot_{time.strftime('%Y%m%d_%H%M%S')}")
    plan = training_plan(data, args.methods, maml_ways, shots)
    runs = sum(jobs for _, _, jobs, _ in plan)
    per_run = None if args.budget_minutes is None else args.budget_minutes * 60 / runs
    root = [f"data.root={override_value(args.root)}"] if args.root else []
    common = [*DATA_OVERRIDES[data], *root]
    if per_run is not None:
        common.append(f"+trainer.max_time={max_time(per_run)}")
    common += [*args.extra, *QUIET]
    started = time.time()
    if not args.collect_only:
        train(sweep, data, plan, common)
    rows = collect(sweep, plan, ways, [*args.eval_extra])
    print(f"\n{'method':<18} {'ways':>4} {'shots':>5} {'test acc % ± CI95':>18} "
          f"{'paper':>6} {'episodes':>9} {'wall s':>7}")  # fmt: skip
    for r in rows:
        paper = PAPERS[r["method"]]["acc"].get((r["ways"], r["shots"]))
        print(
            f"{LABELS[r['method']]:<18} {r['ways']:>4} {r['shots']:>5} "
            f"{100 * r['test_acc']:>11.1f} ± {100 * r['ci95']:<4.1f} "
            f"{'' if paper is None else paper:>6} {r['episodes_seen']:>9} {r['wall_seconds']:>7}"
        )
    payload = {
        "data": data,
        "root": args.root,
        "methods": args.methods,
        "ways": ways,
        "maml_ways": maml_ways,
        "shots": shots,
        "budget_minutes": args.budget_minutes,
        "training_runs": runs,
        "max_time_per_run": None if per_run is None else max_time(per_run),
        "sweep_dir": str(sweep),
        "train_overrides": common,
        "eval_overrides": args.eval_extra,
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
        "papers": paper_rows(),
    }
    path = write_result("fewshot", bench_command("fewshot", argv), payload, args.results_dir)
    print(f"\nwrote {path} (runs in {sweep})")


if __name__ == "__main__":
    main()
