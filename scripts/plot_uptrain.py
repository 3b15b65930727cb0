#!/usr/bin/env python3
"""SVG of an uptraining run's per-loop losses: `python3 scripts/plot_uptrain.py RUN_DIR OUT.svg`.

Plots, against tokens seen, every loop's KL from the teacher (training batches, moving average
of 10 steps; log scale) and marks the held-out evaluations' last-loop perplexity. Plain SVG, no
plotting library.
"""
import json
import math
import sys

run, out = sys.argv[1], sys.argv[2]
log = [json.loads(x) for x in open(f"{run}/log.jsonl")]
steps = [x for x in log if not x.get("eval")]
evals = [x for x in log if x.get("eval")]
loops = len(steps[0]["kl_teacher"])
W, H, L, R, T, B = 720, 400, 70, 20, 40, 50
xmax = steps[-1]["tokens"]
series = []
for b in range(loops):
    ys = [s["kl_teacher"][b] for s in steps]
    sm = [sum(ys[max(0, i - 9): i + 1]) / len(ys[max(0, i - 9): i + 1]) for i in range(len(ys))]
    series.append(sm)
lo = min(min(s) for s in series) * 0.8
hi = max(max(s) for s in series) * 1.2
X = lambda t: L + (W - L - R) * t / xmax
Y = lambda v: T + (H - T - B) * (1 - (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)))
colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">KL(teacher || loop b) per training batch (10-step mean)</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
       f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">tokens seen</text>']
for k in range(6):
    t = xmax * k / 5
    svg.append(f'<text x="{X(t):.1f}" y="{H - B + 16}" text-anchor="middle">{int(t):,}</text>')
v = 10 ** math.floor(math.log10(lo))
while v <= hi:
    for m in (1, 2, 5):
        if lo <= v * m <= hi:
            svg.append(f'<line x1="{L - 4}" y1="{Y(v * m):.1f}" x2="{W - R}" y2="{Y(v * m):.1f}" stroke="#ddd"/>')
            svg.append(f'<text x="{L - 6}" y="{Y(v * m) + 4:.1f}" text-anchor="end">{v * m:g}</text>')
    v *= 10
for b, sm in enumerate(series):
    pts = " ".join(f"{X(s['tokens']):.1f},{Y(y):.1f}" for s, y in zip(steps, sm))
    svg.append(f'<polyline fill="none" stroke="{colors[b % 4]}" stroke-width="1.5" points="{pts}"/>')
    svg.append(f'<text x="{W - R - 150}" y="{T + 16 + 16 * b}" fill="{colors[b % 4]}">loop {b + 1}{" (last)" if b == loops - 1 else ""}</text>')
for e in evals:
    x = min(max(X(e["step"] * steps[0]["tokens"]), L + 30), W - R - 30)
    svg.append(f'<text x="{x:.1f}" y="{H - B - 8}" text-anchor="middle" fill="#555">ppl {e["ppl"][-1]:.0f}</text>')
svg.append(f'<text x="{L + 8}" y="{H - B - 26}" fill="#555">held-out perplexity of the last loop at each evaluation:</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg))
print(f"wrote {out}")
