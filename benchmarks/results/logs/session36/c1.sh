# session 36, call 1: f32dots alone (does Gated DeltaNet's LM row run under 3xTF32 with the delta
# passes unpipelined; what one stage costs the delta rule), then protobg (the default job list:
# modular arithmetic DeltaNet [-1, 1] resuming at 31,000 from the carried checkpoint, parity
# Mamba [-1, 1] / [0, 1], ...), then the float32 check grid under 3xTF32 beside them, then wait
T0=$SECONDS
touch /tmp/c1stamp
ls experiments/results/protocols/authors_training/state_tracking/modular_arithmetic-deltanet_11/checkpoints
F32_S=${F32_S:-260} bash benchmarks/run_device.sh f32dots
F32_OK=1; grep -q "Traceback\|| False |" /tmp/logs/f32dots.log && F32_OK=0
grep -q "^| delta_rule | parity" /tmp/logs/f32dots.log || F32_OK=0
echo "f32dots ok: $F32_OK ($((SECONDS - T0)) s)"
PROTO_S=$((1480 - (SECONDS - T0))) PROTO_P=3 PROTO_MIN_S=300 bash benchmarks/run_device.sh protobg
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 CHECK_S=${CHECK_S:-240} CHECK_ARGS="--dtypes float32 --f32-dots tf32x3" \
  bash benchmarks/run_device.sh check
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
find benchmarks/results -name "*.json" -newer /tmp/c1stamp -exec cp {} /tmp/logs/ \;
PROTO_WAIT=$((575 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; tail -n 30 /tmp/pw.log | cut -c1-250
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
