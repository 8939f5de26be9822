"""How flat each run's validation-loss curve is at its end (issue #13: "long enough that the
validation loss curve has flattened"), from the runs' ``metrics.jsonl``.

    python results/reproduce/flatness.py runs/reproduce/fig5-cpu [--against adamw-router] [--out FILE]

Per variant (mean over the seed runs ``runs/<variant>/seed*``): the final validation loss, its
drop over the last quarter of the evaluations' steps and over the last evaluation interval.
With ``--against V``: every other variant's gap to V (mean over seeds, V's mean subtracted) at
a quarter, half, three quarters and the end of the run: whether the orderings are still moving
while the losses fall. With ``--shorter ROOT2`` (the same grid at a shorter horizon, e.g. half
the steps): per variant the final loss at both horizons and what the longer run gained (Welch
p over the seeds), and with ``--against`` the gaps to V at both horizons: a curve that has
flattened gains little from more steps, and gaps that hold across horizons are not an
artefact of the horizon. Reads files only (no training; the p-values: equiopt.train.stats).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from equiopt.train.stats import welch_p


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation record of one run, in step order."""
    points = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("val_loss") is not None:
            points[rec["step"]] = rec["val_loss"]  # a resumed run may repeat a step: the last wins
    return sorted(points.items())


def at_or_before(points: list[tuple[int, float]], step: float) -> float:
    return [v for s, v in points if s <= step][-1]


def flatness(points: list[tuple[int, float]]) -> dict[str, float]:
    last_step, last = points[-1]
    return {
        "final": last,
        "drop_last_quarter": at_or_before(points, 0.75 * last_step) - last,
        "drop_last_interval": points[-2][1] - last,
        "steps": last_step,
        "interval": last_step - points[-2][0],
    }


def _finished(run: Path) -> bool:
    final = run / "final.json"
    return final.exists() and json.loads(final.read_text()).get("status") == "done"


def variant_runs(root: Path) -> dict[str, list[Path]]:
    """{variant: its finished seed runs} under ``root/runs`` (a grid still running: the runs so far)."""
    out = {}
    for vdir in sorted(p for p in (root / "runs").iterdir() if p.is_dir()):
        runs = sorted(r for r in vdir.glob("seed*") if _finished(r))
        if runs:
            out[vdir.name.replace("__", "/")] = runs
    return out


def gap_table(root: Path, against: str) -> str:
    """Mean validation-loss gap of every variant to ``against`` at 25/50/75/100% of the steps."""
    runs = variant_runs(root)
    if against not in runs:
        raise SystemExit(f"--against {against!r}: no such variant under {root}/runs ({', '.join(runs)})")
    curves = {v: [curve(r) for r in rs] for v, rs in runs.items()}
    last = curves[against][0][-1][0]
    fractions = (0.25, 0.5, 0.75, 1.0)

    def mean_at(v: str, step: float) -> float:
        return statistics.fmean(at_or_before(c, step) for c in curves[v])

    rows = [
        f"| variant minus {against} | " + " | ".join(f"step {round(f * last)}" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    ref = [mean_at(against, f * last) for f in fractions]
    for v in curves:
        if v != against:
            gaps = [mean_at(v, f * last) - r for f, r in zip(fractions, ref)]
            rows.append(f"| {v} | " + " | ".join(f"{g:+.4f}" for g in gaps) + " |")
    return "\n".join(rows) + "\n"


def finals(root: Path) -> dict[str, list[float]]:
    """{variant: the final validation loss of each seed run}."""
    return {v: [curve(r)[-1][1] for r in rs] for v, rs in variant_runs(root).items()}


def welch(a: list[float], b: list[float]) -> str:
    """Welch's t-test p-value of two seed samples, formatted ("-" with fewer than two each)."""
    p = welch_p(a, b)
    return "-" if p is None else f"{p:.2g}"


def horizon_table(root: Path, shorter: Path, against: str | None) -> str:
    """The final losses of the variants present at both horizons, the gain of the longer runs,
    and (``against``) every variant's gap to ``against`` at both horizons, with Welch p."""
    long_, short = finals(root), finals(shorter)
    steps = {r: curve(next(iter(variant_runs(r).values()))[0])[-1][0] for r in (root, shorter)}
    both = [v for v in long_ if v in short]
    rows = [
        f"| variant | final, {steps[shorter]} steps | final, {steps[root]} steps | gain of the longer run | p |",
        "|---|---|---|---|---|",
    ]
    for v in both:
        a, b = statistics.fmean(short[v]), statistics.fmean(long_[v])
        rows.append(
            f"| {v} | {a:.4f} (n {len(short[v])}) | {b:.4f} (n {len(long_[v])}) | {a - b:+.4f} | "
            f"{welch(short[v], long_[v])} |"
        )
    if against is None or against not in both:
        return "\n".join(rows) + "\n"
    rows += ["", f"| variant minus {against} | at {steps[shorter]} steps | p | at {steps[root]} steps | p |"]
    rows.append("|---|---|---|---|---|")
    for v in both:
        if v != against:
            gaps = [statistics.fmean(f[v]) - statistics.fmean(f[against]) for f in (short, long_)]
            ps = [welch(f[v], f[against]) for f in (short, long_)]
            rows.append(f"| {v} | {gaps[0]:+.4f} | {ps[0]} | {gaps[1]:+.4f} | {ps[1]} |")
    return "\n".join(rows) + "\n"


def table(root: Path) -> str:
    rows = [
        "| variant | seeds | steps | final val loss | drop over the last 25% of steps | drop over the last interval |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in variant_runs(root).items():
        fs = [flatness(curve(r)) for r in runs]
        mean = {k: statistics.fmean(f[k] for f in fs) for k in fs[0]}
        rows.append(
            f"| {name} | {len(fs)} | {fs[0]['steps']} | {mean['final']:.4f} | "
            f"{mean['drop_last_quarter']:.4f} | {mean['drop_last_interval']:.4f} (last {fs[0]['interval']} steps) |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a reproduce output directory (holds runs/<variant>/seed*)")
    ap.add_argument("--against", help="also tabulate every variant's gap to this one along the run")
    ap.add_argument("--shorter", type=Path, help="the same grid at a shorter horizon: the gain of the longer runs")
    ap.add_argument("--out", type=Path, help="also write the table here (refuses to overwrite)")
    args = ap.parse_args()
    text = table(args.root)
    if args.against:
        text += "\n" + gap_table(args.root, args.against)
    if args.shorter is not None:
        text += "\n" + horizon_table(args.root, args.shorter, args.against)
    print(text, end="")
    if args.out is not None:
        if args.out.exists():
            raise SystemExit(f"--out {args.out} exists; remove it or choose another path")
        args.out.write_text(text)


if __name__ == "__main__":
    main()
