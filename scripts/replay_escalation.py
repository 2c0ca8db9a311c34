"""Replay escalation settings (min_gain x direct_gain) leave-one-out over the knowledge base's calibration.

Each calibration item is decided with the other items as calibration: first member = the small member with
the best kNN quality, then Plan's direct and escalation rules. Prints quality and latency against the larger
member alone, from the latencies measured by `calm profile`. Needs `calm profile` run on all four models.
It ignores the cost terms of the routing score and cold loads: a guide for choosing gains, not a benchmark.
"""
import itertools
import sqlite3
import sys
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calm_cli.knowledge import default_path, open_knowledge
from calm_cli.loop.plan import calibrated_correctness, knn_quality

SMALL = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
BIG = "qwen2.5-coder-1.5b"
kb = open_knowledge(default_path())
cs = kb.calibration(SMALL + [BIG])
lat = {}
conn = sqlite3.connect(default_path())
idx = {(t, i): n for n, (t, i, d) in enumerate(cs.items)}
for m in SMALL + [BIG]:
    a = np.full(len(cs.items), np.nan)
    for t, i, l in conn.execute("SELECT task, item_id, latency_ms FROM calibration WHERE model=?", (m,)):
        a[idx[(t, i)]] = l
    lat[m] = a
ok = np.all([~np.isnan(cs.scores[m]) for m in SMALL + [BIG]], axis=0)
print("items with all four:", ok.sum(), "of", len(cs.items))
E = cs.embeddings
rows = np.where(ok)[0]
base_q, base_l = cs.scores[BIG][rows].mean(), lat[BIG][rows].sum()
print(f"baseline quality {base_q:.3f}, latency {base_l / 1000:.0f}s")
for m in SMALL:
    print(f"  {m} alone: q {cs.scores[m][rows].mean() / base_q:.0%}  lat {lat[m][rows].sum() / base_l - 1:+.0%}")
ALL = SMALL + [BIG]
oracle = [min([m for m in ALL if cs.scores[m][i] >= 1] or [BIG], key=lambda m: lat[m][i]) for i in rows]
oracle_q = np.mean([max(cs.scores[m][i] for m in ALL) for i in rows]) / base_q
oracle_l = sum(lat[m][i] for m, i in zip(oracle, rows)) / base_l - 1
print(f"  oracle: q {oracle_q:.0%} lat {oracle_l:+.0%}")


def replay(min_gain: float, direct_gain: float | None) -> tuple[float, float, float, float]:
    """(quality vs baseline, latency change, escalated share, direct share) over the calibration items."""
    q = latency = 0.0
    escalated = direct = 0
    for i in rows:
        keep = np.ones(len(cs.items), bool)
        keep[i] = False
        e, v = E[keep], E[i]
        quals = {m: knn_quality(v, e, cs.scores[m][keep]) for m in SMALL}
        first = max(SMALL, key=lambda m: quals[m])
        big = knn_quality(v, e, cs.scores[BIG][keep])
        if direct_gain is not None and big - quals[first] >= direct_gain:  # Planner.direct's rule
            q, latency, direct = q + cs.scores[BIG][i], latency + lat[BIG][i], direct + 1
            continue
        latency += lat[first][i]
        p = calibrated_correctness(v, e, cs.scores[first][keep], cs.confidence[first][keep],
                                   cs.confidence[first][i])
        if big - p >= min_gain:  # Planner.escalation's rule
            q, latency, escalated = q + cs.scores[BIG][i], latency + lat[BIG][i], escalated + 1
        else:
            q += cs.scores[first][i]
    n = len(rows)
    return q / n / base_q, latency / base_l - 1, escalated / n, direct / n


for mg, dg in itertools.product([-0.1, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4], [None, 0.15, 0.25, 0.35, 0.5]):
    qq, ll, e, d = replay(mg, dg)
    print(f"min_gain {mg:5} direct {str(dg):5}: quality {qq:5.0%} latency {ll:+5.0%} "
          f"escalated {e:4.0%} direct {d:4.0%}")
