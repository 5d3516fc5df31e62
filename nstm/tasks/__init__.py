"""Tasks and data for training and evaluating NSTM models."""
from .synthetic import IGNORE, copy_batch, masked_accuracy, mqar_batch

__all__ = ["IGNORE", "mqar_batch", "copy_batch", "masked_accuracy"]
