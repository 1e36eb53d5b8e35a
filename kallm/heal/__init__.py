"""Healing: bring a retrofitted model back to the model it was, by distillation from that model, cheaply.

``config`` holds the settings, the report and the file names; ``data`` the healing text; ``prefix`` the shared
prefix (the blocks both models have in common run once); ``local`` the block-local stage; ``loop`` the
end-to-end stage and ``heal`` itself; ``plot`` the curve. The distillation loss is ``kallm.train.losses``'.
"""

import sys
import types

from ..train.losses import distillation_loss
from ..train.runs import METRICS_FILE
from .config import CHECKPOINT_PREFIX, CURVE_FILE, REPORT_FILE, STATE_FILE, HealConfig, HealReport
from .data import healing_sequences
from .loop import heal
from .plot import plot_curve
from .prefix import prefix_replaced, shared_prefix_logits


class _CallablePackage(types.ModuleType):
    """``kallm.heal`` names both this package and the function ``heal``; once the package is imported, Python
    makes ``kallm.heal`` the package, so calling the package calls the function."""

    def __call__(self, *args, **kwargs):
        return heal(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
