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

from normfold.errors import one_line
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


def _checked(rule: Rule, view: GraphView, match, ctx: FoldContext):
    """rule.check, but constants whose shapes contradict the ops that read them (a Conv bias of
    the wrong length, two initializers swapped: onnx's checker accepts both) leave the site as it
    was with a reason, never an internal error. The check only computes; nothing is rewritten yet."""
    try:
        return rule.check(view, match, ctx)
    except (ValueError, IndexError, TypeError, ArithmeticError) as exc:
        return Left("inconsistent-constants", f"{label(match.nodes[0])}: its constants do not fit the ops that read "
                                              f"them ({one_line(exc, 160)}); left as it was")


def run_rules(graph: onnx.GraphProto, rules: list[Rule], ctx: FoldContext, shapes: dict,
              path: str = "main", outer: GraphView | None = None, dry: bool = False,
              stop_at: str | None = None) -> list[SiteRecord]:
    """Apply `rules` to `graph` and, recursively, to its subgraphs. Returns one record per site.
    With `dry`, sites are matched and checked but nothing is rewritten (sites that only an earlier
    rewrite would create, such as the second BN of Conv -> BN -> BN, are then not seen). With
    `stop_at` (a reason code; dry runs only), the walk ends at the first site left for that reason:
    the records up to it are returned."""
    view = GraphView(graph, path=path, outer=outer, shapes=shapes, opset=ctx.opset, base_dir=ctx.base_dir)
    walk = _Walk(view, rules, ctx, path, dry, stop_at=stop_at if dry else None)
    try:
        for node in list(view.nodes):
            if not view.is_removed(node):
                walk.offer(node)
        records = walk.records
        for node in view.live_nodes():
            for attr_name, sub in subgraphs(node):
                sub_path = f"{path}/{node.name or node.op_type}:{attr_name}"
                records.extend(run_rules(sub, rules, ctx, shapes, sub_path, view, dry, stop_at))
    except _Stopped as stop:
        found = walk.records if stop.records is walk.records else walk.records + stop.records
        if outer is not None:
            raise _Stopped(found) from None
        return found
    if not dry:
        view.commit()
    return records


class _Stopped(Exception):
    """The site run_rules' stop_at asked for was found; the records so far."""

    def __init__(self, records: list[SiteRecord]):
        self.records = records


@dataclass
class _Walk:
    """One graph's walk: its records so far, and the nodes of sites reported as left (one report
    per site: a recogniser may still rewrite such a site, but never reports it again)."""

    view: GraphView
    rules: list[Rule]
    ctx: FoldContext
    path: str
    dry: bool
    records: list[SiteRecord] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)
    stop_at: str | None = None

    def offer(self, node: onnx.NodeProto) -> None:
        """Offer `node` to every rule in turn; the first that rewrites it ends the turn."""
        left_here: list[SiteRecord] = []
        left_passes: set[str] = set()
        for rule in self.rules:
            if rule.name in left_passes:
                continue
            match = rule.match(self.view, node)
            if match is None:
                continue
            outcome = self._check(rule, match)
            if not isinstance(outcome, Left):
                self._rewrite(rule, match, outcome)
                return  # the node may be gone now; another rule's refusal of it is moot
            # A recognizer finds a norm from each of its reductions: reported once, from the first.
            # (Another norm may share nodes with it, two LayerNorms of one X after a simplifier
            # merged their means: its own reduction is none of the first one's nodes.)
            if rule.recognizer and id(node) in self.claimed:
                continue
            left_here.append(self._record(rule, match, "left", outcome.detail, reason=outcome.reason))
            left_passes.add(rule.name)
            self.claimed.update(id(n) for n in match.nodes)
        self.records.extend(left_here)
        if self.stop_at is not None and any(r.reason == self.stop_at for r in left_here):
            raise _Stopped(self.records)

    def _check(self, rule: Rule, match: Match) -> Left | Any:
        if self.ctx.exclude_nodes.intersection(n.name for n in match.nodes):
            return Left("excluded", "left alone at the user's request (--exclude-node)")
        return _checked(rule, self.view, match, self.ctx)

    def _rewrite(self, rule: Rule, match: Match, plan: Any) -> None:
        # The site's nodes as the input model names them: a rewrite may make a kept node write the
        # site's output, and an unnamed node's label is its output.
        labels = [label(n) for n in match.nodes]
        # A site an earlier rule reported it could not read is moot once this one rewrites it.
        self.records = [r for r in self.records if r.status != "left" or not set(labels).intersection(r.nodes)]
        if self.dry:
            self.records.append(self._record(rule, match, rule.status, "would be rewritten"))
            return
        done = rule.rewrite(self.view, match, plan)
        self.records.append(self._record(rule, match, rule.status, done.detail, labels, created=done.created,
                                         notes=done.notes, max_rounding=done.max_rounding))

    def _record(self, rule: Rule, match: Match, status: str, detail: str, labels: list[str] | None = None,
                **extra) -> SiteRecord:
        return SiteRecord(rule.name, match.kind, status, labels or [label(n) for n in match.nodes], detail,
                          output=match.output, graph=self.path, **extra)
