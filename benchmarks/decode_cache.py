"""Decoded-image cache: first and second start of the file-backed sources.

Generates, in a temporary folder:

- an Omniglot-sized folder: 32,460 105x105 1-bit PNGs (1,623 characters x 20 drawings, random
  strokes) in the real `omniglot-py/images_background|images_evaluation/<alphabet>/
  <character>/` layout, with the real alphabet and character names, read as `data=omniglot
  data.split=lake` reads it (28x28);
- a 50,000-image JPEG ImageFolder (10 classes, 32x32 RGB), read as `data=imagefolder` reads
  it (its own size, 32x32).

For each, a fresh process loads the source (`source.load()`, wall time, imports excluded)
with an empty cache (first start: decode + store) and then again (second start: cache hit,
median of `--repeats` processes).

Subsampling: on the JPEG folder, a fresh process sets up the DataModule as `data=imagefolder`
builds it (`conf/data/imagefolder.yaml`: 20% held out for test, then 10% of the rest for
validation) with an empty cache, per seed (`--seeds`) once with all images and once with
`data.samples_per_class=10`, which decodes only the kept training images and the val/test
images it uses (wall and CPU time).

`--scale` shrinks both datasets (Omniglot: drawings per character; recorded in the JSON).
Writes benchmarks/results/decode_cache.json.

    python -m benchmarks.decode_cache [--scale 1.0] [--repeats 3] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, bench_command, last_json_line, write_result

OMNIGLOT_CHARACTERS, OMNIGLOT_DRAWINGS = 1623, 20
JPEG_IMAGES, JPEG_CLASSES = 50_000, 10
SAMPLES_PER_CLASS = 10


def write_omniglot_folder(root: Path, scale: float) -> int:
    """The real layout and names (from the shipped split files), random 1-bit strokes. Every
    character is written (`lake` refuses a folder that lacks some); `scale` shrinks the
    drawings per character."""
    import numpy as np
    from PIL import Image, ImageDraw

    from posttrain.data.omniglot_splits import EVALUATION_ALPHABETS, lake_characters

    names = sorted(set().union(*lake_characters().values()))
    assert len(names) == OMNIGLOT_CHARACTERS
    drawings = max(1, round(OMNIGLOT_DRAWINGS * scale))
    rng = np.random.default_rng(0)
    for name in names:
        half = (
            "images_evaluation"
            if name.split("/")[0] in EVALUATION_ALPHABETS
            else "images_background"
        )
        folder = root / "omniglot-py" / half / name
        folder.mkdir(parents=True)
        for drawer in range(drawings):
            image = Image.new("1", (105, 105), 1)
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(2, 6))):
                points = [tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(3)]
                draw.line(points, fill=0, width=3)
            image.save(folder / f"{drawer + 1:02d}.png")
    return len(names) * drawings


def write_jpeg_folder(root: Path, scale: float) -> int:
    """`root/<class>/<n>.jpg`, 32x32 RGB: a class colour, a gradient and noise."""
    import numpy as np
    from PIL import Image

    per_class = max(2, round(JPEG_IMAGES * scale / JPEG_CLASSES))
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 80, 32, dtype=np.float32)[None, :, None]
    for label in range(JPEG_CLASSES):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 150, size=3).astype(np.float32)
        for index in range(per_class):
            noise = rng.normal(0, 20, size=(32, 32, 3))
            pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    return per_class * JPEG_CLASSES


def load_once(kind: str, root: str, cache: str) -> dict:
    """In this process: build the source as its `data=` option does, time `load()`."""
    import logging

    from posttrain.data.sources import ImageFolderSource, OmniglotSource

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if kind == "omniglot":
        source = OmniglotSource(root=root, download=False, split="lake", cache_dir=cache)
    else:
        source = ImageFolderSource(root=root, cache_dir=cache)
    start = time.perf_counter()
    data = source.load()
    seconds = time.perf_counter() - start
    count = len(data.train) + (len(data.test) if data.test is not None else 0)
    shape = list(data.train.images.shape[1:])
    return {"seconds": seconds, "images": count, "shape": shape}


def set_up_once(root: str, cache: str, samples_per_class: str, seed: str) -> dict:
    """In this process: the DataModule of `data=imagefolder` (its yaml), `setup("fit")` timed."""
    import logging

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = OmegaConf.load(ROOT / "conf" / "data" / "imagefolder.yaml")
    cfg.root, cfg.options.cache_dir, cfg.seed = root, cache, int(seed)
    cfg.samples_per_class = None if samples_per_class == "all" else int(samples_per_class)
    datamodule = instantiate(cfg)
    start, cpu = time.perf_counter(), time.process_time()
    datamodule.setup("fit")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    used = {split: len(data) for split, data in datamodule.splits.items()}
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "decoded": sum(used.values()),
            "splits": used}  # fmt: skip


def measured(label: str, flag: str, *args: str) -> dict:
    """`python -m benchmarks.decode_cache <flag> <args>` in a fresh process: its report."""
    command = [sys.executable, "-m", "benchmarks.decode_cache", flag, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"[{label}] failed:\n{result.stderr[-3000:]}")
    report = last_json_line(result.stdout)
    report["hit"] = "cache hit" in result.stderr
    return report


def measured_load(kind: str, root: Path, cache: Path) -> dict:
    return measured(kind, "--load", kind, str(root), str(cache))


def measure(kind: str, root: Path, cache: Path, repeats: int) -> dict:
    first = measured_load(kind, root, cache)
    assert not first["hit"], "the first start must decode (empty cache)"
    seconds = []
    for _ in range(repeats):
        again = measured_load(kind, root, cache)
        assert again["hit"], "the second start must hit the cache"
        seconds.append(again["seconds"])
    second = statistics.median(seconds)
    entry_bytes = sum(p.stat().st_size for p in cache.glob("*.pt"))
    return {
        "images": first["images"],
        "shape": first["shape"],
        "first_start_seconds": first["seconds"],
        "second_start_seconds": seconds,
        "second_start_median_seconds": second,
        "speedup": first["seconds"] / second,
        "cache_entry_mib": entry_bytes / 2**20,
    }


LABELS = {
    "omniglot": "Omniglot-sized folder (105x105 PNGs, read at 28x28)",
    "imagefolder": "JPEG ImageFolder (32x32, read at its own size)",
}


def measure_subsampling(root: Path, work: Path, seeds: int) -> dict:
    """First starts (each with its own empty cache) of the DataModule, per seed: all images,
    then `samples_per_class` (alternating, so both see the same load of a shared machine)."""
    runs: dict[str, list[dict]] = {"all": [], "subsampled": []}
    for seed in range(seeds):
        for kind, keep in (("all", "all"), ("subsampled", str(SAMPLES_PER_CLASS))):
            cache = str(work / f"cache-{kind}-{seed}")
            run = measured(kind, "--setup", str(root), cache, keep, str(seed))
            assert not run["hit"], "a first start must decode (empty cache)"
            runs[kind].append(run)
            print(f"[{kind} seed {seed}] {run['decoded']} decoded in {run['seconds']:.2f}s "
                  f"({run['cpu_seconds']:.2f}s CPU)", flush=True)  # fmt: skip
    row: dict = {"samples_per_class": SAMPLES_PER_CLASS, "seeds": seeds}
    for kind, done in runs.items():
        for measure in ("seconds", "cpu_seconds"):
            values = [r[measure] for r in done]
            row[f"{kind}_{measure}"] = values
            row[f"{kind}_{measure}_mean"] = statistics.mean(values)
            row[f"{kind}_{measure}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row[f"{kind}_decoded"] = done[0]["decoded"]
        row[f"{kind}_splits"] = done[0]["splits"]
    return row


def subsampling_table(row: dict) -> list[str]:
    """First start of `data=imagefolder` with and without `data.samples_per_class`."""

    def cells(kind: str) -> str:
        return " | ".join(
            f"{row[f'{kind}_{m}_mean']:.2f} ± {row[f'{kind}_{m}_std']:.2f}"
            for m in ("seconds", "cpu_seconds")
        )

    splits = row["subsampled_splits"]
    return [
        "",
        "First start of `data=imagefolder` on the JPEG folder (DataModule set-up, empty cache, "
        f"data.seed=0..{row['seeds'] - 1}, mean ± std; the {splits['val']:,} validation and "
        f"{splits['test']:,} test images are decoded too, they are used):",
        "",
        "| run | images decoded | first start (s) | CPU (s) |",
        "|---|---|---|---|",
        f"| all images | {row['all_decoded']:,} | {cells('all')} |",
        f"| `data.samples_per_class={row['samples_per_class']}` | "
        f"{row['subsampled_decoded']:,} | {cells('subsampled')} |",
    ]


def markdown_table(result: dict) -> str:
    """The README table: first start (decode + store) and second start (cache hit), seconds."""
    lines = [
        f"Scale {result['scale']:g} of the full sizes (32,460 PNGs; 50,000 JPEGs).",
        "",
        "| data | images | first start (s) | second start (s, median) | speedup | cache MiB |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in result["results"].items():
        lines.append(
            f"| {LABELS[kind]} | {row['images']:,} | {row['first_start_seconds']:.2f} | "
            f"{row['second_start_median_seconds']:.2f} | {row['speedup']:.1f}x | "
            f"{row['cache_entry_mib']:.1f} |"
        )
    if "subsampling" in result:
        lines += subsampling_table(result["subsampling"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes")
    parser.add_argument("--repeats", type=int, default=3, help="second starts (median)")
    parser.add_argument("--seeds", type=int, default=5, help="subsampled first starts")
    parser.add_argument(
        "--load", nargs=3, metavar=("KIND", "ROOT", "CACHE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--setup", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load or args.setup:
        print(json.dumps(load_once(*args.load) if args.load else set_up_once(*args.setup)))
        return
    with tempfile.TemporaryDirectory() as tmp:  # 82,000 files: removing them takes minutes
        payload = measure_all(Path(tmp), args.scale, args.repeats, args.seeds)
        print(markdown_table(payload))
        written = write_result("decode_cache", bench_command("decode_cache", argv), payload)
        print(f"\nwrote {written}; removing the generated files", flush=True)


def measure_all(work: Path, scale: float, repeats: int, seeds: int) -> dict:
    """Generate both folders under `work`, measure their first and second starts."""
    results, generation = {}, {}
    for kind, write in (("omniglot", write_omniglot_folder), ("imagefolder", write_jpeg_folder)):
        start = time.perf_counter()
        count = write(work / kind, scale)
        generation[kind] = time.perf_counter() - start
        print(f"[{kind}] generated {count} files in {generation[kind]:.0f}s", flush=True)
        row = measure(kind, work / kind, work / f"cache-{kind}", repeats)
        results[kind] = row
        print(
            f"[{kind}] {row['images']} images: first start {row['first_start_seconds']:.2f}s,"
            f" second start {row['second_start_median_seconds']:.2f}s (median of "
            f"{repeats}): {row['speedup']:.1f}x faster",
            flush=True,
        )
    subsampling = measure_subsampling(work / "imagefolder", work, seeds)
    print("\n".join(subsampling_table(subsampling)), flush=True)
    return {
        "scale": scale,
        "repeats": repeats,
        "generation_seconds": generation,
        "results": results,
        "subsampling": subsampling,
        "floor": "second start >= 10x faster (issue 13)",
        "meets_floor": all(r["speedup"] >= 10 for r in results.values()),
    }


if __name__ == "__main__":
    main()
