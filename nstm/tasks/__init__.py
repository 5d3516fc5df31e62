"""Tasks and data for training and evaluating NSTM models.

``base`` (``Task``, ``Batch``, the evaluation loop), the generators and builders by kind
(``synthetic``, ``listops`` + ``lra``, ``images``, ``text``) and ``registry`` (the table of tasks the
training CLI knows, ``build_task``)."""
from .base import IGNORE, Batch, Task
from .listops import (
                      LISTOPS_NUM_CLASSES,
                      LISTOPS_PAD,
                      LISTOPS_VOCAB,
                      detokenize_listops,
                      evaluate_listops,
                      generate_listops,
                      listops_batch,
                      pad_listops,
                      tokenize_listops,
)
from .synthetic import (
                      PASSKEY_DIGIT0,
                      PASSKEY_FILLER,
                      PASSKEY_KEY,
                      PASSKEY_PAD,
                      PASSKEY_QUERY,
                      PASSKEY_VOCAB,
                      copy_batch,
                      masked_accuracy,
                      mqar_batch,
                      passkey_batch,
                      passkey_digits,
)

__all__ = [
    "IGNORE", "Batch", "Task", "mqar_batch", "copy_batch", "masked_accuracy",
    "passkey_batch", "passkey_digits", "PASSKEY_VOCAB", "PASSKEY_PAD", "PASSKEY_DIGIT0",
    "PASSKEY_KEY", "PASSKEY_QUERY", "PASSKEY_FILLER",
    "LISTOPS_VOCAB", "LISTOPS_PAD", "LISTOPS_NUM_CLASSES", "generate_listops", "evaluate_listops",
    "tokenize_listops", "detokenize_listops", "pad_listops", "listops_batch",
]
