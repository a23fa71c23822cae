#!/usr/bin/env bash
# Session 23 chain (niced behind the #35 ablation): R20 in-domain row (fp32, the preset's jobs), the same three
# fits with autocast_bf16=true (#36's lever, CLI), then the R56 row (preset's jobs).
set -x
cd /work/main
SM=".venv/bin/snakemake --profile workflow/profiles/local --configfile config/cifar10-cpu.yaml --cores 2"
R20=results/cifar10-cpu/cifar10-resnet20
R56=results/cifar10-cpu/cifar10-resnet56
date
$SM $R20/fit/fast/reg0/crossfilter/{h180,h180-seed1,h180-seed2}/metrics.json
date
for s in 0 1 2; do
  [ -f /work/runs/bf16/h180-seed$s/metrics.json ] && continue
  .venv/bin/python -m nern fit --config config/recipes/fast.yaml --model $R20/original/reg0/model.safetensors \
    --permutation $R20/permutation/reg0/crossfilter.safetensors --set data.name=imagefolder \
    --set data.root=../shared/data/cifar10-jpeg --set data.val_size=5000 --set eval_every=0 --set predictor.hidden=180 \
    --set seed=$s --set threads=2 --set device=cpu --set progress=false --set compile=false --set autocast_bf16=true \
    --out /work/runs/bf16/h180-seed$s --mlflow-uri none > /work/runs/bf16/h180-seed$s.log 2>&1
  date
done
$SM $R56/fit/fast/reg0/crossfilter/{h320,h320-seed1,h320-seed2}/metrics.json
date
