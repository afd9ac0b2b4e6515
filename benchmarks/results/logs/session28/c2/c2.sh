# session 28, call 2 (the 288 s left on the warm machine): four MQAR cells at 512 tokens through
# "auto", at once, in the foreground protocols step, cut at 200 s
A="--lrs=0.0022 --set=model.impl=auto"; PROTO_S=200 PROTO_P=4 PROTO_MIN_S=100 PROTO_JOBS="mqar|^deltanet-d64-T512|$A|8G|tensorfloat32
mqar|^gated_deltanet-d64-T512|$A|10G|tensorfloat32
mqar|^deltanet-d256-T512|$A|14G|tensorfloat32
mqar|^gated_deltanet-d256-T512|$A|16G|tensorfloat32" bash benchmarks/run_device.sh protocols
