"""Healing: bring a retrofitted model back to the model it was, by distillation from that model, cheaply
(``kallm.heal``, the function, lives in ``loop``; the package has a name of its own so that importing it never
hides the function).

``config`` holds the settings, the report and the file names; ``data`` the healing text; ``prefix`` the shared
prefix (the blocks both models have in common run once); ``local`` the block-local stage; ``loop`` the
end-to-end stage and ``heal`` itself; ``plot`` the curve. The distillation loss comes from ``kallm.train.losses``.
"""

from ..train.losses import distillation_loss
from ..train.runs import METRICS_FILE
from .config import CHECKPOINT_PREFIX, CURVE_FILE, REPORT_FILE, STATE_FILE, HealConfig, HealReport
from .data import healing_sequences
from .loop import heal
from .plot import plot_curve
from .prefix import prefix_replaced, shared_prefix_logits

