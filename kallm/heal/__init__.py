"""Healing: bring a retrofitted model back to the model it was, by distillation from that model, cheaply."""

from .loop import HealConfig, HealReport, heal
