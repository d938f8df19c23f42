"""Reports of a `run`: report.json (everything), report.md (the tables) and PNG plots.

`render(run_dir)` redraws report.md and the plots from report.json alone (plus the data
set, for the example-episode images), without re-running anything.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from oneshot_bench.errors import OneShotBenchError
from oneshot_bench.provenance import HEAD_KIND, TRUNK_KIND, load_checkpoint, to_jsonable, write_json

log = logging.getLogger(__name__)

REPORT_KIND = "oneshot-bench/report"
REPORT_KEYS = ("kind", "created", "config", "stages", "results", "example_episode", "versions")
PLOTS = ("accuracy_vs_way.png", "training_curves.png", "head_scores.png", "example_episodes.png")


def build_report(cfg, stages, results: list[dict], versions: dict) -> dict:
    """Assemble report.json's content from the stage records and episode results."""
    from oneshot_bench.cache import read_attrs

    st = {}
    for rec in stages:
        entry = {"path": str(rec.path), "reused": rec.reused, "seconds_this_run": rec.seconds}
        if rec.name == "finetune":
            meta, _ = load_checkpoint(rec.path, TRUNK_KIND)
            train_s = meta.get("train_wall_s", sum(h["train_s"] + h["val_s"] for h in meta["history"]))
            entry.update(wall_s=meta["wall_s"], train_wall_s=train_s, history=meta["history"], best_epoch=meta["best_epoch"],
                         trunk_sha256=meta["trunk_sha256"], data_fingerprint=meta["data_fingerprint"])
        elif rec.name == "encode":
            attrs = read_attrs(rec.path)
            timing = attrs["timing"]
            entry.update(wall_s=round(timing.get("load_s", 0) + timing.get("encode_s", 0), 2),
                         timing=attrs["timing"], shapes={k: list(v) for k, v in attrs["shapes"].items()},
                         data_fingerprint=attrs["data_fingerprint"], feature_space=attrs["feature_space"],
                         n_skipped=attrs["n_skipped"])
        elif rec.name == "train-head":
            meta, _ = load_checkpoint(rec.path, HEAD_KIND)
            entry.update(wall_s=round(meta["wall_s"], 2), history=meta["history"], best_epoch=meta["best_epoch"],
                         final_val=meta["final_val"], val_score_histogram=meta["val_score_histogram"], head=meta["head"])
        else:
            entry.update(wall_s=rec.seconds)
        st[rec.name] = entry
    example = _example_episode(cfg, results, st)
    return {
        "kind": REPORT_KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_jsonable(cfg),
        "stages": st,
        "results": [
            {k: r[k] for k in ("protocol", "results", "paired_differences", "ci_method", "wall_s", "cache", "head")}
            for r in results
        ],
        "example_episode": example,
        "versions": versions,
    }


def _example_episode(cfg, results: list[dict], stages: dict) -> dict | None:
    """Episode 0 of the first setting, with each query's prediction by the first scorer."""
    from oneshot_bench.cache import load_cache
    from oneshot_bench.episodes import make_pool, sample_episodes
    from oneshot_bench.head import load_head
    from oneshot_bench.scorers import build_scorers

    if not results or results[0]["protocol"] != "episodes":
        return None
    first = results[0]
    cache = load_cache(Path(stages["encode"]["path"]))
    r0 = first["results"][0]
    scorer_name = r0["base_scorer"]
    head = load_head(Path(stages["train-head"]["path"]))[0] if scorer_name == "pair-head" else None
    seen_rows = cache.rows_with_roles(("seen",))
    seen_mean = cache.features[seen_rows].mean(0) if len(seen_rows) else None
    scorer = build_scorers([scorer_name], cache.features, seen_mean, head)[0]
    pool = make_pool(cache, ("unseen",))
    n_query = min(r0["n_query"], 4)
    ep = sample_episodes(pool, np.array([0]), cfg.episode_seed, r0["n_way"], r0["n_shot"], r0["n_query"])
    import torch

    with torch.inference_mode():
        pred = scorer.score(torch.from_numpy(ep.support), torch.from_numpy(ep.query)).argmax(2).numpy()[0]
    classes = [cache.class_names[c] for c in ep.classes[0]]
    queries = []
    for k in range(r0["n_way"]):
        for q in np.flatnonzero(ep.query_label[0] == k)[:n_query]:
            queries.append({"source_id": cache.source_ids[ep.query[0, q]], "true": classes[k], "pred": classes[pred[q]]})
    return {
        "scorer": scorer_name,
        "classes": classes,
        "supports": [[cache.source_ids[r] for r in row] for row in ep.support[0]],
        "queries": queries,
    }


def write_report(report: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    render_files(report, out_dir)


def load_report(run_dir: Path) -> dict:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise OneShotBenchError(f"{path} does not exist; is {run_dir} a run directory?")
    try:
        report = json.loads(path.read_text())
    except ValueError as exc:
        raise OneShotBenchError(f"{path} is not valid JSON ({exc})") from None
    missing = [k for k in REPORT_KEYS if k not in report]
    if report.get("kind") != REPORT_KIND or missing:
        raise OneShotBenchError(f"{path} is not an oneshot-bench report (missing {', '.join(missing) or 'kind'})")
    return report


def render(run_dir: Path) -> list[Path]:
    """Redraw report.md and the plots of a run directory from its report.json."""
    report = load_report(run_dir)
    return render_files(report, Path(run_dir))


def render_files(report: dict, out_dir: Path) -> list[Path]:
    written = [out_dir / "report.md"]
    (out_dir / "report.md").write_text(markdown(report))
    written.append(_plot_accuracy(report, out_dir / PLOTS[0]))
    written.append(_plot_training(report, out_dir / PLOTS[1]))
    written.append(_plot_scores(report, out_dir / PLOTS[2]))
    grid = _plot_examples(report, out_dir / PLOTS[3])
    if grid is not None:
        written.append(grid)
    return written


# --- Markdown ---------------------------------------------------------------------------


def results_rows(report: dict) -> list[dict]:
    rows = []
    for block in report["results"]:
        for r in block["results"]:
            rows.append({"protocol": block["protocol"], **r})
    return rows


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# oneshot-bench report", "", f"Created {report['created']}. Data `{cfg['data']['dataset']}`, split `{cfg['split']['split']}`"
             f" (seed {cfg['split']['seed']}), weights `{cfg['trunk']['weights']}`.", "",
             "## Accuracy (%, mean ± 95% CI over episodes)", "",
             "| protocol | K-way | N-shot | queries/class | scorer | accuracy | episodes | recall | time (s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results_rows(report):
        rec = "" if r.get("recall") is None else f"{100 * r['recall']:.1f}%"
        lines.append(f"| {r['protocol']} | {r['n_way']} | {r['n_shot']} | {r['n_query']} | {r['scorer']} | "
                     f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {r['n_episodes']} | {rec} | {r['wall_s']:.2f} |")
    lines += ["", "CI: 1.96 × population std (ddof=0) / √episodes of the per-episode accuracies.", "",
              "## Paired differences (same episodes)", "", "| setting | a − b | difference (points) | significant |", "|---|---|---:|---|"]
    for block in report["results"]:
        r0 = block["results"][0]
        setting = f"{block['protocol']} {r0['n_way']}w{r0['n_shot']}s"
        for d in block["paired_differences"]:
            lines.append(f"| {setting} | {d['a']} − {d['b']} | {100 * d['mean_difference']:+.2f} ± {100 * d['ci95']:.2f} | {'yes' if d['significant'] else 'no'} |")
    lines += ["", "## Stages", "", "| stage | reused | wall time when run (s) |", "|---|---|---:|"]
    for name, st in report["stages"].items():
        wall = st.get("train_wall_s", st.get("wall_s", 0))
        lines.append(f"| {name} | {'yes' if st['reused'] else 'no'} | {wall:.1f} |")
    head = report["stages"].get("train-head", {})
    if head.get("final_val"):
        fv = head["final_val"]
        lines += ["", f"Head validation (seen classes' held-out images): loss {fv['loss']:.4f}, accuracy {fv['accuracy']:.3f}, ROC AUC {fv['auc']:.3f}."]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in PLOTS), ""]
    return "\n".join(lines)


# --- plots (matplotlib's object API: no global backend switch) ------------------------------


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _plot_accuracy(report: dict, path: Path) -> Path:
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    rows = [r for r in results_rows(report) if r["protocol"] == "episodes"]
    base = lambda r: r.get("base_scorer", r["scorer"])  # pair-head[m=..] joins pair-head's line
    for scorer in dict.fromkeys(base(r) for r in rows):
        for shot in sorted({r["n_shot"] for r in rows}):
            pts = sorted((r["n_way"], r["accuracy"], r["ci95"]) for r in rows if base(r) == scorer and r["n_shot"] == shot)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, 100 * np.array(y), yerr=100 * np.array(e), marker="o", capsize=3, label=f"{scorer}, {shot}-shot")
    ax.set_xlabel("K-way")
    ax.set_ylabel("accuracy (%) ± 95% CI")
    ax.set_title("Accuracy against K")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def _plot_training(report: dict, path: Path) -> Path:
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for ax, stage, title in ((axes[0], "finetune", "finetune"), (axes[1], "train-head", "pair head")):
        hist = report["stages"].get(stage, {}).get("history", [])
        ax.set_title(title + ("" if hist else " (not run)"))
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], marker=".", label="train loss")
        if "val_loss" in hist[0]:
            ax.plot(ep, [h["val_loss"] for h in hist], marker=".", label="val loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        for key, style in (("val_accuracy", "--"), ("val_episode_accuracy", ":")):
            if key in hist[0]:
                ax2.plot(ep, [h[key] for h in hist], style, color="black", label=key)
        ax2.set_ylabel("validation accuracy")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.savefig(path)
    return path


def _plot_scores(report: dict, path: Path) -> Path:
    fig = _figure(6, 4)
    ax = fig.subplots()
    hist = report["stages"].get("train-head", {}).get("val_score_histogram") or {}
    if hist:
        edges = np.array(hist["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(centers, hist["same"], width=width, alpha=0.6, label="same class")
        ax.bar(centers, hist["different"], width=width, alpha=0.6, label="different class")
        ax.legend()
    ax.set_xlabel("head's same-class probability")
    ax.set_ylabel("validation pairs")
    ax.set_title("Pair head scores on validation pairs")
    fig.savefig(path)
    return path


def _plot_examples(report: dict, path: Path) -> Path | None:
    """Supports beside their queries; queries framed green when right, red when wrong."""
    ex = report.get("example_episode")
    if not ex:
        return None
    from oneshot_bench.data import DataConfig, open_source

    d = report["config"]["data"]
    try:
        index = open_source(DataConfig(dataset=d["dataset"], data_root=Path(d["data_root"])))
    except OneShotBenchError as exc:
        log.warning("example-episode plot skipped: %s", exc)
        return None
    row_of = {s: i for i, s in enumerate(index.source_ids.tolist())}
    size = report["stages"]["encode"]["feature_space"]["image_size"]
    n_way = len(ex["classes"])
    per_class = max(1, max(sum(q["true"] == c for q in ex["queries"]) for c in ex["classes"]))
    n_shot = len(ex["supports"][0])
    fig = _figure(1.3 * (n_shot + per_class), 1.4 * n_way)
    axes = np.atleast_2d(fig.subplots(n_way, n_shot + per_class, squeeze=False))

    def show(ax, sid, color=None, title=None):
        img = index._decode(np.array([row_of[sid]]), max(size, 32))[0][0]
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        if color:
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4)
        if title:
            ax.set_title(title, fontsize=6)

    for k, cls in enumerate(ex["classes"]):
        for s, sid in enumerate(ex["supports"][k]):
            show(axes[k, s], sid, title=f"support: {cls}"[:28])
        qs = [q for q in ex["queries"] if q["true"] == cls]
        for j in range(per_class):
            ax = axes[k, n_shot + j]
            if j < len(qs):
                right = qs[j]["pred"] == cls
                show(ax, qs[j]["source_id"], "green" if right else "red", None if right else f"→ {qs[j]['pred']}"[:28])
            else:
                ax.axis("off")
    fig.suptitle(f"Episode 0 ({ex['scorer']}): supports left, queries right (green right, red wrong)", fontsize=8)
    fig.savefig(path)
    return path
