import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import write_folder
from oneshot_bench.cli import app
from oneshot_bench.report import PLOTS, REPORT_KEYS

runner = CliRunner()


def _run(root: Path, out: Path, *extra: str):
    args = ["run", "--dataset", f"folder:{root}", "--weights", "none", "--split", "ratio:0.5", "--out-dir", str(out),
            "--epochs", "1", "--head-epochs", "2", "--n-episodes", "200", "--n-query", "5", "--n-way", "2,3",
            "--n-shot", "1", "--seed-protocol", "--seed-protocol-episodes", "5", "-q", *extra]
    return runner.invoke(app, args)


def test_run_end_to_end_reuse_and_partial_rerun(tmp_path):
    root = write_folder(tmp_path / "imgs", n_classes=8, per_class=10, size=16)
    out = tmp_path / "run"
    r = _run(root, out)
    assert r.exit_code == 0, r.output
    assert "ran in" in r.output and "reused" not in r.output
    files = {p.name: p for p in out.iterdir()}
    for name in ("report.json", "report.md", *PLOTS):
        assert name in files and files[name].stat().st_size > 0, name
    for prefix in ("finetune-", "cache-", "head-", "episodes-episodes-2w1s", "episodes-episodes-3w1s", "episodes-seed-"):
        assert any(n.startswith(prefix) for n in files), prefix
    assert (out / "example_episodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(report) and report["kind"] == "oneshot-bench/report"
    assert set(report["stages"]) == {"finetune", "encode", "train-head", "episodes"}
    settings = [(b["protocol"], b["results"][0]["n_way"]) for b in report["results"]]
    assert settings == [("episodes", 2), ("episodes", 3), ("seed", 4)]
    for block in report["results"]:
        for res in block["results"]:
            assert {"scorer", "accuracy", "ci95", "n_episodes", "n_way", "n_shot", "n_query", "wall_s"} <= set(res)
            assert 0.0 <= res["accuracy"] <= 1.0 and res["ci95"] >= 0.0
        assert block["paired_differences"]
    assert "± 95% CI" in r.output or "95%" in r.output
    md = (out / "report.md").read_text()
    assert "| episodes | 2 | 1 | 5 |" in md

    again = _run(root, out)
    assert again.exit_code == 0, again.output
    for stage in ("finetune", "encode", "train-head"):
        assert f"{stage}: reused" in again.output
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]

    before = {p.name for p in out.iterdir()}
    changed = runner.invoke(app, [
        "run", "--dataset", f"folder:{root}", "--weights", "none", "--split", "ratio:0.5", "--out-dir", str(out),
        "--epochs", "1", "--head-epochs", "2", "--n-episodes", "200", "--n-query", "5", "--n-way", "4", "-q"])
    assert changed.exit_code == 0, changed.output
    for stage in ("finetune", "encode", "train-head"):
        assert f"{stage}: reused" in changed.output
    new = {p.name for p in out.iterdir()} - before
    assert any(n.startswith("episodes-episodes-4w1s") for n in new)
    assert not any(n.startswith(("finetune-", "cache-", "head-")) for n in new)

    # --tta flip changes the features: the trunk is reused, encode and everything after it re-run
    before = {p.name for p in out.iterdir()}
    flipped = runner.invoke(app, [
        "run", "--dataset", f"folder:{root}", "--weights", "none", "--split", "ratio:0.5", "--out-dir", str(out),
        "--epochs", "1", "--head-epochs", "2", "--n-episodes", "200", "--n-query", "5", "--n-way", "4", "--tta", "flip", "-q"])
    assert flipped.exit_code == 0, flipped.output
    assert "finetune: reused" in flipped.output and "encode: ran in" in flipped.output and "train-head: ran in" in flipped.output
    new_cache = [n for n in {p.name for p in out.iterdir()} - before if n.startswith("cache-")]
    assert len(new_cache) == 1
    info = json.loads(runner.invoke(app, ["info", str(out / new_cache[0])]).output)
    assert info["feature_space"]["tta"] == "flip" and info["config"]["tta"] == "flip", info


def test_report_redraws_from_json_and_info_reads_it(tmp_path):
    root = write_folder(tmp_path / "imgs", n_classes=8, per_class=10, size=16)
    out = tmp_path / "run"
    assert _run(root, out).exit_code == 0
    for name in PLOTS:
        (out / name).unlink()
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert all((out / name).stat().st_size > 0 for name in PLOTS)
    info = runner.invoke(app, ["info", str(out / "report.json")])
    assert info.exit_code == 0 and '"oneshot-bench/report"' in info.output
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "report.json does not exist" in bad.output


def test_run_offline_error_says_how_to_run_locally(tmp_path):
    r = runner.invoke(app, ["run", "--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 2
    first = r.output.strip().splitlines()[0]
    assert "--download" in first and "folder:PATH" in first


def test_usage_errors_are_one_line_exit_2(capsys):
    import pytest

    from oneshot_bench.cli import main

    for argv in (["episodes", "--n-way", "five"], ["encode", "--no-such-option"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
