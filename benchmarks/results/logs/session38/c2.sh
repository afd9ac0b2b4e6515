# session 37, call 2: modular arithmetic DeltaNet [-1, 1] resuming at 54,000 from the carried
# checkpoint (a second protobg launch, cut with the first), then wait
T0=$SECONDS
export PYTHONPATH=/tmp/site
L0=$(stat -c %Y /tmp/protobg/launch0); NOW=$(date +%s)
PROTO_JOBS="state_tracking|^modular_arithmetic-deltanet_11|--out={out}/authors_training|6G|float32" \
  PROTO_S=$((${PROTO_END:-1450} - (NOW - L0))) PROTO_P=4 bash benchmarks/run_device.sh protobg
sleep 60; nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_WAIT=$((550 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; grep -v "XLA_FLAGS" /tmp/pw.log | tail -n 40 | cut -c1-250
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
echo "call 2: $((SECONDS - T0)) s"
