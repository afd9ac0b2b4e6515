# session 10's device calls (not part of the library; removed after the session)
set -x
case $1 in
B1)
  ( HOPPERCHECKS="hopper hopperssm kda" HOPPER_VARIANTS=default,split,split_xla,three_waits HOPPER_S=520 \
      OUT=$OUT/checks bash benchmarks/run_device.sh hopperchecks > /tmp/checks.out 2>&1 ) &
  sleep 20
  DIFF_MEM=0.035 DIFF_S=520 OUT=$OUT/diff DIFF_CASES="$(cat <<'C'
simple_gla|K=128 V=128 {'grad_items': 'split',|--shape B=2,T=512,H=4,seed=1
simple_gla|K=128 V=128 {'grad_items': 'split',|--shape B=2,T=512,H=4,seed=2
simple_gla|K=128 V=128 {'grad_items': 'split_xla',|--shape B=2,T=512,H=4,seed=1
gla|K=128 V=128|--pieces 0 --shape B=2,T=256,H=2
gla|K=128 V=128|--pieces 0 --shape B=2,T=256,H=2 --variant probe_ein
gla|K=128 V=128|--pieces 0 --shape B=2,T=256,H=2 --variant probe_gin
gla|K=128 V=128|--pieces 0 --shape B=2,T=256,H=2 --variant probe_in
gla|K=128 V=128|--pieces 0 --shape B=2,T=256,H=2 --variant qk_tiles
gla|K=64 V=64|--pieces 0
gla|K=64 V=64|--pieces 0 --variant probe_ein
gla|K=64 V=64|--pieces 0 --variant probe_gin
gla|K=64 V=64|--pieces 0 --variant probe_in
gla|K=64 V=64|--pieces 0 --variant probe_dqt
gla|K=64 V=64|--pieces 0 --variant probe_lev
gla|K=64 V=64|--pieces 0 --variant dq_smem
gla|K=64 V=64|--pieces 0 --variant pad_k128
C
)" bash benchmarks/run_device.sh diff 2>&1 | tail -60
  wait; cat /tmp/checks.out | tail -80 ;;
B2)
  HOPPER_S=330 TAIL=60 OUT=$OUT/t HOPPER_VARIANTS=${VARS:-default,split_xla,three_waits} \
    HOPPER_ARGS="--skip-checks --breakdown default@2048,split_xla@2048" bash benchmarks/run_device.sh hopper ;;
C1)
  ( HOPPERCHECKS="hopper" HOPPER_VARIANTS=default HOPPER_S=300 \
      OUT=$OUT/checks bash benchmarks/run_device.sh hopperchecks > /tmp/checks.out 2>&1 ) &
  sleep 40   # run_device.sh's pip install -e . first
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 PYTHONPATH=$PWD timeout 300 python3 -m experiments.benchmarks.check_gpu \
    --ops kda > $OUT/kda_checks.log 2>&1
  grep -E "^(ok|FAIL)" $OUT/kda_checks.log | cut -c1-160
  wait; grep -E "^(PASS|FAIL)" /tmp/logs/hopper_checks.log | cut -c1-260
  HOPPER_S=240 TAIL=40 OUT=$OUT/t HOPPER_VARIANTS=default \
    HOPPER_ARGS="--skip-checks --profile --breakdown default@2048,default@32768" bash benchmarks/run_device.sh hopper ;;
C2)
  [ -n "${GLA_CHECKS:-}" ] && HOPPERCHECKS="hoppergla" HOPPER_S=$GLA_CHECKS OUT=$OUT/glachecks \
    bash benchmarks/run_device.sh hopperchecks
  HOPPER_S=${SSM_S:-150} TAIL=40 OUT=$OUT/ssm HOPPER_ARGS=--skip-checks bash benchmarks/run_device.sh hopperssm
  [ -n "${GLA_T:-}" ] && HOPPER_S=$GLA_T TAIL=40 OUT=$OUT/gla HOPPER_ARGS="--skip-checks" bash benchmarks/run_device.sh hoppergla ;;
esac
