#!/usr/bin/env bash
# One device call: `bash benchmarks/run_device.sh STEP...` on a GPU machine with no internet, from the
# repository root, with the peers' wheels in .whl (see benchmarks/anchors/README.md) where the
# anchors step runs. Every step writes its JSON under benchmarks/results/, its log to $LOGS, and is cut
# at its own time limit so that later steps still run; at the end the new JSON files and the logs
# are packed into $OUT/results.tgz (the device tool brings back at most 8 files).
#   anchors   fla and jla on this device -> benchmarks/anchors/<device>-anchors.json
#   jla       jla alone, merged into that file (the timing steps after it compare with this run's jla)
#   check     check_gpu, the full grid (every kernel vs the float32 reference, fwd + bwd; CHECK_ARGS:
#             its flags, e.g. "--ops gated_delta_rule --widths 256")
#   quick     check_gpu --quick (T=100 fp32 D=64 and T=2048 bf16 D=128)
#   checksplit  check_gpu's grid as one process per (op of CHECK_OPS, default simple_gla and
#             linear_attention, which passed at K = 256 in session 30 with CHECK_WAVES=1 and the
#             cases at 4G / 16G / 6G / 16G, beside 3 training jobs), case), all at once, each cut
#             at CHECK_S (default 420) s, under FAST_XLA (below: the kernels are Pallas calls,
#             untouched; the reference's dots go to cuBLAS unautotuned) at CHECK_WIDTHS (default
#             256); JSON check_gpu_<device>_split_<op>_<T>_<dtype><CHECK_TAG>.json; CHECK_EXTRA: more
#             flags (e.g. "--expand-v 2": V = 2 K, Gated DeltaNet's heads; give such a run its
#             CHECK_TAG, e.g. _v2). CHECK_CASES: "T:dtype:memory" per case, memory as in `share`.
#             The T = 2048 cases differentiate the lax.scan reference, whose residuals are one
#             allocation of 17.1 GiB for Gated DeltaNet at K = V = 256 (34.1 at V = 512) and 13.1
#             for gla (session 29, H100; 4-5 GiB shares ran out of memory): the defaults give them
#             24G, and a V = 2 K run needs ~50G with little else on the GPU (its float32 case
#             failed to launch a kernel at 57 GiB beside 21 GiB of other jobs). At K = 256 one case
#             took 24-280 s beside 11 others (sessions 27-29), so the serial grid does not fit a call.
#             CHECK_WAVES=1: one op's cases at a time (each op's shares freed before the next's),
#             CHECK_S then per op
#   ops       ops_gpu: the four chunk ops, impl=pallas, T in {2048, 8192, 32768}, profiled
#   sweep     ops_gpu tilings at T=2048
#   opskda    ops_gpu --ops kda: KDA's Triton kernels against its chunk form (what its "auto" waits for)
#   scans     scans_gpu: check + timings of the selective-scan kernel (SCANS_ARGS: its flags)
#   elementwise  elementwise_gpu: check + timings of the hgrn / diagonal_scan kernels (ELEMENTWISE_ARGS)
#   mlstm     mlstm_gpu: check + timings of the mLSTM kernel (MLSTM_ARGS: its flags, e.g.
#             "--f32-dots tf32x3": the check of float32 under 3xTF32 alone)
#   normaliser  normaliser_gpu: linear attention's normaliser as the op computes it (a column of
#             ones in v's dtype) against that column in float32 (the op before session 33) and z
#             apart from the kernel, checks and timings (NORM_ARGS: its flags)
#   f32dots   f32_dots_gpu: the Triton kernels' float32 products, IEEE against 3xTF32
#             (TritonChunkConfig.f32_dots), checked and timed beside the chunk form at the parity
#             and LM shapes, with full float32 matmuls in XLA (F32_ARGS: its flags); the float32
#             grid under 3xTF32: CHECK_ARGS="--dtypes float32 --f32-dots tf32x3" with `check`
#   hopper    hopper_gpu: the Mosaic GPU simple_gla kernels, checks + timings beside jla
#             (HOPPER_VARIANTS: HopperChunkConfig variants, default "default,run1,serial,approx")
#   hopperdelta  hopper_delta_gpu --quick: the Mosaic GPU delta / gated delta kernels
#   hoppergla    hopper_gla_gpu --quick: the Mosaic GPU gla kernels, checks + timings beside jla
#   hopperssm    hopper_ssm_gpu --quick: the Mosaic GPU selective-scan and mLSTM kernels
#   hopperchecks  the checks of the four Hopper scripts and check_gpu --ops kda (HOPPERCHECKS: a subset
#             of "hopper hopperdelta hoppergla hopperssm kda", and "check" for check_gpu's full grid
#             as one process per op of CHECK_OPS, "bwd" for bwd_gpu's checks), run at once
#             (compiles are CPU-bound; each process takes 12 % of the GPU's memory), their JSON
#             tagged _checks; then the hopper* steps with HOPPER_ARGS=--skip-checks time alone
#   diff      kernel_diff: each Hopper kernel call compiled vs interpreted on the same inputs, the
#             cases of DIFF_CASES (lines "ops|label substring|more flags") as concurrent processes,
#             each with DIFF_MEM (default 0.06) of the GPU's memory: lower it past 16 cases
#   bisect    kernel_bisect: every Pallas kernel of an op's primal and gradient compiled alone
#             (BISECT_ARGS, default "--op kda --dtype bfloat16"): which one fails to compile
#   report    kernel_report: registers, spills and SASS opcode counts of the delta kernels, and the
#             time of each named scope inside them (REPORT_ARGS); SASS files under logs/sass
#   host      host_overhead: sync vs device time of ours and jla's simple_gla, host events
#   gaterows  gate_rows_gpu: the scalar-gate rows' XLA forms, alone and inside simple_gla
#   bwd       bwd_gpu: the Triton chunk-family backward variants, checks + timings
#   mqar      experiments.mqar_sweep, the default grid, in /tmp/mqar (MQAR_RUNS, default experiments/
#             results/mqar_sweep/runs, is copied in first, so an interrupted sweep resumes) as MQAR_P (default
#             4) processes sharing the GPU (--shard=i/P: every P-th cell; logs/mqar_shard<i>.log),
#             each with MQAR_MEM (default 0.2) of its memory, all cut at MQAR_S (default 540) s; then
#             --collect (60 s) writes the combined JSON and PNG from the cells that finished. JSON,
#             PNG and each cell's result + metrics come back under logs/mqar. Blocks without the MLP
#             (MQAR_FFN, default none: Zoology's; "mlp" for the sweep's own default): with the MLP,
#             softmax attention stays on the plateau of always answering the context's most
#             frequent value (experiments/README.md, "MQAR accuracy against state size")
#   protocols experiments.paper_protocols jobs, at most PROTO_P (default 4) processes at a time
#             sharing the GPU, the rest queued (PROTO_JOBS: lines "protocol|cells|more flags|mem|
#             precision", default the list in the step, one cell per job; mem, optional, is that
#             job's share of the GPU's memory, a fraction or GiB ("9G", `share`), else PROTO_MEM,
#             default 0.15; a job waits until its share fits beside the running jobs' (of every
#             protobg launch) within PROTO_MEM_MAX, default 0.9 of the GPU; precision,
#             optional, that job's JAX_DEFAULT_MATMUL_PRECISION).
#             PROTO_S (default 540) is the step's wall limit: every job stops training 25 s before
#             it (paper_protocols --deadline: a cut run is kept as partial.json) and is killed at it;
#             a queued job starts only while at least PROTO_MIN_S (default 300) s are left. Every
#             model runs through its chunk form (model.impl=chunk: the vmapped seeds need no kernel
#             batching rule), written into experiments/results/protocols of this tree (cells done
#             there are reused) and brought back under logs/protocols; float32 matmuls in full
#             float32 unless the job says otherwise (as the papers' PyTorch runs without TF32; each
#             result.json records its precision); each
#             job's rc and wall time in the step's summary
#   protobg   the protocols step's scheduler detached (setsid), so that its jobs run on through the
#             next calls while the machine is held (each call within 30 s of the last); PROTO_S
#             counts from the launch; results in /tmp/protobg/results
#   protowait wait for the protobg jobs (at most PROTO_WAIT s), then bring back their logs and results
#             (under logs/protobg and logs/protocols); PROTO_CKPT ("<dir>/<protocol>/<cell> ..."
#             under the results, e.g. authors_training/state_tracking/parity-mamba_01): those cut
#             cells' newest checkpoints in $OUT/ckpt.tar.NN, 15 MiB pieces (a file back is at most
#             16 MiB). Here: `cat ckpt.tar.* | tar xf - -C experiments/results/protocols` (ignored
#             by git); a later session carries one such checkpoints folder and the cell resumes
#   vmap      vmap_gpu: each op's "auto" against its chunk form under jax.vmap at MQAR's shapes
#   cost      paper_protocols --cost --time-steps per line of COST_JOBS (its mem as in `share`), all
#             at once (COST_VMAP=1: the vmap step beside them): measured ms per train step, JSON
#             under logs/cost; a line's flags may add --profile=N (device busy time against wall
#             time, per step, from a jax.profiler trace)
#   throughput  the training run of the Hopper kernel issue: lm_shakespeare at d_model 1024, 12 layers,
#             8 heads, T 2048, batch 16, TP_STEPS steps, per "mixer:impl" of TP_RUNS (tokens/s and
#             MFU in each run's result.json, brought back under logs/tp_<mixer>_<impl>); with
#             TP_FAST_COMPILE=1 also under FAST_XLA below (off by default: its tokens/s would then
#             not compare with the runs before)
#   s5        S5 state tracking with DeltaProduct (S5_ARGS: extra --config flags) -> logs/s5
# FAST_XLA: the mqar, protocols and s5 steps (small models, compile-bound) and checksplit add
#   --xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false to XLA_FLAGS: no autotuning and
#   cuBLAS for every dot. In the 10-process protocols run (jax 0.11.2, 16 cores) single Triton GEMM
#   fusions ("gemm_fusion_dot.*", autotuned) took 2m38s-3m21s each to compile. FAST_COMPILE=0
#   keeps XLA's defaults; flags this XLA does not know are dropped (checked on its CPU client).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}; LOGS=${LOGS:-/tmp/logs}; mkdir -p "$OUT" "$LOGS"; touch /tmp/stamp
# The package as users get it: kernels/ lands as linear_jax.kernels (pyproject's package-dir). The
# device has no internet but has setuptools and wheel, hence no index and no build isolation.
# PROTO_TREE (protobg's own copy of the tree, below): no install, the link alone
if [ -n "${PROTO_TREE:-}" ]; then [ -e linear_jax/kernels ] || ln -s ../kernels linear_jax/kernels
elif ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  # fallback, only when that install fails: the link makes `import linear_jax.kernels` find
  # kernels/ from the source tree (PYTHONPATH above) as the install would
  echo "pip install -e . failed; linking linear_jax/kernels -> ../kernels"
  [ -e linear_jax/kernels ] || ln -s ../kernels linear_jax/kernels
fi
TAG=${TAG:-}
# a step in the background, for steps that only compile and check (timings run alone)
pstep() { local name=$1 limit=$2; shift 2
  ( timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; echo $? > "$LOGS/$name.rc" ) & }
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; echo "   rc=$? ($(date +%T))"; tail -n "${TAIL:-25}" "$LOGS/$name.log"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
# the training stack for the mqar and s5 steps, which the device lacks: wheels in .whl_train, from
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
#  -d .whl_train` of ml_collections flax orbax-checkpoint chex tqdm absl-py msgpack treescope
#  tensorstore etils nest_asyncio aiofiles humanize simplejson toolz rich markdown-it-py mdurl
#  pygments prometheus-client psutil uvloop protobuf pyyaml typing_extensions fsspec
#  importlib_resources zipp (the versions pinned to this machine's where they matter)
train_env() { [ -d /tmp/site_train ] || { [ -d .whl_train ] && python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --target /tmp/site_train .whl_train/*.whl; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site_train"; }
# FAST_XLA (header): FAST_FLAGS, set once, is XLA_FLAGS plus the fast-compile flags where this XLA
# takes them (an unknown flag in XLA_FLAGS aborts the process; the CPU client parses the same flags)
fast_flags() { [ -n "${FAST_FLAGS+x}" ] && return 0; FAST_FLAGS=${XLA_FLAGS:-}
  [ "${FAST_COMPILE:-1}" = 1 ] || return 0
  local f="--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"
  if XLA_FLAGS="$FAST_FLAGS $f" JAX_PLATFORMS=cpu python3 -c "import jax; jax.devices()" >/dev/null 2>&1
  then FAST_FLAGS="${FAST_FLAGS:+$FAST_FLAGS }$f"; else echo "   this XLA rejects $f: its defaults kept"; fi
  echo "   XLA_FLAGS of the small-model steps: '$FAST_FLAGS'"; }
# a job's share of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION) from "0.12" (a fraction, as
# is) or "9G" (GiB, over this GPU's total): shares in GiB hold on an H100 and an H200 alike (session
# 25 lost five jobs to fractions set for an H200's 141 GB that the H100 it got could not give)
share() { case $1 in
  *G) awk -v g="${1%G}" -v t="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \
        | head -n 1)" 'BEGIN { printf "%.3f", g * 1024 / t }' ;;
  *) echo "$1" ;; esac; }
export PROBE_T=2048,8192,32768
for s in "$@"; do case $s in
  anchors)
    TAIL=3 OUT=$LOGS step jla "${JLA_S:-150}" python3 benchmarks/anchors/probe_jla.py
    TAIL=3 OUT=$LOGS step fla "${FLA_S:-240}" python3 benchmarks/anchors/probe_fla_torch.py
    step anchors 60 python3 -m experiments.benchmarks.anchors $LOGS/*.json ;;
  jla) TAIL=3 OUT=$LOGS step jla "${JLA_S:-150}" python3 benchmarks/anchors/probe_jla.py
       step anchors 60 python3 -m experiments.benchmarks.anchors $LOGS/jla.json ;;   # read by the steps after
  check) step check "${CHECK_S:-420}" python3 -m experiments.benchmarks.check_gpu ${CHECK_ARGS:-} ;;
  quick) step quick "${CHECK_S:-150}" python3 -m experiments.benchmarks.check_gpu --quick ;;
  checksplit)
    fast_flags
    ( export XLA_FLAGS=$FAST_FLAGS
      echo "== checksplit ($(date +%T))"
      for op in ${CHECK_OPS:-simple_gla linear_attention}; do
        for c in ${CHECK_CASES:-100:float32:6G 2048:float32:24G 8192:float32:8G 2048:bfloat16:24G}; do
          IFS=: read -r t dt mem <<< "$c"; n=${op}_${t}_$dt${CHECK_TAG:-}
          XLA_PYTHON_CLIENT_MEM_FRACTION=$(share "$mem") RESULTS_TAG=split_$n pstep check_$n "${CHECK_S:-420}" \
            python3 -m experiments.benchmarks.check_gpu --ops $op --widths ${CHECK_WIDTHS:-256} \
            --lengths $t --dtypes $dt ${CHECK_EXTRA:-}
        done; [ "${CHECK_WAVES:-0}" = 1 ] && wait; done; wait )
    for f in $LOGS/check_*_*.log; do [ -f "$f" ] || continue
      echo "== ${f##*/} rc=$(cat ${f%.log}.rc) ($(date +%T))"; tail -n 2 "$f"; done ;;
  ops) TAIL=120 step ops "${OPS_S:-420}" python3 -m experiments.benchmarks.ops_gpu --impls pallas --profile \
         --reps "${REPS:-20}" --tag "$TAG" ;;
  opskda) TAIL=20 step opskda "${OPS_S:-240}" python3 -m experiments.benchmarks.ops_gpu --ops kda \
           --impls chunk pallas:triton --reps "${REPS:-20}" --tag "kda$TAG" ;;
  sweep) TAIL=40 step sweep "${SWEEP_S:-240}" python3 -m experiments.benchmarks.ops_gpu --T ${SWEEP_T:-2048} --impls pallas \
           --reps 10 --tag "sweep$TAG" --ops ${SWEEP_OPS:-simple_gla gla} --sweep ${SWEEP:-} ;;
  scans) step scans "${SCANS_S:-150}" python3 -m experiments.benchmarks.scans_gpu ${SCANS_ARGS:---sweep} ;;
  elementwise) step elementwise "${SCANS_S:-150}" python3 -m experiments.benchmarks.elementwise_gpu ${ELEMENTWISE_ARGS:---sweep} ;;
  hopper) TAIL=60 step hopper "${HOPPER_S:-300}" python3 -m experiments.benchmarks.hopper_gpu \
            --variants "${HOPPER_VARIANTS:-default,run1,serial,approx}" ${HOPPER_ARGS:-} ;;
  hopperdelta) TAIL=60 step hopperdelta "${HOPPER_S:-200}" python3 -m experiments.benchmarks.hopper_delta_gpu --quick ${HOPPER_ARGS:-} ;;
  hoppergla) TAIL=60 step hoppergla "${HOPPER_S:-200}" python3 -m experiments.benchmarks.hopper_gla_gpu --quick ${HOPPER_ARGS:-} ;;
  hopperssm) TAIL=60 step hopperssm "${HOPPER_S:-260}" python3 -m experiments.benchmarks.hopper_ssm_gpu --quick ${HOPPER_ARGS:-} ;;
  hopperchecks)
    ( export XLA_PYTHON_CLIENT_MEM_FRACTION=${CHECKS_MEM:-0.12} RESULTS_TAG=checks; L=${HOPPER_S:-240}; B=experiments.benchmarks
      echo "== hopperchecks ($(date +%T))"
      on() { [[ " ${HOPPERCHECKS:-hopper hopperdelta hoppergla hopperssm kda} " == *" $1 "* ]]; }
      on hopper && pstep hopper_checks "$L" python3 -m $B.hopper_gpu --variants "${HOPPER_VARIANTS:-default,run1}" --T
      on hopperdelta && pstep hopperdelta_checks "$L" python3 -m $B.hopper_delta_gpu --quick --T
      on hoppergla && pstep hoppergla_checks "$L" python3 -m $B.hopper_gla_gpu --quick --T
      on hopperssm && pstep hopperssm_checks "$L" python3 -m $B.hopper_ssm_gpu --quick --skip-timings
      on kda && pstep kda_checks "$L" python3 -m $B.check_gpu --ops kda
      # check_gpu's full grid, one process per op (each writes check_gpu_<device>_grid_<op>.json)
      on check && for op in ${CHECK_OPS:-linear_attention simple_gla gla delta_rule gated_delta_rule kda}; do
        RESULTS_TAG=grid_$op pstep check_$op "${CHECK_S:-$L}" python3 -m $B.check_gpu --ops $op; done
      on bwd && pstep bwd_checks "$L" python3 -m $B.bwd_gpu --T --old '' --exact1 ''
      wait )
    for f in $LOGS/*_checks.log $LOGS/check_*.log; do [ -f "$f" ] || continue
      echo "== ${f##*/} rc=$(cat ${f%.log}.rc) ($(date +%T))"; tail -n "${TAIL:-30}" "$f"; done ;;
  diff)  # kernel_diff: each case its own process (the interpreter half runs on the host's CPUs)
    ( export XLA_PYTHON_CLIENT_MEM_FRACTION=${DIFF_MEM:-0.06}; L=${DIFF_S:-420}; echo "== diff ($(date +%T))"
      cases=${DIFF_CASES:-$'simple_gla|\'gates\': \'kernel\'\ngla|K=64 V=64\ngla|K=128 V=128\nselective|\nmlstm|K=V=128'}
      i=0; while IFS='|' read -r ops case extra; do i=$((i+1))
        pstep diff$i "$L" env RESULTS_TAG=diff$i OUT=$LOGS python3 -m experiments.benchmarks.kernel_diff \
          --ops "$ops" --case "$case" $extra
      done <<< "$cases"
      wait; for f in $LOGS/diff*.log; do echo "-- $f"; grep -E "^(PASS|FAIL|ERROR)" "$f" | cut -c1-400; done ) ;;
  bisect) TAIL=40 step bisect "${BISECT_S:-240}" python3 -m experiments.benchmarks.kernel_bisect \
            ${BISECT_ARGS:---op kda --dtype bfloat16} ;;
  gaterows) TAIL=40 step gaterows "${GATEROWS_S:-240}" python3 -m experiments.benchmarks.gate_rows_gpu ;;
  report) TAIL=60 step report "${REPORT_S:-240}" python3 -m experiments.benchmarks.kernel_report \
            --keep $LOGS/sass ${REPORT_ARGS:-} ;;
  host) TAIL=20 step host "${HOST_S:-240}" python3 -m experiments.benchmarks.host_overhead ${HOST_ARGS:-} ;;
  bwd) TAIL=60 step bwd "${BWD_S:-300}" python3 -m experiments.benchmarks.bwd_gpu ${BWD_ARGS:-} ;;
  mlstm) step mlstm "${MLSTM_S:-150}" python3 -m experiments.benchmarks.mlstm_gpu ${MLSTM_ARGS:-} ;;
  f32dots) JAX_DEFAULT_MATMUL_PRECISION=float32 TAIL=20 step f32dots "${F32_S:-300}" \
             python3 -m experiments.benchmarks.f32_dots_gpu ${F32_ARGS:-} ;;
  normaliser) TAIL=20 step normaliser "${NORM_S:-240}" python3 -m experiments.benchmarks.normaliser_gpu ${NORM_ARGS:-} ;;
  mqar) train_env; fast_flags; mkdir -p /tmp/mqar
        runs=${MQAR_RUNS:-experiments/results/mqar_sweep/runs}; [ -d "$runs" ] && cp -r "$runs" /tmp/mqar/
        # a cell is mostly compilation (host CPUs), so processes sharing the GPU finish more cells
        ( export XLA_FLAGS=$FAST_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION=${MQAR_MEM:-0.2}
          L=${MQAR_S:-540}; P=${MQAR_P:-4}
          flags=(--out=/tmp/mqar --init_std=0 --ffn="${MQAR_FFN:-none}" ${MQAR_ARGS:-})
          echo "== mqar ($(date +%T)): $P shards sharing the GPU, cut at $L s"
          for ((i = 0; i < P; i++)); do
            pstep mqar_shard$i "$L" python3 -m experiments.mqar_sweep --shard=$i/$P "${flags[@]}"; done
          wait; for ((i = 0; i < P; i++)); do
            echo "-- mqar_shard$i rc=$(cat $LOGS/mqar_shard$i.rc)"; tail -n 4 $LOGS/mqar_shard$i.log | cut -c1-300; done
          # the shards' cut (timeout) leaves a cell half-done: collect lists it as missing
          TAIL=50 step mqar 60 python3 -m experiments.mqar_sweep --collect "${flags[@]}" )
        (cd /tmp/mqar && find . -name '*.json' -o -name '*.png' -o -name '*.jsonl' | grep -v checkpoints \
          | tar cf - -T - | (mkdir -p $LOGS/mqar && cd $LOGS/mqar && tar xf -)) ;;
  protocols|protorun)
    # Default: the cells left (session 36). Parity at the config's training, the authors' since
    # session 34 (20k steps, their AdamW; with it DeltaNet and Mamba [-1, 1] kept the length
    # generalisation that ours lost at 20k steps; a rerun replaces a cut run only if it gets
    # further, and resumes from the cell's checkpoint where one is there), into results/protocols/authors_training/ (the runs at the
    # earlier settings stay where they are); alone on an H100 a step was 14.9 ms (DeltaNet) /
    # 35.9 ms (Mamba), so these want few jobs beside them. Then linear
    # attention d512 (cut at 1,000 in session 34), the d64 cells on Zoology's data (linear
    # attention; GLA and Mamba-2, cut at 5,000 / 9,000), DeltaProduct S5 n_h = 3 (its 512-token
    # evaluation in batches of 32) and the 512-token cells cut early (DeltaNet d64 at 40,500,
    # Gated DeltaNet d64 at 7,500, GLA d128 at 27,000).
    # Measured (wall time per job, compiles included): state tracking with 4 processes on an H200
    # (session 22), the Mamba cells 470-520 s (0.3 of the memory each: Mamba with eigenvalues in
    # [-1, 1] scans E N = 4096 channels per layer, `Mamba.signed_scan`), DeltaNet 313-323 s, mLSTM
    # 221 s, the Transformer 171 s; with 7 processes on an H100 (session 26) the Mamba cells
    # reached 4000 of 5000 steps in ~1050 s. DeltaProduct with 3 processes on an H100 (session
    # 27): 5000 steps in 313-343 s; MQAR attention d64 / d128 with 7: 25,000 steps in 1019 / 1102
    # s; MQAR at 512 tokens through "auto" with 4 (session 28): DeltaNet / Gated DeltaNet d128 to
    # their early stop at 1,500 steps in 80 / 102 s, GLA d128 27,000 steps in 505 s; with 3 beside
    # 12 check processes on an H100 (session 29): attention d256 25,000 steps in 1008 s, DeltaNet d64
    # at 512 tokens 40,500 steps in 1364 s, GLA d128 at 512 only 25,500 in 1370 s; with 2-3 beside
    # 8 check processes (session 30): GLA d512 to its early stop at 3,000 steps in 354 s, Gated
    # DeltaNet d256 at 512 tokens at 1,500 in 249 s, selective copying with Mamba 4000 steps in
    # 712 s; with 4 beside 4 ten-seed LM jobs (session 32, z apart from the kernels, since undone):
    # Based d256 to its early stop at 2,000 steps in 473 s, d64 at 7,000 in 790 s, d128 9,000 in
    # 1143 s; linear attention d256 9,000 in 1132 s, d128 11,500 in 664 s. Hence PROTO_S
    # 540 (the device's 600 s per call less the setup) cuts the long cells: run them under protobg.
    # protorun: the same scheduler as protobg launches it (into PROTO_OUT, logs in PROTO_LOGDIR
    # as <PROTO_NAME>i).
    A="--lrs=0.0022 --set=model.impl=auto"
    # Zoology's own query gaps (power law) and fillers (random tokens), results apart (zoology_data/)
    Z="--lrs=0.0022 --set=task.params.power_a=0.01 --set=task.params.random_non_queries=True --out={out}/zoology_data"
    # the state-tracking cells at the config's (the authors') training, results apart; with
    # 3 at once on an H100 (session 35) DeltaNet parity ran its 20,000 steps in ~1,010 s; in
    # session 36, 3 at once, DeltaNet modular arithmetic went from 31,000 to 54,000 of its
    # 100,000 steps in 1,177 s and the Mamba parity cells to 10,000 of 20,000 in ~1,140 s; in
    # session 38, 4 at once, parity Mamba [-1, 1] its last 10,000 steps in 1,024 s, mLSTM and the
    # Transformer all 20,000 in 777 / 522 s, modular arithmetic 54,000 -> 78,000 in 767 s. Cut
    # cells are checkpointed under experiments/results/protocols/authors_training/state_tracking/
    # <cell>/checkpoints (ignored by git): carry one per call (14-17 MB; the tree is ~48 of the
    # 64 MiB a call takes) and it resumes. The first launch takes modular arithmetic DeltaNet
    # [-1, 1] (carried, at 78,000) with the other modular arithmetic cells from 0; a later call
    # launches parity Mamba [0, 1] (PROTO_JOBS), carrying its checkpoint (10,000). The 3-layer
    # in-context regression cell at 50,000 steps and two rates is small (T = 11) and queues in the
    # fourth slot: on the CPU 10,000 steps took ~48 min, on the GPU far less.
    O="--out={out}/authors_training"
    jobs="state_tracking|^modular_arithmetic-deltanet_11|$O|6G|float32
state_tracking|^modular_arithmetic-deltanet_01|$O|6G|float32
state_tracking|^modular_arithmetic-mamba_11|$O|14G|float32
icl_regression|^lsa-3layers-bidir|--steps=50000 --set=train.lr=1e-3 --out={out}/icl_regression_50k_lr1e-3|3G|float32
icl_regression|^lsa-3layers-bidir|--steps=50000 --set=train.lr=3e-3 --out={out}/icl_regression_50k_lr3e-3|3G|float32
state_tracking|^modular_arithmetic-mlstm|$O|6G|float32
state_tracking|^modular_arithmetic-transformer|$O|6G|float32
state_tracking|^parity-mamba_01|$O|14G|float32
state_tracking|^modular_arithmetic-mamba_01|$O|14G|float32
mqar|^linear_attention-d512-T256|$A|20G|tensorfloat32
mqar|^linear_attention-d64-T256|$Z --set=model.impl=auto|6G|tensorfloat32
mqar|^gla-d64-T256|$Z --set=model.impl=auto|6G|tensorfloat32
mqar|^mamba2-d64-T256|$Z --set=model.impl=auto|10G|tensorfloat32
deltaproduct|s5-nh3|--set=eval.batch_size=32 --set=eval.batches=16|10G|float32
mqar|^gla-d128-T512|$A|7G|tensorfloat32
mqar|^gated_deltanet-d64-T512|$A|8G|tensorfloat32
mqar|^deltanet-d64-T512|$A|5G|tensorfloat32"
    fast_flags
    ( export XLA_FLAGS=$FAST_FLAGS
      out=${PROTO_OUT:-experiments/results/protocols}; plogs=${PROTO_LOGDIR:-$LOGS}; pn=${PROTO_NAME:-proto}
      L=${PROTO_S:-540}; P=${PROTO_P:-4}; end=$((SECONDS + L)); i=0
      echo "== protocols ($(date +%T)): $P processes at a time, cut at $L s"
      # a running job's share lives in <job>.mem (in the logs folder, which protobg's launches
      # share) until it ends: a job starts only when its share fits beside every running one
      pjob() { local name=$1 limit=$2 mem=$3 t0=$SECONDS; shift 3; echo "$mem" > "$plogs/$name.mem"
        ( timeout "$limit" "$@" > "$plogs/$name.log" 2>&1; echo $? > "$plogs/$name.rc"
          echo $((SECONDS - t0)) > "$plogs/$name.s"; rm -f "$plogs/$name.mem" ) & }
      over() { cat "$plogs"/*.mem 2>/dev/null | awk -v m="$1" -v x="${PROTO_MEM_MAX:-0.9}" \
        '{ u += $1 } END { exit !(u + m > x) }'; }
      while IFS='|' read -r proto cells extra mem prec; do
        [ -n "$proto" ] || continue; i=$((i+1))
        while [ "$(jobs -rp | wc -l)" -ge "$P" ]; do wait -n; done
        mem=$(share "${mem:-${PROTO_MEM:-0.15}}")
        # session 31: two jobs queued behind ended ones found the GPU full (shares of 0.97 in all)
        while over "$mem" && [ $((end - SECONDS)) -ge "${PROTO_MIN_S:-300}" ]; do sleep 5; done
        left=$((end - SECONDS))
        if [ "$left" -lt "${PROTO_MIN_S:-300}" ]; then
          echo "   $pn$i $proto|$cells: not started ($left s left)"; continue; fi
        prec=${prec:-float32}; extra=${extra//\{out\}/$out}     # "{out}": this step's results folder
        echo "   $pn$i $proto|$cells|$extra, memory $mem, $prec matmuls, at +$((L - left)) s"
        JAX_DEFAULT_MATMUL_PRECISION=$prec XLA_PYTHON_CLIENT_MEM_FRACTION=$mem pjob $pn$i "$left" "$mem" python3 -m experiments.paper_protocols \
          --protocol="$proto" --cells="$cells" --out="$out" --set=model.impl=chunk \
          --deadline=$((left - 25)) $extra
      done <<< "${PROTO_JOBS:-$jobs}"
      wait; for f in $plogs/$pn*.log; do n=${f%.log}
        echo "-- $f rc=$(cat $n.rc) $(cat $n.s 2>/dev/null) s"; tail -n 6 "$f" | cut -c1-300; done
      [ "$s" = protocols ] && find experiments/results/protocols -newer /tmp/stamp -type f ! -path '*checkpoints*' \
        | tar cf - -T - | (mkdir -p $LOGS/protocols && cd $LOGS/protocols && tar xf -) ) ;;
  protobg)
    # The protocols scheduler detached (setsid): it outlives this call and runs on while the
    # machine is held, through later calls, which must each come within the machine's idle time
    # (30 s) of the last. PROTO_S is then the time from the launch to the jobs' kill, across
    # calls. Results go to /tmp/protobg/results (seeded once with this tree's
    # experiments/results/protocols: cells done there are reused), logs to /tmp/protobg/logs as
    # b<launch>_<job>; a later launch adds its jobs beside the running ones. protowait collects.
    # A later launch also takes the checkpoints its call carried that the results lack: a call
    # carries one cut cell's checkpoints at most (the tree is ~46 of its 64 MiB), so cells that
    # resume are launched one call each.
    mkdir -p /tmp/protobg/logs
    if [ ! -d /tmp/protobg/results ]; then cp -a experiments/results/protocols /tmp/protobg/results
      sleep 1; touch /tmp/protobg/stamp
    else (cd experiments/results/protocols && find . -type d -name checkpoints -prune | while read -r d; do
            [ -e "/tmp/protobg/results/$d" ] && continue; echo "   resumable: ${d%/checkpoints}"
            mkdir -p "/tmp/protobg/results/${d%/checkpoints}" && cp -a "$d" "/tmp/protobg/results/$d"; done)
    fi
    n=$(ls /tmp/protobg/ | grep -c '^launch'); touch /tmp/protobg/launch$n /tmp/protobg/running$n
    # the jobs run from a copy of the tree: each device call copies the tree in afresh, and a job
    # importing a module while that happens fails (session 30: "No module named
    # 'linear_jax.kernels.gpu'" in a job started 30 s before the next call)
    tree=/tmp/protobg/tree$n; rm -rf "$tree"; mkdir -p "$tree"
    tar cf - --exclude=./.git --exclude=./runs . | tar xf - -C "$tree"
    (cd "$tree" && PROTO_TREE=1 PROTO_OUT=/tmp/protobg/results PROTO_LOGDIR=/tmp/protobg/logs \
      PROTO_NAME=b${n}_ OUT=/tmp/protobg/out \
      setsid nohup bash -c "bash benchmarks/run_device.sh protorun; rm -f /tmp/protobg/running$n" \
      > /tmp/protobg/scheduler$n.log 2>&1 < /dev/null &)      # this call's later `wait`s must not wait for it
    echo "== protobg ($(date +%T)): launch $n, PROTO_S ${PROTO_S:-540}" ;;
  protowait)
    # Waits until every protobg launch has ended or PROTO_WAIT (default 480) s have passed, then
    # brings back what is there: the logs, and the results written since the first launch
    # (finished cells' result.json, cut ones' partial.json, every run's metrics so far).
    if [ ! -d /tmp/protobg ]; then       # a fresh machine: the held one went back, its jobs with it
      echo "== protowait: no protobg launch on this machine"; continue; fi
    W=${PROTO_WAIT:-480}; t=$SECONDS
    while ls /tmp/protobg/running* >/dev/null 2>&1 && [ $((SECONDS - t)) -lt "$W" ]; do sleep 5; done
    echo "== protowait ($(date +%T)) after $((SECONDS - t)) s: $(ls /tmp/protobg/running* 2>/dev/null | wc -l) launches running"
    for f in /tmp/protobg/scheduler*.log; do echo "-- $f"; grep -v '^   XLA_FLAGS' "$f" | tail -n 25 | cut -c1-300; done
    for f in /tmp/protobg/logs/*.log; do n=${f%.log}
      echo "-- $f rc=$(cat $n.rc 2>/dev/null || echo running) $(cat $n.s 2>/dev/null) s"; tail -n 3 "$f" | cut -c1-300; done
    mkdir -p $LOGS/protobg && cp /tmp/protobg/logs/* /tmp/protobg/scheduler*.log $LOGS/protobg/
    (cd /tmp/protobg/results && find . -newer /tmp/protobg/stamp -type f ! -path '*checkpoints*' | tar cf - -T -) \
      | (mkdir -p $LOGS/protocols && cd $LOGS/protocols && tar xf -)
    ck=$(cd /tmp/protobg/results && for c in ${PROTO_CKPT:-}; do
           n=$(ls "$c/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1)
           [ -n "$n" ] && echo "$c/checkpoints/$n"; done)
    if [ -n "$ck" ]; then rm -f "$OUT"/ckpt.tar.*
      (cd /tmp/protobg/results && tar cf - $ck) | split -b 15M -d - "$OUT/ckpt.tar."
      echo "   checkpoints back: $(echo $ck) in $(ls "$OUT" | grep -c '^ckpt.tar')" piece\(s\); fi ;;
  vmap) TAIL=40 step vmap "${VMAP_S:-240}" python3 -m experiments.benchmarks.vmap_gpu ${VMAP_ARGS:-} ;;
  cost)
    # paper_protocols --cost --time-steps (COST_STEPS, default 10) on this GPU, each line of
    # COST_JOBS ("protocol|cells|more flags|mem") one process, and with COST_VMAP=1 the vmap step
    # beside them, all at once (compiles are CPU-bound); each cut at COST_S s. JSON: logs/cost
    fast_flags; i=0; echo "== cost ($(date +%T))"
    while IFS='|' read -r proto cells extra mem; do [ -n "$proto" ] || continue; i=$((i+1))
      XLA_FLAGS=$FAST_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION=$(share "${mem:-0.12}") pstep cost$i "${COST_S:-400}" \
        python3 -m experiments.paper_protocols --protocol="$proto" --cells="$cells" --cost \
        --time-steps="${COST_STEPS:-10}" --out=/tmp/cost $extra
    done <<< "${COST_JOBS:-}"
    [ "${COST_VMAP:-0}" = 1 ] && XLA_PYTHON_CLIENT_MEM_FRACTION=${VMAP_MEM:-0.2} pstep vmap "${COST_S:-400}" \
      python3 -m experiments.benchmarks.vmap_gpu ${VMAP_ARGS:-}
    wait; echo "   done ($(date +%T))"
    for f in $LOGS/cost*.log $LOGS/vmap.log; do [ -e "$f" ] || continue
      echo "-- $f rc=$(cat ${f%.log}.rc)"; grep -v "^WARNING\|^I0\|^W0" "$f" | tail -n 32 | cut -c1-250; done
    mkdir -p $LOGS/cost && find /tmp/cost -name '*_cost_*.json' -exec cp {} $LOGS/cost/ \; ;;
  throughput)
    for spec in ${TP_RUNS:-gated_deltanet:auto gated_deltanet:pallas:mosaic_gpu gla:auto gla:pallas:mosaic_gpu}; do
      m=${spec%%:*}; impl=${spec#*:}; n=tp_${m}_${impl//:/_}
      tpx=${XLA_FLAGS:-}; [ "${TP_FAST_COMPILE:-0}" = 1 ] && { fast_flags; tpx=$FAST_FLAGS; }
      XLA_FLAGS=$tpx TAIL=6 step "$n" "${TP_S:-150}" python3 -m experiments.train --config=experiments/configs/lm_shakespeare.py \
        --config.model.mixer="$m" --config.model.impl="$impl" --config.model.d_model=1024 \
        --config.model.num_layers=12 --config.model.num_heads=8 --config.task.seq_len=2048 \
        --config.train.batch_size=16 --config.train.steps="${TP_STEPS:-60}" --config.eval.every=100000 \
        --config.train.checkpoint_every=0 --config.train.progress=False --config.workdir="/tmp/$n"
      mkdir -p "$LOGS/$n" && cp "/tmp/$n/result.json" "$LOGS/$n/" 2>/dev/null
    done ;;
  s5) train_env; fast_flags; XLA_FLAGS=$FAST_FLAGS TAIL=30 step s5 "${S5_S:-240}" python3 -m experiments.train --config=experiments/configs/state_tracking.py:s5 \
        --config.workdir=/tmp/s5 --config.train.progress=False ${S5_ARGS:-}
      mkdir -p $LOGS/s5 && cp /tmp/s5/*.json* /tmp/s5/*.png $LOGS/s5/ 2>/dev/null ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
find benchmarks/results benchmarks/anchors -name '*.json' -newer /tmp/stamp > /tmp/new
tar czf "$OUT/results.tgz" -T /tmp/new -C "$(dirname "$LOGS")" "$(basename "$LOGS")" && tar tzf "$OUT/results.tgz"
