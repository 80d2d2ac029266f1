"""The pytest-benchmark suites' shapes: gxpo_bench's, full size (not --fast) on this machine's device."""

import torch

from gxpo_bench import shapes

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
LOSS_SHAPES = shapes.loss_shapes(CUDA, fast=False)
LINEAR_SHAPES = shapes.linear_shapes(CUDA, fast=False)
MODELS, SIZES, model_shapes = shapes.MODELS, shapes.model_sizes(CUDA, fast=False), shapes.model_shapes


def loss_inputs(N, V, seed=0):
    return shapes.loss_inputs(N, V, DEVICE, seed)
