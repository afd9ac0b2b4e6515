# session 34, call 1: normaliser alone (checks the Mosaic GPU kernels at V + 1 = 65 before anything
# trains through them), then protobg launch A (parity with the authors' optimizer, 20k steps) beside
# the cost step (Mamba-2 d256 through "auto" and the chunk form, the parity step's profile, vmap_gpu's
# ssd rows), then launch B (the MQAR cells; "auto" only where this call's checks passed); wait
T0=$SECONDS
touch /tmp/c1stamp
NORM_S=${NORM_S:-200} NORM_ARGS="--reps 5 --forms column column_f32 --shapes linear_attention_d128 based_d512" \
  bash benchmarks/run_device.sh normaliser
NORM_OK=1; grep -q "FAIL\|Traceback" /tmp/logs/normaliser.log && NORM_OK=0
grep -q "check linear_attention_d128.*ok" /tmp/logs/normaliser.log || NORM_OK=0
echo "normaliser ok: $NORM_OK ($((SECONDS - T0)) s)"
O="--steps=20000 --set=train.weight_decay=0.0 --set=train.b2=0.999 --set=train.warmup_steps=2000 --set=train.min_lr_ratio=0.001 --set=train.clip_norm=0.0 --out={out}/parity_20k_their_optimizer"
JA="state_tracking|^parity-deltanet_11|$O|6G|float32
state_tracking|^parity-mamba_11|$O|14G|float32"
PROTO_S=$((1370 - (SECONDS - T0))) PROTO_P=2 PROTO_JOBS="$JA" bash benchmarks/run_device.sh protobg
COST_S=${COST_S:-220} COST_VMAP=1 VMAP_ARGS="--ops ssd --widths 64 128 256 --reps 5" COST_JOBS="mqar|^mamba2-d256-T256|--lrs=0.0022 --set=model.impl=auto|12G
mqar|^mamba2-d256-T256|--lrs=0.0022 --set=model.impl=chunk|12G
state_tracking|^parity-deltanet_11|--time-steps=20 --profile=20|6G" bash benchmarks/run_device.sh cost
ms() { grep -h '^| mamba2-d256' "$1" 2>/dev/null | tail -n 1 | awk -F'|' '{print $(NF-1)}' | tr -dc '0-9.'; }
MA=$(ms /tmp/logs/cost1.log); MC=$(ms /tmp/logs/cost2.log)
SSD_OK=1; grep -q '^| ssd | 64 |.*| True |' /tmp/logs/vmap.log || SSD_OK=0
echo "mamba2 d256 ms: auto '$MA' chunk '$MC'; ssd d64 vmap ok: $SSD_OK ($((SECONDS - T0)) s)"
A="--lrs=0.0022 --set=model.impl=auto"
Z="--lrs=0.0022 --set=task.params.power_a=0.01 --set=task.params.random_non_queries=True --out={out}/zoology_data"
M2=--lrs=0.0022; [ -n "$MA" ] && [ -n "$MC" ] && awk -v a="$MA" -v c="$MC" 'BEGIN{exit !(a < c)}' && M2=$A
M64="$Z --set=model.impl=chunk"; [ "$SSD_OK" = 1 ] && M64="$Z --set=model.impl=auto"
L64="$Z --set=model.impl=chunk"; [ "$NORM_OK" = 1 ] && L64="$Z --set=model.impl=auto"
JB="mqar|^based-d512-T256|$A|24G|tensorfloat32
mqar|^based-d128-T256|$A|12G|tensorfloat32
mqar|^mamba2-d256-T256|$M2|14G|tensorfloat32
mqar|^linear_attention-d512-T256|$A|20G|tensorfloat32
mqar|^mamba2-d64-T256|$M64|10G|tensorfloat32
mqar|^based-d64-T256|$Z --set=model.impl=auto|10G|tensorfloat32
mqar|^gla-d64-T256|$Z --set=model.impl=auto|6G|tensorfloat32
mqar|^linear_attention-d64-T256|$L64|6G|tensorfloat32
deltaproduct|s5-nh3|--set=eval.batch_size=32 --set=eval.batches=16|10G|float32
mqar|^gla-d128-T512|$A|7G|tensorfloat32
mqar|^gated_deltanet-d64-T512|$A|8G|tensorfloat32
mqar|^deltanet-d64-T512|$A|5G|tensorfloat32"
PROTO_S=$((1370 - (SECONDS - T0))) PROTO_P=5 PROTO_MIN_S=300 PROTO_JOBS="$JB" bash benchmarks/run_device.sh protobg
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
find benchmarks/results -name "*.json" -newer /tmp/c1stamp -exec cp {} /tmp/logs/ \;
PROTO_WAIT=$((570 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; tail -n 30 /tmp/pw.log | cut -c1-250
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
