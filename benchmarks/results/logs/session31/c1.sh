# session 31, call 1: protobg launch A (MQAR: Gated DeltaNet d512, Zoology's attention d64-d256 on
# Zoology's data, then Mamba-2 d256 / d128, Based d128 through "auto", linear attention d256) and
# launch B (lm_mixers, all 11 cells at 10,000 steps, 3 seeds, JAX's default precision as session 26,
# results apart in lm_10k/); on an H200 also the Gated DeltaNet V = 512, T = 2048 float32 check
T0=$SECONDS; TOT_S=${TOT_S:-1450}
A="--lrs=0.0022 --set=model.impl=auto"
Z="--lrs=0.0022 --set=task.params.power_a=0.01 --set=task.params.random_non_queries=True --out={out}/zoology_data"
JA="mqar|^gated_deltanet-d512-T256|$A|24G|tensorfloat32
mqar|^attention-d256-T256|$Z|9G|tensorfloat32
mqar|^attention-d64-T256|$Z|6G|tensorfloat32
mqar|^attention-d128-T256|$Z|7G|tensorfloat32
mqar|^mamba2-d256-T256|$A|14G|tensorfloat32
mqar|^mamba2-d128-T256|$A|12G|tensorfloat32
mqar|^based-d128-T256|$A|12G|tensorfloat32
mqar|^linear_attention-d256-T256|$A|7G|tensorfloat32"
JB=""
for m in kda rwkv7 log_linear_gated_deltanet gated_deltanet mamba3 mamba2 log_linear_mamba2 deltanet gla linear_attention attention; do
  JB="$JB
lm_mixers|^$m|--steps=10000 --out={out}/lm_10k|3G|default"; done
PROTO_S=$TOT_S PROTO_P=4 PROTO_JOBS="$JA" bash benchmarks/run_device.sh protobg
PROTO_S=$TOT_S PROTO_P=5 PROTO_MIN_S=500 PROTO_JOBS="$JB" bash benchmarks/run_device.sh protobg
tot=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
if [ "$tot" -gt 120000 ]; then
  sleep 60
  CHECK_S=400 CHECK_OPS=gated_delta_rule CHECK_EXTRA="--expand-v 2" CHECK_TAG=_v2 CHECK_CASES="2048:float32:50G" \
    bash benchmarks/run_device.sh checksplit
  cp benchmarks/results/check_gpu_*split*.json /tmp/logs/ 2>/dev/null
fi
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
PROTO_WAIT=$((570 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
