#!/usr/bin/env bash
set -x
cd /work/main
while pgrep -f "bench.fit_wall" >/dev/null; do sleep 10; done
date
.venv/bin/python -m nern fit --config config/recipes/fast.yaml --model /work/shared/data/pretrained/resnet20-12fca82f.th \
  --out /work/runs/fit_wall_fp32/current-seed0 --mlflow-uri none --permutation /work/runs/fit_wall/resnet20_crossfilter_auto.safetensors \
  --set data.name=imagefolder --set data.root=/work/shared/data/cifar10-jpeg --set data.val_size=5000 --set model.arch=resnet20 \
  --set model.shortcut=A --set predictor.hidden=180 --set seed=0 --set threads=2 --set device=cpu --set progress=false \
  > /work/runs/fit_wall_fp32.log 2>&1
date
