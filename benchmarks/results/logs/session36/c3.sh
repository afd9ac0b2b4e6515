# session 36, last call: wait on the protobg jobs, bring back logs, results and the cut cells'
# checkpoints (PROTO_CKPT: resumed in a later session)
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_CKPT="authors_training/state_tracking/modular_arithmetic-deltanet_11 authors_training/state_tracking/parity-mamba_01 authors_training/state_tracking/parity-mamba_11 authors_training/state_tracking/parity-mlstm authors_training/state_tracking/parity-transformer" \
  PROTO_WAIT=${PROTO_WAIT:-300} bash benchmarks/run_device.sh protowait
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
ls -la $OUT
