"""Neighborhood attention by per-query window enumeration, written independently of
``visionzoo.kernels.indexing`` from the spec's "clamp the window centre" formulation."""
import itertools
import math

import torch


def window_1d(x, length, kernel, stride, dilation, causal):
    """Keys (original coordinates) that position ``x`` attends along one dimension."""
    group = x % dilation
    members = list(range(group, length, dilation))  # the dilation group, in order
    i = members.index(x)
    group_length = len(members)
    if causal:
        leader = min((i // stride) * stride + stride - 1, group_length - 1)
        first, last = max(leader - kernel + 1, 0), i
    else:
        left = kernel // 2
        right = kernel - left - 1
        leader = min((i // stride) * stride + stride // 2, group_length - 1)
        centre = min(max(leader, left), group_length - 1 - right)
        first, last = centre - left, centre + right
    return [(members[j], j - i) for j in range(first, last + 1)]


def brute_force_na(query, key, value, kernel_size, stride, dilation, is_causal, scale=None, rpb=None):
    """``[B, *spatial, H, D]`` float64 in, float64 out. ``rpb`` indexed by offset + kernel - 1."""
    batch, *spatial, heads, head_dim = query.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros_like(query, dtype=torch.float64)
    for position in itertools.product(*(range(length) for length in spatial)):
        per_dim = [
            window_1d(position[d], spatial[d], kernel_size[d], stride[d], dilation[d], is_causal[d])
            for d in range(len(spatial))
        ]
        keys = list(itertools.product(*per_dim))
        for b in range(batch):
            for h in range(heads):
                q = query[(b, *position, h)].double()
                logits = []
                for combo in keys:
                    key_position = tuple(c[0] for c in combo)
                    logit = scale * float(q @ key[(b, *key_position, h)].double())
                    if rpb is not None:
                        bias_index = tuple(c[1] + kernel_size[d] - 1 for d, c in enumerate(combo))
                        logit += float(rpb[(h, *bias_index)])
                    logits.append(logit)
                peak = max(logits)
                weights = [math.exp(logit - peak) for logit in logits]
                total = sum(weights)
                for weight, combo in zip(weights, keys):
                    key_position = tuple(c[0] for c in combo)
                    out[(b, *position, h)] += weight / total * value[(b, *key_position, h)].double()
    return out
