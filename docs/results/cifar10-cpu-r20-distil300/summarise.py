"""Print the probe's per-seed and mean ± sd figures from the copied metrics.json files (run from this folder)."""
import json
import statistics
from pathlib import Path

here = Path(__file__).resolve().parent
rows = [json.loads(p.read_text()) for p in sorted(here.glob("fit-distil300-seed*.json"))]
for key in ("reconstructed_top1", "agreement", "kl_to_original", "wall_seconds"):
    values = [r[key] for r in rows]
    print(f"{key}: per seed {[round(v, 4) for v in values]}; mean {statistics.mean(values):.4f} "
          f"± {statistics.stdev(values):.4f} (n={len(values)})")
print(f"original_top1: {sorted({r['original_top1'] for r in rows})}")
print(f"delta top-1 mean: {statistics.mean(r['reconstructed_top1'] - r['original_top1'] for r in rows):.2f}")
