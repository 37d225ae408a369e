"""The benchmarks' README tables say only what their result dict holds: small synthetic
results, no benchmark run. A comparison with no baseline or no spread behind it is named as
such, never printed as a number."""

from __future__ import annotations

import statistics


def regularization_runs(accs: list[float]) -> list[dict[str, float]]:
    return [{"seed": i, "test/acc": a, "val/acc_gap": 0.05} for i, a in enumerate(accs)]


def test_regularization_without_a_none_run_claims_no_difference_to_it() -> None:
    """`--only augment mixup`: there is no `reg=none` mean to subtract (it was taken as 0:
    `+95.5 (+0.0 σ of none)`)."""
    from benchmarks.regularization import markdown_table, summarize

    rows = summarize({"augment policy=basic": regularization_runs([0.95, 0.96])})
    assert rows[0]["delta_vs_none"] is None and rows[0]["delta_in_none_std"] is None
    table = markdown_table({"rows": rows})
    assert "| no `reg=none` run to compare with |" in table
    assert "σ of none" not in table and "+95.5" not in table


def test_regularization_with_one_none_seed_gives_the_difference_but_no_sigma() -> None:
    """One seed of `reg=none` has a mean but std 0: the difference is real, a ratio to 0 is
    not (it was printed as `+0.0 σ of none`)."""
    from benchmarks.regularization import markdown_table, summarize

    rows = summarize(
        {"none": regularization_runs([0.90]), "mixup alpha=0.2": regularization_runs([0.95])}
    )
    mixup = next(r for r in rows if r["setting"] != "none")
    assert mixup["delta_in_none_std"] is None
    assert "| +5.0 (σ of none is 0) |" in markdown_table({"rows": rows})


def test_regularization_delta_in_none_stds() -> None:
    from benchmarks.regularization import markdown_table, summarize

    rows = summarize(
        {"none": regularization_runs([0.90, 0.92]), "augment": regularization_runs([0.95, 0.95])}
    )
    augment = next(r for r in rows if r["setting"] == "augment")
    assert abs(augment["delta_in_none_std"] - 0.04 / statistics.stdev([0.90, 0.92])) < 1e-9
    assert "| +4.0 (+2.8 σ of none) |" in markdown_table({"rows": rows})


def distill_result(alone: list[float], distilled: list[float], teacher: float) -> dict:
    from benchmarks.distill import summarize

    rows = [
        {"seed": seed, "alone": {"test_acc": a, "wall_seconds": 40.0},
         "distilled": {"test_acc": d, "wall_seconds": 80.0}, "wall_ratio": 2.0}
        for seed, (a, d) in enumerate(zip(alone, distilled, strict=True))
    ]  # fmt: skip
    return {
        "summary": summarize(rows),
        "rows": rows,
        "extra": [],
        "teacher_epochs": 150,
        "student_epochs": 150,
        "teacher": {"test_acc": teacher, "wall_seconds": 60.0},
    }


def test_distill_target_is_not_judged_without_a_spread_of_the_student_alone() -> None:
    """One seed: the student alone has std 0, so any gain was 'more than one std' and the
    table read 'target ... met' after +0.1 points."""
    from benchmarks.distill import markdown_table

    result = distill_result([0.95], [0.951], teacher=0.99)
    assert result["summary"]["target_met"] is None
    note = markdown_table(result).splitlines()[-1]
    assert "target (more than one std of alone): not measurable" in note
    assert ": met" not in note


def test_distill_weaker_teacher_is_a_sentence_of_its_own_not_the_verdicts_reason() -> None:
    """'not met (the teacher scores below the student trained alone)' read as the reason the
    target was missed, and 'met (the teacher scores below ...)' where it was not."""
    from benchmarks.distill import markdown_table

    met = markdown_table(distill_result([0.95, 0.96], [0.99, 0.99], teacher=0.9))
    weaker = "The teacher (90.0%) scores below the student trained alone (95.5%)."
    assert f"target (more than one std of alone): met. {weaker}" in met
    missed = markdown_table(distill_result([0.95, 0.96], [0.95, 0.96], teacher=0.99))
    assert "target (more than one std of alone): not met. Wall time" in missed
    assert "teacher scores below" not in missed
    assert "time ratio: mean ± std and median of the per-seed distilled / alone ratios" in met


# val/acc_best of 143 validation images as float32 (what metrics.json holds): 140, 141, 142.
VAL_140, VAL_141, VAL_142 = 0.9790209531784058, 0.9860140085220337, 0.9930070042610168


def test_distill_choice_on_validation_keeps_the_first_of_equal_image_counts() -> None:
    """(140 + 142) / 2 and (141 + 141) / 2 right are a tie, yet their float means differ in
    the 8th digit: the later candidate won by rounding, not by validation."""
    from benchmarks.distill import best_on_validation

    first = {"overrides": ["method.alpha=0.9"], "val_acc_best_mean": (VAL_140 + VAL_142) / 2}
    later = {"overrides": ["method.alpha=0.6"], "val_acc_best_mean": (VAL_141 + VAL_141) / 2}
    assert first["val_acc_best_mean"] < later["val_acc_best_mean"]  # the rounding
    assert best_on_validation([first, later]) is first


def test_transfer_keeps_the_first_lr_among_equal_validation_scores() -> None:
    from benchmarks.transfer import summarize

    def cell(lr: str, val: float) -> dict:
        return {"setting": "full", "shots": 1, "lr": lr, "val_acc_mean": val}

    chosen = summarize([cell("0.001", (VAL_140 + VAL_142) / 2), cell("0.003", VAL_141)])
    assert [row["lr"] for row in chosen] == ["0.001"]


def test_decode_cache_subsampling_note_gives_the_split_sizes_it_measured() -> None:
    """The note said 'val/test held out as 10%/20%' whatever the run held out (validation is
    10% of what the 20% test split leaves: 4,000 of 50,000 images, not 5,000)."""
    from benchmarks.decode_cache import subsampling_table

    row = {"samples_per_class": 10, "seeds": 2, "all_decoded": 500, "subsampled_decoded": 190,
           "subsampled_splits": {"train": 100, "val": 30, "test": 60}}  # fmt: skip
    for kind in ("all", "subsampled"):
        for measure in ("seconds", "cpu_seconds"):
            row[f"{kind}_{measure}_mean"], row[f"{kind}_{measure}_std"] = 1.0, 0.1
    note = "\n".join(subsampling_table(row))
    assert "the 30 validation and 60 test images are decoded too" in note
    assert "10%/20%" not in note


def tta_seed(seed: int, none: float, shift: float, flip: float) -> dict:
    view = {"views": 1.0, "test_images": 359.0}
    return {
        "seed": seed,
        "none": {**view, "test_acc": none, "wall_seconds": 10.0},
        "shift": {**view, "views": 5.0, "test_acc": shift, "wall_seconds": 15.0},
        "flip": {**view, "views": 2.0, "test_acc": flip, "wall_seconds": 12.0},
    }


def test_tta_differences_are_per_seed_on_the_same_checkpoints() -> None:
    """Each view is compared with the same checkpoint evaluated plainly: the mean and spread
    of the per-seed differences, and how many seeds it helped or hurt."""
    from benchmarks.tta import markdown_table, summarize

    row = summarize("augment", [tta_seed(0, 0.90, 0.92, 0.80), tta_seed(1, 0.96, 0.96, 0.86)])
    assert row["shift"]["better"] == 1 and row["shift"]["worse"] == 0
    assert abs(row["shift"]["delta"][0] - 0.01) < 1e-9
    assert abs(row["shift"]["delta"][1] - statistics.stdev([0.02, 0.0])) < 1e-9
    assert row["flip"]["worse"] == 2 and row["shift"]["wall_ratio_median"] == 1.5
    table = markdown_table({"rows": [row], "epochs": None})
    assert "| `shift` | 5 | 94.0 ± 2.8 | +1.0 ± 1.4 | 1 / 0 | 1.50 |" in table
    assert "| `flip` | 2 | 83.0 ± 4.2 | -10.0 ± 0.0 | 0 / 2 | 1.20 |" in table
    assert "`experiment=digits_lowdata model=small_cnn reg=augment`" in table
    assert "2 seeds; the recipe's 150 epochs" in table
