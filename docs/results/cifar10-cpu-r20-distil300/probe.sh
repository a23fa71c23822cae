#!/bin/bash
# Does a longer distillation phase raise agreement? ResNet20 h180 crossfilter on the preset's in-domain original,
# iterations=300 (the preset: 100), seeds 0-2, one at a time, 2 threads.
cd /work/fresh
for s in 0 1 2; do
  .venv/bin/python -m nern fit --config config/recipes/fast.yaml \
    --model results/cifar10-cpu/cifar10-resnet20/original/reg0/model.safetensors \
    --permutation results/cifar10-cpu/cifar10-resnet20/permutation/reg0/crossfilter.safetensors \
    --set data.name=imagefolder --set data.root=../shared/data/cifar10-jpeg --set data.val_size=5000 \
    --set eval_every=0 --set predictor.hidden=180 --set seed=$s --set threads=2 --set device=cpu \
    --set progress=false --set compile=false --set iterations=300 \
    --mlflow-uri sqlite:////work/runs/mlflow.db --experiment budget-probe --out /work/runs/budget300/seed$s > /work/runs/budget300-seed$s.log 2>&1
done
