"""The command line: typer code only. Each command builds a frozen config and calls one
library function; OneShotBenchError becomes a one-line message and exit code 2."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from oneshot_bench.errors import OneShotBenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast, reproducible one-shot image classification benchmarks.")
out_console = Console(width=132)


def _project_home() -> Path:
    """The checkout's root when run from a source tree (cache/ lives there), else ~/.cache."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return root
    return Path.home() / ".cache" / "oneshot-bench"


HOME = _project_home()
CACHE = HOME / "cache"
DATA = HOME / "data"

# --- shared options -----------------------------------------------------------------------
Dataset = Annotated[str, typer.Option(help="cifar100, cifar10, or folder:PATH (one sub-folder per class).")]
DataRoot = Annotated[Path, typer.Option(help="Directory holding cifar-100-python/ or cifar-10-batches-py/.")]
Download = Annotated[bool, typer.Option("--download", help="Allow downloading CIFAR / ImageNet weights (checksums verified).")]
Split = Annotated[str, typer.Option(help="ratio:F, cifar-fs, fc100, or file:PATH (JSON with seen/val/unseen class lists).")]
Seen = Annotated[Optional[int], typer.Option(help="Number of seen classes (overrides the ratio).")]
Seed = Annotated[int, typer.Option(help="Seed of the class split, image split, initialisation and sampling.")]
ValFraction = Annotated[float, typer.Option(help="Share of each seen class's images held out for validation.")]
ImageSize = Annotated[Optional[int], typer.Option(help="Image side in pixels; default 224 with ImageNet weights, else native.")]
Weights = Annotated[str, typer.Option(help="imagenet, none (random init), or PATH (state_dict or finetune checkpoint).")]
Stem = Annotated[str, typer.Option(help="imagenet (conv1 stride 2 + max-pool) or nomaxpool (better at 32 px, 4x compute).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log stage details.")]


def handle_errors(fn):
    """Run a command; user errors become `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO if kwargs.pop("verbose", False) else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except OneShotBenchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            raise typer.Exit(2) from None

    return wrapper


def _data_cfgs(dataset, data_root, download, split, seen, seed, val_fraction, image_size, weights, stem):
    from oneshot_bench.data import DataConfig
    from oneshot_bench.splits import SplitConfig
    from oneshot_bench.trunk import TrunkConfig

    if dataset.startswith("folder:"):
        dataset = "folder:" + str(Path(dataset[len("folder:"):]).expanduser().resolve())
    return (
        DataConfig(dataset=dataset, data_root=data_root.resolve(), download=download, image_size=image_size),
        SplitConfig(split=split, seen=seen, seed=seed, val_fraction=val_fraction),
        TrunkConfig(weights=weights, stem=stem, download=download, init_seed=seed),
    )


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OneShotBenchError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise OneShotBenchError(f"{name} is empty")
    return values


def _candidates(text: Optional[str]) -> tuple:
    if text is None:
        return (None,)
    out = []
    for v in text.split(","):
        v = v.strip()
        if v == "all":
            out.append(0)
        elif v == "auto":
            out.append(None)
        else:
            try:
                out.append(int(v))
            except ValueError:
                raise OneShotBenchError(f"--candidates takes integers, 'all' or 'auto', got {v!r}") from None
            if out[-1] < 1:
                raise OneShotBenchError(f"--candidates {v} must be at least 1")
    return tuple(out)


def _scorers(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(s.strip() for s in text.split(",") if s.strip())


@app.command()
@handle_errors
def finetune(
    dataset: Dataset = "cifar100", data_root: DataRoot = DATA, download: Download = False,
    split: Split = "ratio:0.8", seen: Seen = None, seed: Seed = 0, val_fraction: ValFraction = 0.1,
    image_size: ImageSize = None, weights: Weights = "imagenet", stem: Stem = "imagenet",
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = CACHE / "trunk.pt",
    objective: Annotated[str, typer.Option(help="pairs (same/different BCE, the seed method) or classes (cross-entropy).")] = "pairs",
    train_from: Annotated[str, typer.Option(help="First trainable stage: layer4|layer3|layer2|layer1|all; earlier ones are frozen.")] = "layer4",
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 30,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without validation improvement.")] = 5,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, nesterov, warm-up + cosine).")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random crop + flip. Default: on unless --train-from layer4. Augmenting turns the frozen-stem cache off.")] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the classes objective.")] = 0.0,
    mixup: Annotated[float, typer.Option(help="Mixup alpha for the classes objective with augmentation; 0 = off.")] = 0.0,
    precision: Annotated[str, typer.Option(help="fp32, or bf16: bfloat16 autocast of training steps (1.3-1.6x faster epochs on the AMD CPUs here with AVX512-BF16, 2.3x faster steps on the Xeon with AMX; refused where layer4 would see 1x1).")] = "fp32",
    crop_scale: Annotated[float, typer.Option(help="With augmentation: random resized crops of at least this area fraction instead of padded crops; 1 = off.")] = 1.0,
    pairs_per_class: Annotated[int, typer.Option(help="Positive pairs per class and epoch (as many negatives), pairs objective.")] = 250,
    group_size: Annotated[int, typer.Option(help="Images per class in a batch, pairs objective: more means more pairs per embedded image.")] = 12,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Fine-tune the trunk on the seen classes."""
    from oneshot_bench.finetune import FinetuneConfig, finetune as run

    data, sp, trunk = _data_cfgs(dataset, data_root, download, split, seen, seed, val_fraction, image_size, weights, stem)
    cfg = FinetuneConfig(data=data, split=sp, trunk=trunk, out=out.resolve(), objective=objective, train_from=train_from,
                         epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         augment=augment, label_smoothing=label_smoothing, mixup=mixup, precision=precision,
                         crop_scale=crop_scale, pairs_per_class=pairs_per_class, group_size=group_size, seed=seed, quiet=quiet)
    path = run(cfg)
    typer.echo(f"wrote {path}")


@app.command()
@handle_errors
def encode(
    dataset: Dataset = "cifar100", data_root: DataRoot = DATA, download: Download = False,
    split: Split = "ratio:0.8", seen: Seen = None, seed: Seed = 0, val_fraction: ValFraction = 0.1,
    image_size: ImageSize = None, weights: Weights = "imagenet", stem: Stem = "imagenet",
    out: Annotated[Path, typer.Option(help="HDF5 cache to write (resumes a matching .partial).")] = CACHE / "features.h5",
    dtype: Annotated[str, typer.Option(help="float32 or float16 features.")] = "float32",
    tta: Annotated[str, typer.Option(help="none; flip: average each image's features with its mirror image's (2x the time); flip-shift: over 10 views, the image and 4 copies shifted by 2 px, each mirrored (10x).")] = "none",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Encode every image once into an HDF5 feature cache."""
    from oneshot_bench.cache import EncodeConfig, encode as run

    data, sp, trunk = _data_cfgs(dataset, data_root, download, split, seen, seed, val_fraction, image_size, weights, stem)
    path = run(EncodeConfig(data=data, split=sp, trunk=trunk, out=out.resolve(), dtype=dtype, tta=tta, batch_size=batch_size,
                            quiet=quiet))
    typer.echo(f"wrote {path}")


@app.command("train-head")
@handle_errors
def train_head(
    cache: Annotated[Path, typer.Option(help="Feature cache from encode.")] = CACHE / "features.h5",
    out: Annotated[Path, typer.Option(help="Head checkpoint to write.")] = CACHE / "head.pt",
    head: Annotated[str, typer.Option(help="siamese-l1 (the seed's) or siamese-mix ([|e1-e2|, e1*e2] -> MLP).")] = "siamese-l1",
    pairs_per_class: Annotated[int, typer.Option(help="Positive pairs per class and epoch (as many negatives).")] = 250,
    negatives: Annotated[str, typer.Option(help="random, or hard (half from nearest other-class neighbours, FAISS).")] = "random",
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 30,
    patience: Annotated[int, typer.Option(help="Early-stopping patience on validation loss.")] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Images per batch (pairs are formed among them).")] = 160,
    seed: Seed = 0, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Train the same/different pair head on cached features of the seen classes."""
    from oneshot_bench.head import HeadConfig, train_head as run

    cfg = HeadConfig(cache=cache.resolve(), out=out.resolve(), head=head, pairs_per_class=pairs_per_class, negatives=negatives,
                     epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
                     groups_per_batch=max(2, batch_size // HeadConfig.group_size), seed=seed, quiet=quiet)
    path = run(cfg)
    typer.echo(f"wrote {path}")


def print_results(report: dict, title: str = "") -> None:
    """One table per settings block: accuracy % ± CI, episodes, K, N, Q, time."""
    table = Table(title=title or None)
    for col in ("protocol", "scorer", "accuracy %", "± 95% CI", "episodes", "K", "N", "Q", "recall", "time s"):
        table.add_column(col, justify="left" if col in ("protocol", "scorer") else "right", no_wrap=True)
    blocks = report["results"] if "results" in report and report["results"] and "results" in report["results"][0] else [report]
    for block in blocks:
        for r in block["results"]:
            table.add_row(block.get("protocol", ""), r["scorer"], f"{100 * r['accuracy']:.2f}", f"{100 * r['ci95']:.2f}",
                          str(r["n_episodes"]), str(r["n_way"]), str(r["n_shot"]), str(r["n_query"]),
                          "" if r.get("recall") is None else f"{100 * r['recall']:.1f}%", f"{r['wall_s']:.2f}")
    out_console.print(table)


@app.command()
@handle_errors
def episodes(
    cache: Annotated[Path, typer.Option(help="Feature cache from encode.")] = CACHE / "features.h5",
    head: Annotated[Optional[Path], typer.Option(help="Head checkpoint (enables the pair-head scorer).")] = None,
    n_way: Annotated[int, typer.Option(help="Classes per episode (K).")] = 5,
    n_shot: Annotated[int, typer.Option(help="Supports per class (N).")] = 1,
    n_query: Annotated[int, typer.Option(help="Queries per class.")] = 15,
    n_episodes: Annotated[int, typer.Option(help="Number of episodes.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Episode i is a pure function of (seed, i).")] = 0,
    roles: Annotated[str, typer.Option(help="Class roles episodes draw from, comma-separated.")] = "unseen",
    protocol: Annotated[str, typer.Option(help="episodes (K-way N-shot) or seed (one support per class, all others queries).")] = "episodes",
    episode_file: Annotated[Optional[Path], typer.Option(help="Fixed episodes, JSON [{support: {class: [ids]}, query: {...}}].")] = None,
    scorers: Annotated[Optional[str], typer.Option(help="Comma-separated subset of pair-head,cosine,l2,cl2n (default: all that apply).")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="FAISS candidates per query for the pair head: m, 'all', or a list like 1,5,10,all.")] = None,
    batch_size: Annotated[int, typer.Option(help="Episodes per vectorised batch (results do not depend on it).")] = 500,
    workers: Annotated[int, typer.Option(help="Threads over batches (results do not depend on it).")] = 1,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all results as JSON here.")] = None,
    per_episode: Annotated[Optional[Path], typer.Option(help="Write per-episode accuracies as JSON here.")] = None,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Run seeded K-way N-shot episodes on the unseen classes and report accuracy ± 95% CI."""
    from oneshot_bench.episodes import EpisodeConfig, run_episodes

    cfg = EpisodeConfig(cache=cache.resolve(), head=head.resolve() if head else None, n_way=n_way, n_shot=n_shot, n_query=n_query,
                        n_episodes=n_episodes, seed=seed, roles=tuple(r.strip() for r in roles.split(",")), protocol=protocol,
                        episode_file=episode_file.resolve() if episode_file else None, scorers=_scorers(scorers),
                        candidates=_candidates(candidates), batch_size=batch_size, workers=workers,
                        json_out=json_out.resolve() if json_out else None, per_episode_out=per_episode.resolve() if per_episode else None,
                        quiet=quiet)
    report = run_episodes(cfg)
    print_results(report)
    for d in report["paired_differences"]:
        typer.echo(f"{d['a']} - {d['b']}: {100 * d['mean_difference']:+.2f} ± {100 * d['ci95']:.2f} points (paired, same episodes)")


@app.command()
@handle_errors
def run(
    dataset: Dataset = "cifar100", data_root: DataRoot = DATA, download: Download = False,
    split: Split = "ratio:0.8", seen: Seen = None, seed: Seed = 0, val_fraction: ValFraction = 0.1,
    image_size: ImageSize = None, weights: Weights = "imagenet", stem: Stem = "imagenet",
    out_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default cache/runs/<name>).")] = None,
    name: Annotated[str, typer.Option(help="Run name, used for the default --out-dir.")] = "default",
    skip_finetune: Annotated[bool, typer.Option("--skip-finetune", help="Encode with --weights as they are.")] = False,
    objective: Annotated[str, typer.Option(help="finetune objective: pairs or classes.")] = "pairs",
    train_from: Annotated[str, typer.Option(help="finetune: first trainable stage (layer4|layer3|layer2|layer1|all).")] = "layer4",
    epochs: Annotated[int, typer.Option(help="finetune: maximum epochs.")] = 30,
    patience: Annotated[int, typer.Option(help="finetune: early-stopping patience.")] = 5,
    lr: Annotated[float, typer.Option(help="finetune: peak learning rate.")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="finetune: weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="finetune: images per batch.")] = 128,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="finetune: random crop + flip (default: on unless layer4).")] = None,
    label_smoothing: Annotated[float, typer.Option(help="finetune: label smoothing (classes objective).")] = 0.0,
    mixup: Annotated[float, typer.Option(help="finetune: mixup alpha (classes objective); 0 = off.")] = 0.0,
    precision: Annotated[str, typer.Option(help="finetune: fp32, or bf16 autocast of training steps.")] = "fp32",
    crop_scale: Annotated[float, typer.Option(help="finetune: random resized crops of at least this area fraction; 1 = padded crops.")] = 1.0,
    dtype: Annotated[str, typer.Option(help="encode: float32 or float16.")] = "float32",
    tta: Annotated[str, typer.Option(help="encode: none, flip (average with the mirror image's features, 2x) or flip-shift (10 views, 10x).")] = "none",
    head: Annotated[str, typer.Option(help="train-head: siamese-l1 or siamese-mix.")] = "siamese-l1",
    pairs_per_class: Annotated[int, typer.Option(help="train-head: positive pairs per class and epoch.")] = 250,
    negatives: Annotated[str, typer.Option(help="train-head: random or hard.")] = "random",
    head_epochs: Annotated[int, typer.Option(help="train-head: maximum epochs.")] = 30,
    head_patience: Annotated[int, typer.Option(help="train-head: early-stopping patience.")] = 5,
    head_lr: Annotated[float, typer.Option(help="train-head: learning rate.")] = 1e-3,
    n_way: Annotated[str, typer.Option(help="episodes: K, or a list such as 5,10,20.")] = "5",
    n_shot: Annotated[str, typer.Option(help="episodes: N, or a list such as 1,5.")] = "1",
    n_query: Annotated[int, typer.Option(help="episodes: queries per class.")] = 15,
    n_episodes: Annotated[int, typer.Option(help="episodes: episodes per setting.")] = 10_000,
    scorers: Annotated[Optional[str], typer.Option(help="episodes: scorers (default all).")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="episodes: FAISS candidates for the pair head (m, all, or a list).")] = None,
    seed_protocol: Annotated[bool, typer.Option("--seed-protocol", help="Also run the seed project's protocol.")] = False,
    seed_protocol_episodes: Annotated[int, typer.Option(help="Support draws for the seed protocol.")] = 1000,
    quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Run finetune -> encode -> train-head -> episodes, reusing finished stages."""
    from oneshot_bench.finetune import FinetuneConfig
    from oneshot_bench.head import HeadConfig
    from oneshot_bench.pipeline import RunConfig, run_pipeline

    data, sp, trunk = _data_cfgs(dataset, data_root, download, split, seen, seed, val_fraction, image_size, weights, stem)
    cfg = RunConfig(
        data=data, split=sp, trunk=trunk, out_dir=(out_dir or CACHE / "runs" / name).resolve(), do_finetune=not skip_finetune,
        finetune=FinetuneConfig(objective=objective, train_from=train_from, epochs=epochs, patience=patience, lr=lr,
                                weight_decay=weight_decay,
                                batch_size=batch_size, augment=augment, label_smoothing=label_smoothing, mixup=mixup, precision=precision,
                                crop_scale=crop_scale, seed=seed),
        dtype=dtype, tta=tta,
        head=HeadConfig(head=head, pairs_per_class=pairs_per_class, negatives=negatives, epochs=head_epochs,
                        patience=head_patience, lr=head_lr, seed=seed),
        n_way=_ints(n_way, "--n-way"), n_shot=_ints(n_shot, "--n-shot"), n_query=n_query, n_episodes=n_episodes,
        episode_seed=seed, scorers=_scorers(scorers), candidates=_candidates(candidates), seed_protocol=seed_protocol,
        seed_protocol_episodes=seed_protocol_episodes, quiet=quiet,
    )
    report = run_pipeline(cfg, say=lambda s: typer.echo(s, err=True))
    print_results(report, title=f"{cfg.out_dir}")
    typer.echo(f"report: {cfg.out_dir / 'report.md'}")


@app.command()
@handle_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory holding report.json.")], verbose: Verbose = False) -> None:
    """Redraw report.md and the plots of a run from its report.json."""
    from oneshot_bench.report import render

    for path in render(run_dir):
        typer.echo(f"wrote {path}")


@app.command()
@handle_errors
def info(file: Annotated[Path, typer.Argument(help="A cache (.h5), checkpoint (.pt) or report (.json).")], verbose: Verbose = False) -> None:
    """Show what an artefact holds: shapes, roles, config, fingerprints, versions."""
    from oneshot_bench.info import describe

    typer.echo(json.dumps(describe(file), indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors (unknown option, bad value) are one line and exit 2 too."""
    import sys

    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        # typer vendors click privately: recognise its usage errors by their interface
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            message = exc.format_message()
            if message:  # empty for "no arguments: help was shown"
                typer.echo(f"error: {message}", err=True)
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
