"""Zero-byte BatchNorm statistics matching, measured: does re-aligning each BatchNorm's output statistics of a
NeRN file's rebuilt network with the original's (on unlabelled train images) recover accuracy for free?

    python experiments/codec/scripts/batchnorm_matching.py NERN.nernz ORIGINAL.nernz \
        --data-root ../shared/data/cifar10-jpeg

Both files are `nern compress` outputs (a NeRN file and an original-network file, e.g. its fp16 one). For each
BatchNorm in forward order, the per-channel mean (mode "mean") or mean and std ("meanstd") of its output on the
calibration images is matched to the original's by changing only its affine map (what the file stores anyway,
so it would cost no bytes); later layers see the corrected earlier ones. Prints test top-1 before and after.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from nern import data as D
from nern import network_files as NF
from nern.config import DataConfig
from nern.evaluate import top_k_accuracy


def top1(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, info: D.DatasetInfo) -> float:
    with torch.no_grad():
        return top_k_accuracy(net, D.eval_batches(D.ImageSet(images, labels, info), 1000))["top1"]


def channel_outputs(net: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """[channels, everything else] output of module `name` on `x` (cloned: an in-place activation may follow)."""
    seen: dict[str, torch.Tensor] = {}
    module = dict(net.named_modules())[name]
    hook = module.register_forward_hook(lambda m, i, o: seen.setdefault("y", o.detach().clone()))
    with torch.no_grad():
        net(x)
    hook.remove()
    return seen["y"].transpose(0, 1).reshape(seen["y"].shape[1], -1)


def matched(rebuilt: nn.Module, original: nn.Module, x: torch.Tensor, with_std: bool) -> nn.Module:
    net = copy.deepcopy(rebuilt)
    for name, bn in NF.batchnorm_modules(net).items():
        yo, yr = channel_outputs(original, name, x), channel_outputs(net, name, x)
        ratio = yo.std(1) / yr.std(1).clamp_min(1e-8) if with_std else torch.ones(bn.num_features)
        with torch.no_grad():  # y' = (y - mean_r) * ratio + mean_o, folded into the affine map
            bn.weight.mul_(ratio)
            bn.bias.copy_((bn.bias - yr.mean(1)) * ratio + yo.mean(1))
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nern_file")
    p.add_argument("original_file")
    p.add_argument("--data-root", required=True, help="ImageFolder root with train/ and test/")
    p.add_argument("--images", type=int, default=2000, help="calibration train images")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DataConfig(name="imagefolder", root=args.data_root)
    info = D.dataset_info(cfg)
    train, _ = D.load_arrays(cfg, "train")
    test, labels = D.load_arrays(cfg, "test")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:args.images]
    calibration = D.normalise(train[pick], info)  # a float copy: train stays uint8
    rebuilt, original = NF.read_network(args.nern_file).eval(), NF.read_network(args.original_file).eval()
    print(f"file as written: {top1(rebuilt, test, labels, info):.2f}%")
    for mode, with_std in (("mean", False), ("meanstd", True)):
        print(f"{mode} matched on {args.images} train images: "
              f"{top1(matched(rebuilt, original, calibration, with_std), test, labels, info):.2f}%")


if __name__ == "__main__":
    main()
