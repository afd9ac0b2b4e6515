# a later call: wait on the protobg jobs (PROTO_WAIT), then bring back logs and results
T0=$SECONDS
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_WAIT=${PROTO_WAIT:-560} bash benchmarks/run_device.sh protowait
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
