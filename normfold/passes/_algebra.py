"""The canonical view recognisers match on: what a tensor computes, written as a polynomial.

Every float tensor reads, lazily and without changing the graph, as a sum of terms

    c * a1^p1 * a2^p2 * ...        c: a constant (float64 numpy array, broadcast like the tensor)

whose atoms are

    Leaf(t, perm)     a tensor not looked into (a graph input, a MatMul's output, ...), seen through a
                      Transpose `perm` when the expression reads it transposed
    Mean(e, axes)     the mean over `axes` (kept as size 1) of a canonical expression e
    Root(e, p)        e ** p for a sum e of several terms that cannot be expanded (p fractional or < 0)

so that the spellings exporters write all disappear into one form:

    Identity, float Casts, Reshape to the same shape         ->  the value itself
    Sub(a, b), Neg(b)                                         ->  a + (-1) b
    Div(a, b), Reciprocal(b), Sqrt(b), Pow(b, constant)       ->  a * b^-1, b^-1, b^1/2, b^p
    Mul(d, d)                                                 ->  d^2 (expanded when d is a sum)
    ReduceSum(e) / count, ReduceSumSquare(e) / count          ->  Mean(e), Mean(e^2)
    ReduceMean, GlobalAveragePool                             ->  Mean
    Where(Equal(n, 0), 0, a / n) with n a nonzero count       ->  a / n          (div_no_nan)
    ConstantOfShape(Shape(x)) (ones_like, zeros_like)         ->  its fill value
    Max(v, 0) of a variance                                   ->  v
    Transpose(e)                                              ->  e with its axes permuted

Mul and Add are flattened and commutative, and a Mean is linear and lets out every factor that does
not vary along its axes, so

    (X - m) * r * g + b  ==  X * (r g) + (b - m r g)          (m = Mean(X), r = Root(var + eps, -1/2))
    Mean((X - m)^2)      ==  Mean(X^2) - m^2                   (central and raw moments)

Axes are stored negative (counted from the end), which right-aligned broadcasting makes independent
of the rank. Constants are read through GraphView.const, and only small ones (MAX_CONST elements):
a weight never becomes a coefficient, so the view copies no weights. An expression that would grow
past MAX_TERMS terms is a Leaf instead, which keeps the cost linear in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr

MAX_TERMS = 12
MAX_CONST = 1 << 16
MAX_DEPTH = 48
STATIC_DEPTH = 8  # how far behind constants a tensor computed from them is still looked for
ONE = Fraction(1)  # the usual power: `p is ONE` spares a Fraction product
COEFF_RTOL = 1e-6  # two coefficients are equal when they agree this closely (float32 constants' rounding)


def close(a, b) -> bool:
    """Coefficients equal to COEFF_RTOL (broadcasting; np.allclose costs ten times more here)."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all(np.abs(a - b) <= COEFF_RTOL * np.abs(b)))


# ---- expressions ------------------------------------------------------------------------------
class Atom:
    """A factor of a term. Atoms are dict keys and sort keys in every expression built on them, so
    each computes its key (a nested tuple) and the key's hash once, when it is made."""

    key: tuple
    _hash: int

    def _set_key(self, key: tuple) -> None:
        self.key, self._hash = key, hash(key)

    def __eq__(self, other):
        return self is other or (isinstance(other, Atom) and self._hash == other._hash and self.key == other.key)

    def __hash__(self):
        return self._hash

    def __lt__(self, other):
        return self.key < other.key


class Leaf(Atom):
    def __init__(self, name: str, perm: tuple[int, ...] | None = None):
        self.name, self.perm = name, perm
        self._set_key(("leaf", name, perm or ()))

    def __repr__(self):
        return self.name if not self.perm else f"T{list(self.perm)}({self.name})"


class Mean(Atom):
    def __init__(self, arg: "Expr", axes: tuple[int, ...]):
        self.arg, self.axes = arg, axes
        self._set_key(("mean", axes, arg.key))

    def __repr__(self):
        return f"mean{list(self.axes)}({self.arg!r})"


class Root(Atom):
    def __init__(self, base: "Expr", power: Fraction):
        self.base, self.power = base, power
        self._set_key(("root", base.key, (power.numerator, power.denominator)))

    def __repr__(self):
        return f"({self.base!r})^{self.power}"


def make_mean(arg: "Expr", axes: tuple[int, ...]) -> Mean:
    """Mean(arg, axes), one atom for one value: the mean of a transposed leaf whose Transpose keeps
    every axis that is not reduced in place is the mean of the leaf itself over the moved axes (a
    Keras LayerNorm over (H, W, C) takes its moments on NCHW X and scales Transpose(X))."""
    one = arg.single()
    if one is not None and len(one[0]) == 1 and isinstance(one[0][0][0], Leaf) and one[0][0][0].perm:
        (leaf, p), = one[0]
        rank = len(leaf.perm)
        reduced = {a % rank for a in axes}
        if all(leaf.perm[i] == i for i in range(rank) if i not in reduced):
            moved = tuple(sorted(leaf.perm[a] - rank for a in reduced))
            return Mean(Expr({((Leaf(leaf.name), p),): one[1]}), moved)
    return Mean(arg, axes)


class Count(Atom):
    """How many values a reduction over dynamic sizes sums: a positive number only known at run time,
    named by the (symbolic) sizes it multiplies, so that ReduceSum(mask * x) / ReduceSum(mask) over
    the same sizes cancels to a mean."""

    def __init__(self, dims: tuple):
        self.dims = dims
        self._set_key(("count", tuple(str(d) for d in dims)))

    def __repr__(self):
        return f"N{list(self.dims)}"


class Signature(tuple):
    """A product's factors, sorted: ((atom, Fraction power), ...). The key of a term in every Expr's
    dict, looked up at every add and mul: its hash (a Python-level Fraction hash per factor) is
    computed once. Equal to, and hashed like, the plain tuple of the same factors."""

    def __new__(cls, factors=()):
        self = super().__new__(cls, factors)
        self._hash = tuple.__hash__(self)
        return self

    def __hash__(self):
        return self._hash


_FLOAT64 = np.dtype(np.float64)


def _trim(c: np.ndarray) -> np.ndarray:
    """Leading axes of size 1 change nothing under right-aligned broadcasting: drop them, so that
    equal coefficients have one key."""
    if type(c) is np.ndarray and c.dtype is _FLOAT64 and (not c.ndim or c.shape[0] != 1):
        return c  # already trimmed (most coefficients: sums and products of trimmed ones)
    c = np.asarray(c, np.float64)
    lead = next((i for i, d in enumerate(c.shape) if d != 1), c.ndim)
    return c.reshape(c.shape[lead:]) if lead else c


def _coeff_key(c: np.ndarray) -> tuple:
    return (c.shape, np.ascontiguousarray(c).tobytes())


class Expr:
    """A sum of terms: {signature: coefficient}. Immutable once built; its key (for equality of
    atoms built on it) is computed when first asked for."""

    __slots__ = ("terms", "_key", "_leaves")

    def __init__(self, terms: dict[Signature, np.ndarray]):
        self.terms = {s if type(s) is Signature else Signature(s): _trim(c) for s, c in terms.items()}
        self._key = None
        self._leaves = None

    @property
    def leaves(self) -> frozenset[str]:
        """The names of the tensors the expression reads (inside means and roots too)."""
        if self._leaves is None:
            names: set[str] = set()
            for sig in self.terms:
                for a, _ in sig:
                    if isinstance(a, Leaf):
                        names.add(a.name)
                    elif isinstance(a, (Mean, Root)):
                        names |= (a.arg if isinstance(a, Mean) else a.base).leaves
            self._leaves = frozenset(names)
        return self._leaves

    @property
    def key(self) -> tuple:
        if self._key is None:
            self._key = tuple(sorted(((tuple((a.key, (p.numerator, p.denominator)) for a, p in sig),
                                       _coeff_key(c)) for sig, c in self.terms.items())))
        return self._key

    def __repr__(self):
        parts = []
        for sig, c in self.terms.items():
            coeff = f"{c.item():g}" if c.size == 1 else f"C{list(c.shape)}"
            parts.append("*".join([coeff] + [f"{a!r}" + (f"^{p}" if p != 1 else "") for a, p in sig]))
        return " + ".join(parts) or "0"

    @staticmethod
    def const(value) -> "Expr":
        c = np.asarray(value, dtype=np.float64)
        return Expr({(): c} if np.any(c != 0) else {})

    @staticmethod
    def atom(a: Atom, power: Fraction = ONE) -> "Expr":
        return Expr({((a, power),): np.ones((), np.float64)})

    def constant(self) -> np.ndarray | None:
        """The value when the expression is a constant (no atoms)."""
        if not self.terms:
            return np.zeros((), np.float64)
        if len(self.terms) == 1 and () in self.terms:
            return self.terms[()]
        return None

    def single(self) -> tuple[Signature, np.ndarray] | None:
        return next(iter(self.terms.items())) if len(self.terms) == 1 else None

    def without_constant(self) -> tuple["Expr", np.ndarray]:
        rest = {s: c for s, c in self.terms.items() if s != ()}
        return Expr(rest), self.terms.get((), np.zeros((), np.float64))


def _add_term(terms: dict[Signature, np.ndarray], sig: Signature, c: np.ndarray) -> None:
    """terms += c * sig, in place."""
    if sig not in terms:
        terms[sig] = c
        return
    total = terms[sig] + c
    if np.all(np.abs(total) <= COEFF_RTOL * np.maximum(np.abs(terms[sig]), np.abs(c))):
        del terms[sig]  # cancelled (to the constants' precision)
    else:
        terms[sig] = total


def add(a: Expr, b: Expr) -> Expr | None:
    terms = dict(a.terms)
    for sig, c in b.terms.items():
        _add_term(terms, sig, c)
    return Expr(terms) if len(terms) <= MAX_TERMS else None


def scale(a: Expr, c) -> Expr:
    c = np.asarray(c, np.float64)
    return Expr({s: v * c for s, v in a.terms.items()}) if np.any(c != 0) else Expr({})


def _normal(factors) -> Signature:
    """One signature for one product: powers of the same atom added, a Root's power moved into it
    (Root(b, 1/2)^-1 and Root(b, -1/2) are one factor), factors sorted."""
    powers: dict[Atom, Fraction] = {}
    roots: dict[tuple, tuple[Root, Fraction]] = {}
    for a, p in factors:
        if isinstance(a, Root):
            q = a.power if p is ONE else a.power * p
            if a.base.key in roots:
                first, q0 = roots[a.base.key]
                roots[a.base.key] = (first, q0 + q)
            else:
                roots[a.base.key] = (a, q)
        elif a in powers:
            powers[a] += p
        else:
            powers[a] = p
    for first, q in roots.values():
        if q != 0:  # the Root itself when its power is unchanged: its key (the whole base) is hashed once
            powers[first if q == first.power else Root(first.base, q)] = ONE
    return Signature(sorted((a, p) for a, p in powers.items() if p != 0))


def _merge(s: Signature, t: Signature) -> Signature:
    return _normal(s + t)


def mul(a: Expr, b: Expr) -> Expr | None:
    if len(a.terms) * len(b.terms) > 4 * MAX_TERMS:
        return None
    terms: dict[Signature, np.ndarray] = {}
    for s, c in a.terms.items():
        for t, d in b.terms.items():
            _add_term(terms, _merge(s, t), _trim(c * d))
            if len(terms) > MAX_TERMS:
                return None
    return Expr(terms)


def power(a: Expr, p: Fraction) -> Expr | None:
    if p == 1:
        return a
    if p == 0:
        return Expr.const(1.0)
    value = a.constant()
    if value is not None:
        with np.errstate(all="ignore"):
            return Expr.const(np.power(value, float(p)))
    if p.denominator == 1 and p > 0:  # a positive integer power: expand
        out = a
        for _ in range(int(p) - 1):
            out = out and mul(out, a)
        return out
    one = a.single()
    if one is not None:
        sig, c = one
        # (c * a^q)^p = c^p * a^(qp) for an integer p; for a fractional p only where no factor can be
        # negative (means, roots) and c > 0: a Leaf to a fractional power stays inside a Root.
        if (p.denominator == 1 and np.all(c != 0)) or (np.all(c > 0) and all(isinstance(at, (Mean, Root))
                                                                             for at, _ in sig)):
            with np.errstate(all="ignore"):
                coeff = np.power(c, float(p))
            if len(sig) == 1 and isinstance(sig[0][0], Root) and sig[0][0].power * sig[0][1] * p == 1:
                return scale(sig[0][0].base, coeff)  # (b^q)^(1/q) = b
            return Expr({_normal((at, q * p) for at, q in sig): coeff})
    return Expr.atom(Root(a, p))


def varies_along(c: np.ndarray, axes: tuple[int, ...]) -> bool:
    """Whether a coefficient broadcast against a tensor changes along one of the (negative) axes."""
    return any(c.ndim >= -ax and c.shape[c.ndim + ax] != 1 for ax in axes)


def _atom_constant_along(a: Atom, axes: tuple[int, ...]) -> bool:
    if isinstance(a, Count):
        return True
    if isinstance(a, Mean):
        return set(axes) <= set(a.axes)
    if isinstance(a, Root):
        return all(not varies_along(c, axes) and all(_atom_constant_along(x, axes) for x, _ in s)
                   for s, c in a.base.terms.items())
    return False


def mean(a: Expr, axes: tuple[int, ...]) -> Expr | None:
    """The mean over `axes` (negative, sorted), linear, with every factor constant along them let out."""
    out = Expr({})
    for sig, c in a.terms.items():
        outer = tuple((x, p) for x, p in sig if _atom_constant_along(x, axes))
        inner = tuple((x, p) for x, p in sig if not _atom_constant_along(x, axes))
        if varies_along(c, axes):  # a weighted mean: the weights stay inside
            if not inner:
                term = Expr({outer: np.mean(c, axis=tuple(c.ndim + ax for ax in axes if c.ndim >= -ax),
                                            keepdims=True)})
            else:
                term = Expr({_normal(outer + ((make_mean(Expr({inner: c}), axes), ONE),)): np.ones(())})
        elif not inner:
            term = Expr({outer: c})
        else:
            m = make_mean(Expr({inner: np.ones((), np.float64)}), axes)
            term = Expr({_normal(outer + ((m, ONE),)): c})
        out = add(out, term)
        if out is None:
            return None
    return out


def transpose(a: Expr, perm: tuple[int, ...]) -> Expr | None:
    """The expression read through Transpose(perm) (rank = len(perm))."""
    rank = len(perm)
    inverse = [perm.index(i) for i in range(rank)]
    out = Expr({})
    for sig, c in a.terms.items():
        if c.ndim > rank:
            return None
        c2 = np.transpose(c.reshape((1,) * (rank - c.ndim) + c.shape), perm)
        new_sig = []
        for x, p in sig:
            moved = _transpose_atom(x, perm, inverse)
            if moved is None:
                return None
            new_sig.append((moved, p))
        out = add(out, Expr({_normal(new_sig): c2}))
        if out is None:
            return None
    return out


def _transpose_atom(x: Atom, perm: tuple[int, ...], inverse: list[int]) -> Atom | None:
    rank = len(perm)
    if isinstance(x, Leaf):
        base = x.perm or tuple(range(rank))
        if len(base) != rank:
            return None
        combined = tuple(base[i] for i in perm)
        return Leaf(x.name, None if combined == tuple(range(rank)) else combined)
    if isinstance(x, Mean):
        arg = transpose(x.arg, perm)
        # output axis i reads input axis perm[i]: a reduced input axis a lands at inverse[a]
        axes = tuple(sorted(inverse[ax % rank] - rank for ax in x.axes))
        return None if arg is None else make_mean(arg, axes)
    if isinstance(x, Root):
        base = transpose(x.base, perm)
        return None if base is None else Root(base, x.power)
    if isinstance(x, Count):
        return x
    return None


def exponent(value: float | None) -> Fraction | None:
    if value is None or not np.isfinite(value):
        return None
    f = Fraction(value).limit_denominator(8)
    return f if float(f) == value else None


# ---- the view ---------------------------------------------------------------------------------
def canonical_view(view: GraphView, leaves: frozenset[str] = frozenset()) -> "CanonicalView":
    """The CanonicalView of `view` that reads `leaves` as leaves, shared until the graph is edited."""
    return view.derived(("canonical", leaves), lambda: CanonicalView(view, leaves))


@dataclass
class CanonicalView:
    """Canonical expressions of a GraphView's tensors, computed on demand and cached."""

    view: GraphView
    leaves: frozenset[str] = frozenset()  # tensors read as Leaf whatever computes them (the norm's input)

    def __post_init__(self):
        self._cache: dict[str, Expr] = {}
        self._depth = 0
        self._first = self._first_position()
        self._statics: dict[str, tuple[bool, int]] = {}

    def _first_position(self) -> int | None:
        """Where the first producer of a leaf stands: a node before it reads none of the leaves, and
        its output is an outside value to every expression of them (None: no such bound)."""
        places = [self.view.position(self.view.producer[leaf]) if leaf in self.view.producer else None
                  for leaf in self.leaves]
        return None if not places or None in places else min(places)

    def expr(self, name: str) -> Expr:
        found = self._cache.get(name)
        if found is None:
            if self._depth >= MAX_DEPTH:  # a long elementwise chain: read its far end as a Leaf
                return self.leaf(name)
            self._depth += 1
            try:
                found = self._build(name)
            finally:
                self._depth -= 1
            self._cache[name] = found
        return found

    def _before_leaves(self, node: onnx.NodeProto) -> bool:
        place = self.view.position(node)
        return self._first is not None and place is not None and place < self._first

    def _static(self, name: str, depth: int = 0) -> bool:
        """Whether `name` may be a value the graph computes from constants and shapes only (a ones_like
        mask reshaped and summed to a count), which the algebra reads as a constant. Only "no" is
        certain: a float tensor behind a graph input, or too far behind constants to be one."""
        known = self._statics.get(name)
        if known is not None and (known[0] or known[1] <= depth):  # a "no" found with as much room left
            return known[0]
        view = self.view
        node = view.producer.get(name)
        if view.is_const(name) or view.elem_type(name) not in (None, *FLOAT_TYPES):
            found = True
        elif node is None or depth >= STATIC_DEPTH:
            found = False
        else:
            found = node.op_type == "ConstantOfShape" or all(self._static(t, depth + 1) for t in node.input if t)
        self._statics[name] = (found, depth)
        return found

    def forget(self) -> None:
        self._cache.clear()

    def leaf(self, name: str) -> Expr:
        return Expr.atom(Leaf(name))

    def _small_const(self, name: str) -> np.ndarray | None:
        shape = self.view.const_shape(name) if self.view.is_const(name) else None
        if shape is None:
            return self._reshaped_const(name)
        if int(np.prod(shape)) > MAX_CONST:
            return None
        value = self.view.const(name)
        # bfloat16 (ml_dtypes, numpy kind "V") is a float to the view: a bfloat16 norm's epsilon
        if value is None or (value.dtype.kind not in "fiub" and value.dtype.name != "bfloat16"):
            return None
        return value.astype(np.float64)

    def _reshaped_const(self, name: str) -> np.ndarray | None:
        """A constant under a Reshape whose target the graph computes from a dynamic shape but whose
        result shape inference knows (tf_keras' gamma reshaped to [1, 1, 1, G, C/G])."""
        node = self.view.producer.get(name)
        if node is None or node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            return None
        data, dims = self._small_const(node.input[0]), self.view.dims(name)
        if data is None or dims is None or not all(isinstance(d, int) for d in dims) or int(np.prod(dims)) != data.size:
            return None
        return data.reshape(dims)

    def _build(self, name: str) -> Expr:
        if name in self.leaves:
            return self.leaf(name)
        value = self._small_const(name)
        if value is not None:
            return Expr.const(value)
        view = self.view
        node = view.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return self.leaf(name)
        if view.elem_type(name) not in (None, *FLOAT_TYPES):
            return self.leaf(name)
        if self._before_leaves(node) and not self._static(name):
            # Not a function of the leaves (a residual stream read by the norm's input, which would
            # otherwise be expanded back through every earlier layer).
            return self.leaf(name)
        built = _OPS.get(node.op_type)
        out = built(self, node) if built else None
        return out if out is not None else self.leaf(name)

    # helpers for the op readers
    def rank(self, name: str) -> int | None:
        return self.view.rank(name)

    def reduce_axes(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        """The reduced axes, negative and sorted; None when unknown or keepdims=0."""
        if attr(node, "keepdims", 1) != 1:
            return None
        rank = self.rank(node.input[0])
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.view.const(node.input[1])
            if value is None:
                return None
            axes = [int(a) for a in np.asarray(value).reshape(-1)]
        if not axes:
            if attr(node, "noop_with_empty_axes", 0) or rank is None:
                return None
            axes = list(range(rank))
        if any(a >= 0 for a in axes):
            if rank is None:
                return None
            axes = [a - rank if a >= 0 else a for a in axes]
        if rank is not None and any(a < -rank for a in axes):
            return None
        return tuple(sorted(set(int(a) for a in axes)))

    def dynamic_count(self, tensor: str, axes: tuple[int, ...]) -> Count | None:
        """The count of a reduction over sizes some of which are dynamic, by their symbols."""
        from normfold.shape_values import shape_values

        values = shape_values(self.view)
        dims = values.dims_of(tensor)
        if dims is None or any(-len(dims) > a for a in axes):
            return None
        picked = tuple(dims[len(dims) + a] for a in axes)
        return Count(tuple(sorted(picked, key=str)))

    def count(self, tensor: str, axes: tuple[int, ...]) -> float | None:
        """How many values a reduction over `axes` of `tensor` sums."""
        dims = self.view.dims(tensor)
        if dims is None:
            return None
        picked = [dims[len(dims) + a] for a in axes if -len(dims) <= a]
        if len(picked) != len(axes) or not all(isinstance(d, int) for d in picked):
            return None
        return float(np.prod(picked))


def _binary(op):
    def read(cv: CanonicalView, node):
        if len(node.input) != 2:
            return None
        return op(cv.expr(node.input[0]), cv.expr(node.input[1]))
    return read


def _sub(a, b):
    return add(a, scale(b, -1.0))


def _div(a, b):
    inv = power(b, Fraction(-1))
    return inv and mul(a, inv)


def _unary(fn):
    def read(cv: CanonicalView, node):
        return fn(cv.expr(node.input[0]))
    return read


def _same(cv: CanonicalView, node):
    return cv.expr(node.input[0])


def _cast(cv: CanonicalView, node):
    # A float Cast keeps the value (to its precision); the recogniser decides where the site rounds.
    if attr(node, "to") in FLOAT_TYPES and cv.view.elem_type(node.input[0]) in (None, *FLOAT_TYPES):
        return cv.expr(node.input[0])
    return None


def _pow(cv: CanonicalView, node):
    value = cv.view.const(node.input[1])
    p = exponent(float(value.reshape(-1)[0])) if value is not None and value.size == 1 else None
    return None if p is None else power(cv.expr(node.input[0]), p)


def _reduce_mean(cv: CanonicalView, node):
    axes = cv.reduce_axes(node)
    return None if axes is None else mean(cv.expr(node.input[0]), axes)


def _reduce_sum(square: bool):
    def read(cv: CanonicalView, node):
        axes = cv.reduce_axes(node)
        n = None if axes is None else cv.count(node.input[0], axes)
        dynamic = None if n is not None or axes is None else cv.dynamic_count(node.input[0], axes)
        if n is None and dynamic is None:
            return None
        e = cv.expr(node.input[0])
        e = power(e, Fraction(2)) if square else e
        m = e and mean(e, axes)
        if m is None:
            return None
        return scale(m, n) if n is not None else mul(m, Expr.atom(dynamic))
    return read


def _global_average_pool(cv: CanonicalView, node):
    rank = cv.rank(node.input[0])
    if rank is None or rank < 3:
        return None
    return mean(cv.expr(node.input[0]), tuple(range(2 - rank, 0)))


def _reshape(cv: CanonicalView, node):
    """A Reshape that gives a tensor back its own shape (tf2onnx reshapes means to [-1, 1, H, W]),
    or reshapes a tensor filled with one value (a ones_like mask)."""
    inner = cv.expr(node.input[0]).constant()
    if inner is not None and inner.size == 1:
        return Expr.const(inner.reshape(()))
    before = cv.view.dims(node.input[0])
    if before is None:
        return None
    after = cv.view.dims(node.output[0])
    target = cv.view.const(node.input[1]) if len(node.input) > 1 else None
    if target is not None and target.ndim == 1 and len(target) == len(before):
        allow_zero = attr(node, "allowzero", 0)
        wild = [i for i, t in enumerate(target) if t == -1 or (t == 0 and not allow_zero)]
        fixed = [i for i in range(len(before)) if i not in wild]
        # Every fixed entry equals the known dimension; a 0 copies it; a single -1 takes what is left,
        # which with every other dimension equal is its own.
        if all(isinstance(before[i], int) and int(target[i]) == before[i] for i in fixed) and \
                sum(1 for i in wild if target[i] == -1) <= 1:
            return cv.expr(node.input[0])
    if after is not None and None not in before and list(before) == list(after):
        return cv.expr(node.input[0])
    return None


def _transpose(cv: CanonicalView, node):
    perm = attr(node, "perm")
    rank = cv.rank(node.input[0])
    if perm is None:
        if rank is None:
            return None
        perm = list(reversed(range(rank)))
    return transpose(cv.expr(node.input[0]), tuple(int(p) for p in perm))


def _max(cv: CanonicalView, node):
    # Max(var, 0): a variance is never negative, so the clamp changes nothing but rounding noise.
    if len(node.input) != 2:
        return None
    a, b = cv.expr(node.input[0]), cv.expr(node.input[1])
    if b.constant() is not None and np.all(b.constant() == 0) and variance_of(a) is not None:
        return a
    return None


def _where(cv: CanonicalView, node):
    # div_no_nan: Where(Equal(n, 0), 0, a / n) is a / n when the count n is never 0.
    cond = cv.view.producer.get(node.input[0])
    if cond is None or cond.op_type != "Equal":
        value = cv.view.const(node.input[0])  # a guard another tool already evaluated
        if value is not None and value.size and (np.all(value) or not np.any(value)):
            return cv.expr(node.input[1] if bool(value.reshape(-1)[0]) else node.input[2])
        return None
    n, zero = cv.expr(cond.input[0]), cv.expr(cond.input[1])
    if zero.constant() is None or np.any(zero.constant() != 0):
        return None
    count = n.constant()
    if count is None and _positive_count(n):
        count = np.ones(())  # a count of run-time sizes: never 0 where the tensor has values at all
    then = cv.expr(node.input[1]).constant()
    if count is None or np.any(count == 0) or then is None or np.any(then != 0):
        return None
    return cv.expr(node.input[2])


def _positive_count(e: Expr) -> bool:
    one = e.single()
    return one is not None and np.all(one[1] > 0) and all(isinstance(a, Count) and p > 0 for a, p in one[0])


def _constant_of_shape(cv: CanonicalView, node):
    value = attr(node, "value")
    fill = 0.0 if value is None else float(onnx.numpy_helper.to_array(value).reshape(-1)[0])
    return Expr.const(fill)


_OPS = {
    "Identity": _same, "Cast": _cast, "Reshape": _reshape, "Transpose": _transpose,
    "Add": _binary(add), "Sub": _binary(_sub), "Mul": _binary(mul), "Div": _binary(_div),
    "Neg": _unary(lambda a: scale(a, -1.0)), "Reciprocal": _unary(lambda a: power(a, Fraction(-1))),
    "Sqrt": _unary(lambda a: power(a, Fraction(1, 2))), "Pow": _pow,
    "ReduceMean": _reduce_mean, "ReduceSum": _reduce_sum(False), "ReduceSumSquare": _reduce_sum(True),
    "GlobalAveragePool": _global_average_pool, "Max": _max, "Where": _where,
    "ConstantOfShape": _constant_of_shape,
}


# ---- reading statistics -----------------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    """A variance (or mean square) of one tensor over some axes: Mean(X^2) [- Mean(X)^2]."""

    x: Leaf
    axes: tuple[int, ...]
    centered: bool  # Var[X] (LayerNorm); False: E[X^2] (RMSNorm)


def variance_of(v: Expr) -> Moments | None:
    """Moments when `v` is exactly Mean(X^2) - Mean(X)^2 or Mean(X^2) for one leaf X."""
    square = centre = None
    for sig, c in v.terms.items():
        if len(sig) != 1:
            return None
        (a, p), = sig
        if not isinstance(a, Mean):
            return None
        inner = a.arg.single()
        if inner is None or len(inner[0]) != 1 or not close(inner[1], 1):
            return None
        (x, q), = inner[0]
        if not isinstance(x, Leaf):
            return None
        if q == 2 and p == 1 and close(c, 1) and square is None:
            square = (x, a.axes)
        elif q == 1 and p == 2 and close(c, -1) and centre is None:
            centre = (x, a.axes)
        else:
            return None
    if square is None or (centre is not None and centre != square):
        return None
    return Moments(square[0], square[1], centre is not None)


@dataclass(frozen=True)
class InverseStd:
    """The factor (V + eps)^-1/2 of a normalization, V read as Moments."""

    moments: Moments
    eps: float
    atom: Atom
    power: Fraction


def inverse_std(sig: Signature) -> tuple[InverseStd, Signature] | None:
    """Split a term's signature into its (V + eps)^-1/2 factor and the rest."""
    for i, (a, p) in enumerate(sig):
        if isinstance(a, Root) and a.power * p == Fraction(-1, 2):
            base = a.base
        elif isinstance(a, Mean) and p == Fraction(-1, 2):
            base = Expr.atom(a)
        else:
            continue
        v, eps = base.without_constant()
        moments = variance_of(v)
        if moments is None or eps.size and not np.all(eps == eps.reshape(-1)[0]):
            continue
        return InverseStd(moments, float(eps.reshape(-1)[0]) if eps.size else 0.0, a, p), sig[:i] + sig[i + 1:]
    return None


@dataclass(frozen=True)
class NormForm:
    """Y = (X - E[X]) * (Var[X] + eps)^-1/2 * gamma + beta (LayerNorm), or without the mean (RMSNorm),
    over `axes` of `x` (a Leaf, possibly read through a Transpose)."""

    stats: InverseStd
    gamma: np.ndarray  # float64, broadcast like the tensor
    beta: np.ndarray | None
    x: Leaf
    axes: tuple[int, ...]

    @property
    def centered(self) -> bool:
        return self.stats.moments.centered


def _frame(leaf: Leaf, moments: Moments) -> tuple[int, ...] | None:
    """The axes of `leaf` (the stats' tensor read through another Transpose) that the moments
    reduce, when its mean over them is the moments' mean; else None."""
    if leaf.name != moments.x.name:
        return None
    if leaf.perm == moments.x.perm:
        return moments.axes
    rank = len(leaf.perm or moments.x.perm)
    own = moments.x.perm or tuple(range(rank))
    target = make_mean(Expr.atom(moments.x), moments.axes)
    # axis j of `leaf` is axis perm[j] of the tensor; find the axes whose mean is the moments' mean
    perm = leaf.perm or tuple(range(rank))
    reduced = {own[a % rank] for a in moments.axes}
    axes = tuple(sorted(perm.index(a) - rank for a in reduced))
    return axes if make_mean(Expr.atom(leaf), axes) == target else None


def norm_form(e: Expr) -> NormForm | None:
    """Read `e` as a LayerNorm or RMSNorm of one tensor, however its products and shifts were spread."""
    stats, gamma, shift, beta, x = None, None, None, None, None
    for sig, c in e.terms.items():
        if sig == ():
            beta = c
            continue
        found = inverse_std(sig)
        if found is None:
            return None
        s, rest = found
        if stats is not None and s != stats:
            return None
        stats = s
        mean_x = make_mean(Expr.atom(s.moments.x), s.moments.axes)
        if len(rest) == 1 and isinstance(rest[0][0], Leaf) and rest[0][1] == 1 and gamma is None:
            gamma, x = c, rest[0][0]
        elif rest == ((mean_x, Fraction(1)),) and shift is None and s.moments.centered:
            shift = c
        else:
            return None
    if stats is None or gamma is None:
        return None
    axes = _frame(x, stats.moments)
    if axes is None:
        return None
    if stats.moments.centered and (shift is None or not close(shift, -gamma)):
        return None
    return NormForm(stats, gamma, beta, x, axes)
