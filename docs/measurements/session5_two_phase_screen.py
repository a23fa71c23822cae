"""Throwaway screen of session 5 (kept as the record of docs/measurements/cpu_screen_reconstruct_first_r20_session5.log).
The library now does this in one fit: rec_only_iterations + optim.rec_only_lr (config/presets/fast.yaml).
Paths are those of the development machine."""
import sys, time, json, os, argparse
sys.path.insert(0, "/work/main")
import torch
from pathlib import Path
from nern.config import FitConfig, load_config
from nern.fit import Fitter, prepare

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--R", type=int, default=2000)
ap.add_argument("--rlr", type=float, default=2e-2)
ap.add_argument("--N", type=int, default=400)
ap.add_argument("--every", type=int, default=100)
ap.add_argument("--hidden", type=int, default=180)
ap.add_argument("--limit", type=int, default=2000)
ap.add_argument("--set", action="append", default=[])
a = ap.parse_args()
torch.set_num_threads(a.threads)
base = ["model.checkpoint=/work/shared/data/pretrained/resnet20-12fca82f.th", "data.name=imagefolder",
        "data.root=/work/shared/data/cifar10-jpeg", "data.val_size=5000", f"data.eval_limit={a.limit}", "device=cpu",
        "progress=false", "eval_every=0", "checkpoint_every=0", f"predictor.hidden={a.hidden}", "epochs=null", "compile=true"]
preset = Path("/work/main/config/presets/fast.yaml")
cache = Path(f"/work/exp/s5/p1_h{a.hidden}_R{a.R}_lr{a.rlr}.pt")
cfg1 = load_config(FitConfig, preset, base + [f"iterations={a.R}", "loss.kd=0", "loss.fmd=0", f"optim.lr={a.rlr}"])
setup = prepare(cfg1, permutation="/work/r20/crossfilter.safetensors")
if cache.exists():
    state = torch.load(cache)
else:
    f1 = Fitter(cfg1, setup, Path(f"/tmp/p1_{os.getpid()}"))
    t = time.perf_counter()
    while f1.iteration < a.R:
        f1.step()
    e = f1.evaluate()
    print(f"phase1 R={a.R} lr={a.rlr} {time.perf_counter()-t:.0f}s {e}", flush=True)
    state = f1.predictor.state_dict(); torch.save(state, cache)
cfg2 = load_config(FitConfig, preset, base + [f"iterations={a.N}"] + a.set)
f2 = Fitter(cfg2, setup, Path(f"/tmp/p2_{os.getpid()}"))
f2.predictor.load_state_dict(state)
e = f2.evaluate(); print(f"start {e}", flush=True)
t = time.perf_counter(); acc = []
while f2.iteration < a.N:
    l = f2.step(); acc.append(l)
    if f2.iteration % a.every == 0:
        dt = time.perf_counter() - t
        e = f2.evaluate()
        m = {k: sum(x[k] for x in acc) / len(acc) for k in ("rec", "kd", "fmd", "grad_norm")}; acc = []
        print(f"it {f2.iteration} {a.set} rec {m['rec']:.3f} kd {m['kd']:.3f} fmd {m['fmd']:.2f} gn {m['grad_norm']:.1f} s/it {dt/a.every:.2f} val {e.get('val_top1'):.2f} test {e['test_top1']:.2f}", flush=True)
        t = time.perf_counter()
