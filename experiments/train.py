"""Train a model on a task: the one entry point of the experiments.

    python -m experiments.train --config=experiments/configs/mqar.py
    python -m experiments.train --config=experiments/configs/mqar.py \\
        --config.model.mixer=gla --config.train.steps=2000 --config.workdir=runs/mqar_gla
    python -m experiments.train --config=experiments/configs/state_tracking.py:s5

Any config field can be overridden with `--config.<path>=<value>`. `--config.seeds="(0,1,2)"`
trains those seeds together, vmapped on one device (`linear_jax.training.seeds`; per-seed and
mean / std metrics; their stacked states checkpointed at evaluations). Running again with the
same workdir resumes from its newest checkpoint. Metrics go to `<workdir>/metrics.jsonl`
(`python -m experiments.plot <workdir> ...` draws them); the config to `<workdir>/config.json`;
the final metrics, throughput (step time, tokens/s, MFU) and compile time to
`<workdir>/result.json`. `--config.train.progress=False` logs a line every `train.log_every`
steps instead of a progress bar; `--config.train.peak_flops=<FLOP/s per device>` sets the peak
MFU is measured against where the device is not in `linear_jax.models.flops.PEAKS`.

Devices: one CPU or GPU as is; simulated CPU devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and e.g. `--config.mesh.fsdp=2
--config.mesh.tensor=2` (data fills the rest); a multi-host cluster with `--distributed` on every
host (cluster auto-detected, or `--coordinator_address=host:port --num_processes=N
--process_id=i`), where the mesh spans the devices of all hosts and each host feeds its own.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from linear_jax.training import checkpoint, evaluation, loop, mesh, seeds

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file in experiments/configs.",
                                          lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    checkpoint.quiet_orbax_logs()
    if config is None:
        sys.exit("error: --config is required, e.g. --config=experiments/configs/quickstart.py")
    if _DISTRIBUTED.value:
        mesh.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    workdir = pathlib.Path(config.workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    logging.info("config:\n%s", config)
    try:
        result = (seeds.train_seeds(config, config.seeds) if config.get("seeds") else
                  loop.train(config))
    except mesh.ConfigError as e:
        sys.exit(f"error: {e}")
    if result["stopped"] == "nan":
        sys.exit(f"error: non-finite loss at step {result['step']}; stopped")
    tp = result.get("throughput", {})
    if tp.get("tokens_per_s"):
        mfu = f", MFU {100 * tp['mfu']:.1f}%" if tp.get("mfu") else ""
        print(f"throughput: {tp['tokens_per_s']:,.0f} tokens/s, {1e3 * tp['step_time_s']:.1f} ms "
              f"per step{mfu} (train step compiled in {result['compile']['compile_s']:.1f} s)")
    mean = f" (mean of {len(config.seeds)} seeds)" if config.get("seeds") else ""
    print(f"final (step {result['step']}, {result['seconds']:.0f} s){mean}: "
          + evaluation.describe(result["eval"]).replace(" acc ", " accuracy "))
    if jax.process_index() == 0:
        (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
