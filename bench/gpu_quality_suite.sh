#!/usr/bin/env bash
# The quality numbers of BENCHMARKS.md in one go on one GPU (H100/H200, 16 cores): every process trains on
# the GPU and scores its own GGUF files with llama.cpp on its share of the cores; rows land in $RES as
# they finish (JSON + JSONL), then bench/quality.py --merge and bench/qlora_quality.py --merge join them.
#
#   [SUITE=protocol|lr] [LRS="5e-5 1e-4"] [ONLY=regex] bash bench/gpu_quality_suite.sh SMOLLM2.gguf SHKSPR_TEXTS_DIR RESULTS_DIR [EVAL_TOKENS]
#
# SUITE=protocol (default): the issues' lr 2e-5. SUITE=lr: float and QAT trained at each of LRS (so each
# QAT row's gap is measured against a float fine-tune that got the same lr), then the QLoRA arms.
#
# Runs in the background-friendly way the rented GPU needs (each process capped with `timeout`).
set -u
GGUF=$1; TEXTS=$2; RES=$3; EVAL=${4:-32768}
STEPS=${STEPS:-500}; BATCH=${BATCH:-16}; SEQ=${SEQ:-512}   # STEPS=1 BATCH=1 SEQ=32: a CPU smoke run
G=${WORK:-/tmp/qg}; mkdir -p "$G" "$RES"; PY=${PY:-python3}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
C="--gguf $GGUF --texts $TEXTS --steps $STEPS --batch $BATCH --seq $SEQ --lr 2e-5 --eval-tokens $EVAL --no-ours-ptq --workdir $G"
Q="$PY bench/quality.py $C"
T="timeout 1500"
# ~15 GiB of GPU memory per training process (measured on an H200) (16 x 512 tokens, 49k vocab): cap how many run at once
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
MAXJ=${MAXJ:-$(( ${MEM:-0} > 0 ? MEM / 16500 : 13 ))}; [ "$MAXJ" -lt 1 ] && MAXJ=1
echo "running at most $MAXJ processes at once"
slot() { while [ "$(jobs -rp | wc -l)" -ge "$MAXJ" ]; do wait -n; done; }
L="$PY bench/qlora_quality.py --gguf $GGUF --texts $TEXTS --steps $STEPS --batch $BATCH --seq $SEQ --lr 2e-4 --eval-tokens $EVAL --workdir $G/qlora"
# ONLY='regex': run just the jobs whose names match (e.g. ONLY='^lr1e-4_(q4_k_m|float)$')
run() { local name=$1; shift; [[ $name =~ ${ONLY:-.} ]] || return 0; mkdir -p "$G/$name"; slot; $T "$@" --workdir "$G/$name" --out "$RES/$name.json" > "$RES/$name.log" 2>&1 & }
case ${SUITE:-protocol} in
protocol)  # the issues' protocol: lr 2e-5 for float and QAT, QLoRA lr 2e-4
  run float $Q --schemes q4_0,q4_k_m,q3_k_m --variants float --float-ckpt $G/float.pt --threads 3
  run qlora_a $L --schemes q4_0,q4_k_m --variants qlora --threads 2
  run q4_0_dyn $Q --schemes q4_0 --variants qat:dynamic --threads 1
  run q4_0_lsq $Q --schemes q4_0 --variants qat:learned --threads 1
  run q4_k_m_dyn $Q --schemes q4_k_m --variants qat:dynamic --threads 1
  run q3_k_m_dyn $Q --schemes q3_k_m --variants qat:dynamic --threads 1
  run qlora_b_q4_0 $L --schemes q4_0 --variants qat:dynamic --threads 1
  run qlora_b_q4_k_m $L --schemes q4_k_m --variants qat:dynamic --threads 1
  ;;
lr)  # one lr for float and QAT alike (a fair gap at each lr), then QLoRA
  # k-quant runs first (the longest) and with 3 threads: their codes come from llama.cpp's C encoder on
  # the host every step (formats/llama_encoder.py), and llama.cpp's evaluation with 1 thread took ~200 s
  for LR in ${LRS:-5e-5 1e-4}; do
    run lr${LR}_q4_k_m $Q --lr $LR --schemes q4_k_m --variants qat:dynamic --threads 3
    run lr${LR}_q3_k_m $Q --lr $LR --schemes q3_k_m --variants qat:dynamic --threads 3
  done
  for LR in ${LRS:-5e-5 1e-4}; do
    run lr${LR}_float $Q --lr $LR --schemes q4_0,q4_k_m,q3_k_m --variants float --threads 3
    run lr${LR}_q4_0 $Q --lr $LR --schemes q4_0 --variants qat:dynamic --threads 2
    run lr${LR}_q4_0_lsq $Q --lr $LR --schemes q4_0 --variants qat:learned --threads 2
  done
  run qlora_b_q4_0 $L --schemes q4_0 --variants qat:dynamic --threads 1
  run qlora_b_q4_k_m $L --schemes q4_k_m --variants qat:dynamic --threads 1
  run qlora_a $L --schemes q4_0,q4_k_m --variants qlora --threads 2
  ;;
*) echo "unknown SUITE=$SUITE (protocol | lr)"; exit 2 ;;
esac
wait
for LR in ${LRS:-5e-5 1e-4}; do
  ls $RES/lr${LR}_*.json > /dev/null 2>&1 && $PY bench/quality.py --merge $RES/lr${LR}_*.json \
      --out $RES/quality_lr$LR.json > $RES/quality_table_lr$LR.txt 2>&1
done
ls $RES/float.json > /dev/null 2>&1 && $PY bench/quality.py --merge $RES/float.json $RES/q4_0_*.json \
    $RES/q4_k_m_*.json $RES/q3_k_m_*.json --out $RES/quality_all.json > $RES/quality_table.txt 2>&1
$PY bench/qlora_quality.py --merge $RES/qlora_*.json --out $RES/qlora_all.json > $RES/qlora_table.txt 2>&1
echo done > $RES/DONE
