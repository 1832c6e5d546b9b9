#!/usr/bin/env bash
# One GPU call: QLoRA on the real Qwen2.5-Coder-0.5B-Instruct for MSRA NER, then the official
# test split through predict.py's batched greedy path, within the device tool's 10 minutes.
#
# Expects on the GPU machine: /tmp/up/q00..q08 (the GGUF in pieces, from shared/tools/qwen05b
# chunks), wheels in .whl/ (bitsandbytes, datasets, dill, multiprocess, gguf) and the MSRA
# corpus in .up/dh_msra.txt. Training is sized to the time left: a 15-step probe measures
# steps/s, then the real run takes as many steps as fit in TRAIN_BUDGET_S.
#   bash bench/msra_qwen_gpu.sh [TRAIN_BUDGET_S] [EXTRA TRAINING OPTIONS...]
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
budget=${1:-300}; shift || true
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import torch, transformers, peft, bitsandbytes, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"
if [ ! -d /tmp/qwen-hf ]; then
  cat /tmp/up/q* > /tmp/model.gguf
  echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/model.gguf" | sha256sum -c
  python3 bench/gguf_to_hf.py /tmp/model.gguf /tmp/qwen-hf
fi
python3 dataset.py --prepare msra --source .up/dh_msra.txt --out data/msra
runs=/tmp/runs
python3 baichuan_qlora.py --config configs/msra_qwen0.5b.yaml --model_name_or_path /tmp/qwen-hf \
  --output_dir $runs --run_name probe --max_steps 15 --logging_steps 5 --eval_steps 0 --eval_f1_steps 0 --save_steps 0 "$@" 2>&1 | { grep -v "step/s\]\|s/step\]\|it/s\]" || true; }
read rate steps_per_s < <(python3 -c "import json; h=[json.loads(l) for l in open('$runs/probe/metrics.jsonl')]; print(h[-1]['train_samples_per_s'], h[-1]['train_steps_per_s'])")
steps=$(python3 -c "print(int($budget * $steps_per_s))")
echo "probe: $rate samples/s, $steps_per_s steps/s -> $steps steps in ${budget}s (setup took $(( $(date +%s) - t0 ))s)"
python3 baichuan_qlora.py --config configs/msra_qwen0.5b.yaml --model_name_or_path /tmp/qwen-hf \
  --output_dir $runs --max_steps $steps --save_steps 0 "$@" 2>&1 | { grep -v "step/s\]\|s/step\]\|it/s\]" || true; } | tee $OUT/train.log
cp $runs/msra_qwen0.5b/metrics.jsonl $runs/msra_qwen0.5b/loss.png $OUT/
python3 predict.py --config configs/msra_qwen0.5b.yaml --model_name_or_path /tmp/qwen-hf \
  --lora_model $runs/msra_qwen0.5b/adapter_model --data_file data/msra/test.txt \
  --predictions_file $OUT/test.predictions.jsonl --metrics_file $OUT/test.metrics.json \
  --batch_size 128 --max_new_tokens 96 2>&1 | { grep -v "sent/s\]\|it/s\]" || true; } | tee $OUT/test.log
echo "total $(( $(date +%s) - t0 ))s"
