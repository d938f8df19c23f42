"""Shared plumbing for the benchmark scripts: arguments, sizes, versions, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "data" / "tiny-imagenet-200"
RESULTS = ROOT / "benchmarks" / "results"


def parse(description: str, name: str, extend=None) -> argparse.Namespace:
    """The options every benchmark takes; extend(parser) adds a script's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="under 2 minutes, smaller sizes, same JSON keys")
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json", help="where to write the JSON result")
    p.add_argument("--data", type=Path, default=TINY, help="Tiny-ImageNet folder (one sub-folder per class)")
    if extend is not None:
        extend(p)
    return p.parse_args()


def fail(message: str) -> None:
    """A benchmark's bad input: one line on stderr and exit code 2, as the CLI does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_data(path: Path) -> None:
    if not path.is_dir():
        fail(f"benchmark data {path} is missing (expected ../shared/data/tiny-imagenet-200)")


def subset_folder(src: Path, n_classes: int, dest: Path) -> Path:
    """A view of the first n classes of `src` made of symlinks (no copy of the data)."""
    dest.mkdir(parents=True, exist_ok=True)
    for c in sorted(p.name for p in src.iterdir() if p.is_dir())[:n_classes]:
        link = dest / c
        if not link.exists():
            link.symlink_to(src / c)
    return dest


def versions() -> dict:
    from oneshot_bench.provenance import package_versions

    v = package_versions()
    import torch

    v["torch_threads"] = torch.get_num_threads()
    v["cpu_count"] = os.cpu_count()
    v["cpu"] = cpu_model()
    return v


def cpu_model() -> str:
    """The CPU's model name and widest vector unit: the machines lent here differ (one trained
    the trunk ~2.7x faster than an AVX2 AMD EPYC did), so a time is read with its CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown"
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return f"{name} ({vector}{', amx' if 'amx_tile' in flags else ''})"


def write(out: Path, payload: dict) -> None:
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload, "versions": versions()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if k != "versions"}, indent=2))
    print(f"wrote {out}")


def best_of_interleaved(fns: dict, repeats: int) -> dict:
    """Minimum wall time of each of `fns` over `repeats` rounds, each round calling every one
    once: the minimum is the least noisy estimate on a shared machine, and a slow spell of the
    machine touches both sides of a ratio, not one."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


RUN_DIR = ROOT / "cache" / "runs" / "tiny32-classes"


def run_stage_path(stage: str) -> Path | None:
    """The file a stage of the README run (cache/runs/tiny32-classes) used, from its
    report.json: the directory may also hold files of earlier configurations."""
    import json

    report = RUN_DIR / "report.json"
    if not report.exists():
        return None
    path = json.loads(report.read_text())["stages"].get(stage, {}).get("path")
    return Path(path) if path else None


def run_cache(cache: Path | None, quick: bool) -> Path:
    """The cache to study: --cache, else the README run's (cache/runs/tiny32-classes), else
    with --quick a 40-class random-weight cache built under cache/bench/."""
    if cache is not None:
        if not cache.is_file():
            fail(f"cache {cache} does not exist")
        return cache
    if quick:
        from head_speed import bench_cache

        return bench_cache(TINY, True).path
    found = run_stage_path("encode")
    if found is None or not found.exists():
        fail("no README run under cache/runs/tiny32-classes; run `make demo-offline` first or pass --cache")
    return found
