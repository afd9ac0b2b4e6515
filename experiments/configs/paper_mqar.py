"""Multi-query associative recall at Zoology's setup (Arora et al. 2023, *Zoology: Measuring and
Improving Recall in Efficient Language Models*): a vocabulary of 8192,
16 key-value pairs in 256 tokens and 64 pairs in 512, two layers with no MLP (`ffn="none"`),
widths 64 to 512, the best of Zoology's learning-rate sweep per cell (`LRS`: 4 rates log-spaced
over [1e-4, 1e-2]), its batch sizes (256 rows at 256 tokens, 128 at 512) and its length of
training (64 epochs of 100,000 sequences: 25,000 steps at 256 tokens, 50,000 at 512), stopped
early once every seed's eval accuracy reaches 0.99. Zoology draws a fixed training set of 100,000
sequences and repeats it; here every batch is fresh. The head is applied to the query positions
only (`task.gather`). The queries sit at uniformly drawn slots after the pairs, with the blank 0
between them; Zoology's generator draws the slots from a power law and fills the gaps with random
tokens: `task.params.power_a=0.01` and `random_non_queries=True` (`synthetic.mqar`), left out of
the grid so that its runs stay the same experiment. The cell after the colon is
`<mixer>-d<width>-T<len>`:

    python -m experiments.train --config=experiments/configs/paper_mqar.py:based-d128-T256

Mixers: softmax attention as Zoology's (one head, learned absolute positions, no RoPE), the same
attention with RoPE in place of the learned positions (`attention_rope`, ours), linear attention,
Based, GLA, DeltaNet, Gated DeltaNet and Mamba-2 (two heads); every mixer but attention has a short
convolution of width 4 (its own, or `OPTIONS`), and the initialisation is d_model^-1/2. Based's
Taylor feature map is the compact one (`Based(compact=True)`): Zoology's map repeats each product
q_i q_j of the quadratic block for i != j; keeping it once, weighted by sqrt(2), gives the same
phi(q) . phi(k) in 153 features instead of 273, so the same model with a state of 153 rows, which
the GPU kernels take (the 273 rows were past their 256).
"""

from experiments.configs.base import base_config

MIXER_NAMES = ("attention", "attention_rope", "linear_attention", "based", "gla", "deltanet",
               "gated_deltanet", "mamba2")
WIDTHS = (64, 128, 256, 512)
SETTINGS = {256: 16, 512: 64}                  # sequence length -> key-value pairs
BATCH = {256: 256, 512: 128}                    # sequence length -> rows per batch (Zoology's)
EPOCHS, EXAMPLES = 64, 100_000                  # Zoology's max_epochs over its training set
CELLS = tuple(f"{m}-d{d}-T{t}" for t in SETTINGS for m in MIXER_NAMES for d in WIDTHS)
LRS = (1e-4, 4.6e-4, 2.2e-3, 1e-2)               # np.logspace(-4, -2, 4), rounded
# mixers with no short convolution by default (DeltaNet, Gated DeltaNet, Mamba-2 have one); Based
# with its compact Taylor map: the same function as the full map (each product of the quadratic
# block once), 153 features instead of 273, within the GPU kernels' key width of 256
OPTIONS = {"linear_attention": {"conv_size": 4}, "based": {"conv_size": 4, "compact": True},
           "gla": {"conv_size": 4}}
# Zoology's attention has one head and learned absolute positions (its figure-2 configs set
# max_position_embeddings to the sequence length for attention alone, and its attention has no
# rotary embedding); also dropout 0.1, which ours does not have. `attention_rope` is that model with
# RoPE in place of the learned positions.
HEADS = {"attention": 1, "attention_rope": 1}
MIXER = {"attention_rope": "attention"}        # cell name -> the layer it uses
LEARNED_POSITIONS = ("attention",)             # these replace RoPE by `max_positions`


def get_config(cell: str = "based-d128-T256"):
    mixer, d, t = cell.rsplit("-", 2)
    if cell not in CELLS:
        raise ValueError(f"paper_mqar: cell {cell!r} is not one of {CELLS}")
    d_model, seq_len = int(d[1:]), int(t[1:])
    c = base_config()
    c.workdir = f"runs/paper_mqar/{cell}"
    c.seeds = (0, 1, 2)
    c.task.update(name="mqar", seq_len=seq_len, params={
        "num_kv_pairs": SETTINGS[seq_len], "num_keys": 4096, "num_values": 4095})   # vocab 8192
    c.task.gather = True
    layer = MIXER.get(mixer, mixer)
    options = dict(OPTIONS.get(mixer, {}))
    if mixer in LEARNED_POSITIONS:
        options["rope_theta"] = None
        c.model.max_positions = seq_len
    c.model.update(d_model=d_model, num_layers=2, num_heads=HEADS.get(mixer, 2), mixer=layer,
                   ffn="none",
                   init_std=d_model ** -0.5, impl="auto",
                   mixer_options={layer: options})
    batch = BATCH[seq_len]
    c.train.update(steps=EPOCHS * EXAMPLES // batch, batch_size=batch, lr=1e-3,
                   warmup_steps=200, weight_decay=0.1, checkpoint_every=0, progress=False,
                   log_every=100, stop_accuracy=0.99)
    c.eval.update(every=500, batches=4, batch_size=128)
    return c
