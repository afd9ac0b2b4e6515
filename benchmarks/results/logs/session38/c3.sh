# session 37, last call: wait on the protobg jobs, bring back logs, results and every cut cell's
# checkpoint (PROTO_CKPT: resumed in a later session)
T0=$SECONDS
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
PROTO_CKPT="authors_training/state_tracking/modular_arithmetic-deltanet_11 authors_training/state_tracking/parity-mamba_11 authors_training/state_tracking/parity-mlstm authors_training/state_tracking/parity-transformer" \
  PROTO_WAIT=${PROTO_WAIT:-480} bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; grep -v "XLA_FLAGS" /tmp/pw.log | tail -n 60 | cut -c1-250
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
ls -la $OUT; echo "call 3: $((SECONDS - T0)) s"
