# session 32, call 1: normaliser_gpu alone on the idle GPU (split vs column, Based d128 / linear
# attention d256 / a bf16 LM shape); then protobg launch A (the default MQAR list: Based d128 first,
# now with the normaliser apart from the kernel) and launch B (lm_mixers, 10 seeds, 10,000 steps,
# the slow cells first, results apart in lm_10k_seeds10/)
T0=$SECONDS; TOT_S=${TOT_S:-1400}
NORM_S=200 bash benchmarks/run_device.sh normaliser
mkdir -p /tmp/logs && cp benchmarks/results/normaliser_gpu_*.json /tmp/logs/ 2>/dev/null
JB=""
for m in rwkv7 log_linear_gated_deltanet kda mamba3 log_linear_mamba2 gated_deltanet mamba2 deltanet gla attention linear_attention; do
  JB="$JB
lm_mixers|^$m|--steps=10000 --seeds=0,1,2,3,4,5,6,7,8,9 --out={out}/lm_10k_seeds10|5G|default"; done
PROTO_S=$((TOT_S - (SECONDS - T0))) PROTO_P=4 bash benchmarks/run_device.sh protobg
PROTO_S=$((TOT_S - (SECONDS - T0))) PROTO_P=5 PROTO_MIN_S=400 PROTO_JOBS="$JB" bash benchmarks/run_device.sh protobg
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_WAIT=$((565 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; tail -n 60 /tmp/pw.log | cut -c1-250
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
