"""Fashion-MNIST's data and the examples' models, without Aikido: shared by examples/train_fashion_mnist.py and the
benchmarks' references (bench/ddp_fashion_mnist.py, bench/compare_python.py), so that every side trains the same
models on the same data.
"""
import gzip
import math
import struct

import torch
import torch.nn as nn


def read_idx(path, magic):
    """One gzip-compressed IDX file: magic 2051 (images, n x rows x cols bytes) or 2049 (labels, n bytes)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RuntimeError(f"cannot open {path} (install Debian's dataset-fashion-mnist package, or give the folder "
                           f"with --data DIR): {e.strerror or e}") from None
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise RuntimeError(f"{path} is not an IDX file of the expected kind")
    if magic == 2051:
        n, rows, cols = struct.unpack(">III", data[4:16])
        body, shape = data[16:], (n, 1, rows, cols)
    else:
        n = struct.unpack(">I", data[4:8])[0]
        body, shape = data[8:], (n,)
    if len(body) != math.prod(shape):
        raise RuntimeError(f"truncated IDX file {path}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_split(folder, prefix):
    # Mean and standard deviation of the Fashion-MNIST training images.
    images = read_idx(f"{folder}/{prefix}-images-idx3-ubyte.gz", 2051).float().div_(255).sub_(0.2860).div_(0.3530)
    labels = read_idx(f"{folder}/{prefix}-labels-idx1-ubyte.gz", 2049).long()
    if images.shape[0] != labels.shape[0]:
        raise RuntimeError(f"images and labels of {prefix} differ in number")
    return images, labels


def make_model(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 10))
