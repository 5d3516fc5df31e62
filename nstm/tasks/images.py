"""Image classification tasks, one pixel per step: ``smnist`` and ``psmnist`` (MNIST, 784 grey
pixels; psMNIST with a fixed seeded permutation) and ``cifar10`` (1024 RGB pixels); and
``row-mnist``, one row of 28 pixels per step (28 steps of 28 inputs, the RNN benchmark).

The readers (``nstm.data.mnist``, ``nstm.data.cifar10``) are looked up when a task is built.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Batch, Reiterable, Task, data_module, need_path

PSMNIST_SEED = 0            # the fixed permutation of the 784 pixels for psMNIST


def image_task(name, images_train, labels_train, images_test, labels_test, channels,
               perm: Optional[torch.Tensor] = None, info=None) -> Task:
    """Pixel-by-pixel classification: uint8 images -> ``[B, pixels, channels]`` floats in [0, 1]
    (pixels in ``perm`` order when given)."""
    xtr = images_train.reshape(images_train.shape[0], -1, channels)
    xte = images_test.reshape(images_test.shape[0], -1, channels)
    ytr, yte = labels_train.long(), labels_test.long()
    T = xtr.shape[1]

    def to_seq(x):
        x = x.float() / 255.0
        return x if perm is None else x[:, perm]

    def train(b, g):
        idx = torch.randint(0, xtr.shape[0], (b,), generator=g)
        return Batch(to_seq(xtr[idx]), ytr[idx])

    def eval_sets(bs, nb):
        n = xte.shape[0] if nb <= 0 else min(xte.shape[0], bs * nb)

        def it():
            for s in range(0, n, bs):
                e = min(n, s + bs)
                yield Batch(to_seq(xte[s:e]), yte[s:e])
        return {"test": Reiterable(it)}

    num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    return Task(name, "cls", "accuracy", True, train, eval_sets, input_dim=channels,
                num_classes=max(num_classes, 10), seq_len=T,
                info=dict(info or {}, train_size=int(xtr.shape[0]), test_size=int(xte.shape[0])))


def _mnist_task(name: str, data_root="data") -> Task:
    mn = data_module("nstm.data.mnist")
    mn.fetch_mnist(data_root)
    xtr, ytr = mn.load_mnist(data_root, "train")
    xte, yte = mn.load_mnist(data_root, "test")
    perm = None
    info = {"data_root": str(data_root)}
    channels = 28 if name == "row-mnist" else 1           # a row of 28 pixels per step, or one pixel
    if name == "psmnist":
        perm = torch.randperm(xtr[0].numel(), generator=torch.Generator().manual_seed(PSMNIST_SEED))
        info["permutation_seed"] = PSMNIST_SEED
    return image_task(name, torch.as_tensor(xtr), torch.as_tensor(ytr), torch.as_tensor(xte),
                      torch.as_tensor(yte), channels, perm, info)


def smnist_task(data_root="data", **_) -> Task:
    """Sequential MNIST (fetched into ``data_root`` when missing)."""
    return _mnist_task("smnist", data_root)


def row_mnist_task(data_root="data", **_) -> Task:
    """Row-by-row MNIST: 28 steps, each the 28 pixels of one row (in [0, 1])."""
    return _mnist_task("row-mnist", data_root)


def psmnist_task(data_root="data", **_) -> Task:
    """Permuted sequential MNIST: the pixels in the order of ``randperm(784)`` seeded ``PSMNIST_SEED``."""
    return _mnist_task("psmnist", data_root)


def cifar10_task(data_path=None, **_) -> Task:
    """Sequential CIFAR-10 from a local copy at ``data_path`` (python version)."""
    path = need_path("cifar10", data_path)
    cf = data_module("nstm.data.cifar10")
    xtr, ytr = cf.load_cifar10(path, "train")
    xte, yte = cf.load_cifar10(path, "test")
    return image_task("cifar10", torch.as_tensor(xtr), torch.as_tensor(ytr), torch.as_tensor(xte),
                      torch.as_tensor(yte), 3, None, {"data_path": str(path)})
