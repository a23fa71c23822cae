"""fp32 against bf16 fits of one point: mean ± sd over seeds with nern.tables' own aggregation, and wall seconds.

    python docs/results/cifar10-cpu-r20-bf16/summarise.py   # from the repository root
"""
import json
import statistics
from pathlib import Path

from nern.tables import fit_values, seed_values

HERE = Path(__file__).parent
for side in ("fp32", "bf16"):
    runs = [json.loads(p.read_text()) for p in sorted(HERE.glob(f"fit-{side}-h180-seed*.json"))]
    values = [fit_values(m) for m in runs]
    agg = seed_values(values)
    deltas = [v["reconstructed_top1"] - v["original_top1"] for v in values]
    walls = [m["wall_seconds"] for m in runs]
    print(f"{side}: bf16 ran {[m['bf16'] for m in runs]}; per seed top-1 {[v['reconstructed_top1'] for v in values]}, "
          f"agreement {[round(v['agreement'], 2) for v in values]}, wall s {[round(w, 1) for w in walls]}")
    print(f"{side}: mean over {agg['seeds']} seeds: top-1 {agg['reconstructed_top1']:.2f} ± "
          f"{agg['reconstructed_top1_sd']:.2f}, Δ {statistics.fmean(deltas):+.2f} ± {statistics.stdev(deltas):.2f}, "
          f"agreement {agg['agreement']:.2f} ± {agg['agreement_sd']:.2f}%, KL {agg['kl_to_original']:.4f} ± "
          f"{agg['kl_to_original_sd']:.4f}, wall {statistics.fmean(walls):.1f} ± {statistics.stdev(walls):.1f} s")
