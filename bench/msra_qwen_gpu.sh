#!/usr/bin/env bash
# QLoRA on the real Qwen2.5-Coder-0.5B-Instruct for MSRA NER on a GPU machine that cannot
# download anything, in stages that each fit the device tool's 10-minute calls. State lives in
# /tmp (wheels, model, data, runs), so later calls on the same warm machine continue the work.
#
#   bash bench/msra_qwen_gpu.sh setup            # wheels from .whl/, MSRA from .up/dh_msra.txt,
#                                                # the GGUF from /tmp/up/q00..q08 once all are there
#   bash bench/msra_qwen_gpu.sh train RUN [TRAINING OPTIONS...]
#                                                # one run of configs/msra_qwen0.5b.yaml on train_joined.txt
#                                                # (its average_seeds emptied: here sweep trains the seeds at
#                                                # once and soup averages them; later options win:
#                                                # --train_file $DATA/train.txt); resumes RUN's newest
#                                                # checkpoint, so a call cut short loses little
#   DEADLINE=$(( $(date +%s) + 560 )) bash bench/msra_qwen_gpu.sh all RUN [TRAINING OPTIONS...]
#                                                # train, then test plain and grounded, each stage
#                                                # stopped at DEADLINE; run it again in the next
#                                                # call to go on where it stopped
#   DEADLINE=... bash bench/msra_qwen_gpu.sh sweep "RUN1 [OPTIONS...]" "RUN2 [OPTIONS...]" ...
#                                                # `all` for every run at once, spread over the GPUs,
#                                                # the CPU cores shared out; logs in $OUT/RUN.log
#   bash bench/msra_qwen_gpu.sh pack             # everything in $OUT but adapter pieces into
#                                                # $OUT/results.tgz (the tool returns 8 files at most)
#   bash bench/msra_qwen_gpu.sh fetch RUN          # RUN's best_adapter into $OUT/RUN in 15 MiB pieces
#                                                # (the device tool returns files of 16 MiB at most);
#                                                # here: cat adapter.tar.* | tar -x
#   bash bench/msra_qwen_gpu.sh test RUN plain|grounded|dev [PREDICT OPTIONS...]
#                                                # the official test split with RUN's best_adapter
#                                                # (best dev F1); resumes a torn predictions file;
#                                                # RUN=zeroshot: the base model without an adapter;
#                                                # dev: plain decoding of all 2,000 dev sentences
#                                                # (dev.plain.* beside test.plain.*)
#   bash bench/msra_qwen_gpu.sh soup NAME RUN1 RUN2 ...
#                                                # the mean of the runs' best adapters, as NAME's
#                                                # best_adapter (predict.py --average_adapters);
#                                                # then `test NAME plain` etc.
#   MODES="plain dev" ... all|sweep ...          # which tests `all` runs (default: plain grounded)
#   TAG=.hf bash bench/msra_qwen_gpu.sh test RUN plain --engine hf --adapter_mode lora
#                                                # the same test through another path, as test.plain.hf.*
#
# The GGUF pieces come from `shared/tools/qwen05b chunks DIR` (see bench/NOTES.md for how they
# are moved). Results go to $OUT/RUN/ (metrics, predictions, logs).
set -euo pipefail
# progress bars redraw in place; one line every 30 s is enough in a log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=30
OUT=${OUT:-/tmp/out}
# overridable only to try the stages on a small model elsewhere
MODEL=${MODEL:-/tmp/qwen-hf}
DATA=${DATA:-/tmp/msra}
RUNS=${RUNS:-/tmp/runs}
GGUF_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
quiet() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^ *$' || true; }

stage=${1:?stage: setup, train, test, soup, fetch, all, sweep or pack}; shift
mkdir -p "$OUT" $RUNS

case $stage in
setup)
  if [ -d .whl ] && [ ! -e /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch /tmp/site/.done
  fi
  if [ -f .up/dh_msra.txt ] && [ ! -f $DATA/test.txt ]; then
    # train_joined.txt: train.txt plus copies of its 、-separated entity lists without the 、
    python3 dataset.py --prepare msra --source .up/dh_msra.txt --out $DATA --join_lists 3
    # the same from lists of two or more (906 copies instead of 476), for a run to compare
    python3 dataset.py --prepare msra --source .up/dh_msra.txt --out $DATA/join2 --join_lists 2
  fi
  if [ ! -f $MODEL/config.json ] && [ "$(ls /tmp/up/q0? 2>/dev/null | wc -l)" = 9 ]; then
    cat /tmp/up/q0? > /tmp/model.gguf
    echo "$GGUF_SHA256  /tmp/model.gguf" | sha256sum -c
    python3 bench/gguf_to_hf.py /tmp/model.gguf $MODEL
  fi
  python3 -c "import torch, transformers, peft, bitsandbytes, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'datasets', datasets.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  ;;
train)
  run=${1:?run name}; shift
  mkdir -p "$OUT/$run"
  # a finished run is not trained again, so one command line can serve every call of a session
  if [ -f $RUNS/$run/adapter_model/adapter_model.safetensors ]; then echo "$run: already trained"; else
  ${TIMEOUT:+timeout $TIMEOUT} python3 baichuan_qlora.py --config configs/msra_qwen0.5b.yaml --model_name_or_path $MODEL \
    --train_file $DATA/train_joined.txt --dev_file $DATA/dev.txt --output_dir $RUNS --run_name "$run" \
    --resume_from_checkpoint auto --average_seeds '' "$@" 2>&1 | quiet | tee -a $RUNS/$run.train.log \
    || echo "training stopped early (exit $?); the next 'train $run' resumes it"
  fi
  cp $RUNS/$run.train.log "$OUT/$run/"
  cp $RUNS/$run/metrics.jsonl "$OUT/$run/" 2>/dev/null || true
  cp $RUNS/$run/best_adapter/dev_metrics.json "$OUT/$run/" 2>/dev/null || true
  ;;
test)
  run=${1:?run name}; mode=${2:?plain, grounded or dev}; shift 2
  flag=""; [ "$mode" = grounded ] && flag=--grounded
  # TAG names a variant of the same test (e.g. TAG=.hf ... --engine hf), scored beside it
  split=test; out=test.$mode${TAG:-}; [ "$mode" = dev ] && split=dev && out=dev.plain${TAG:-}
  adapter=(--lora_model $RUNS/$run/best_adapter); [ "$run" = zeroshot ] && adapter=()
  mkdir -p "$OUT/$run"
  if [ -f $RUNS/$run/$out.metrics.json ]; then echo "$run $mode: already scored"; else
  # the longest official test answer is 231 Qwen tokens with EOS (dataset.py --check ... --template chat)
  ${TIMEOUT:+timeout $TIMEOUT} python3 predict.py --config configs/msra_qwen0.5b.yaml --model_name_or_path $MODEL \
    "${adapter[@]}" --data_file $DATA/$split.txt --types 人名,地名,机构名 $flag \
    --predictions_file $RUNS/$run/$out.jsonl --metrics_file $RUNS/$run/$out.metrics.json \
    --resume --batch_size 128 --max_new_tokens 256 "$@" 2>&1 | quiet | tee -a $RUNS/$run.$out.log \
    || echo "prediction stopped early (exit $?); the next 'test $run $mode' resumes it"
  fi
  cp $RUNS/$run/$out.jsonl $RUNS/$run.$out.log "$OUT/$run/"
  cp $RUNS/$run/$out.metrics.json "$OUT/$run/" 2>/dev/null || true
  ;;
all)
  run=${1:?run name}; shift
  left() { local t=$(( ${DEADLINE:?set DEADLINE to the epoch second the call must end by} - $(date +%s) )); echo $(( t > 1 ? t : 1 )); }
  TIMEOUT=$(left) bash "$0" train "$run" "$@"
  [ -f $RUNS/$run/adapter_model/adapter_model.safetensors ] || exit 0
  for mode in ${MODES:-plain grounded}; do
    # a test needs about 20 s to load before it predicts anything
    [ "$(left)" -gt 40 ] || exit 0
    TIMEOUT=$(left) bash "$0" test "$run" $mode
  done
  ;;
sweep)
  [ $# -gt 0 ] || { echo "sweep: give one quoted \"RUN [OPTIONS...]\" per run" >&2; exit 2; }
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); [ "$gpus" -gt 0 ] || gpus=1
  # Each process would start a thread per core, so several at once oversubscribe the host's
  # CPU: three runs with the default trained at 185-198 samples/s each, four with 8 threads
  # each (two per GPU) at 365-369, six with 5 threads (three per GPU) at 222-230, the GPUs then
  # the limit (bench/NOTES.md, fourth to sixth sessions).
  threads=$(( $(nproc) / $# )); [ $threads -gt 0 ] || threads=1
  i=0
  for spec in "$@"; do
    read -r run opts <<< "$spec"
    # $opts unquoted on purpose: it is the run's options, split into words
    CUDA_VISIBLE_DEVICES=$(( i % gpus )) OMP_NUM_THREADS=$threads bash "$0" all "$run" $opts > "$OUT/$run.log" 2>&1 &
    i=$(( i + 1 ))
  done
  wait
  for spec in "$@"; do read -r run _ <<< "$spec"; echo "== $run"; tail -n 3 "$OUT/$run.log"; done
  ;;
soup)
  name=${1:?soup name}; shift
  [ $# -ge 2 ] || { echo "soup: give two or more runs to average" >&2; exit 2; }
  mkdir -p "$OUT/$name" $RUNS/$name
  folders=$(for run in "$@"; do printf '%s,' $RUNS/$run/best_adapter; done)
  python3 predict.py --average_adapters "${folders%,}" --average_to $RUNS/$name/best_adapter 2>&1 | tee "$OUT/$name/soup.log"
  ;;
pack)
  cd "$OUT"
  tar -czf /tmp/results.tgz --exclude='adapter.tar.*' --exclude=results.tgz .
  find . -type f ! -name 'adapter.tar.*' -delete
  mv /tmp/results.tgz results.tgz
  ls -l . */ 2>/dev/null | grep -v '^total'
  ;;
fetch)
  run=${1:?run name}
  mkdir -p "$OUT/$run"
  tar -C $RUNS/$run -cf - best_adapter | split -b 15M - "$OUT/$run/adapter.tar."
  ls -l "$OUT/$run"
  ;;
*)
  echo "unknown stage $stage: setup, train, test, soup, fetch, all, sweep or pack" >&2; exit 2
  ;;
esac
