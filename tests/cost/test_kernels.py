"""`kernel_nodes`: the operators that run as kernels of their own after XLA's fusion."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from alpa_lite.cost import OpClass, operator_class
from alpa_lite.cost.kernels import kernel_nodes
from alpa_lite.graph import build_op_graph


def kernels_of(fn, *args) -> list[str]:
    graph = build_op_graph(jax.make_jaxpr(fn)(*args))
    return [node.name for node, kernel in zip(graph.nodes, kernel_nodes(graph)) if kernel]


def test_a_loop_is_one_kernel_ended_where_a_matmul_reads_it():
    x = jnp.ones((4, 4))
    # exp, mul and add fuse into one loop that the matmul reads; the matmul is a kernel
    assert kernels_of(lambda a: (jnp.exp(a) * 2 + 1) @ a, x) == ["add", "dot_general"]


def test_a_reduction_takes_its_elementwise_inputs_into_its_kernel():
    assert kernels_of(lambda a: jnp.sum(jnp.exp(a) * 2), jnp.ones((8,))) == ["reduce_sum"]


def test_an_expensive_result_read_twice_is_computed_once():
    def fn(a):
        e = jnp.exp(a)
        return e + 1, e * 2

    # exp is not duplicated into both readers' loops; the two outputs end two more loops
    assert kernels_of(fn, jnp.ones((8,))) == ["exp", "add", "mul"]
    # a cheap one is: its readers' loops each compute it
    assert kernels_of(lambda a: (lambda n: (n + 1, n * 2))(-a), jnp.ones((8,))) == ["add", "mul"]


def test_a_relabelled_input_is_no_kernel():
    w = jnp.ones((4, 4))
    assert kernels_of(lambda a, b: a.reshape(4, 4) @ b, jnp.ones((16,)), w) == ["dot_general"]


def _compiled_kernels(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    return len(re.findall(r" (?:fusion|dot|convolution|custom-call|reduce|sort|gather|scatter|"
                          r"copy|transpose)\(", entry))


def test_the_count_follows_xla_on_a_train_step():
    """An MLP step with AdamW: the count is near what XLA:CPU compiles, where matmuls,
    reductions and gathers alone (the operators that were charged a latency before) are
    far below it."""
    params = {f"w{i}": jnp.full((32, 32), 0.01 * (i + 1)) for i in range(6)}
    params.update({f"b{i}": jnp.zeros((32,)) for i in range(6)})
    optimizer = optax.adamw(1e-3)
    state = optimizer.init(params)
    batch = jnp.ones((16, 32))

    def step(params, state, batch):
        def loss(p):
            h = batch
            for i in range(6):
                h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
            return jnp.mean(h ** 2)

        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    graph = build_op_graph(jax.make_jaxpr(step)(params, state, batch))
    counted = int(kernel_nodes(graph).sum())
    heavy = sum(OpClass.KERNEL in operator_class(node.primitive) for node in graph.nodes)
    compiled = _compiled_kernels(step, params, state, batch)
    assert 0.6 * compiled <= counted <= 1.4 * compiled, (counted, compiled)
    assert heavy < 0.6 * compiled, (heavy, compiled)
