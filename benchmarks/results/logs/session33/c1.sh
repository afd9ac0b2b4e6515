# session 33, call 1: protobg launch A (parity at the paper's 20k steps: DeltaNet [-1, 1] and [0, 1],
# Mamba [-1, 1]), the Mamba-2 d256 step through "auto" and the chunk form beside it (cost), then
# launch B (Based d512) once the cost jobs' memory is free; wait out the call
T0=$SECONDS; TOT_S=${TOT_S:-1150}
P="--steps=20000 --out={out}/parity_20k"
JA="state_tracking|^parity-deltanet_11|$P|6G|float32
state_tracking|^parity-mamba_11|$P|14G|float32
state_tracking|^parity-deltanet_01|$P|6G|float32"
PROTO_S=$TOT_S PROTO_P=3 PROTO_JOBS="$JA" bash benchmarks/run_device.sh protobg
COST_S=300 COST_JOBS="mqar|^mamba2-d256-T256|--lrs=0.0022 --set=model.impl=auto|12G
mqar|^mamba2-d256-T256|--lrs=0.0022 --set=model.impl=chunk|12G" bash benchmarks/run_device.sh cost
JB="mqar|^based-d512-T256|--lrs=0.0022 --set=model.impl=auto|24G|tensorfloat32"
PROTO_S=$((TOT_S - (SECONDS - T0))) PROTO_P=1 PROTO_MIN_S=300 PROTO_JOBS="$JB" bash benchmarks/run_device.sh protobg
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_WAIT=$((560 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; tail -n 40 /tmp/pw.log | cut -c1-250
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
