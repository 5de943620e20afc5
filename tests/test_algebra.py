"""The canonical view (normfold/passes/_algebra.py) on hand-built graphs: each op reader is checked by
evaluating the expression it reads with numpy and comparing it with what onnxruntime computes for
the same tensor, and each guard by a near-miss that must stay a Leaf (not looked into). Recognisers
trust these readings, so a reader that returns the wrong algebra fuses the wrong thing."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest

from builders import build, run
from normfold.graph import GraphView
from normfold.passes import _algebra as A
from normfold.passes._algebra import Count, CanonicalView, Expr, Leaf, Mean, Root, power
from normfold.shapes import infer_shapes

RNG = np.random.default_rng(3)


def view(text: str, opset: int = 18, check: bool = True, drop: tuple[str, ...] = (),
         **consts) -> tuple[CanonicalView, onnx.ModelProto]:
    """The canonical view of a graph given as ONNX text, with shapes inferred as fold() infers them
    (less those of the tensors in `drop`, as when inference could not tell them)."""
    if check:
        model = build(text, opset=opset, **consts)
    else:  # a graph onnx's checker rejects (a wrong input count): the view must still not misread it
        model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{text}')
        for name, value in consts.items():
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    shapes = {k: v for k, v in infer_shapes(model).items() if k not in drop}
    return CanonicalView(GraphView(model.graph, shapes=shapes, opset=opset)), model


def evaluate(e: Expr, env: dict[str, np.ndarray]) -> np.ndarray:
    """The value of an expression, its leaves taken from `env` (a Count from env["#count"])."""
    total = np.zeros((), np.float64)
    for sig, c in e.terms.items():
        term = np.asarray(c, np.float64)
        for a, p in sig:
            term = term * np.power(_atom_value(a, env), float(p))
        total = total + term
    return total


def _atom_value(a, env) -> np.ndarray:
    if isinstance(a, Leaf):
        x = np.asarray(env[a.name], np.float64)
        if not a.perm:
            return x
        return np.transpose(x.reshape((1,) * (len(a.perm) - x.ndim) + x.shape), a.perm)
    if isinstance(a, Mean):
        return np.mean(evaluate(a.arg, env), axis=a.axes, keepdims=True)
    if isinstance(a, Root):
        return np.power(evaluate(a.base, env), float(a.power))
    assert isinstance(a, Count)
    return np.asarray(env["#count"], np.float64)


def feeds_for(model: onnx.ModelProto, positive: bool = False) -> dict[str, np.ndarray]:
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in init:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            value = RNG.standard_normal(shape)
            feeds[vi.name] = (np.abs(value) + 0.5 if positive else value).astype(np.float32)
    return feeds


def is_leaf(e: Expr, name: str) -> bool:
    return e == Expr.atom(Leaf(name)) or e.key == Expr.atom(Leaf(name)).key


def readers() -> dict:
    """The op readers, the factory-made ones made now: _OPS holds readers made when the module was
    imported, so a test that reads only through it never runs _binary, _unary or _reduce_sum."""
    return {**A._OPS, "Add": A._binary(A.add), "Sub": A._binary(A._sub), "Mul": A._binary(A.mul),
            "Div": A._binary(A._div), "Neg": A._unary(lambda a: A.scale(a, -1.0)),
            "Reciprocal": A._unary(lambda a: A.power(a, Fraction(-1))),
            "Sqrt": A._unary(lambda a: A.power(a, Fraction(1, 2))),
            "ReduceSum": A._reduce_sum(False), "ReduceSumSquare": A._reduce_sum(True)}


def read(cv: CanonicalView, out: str) -> Expr | None:
    """What the reader of `out`'s producer returns (None: it does not read the node)."""
    node = cv.view.producer[out]
    return readers()[node.op_type](cv, node)


def assert_reads_as_computed(text: str, out: str = "y", positive: bool = False, env: dict | None = None,
                             **consts) -> Expr:
    """The reader of `out`'s node reads it (it returns an expression), through the view too (the
    view does not make `out` a Leaf of itself), and both expressions have the value onnxruntime
    computes for `out`."""
    cv, model = view(text, **consts)
    feeds = feeds_for(model, positive)
    [expected] = run(model, feeds)
    direct = read(cv, out)
    assert direct is not None, f"{out}: the reader returned None"
    through_view = cv.expr(out)
    assert out not in through_view.leaves, f"{out} was not looked into: {through_view!r}"
    for e in (direct, through_view):
        np.testing.assert_allclose(np.broadcast_to(evaluate(e, {**feeds, **(env or {})}), expected.shape),
                                   expected, rtol=1e-5, atol=1e-6)
    return direct


def assert_not_read(text: str, out: str = "y", check: bool = True, drop: tuple[str, ...] = (), **consts) -> None:
    """The reader of `out`'s node refuses it, so the view reads `out` as a Leaf."""
    cv, _ = view(text, check=check, drop=drop, **consts)
    assert read(cv, out) is None
    assert cv.expr(out).key == Expr.atom(Leaf(out)).key


# ---- the elementwise readers ------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary_ops_read_their_operands_in_order(op):
    # a - b and a / b differ from b - a and b / a: the operands' order is asserted by the values
    assert_reads_as_computed(f"g (float[3,4] a, float[3,4] b) => (float[3,4] y) {{ y = {op} (a, b) }}",
                             positive=True)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_a_binary_op_with_a_third_input_is_not_read_as_that_op(op):
    # not valid ONNX, but a custom exporter's node must be left alone rather than read as a op b
    assert_not_read(f"g (float[3,4] a, float[3,4] b, float[3,4] c) => (float[3,4] y) {{ y = {op} (a, b, c) }}",
                    check=False)


@pytest.mark.parametrize("op", ["Neg", "Reciprocal", "Sqrt", "Identity"])
def test_unary_ops_read_their_input(op):
    assert_reads_as_computed(f"g (float[3,4] a) => (float[3,4] y) {{ y = {op} (a) }}", positive=True)


@pytest.mark.parametrize("to, source", [(1, "float"), (11, "float"), (10, "float"), (1, "double")])
def test_a_float_cast_of_a_float_keeps_its_value(to, source):
    cv, _ = view(f"g ({source}[3] a) => (float[3] y) {{ c = Cast <to={to}> (a)\n y = Identity (c) }}", check=False)
    assert read(cv, "c").key == Expr.atom(Leaf("a")).key


@pytest.mark.parametrize("to, source", [(1, "int64"), (1, "int32"), (7, "float"), (9, "float")])
def test_a_cast_to_or_from_a_non_float_is_not_looked_through(to, source):
    """Cast(int -> float) is a Leaf: the integer input's value is not the float tensor's algebra
    (and a Cast to int or bool rounds)."""
    assert_not_read(f"g ({source}[3] a) => (float[3] y) {{ y = Cast <to={to}> (a) }}", check=False)


@pytest.mark.parametrize("text", [
    "y = Pow (a, two)", "y = Pow (a, half)", "y = Pow (a, mhalf)", "y = Pow (a, three)"])
def test_pow_by_a_constant_reads_as_that_power(text):
    assert_reads_as_computed(f"g (float[3,4] a) => (float[3,4] y) {{ {text} }}", positive=True,
                             two=np.float32(2), half=np.float32(0.5), mhalf=np.float32(-0.5), three=np.float32(3))


@pytest.mark.parametrize("text, consts", [
    ("y = Pow (a, b)", {}), ("y = Pow (a, ab)", {"ab": np.float32([2, 2, 2, 2])}),
    ("y = Pow (a, odd)", {"odd": np.float32(0.3)})])
def test_pow_by_a_tensor_or_an_odd_exponent_is_a_leaf(text, consts):
    assert_not_read(f"g (float[3,4] a, float[3,4] b) => (float[3,4] y) {{ {text} }}", **consts)


# ---- reductions -------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceMean"])
@pytest.mark.parametrize("axes", [[0], [1], [-2], [0, 2], [-3, -2, -1]])
def test_reductions_read_as_a_mean_times_the_count(op, axes):
    """ReduceSum(x) = Mean(x) * count over the axes, ReduceSumSquare the same of x^2; axes given
    non-negative, negative, and every one (the first axis is -rank)."""
    e = assert_reads_as_computed(
        f"g (float[2,3,4] a) => (float[?,?,?] y) {{ y = {op} <keepdims=1> (a, ax) }}",
        opset=18, ax=np.array(axes, np.int64))
    assert e.leaves == {"a"}


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceMean"])
def test_reductions_with_keepdims_0_or_unknown_axes_are_leaves(op):
    assert_not_read(f"g (float[2,3,4] a) => (float[3,4] y) {{ y = {op} <keepdims=0> (a, ax) }}",
                    ax=np.array([0], np.int64))
    assert_not_read(f"g (float[2,3,4] a, int64[1] ax) => (float[?,?,?] y) {{ y = {op} (a, ax) }}")


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare"])
def test_a_sum_over_a_dynamic_size_is_a_mean_times_a_run_time_count(op):
    """Over a dynamic axis the count is not a number: the mean times Count(that size)."""
    cv, model = view(f"g (float[N,4] a) => (float[1,4] y) {{ y = {op} <keepdims=1> (a, ax) }}",
                     ax=np.array([0], np.int64))
    e = read(cv, "y")
    [(sig, c)] = e.terms.items()
    counts = [x for x, _ in sig if isinstance(x, Count)]
    assert len(counts) == 1 and np.all(c == 1)
    feeds = {"a": RNG.standard_normal((5, 4)).astype(np.float32)}
    np.testing.assert_allclose(evaluate(e, {**feeds, "#count": 5}), run(model, feeds)[0], rtol=1e-5)


def test_a_sum_over_a_dynamic_size_of_unknown_axes_is_a_leaf():
    assert_not_read("g (float[N,4] a, int64[1] ax) => (float[?,?] y) { y = ReduceSum (a, ax) }")


def test_global_average_pool_is_the_mean_over_the_spatial_axes():
    e = assert_reads_as_computed("g (float[2,3,4,5] a) => (float[2,3,1,1] y) { y = GlobalAveragePool (a) }")
    [(sig, _)] = e.terms.items()
    assert sig[0][0].axes == (-2, -1)


def test_global_average_pool_of_unknown_rank_is_a_leaf():
    assert_not_read("g (float[2,3,4,5] a) => (float[2,3,1,1] y) { y = GlobalAveragePool (a) }", drop=("a",))


# ---- shape ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [[0, -1, 4], [2, 3, 4], [2, -1, 0], [-1, 3, 4], [0, 0, 0]])
def test_a_reshape_to_its_own_shape_is_the_value_itself(target):
    """Read from the target alone (the output's shape dropped, as when inference lost it): a 0
    copies the dimension, one -1 takes what is left, every other entry must equal the dimension."""
    cv, _ = view("g (float[2,3,4] a) => (float[2,3,4] y) { y = Reshape (a, t) }", drop=("y",),
                 t=np.array(target, np.int64))
    assert read(cv, "y").key == Expr.atom(Leaf("a")).key


@pytest.mark.parametrize("target", [[3, 2, 4], [2, 4, 3], [4, -1, 2], [-1, 2, 4], [6, 4], [24]])
def test_a_reshape_to_another_shape_is_a_leaf(target):
    assert_not_read("g (float[2,3,4] a) => (float[?] y) { y = Reshape (a, t) }", check=False, drop=("y",),
                    t=np.array(target, np.int64))


def test_a_reshape_with_two_wildcards_is_a_leaf():
    # invalid (two -1), so only the reader's own count of -1 keeps it from reading as the value
    assert_not_read("g (float[2,3,4] a) => (float[2,3,4] y) { y = Reshape (a, t) }", check=False, drop=("y",),
                    t=np.array([2, -1, -1], np.int64))


def test_a_reshape_target_of_another_rank_or_not_a_vector_is_not_matched_entry_by_entry():
    assert_not_read("g (float[2,3,4] a) => (float[?] y) { y = Reshape (a, t) }", check=False, drop=("y",),
                    t=np.array([[2, 3, 4]], np.int64))


def test_allowzero_makes_a_0_in_the_target_a_zero_size():
    """With allowzero=1 a 0 is a size of zero, not "copy": [3, 0] reshaped to [0, 0] (both empty)
    is not the same tensor, while without allowzero [0, 0] copies both sizes."""
    text = "g (float[3,0] a) => (float[?,?] y) {{ y = Reshape {attrs} (a, t) }}"
    t = np.array([0, 0], np.int64)
    assert_not_read(text.format(attrs="<allowzero=1>"), opset=14, drop=("y",), t=t)
    cv, _ = view(text.format(attrs="<allowzero=0>"), opset=14, drop=("y",), t=t)
    assert read(cv, "y").key == Expr.atom(Leaf("a")).key


def test_a_reshape_whose_target_is_computed_is_read_from_the_inferred_shapes():
    """The target a graph input (not constant): the value itself when inference says the output
    has the input's static shape, a Leaf when the shape is dynamic or differs."""
    text = "g (float[{dims}] a, int64[3] t) => (float[{out}] y) {{ y = Reshape (a, t) }}"
    cv, _ = view(text.format(dims="2,3,4", out="2,3,4"))
    cv.view.shapes["y"] = (1, [2, 3, 4])  # what inference would know from a computed target
    assert read(cv, "y").key == Expr.atom(Leaf("a")).key
    cv.view.shapes["y"] = (1, [4, 3, 2])
    assert read(cv, "y") is None
    cv, _ = view(text.format(dims="N,3,4", out="N,3,4"))
    cv.view.shapes["y"] = cv.view.shapes["a"] = (1, [None, 3, 4])  # the same unknown size, or not
    assert read(cv, "y") is None


def test_a_reshape_with_its_shape_as_an_attribute_is_read_from_the_inferred_shapes():
    """Reshape-1 (opset < 5) has one input and a `shape` attribute: no target input to read."""
    cv, _ = view("g (float[2,3,4] a) => (float[2,3,4] y) { y = Reshape <shape=[2,3,4]> (a) }", check=False)
    cv.view.shapes["y"] = (1, [2, 3, 4])
    assert read(cv, "y").key == Expr.atom(Leaf("a")).key


def test_a_reshape_of_a_tensor_filled_with_one_value_is_that_value():
    """ones_like reshaped: ConstantOfShape(Shape(x)) is no constant to the graph (x's shape is
    read at run time) but is one value everywhere, so any Reshape of it is that value."""
    e = assert_reads_as_computed("""g (float[2,3] a) => (float[3,2] y) {
        s = Shape (a)
        c = ConstantOfShape <value = float[1] {2.5}> (s)
        y = Reshape (c, t) }""", t=np.array([3, 2], np.int64))
    assert e.constant() is not None and e.constant().shape == ()


def test_a_reshape_of_a_constant_tensor_of_several_values_is_not_a_scalar():
    cv, _ = view("g (float[2,3] a) => (float[3,2] y) { y = Reshape (k, t) }", drop=("y",),
                 k=np.arange(6, dtype=np.float32).reshape(2, 3), t=np.array([3, 2], np.int64))
    # the view reads the Reshape of a constant as the constant it evaluates to; its reader does not
    assert read(cv, "y") is None
    np.testing.assert_array_equal(cv.expr("y").constant(), np.arange(6).reshape(3, 2))


@pytest.mark.parametrize("value, fill", [("float[1] {2.5}", 2.5), ("float {-3.0}", -3.0), (None, 0.0)])
def test_constant_of_shape_reads_as_its_fill_value(value, fill):
    attrs = f" <value = {value}>" if value else ""
    cv, _ = view(f"""g (float[2,3] a) => (float[2,3] y) {{
        s = Shape (a)
        y = ConstantOfShape{attrs} (s) }}""", check=False)
    np.testing.assert_array_equal(read(cv, "y").constant(), fill)


@pytest.mark.parametrize("perm", [[1, 0, 2], [2, 0, 1], [0, 2, 1], None])
def test_transpose_permutes_leaves_means_and_coefficients(perm):
    attrs = f" <perm={perm}>" if perm else ""
    assert_reads_as_computed(f"""g (float[2,3,4] a) => (float[?,?,?] y) {{
        m = ReduceMean <axes=[-1]> (a)
        d = Sub (a, m)
        w = Mul (d, c)
        s = Add (w, b)
        r = Sqrt (s)
        y = Transpose{attrs} (r) }}""", opset=17, positive=True,
        c=RNG.standard_normal((3, 4)).astype(np.float32), b=np.float32(20))


def test_transpose_of_a_coefficient_of_the_full_rank():
    assert_reads_as_computed("""g (float[2,3,4] a) => (float[4,3,2] y) {
        w = Mul (a, c)
        y = Transpose <perm=[2,1,0]> (w) }""", c=RNG.standard_normal((2, 3, 4)).astype(np.float32))


def test_a_transpose_and_its_inverse_give_the_leaf_back():
    cv, _ = view("""g (float[2,3,4] a) => (float[2,3,4] y) {
        t = Transpose <perm=[2,0,1]> (a)
        y = Transpose <perm=[1,2,0]> (t) }""")
    assert cv.expr("t").key != Expr.atom(Leaf("a")).key
    assert cv.expr("y").key == Expr.atom(Leaf("a")).key


def test_a_transpose_of_unknown_rank_without_perm_is_a_leaf():
    assert_not_read("g (float[2,3,4] a) => (float[4,3,2] y) { y = Transpose (a) }", drop=("a",))


def test_a_transpose_of_a_lower_rank_mean_is_a_leaf():
    """A Mean (or Root) of a rank-2 tensor read transposed, broadcast into rank 3 and transposed again: its
    perm cannot be carried to rank 3, so the outer Transpose is not looked into."""
    for inner in ("m = ReduceMean <axes=[-1]> (tb)", "tb1 = Add (tb, one)\n m = Sqrt (tb1)"):
        cv, _ = view(f"""g (float[4,4] b, float[2,4,4] a) => (float[4,4,2] y) {{
            tb = Transpose <perm=[1,0]> (b)
            {inner}
            z = Add (a, m)
            y = Transpose <perm=[2,1,0]> (z) }}""", opset=17, one=np.float32(1))
        assert cv.expr("y").key == Expr.atom(Leaf("y")).key, inner


def test_transpose_of_a_sum_with_a_broadcast_lower_rank_tensor():
    assert_reads_as_computed("""g (float[2,3,4] a, float[3,4] b) => (float[4,2,3] y) {
        z = Add (a, b)
        y = Transpose <perm=[2,0,1]> (z) }""")


# ---- guards -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cond, picked", [("[1]", "a"), ("[0]", "b"), ("[1, 1, 1]", "a"), ("[0, 0, 0]", "b")])
def test_where_with_a_constant_condition_is_the_branch_it_picks(cond, picked):
    shape = "" if cond in ("[1]", "[0]") else "[3]"
    value = cond.strip("[]") if not shape else cond.strip("[]")
    cv, _ = view(f"""g (float[3] a, float[3] b) => (float[3] y) {{
        k = Constant <value = bool{shape} {{{value}}}> ()
        y = Where (k, a, b) }}""")
    assert read(cv, "y").key == Expr.atom(Leaf(picked)).key


def test_where_with_a_mixed_or_unknown_condition_is_a_leaf():
    assert_not_read("""g (float[3] a, float[3] b) => (float[3] y) {
        k = Constant <value = bool[3] {1, 0, 1}> ()
        y = Where (k, a, b) }""")
    assert_not_read("g (bool[3] k, float[3] a, float[3] b) => (float[3] y) { y = Where (k, a, b) }")


def test_div_no_nan_by_a_nonzero_count_is_the_division():
    """Where(Equal(n, 0), 0, a / n) is a / n when n is a constant that is never 0, or a count of
    run-time sizes (ReduceSum of ones_like)."""
    for n in ([2, 3, 4], [-2, 3, 4]):  # a negative constant is never 0 either
        assert_reads_as_computed("""g (float[3] a) => (float[3] y) {
            z = Equal (n, zero)
            q = Div (a, n)
            y = Where (z, zero, q) }""", n=np.float32(n), zero=np.float32(0))
    cv, _ = view("""g (float[N,3] a) => (float[N,3] y) {
        s = Shape (a)
        ones = ConstantOfShape <value = float[1] {1.0}> (s)
        n = ReduceSum <keepdims=1> (ones, ax)
        z = Equal (n, zero)
        q = Div (a, n)
        y = Where (z, zero, q) }""", ax=np.array([0], np.int64), zero=np.float32(0))
    assert read(cv, "y").key == cv.expr("q").key


@pytest.mark.parametrize("n, zero, then", [
    ("[2, 0, 4]", "0", "0"),    # n can be 0: the guard changes what is computed
    ("[2, 3, 4]", "1", "0"),    # compares n with 1, not 0
    ("[2, 3, 4]", "0", "1"),    # yields 1, not 0, where n is 0
    ("x", "0", "0"),            # n a graph input: it may be 0
    ("[2, 3, 4]", "x", "0"),    # compared with a graph input
    ("[2, 3, 4]", "0", "x"),    # the guarded value a graph input
])
def test_div_no_nan_that_is_not_a_plain_division_is_a_leaf(n, zero, then):
    names = {"x": "x", "0": "c0", "1": "c1", "[2, 0, 4]": "n0", "[2, 3, 4]": "n"}

    def value(v):
        return names[v]
    consts = {value(v): np.float32(eval(v)) for v in (n, zero, then) if v != "x"}
    assert_not_read(f"""g (float[3] a, float[3] x) => (float[3] y) {{
        z = Equal ({value(n)}, {value(zero)})
        q = Div (a, {value(n)})
        y = Where (z, {value(then)}, q) }}""", **consts)


def test_max_of_a_variance_and_0_is_the_variance():
    text = """g (float[2,8] a) => (float[2,1] y) {{
        m = ReduceMean <axes=[-1]> (a)
        sq = Mul (a, a)
        ms = ReduceMean <axes=[-1]> (sq)
        mm = Mul (m, m)
        v = Sub (ms, mm)
        y = Max ({args}) }}"""
    cv, _ = view(text.format(args="v, zero"), opset=17, zero=np.float32(0))
    assert read(cv, "y").key == cv.expr("v").key
    for args in ("v, one", "m, zero", "zero, v", "v, a"):
        assert_not_read(text.format(args=args), opset=17, check=args != "v, a", zero=np.float32(0),
                        one=np.float32(1))
    assert_not_read(text.format(args="v, zero, zero"), opset=17, check=False, zero=np.float32(0))


# ---- counting ---------------------------------------------------------------------------------
def test_count_of_a_reduction_over_static_axes():
    cv, _ = view("g (float[2,3,4] a) => (float[2,3,4] y) { y = Identity (a) }")
    assert cv.count("a", (-1,)) == 4
    assert cv.count("a", (-3, -1)) == 8
    assert cv.count("a", (-3, -2, -1)) == 24
    assert cv.count("a", (-4,)) is None  # past the rank
    assert cv.count("nowhere", (-1,)) is None


def test_count_over_a_dynamic_size_is_not_a_number():
    cv, _ = view("g (float[N,4] a) => (float[N,4] y) { y = Identity (a) }")
    assert cv.count("a", (-1,)) == 4
    assert cv.count("a", (-2,)) is None
    assert cv.count("a", (-2, -1)) is None
    count = cv.dynamic_count("a", (-2, -1))
    assert isinstance(count, Count) and len(count.dims) == 2 and 4 in count.dims
    assert cv.dynamic_count("a", (-3,)) is None


# ---- how an expression prints (the recognisers' debugging aid) -----------------------------------
def test_expressions_print_as_sums_of_products():
    x, t = Leaf("x"), Leaf("x", (1, 0))
    e = Expr({((x, Fraction(2)),): np.array(3.0), ((t, Fraction(1)), (Mean(Expr.atom(x), (-1,)), Fraction(-1, 2))):
              np.ones((1, 4))})
    assert repr(e) == "3*x^2 + C[4]*T[1, 0](x)*mean[-1](1*x)^-1/2"
    assert repr(Expr({})) == "0"
    assert repr(Expr.atom(Root(Expr({((x, Fraction(1)),): np.array(1.0), (): np.array(2.0)}), Fraction(1, 2)))) \
        == "1*(1*x + 2)^1/2"
    assert repr(Leaf("x", (0, 1))) == "T[0, 1](x)" and repr(Leaf("x")) == "x"
    assert repr(Count(("a:0", 4))) == "N['a:0', 4]"


# ---- reduction axes ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceMean"])
def test_a_reduction_without_axes_is_over_every_axis(op):
    e = assert_reads_as_computed(f"g (float[2,3,4] a) => (float[1,1,1] y) {{ y = {op} (a) }}")
    cv, _ = view(f"g (float[2,3,4] a) => (float[1,1,1] y) {{ y = {op} (a) }}")
    assert cv.reduce_axes(cv.view.producer["y"]) == (-3, -2, -1)
    assert e.leaves == {"a"}


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceSumSquare", "ReduceMean"])
def test_a_reduction_without_axes_of_unknown_rank_or_with_noop_is_a_leaf(op):
    """noop_with_empty_axes=1: no axes means no reduction at all (not read); unknown rank: which
    axes "every axis" is cannot be said."""
    assert_not_read(f"g (float[2,3,4] a) => (float[2,3,4] y) {{ y = {op} <noop_with_empty_axes=1> (a) }}")
    assert_not_read(f"g (float[2,3,4] a) => (float[1,1,1] y) {{ y = {op} (a) }}", drop=("a",))


def test_reduction_axes_from_the_attribute_or_the_input():
    cv, _ = view("""g (float[2,3,4] a) => (float[1,3,1] y, float[2,1,1] z) {
        y = ReduceMean <axes=[2, 0]> (a)
        z = ReduceSum <keepdims=1> (a, ax) }""", opset=13, ax=np.array([-1, 1, 2], np.int64))
    assert cv.reduce_axes(cv.view.producer["y"]) == (-3, -1)
    assert cv.reduce_axes(cv.view.producer["z"]) == (-2, -1)  # repeated axes once, sorted


def test_reduction_axes_past_the_rank_or_non_negative_of_unknown_rank_are_unknown():
    cv, _ = view("g (float[2,3,4] a) => (float[?,?,?] y) { y = ReduceSum (a, ax) }", check=False,
                 ax=np.array([-4], np.int64))
    assert cv.reduce_axes(cv.view.producer["y"]) is None
    cv, _ = view("g (float[2,3,4] a) => (float[?,?,?] y) { y = ReduceSum (a, ax) }", drop=("a",),
                 ax=np.array([1], np.int64))
    assert cv.reduce_axes(cv.view.producer["y"]) is None
    cv, _ = view("g (float[2,3,4] a) => (float[?,?,?] y) { y = ReduceSum (a, ax) }", drop=("a",),
                 ax=np.array([-1], np.int64))
    assert cv.reduce_axes(cv.view.producer["y"]) == (-1,)  # negative: trailing at any rank


def test_a_sum_over_an_axis_of_size_1_is_the_value_and_over_size_0_is_0():
    assert_reads_as_computed("g (float[1,3,4] a) => (float[1,3,4] y) { y = ReduceSum <keepdims=1> (a, ax) }",
                             ax=np.array([0], np.int64))
    cv, _ = view("g (float[0,3] a) => (float[1,3] y) { y = ReduceSum <keepdims=1> (a, ax) }",
                 ax=np.array([0], np.int64))
    e = read(cv, "y")
    assert e.terms == {} and e.constant() == 0


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 0.3, 1 / 3 + 1e-9])
def test_an_exponent_is_a_small_exact_fraction_or_none(value):
    assert A.exponent(value) is None
    assert A.exponent(-0.5) == Fraction(-1, 2) and A.exponent(2.0) == 2 and A.exponent(0.125) == Fraction(1, 8)


def test_pow_by_an_infinite_exponent_is_a_leaf():
    assert_not_read("g (float[3,4] a) => (float[3,4] y) { y = Pow (a, k) }", k=np.float32(np.inf))


def test_div_no_nan_by_a_sum_or_a_signed_count_is_not_read_as_a_positive_count():
    text = """g (float[N,3] a, float[N,3] x) => (float[N,3] y) {{
        s = Shape (a)
        ones = ConstantOfShape <value = float[1] {{1.0}}> (s)
        n0 = ReduceSum <keepdims=1> (ones, ax)
        n = {n}
        z = Equal (n, zero)
        q = Div (a, n)
        y = Where (z, zero, q) }}"""
    for n in ("Add (n0, one)", "Mul (n0, x)", "Reciprocal (n0)", "Identity (x)", "Mul (n0, onezero)"):
        assert_not_read(text.format(n=n), ax=np.array([0], np.int64), zero=np.float32(0), one=np.float32(1),
                        onezero=np.float32([1, 0, 1]))


def test_counts_of_different_sizes_differ():
    assert Count(("a:0",)) != Count(("b:0",)) and Count(("a:0",)) == Count(("a:0",))
    assert Count(("a:0", 4)) != Count(("a:0",))


# ---- the algebra itself -----------------------------------------------------------------------
def test_zero_has_no_terms():
    """0 is the empty sum, so x + 0 is x (one term: a LayerNorm's Add(zeros) is no beta)."""
    assert Expr.const(0.0).terms == {} and Expr.const([0.0, 0.0]).terms == {}
    cv, _ = view("g (float[3] a) => (float[3] y) { y = Add (a, z) }", z=np.zeros(3, np.float32))
    assert cv.expr("y").key == Expr.atom(Leaf("a")).key


def test_coefficients_are_close_to_a_relative_millionth():
    assert A.close(0.0, 0.0) and A.close([1.0, 0.0], [1.0, 0.0])  # a zero gamma entry matches itself
    assert A.close(1 + 1e-7, 1) and not A.close(1 + 1e-5, 1)
    assert not A.close(1.001e-3, 1e-3) and A.close(1e-3 * (1 + 1e-7), 1e-3)


def test_powers_of_constants_are_constants():
    x = Expr.atom(Leaf("x"))
    s = A.add(x, Expr.const(1.0))
    assert power(s, Fraction(0)).constant() == 1  # (x + 1)^0, not a root of it
    assert power(Expr({}), Fraction(1, 2)).constant() == 0
    assert power(Expr.const(4.0), Fraction(-1, 2)).constant() == 0.5


def test_powers_of_constants_warn_about_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(power(Expr({}), Fraction(-1)).constant())
        assert np.isnan(power(Expr.const(-1.0), Fraction(1, 2)).constant())


def _atoms(e: Expr) -> list:
    [(sig, _)] = e.terms.items()
    return [(type(a).__name__, p) for a, p in sig]


def test_a_term_to_an_integer_power_distributes_and_a_leaf_to_a_fraction_stays_in_a_root():
    """(c x)^-1 = c^-1 x^-1, but (c x)^1/2 is kept whole: x may be negative, so x^1/2 is not
    sqrt(c)-free algebra; a mean or a root with c > 0 does distribute."""
    cv, _ = view("""g (float[2,4] a) => (float[2,4] y) {
        r1 = Reciprocal (a)
        a2 = Mul (a, two)
        r2 = Reciprocal (a2)
        s2 = Sqrt (a2)
        az = Mul (a, onezero)
        rz = Reciprocal (az)
        sq = Mul (a, a)
        m = ReduceMean <axes=[-1]> (sq)
        sm = Sqrt (m)
        m2 = Mul (m, two)
        sm2 = Pow (m2, mhalf)
        nm = Neg (m)
        snm = Sqrt (nm)
        mz = Mul (m, onezero)
        smz = Pow (mz, mhalf)
        y = Identity (a) }""", opset=17, two=np.float32(2), mhalf=np.float32(-0.5),
        onezero=np.float32([1, 0, 1, 1]))
    assert _atoms(cv.expr("r1")) == [("Leaf", -1)]
    assert cv.expr("r2").key == Expr({((Leaf("a"), Fraction(-1)),): np.array(0.5)}).key
    assert _atoms(cv.expr("s2")) == [("Root", 1)]
    assert _atoms(cv.expr("rz")) == [("Root", 1)]  # a coefficient with a zero is not inverted
    assert _atoms(cv.expr("sm")) == [("Mean", Fraction(1, 2))]
    [(_, c)] = cv.expr("sm2").terms.items()
    assert _atoms(cv.expr("sm2")) == [("Mean", Fraction(-1, 2))] and np.isclose(c, 2 ** -0.5)
    assert _atoms(cv.expr("snm")) == [("Root", 1)]  # sqrt(-m): no real coefficient
    assert _atoms(cv.expr("smz")) == [("Root", 1)]


def test_the_frame_of_the_stats_tensor_read_through_a_transpose():
    """A Keras LayerNorm over (H, W, C) scales Transpose(X) by moments of X: the axes of the
    transposed tensor are those whose mean is the moments' mean, and a tensor read without the
    stats' Transpose has no such axes."""
    nchw = A.Moments(Leaf("x"), (-3, -2, -1), True)
    assert A._frame(Leaf("x", (0, 2, 3, 1)), nchw) == (-3, -2, -1)
    assert A._frame(Leaf("z", (0, 2, 3, 1)), nchw) is None  # another tensor
    assert A._frame(Leaf("x"), nchw) == (-3, -2, -1)
    nhwc_c = A.Moments(Leaf("x", (0, 2, 3, 1)), (-1,), True)
    assert A._frame(Leaf("x"), nhwc_c) is None
    assert A._frame(Leaf("x", (0, 2, 3, 1)), nhwc_c) == (-1,)
    w = A.Moments(Leaf("x"), (-1,), True)
    assert A._frame(Leaf("x", (0, 2, 3, 1)), w) is None  # W of NCHW is no trailing block of NHWC
    hw = A.Moments(Leaf("x"), (-2, -1), True)
    assert A._frame(Leaf("x", (0, 1, 3, 2)), hw) == (-2, -1)


@pytest.mark.parametrize("v, moments", [
    ("Sub (ms, mm)", ("a", True)), ("Identity (ms)", ("a", False)),
    ("Add (ms, mm)", None),      # + E[X]^2
    ("Sub (ms, m)", None),       # - E[X], not its square
    ("Sub (ms, m2m)", None),     # - 2 E[X]^2
    ("Sub (ms, mmz)", None),     # the mean of another tensor
    ("Sub (msz, mm)", None),     # the mean square of another tensor
    ("Sub (ms, ms)", None),      # nothing
    ("Sub (mm, ms)", None),      # the negated variance
    ("Identity (mm)", None),     # E[X]^2 alone
])
def test_a_variance_is_exactly_the_central_or_raw_second_moment(v, moments):
    cv, _ = view(f"""g (float[2,8] a, float[2,8] z) => (float[2,1] y) {{
        m = ReduceMean <axes=[-1]> (a)
        sq = Mul (a, a)
        ms = ReduceMean <axes=[-1]> (sq)
        mm = Mul (m, m)
        m2m = Mul (mm, two)
        mz = ReduceMean <axes=[-1]> (z)
        mmz = Mul (mz, mz)
        sqz = Mul (z, z)
        msz = ReduceMean <axes=[-1]> (sqz)
        y = {v} }}""", opset=17, two=np.float32(2))
    found = A.variance_of(cv.expr("y"))
    if moments is None:
        assert found is None
    else:
        assert (found.x.name, found.axes, found.centered) == (moments[0], (-1,), moments[1])


def test_max_of_nothing_and_0_is_not_read_as_a_variance():
    assert_not_read("g (float[3] a) => (float[3] y) { d = Sub (a, a)\n y = Max (d, zero) }", zero=np.float32(0))


# ---- the inverse standard deviation ----------------------------------------------------------
def _mean_square(name: str = "x") -> Mean:
    return Mean(Expr({((Leaf(name), Fraction(2)),): np.ones(())}), (-1,))


def test_an_inverse_std_is_a_root_or_a_mean_to_the_power_minus_one_half():
    ms = _mean_square()
    found, rest = A.inverse_std(((ms, Fraction(-1, 2)), (Leaf("x"), Fraction(1))))
    assert (found.moments.x.name, found.eps, found.power) == ("x", 0.0, Fraction(-1, 2))
    assert rest == ((Leaf("x"), Fraction(1)),)
    assert A.inverse_std(((ms, Fraction(-1)), (Leaf("x"), Fraction(1)))) is None  # 1 / var: no root
    assert A.inverse_std(((ms, Fraction(1, 2)), (Leaf("x"), Fraction(1)))) is None  # the std itself


def test_the_inverse_std_is_found_after_a_factor_that_is_not_one():
    """Another root first (of a mean of z, no variance): the search goes on to the next factor."""
    mz = Mean(Expr.atom(Leaf("z")), (-1,))
    found, rest = A.inverse_std(((mz, Fraction(-1, 2)), (_mean_square(), Fraction(-1, 2))))
    assert found.moments.x.name == "x" and rest == ((mz, Fraction(-1, 2)),)


def test_an_epsilon_given_per_channel_with_one_value_is_that_value():
    """eps broadcast as a [D] constant of equal entries is one epsilon; of different entries, none."""
    def inverse_std(eps):
        base = Expr({((_mean_square(), Fraction(1)),): np.ones(()), (): np.asarray(eps, np.float64)})
        return A.inverse_std(((Root(base, Fraction(-1, 2)), Fraction(1)),))

    found, _ = inverse_std(np.full(4, 1e-5))
    assert found.eps == 1e-5
    assert inverse_std(np.array([1e-5, 1e-5, 2e-5, 1e-5])) is None
    assert inverse_std(1e-6)[0].eps == 1e-6


def test_rms_without_a_root_is_not_fused():
    """x / mean(x^2) (no Sqrt and no epsilon) is not an RMSNorm."""
    import normfold
    from builders import ops

    model = build("""g (float[2,5,16] x) => (float[2,5,16] y) {
        sq = Mul (x, x)
        ms = ReduceMean <axes=[-1]> (sq)
        y = Div (x, ms) }""", opset=17)
    folded, _ = normfold.fold(model, normfold.FoldOptions(target_opset=23))
    assert ops(folded) == ops(model)


# ---- a constant reshaped by a computed target -----------------------------------------------------
RESHAPED_GAMMA = """g (float[{n},4,2] x, float[{w}] w) => (float[{n},4,2] y) {{
        s = Shape (w)
        gr = Reshape (gamma, s)
        y = Mul (x, gr) }}"""


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_a_constant_reshaped_to_a_computed_shape_inference_knows_is_that_constant(domain):
    """tf_keras reshapes gamma by a target computed from a shape: the view reads the constant with
    the shape inference gives the Reshape's output (not a Leaf, not the flat constant)."""
    gamma = np.arange(8, dtype=np.float32) + 1
    model = build(RESHAPED_GAMMA.format(n=2, w="1,4,2"), opset=18, gamma=gamma)
    shapes = infer_shapes(model)  # before the domain is spelled out (onnx's inference knows only "")
    [reshape] = [n for n in model.graph.node if n.op_type == "Reshape"]
    reshape.domain = domain
    cv = CanonicalView(GraphView(model.graph, shapes=shapes, opset=18))
    assert not cv.view.is_const("gr")
    [(sig, c)] = cv.expr("y").terms.items()
    assert sig == ((Leaf("x"), Fraction(1)),)
    assert c.shape == (4, 2) and np.array_equal(c, gamma.reshape(4, 2).astype(np.float64))


@pytest.mark.parametrize("case", ["dynamic-shape", "other-domain", "not-a-reshape"])
def test_a_computed_reshape_or_op_of_a_constant_without_a_static_result_is_a_leaf(case):
    """The reshaped constant needs every size of the result known (a dynamic one: a Leaf), a
    Reshape of the default domain, and a Reshape (an Expand by the same target is not read so)."""
    gamma = np.arange(8, dtype=np.float32) + 1
    text = RESHAPED_GAMMA.format(n="N" if case == "dynamic-shape" else 2, w="W,4,V" if case == "dynamic-shape" else "1,4,2")
    if case == "not-a-reshape":
        text = text.replace("gr = Reshape (gamma, s)", "gr = Expand (gamma8, s)")
    model = build(text, opset=18, **({"gamma8": gamma.reshape(4, 2)} if case == "not-a-reshape" else {"gamma": gamma}))
    if case == "other-domain":
        [reshape] = [n for n in model.graph.node if n.op_type == "Reshape"]
        reshape.domain = "custom"
        model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    shapes = infer_shapes(model)
    if case == "other-domain":  # the result's shape as for the default domain: only the domain differs
        shapes = infer_shapes(build(text, opset=18, gamma=gamma))
    cv = CanonicalView(GraphView(model.graph, shapes=shapes, opset=18))
    assert cv._small_const("gr") is None
    assert "gr" in cv.expr("y").leaves


# ---- the algebra's own rules: products of roots, cancellation, the size bound, means, depth -----
def test_products_and_powers_of_one_root_combine_into_one_factor():
    """sqrt(b) * sqrt(b) is b (as Root(b, 1)), sqrt(b) / sqrt(b) is 1, sqrt(b)^-2 is 1 / b, and
    (1 / sqrt(b))^-2 is b itself: the root's power is added and multiplied, never dropped."""
    text = """g (float[2,4] a) => (float[2,4] y) {{
        b = Add (a, one)
        s = Sqrt (b)
        r = Reciprocal (s)
        y = {} }}"""
    for rhs in ["Mul (s, s)", "Pow (s, mtwo)", "Pow (r, mtwo)", "Div (s, s)"]:
        e = assert_reads_as_computed(text.format(rhs), positive=True, one=np.float32(1), mtwo=np.float32(-2))
        if rhs == "Div (s, s)":
            assert e.constant() is not None and np.all(e.constant() == 1)
        if rhs == "Pow (r, mtwo)":  # exactly a + 1 again, no Root left
            assert e.key == A.add(Expr.atom(Leaf("a")), Expr.const(1.0)).key


def test_a_difference_of_equal_terms_has_no_terms():
    cv, _ = view("g (float[2,4] a) => (float[2,4] y) { b = Mul (a, three)\n c = Add (a, a)\n d = Add (c, a)\n"
                 " y = Sub (b, d) }", three=np.float32(3))
    assert cv.expr("y").terms == {}


def test_terms_cancel_within_a_relative_millionth_of_the_larger_coefficient():
    """1000 a - 1000.0005 a cancels (5e-7 of 1000); 1e6 a - 999999 a is exactly at the bound and
    cancels; 1000 a - 1000.002 a does not."""
    a = Expr.atom(Leaf("a"))
    assert A.add(A.scale(a, 1000.0), A.scale(a, -1000.0005)).terms == {}
    assert 1e-6 * 1e6 == 1.0 and A.add(A.scale(a, 1e6), A.scale(a, -999999.0)).terms == {}
    assert len(A.add(A.scale(a, 1000.0), A.scale(a, -1000.002)).terms) == 1


@pytest.mark.parametrize("n, read", [(12, True), (13, False)])
def test_a_sum_of_more_than_twelve_terms_is_a_leaf(n, read):
    names = [f"a{k}" for k in range(n)]
    lines = [f"s1 = Add ({names[0]}, {names[1]})"] + [f"s{k} = Add (s{k - 1}, {names[k]})" for k in range(2, n)]
    inputs = ", ".join(f"float[3] {name}" for name in names)
    cv, _ = view(f"g ({inputs}) => (float[3] y) {{ {chr(10).join(lines)}\n y = Identity (s{n - 1}) }}")
    assert (len(cv.expr("y").terms) == n) is read
    assert (cv.expr("y").leaves == {f"s{n - 1}"}) is not read


@pytest.mark.parametrize("text, consts", [
    ("w1 = Add (a, w)\n y = ReduceMean <axes=[-1]> (w1)", {"w": np.float32([1, 2, 4, 8])}),
    ("w1 = Add (a, w)\n y = ReduceMean <axes=[-1]> (w1)", {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}),
    ("w1 = Add (a, w)\n y = ReduceMean <axes=[-2, -1]> (w1)", {"w": np.float32([1, 2, 4, 8])}),
    ("w1 = Mul (a, w)\n y = ReduceMean <axes=[-1]> (w1)", {"w": np.float32([1, 2, 4, 8])}),
])
def test_the_mean_of_a_term_with_a_varying_coefficient(text, consts):
    """A constant varying along the reduced axes is averaged (over the axes it has, kept as size 1);
    a varying weight of a tensor stays inside the mean, to the power 1."""
    assert_reads_as_computed(f"g (float[3,4] a) => (float[3,1] y) {{ {text} }}".replace(
        "float[3,1]", "float[1,1]" if "-2, -1" in text else "float[3,1]"), opset=17, **consts)


def _means_args(e: Expr) -> list:
    return [a.arg for sig in e.terms for a, _ in sig if isinstance(a, Mean)]


def test_a_mean_lets_out_a_root_constant_along_its_axes_but_not_one_varying_along_them():
    """r = (mean(a^2) + eps)^-1/2 is constant along the last axis: mean(a * r) is r * mean(a). With
    an epsilon that varies along that axis it is not, and stays inside (the value says which is right)."""
    text = """g (float[3,4] a) => (float[3,1] y) {
        sq = Mul (a, a)
        ms = ReduceMean <axes=[-1]> (sq)
        ve = Add (ms, eps)
        r = Pow (ve, mhalf)
        ar = Mul (a, r)
        y = ReduceMean <axes=[-1]> (ar) }"""
    e = assert_reads_as_computed(text, opset=17, eps=np.float32(1e-3), mhalf=np.float32(-0.5))
    assert all(not any(isinstance(b, Root) for s in arg.terms for b, _ in s) for arg in _means_args(e)), e
    assert_reads_as_computed(text, opset=17, eps=np.float32([1e-3, 1, 2, 3]), mhalf=np.float32(-0.5))


def test_a_mean_lets_out_a_run_time_count():
    """s = ReduceSum(x) over a dynamic axis is N * mean(x); mean(s * z) over it is N * mean(x) * mean(z)."""
    cv, _ = view("""g (float[2,W] x, float[2,W] z) => (float[2,1] y) {
        s = ReduceSum <keepdims=1> (x, ax)
        sz = Mul (s, z)
        y = ReduceMean <axes=[-1]> (sz) }""", opset=17, ax=np.array([-1]))
    e = cv.expr("y")
    [(sig, _)] = e.terms.items()
    assert sorted(type(a).__name__ for a, _ in sig) == ["Count", "Mean", "Mean"], e
    assert all(arg.single() is not None and len(arg.single()[0]) == 1 for arg in _means_args(e)), e


def test_atoms_are_equal_only_with_equal_coefficients_and_perms():
    assert Expr.const(2.0).key != Expr.const(3.0).key
    assert Mean(A.scale(Expr.atom(Leaf("x")), 2.0), (-1,)) != Mean(A.scale(Expr.atom(Leaf("x")), 3.0), (-1,))
    assert Leaf("x") != Leaf("x", (1, 0)) and Leaf("x", (1, 0)) == Leaf("x", (1, 0))
    assert Leaf("x", (0, 2, 1)) != Leaf("x", (1, 0, 2))  # the perm is part of the atom


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (2, 0, 1), (1, 2, 0)])
def test_a_norm_with_a_second_mean_subtracted_is_no_norm_form(order):
    """(x - mean_last(x) - mean_first(x)) * r: the third term reads x, but through a mean over other
    axes: no LayerNorm, in whatever order the terms are listed."""
    cv, _ = view("""g (float[3,4] x) => (float[3,4] y) {
        m = ReduceMean <axes=[-1]> (x)
        d = Sub (x, m)
        sq = Mul (d, d)
        v = ReduceMean <axes=[-1]> (sq)
        ve = Add (v, eps)
        r = Pow (ve, mhalf)
        m2 = ReduceMean <axes=[-2]> (x)
        d2 = Sub (d, m2)
        y = Mul (d2, r) }""", opset=17, eps=np.float32(1e-5), mhalf=np.float32(-0.5))
    e = cv.expr("y")
    assert A.norm_form(A.mul(cv.expr("d"), cv.expr("r"))) is not None  # without m2: a LayerNorm
    items = list(e.terms.items())
    assert len(items) == 3
    assert A.norm_form(Expr(dict(items[i] for i in order))) is None


@pytest.mark.parametrize("length", [46, 47, 48, 60])
def test_a_long_chain_is_read_to_a_depth_of_48(length):
    """Neg after Neg: the view reads 48 tensors deep, then reads the far end as a Leaf (named), and
    comes back to depth 0 (a second read from the end goes as deep again)."""
    lines = ["t0 = Identity (a)"] + [f"t{k} = Neg (t{k - 1})" for k in range(1, length + 1)]
    cv, _ = view(f"g (float[3] a) => (float[3] y) {{ {chr(10).join(lines)}\n y = Identity (t{length}) }}")
    deepest = length - 47  # y is read at depth 1, t{length} at 2, ... t{deepest} at 49: a Leaf
    assert cv.expr("y").leaves == ({"a"} if deepest < 0 else {f"t{deepest}"})
    assert cv._depth == 0
    cv.forget()
    assert cv.expr(f"t{length}").leaves == ({"a"} if deepest - 1 < 0 else {f"t{deepest - 1}"})


def test_a_chain_of_squares_is_read_once_per_tensor():
    """t_k = t_{k-1} * t_{k-1}, 40 times: each tensor is read once (cached), not once per path
    (2^40 paths), and the result is a to the power 2^40."""
    lines = ["t0 = Identity (a)"] + [f"t{k} = Mul (t{k - 1}, t{k - 1})" for k in range(1, 41)]
    cv, _ = view(f"g (float[3] a) => (float[3] y) {{ {chr(10).join(lines)}\n y = Identity (t40) }}")
    assert cv.expr("y").key == Expr.atom(Leaf("a"), Fraction(2 ** 40)).key


def test_powers_of_coefficients_that_overflow_warn_about_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = power(A.scale(Expr.atom(Mean(Expr.atom(Leaf("x")), (-1,))), 1e-38), Fraction(-9))
    [(_, c)] = e.terms.items()
    assert np.isinf(c)


# ---- what the leaves cannot reach: read as a Leaf, not expanded --------------------------------
def leaves_view(text: str, leaves: set[str], check: bool = True, drop: tuple[str, ...] = (),
                **consts) -> CanonicalView:
    cv, _ = view(text, check=check, drop=drop, axes=np.array([-1], np.int64), **consts)
    return CanonicalView(cv.view, frozenset(leaves))


RESIDUAL = """g (float[N,4] a) => (float[N,4] y) {
    p = Mul (a, a)
    x = Relu (a)
    y = Add (x, p) }"""


def test_a_tensor_computed_before_the_leaves_is_an_outside_value():
    """p stands before x's producer, so it is no function of x: read as the Leaf p (a residual
    stream read by a norm's input would otherwise be expanded back through every earlier layer).
    With no leaves, or leaves that are graph inputs, nothing stands before them."""
    assert leaves_view(RESIDUAL, {"x"}).expr("y").key == A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("p"))).key
    expanded = A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("a"), Fraction(2))).key
    assert leaves_view(RESIDUAL, {"x", "a"}).expr("y").key == expanded
    assert leaves_view(RESIDUAL, set()).expr("y").key == expanded


def test_outside_values_are_told_only_in_a_topologically_sorted_graph():
    """Listed out of order, a graph's positions say nothing (fold() may be handed one the checker
    would refuse): p is read as what it computes."""
    unsorted = RESIDUAL.replace("    p = Mul (a, a)\n", "").replace("y = Add (x, p) }", "y = Add (x, p)\n    p = Mul (a, a) }")
    cv = leaves_view(unsorted, {"x"}, check=False)
    assert cv.view.position(cv.view.producer["x"]) is None
    assert cv.expr("y").key == A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("a"), Fraction(2))).key


def test_a_constant_computed_from_shapes_before_the_leaves_is_still_read():
    """tf_keras' dynamic GroupNorm counts with a ones_like mask of an earlier tensor, reshaped and
    summed: computed from constants and shapes only, it is a constant wherever it stands."""
    cv = leaves_view("""g (float[N,4] a) => (float[N,4] y) {
        shape = Shape (a)
        ones = ConstantOfShape <value = float[1] {1.0}> (shape)
        back = Reshape (ones, shape)
        count = ReduceSum <keepdims = 1> (back, axes)
        x = Relu (a)
        y = Div (x, count) }""", {"x"})
    e = cv.expr("y").single()
    assert e is not None and e[0] == ((Leaf("x"), Fraction(1)),) and np.allclose(e[1], 0.25)


def test_a_node_added_by_a_rewrite_stands_where_the_node_it_follows_stands():
    cv = leaves_view(RESIDUAL, {"x"})
    graph_view, relu = cv.view, cv.view.producer["x"]
    added = onnx.helper.make_node("Neg", ["x"], ["z"])
    graph_view.add_node(added, after=relu)
    assert graph_view.position(added) == graph_view.position(relu) == 1
    assert CanonicalView(graph_view, frozenset({"z"})).expr("y").leaves == {"x", "p"}  # Relu is not before z


def negated_ones(hops: int, rest: str = "y = Add (x, c{hops})", before: tuple[str, ...] = ()) -> str:
    """A graph whose tensor c{hops} is ones_like(a) negated `hops` times, all before the leaf x (and
    the nodes `before`, after the chain)."""
    chain = "".join(f"    c{i} = Neg (c{i - 1})\n" for i in range(1, hops + 1))
    chain += "".join(f"    {line}\n" for line in before)
    return f"""g (float[N,4] a) => (float[N,4] y) {{
    shape = Shape (a)
    c0 = ConstantOfShape <value = float[1] {{1.0}}> (shape)
{chain}    x = Relu (a)
    {rest.format(hops=hops)} }}"""


@pytest.mark.parametrize("hops", [7, 8])
def test_a_value_computed_from_shapes_is_looked_for_eight_nodes_behind_it(hops):
    """ConstantOfShape seven nodes behind c7 (the eighth node looked at) makes c7 a constant, -1;
    one more Neg and c8 is read as a Leaf. The Shape's type left unknown, so that only the op
    ConstantOfShape says it computes from shapes."""
    e = leaves_view(negated_ones(hops), {"x"}, drop=("shape",)).expr("y")
    if hops == 7:
        assert e.key == A.add(Expr.atom(Leaf("x")), Expr.const(-1.0)).key
    else:
        assert e.key == A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("c8"))).key


def test_a_float_initializer_before_the_leaves_is_a_constant_to_compute_from():
    """two (an initializer, no producer) times the ones mask: computed from constants, so the count
    is 8 and y is x / 8."""
    cv = leaves_view("""g (float[N,4] a) => (float[N,4] y) {
        shape = Shape (a)
        ones = ConstantOfShape <value = float[1] {1.0}> (shape)
        w = Mul (ones, two)
        count = ReduceSum <keepdims = 1> (w, axes)
        x = Relu (a)
        y = Div (x, count) }""", {"x"}, two=np.array([2.0], np.float32))
    e = cv.expr("y").single()
    assert e is not None and e[0] == ((Leaf("x"), Fraction(1)),) and np.allclose(e[1], 0.125)


# r = Relu(a) read twice (p, q) before the leaf x: both are outside values of x's expressions
TWO_READERS_BEFORE_THE_LEAF = """g (float[N,4] a) => (float[N,4] y) {
        r = Relu (a)
        p = Mul (r, r)
        q = Mul (r, r)
        x = Relu (a)
        s = Add (x, p)
        y = Add (s, q) }"""


def test_a_tensor_behind_a_graph_input_stays_an_outside_value_when_asked_again():
    """r = Relu(a) is no constant; p and q both read it before the leaves: both are read as Leaves,
    the second time from what the first found."""
    cv = leaves_view(TWO_READERS_BEFORE_THE_LEAF, {"x"})
    assert cv.expr("y").key == A.add(A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("p"))), Expr.atom(Leaf("q"))).key


def test_a_value_too_far_behind_constants_from_one_tensor_is_a_constant_from_a_nearer_one():
    """P = Neg(c7) reaches ConstantOfShape nine nodes in: P is a Leaf. c7 itself is read next, and
    from c7 it is eight nodes: -1, although P's search gave up on c7 (one node deeper)."""
    e = leaves_view(negated_ones(7, "s = Add (x, p)\n    y = Add (s, c7)", before=("p = Neg (c7)",)), {"x"})
    assert e.expr("y").key == A.add(A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("p"))), Expr.const(-1.0)).key


def test_a_value_found_computed_from_constants_is_one_when_reached_again_deeper():
    """t = c6 * Neg(c6): c6 is found computed from constants (ConstantOfShape seven nodes from t),
    and through Neg(c6) it is reached again one node deeper, where the search alone would stop: t is
    the constant -1."""
    text = negated_ones(6, "y = Add (x, t)", before=("e = Neg (c6)", "t = Mul (c6, e)"))
    assert leaves_view(text, {"x"}).expr("y").key == A.add(Expr.atom(Leaf("x")), Expr.const(-1.0)).key


def test_a_node_added_after_the_first_leafs_producer_is_read_through():
    """w = Neg(x), added after x's Relu, stands where the Relu stands: not before the leaves' first
    producer, so it is read as what it computes, -x."""
    cv = leaves_view(RESIDUAL, {"x"})
    cv.view.add_node(onnx.helper.make_node("Neg", ["x"], ["w"]), after=cv.view.producer["x"])
    assert CanonicalView(cv.view, frozenset({"x"})).expr("w").key == A.scale(Expr.atom(Leaf("x")), -1.0).key


def test_a_product_of_exactly_twelve_terms_is_kept():
    """MAX_TERMS terms are allowed; one more makes the product unreadable (None)."""
    def total(names):
        e = Expr({})
        for n in names:
            e = A.add(e, Expr.atom(Leaf(n)))
        return e
    product = A.mul(total("abc"), total("defg"))
    assert product is not None and len(product.terms) == 12
    assert A.mul(total("abc"), total("defgh")) is None


def test_an_integer_tensor_computed_by_a_known_op_is_a_leaf():
    cv, _ = view("""g (int64[4] n) => (int64[4] i) {
        i = Add (n, n) }""")
    assert is_leaf(cv.expr("i"), "i")


def test_the_ai_onnx_domain_is_the_default_one_and_other_domains_are_not_read():
    """A node of domain "ai.onnx" is read as its op; the same op in another domain, or a node of
    the default domain with a second output, is a Leaf."""
    text = """g (float[4] a) => (float[4] y) {
        y = Neg (a) }"""
    for domain, read in (("ai.onnx", True), ("com.example", False)):
        cv, model = view(text)
        model.graph.node[0].domain = domain
        e = cv.expr("y")
        assert (e.key == A.scale(Expr.atom(Leaf("a")), -1.0).key) if read else is_leaf(e, "y")
    cv, model = view(text)
    model.graph.node[0].output.append("extra")
    assert is_leaf(cv.expr("y"), "y")


# ---- constants the view reads, coefficients, the product's work bound, the static search's memo ----
@pytest.mark.parametrize("size, read", [(A.MAX_CONST, True), (A.MAX_CONST + 1, False)])
def test_a_constant_of_max_const_elements_is_read_and_a_larger_one_is_a_leaf(size, read):
    """MAX_CONST elements is the largest constant the view reads (one more: decoding and comparing
    it would cost more than the fusion it could show)."""
    cv, _ = view(f"""g (float[{size}] x) => (float[{size}] y) {{
        y = Mul (x, c) }}""", c=np.full(size, 2.0, np.float32))
    expected = A.scale(Expr.atom(Leaf("x")), np.full(size, 2.0)) if read else A.mul(Expr.atom(Leaf("x")), Expr.atom(Leaf("c")))
    assert cv.expr("y").key == expected.key


@pytest.mark.parametrize("value", [np.array([1 + 2j, 3j], np.complex64), np.array([b"1", b"2"], dtype=object)])
def test_a_constant_that_is_not_a_real_number_is_a_leaf(value):
    """A complex or string initializer is no coefficient: read as the Leaf it names (not its real
    part, not its text parsed as numbers)."""
    cv, _ = view("""g (float[2] x) => (float[2] y) {
        y = Identity (x) }""", check=False, c=value)
    assert cv.view.is_const("c")
    assert is_leaf(cv.expr("c"), "c")


def test_coefficients_are_float64_arrays_with_one_key_whatever_they_were_given_as():
    """A Python float, numpy scalars, a float32 array and leading axes of size 1: one coefficient,
    a float64 ndarray, and one key (equal expressions compare equal)."""
    sig = ((Leaf("x"), Fraction(1)),)
    given = [2.0, np.float64(2.0), np.float32(2.0), np.array(2.0), np.array(2.0, np.float32),
             np.array([[2.0]], np.float32), np.array([[2.0]])]
    built = [Expr({sig: c}) for c in given]
    for e in built:
        coefficient = e.terms[sig]
        assert type(coefficient) is np.ndarray and coefficient.dtype == np.float64 and coefficient.shape == ()
    assert len({e.key for e in built}) == 1


def _powers_of(name: str, n: int) -> Expr:
    """1 + x + x^2 + ... + x^(n-1), built directly (add() would stop at MAX_TERMS terms)."""
    return Expr({((Leaf(name), Fraction(k)),) if k else (): np.ones(()) for k in range(n)})


@pytest.mark.parametrize("n, kept", [(24, True), (25, False)])
def test_a_product_of_more_than_48_term_pairs_is_refused_before_it_is_multiplied(n, kept):
    """(1 + x + ... + x^(n-1)) * (1 - x) telescopes to 1 - x^n (term by term, each x^k cancelled as
    soon as it is made: never more than two terms on the way), but mul bounds its work by the pairs it would multiply: 4 * MAX_TERMS = 48 of them
    are multiplied, 50 are refused whatever the product would be."""
    one_minus_x = Expr({(): np.ones(()), ((Leaf("x"), Fraction(1)),): -np.ones(())})
    product = A.mul(_powers_of("x", n), one_minus_x)
    if kept:
        assert product is not None and product.key == Expr({(): np.ones(()), ((Leaf("x"), Fraction(n)),): -np.ones(())}).key
    else:
        assert product is None


def test_a_tensor_found_computed_from_a_graph_input_is_not_searched_again():
    """p and q both read r = Relu(a) before the leaves: the search behind r ends at the graph input
    a once; asked again from q (as deep as from p), r's "no" is remembered, not searched anew (with
    many readers of one tensor, each would walk everything behind it again)."""
    cv = leaves_view(TWO_READERS_BEFORE_THE_LEAF, {"x"})
    searched: list[str] = []
    search = cv._static

    def counting(name, depth=0):
        searched.append(name)
        return search(name, depth)

    cv._static = counting
    assert cv.expr("y").key == A.add(A.add(Expr.atom(Leaf("x")), Expr.atom(Leaf("p"))), Expr.atom(Leaf("q"))).key
    assert searched.count("a") == 1 and searched.count("r") == 2
