# session 27, call 1: launch 0 (Mamba-synthetic selective copying with attention, DeltaProduct S5
# and S3, MQAR attention d64 / d128 to 25,000 steps), in the foreground check_gpu of delta_rule and
# gated_delta_rule at K = V = 256 (the one-stage fix) and vmap of gated_delta_rule's "auto" at d512;
# then launch 1 (induction heads with attention, whose eval at 8192 tokens needs the check's memory),
# then protowait to the call's end
T0=$SECONDS
TOT=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
P=7; [ "$TOT" -gt 100000 ] && P=11
export PROTO_S=1150 PROTO_P=$P PROTO_MIN_S=300
J=""
add() { J+="$1"$'\n'; }
ms="mamba_synthetic|"
add "${ms}selective_copy-attention||15G|float32"
add "deltaproduct|s5-nh4||6G|float32"; add "deltaproduct|s5-nh3||5G|float32"
add "deltaproduct|s5-nh2||4G|float32"; add "deltaproduct|s5-nh1||3.5G|float32"
add "mqar|^attention-d128-T256|--lrs=0.0022|5G|tensorfloat32"
add "mqar|^attention-d64-T256|--lrs=0.0022|4G|tensorfloat32"
add "deltaproduct|s3-nh4||6G|float32"; add "deltaproduct|s3-nh3||5G|float32"
add "deltaproduct|s3-nh2||4G|float32"; add "deltaproduct|s3-nh1||3.5G|float32"
export PROTO_JOBS="$J"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 CHECK_S=300 CHECK_ARGS="--ops delta_rule gated_delta_rule --widths 256" \
  RESULTS_TAG=k256 bash benchmarks/run_device.sh protobg check
XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 VMAP_S=120 VMAP_ARGS="--ops gated_delta_rule --widths 512 --B 64" \
  RESULTS_TAG=k512 bash benchmarks/run_device.sh vmap
cp benchmarks/results/*k256*.json benchmarks/results/*k512*.json /tmp/logs/ 2>/dev/null
export PROTO_S=$((1150 - (SECONDS - T0))) PROTO_P=1 PROTO_MIN_S=200
export PROTO_JOBS="${ms}induction_heads-attention||20G|float32"
bash benchmarks/run_device.sh protobg
PROTO_WAIT=$((565 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait
