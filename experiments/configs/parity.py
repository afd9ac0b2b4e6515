"""Parity with DeltaNet, beta in [0, 2] (negative eigenvalues), with length extrapolation.

    python -m experiments.train --config=experiments/configs/parity.py
    python -m experiments.train --config=experiments/configs/parity.py \\
        --config.model.mixer_options.deltanet.allow_neg_eigval=False --config.workdir=runs/parity01
"""

from experiments.configs import state_tracking


def get_config():
    return state_tracking.get_config("parity")
