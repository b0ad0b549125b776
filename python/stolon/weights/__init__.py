"""Weight transfer from a training pool to an inference pool (issue 7).

Every training rank writes its part of every parameter straight into the inference ranks that
hold it, with one-sided writes; inference ranks only register memory and wait.

- :mod:`~stolon.weights.layout`: parameter sets and where they live on each side (FSDP flat
  groups, row/column shards, expert placement; fp8 destinations), plus Kimi-K2-shaped presets.
- :mod:`~stolon.weights.plan`: :func:`build_plan`, the static routing plan (strided ranges per
  training/inference pair, fp8 scale routing, shared tiles), computed per shape class.
- :mod:`~stolon.weights.convert`: bf16 -> fp8 e4m3 with per-128x128-tile float32 scales.
- :mod:`~stolon.weights.execute`: :class:`WeightSender` / :class:`WeightReceiver` (double-buffered
  slots, immediate-count completion, release credits) and :func:`simulate`.

:mod:`~stolon.weights.plan` and :mod:`~stolon.weights.execute` gather their names from modules of
one concern each (their docstrings say which), which import one way only.

See ``docs/weights.md``.
"""

from __future__ import annotations

from .execute import (
    SlotLayout,
    WeightReceiver,
    WeightSender,
    WeightSnapshot,
    WeightTransferError,
    simulate,
    slot_layout,
)
from .layout import (
    BF16,
    FP8,
    DimShard,
    FlatGroup,
    FlatShard,
    InferenceLayout,
    LayoutError,
    ParamSpec,
    TrainingLayout,
    col_shard,
    ep_tp_inference,
    fsdp_pp_ep_training,
    kimi_k2_model,
    moe_model,
    row_shard,
    whole,
)
from .plan import CostModel, PlanError, RangeTable, WeightPlan, build_plan

__all__ = [
    "BF16",
    "FP8",
    "ParamSpec",
    "DimShard",
    "FlatShard",
    "FlatGroup",
    "TrainingLayout",
    "InferenceLayout",
    "LayoutError",
    "whole",
    "row_shard",
    "col_shard",
    "moe_model",
    "kimi_k2_model",
    "fsdp_pp_ep_training",
    "ep_tp_inference",
    "build_plan",
    "WeightPlan",
    "RangeTable",
    "PlanError",
    "CostModel",
    "WeightSender",
    "WeightReceiver",
    "WeightSnapshot",
    "WeightTransferError",
    "SlotLayout",
    "slot_layout",
    "simulate",
]
