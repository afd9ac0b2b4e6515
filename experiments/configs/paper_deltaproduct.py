"""Group word problems at the setup of Siems et al. 2025 (*DeltaProduct: Improving State-Tracking
in Linear RNNs via Householder Products*): S3 and S5, the running composition of random
permutations scored at every position (`synthetic.s3`, `synthetic.s5`), trained at length 128 and
tested at 256 and 512; one layer of DeltaProduct with n_h Householder steps per token and
eigenvalues in [-1, 1] (beta in [0, 2]), n_h swept over 1 (DeltaNet), 2, 3 and 4; scaled
accuracy; three seeds. The cell after the colon is `<group>-nh<n_h>`:

    python -m experiments.train --config=experiments/configs/paper_deltaproduct.py:s5-nh4

The paper's claim under test: more Householder steps per token solve larger groups with one
layer (a product of n_h reflections can represent more of the group's permutations).
"""

from experiments.configs.base import base_config

GROUPS = ("s3", "s5")
NH = (1, 2, 3, 4)
CELLS = tuple(f"{g}-nh{n}" for g in GROUPS for n in NH)


def get_config(cell: str = "s3-nh2"):
    group, _, nh = cell.partition("-nh")
    if group not in GROUPS or not nh.isdigit() or int(nh) not in NH:
        raise ValueError(f"paper_deltaproduct: cell {cell!r} is not one of {CELLS}")
    c = base_config()
    c.workdir = f"runs/paper_deltaproduct/{cell}"
    c.seeds = (0, 1, 2)
    c.task.update(name=group, seq_len=128, params={})
    c.model.update(d_model=128, num_layers=1, num_heads=4, mixer="delta_product",
                   dtype="float32", init_std=128 ** -0.5,
                   mixer_options={"delta_product": {"num_householder": int(nh), "gated": False,
                                                    "allow_neg_eigval": True}})
    c.train.update(steps=5000, batch_size=128, lr=1e-3, warmup_steps=200, weight_decay=0.1,
                   checkpoint_every=1000, keep_checkpoints=1, progress=False, log_every=100)
    c.eval.update(every=1000, batches=4, batch_size=128, seq_lens=(256, 512))
    return c
