"""The passes and the one driver that runs them.

A rule is a small pipeline in four steps:

    match(view, node)            -> Match | None     is `node` the start of a site of this kind?
    check(view, match, ctx)      -> Left | plan      can it be rewritten safely? if not, why not
    rewrite(view, match, plan)   -> Rewritten        change the graph through the view's edit methods
    (the driver records)         -> SiteRecord       folded/fused, or left with a reason code

To add a pattern: write `normfold/passes/<name>.py` with a Rule subclass, list it in `RULES` below,
and add `tests/test_<name>.py`. The driver walks each graph once, in topological order, offering
every node to every rule, so a rewrite is visible to the sites after it (Conv -> Mul -> BN folds
twice in one walk). If/Loop/Scan bodies are walked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from normfold.graph import GraphView, label, subgraphs
from normfold.report import SiteRecord


@dataclass
class Match:
    kind: str  # human-readable site kind, e.g. "BatchNormalization after Conv"
    nodes: list[onnx.NodeProto]  # every node of the site, in graph order (a fold: the layer's, then the folded one)
    output: str  # the tensor the site writes; the rewrite keeps this name
    parts: dict[str, Any] = field(default_factory=dict)  # rule-specific pieces found by match


@dataclass
class Left:
    reason: str  # a key of normfold.report.REASONS
    detail: str


@dataclass
class Rewritten:
    created: list[str]
    detail: str
    notes: list[str] = field(default_factory=list)
    max_rounding: float | None = None


@dataclass
class FoldContext:
    opset: int  # the default-domain opset of the model being rewritten
    exclude_nodes: frozenset[str] = frozenset()
    allow_contrib: bool = False  # use com.microsoft ops where the standard one needs a newer opset
    allow_transpose: bool = False  # wrap a LayerNorm over non-trailing axes in a Transpose pair
    base_dir: str = ""  # folder that external data locations are relative to


class Rule:
    name = ""  # the pass name users select with --passes
    recognizer = False  # True: may rewrite a site another rule reported as left, never reports it again
    min_opset: int | None = None  # the opset the op it writes needs (None: no new op, e.g. a BN fold)
    status = "folded"  # what a rewrite of this rule is called in the report

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        raise NotImplementedError

    def check(self, view: GraphView, match: Match, ctx: FoldContext) -> Left | Any:
        raise NotImplementedError

    def rewrite(self, view: GraphView, match: Match, plan: Any) -> Rewritten:
        raise NotImplementedError


def _rules():
    from normfold.passes.batchnorm import BatchNormFold
    from normfold.passes.channel_affine import ChannelAffineFold, ChannelPairFold
    from normfold.passes.groupnorm import GroupNormFusion
    from normfold.passes.instance_affine import InstanceNormAffine
    from normfold.passes.layernorm import LayerNormFusion
    from normfold.passes.norms import GroupNormRule, LayerNormRule, NormLike, RMSNormRule

    return [BatchNormFold(), ChannelAffineFold(), ChannelPairFold(), LayerNormRule(), RMSNormRule(), GroupNormRule(), LayerNormFusion(),
            GroupNormFusion(), InstanceNormAffine(), NormLike(centered=True), NormLike(centered=False)]


RULES: list[Rule] = _rules()
PASS_NAMES: tuple[str, ...] = tuple(dict.fromkeys(rule.name for rule in RULES))


def run_rules(graph: onnx.GraphProto, rules: list[Rule], ctx: FoldContext, shapes: dict,
              path: str = "main", outer: GraphView | None = None, dry: bool = False) -> list[SiteRecord]:
    """Apply `rules` to `graph` and, recursively, to its subgraphs. Returns one record per site.
    With `dry`, sites are matched and checked but nothing is rewritten (sites that only an earlier
    rewrite would create, such as the second BN of Conv -> BN -> BN, are then not seen)."""
    view = GraphView(graph, path=path, outer=outer, shapes=shapes, opset=ctx.opset, base_dir=ctx.base_dir)
    records: list[SiteRecord] = []
    claimed: set[int] = set()  # nodes of sites reported as left: one report per site
    for node in list(view.nodes):
        if view.is_removed(node):
            continue
        left_here: list[SiteRecord] = []
        left_passes: set[str] = set()
        for rule in rules:
            if rule.name in left_passes:
                continue
            match = rule.match(view, node)
            if match is None:
                continue
            names = [label(n) for n in match.nodes]
            if ctx.exclude_nodes.intersection(n.name for n in match.nodes):
                outcome: Left | Any = Left("excluded", "left alone at the user's request (--exclude-node)")
            else:
                outcome = rule.check(view, match, ctx)
            if isinstance(outcome, Left):
                if rule.recognizer and any(id(n) in claimed for n in match.nodes):
                    continue  # another rule already reported this site (a recogniser only adds rewrites)
                left_here.append(SiteRecord(rule.name, match.kind, "left", names, outcome.detail,
                                            reason=outcome.reason, output=match.output, graph=path))
                left_passes.add(rule.name)
                claimed.update(id(n) for n in match.nodes)
                continue
            if dry:
                records.append(SiteRecord(rule.name, match.kind, rule.status, names, "would be rewritten",
                                          output=match.output, graph=path))
                left_here.clear()
                break
            done = rule.rewrite(view, match, outcome)
            # A site an earlier rule reported it could not read is moot once this one rewrote it.
            records = [r for r in records if r.status != "left" or r.graph != path or not set(r.nodes) & set(names)]
            records.append(SiteRecord(rule.name, match.kind, rule.status, names, done.detail,
                                      created=done.created, output=match.output, graph=path,
                                      notes=done.notes, max_rounding=done.max_rounding))
            left_here.clear()  # another rule's refusal of the same node is moot once it is rewritten
            break  # the node may be gone now; later rules see the sites after it
        records.extend(left_here)
    for node in view.live_nodes():
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/{node.name or node.op_type}:{attr_name}"
            records.extend(run_rules(sub, rules, ctx, shapes, sub_path, view, dry))
    if not dry:
        view.commit()
    return records
