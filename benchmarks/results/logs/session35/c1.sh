# session 35, call 1: f32dots alone (the Triton kernels' float32 products, IEEE against 3xTF32,
# beside the chunk form), then protobg (the state-tracking cells at the config's training, into
# authors_training/, checkpointing so that a cut cell can resume in a later session), then the
# float32 check grid under 3xTF32 beside them (a check, not a timing), then wait
T0=$SECONDS
touch /tmp/c1stamp
F32_S=${F32_S:-260} bash benchmarks/run_device.sh f32dots
F32_OK=1; grep -q "FAILED\|Traceback\|| False |" /tmp/logs/f32dots.log && F32_OK=0
grep -q "^| delta_rule | parity" /tmp/logs/f32dots.log || F32_OK=0
echo "f32dots ok: $F32_OK ($((SECONDS - T0)) s)"
O="--out={out}/authors_training"
JA="state_tracking|^parity-deltanet_11|$O|6G|float32
state_tracking|^parity-deltanet_01|$O|6G|float32
state_tracking|^modular_arithmetic-deltanet_11|$O|6G|float32
state_tracking|^parity-mamba_01|$O|14G|float32"
PROTO_S=$((1500 - (SECONDS - T0))) PROTO_P=3 PROTO_MIN_S=240 PROTO_JOBS="$JA" bash benchmarks/run_device.sh protobg
if [ "$F32_OK" = 1 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 CHECK_S=${CHECK_S:-240} CHECK_ARGS="--dtypes float32 --f32-dots tf32x3" \
    bash benchmarks/run_device.sh check
fi
nvidia-smi --query-gpu=memory.used,memory.total,utilization.gpu --format=csv
find benchmarks/results -name "*.json" -newer /tmp/c1stamp -exec cp {} /tmp/logs/ \;
PROTO_WAIT=$((575 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait > /tmp/pw.log 2>&1; tail -n 30 /tmp/pw.log | cut -c1-250
for f in /tmp/protobg/logs/*.log; do echo "## ${f##*/}: $(tr '\r' '\n' < "$f" | grep -a 'step' | tail -n 1 | cut -c1-160)"; done
