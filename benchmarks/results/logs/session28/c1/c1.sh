# session 28, one call (device starts failed for most of the session's budget): every job at once
# in the background (protobg: MQAR through "auto": Gated DeltaNet d512, and DeltaNet, Gated
# DeltaNet and GLA d128 at 512 tokens; on an H200 also DeltaProduct S5 n_h=3, DeltaNet d64 at 512
# tokens and linear attention d128), in the foreground check_gpu of gated_delta_rule and gla at
# K = V = 256, float32 + bf16 (gla's one-pass forward now unpipelined past 128), then protowait to
# the call's end
T0=$SECONDS
ALL=${ALL_S:-545}
TOT=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
J=""
add() { J+="$1"$'\n'; }
A="--lrs=0.0022 --set=model.impl=auto"
add "mqar|^gated_deltanet-d512-T256|$A|20G|tensorfloat32"
add "mqar|^deltanet-d128-T512|$A|8G|tensorfloat32"
add "mqar|^gated_deltanet-d128-T512|$A|10G|tensorfloat32"
add "mqar|^gla-d128-T512|$A|7G|tensorfloat32"
if [ "$TOT" -gt 100000 ]; then
  add "deltaproduct|s5-nh3|--set=eval.batch_size=32 --set=eval.batches=16|10G|float32"
  add "mqar|^deltanet-d64-T512|$A|5G|tensorfloat32"
  add "mqar|^linear_attention-d128-T256|$A|6G|tensorfloat32"
fi
export PROTO_S=$ALL PROTO_P=8 PROTO_MIN_S=200 PROTO_JOBS="$J"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 CHECK_S=330 CHECK_ARGS="--ops gated_delta_rule gla --widths 256" \
  RESULTS_TAG=k256 bash benchmarks/run_device.sh protobg check
cp benchmarks/results/*k256*.json /tmp/logs/ 2>/dev/null
PROTO_WAIT=$((ALL + 10 - (SECONDS - T0))) bash benchmarks/run_device.sh protowait
