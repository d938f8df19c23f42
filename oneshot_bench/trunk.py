"""The trunk: torchvision ResNet-18 up to the 512-d global-average-pooled output of layer4.

Also the input pipeline (uint8 NHWC -> normalised float NCHW) and the *feature space*: the
identity of (weights, stem, image size, normalisation) that a cache and a head share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.provenance import TRUNK_KIND, load_checkpoint, state_dict_sha256

log = logging.getLogger(__name__)

FEATURE_DIM = 512
LAYERS = ("layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrunkConfig:
    """weights: "imagenet", "none" or a path (state_dict or finetune checkpoint).

    stem: "imagenet" (torchvision's conv1 stride 2 + max-pool) or "nomaxpool" (drops the
    max-pool: 4x the compute, but layer4 keeps 2x2 instead of 1x1 positions at 32 px).
    init_seed: seeds the random initialisation of `weights="none"`.
    """

    weights: str = "imagenet"
    stem: str = "imagenet"
    download: bool = False
    init_seed: int = 0


@dataclass(frozen=True)
class Normalization:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_dict(d: dict) -> "Normalization":
        return Normalization(d["name"], tuple(d["mean"]), tuple(d["std"]))


IMAGENET_NORM = Normalization("imagenet", IMAGENET_MEAN, IMAGENET_STD)


# Convolutions whose output has at most this many positions run as one matrix product (GemmConv2d).
GEMM_MAX_POSITIONS = 4


def _live_taps(k: int, size: int, out_size: int, stride: int, pad: int) -> range:
    """Kernel offsets along one axis that read at least one real (not padding) input position;
    the range from the first to the last, so it may include a dead one in between."""
    live = [u for u in range(k) if any(0 <= a * stride + u - pad < size for a in range(out_size))]
    return range(live[0], live[-1] + 1)


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that computes small outputs (at most GEMM_MAX_POSITIONS positions) as one
    matrix product over shifted copies of the input; same parameters and state_dict.

    At 32 px with the nomaxpool stem, layer4 works on 2x2 maps, where torch 2.14's oneDNN
    convolution kernels took 3-5x longer forward and backward than this product (bf16 and
    fp32, on the 2-core Xeon here, a development timing); at 4x4 and above they were as fast
    or faster, so those keep them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if isinstance(self.padding, str) or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros":
            return super().forward(x)
        ph, pw = self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if oh * ow > GEMM_MAX_POSITIONS:
            return super().forward(x)
        # kernel rows/columns that read only padding for every output position are skipped: on a
        # 1x1 map a 3x3 kernel would otherwise multiply eight taps of zeros for its one real tap
        us, vs = _live_taps(kh, h, oh, sh, ph), _live_taps(kw, w, ow, sw, pw)
        rows = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (n, h, w, c): channel-minor, as the weight below
        taps = [rows[:, u : u + sh * (oh - 1) + 1 : sh, v : v + sw * (ow - 1) + 1 : sw] for u in us for v in vs]
        cols = torch.stack(taps, 3).reshape(n * oh * ow, len(us) * len(vs) * c)
        weight = self.weight[:, :, us.start : us.stop, vs.start : vs.stop]
        out = F.linear(cols, weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1), self.bias)
        return out.reshape(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)  # NCHW, channels_last in memory


class Trunk(nn.Module):
    """ResNet-18 without its classifier. forward: (n, 3, s, s) float -> (n, 512) float32."""

    def __init__(self, stem: str = "imagenet") -> None:
        super().__init__()
        from torchvision.models import resnet18

        if stem not in ("imagenet", "nomaxpool"):
            raise OneShotBenchError(f"unknown stem {stem!r}; use imagenet or nomaxpool")
        net = resnet18(weights=None)
        self.stem_kind = stem
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = net.maxpool if stem == "imagenet" else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for module in self.modules():
            if type(module) is nn.Conv2d:
                # a class swap, not new modules: the seeded random init stays exactly torchvision's
                module.__class__ = GemmConv2d

    def stages(self) -> list[tuple[str, nn.Module]]:
        """(name, module) in forward order; the first one is the stem (conv1, bn1, pool)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [("stem", stem)] + [(name, getattr(self, name)) for name in LAYERS]

    def forward_from(self, x: torch.Tensor, start: str) -> torch.Tensor:
        """Run from stage `start` (its input is `x`) to the pooled (n, 512) features."""
        started = False
        for name, module in self.stages():
            started = started or name == start
            if started:
                x = module(x)
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward_until(self, x: torch.Tensor, stop: str) -> torch.Tensor:
        """Run the stages before `stop`; returns the input of stage `stop`."""
        for name, module in self.stages():
            if name == stop:
                return x
            x = module(x)
        raise ValueError(stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, "stem")


def layer4_input_side(stem: str, image_size: int) -> int:
    """Side of the feature map that enters layer4: conv1, the max-pool (ImageNet stem), layer2
    and layer3 each halve it, rounding up."""
    halvings = 4 if stem == "imagenet" else 3
    return -(-image_size // 2**halvings)


def fused_for_inference(model: Trunk, in_place: bool = False) -> Trunk:
    """An eval-mode copy with every BatchNorm folded into the convolution before it;
    in_place=True folds `model` itself, for a caller that has no further use for it (the copy
    took 0.14 s, a tenth of encoding 10,000 images at 32 px).

    Same function up to float rounding (~1e-6), and a quarter faster on CPU, where eval-mode
    BatchNorm is a separate pass over every activation."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = (model if in_place else copy.deepcopy(model)).eval()
    fused.conv1 = fuse_conv_bn_eval(fused.conv1, fused.bn1)
    fused.bn1 = nn.Identity()
    for name in LAYERS:
        for block in getattr(fused, name):
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.bn1 = nn.Identity()
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn2 = nn.Identity()
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return fused.to(memory_format=torch.channels_last)


@dataclass
class LoadedTrunk:
    """A trunk with what identifies it: sha256 of its weights, its normalisation
    (None: compute from data), the image size it was trained at, and its source."""

    model: Trunk
    sha256: str
    normalization: Normalization | None
    image_size: int | None
    source: str
    meta: dict


def _imagenet_state_dict(download: bool) -> dict:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    if not (hub_dir / filename).is_file() and not download:
        raise OneShotBenchError(
            f"ImageNet weights not found at {hub_dir / filename}: pass --download to fetch them "
            f"(checksum verified), or use --weights PATH (a state_dict) or --weights none"
        )
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:
        reason = str(exc).replace("\n", " ")[:160]
        raise OneShotBenchError(
            f"could not load ImageNet weights ({reason}); offline, use --weights none (train with --train-from all) "
            f"or --weights PATH to a local state_dict"
        ) from None


def build_trunk(cfg: TrunkConfig) -> LoadedTrunk:
    """Build the trunk described by `cfg`; random init is seeded and leaves global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = Trunk(cfg.stem)
    norm, image_size, source, meta = None, None, "random", {}
    if cfg.weights == "imagenet":
        state = _imagenet_state_dict(cfg.download)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.load_state_dict(state)
        norm, source = IMAGENET_NORM, "torchvision:IMAGENET1K_V1"
    elif cfg.weights != "none":
        path = Path(cfg.weights)
        if not path.is_file():
            raise OneShotBenchError(f"unknown --weights {cfg.weights!r}: not imagenet, none, or an existing file")
        try:
            meta, tensors = load_checkpoint(path, TRUNK_KIND)
            state = tensors["trunk"]
            norm = Normalization.from_dict(meta["normalization"])
            image_size = meta.get("image_size")
            if meta.get("stem", "imagenet") != cfg.stem:
                model = Trunk(meta["stem"])
        except OneShotBenchError:
            # not our checkpoint: a plain torchvision-style state_dict
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise OneShotBenchError(f"--weights {path} is neither a checkpoint nor a state_dict ({type(exc).__name__})") from None
            if not isinstance(state, dict):
                raise OneShotBenchError(f"--weights {path} does not hold a state_dict")
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise OneShotBenchError(f"--weights {path} does not fit ResNet-18: {first}") from None
        source = str(path)
    model.eval()
    return LoadedTrunk(model, state_dict_sha256(model.state_dict()), norm, image_size, source, meta)


def resolve_image_size(requested: int | None, trunk: LoadedTrunk, native: int | None) -> int:
    """224 for ImageNet weights, the checkpoint's size for fine-tuned ones, else the data's."""
    if requested is not None:
        if requested < 8:
            raise OneShotBenchError(f"--image-size {requested} is too small (minimum 8)")
        return int(requested)
    if trunk.image_size is not None:
        return int(trunk.image_size)
    if trunk.source.startswith("torchvision:"):
        return 224
    return int(native or 32)


def dataset_normalization(images: np.ndarray) -> Normalization:
    """Per-channel mean/std of (n, s, s, 3) uint8 images, rounded for stable JSON."""
    # exact moments from per-channel histograms of the uint8 values: no float copy of the images
    flat = images.reshape(-1, 3)
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(flat[:, c], minlength=256).astype(np.float64)
        m = float((hist * values).sum() / hist.sum())
        mean.append(round(m, 6))
        std.append(round(float(np.sqrt((hist * (values - m) ** 2).sum() / hist.sum())), 6))
    return Normalization("dataset", tuple(mean), tuple(std))


def to_input(batch: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """(n, s, s, 3) uint8 -> (n, 3, s, s) float32 normalised, channels_last."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# Feature-space entries added after caches and heads existed: recorded only when not at this
# value, so that older artefacts keep their identity; a missing entry means this value.
FEATURE_SPACE_OFF = {"tta": "none"}


def feature_space(trunk: LoadedTrunk, image_size: int, norm: Normalization, dtype: str, tta: str = "none") -> dict:
    """What a feature vector means; heads and caches must agree on all of it."""
    space = {
        "trunk_sha256": trunk.sha256,
        "stem": trunk.model.stem_kind,
        "image_size": int(image_size),
        "normalization": norm.as_dict(),
        "dtype": dtype,
        "dim": FEATURE_DIM,
        "tta": tta,
    }
    return {k: v for k, v in space.items() if FEATURE_SPACE_OFF.get(k, object()) != v}
