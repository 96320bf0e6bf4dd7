#!/usr/bin/env python3
"""SVG charts from the RESULT lines of a `bench/run.sh` run (standard library only).

    bench/charts.py RESULTS.txt OUT_DIR

Writes, for what the results hold:
  throughput-<backend>.svg  ops/s against connections per scenario: the server over HTTP, the
                            store in process, and pgbench on the store's SQL (Postgres)
  latency-<backend>.svg     p50 and p99 against connections per scenario, server and pgbench
  growth.svg                consume p50 and p99 against seeded users (`bench/run.sh growth`)
"""

import math
import os
import re
import sys
from collections import defaultdict

WIDTH, HEIGHT = 300, 220  # one panel
MARGIN = dict(left=58, right=12, top=30, bottom=40)
COLOURS = {"server": "#1f77b4", "in process": "#2ca02c", "pgbench": "#d62728",
           "p50": "#1f77b4", "p99": "#ff7f0e", "pgbench p50": "#d62728",
           "pgbench p99": "#9467bd"}
SCENARIOS = ["consume", "upload", "mixed", "status"]


def parse(path):
    """RESULT lines as dicts of their key=value fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("RESULT "):
                rows.append(dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv))
    return rows


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values covering lo..hi."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [start]
    while ticks[-1] < hi - step * 0.001:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def fmt(v):
    if v >= 1_000_000:
        return f"{v / 1_000_000:g}M"
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def panel(x0, y0, title, series, xlabel, ylabel, log_x=True):
    """SVG elements of one chart at (x0, y0): `series` maps a name to [(x, y)]."""
    out = []
    pts = [p for s in series.values() for p in s]
    if not pts:
        return out
    xs = sorted({p[0] for p in pts})
    ymax = max(p[1] for p in pts) * 1.1 or 1
    yticks = nice_ticks(0, ymax)
    ymax = yticks[-1]
    pw = WIDTH - MARGIN["left"] - MARGIN["right"]
    ph = HEIGHT - MARGIN["top"] - MARGIN["bottom"]
    left, top = x0 + MARGIN["left"], y0 + MARGIN["top"]

    def fx(x):
        if len(xs) == 1:
            return left + pw / 2
        if log_x:
            a, b = math.log(xs[0]), math.log(xs[-1])
            return left + (math.log(x) - a) / (b - a) * pw
        return left + (x - xs[0]) / (xs[-1] - xs[0]) * pw

    def fy(y):
        return top + ph - y / ymax * ph

    out.append(f'<text x="{left + pw / 2}" y="{y0 + 18}" text-anchor="middle" '
               f'font-weight="bold">{title}</text>')
    for t in yticks:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{fy(t):.1f}" y2="{fy(t):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{fy(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    for x in xs:
        out.append(f'<text x="{fx(x):.1f}" y="{top + ph + 14}" text-anchor="middle">{fmt(x)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 30}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text transform="translate({x0 + 12},{top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{ylabel}</text>')
    for name, s in series.items():
        s = sorted(s)
        colour = COLOURS.get(name, "#555")
        path = " ".join(f"{'M' if i == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for i, (x, y) in enumerate(s))
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in s:
            out.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{colour}">'
                       f'<title>{name}: {y:g} at {fmt(x)}</title></circle>')
    return out


def legend(names, y):
    out, x = [], 10
    for name in names:
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{COLOURS.get(name, "#555")}"/>')
        out.append(f'<text x="{x + 16}" y="{y}">{name}</text>')
        x += 24 + 7 * len(name)
    return out


def write(path, panels, names):
    cols = min(len(panels), 2)
    rows = (len(panels) + cols - 1) // cols
    w, h = WIDTH * cols, HEIGHT * rows + 24
    body = []
    for i, (title, series, xlabel, ylabel, log_x) in enumerate(panels):
        body += panel(WIDTH * (i % cols), HEIGHT * (i // cols), title, series, xlabel, ylabel, log_x)
    body += legend(names, h - 8)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">'
           f'<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg)
    print(f"wrote {path}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows, out_dir = parse(sys.argv[1]), sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    for backend in ("postgres", "sqlite"):
        through, latency = [], []
        names, lat_names = set(), set()
        for scenario in SCENARIOS:
            series, lat = defaultdict(list), defaultdict(list)
            for r in rows:
                if r.get("scenario") != scenario:
                    continue
                conns = int(r["conns"])
                label = r["label"]
                source = {backend: "server", f"{backend}-ceiling": "in process",
                          f"{backend}-pgbench": "pgbench"}.get(label)
                if source is None:
                    continue
                if r["op"] == "all":
                    series[source].append((conns, float(r["rps"])))
                if source == "pgbench" and "p50_ms" in r:
                    lat["pgbench p50"].append((conns, float(r["p50_ms"])))
                    lat["pgbench p99"].append((conns, float(r["p99_ms"])))
                if source == "server" and r["op"] not in ("all",) and r["op"] in (scenario, "consume"):
                    lat["p50"].append((conns, float(r["p50_ms"])))
                    lat["p99"].append((conns, float(r["p99_ms"])))
            if series:
                through.append((scenario, dict(series), "connections", "ops/s", True))
                names |= set(series)
            if lat:
                latency.append((scenario, dict(lat), "connections", "ms", True))
                lat_names |= set(lat)
        order = list(COLOURS)
        if through:
            write(os.path.join(out_dir, f"throughput-{backend}.svg"), through,
                  [n for n in order if n in names])
        if latency:
            write(os.path.join(out_dir, f"latency-{backend}.svg"), latency,
                  [n for n in order if n in lat_names])
    growth = defaultdict(list)
    for r in rows:
        m = re.fullmatch(r"growth-(\d+)", r.get("label", ""))
        if m and r.get("op") == "consume":
            growth["p50"].append((int(m.group(1)), float(r["p50_ms"])))
            growth["p99"].append((int(m.group(1)), float(r["p99_ms"])))
    if growth:
        write(os.path.join(out_dir, "growth.svg"),
              [("consume latency against data", dict(growth), "users (x10 packages)", "ms", True)],
              ["p50", "p99"])


if __name__ == "__main__":
    main()
