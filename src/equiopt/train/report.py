"""Comparison report: summary.md / summary.csv / summary.json and PNG plots from run directories.

Per (architecture, optimizer): mean +- sample std over seeds of the final validation loss and
of the key vocabulary-logit and routing metrics at the final evaluation, and the Welch
t-test p-value (``scipy.stats.ttest_ind(equal_var=False)``) of the paper stack against each
baseline. Diverged runs are counted and listed, not averaged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from .loop import read_metrics
from .stats import welch_p

REFERENCE = "paper"
# (column label, path in the final metrics record, MoE only)
KEY_METRICS = [
    ("val_loss", ("val_loss",), False),
    ("train_loss", ("train_loss",), False),
    ("logit_max_abs", ("logits", "max_abs"), False),
    ("logit_centered_rms", ("logits", "centered_rms"), False),
    ("logit_lse_mean", ("logits", "lse_mean"), False),
    ("logit_entropy", ("logits", "entropy"), False),
    ("loss_spikes", ("loss_spikes",), False),
    ("grad_norm_max", ("grad_norm_max",), False),
    ("router_load_balance_loss", ("routing", "load_balance_loss"), True),
    ("router_load_cv", ("routing", "load_cv"), True),
    ("router_load_entropy", ("routing", "load_entropy"), True),
    ("router_dead_frac", ("routing", "dead_frac"), True),
    ("router_top_load", ("routing", "top_load"), True),
    ("router_token_entropy", ("routing", "token_entropy"), True),
    ("router_z_loss", ("routing", "z_loss"), True),
    ("router_logit_rms", ("routing", "logit_rms"), True),
    ("router_logit_max", ("routing", "logit_max"), True),
]
TABLE_COLUMNS = [
    "val_loss",
    "logit_max_abs",
    "logit_centered_rms",
    "router_load_cv",
    "router_z_loss",
    "router_dead_frac",
    "router_logit_max",
]


def _get(rec: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(rec, dict) or rec.get(k) is None:
            return None
        rec = rec[k]
    return rec


def collect(run_dirs: list[Path]) -> list[dict]:
    """One record per run: arch, optimizer, seed, status, final metrics, curves."""
    runs = []
    for d in run_dirs:
        final_p = Path(d) / "final.json"
        if not final_p.exists():
            continue
        final = json.loads(final_p.read_text())
        cfg = final["config"]
        evals = [r for r in read_metrics(d) if "event" not in r]
        runs.append(
            {
                "dir": str(d),
                "arch": cfg["arch"],
                "optimizer": cfg.get("variant") or cfg["optimizer"],  # a recipe's variant name, if any
                "seed": cfg["seed"],
                "lr_scale": cfg["lr_scale"],
                "role_lr_scale": cfg.get("role_lr_scale", {}),
                "status": final["status"],
                "final": evals[-1] if evals and final["status"] == "done" else None,
                "curves": evals,
                "message": final.get("message"),
            }
        )
    return runs


def summarize(runs: list[dict], reference: str = REFERENCE) -> dict:
    """{arch: {optimizer: {"n", "diverged", "lr_scale", metric: {"mean","std","n","values","p_vs_paper"}}}};
    ``p_vs_paper`` is the Welch p against ``reference`` (the paper stack, or a recipe's baseline variant)."""
    out: dict = {}
    for r in runs:
        cell = out.setdefault(r["arch"], {}).setdefault(
            r["optimizer"],
            {"n": 0, "diverged": 0, "seeds": [], "lr_scale": r["lr_scale"], "role_lr_scale": r["role_lr_scale"]},
        )
        if r["status"] != "done":
            cell["diverged"] += 1
            continue
        cell["n"] += 1
        cell["seeds"].append(r["seed"])
        for name, path, _ in KEY_METRICS:
            v = _get(r["final"], path)
            if v is not None:
                cell.setdefault(name, {"values": []})["values"].append(float(v))
    for cells in out.values():
        ref = cells.get(reference, {})
        for opt, cell in cells.items():
            for name, _, _ in KEY_METRICS:
                if name not in cell:
                    continue
                vals = cell[name]["values"]
                cell[name]["n"] = len(vals)
                cell[name]["mean"] = float(np.mean(vals))
                cell[name]["std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
                cell[name]["p_vs_paper"] = (
                    None if opt == reference or name not in ref else welch_p(ref[name]["values"], vals)
                )
    return out


def _fmt(cell: dict, name: str) -> str:
    if name not in cell:
        return "-"
    m, s = cell[name]["mean"], cell[name]["std"]
    digits = 3 if abs(m) < 100 else 1
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def _fmt_p(p) -> str:
    return "-" if p is None else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def table_markdown(summary: dict, reference: str = REFERENCE) -> str:
    lines = []
    for arch, cells in summary.items():
        moe = any("router_load_cv" in c for c in cells.values())
        cols = [c for c in TABLE_COLUMNS if moe or not c.startswith("router_")]
        lines.append(f"### {arch}\n")
        head = ["optimizer", "lr_scale", "n", *cols, f"p (val_loss, {reference} vs this)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        order = sorted(cells, key=lambda o: cells[o]["val_loss"]["mean"] if "val_loss" in cells[o] else math.inf)
        for opt in order:
            c = cells[opt]
            n = f"{c['n']}" + (f" (+{c['diverged']} diverged)" if c["diverged"] else "")
            p = c.get("val_loss", {}).get("p_vs_paper")
            lr = f"{c['lr_scale']:g}" + "".join(f", {r}×{v:g}" for r, v in sorted(c["role_lr_scale"].items()))
            lines.append("| " + " | ".join([opt, lr, n] + [_fmt(c, k) for k in cols] + [_fmt_p(p)]) + " |")
        lines.append("")
    return "\n".join(lines)


def ordering(summary: dict, reference: str = REFERENCE) -> list[str]:
    """Per architecture: optimizers by mean final validation loss, best first, with p-values."""
    out = []
    for arch, cells in summary.items():
        ok = {o: c for o, c in cells.items() if "val_loss" in c}
        order = sorted(ok, key=lambda o: ok[o]["val_loss"]["mean"])
        parts = [f"{o} {ok[o]['val_loss']['mean']:.3f}" for o in order]
        sig = []
        for o in order:
            p = ok[o]["val_loss"].get("p_vs_paper")
            if p is not None:
                d = ok[o]["val_loss"]["mean"] - ok[reference]["val_loss"]["mean"] if reference in ok else float("nan")
                sig.append(f"{reference} vs {o}: Δ={-d:+.3f} nats ({reference} minus {o}), p={_fmt_p(p)}")
        out.append(f"- **{arch}**: " + " < ".join(parts) + ("  \n  " + "; ".join(sig) if sig else ""))
    return out


def write_csv(summary: dict, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arch", "optimizer", "metric", "n", "mean", "std", "p_vs_paper", "lr_scale", "diverged"])
    for arch, cells in summary.items():
        for opt, c in cells.items():
            for name, _, _ in KEY_METRICS:
                if name in c:
                    m = c[name]
                    w.writerow(
                        [
                            arch,
                            opt,
                            name,
                            m["n"],
                            repr(m["mean"]),
                            repr(m["std"]),
                            "" if m["p_vs_paper"] is None else repr(m["p_vs_paper"]),
                            c["lr_scale"],
                            c["diverged"],
                        ]
                    )
    path.write_text(buf.getvalue())


def _curves(runs, arch, opt, path):
    """(steps, values [seeds, steps]) of one metric for one (arch, optimizer), finished runs only."""
    series = []
    for r in runs:
        if r["arch"] == arch and r["optimizer"] == opt and r["status"] == "done":
            pts = [(e["step"], _get(e, path)) for e in r["curves"]]
            pts = [(s, v) for s, v in pts if v is not None]
            if pts:
                series.append(pts)
    if not series:
        return None, None
    n = min(len(s) for s in series)
    steps = np.array([p[0] for p in series[0][:n]])
    return steps, np.array([[p[1] for p in s[:n]] for s in series])


def plot(runs: list[dict], summary: dict, out: Path) -> list[Path]:
    import matplotlib  # of the [train] extra; heavy: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    archs = list(summary)

    def panel(fig_name, rows, archs_, title):
        if not archs_:
            return
        fig, axes = plt.subplots(len(rows), len(archs_), figsize=(4.2 * len(archs_), 3.2 * len(rows)), squeeze=False)
        for j, arch in enumerate(archs_):
            for i, (label, path, logy) in enumerate(rows):
                ax = axes[i][j]
                for opt in summary[arch]:
                    steps, vals = _curves(runs, arch, opt, path)
                    if steps is None:
                        continue
                    mean = vals.mean(0)
                    (line,) = ax.plot(steps, mean, label=f"{opt} (n={len(vals)})")
                    if len(vals) > 1:
                        ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
                if logy:
                    ax.set_yscale("log")
                ax.set_title(f"{arch}: {label}", fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(textwrap.fill(title, 55 * len(archs_)), fontsize=10)  # ~55 characters fit a 4.2-inch panel
        fig.tight_layout()
        p = out / fig_name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    panel(
        "val_loss.png",
        [("validation loss", ("val_loss",), False)],
        archs,
        "Validation loss (mean over seeds; band = min..max)",
    )
    moe = [a for a in archs if any("router_load_cv" in c for c in summary[a].values())]
    panel(
        "routing.png",
        [("router load CV", ("routing", "load_cv"), False), ("router z-loss", ("routing", "z_loss"), False)],
        moe,
        "MoE routing, averaged over layers (band = min..max over seeds)",
    )
    panel(
        "max_logit.png",
        [("max |vocab logit|", ("logits", "max_abs"), False)],
        archs,
        "Vocabulary logits: max |logit| on validation (band = min..max over seeds)",
    )
    return written


def write_report(
    run_dirs: list[Path],
    out: Path,
    title: str = "equiopt comparison",
    command: str | None = None,
    notes: list[str] | None = None,
    reference: str = REFERENCE,
    contrasts: list[tuple[str, str]] | None = None,
) -> dict:
    """summary.md/csv/json and plots; ``reference``: the row every p-value is against;
    ``contrasts``: extra (a, b) pairs reported with their difference and Welch p (a recipe's
    block-wise comparisons)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(run_dirs)
    if not runs:
        raise RuntimeError(f"no finished runs under {out}")
    summary = summarize(runs, reference)
    table = table_markdown(summary, reference)
    md = [f"# {title}\n"]
    if command:
        md.append(f"Command: `{command}`\n")
    md.append(
        "Final evaluation of each run; mean ± sample std over seeds; p = Welch t-test "
        f"(scipy.stats.ttest_ind, equal_var=False) of {'the paper stack' if reference == REFERENCE else reference}'s "
        "final validation loss against each row. Lower validation loss is better. Metric definitions: "
        "design note section 4 / `equiopt.train.metrics`.\n"
    )
    md.append(table)
    md.append("## Ordering by mean final validation loss (best first)\n")
    md += ordering(summary, reference)
    pairs = contrast_table(summary, contrasts or [])
    if pairs:
        md.append("\n## Block-wise contrasts (final validation loss)\n")
        md += pairs
        others = contrast_metrics_table(summary, contrasts or [], [c for c in TABLE_COLUMNS if c != "val_loss"])
        if others:
            md.append("\n## Block-wise contrasts, the other observables (a - b, Welch p)\n")
            md += others
    diverged = [r for r in runs if r["status"] != "done"]
    if diverged:
        md.append("\n## Diverged runs\n")
        md += [f"- {r['arch']}/{r['optimizer']}/seed {r['seed']}: {r['message']}" for r in diverged]
    if notes:
        md.append("\n## Notes\n")
        md += [f"- {n}" for n in notes]
    md.append("\nPlots: `val_loss.png`, `routing.png` (MoE), `max_logit.png`.\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    write_csv(summary, out / "summary.csv")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "runs": [{k: v for k, v in r.items() if k != "curves"} for r in runs],
                "command": command,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    plot(runs, summary, out)
    return {"summary": summary, "table": table, "ordering": ordering(summary, reference), "contrasts": pairs}


def contrast_table(summary: dict, contrasts: list[tuple[str, str]]) -> list[str]:
    """Markdown rows: a, b, mean(a) - mean(b), Welch p, per architecture (pairs with a missing side are skipped)."""
    rows: list[str] = []
    for arch, cells in summary.items():
        for a, b in contrasts:
            ca, cb = cells.get(a, {}).get("val_loss"), cells.get(b, {}).get("val_loss")
            if ca is None or cb is None:
                continue
            if not rows:
                rows += ["| arch | a | b | a - b (nats) | p (Welch) | n (a, b) |", "|---|---|---|---|---|---|"]
            p = welch_p(ca["values"], cb["values"])
            rows.append(f"| {arch} | {a} | {b} | {ca['mean'] - cb['mean']:+.4f} | {_fmt_p(p)} | {ca['n']}, {cb['n']} |")
    return rows


def contrast_metrics_table(summary: dict, contrasts: list[tuple[str, str]], metrics: list[str]) -> list[str]:
    """Markdown rows: per architecture and pair (a, b), ``mean(a) - mean(b)`` and its Welch p
    for each of ``metrics`` that both sides recorded (a metric no pair has is left out)."""
    found = [
        (arch, a, b, cells[a], cells[b])
        for arch, cells in summary.items()
        for a, b in contrasts
        if a in cells and b in cells
    ]
    cols = [m for m in metrics if any(ca.get(m) and cb.get(m) for _, _, _, ca, cb in found)]
    if not found or not cols:
        return []
    rows = ["| arch | a | b | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for arch, a, b, ca, cb in found:
        cells = []
        for m in cols:
            ma, mb = ca.get(m), cb.get(m)
            ok = ma is not None and mb is not None
            cells.append(
                f"{ma['mean'] - mb['mean']:+.3f} (p {_fmt_p(welch_p(ma['values'], mb['values']))})" if ok else "-"
            )
        rows.append(f"| {arch} | {a} | {b} | " + " | ".join(cells) + " |")
    return rows
