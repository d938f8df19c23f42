import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHARED_TINY
from oneshot_bench.cache import TTA_SHIFT_PX, EncodeConfig, embed_images, encode, load_cache, read_attrs
from oneshot_bench.cli import app
from oneshot_bench.data import DataConfig, open_source
from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.splits import SplitConfig
from oneshot_bench.trunk import TrunkConfig, build_trunk, dataset_normalization

runner = CliRunner()


def _cfg(root, out, **kw):
    return EncodeConfig(data=DataConfig(dataset=f"folder:{root}"), split=SplitConfig("ratio:0.5"),
                        trunk=TrunkConfig(weights="none"), out=out, batch_size=8, chunk_size=16, quiet=True, **kw)


def test_encode_round_trip_is_exact(folder_data, tmp_path):
    out = encode(_cfg(folder_data, tmp_path / "c.h5"))
    cache = load_cache(out)
    index = open_source(DataConfig(dataset=f"folder:{folder_data}"))
    imgs = index.load(None, 16)
    assert cache.features.shape == (48, 512) and cache.features.dtype == np.float32
    assert list(cache.source_ids) == list(imgs.source_ids)
    assert np.array_equal(cache.labels, imgs.labels)
    trunk = build_trunk(TrunkConfig(weights="none"))
    seen_train = cache.image_split == "train"
    norm = dataset_normalization(imgs.images[seen_train])
    expect = embed_images(trunk.model, imgs.images, norm, 8)
    assert np.array_equal(cache.features, expect)  # bit-exact through HDF5
    attrs = read_attrs(out)
    assert attrs["feature_space"]["image_size"] == 16 and attrs["trunk_sha256"] == trunk.sha256
    assert set(cache.class_roles) == {"seen", "unseen"} and set(cache.image_split) == {"train", "val", ""}
    assert attrs["data_fingerprint"] and attrs["versions"]["torch"]


def test_killed_encode_leaves_no_complete_file_and_resumes_exactly(folder_data, tmp_path):
    full = encode(_cfg(folder_data, tmp_path / "full.h5"))
    out = tmp_path / "resumed.h5"

    class Killed(Exception):
        pass

    def kill_after_first_chunk(n_done):
        if n_done >= 16:
            raise Killed

    with pytest.raises(Killed):
        encode(_cfg(folder_data, out), on_chunk=kill_after_first_chunk)
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()
    with pytest.raises(OneShotBenchError, match="incomplete"):
        read_attrs(partial)
    with h5py.File(partial, "r") as f:
        assert f.attrs["n_done"] == 16
    seen = []
    encode(_cfg(folder_data, out), on_chunk=seen.append)
    assert seen[0] == 32  # resumed after the first chunk, not from zero
    assert not partial.exists()
    assert np.array_equal(load_cache(out).features, load_cache(full).features)


def test_float16_option(folder_data, tmp_path):
    out = encode(_cfg(folder_data, tmp_path / "h.h5", dtype="float16"))
    with h5py.File(out) as f:
        assert f["features"].dtype == np.float16
    full = load_cache(encode(_cfg(folder_data, tmp_path / "f.h5")))
    assert np.allclose(load_cache(out).features, full.features, rtol=2e-3, atol=1e-3)


def test_flip_tta_averages_the_mirror_view_and_is_its_own_feature_space(folder_data, tmp_path):
    plain = load_cache(encode(_cfg(folder_data, tmp_path / "p.h5")))
    flip = load_cache(encode(_cfg(folder_data, tmp_path / "f.h5", tta="flip")))
    index = open_source(DataConfig(dataset=f"folder:{folder_data}"))
    imgs = index.load(None, 16).images
    mirrored = np.ascontiguousarray(imgs[:, :, ::-1])
    trunk = build_trunk(TrunkConfig(weights="none"))
    norm = dataset_normalization(imgs[plain.image_split == "train"])
    of_mirror = embed_images(trunk.model, mirrored, norm, 8)
    assert np.allclose(flip.features, (plain.features + of_mirror) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flip.features, plain.features, rtol=1e-3)  # random trunks are not mirror-symmetric
    # a mirrored data set encodes to the same flip-averaged features
    assert np.allclose(embed_images(trunk.model, mirrored, norm, 8, tta="flip"), flip.features, rtol=1e-5, atol=1e-6)
    assert flip.feature_space == {**plain.feature_space, "tta": "flip"} and "tta" not in plain.feature_space
    _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "none", "--tta", "mirror",
                          "--out", tmp_path / "m.h5", "-q"), "unknown --tta 'mirror'")


def test_flip_shift_tta_averages_ten_views_and_is_its_own_feature_space(folder_data, tmp_path):
    flip = load_cache(encode(_cfg(folder_data, tmp_path / "f.h5", tta="flip")))
    shift = load_cache(encode(_cfg(folder_data, tmp_path / "s.h5", tta="flip-shift")))
    imgs = open_source(DataConfig(dataset=f"folder:{folder_data}")).load(None, 16).images
    trunk = build_trunk(TrunkConfig(weights="none"))
    norm = dataset_normalization(imgs[flip.image_split == "train"])
    # the four shifted copies made independently, in numpy, from reflect-padded uint8 images
    p, s = TTA_SHIFT_PX, imgs.shape[1]
    padded = np.pad(imgs, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    views = [np.ascontiguousarray(padded[:, dy : dy + s, dx : dx + s]) for dy, dx in ((0, p), (2 * p, p), (p, 0), (p, 2 * p))]
    by_hand = (flip.features + sum(embed_images(trunk.model, v, norm, 8, tta="flip") for v in views)) / 5
    assert np.allclose(shift.features, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shift.features, flip.features, rtol=1e-3)
    # the ten views are closed under mirroring: a mirrored data set encodes to the same features
    mirrored = np.ascontiguousarray(imgs[:, :, ::-1])
    assert np.allclose(embed_images(trunk.model, mirrored, norm, 8, tta="flip-shift"), shift.features, rtol=1e-5, atol=1e-6)
    assert shift.feature_space == {**flip.feature_space, "tta": "flip-shift"}


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_exit_2(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0]


def test_cli_encode_and_info(folder_data, tmp_path):
    out = tmp_path / "c.h5"
    r = _cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "none", "--split", "ratio:0.5", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    info = json.loads(_cli("info", out).output)
    assert info["roles"]["seen"]["classes"] == 3 and info["roles"]["unseen"]["images"] == 24
    assert info["shapes"]["features"] == [48, 512]


def test_cli_error_paths(folder_data, tmp_path):
    _one_line_exit_2(_cli("encode", "--dataset", "cifar100", "--data-root", tmp_path / "none", "--weights", "none", "-q"),
                     "cifar-100-python", "--download")
    _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--split", "ratio:2", "--weights", "none", "-q"), "ratio")
    _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "resnet99", "-q"), "unknown --weights")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not __import__("os").access(locked, __import__("os").W_OK):  # root ignores permissions
        _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "none", "--out", locked / "c.h5", "-q"), "cannot write")
    _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "none", "--out", tmp_path, "-q"), "is a directory")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    _one_line_exit_2(_cli("info", foreign), "not an oneshot-bench cache")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    _one_line_exit_2(_cli("episodes", "--cache", corrupt, "-q"), "not a readable HDF5")
    _one_line_exit_2(_cli("info", tmp_path / "missing.pt"), "does not exist")


def test_imagenet_weights_offline_error(monkeypatch, tmp_path, folder_data):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _one_line_exit_2(_cli("encode", "--dataset", f"folder:{folder_data}", "--weights", "imagenet", "-q"),
                     "ImageNet weights not found", "--download", "--weights none")


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_TINY.is_dir(), reason="../shared/data/tiny-imagenet-200 is absent")
def test_real_tiny_imagenet_three_classes(tmp_path):
    root = tmp_path / "tiny3"
    root.mkdir()
    classes = sorted(p.name for p in SHARED_TINY.iterdir() if p.is_dir())[:3]
    for c in classes:
        (root / c).symlink_to(SHARED_TINY / c)  # a view, never a copy
    cfg = EncodeConfig(data=DataConfig(dataset=f"folder:{root}", image_size=32), split=SplitConfig("ratio:0.67"),
                       trunk=TrunkConfig(weights="none"), out=tmp_path / "t.h5", quiet=True)
    cache = load_cache(encode(cfg))
    assert cache.features.shape == (450, 512)
    assert cache.class_names == classes and np.all(np.bincount(cache.labels) == 150)
    assert cache.attrs["n_skipped"] == 0 and np.isfinite(cache.features).all()


def test_batchnorm_folding_matches_the_plain_trunk():
    import torch

    from oneshot_bench.trunk import fused_for_inference

    trunk = build_trunk(TrunkConfig(weights="none", init_seed=3)).model
    for m in trunk.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    trunk.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        plain, fused = trunk(x), fused_for_inference(trunk)(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, fused, rtol=1e-4, atol=1e-5)


def test_dataset_normalization_equals_float_moments():
    x = np.random.default_rng(1).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    norm = dataset_normalization(x)
    f = x.reshape(-1, 3) / 255.0
    assert np.allclose(norm.mean, f.mean(0), atol=1e-6) and np.allclose(norm.std, f.std(0), atol=1e-6)
