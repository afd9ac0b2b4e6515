# session 30, call 1: protobg launch A (Based d64-d256 through "auto", GLA d512; queued: selective
# copying with Mamba), checksplit of simple_gla and linear_attention at K = 256 in two waves (one op at
# a time), then protobg launch B (Gated DeltaNet d512 and d256 at 512 tokens, Mamba-2 d256; queued:
# Mamba-2 d128, S5 n_h = 3) into the memory the checks free
T0=$SECONDS; TOT_S=${TOT_S:-1500}
A="--lrs=0.0022 --set=model.impl=auto"
JA="mqar|^based-d64-T256|$A|6G|tensorfloat32
mqar|^based-d128-T256|$A|8G|tensorfloat32
mqar|^gla-d512-T256|$A|12G|tensorfloat32
mqar|^based-d256-T256|$A|10G|tensorfloat32
mamba_synthetic|selective_copy-mamba||6G|float32"
PROTO_S=$TOT_S PROTO_P=3 PROTO_JOBS="$JA" bash benchmarks/run_device.sh protobg
CHECK_WAVES=1 CHECK_S=${CHECK_S:-255} CHECK_CASES="100:float32:4G 2048:float32:16G 8192:float32:6G 2048:bfloat16:16G" \
  bash benchmarks/run_device.sh checksplit
cp benchmarks/results/check_gpu_*split*.json /tmp/logs/ 2>/dev/null
JB="mqar|^gated_deltanet-d512-T256|$A|16G|tensorfloat32
mqar|^gated_deltanet-d256-T512|$A|10G|tensorfloat32
mqar|^mamba2-d256-T256|$A|10G|tensorfloat32
mqar|^mamba2-d128-T256|$A|8G|tensorfloat32
deltaproduct|s5-nh3|--set=eval.batch_size=32 --set=eval.batches=16|8G|float32"
PROTO_S=$((TOT_S - (SECONDS - T0))) PROTO_P=3 PROTO_JOBS="$JB" bash benchmarks/run_device.sh protobg
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
sleep 5; ls /tmp/protobg/logs; tail -n 3 /tmp/protobg/scheduler*.log
