"""Fine-tuning the trunk on the seen classes (`finetune`), without the seed project's waste.

* Each batch embeds each of its images once; pairs are formed among those embeddings
  (the seed project ran the full network on both images of every pair).
* With `train_from="layer4"` (or any layer) and no augmentation, the frozen stages never
  change: their output is computed once per image (the "stem cache") and training runs
  only the trainable stages on it.
* Unseen classes are never decoded: only seen (and val) classes are loaded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oneshot_bench.cache import PreparedData, embed_images, normalization_for, prepare_data
from oneshot_bench.data import DataConfig
from oneshot_bench.episodes import pool_from_labels, sample_episodes
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.head import PAIR_SAMPLER_VERSION, PairHead, pair_logits_of_batch, sample_pair_batches
from oneshot_bench.progress import Progress
from oneshot_bench.provenance import (
    TRUNK_KIND,
    canonical_json,
    check_writable,
    fingerprint_arrays,
    package_versions,
    save_checkpoint,
    sha256_text,
    stage_identity,
    state_dict_sha256,
    to_jsonable,
)
from oneshot_bench.scorers import CosineScorer
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import LAYERS, Normalization, Trunk, TrunkConfig, build_trunk, layer4_input_side, to_input

log = logging.getLogger(__name__)

TRAIN_FROM = ("layer4", "layer3", "layer2", "layer1", "all")
OBJECTIVES = ("pairs", "classes")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class FinetuneConfig:
    """finetune options.

    train_from: first trainable stage; every stage before it is frozen, BatchNorm too.
    augment: random crop (pad 4) + horizontal flip; None = on unless train_from is layer4.
    crop_scale: < 1 replaces the padded crop by random resized crops covering at least this
        fraction of the image (stronger augmentation); 1 = off.
    mixup: alpha of mixup (classes objective, with augmentation); 0 = off.
    precision: "fp32", or "bf16" for bfloat16 autocast of the training steps (weights,
        optimiser and validation stay float32); 1.3-1.6x faster epochs on the AMD CPUs here with
        AVX512-BF16, 2.3x faster steps on the Xeon with AMX.
    batch_size: images per batch (pairs objective: groups of `group_size` images per class).
    """

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    out: Path = Path("cache/trunk.pt")
    objective: str = "pairs"
    train_from: str = "layer4"
    epochs: int = 30
    patience: int = 5
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    precision: str = "fp32"
    crop_scale: float = 1.0
    pairs_per_class: int = 250
    group_size: int = 12
    val_episodes: int = 500
    seed: int = 0
    stem_cache_max_bytes: int = 2 << 30
    quiet: bool = False

    @property
    def use_augment(self) -> bool:
        return self.augment if self.augment is not None else self.train_from != "layer4"


def _trainable_stages(train_from: str) -> list[str]:
    names = ["stem", *LAYERS]
    return names if train_from == "all" else names[names.index(train_from):]


def freeze(model: Trunk, train_from: str) -> None:
    """Freeze every stage before `train_from`: no gradients, BatchNorm in eval mode."""
    trainable = set(_trainable_stages(train_from))
    for name, module in model.stages():
        for p in module.parameters():
            p.requires_grad_(name in trainable)


def set_train_mode(model: Trunk, train_from: str) -> None:
    """model.train() for trainable stages; frozen ones stay in eval so BN statistics stay put."""
    trainable = set(_trainable_stages(train_from))
    for name, module in model.stages():
        module.train(name in trainable)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and horizontal flip; (n, 3, s, s) float in and out."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous(memory_format=torch.channels_last)


def resized_crop_batch(x: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """Random resized crop (area fraction in [min_scale, 1], aspect 3/4..4/3) resampled to the
    input size, with horizontal flip: (n, 3, s, s) float in and out, one affine grid per image."""
    n = x.shape[0]
    area = min_scale + (1 - min_scale) * torch.rand(n, generator=gen)
    log_ratio = (torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the side
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)  # centre, in [-1, 1] grid coordinates
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.contiguous(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


class StemCache:
    """Activations entering the first trainable stage, one row per image.

    In memory (float32) when they fit in `max_bytes`, otherwise in an HDF5 file (float16).
    """

    def __init__(self, model: Trunk, train_from: str, images: np.ndarray, norm: Normalization, path: Path, max_bytes: int, batch: int = 256) -> None:
        self.path = None
        with torch.inference_mode():
            probe = model.forward_until(to_input(torch.from_numpy(images[:1]), norm), train_from)
        shape = (len(images), *probe.shape[1:])
        in_memory = 4 * math.prod(shape) <= max_bytes
        if in_memory:
            self.data = np.empty(shape, dtype=np.float32)
        else:
            self.path = path
            self._file = h5py.File(path, "w")
            self.data = self._file.create_dataset("stem", shape=shape, dtype="float16", chunks=(min(64, len(images)), *shape[1:]))
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                x = model.forward_until(to_input(torch.from_numpy(images[s : s + batch]), norm), train_from)
                self.data[s : s + len(x)] = x.numpy().astype(self.data.dtype)
        log.info("stem cache: %s activations %s (%s)", train_from, shape, "memory" if in_memory else path)

    def get(self, idx: np.ndarray) -> torch.Tensor:
        if self.path is None:
            return torch.from_numpy(self.data[idx])
        order = np.argsort(idx)
        rows = self.data[idx[order]]  # h5py wants increasing indices
        out = np.empty_like(rows, dtype=np.float32)
        out[order] = rows
        return torch.from_numpy(out)

    def close(self) -> None:
        if self.path is not None:
            self._file.close()
            Path(self.path).unlink(missing_ok=True)


def lr_at(progress: float, base: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay to zero; progress in [0, 1]."""
    if progress < warmup:
        return base * (progress / warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


@dataclass
class Trainer:
    """Everything one training step needs; built once by `finetune`."""

    cfg: FinetuneConfig
    model: Trunk
    extra: nn.Module  # the pair head or the linear classifier
    norm: Normalization
    images: np.ndarray  # (n, s, s, 3) uint8, seen images (train and val)
    labels: np.ndarray  # (n,) int64 in 0..n_seen-1
    stem: StemCache | None

    def features(self, idx: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
        """Pooled (b, 512) features of images `idx`; augmented when gen is given."""
        if self.stem is not None:  # only built when train_from is a layer, never "all"
            return self.model.forward_from(self.stem.get(idx).contiguous(memory_format=torch.channels_last), self.cfg.train_from)
        return self.model(self.inputs(idx, gen))

    def inputs(self, idx: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
        """Normalised (b, 3, s, s) float inputs of images `idx`; augmented when gen is given."""
        x = to_input(torch.from_numpy(self.images[idx]), self.norm)
        if gen is None:
            return x
        return augment_batch(x, gen) if self.cfg.crop_scale >= 1 else resized_crop_batch(x, gen, self.cfg.crop_scale)

    def batch_loss(self, idx: np.ndarray, pairs: tuple | None, gen: torch.Generator | None) -> tuple[torch.Tensor, int, int]:
        """Loss of one batch, and (correct, count) for accuracy."""
        if self.cfg.objective == "classes" and gen is not None and self.cfg.mixup > 0 and self.stem is None:
            return self._mixup_loss(idx, gen)
        f = self.features(idx, gen)
        if self.cfg.objective == "classes":
            y = torch.from_numpy(self.labels[idx])
            logits = self.extra(f).float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            return loss, int((logits.argmax(1) == y).sum()), len(y)
        i, j, y = pairs
        y = torch.from_numpy(y)
        logit = pair_logits_of_batch(self.extra, self.extra.embed(f), i, j).float()
        loss = F.binary_cross_entropy_with_logits(logit, y)
        return loss, int(((logit > 0) == (y > 0.5)).sum()), len(y)

    def _mixup_loss(self, idx: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, int, int]:
        """Mixup (Zhang et al. 2018): train on convex mixtures of image pairs and of their labels."""
        x = self.inputs(idx, gen)
        y = torch.from_numpy(self.labels[idx])
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        lam = float(np.random.default_rng(seed).beta(self.cfg.mixup, self.cfg.mixup))
        perm = torch.randperm(len(idx), generator=gen)
        logits = self.extra(self.model(lam * x + (1 - lam) * x[perm])).float()
        ce = lambda target: F.cross_entropy(logits, target, label_smoothing=self.cfg.label_smoothing)
        loss = lam * ce(y) + (1 - lam) * ce(y[perm])
        return loss, int((logits.argmax(1) == y).sum()), len(y)

    def epoch_batches(self, rows: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, tuple | None]]:
        """(image indices, pairs) per batch; pairs are positions into the batch's images."""
        if self.cfg.objective == "classes":
            perm = rng.permutation(rows)
            n_full = max(1, len(perm) // self.cfg.batch_size)
            return [(perm[k * self.cfg.batch_size : (k + 1) * self.cfg.batch_size], None) for k in range(n_full)]
        batches = sample_pair_batches(
            self.labels, rows, self.cfg.pairs_per_class, rng, self.cfg.group_size,
            max(2, self.cfg.batch_size // self.cfg.group_size),
        )
        return [(b.images, (b.i, b.j, b.y)) for b in batches]


PAIRS_ONLY = ("pairs_per_class", "group_size")


def finetune_identity(cfg: FinetuneConfig) -> dict:
    """What determines the trained trunk: the config less output options and, for the classes
    objective, the pair sampler's options (they never act there); with the pairs objective,
    the pair sampler's version too."""
    if cfg.objective == "pairs":
        return {**stage_identity(cfg), "pair_sampler_version": PAIR_SAMPLER_VERSION}
    return stage_identity(cfg, drop=PAIRS_ONLY)


def make_optimizer(cfg: FinetuneConfig, trainer: Trainer) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the trainable parameters of trunk and head/classifier.
    fused: one kernel over all parameters instead of a few passes per tensor; with only
    layer4 trainable the step is a large share of each batch."""
    params = [p for p in list(trainer.model.parameters()) + list(trainer.extra.parameters()) if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay, fused=True)


def _seed_of(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(0, 2**62))


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune the trunk on the seen classes' train images; write a checkpoint that
    `encode --weights PATH` accepts. Returns its path."""
    if cfg.train_from not in TRAIN_FROM:
        raise OneShotBenchError(f"unknown --train-from {cfg.train_from!r}; use {'|'.join(TRAIN_FROM)}")
    if cfg.objective not in OBJECTIVES:
        raise OneShotBenchError(f"unknown --objective {cfg.objective!r}; use pairs or classes")
    if cfg.precision not in PRECISIONS:
        raise OneShotBenchError(f"unknown --precision {cfg.precision!r}; use {'|'.join(PRECISIONS)}")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0 or cfg.mixup < 0 or not 0 < cfg.crop_scale <= 1:
        raise OneShotBenchError("--epochs must be >= 1, --batch-size >= 2, --lr > 0, --mixup >= 0 and 0 < --crop-scale <= 1")
    out = Path(cfg.out)
    check_writable(out)
    t_start = time.perf_counter()
    trunk = build_trunk(cfg.trunk)
    prepared = prepare_data(cfg.data, cfg.split, trunk, roles_to_load=("seen", "val"))
    if cfg.precision == "bf16" and layer4_input_side(trunk.model.stem_kind, prepared.image_size) < 2:
        # with torch 2.14 the bfloat16 CPU weight gradient of layer4's stride-2 3x3 convolution on a
        # 1x1 input differed between identical runs, by up to 4e15; at 2x2 and 4x4 it was reproducible.
        # GemmConv2d now computes that convolution as a matrix product, reproducible when checked
        # alone; the refusal stays until the whole trunk has been checked again.
        raise OneShotBenchError(
            f"--precision bf16 needs layer4 to see at least 2x2 positions, but at {prepared.image_size} px the "
            f"{trunk.model.stem_kind} stem gives it 1x1, where bfloat16 training was not reproducible with "
            "torch 2.14; use --precision fp32, --stem nomaxpool or a larger --image-size")
    norm = normalization_for(trunk, prepared)
    trainer, train_rows, val_rows, val_pool = _build_trainer(cfg, trunk.model, prepared, norm, out)
    data_fp = fingerprint_arrays(
        np.array(prepared.index.class_names, dtype=object), prepared.images.labels, prepared.images.source_ids, prepared.split
    )
    key = sha256_text(canonical_json(finetune_identity(cfg)) + data_fp + trunk.sha256)
    opt = make_optimizer(cfg, trainer)
    state = _resume_state(out, key, trainer, opt)
    history, best = state["history"], state["best"]
    stale = state["stale"]
    val_batches = trainer.epoch_batches(val_rows, np.random.default_rng([cfg.seed, 10**6])) if len(val_rows) else []
    with Progress("finetune", total=cfg.epochs, quiet=cfg.quiet, unit="epoch") as bar:
        bar.advance(len(history))
        for epoch in range(len(history), cfg.epochs):
            if stale >= cfg.patience:
                break
            row = _train_epoch(trainer, opt, train_rows, epoch)
            row.update(_validate(trainer, val_batches, val_pool, prepared, epoch))
            history.append(row)
            improved = best is None or _better(row, best["row"])
            if improved:
                best = {"row": row, "epoch": epoch, "trunk": {k: v.clone() for k, v in trainer.model.state_dict().items()}}
                stale = 0
            else:
                stale += 1
            _save_partial(out, key, trainer, opt, history, best, stale)
            bar.advance(1, status=_status(row))
            log.info("finetune epoch %d: %s", epoch, _status(row))
    trainer.model.load_state_dict(best["trunk"])
    if trainer.stem is not None:
        trainer.stem.close()
    meta = {
        "kind": TRUNK_KIND,
        "config": to_jsonable(cfg),
        "seed": cfg.seed,
        "objective": cfg.objective,
        "pair_sampler_version": PAIR_SAMPLER_VERSION if cfg.objective == "pairs" else None,
        "train_from": cfg.train_from,
        "augment": cfg.use_augment,
        "stem_cache": trainer.stem is not None,
        "stem": trainer.model.stem_kind,
        "image_size": prepared.image_size,
        "normalization": norm.as_dict(),
        "history": history,
        "best_epoch": best["epoch"],
        "best": best["row"],
        "init_trunk_sha256": trunk.sha256,
        "init_weights": trunk.source,
        "trunk_sha256": state_dict_sha256(trainer.model.state_dict()),
        "data_fingerprint": data_fp,
        "dataset": prepared.index.name,
        "n_train_images": int(len(train_rows)),
        "n_val_images": int(len(val_rows)),
        "classes_read": sorted(int(c) for c in np.unique(prepared.images.labels)),
        "versions": package_versions(),
        "wall_s": round(time.perf_counter() - t_start, 2),
        # all epochs, including those of an interrupted run that this one resumed
        "train_wall_s": round(sum(h["train_s"] + h["val_s"] for h in history), 2),
    }
    save_checkpoint(out, TRUNK_KIND, meta, {"trunk": trainer.model.state_dict()})
    _partial_path(out).unlink(missing_ok=True)
    return out


def _build_trainer(cfg, model, prepared: PreparedData, norm, out):
    imgs = prepared.images
    seen = np.flatnonzero(prepared.roles == "seen")
    if len(seen) < 2:
        raise OneShotBenchError(f"fine-tuning needs at least two seen classes; the split gives {len(seen)}")
    in_seen = np.isin(imgs.labels, seen)
    local = np.full(prepared.index.n_classes, -1, dtype=np.int64)
    local[seen] = np.arange(len(seen))
    seen_rows = np.flatnonzero(in_seen)
    labels = local[imgs.labels[seen_rows]]
    split = prepared.split[seen_rows]
    counts = np.bincount(labels[split == "train"], minlength=len(seen))
    if cfg.objective == "pairs" and counts.min() < 2:
        c = seen[int(np.argmin(counts))]
        raise OneShotBenchError(f"seen class {prepared.index.class_names[c]!r} has {counts.min()} train images; pairs need at least 2")
    images = imgs.images[seen_rows]
    freeze(model, cfg.train_from)
    model = model.to(memory_format=torch.channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        extra = PairHead(512) if cfg.objective == "pairs" else nn.Linear(512, len(seen))
    stem = None
    if not cfg.use_augment and cfg.train_from != "all":
        stem = StemCache(model, cfg.train_from, images, norm, out.with_name(out.name + ".stem.h5"), cfg.stem_cache_max_bytes)
    trainer = Trainer(cfg, model, extra, norm, images, labels, stem)
    val_class_rows = np.flatnonzero(np.isin(imgs.labels, np.flatnonzero(prepared.roles == "val")))
    val_pool = None
    if len(val_class_rows):
        val_pool = (imgs.images[val_class_rows], imgs.labels[val_class_rows])
    return trainer, np.flatnonzero(split == "train"), np.flatnonzero(split == "val"), val_pool


def _train_epoch(trainer: Trainer, opt, rows: np.ndarray, epoch: int) -> dict:
    cfg = trainer.cfg
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, epoch])
    batches = trainer.epoch_batches(rows, rng)
    gen = torch.Generator().manual_seed(_seed_of(cfg.seed, epoch, 1)) if cfg.use_augment else None
    set_train_mode(trainer.model, cfg.train_from)
    trainer.extra.train()
    total, correct, count = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_of(cfg.seed, epoch, 2))  # dropout masks
        for b, (idx, pairs) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch + b / len(batches)) / cfg.epochs, cfg.lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss, c, n = trainer.batch_loss(idx, pairs, gen)
            value = loss.item()
            if not math.isfinite(value):  # stop before a NaN reaches the weights; the last epoch is on disk
                hint = "; try --precision fp32" if cfg.precision == "bf16" else "; try a lower --lr"
                kept = "the last finished epoch is kept for resuming" if epoch else "no epoch had finished"
                raise OneShotBenchError(f"training stopped: non-finite loss at epoch {epoch + 1}, batch {b + 1}; {kept}{hint}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += value * n
            correct += c
            count += n
    return {"epoch": epoch, "train_loss": total / count, "train_accuracy": correct / count, "train_s": round(time.perf_counter() - t0, 3)}


def _validate(trainer: Trainer, val_batches, val_pool, prepared, epoch: int) -> dict:
    t0 = time.perf_counter()
    trainer.model.eval()
    trainer.extra.eval()
    row = {}
    with torch.inference_mode():
        if val_batches:
            total, correct, count = 0.0, 0, 0
            for idx, pairs in val_batches:
                loss, c, n = trainer.batch_loss(idx, pairs, None)
                total += loss.item() * n
                correct += c
                count += n
            row.update(val_loss=total / count, val_accuracy=correct / count)
        if val_pool is not None and trainer.cfg.val_episodes > 0:
            feats = embed_images(trainer.model, val_pool[0], trainer.norm, 256)
            pool = pool_from_labels(val_pool[1], np.arange(len(val_pool[1])))
            n_way = min(5, len(pool.class_ids))
            eps = sample_episodes(pool, np.arange(trainer.cfg.val_episodes), trainer.cfg.seed, n_way, 1, min(15, int(pool.counts.min()) - 1))
            scores = CosineScorer(torch.from_numpy(feats)).score(torch.from_numpy(eps.support), torch.from_numpy(eps.query))
            row["val_episode_accuracy"] = float((scores.argmax(2).numpy() == eps.query_label).mean())
    row["val_s"] = round(time.perf_counter() - t0, 3)
    return row


def _better(row: dict, best: dict) -> bool:
    """Model selection: episode accuracy on val classes when the split has them, else
    accuracy on the seen classes' held-out images. Not the validation loss: it rises with
    over-confidence late in training while accuracy, and the features, still improve."""
    for key in ("val_episode_accuracy", "val_accuracy"):
        if key in row:
            return row[key] > best[key]
    return row["train_loss"] < best["train_loss"]


def _status(row: dict) -> str:
    parts = [f"loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f}")
    if "val_episode_accuracy" in row:
        parts.append(f"val 5w1s {row['val_episode_accuracy']:.3f}")
    return ", ".join(parts)


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _save_partial(out, key, trainer, opt, history, best, stale) -> None:
    """Per-epoch training state, so that a killed finetune resumes where it stopped."""
    from oneshot_bench.provenance import atomic_output

    payload = {
        "key": key, "model": trainer.model.state_dict(), "extra": trainer.extra.state_dict(), "opt": opt.state_dict(),
        "history": history, "best": best, "stale": stale,
    }
    with atomic_output(_partial_path(out)) as tmp:
        torch.save(payload, tmp)


def _resume_state(out, key, trainer, opt) -> dict:
    path = _partial_path(out)
    fresh = {"history": [], "best": None, "stale": 0}
    if not path.exists():
        return fresh
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        log.warning("ignoring unreadable partial state %s", path)
        return fresh
    if payload.get("key") != key:
        return fresh
    trainer.model.load_state_dict(payload["model"])
    trainer.extra.load_state_dict(payload["extra"])
    opt.load_state_dict(payload["opt"])
    log.info("resuming finetune after epoch %d", len(payload["history"]) - 1)
    return {"history": payload["history"], "best": payload["best"], "stale": payload["stale"]}
