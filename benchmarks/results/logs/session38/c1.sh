# session 37, call 1: protobg (parity Mamba [-1, 1] resuming at 10,000 from the carried
# checkpoint; parity mLSTM and Transformer from 0), the delta-family float32 check grid under
# 3xTF32 beside them (a check only), then the jobs' progress
T0=$SECONDS
ls experiments/results/protocols/authors_training/state_tracking/*/checkpoints
O="--out={out}/authors_training"
PROTO_JOBS="state_tracking|^parity-mamba_11|$O|14G|float32
state_tracking|^parity-mlstm|$O|6G|float32
state_tracking|^parity-transformer|$O|6G|float32" PROTO_S=${PROTO_S:-1450} PROTO_P=4 bash benchmarks/run_device.sh protobg
RESULTS_TAG=delta XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 CHECK_S=$((545 - (SECONDS - T0))) \
  CHECK_ARGS="--dtypes float32 --f32-dots tf32x3 --ops delta_rule gated_delta_rule kda" \
  bash benchmarks/run_device.sh check 2>&1 | cut -c1-250
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
echo "call 1: $((SECONDS - T0)) s"
