"""Analyses and rewrites over a traced Graph: channel groups, plans, shrink and mask."""
from ptgraph.passes.groups import ChannelAnalysis, ChannelGroup, Member, analyze_channels
from ptgraph.passes.plan import PrunePlan, random_plan
from ptgraph.passes.shrink import ShrinkReport, count_params, keep_every_tensor, mask, predict_params, shrink

__all__ = [
    "ChannelAnalysis", "ChannelGroup", "Member", "PrunePlan", "ShrinkReport", "analyze_channels", "count_params", "keep_every_tensor",
    "mask", "predict_params", "random_plan", "shrink",
]
