"""Mean and sd over the seeds' fits of one point, with nern.tables' own aggregation (fit_values, seed_values)."""
import json, sys
from pathlib import Path
from nern.tables import fit_values, run_metrics, seed_values

dirs = sys.argv[1:]
per_seed = [fit_values(run_metrics(d)) for d in dirs]
for d, v in zip(dirs, per_seed):
    print(f"{d}: original {v['original_top1']:.2f}, top-1 {v['reconstructed_top1']:.2f} "
          f"(Δ {v['reconstructed_top1'] - v['original_top1']:+.2f}), agreement {v['agreement']:.2f}%, "
          f"KL {v['kl_to_original']:.4f}")
agg = seed_values(per_seed)
deltas = [v["reconstructed_top1"] - v["original_top1"] for v in per_seed]
import statistics
print(f"mean over {agg['seeds']} seeds: top-1 {agg['reconstructed_top1']:.2f} ± {agg['reconstructed_top1_sd']:.2f}, "
      f"Δ {statistics.fmean(deltas):+.2f} ± {statistics.stdev(deltas):.2f}, agreement {agg['agreement']:.2f} ± "
      f"{agg['agreement_sd']:.2f}%, KL {agg['kl_to_original']:.4f} ± {agg['kl_to_original_sd']:.4f}")
print(json.dumps(agg))
