"""The Mamba paper's synthetic tasks (Gu & Dao 2023, section 4.1): selective copying and induction
heads, Mamba against a time-invariant SSM (S4D in Mamba's gated block, `layers/s4d.py`), GLA and
softmax attention; induction heads is trained at length 256 and tested far past it (up to 32x).
The cell after the colon is `<task>-<mixer>`:

    python -m experiments.train \\
        --config=experiments/configs/paper_mamba_synthetic.py:induction_heads-mamba

Selective copying: 16 data tokens over 16 symbols scattered among blanks in 1024 tokens, then
copied after a separator (teacher-forced, every copied token scored). Induction heads: 16
symbols, the answer after the last trigger token (`synthetic.induction_heads`). Models: 2 layers
of width 64, no MLP (Mamba's blocks), init std d_model^-1/2; GLA with a short convolution.
"""

from experiments.configs.base import base_config

TASKS = {"selective_copy": dict(seq_len=1024, params={"num_tokens": 16, "num_symbols": 16}),
         "induction_heads": dict(seq_len=256, score="last", params={"num_symbols": 16})}
MIXER_NAMES = ("mamba", "s4d", "gla", "attention")
CELLS = tuple(f"{t}-{m}" for t in TASKS for m in MIXER_NAMES)
EVAL_LENGTHS = {"selective_copy": (), "induction_heads": (512, 2048, 8192)}


def get_config(cell: str = "induction_heads-mamba"):
    task, _, mixer = cell.partition("-")
    if cell not in CELLS:
        raise ValueError(f"paper_mamba_synthetic: cell {cell!r} is not one of {CELLS}")
    c = base_config()
    c.workdir = f"runs/paper_mamba_synthetic/{cell}"
    c.seeds = (0, 1, 2)
    c.task.update(name=task, **TASKS[task])
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer=mixer, ffn="none",
                   init_std=64 ** -0.5,
                   mixer_options={mixer: {"conv_size": 4} if mixer == "gla" else {}})
    c.train.update(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, weight_decay=0.1,
                   checkpoint_every=1000, keep_checkpoints=1, progress=False, log_every=100)
    # 64 test sequences per length, 16 rows at a time; softmax attention's scores at 8192 tokens
    # are 3 seeds x rows x 2 heads x 8192^2 floats (36 GiB asked at 16 rows on an H100, session
    # 26), so its rows go 4 at a time
    rows = 4 if mixer == "attention" and EVAL_LENGTHS[task] else 16
    c.eval.update(every=1000, batches=64 // rows, batch_size=rows, seq_lens=EVAL_LENGTHS[task])
    return c
