from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_folder
from oneshot_bench.cache import prepare_data
from oneshot_bench.cli import app
from oneshot_bench.data import DataConfig
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.finetune import FinetuneConfig, StemCache, Trainer, finetune, freeze
from oneshot_bench.head import PairHead
from oneshot_bench.provenance import TRUNK_KIND, load_checkpoint
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import GemmConv2d, Trunk, TrunkConfig, build_trunk, dataset_normalization, layer4_input_side

runner = CliRunner()


def _cfg(root, out, **kw):
    base = dict(data=DataConfig(dataset=f"folder:{root}"), split=SplitConfig("ratio:0.67", val_fraction=0.25),
                trunk=TrunkConfig(weights="none"), out=out, epochs=2, batch_size=16, pairs_per_class=20, quiet=True,
                group_size=4)  # tiny classes and batches: the default groups of 12 would leave a few steps an epoch
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture
def data6(tmp_path):
    return write_folder(tmp_path / "imgs", n_classes=6, per_class=12, size=16)


def test_frozen_layers_and_bn_statistics_unchanged(data6, tmp_path):
    init = build_trunk(TrunkConfig(weights="none")).model.state_dict()
    meta, t = load_checkpoint(finetune(_cfg(data6, tmp_path / "t.pt", train_from="layer4")), TRUNK_KIND)
    state = t["trunk"]
    frozen = [k for k in state if not k.startswith("layer4.")]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(state[k], init[k]), k  # weights and BN running stats, bit for bit
    assert any(not torch.equal(state[k], init[k]) for k in state if k.startswith("layer4."))
    assert meta["stem_cache"] is True and meta["augment"] is False


def test_pair_loss_falls_and_val_accuracy_rises(tmp_path):
    root = write_folder(tmp_path / "imgs", n_classes=8, per_class=30, size=16)
    meta, _ = load_checkpoint(finetune(_cfg(root, tmp_path / "t.pt", split=SplitConfig("ratio:1", val_fraction=0.25),
                                            train_from="all", epochs=4, lr=0.05, augment=False, pairs_per_class=40)), TRUNK_KIND)
    h = meta["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert max(r["val_accuracy"] for r in h) > 0.8  # chance is 0.5 on balanced pairs


def test_stem_cache_gives_the_same_loss_as_the_plain_path(data6):
    trunk = build_trunk(TrunkConfig(weights="none"))
    cfg = FinetuneConfig(train_from="layer3", augment=False)
    prepared = prepare_data(DataConfig(dataset=f"folder:{data6}"), SplitConfig("ratio:1"), trunk)
    images = prepared.images.images
    norm = dataset_normalization(images)
    model = trunk.model.to(memory_format=torch.channels_last)
    freeze(model, "layer3")
    model.eval()
    head = PairHead(512, dropout=0.0)
    labels = prepared.images.labels
    stem = StemCache(model, "layer3", images, norm, None, 1 << 30)
    idx = np.arange(0, 24)
    pairs = (np.array([0, 1, 2]), np.array([1, 13, 5]), np.array([1.0, 0.0, 1.0], dtype=np.float32))
    cached = Trainer(cfg, model, head, norm, images, labels, stem).batch_loss(idx, pairs, None)[0]
    plain = Trainer(cfg, model, head, norm, images, labels, None).batch_loss(idx, pairs, None)[0]
    assert torch.allclose(cached, plain, rtol=1e-5, atol=1e-6)


def test_same_seed_same_checkpoint_resume_and_best_epoch(data6, tmp_path):
    cfg_a = _cfg(data6, tmp_path / "a.pt", train_from="layer3", epochs=3, objective="classes")
    _, ta = load_checkpoint(finetune(cfg_a), TRUNK_KIND)
    _, tb = load_checkpoint(finetune(_cfg(data6, tmp_path / "b.pt", train_from="layer3", epochs=3, objective="classes")), TRUNK_KIND)
    assert all(torch.equal(ta["trunk"][k], tb["trunk"][k]) for k in ta["trunk"])
    # a run stopped after epoch 2 and resumed for the third gives the same checkpoint
    from oneshot_bench import finetune as ft

    calls = {"n": 0}
    original = ft._save_partial

    def stop_after_two(*args, **kw):
        original(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    out_c = tmp_path / "c.pt"
    ft._save_partial = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(_cfg(data6, out_c, train_from="layer3", epochs=3, objective="classes"))
    finally:
        ft._save_partial = original
    assert not out_c.exists() and out_c.with_name("c.pt.partial").exists()
    meta_c, tc = load_checkpoint(finetune(_cfg(data6, out_c, train_from="layer3", epochs=3, objective="classes")), TRUNK_KIND)
    assert all(torch.equal(ta["trunk"][k], tc["trunk"][k]) for k in ta["trunk"])
    accuracies = [r["val_accuracy"] for r in meta_c["history"]]
    assert meta_c["best_epoch"] == int(np.argmax(accuracies))  # first epoch with the best accuracy


def test_unseen_classes_are_never_read(tmp_path):
    root = write_folder(tmp_path / "imgs", n_classes=6, per_class=10, size=16)
    split = SplitConfig("ratio:0.5", val_fraction=0.2)
    cfg = dict(data=DataConfig(dataset=f"folder:{root}"), split=split, trunk=TrunkConfig(weights="none"),
               epochs=1, batch_size=16, pairs_per_class=10, train_from="layer4", quiet=True)
    _, before = load_checkpoint(finetune(FinetuneConfig(out=tmp_path / "a.pt", **cfg)), TRUNK_KIND)
    from oneshot_bench.data import open_source
    from oneshot_bench.splits import class_roles

    index = open_source(DataConfig(dataset=f"folder:{root}"))
    roles = class_roles(index, split)
    for sid, label in zip(index.source_ids, index.labels):
        if roles[label] == "unseen":
            (root / sid).write_bytes(b"destroyed")  # any read of these would be reported and change nothing else
    meta, after = load_checkpoint(finetune(FinetuneConfig(out=tmp_path / "b.pt", **cfg)), TRUNK_KIND)
    assert all(torch.equal(before["trunk"][k], after["trunk"][k]) for k in before["trunk"])
    assert set(meta["classes_read"]) == set(np.flatnonzero(roles == "seen").tolist())


def test_finetune_checkpoint_feeds_encode(data6, tmp_path):
    ckpt = finetune(_cfg(data6, tmp_path / "t.pt", train_from="layer4", epochs=1))
    r = runner.invoke(app, ["encode", "--dataset", f"folder:{data6}", "--weights", str(ckpt), "--split", "ratio:0.67",
                            "--out", str(tmp_path / "c.h5"), "-q"])
    assert r.exit_code == 0, r.output
    from oneshot_bench.cache import read_attrs

    meta, _ = load_checkpoint(ckpt, TRUNK_KIND)
    attrs = read_attrs(tmp_path / "c.h5")
    assert attrs["trunk_sha256"] == meta["trunk_sha256"] and attrs["feature_space"]["normalization"] == meta["normalization"]


def test_finetune_errors(data6, tmp_path):
    base = ["finetune", "--dataset", f"folder:{data6}", "--weights", "none", "-q", "--out", str(tmp_path / "t.pt")]
    for args, needle in (
        (["--train-from", "layer9"], "unknown --train-from"),
        (["--objective", "triplets"], "unknown --objective"),
        (["--precision", "fp8"], "unknown --precision"),
        # 16 px through the ImageNet stem leaves layer4 a 1x1 input: bf16 is refused there
        (["--precision", "bf16", "--train-from", "all"], "--precision bf16 needs layer4 to see at least 2x2 positions"),
        (["--out", str(tmp_path)], "is a directory"),
    ):
        r = runner.invoke(app, base + args)
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    tiny = write_folder(tmp_path / "tiny", n_classes=4, per_class=1, size=16)
    r = runner.invoke(app, ["finetune", "--dataset", f"folder:{tiny}", "--weights", "none", "-q", "--split", "ratio:0.5",
                            "--out", str(tmp_path / "u.pt")])
    assert r.exit_code == 2 and "has 1 readable images; the split needs at least 2" in r.output, r.output


def test_mixup_trains_and_is_reproducible(data6, tmp_path):
    cfg = dict(train_from="all", epochs=2, objective="classes", augment=True, mixup=0.4)
    _, a = load_checkpoint(finetune(_cfg(data6, tmp_path / "a.pt", **cfg)), TRUNK_KIND)
    meta, b = load_checkpoint(finetune(_cfg(data6, tmp_path / "b.pt", **cfg)), TRUNK_KIND)
    assert all(torch.equal(a["trunk"][k], b["trunk"][k]) for k in a["trunk"])
    assert meta["config"]["mixup"] == 0.4 and all(np.isfinite(h["train_loss"]) for h in meta["history"])


def test_layer4_input_side_matches_the_network():
    for stem in ("imagenet", "nomaxpool"):
        model = Trunk(stem).eval()
        for size in (8, 9, 16, 17, 32, 33, 64):
            x = model.forward_until(torch.zeros(1, 3, size, size), "layer4")
            assert x.shape[-1] == x.shape[-2] == layer4_input_side(stem, size), (stem, size)


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,side,bias", [
    (8, 6, 3, 1, 1, 2, False),  # layer4's 3x3 at 32 px with the nomaxpool stem: 2x2 in, 2x2 out
    (8, 6, 3, 2, 1, 4, True),  # its first, strided conv: 4x4 in, 2x2 out
    (8, 6, 3, 1, 1, 1, False),  # 1x1 maps (ImageNet stem at 32 px): only the centre tap reads the image
    (8, 6, 3, 2, 1, 1, True),  # strided on a 1x1 map
    (8, 6, 3, 2, 1, 2, False),  # 2x2 in, 1x1 out: the kernel's first row and column read only padding
    (8, 6, 1, 2, 0, 3, False),  # the 1x1 downsample, odd side
    (5, 4, 3, 1, 1, 5, False),  # 25 output positions: falls back to the convolution kernel
])
def test_gemm_conv_equals_conv2d_with_gradients(c_in, c_out, k, stride, pad, side, bias):
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride, pad, bias=bias).double()
    gemm = GemmConv2d(c_in, c_out, k, stride, pad, bias=bias).double()
    gemm.load_state_dict(conv.state_dict())
    x = torch.randn(3, c_in, side, side, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grads = []
    for module in (conv, gemm):
        xi = x.clone().requires_grad_()
        y = module(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        grads.append((y.detach(), xi.grad, *(p.grad for p in module.parameters())))
        module.zero_grad()
    for a, b in zip(*grads):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_trunk_with_gemm_convs_equals_torchvision_resnet18():
    from torchvision.models import resnet18

    for stem, size in (("nomaxpool", 32), ("imagenet", 16), ("imagenet", 64)):
        model = Trunk(stem).double().eval()
        assert sum(isinstance(m, GemmConv2d) for m in model.modules()) == 20  # every convolution of ResNet-18
        ref = resnet18(weights=None).double().eval()
        ref.load_state_dict({**model.state_dict(), **{f"fc.{k}": v for k, v in ref.fc.state_dict().items()}})
        ref.fc, ref.maxpool = torch.nn.Identity(), ref.maxpool if stem == "imagenet" else torch.nn.Identity()
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            assert torch.allclose(model(x), ref(x), rtol=1e-10, atol=1e-12), (stem, size)


def test_bf16_training_tracks_fp32_and_keeps_float32_weights(tmp_path):
    root = write_folder(tmp_path / "imgs", n_classes=8, per_class=30, size=16)
    # nomaxpool: layer4 sees 2x2 positions at 16 px. With the max-pool it would see 1x1, where torch
    # 2.14's bfloat16 CPU weight gradient of a stride-2 3x3 conv returns garbage on some identical runs.
    cfg = dict(split=SplitConfig("ratio:1", val_fraction=0.25), train_from="all", epochs=4, lr=0.05, augment=False,
               pairs_per_class=40, trunk=TrunkConfig(weights="none", stem="nomaxpool"))
    m16, t16 = load_checkpoint(finetune(_cfg(root, tmp_path / "b.pt", precision="bf16", **cfg)), TRUNK_KIND)
    again, _ = load_checkpoint(finetune(_cfg(root, tmp_path / "c.pt", precision="bf16", **cfg)), TRUNK_KIND)
    assert again["trunk_sha256"] == m16["trunk_sha256"]  # bf16 steps are deterministic too
    h16 = m16["history"]
    assert h16[-1]["train_loss"] < h16[0]["train_loss"] and max(r["val_accuracy"] for r in h16) > 0.8
    # same batches, same initialisation: at a small learning rate the first epoch's mean loss
    # agrees within 2% (0.7% when written). At 0.05 the steps' rounding differences grow
    # chaotically and the two means were up to 5.6% apart.
    slow = {**cfg, "epochs": 1, "lr": 0.005}
    s32, _ = load_checkpoint(finetune(_cfg(root, tmp_path / "s32.pt", **slow)), TRUNK_KIND)
    s16, _ = load_checkpoint(finetune(_cfg(root, tmp_path / "s16.pt", precision="bf16", **slow)), TRUNK_KIND)
    l32, l16 = s32["history"][0]["train_loss"], s16["history"][0]["train_loss"]
    assert l32 != l16 and abs(l16 - l32) < 0.02 * l32
    assert all(v.dtype in (torch.float32, torch.int64) for v in t16["trunk"].values())
    assert m16["config"]["precision"] == "bf16"


def test_non_finite_loss_stops_training_and_keeps_the_last_epoch(data6, tmp_path, monkeypatch):
    out = tmp_path / "t.pt"
    cfg = _cfg(data6, out, train_from="all", epochs=3, objective="classes", augment=False)
    real, calls = Trainer.batch_loss, {"n": 0, "poison_after": None}

    def batch_loss(self, idx, pairs, gen):  # counts calls; NaN once past poison_after
        loss, c, n = real(self, idx, pairs, gen)
        calls["n"] += 1
        poison = calls["poison_after"] is not None and calls["n"] > calls["poison_after"]
        return (loss * float("nan") if poison else loss), c, n

    monkeypatch.setattr(Trainer, "batch_loss", batch_loss)
    finetune(_cfg(data6, tmp_path / "probe.pt", train_from="all", epochs=1, objective="classes", augment=False))
    calls.update(n=0, poison_after=calls["n"])  # one epoch's training and validation batches
    with pytest.raises(OneShotBenchError, match="non-finite loss at epoch 2, batch 1"):
        finetune(cfg)
    assert not out.exists()
    partial = torch.load(out.with_name(out.name + ".partial"), weights_only=False)
    assert len(partial["history"]) == 1 and all(np.isfinite(h["train_loss"]) for h in partial["history"])


def test_resized_crops_keep_geometry_and_values():
    from oneshot_bench.finetune import resized_crop_batch

    gen = torch.Generator().manual_seed(0)
    flat = torch.full((8, 3, 16, 16), 0.7)
    assert torch.allclose(resized_crop_batch(flat, gen, 0.35), flat)  # interpolating a constant gives it back
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(64, 3, 16, 16).contiguous()
    out = resized_crop_batch(ramp, gen, 0.35)
    step = out[..., 1:] - out[..., :-1]  # a crop of a left-to-right ramp is a ramp, mirrored when flipped
    rising = (step >= -1e-5).all(-1).all(-1).all(-1)
    falling = (step <= 1e-5).all(-1).all(-1).all(-1)
    assert bool((rising | falling).all()) and 10 < int(rising.sum()) < 54
    assert out.min() >= 0 and out.max() <= 15
    span = out[..., -1] - out[..., 0]  # crops cover between sqrt(0.35 * 3/4) and all of the width
    assert span.abs().min() > 0.45 * 15 and span.abs().max() <= 15 + 1e-4


def test_stage_identity_ignores_pair_options_for_classes_only():
    from oneshot_bench.finetune import finetune_identity

    a = FinetuneConfig(objective="classes", group_size=4, pairs_per_class=250)
    b = FinetuneConfig(objective="classes", group_size=12, pairs_per_class=100, out=Path("elsewhere.pt"), quiet=True)
    assert finetune_identity(a) == finetune_identity(b)  # a classes run is reused whatever the pair options
    pa, pb = (FinetuneConfig(objective="pairs", group_size=g) for g in (4, 12))
    assert finetune_identity(pa) != finetune_identity(pb) and "pair_sampler_version" in finetune_identity(pa)
    assert finetune_identity(FinetuneConfig(precision="bf16")) != finetune_identity(FinetuneConfig())
