#!/usr/bin/env bash
# The quality numbers of BENCHMARKS.md in one go on one GPU (H100/H200, 16 cores): every process trains on
# the GPU and scores its own GGUF files with llama.cpp on its share of the cores; rows land in $RES as
# they finish (JSON + JSONL), then bench/quality.py --merge and bench/qlora_quality.py --merge join them.
#
#   bash bench/gpu_quality_suite.sh SMOLLM2.gguf SHKSPR_TEXTS_DIR RESULTS_DIR [EVAL_TOKENS]
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
slot; $T $Q --schemes q4_0,q4_k_m,q3_k_m --variants float --float-ckpt $G/float.pt --threads 3 --out $RES/float.json > $RES/float.log 2>&1 &
L="$PY bench/qlora_quality.py --gguf $GGUF --texts $TEXTS --steps $STEPS --batch $BATCH --seq $SEQ --lr 2e-4 --eval-tokens $EVAL --workdir $G/qlora"
slot; $T $L --schemes q4_0,q4_k_m --variants qlora --threads 2 --out $RES/qlora_a.json > $RES/qlora_a.log 2>&1 &
slot; $T $Q --schemes q4_0 --variants qat:dynamic --threads 1 --out $RES/q4_0_dyn.json > $RES/q4_0_dyn.log 2>&1 &
slot; $T $Q --schemes q4_0 --variants qat:learned --threads 1 --out $RES/q4_0_lsq.json > $RES/q4_0_lsq.log 2>&1 &
slot; $T $Q --schemes q4_0 --variants qat:dynamic@lr=5e-5 --threads 1 --out $RES/q4_0_dyn_lr5.json > $RES/q4_0_dyn_lr5.log 2>&1 &
slot; $T $Q --schemes q4_0 --variants qat:dynamic@lr=1e-4 --threads 1 --out $RES/q4_0_dyn_lr10.json > $RES/q4_0_dyn_lr10.log 2>&1 &
slot; $T $Q --schemes q4_0 --variants qat:learned@lr=5e-5 --threads 1 --out $RES/q4_0_lsq_lr5.json > $RES/q4_0_lsq_lr5.log 2>&1 &
slot; $T $Q --schemes q4_k_m --variants qat:dynamic --threads 1 --out $RES/q4_k_m_dyn.json > $RES/q4_k_m_dyn.log 2>&1 &
slot; $T $Q --schemes q4_k_m --variants qat:dynamic@lr=5e-5 --threads 1 --out $RES/q4_k_m_dyn_lr5.json > $RES/q4_k_m_dyn_lr5.log 2>&1 &
slot; $T $Q --schemes q3_k_m --variants qat:dynamic --threads 1 --out $RES/q3_k_m_dyn.json > $RES/q3_k_m_dyn.log 2>&1 &
slot; $T $Q --schemes q3_k_m --variants qat:dynamic@lr=5e-5 --threads 1 --out $RES/q3_k_m_dyn_lr5.json > $RES/q3_k_m_dyn_lr5.log 2>&1 &
slot; $T $L --schemes q4_0 --variants qat:dynamic --threads 1 --out $RES/qlora_b_q4_0.json > $RES/qlora_b_q4_0.log 2>&1 &
slot; $T $L --schemes q4_k_m --variants qat:dynamic --threads 1 --out $RES/qlora_b_q4_k_m.json > $RES/qlora_b_q4_k_m.log 2>&1 &
wait
$PY bench/quality.py --merge $RES/float.json $RES/q4_0_*.json $RES/q4_k_m_*.json $RES/q3_k_m_*.json \
    --out $RES/quality_all.json > $RES/quality_table.txt 2>&1
$PY bench/qlora_quality.py --merge $RES/qlora_*.json --out $RES/qlora_all.json > $RES/qlora_table.txt 2>&1
echo done > $RES/DONE
