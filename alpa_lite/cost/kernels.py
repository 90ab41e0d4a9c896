"""Which operators of a graph become kernels of their own after XLA's fusion.

Every kernel pays a fixed cost (the mesh's ``op_latency_s``: launch and scheduling), so a
program's fixed cost is its kernel count times that. The count follows XLA's fusion:

- an operator of class `OpClass.KERNEL` (matmuls, reductions, gathers, sorts...) is one;
- elementwise and data-movement operators fuse into loops; a loop is one kernel, ended
  where its value leaves it: at a graph output, or at an operator that does not take
  fused inputs (a matmul, a gather, a loop border). Reductions take their elementwise
  inputs into their own kernel;
- a loop of layout operators only (reshapes, broadcasts of inputs) moves no data of its
  own and is no kernel.

Checked against XLA:CPU's compiled programs (docs/profiling.md): a 4-layer GPT step with
AdamW compiles to 700 kernels (680 fusions, 20 matmuls) and this counts 498, where the
matmuls, reductions and gathers alone number 247; a 6-layer MLP step with AdamW compiles to
73 and this counts 79 (`tests/cost/test_kernels.py`). XLA:CPU also ends loops where this
does not (in the GPT step 75 of its loops end at a division, 14 here), so the count is low
on steps with many optimizer updates.
"""

from __future__ import annotations

import numpy as np

from alpa_lite.cost.registry import OpClass, operator_class

_LOOP = OpClass.ELEMENTWISE | OpClass.DATA_MOVEMENT | OpClass.FUSED_LAYOUT
_COMPUTES = OpClass.ELEMENTWISE | OpClass.DATA_MOVEMENT
# elementwise operators XLA does not duplicate into several consumers' loops
_EXPENSIVE = frozenset({"div", "exp", "exp2", "log", "log1p", "expm1", "pow", "tanh",
                        "logistic", "rsqrt", "sqrt", "cbrt", "erf", "erfc", "erf_inv", "sin",
                        "cos", "atan2", "lgamma", "digamma", "integer_pow"})


def kernel_nodes(graph) -> np.ndarray:
    """Per node of an `OpGraph`, whether it runs as a kernel of its own (module docstring).

    Example (a matmul, then an elementwise loop that ends at the output):
        >>> import jax, jax.numpy as jnp
        >>> from alpa_lite.graph import build_op_graph
        >>> g = build_op_graph(jax.make_jaxpr(lambda a, b: jnp.tanh(a @ b) * 2)(
        ...     jnp.ones((4, 4)), jnp.ones((4, 4))))
        >>> [n.name for n in g.nodes], kernel_nodes(g).tolist()
        (['dot_general', 'tanh', 'mul'], [True, False, True])
    """
    classes = [operator_class(node.primitive) for node in graph.nodes]
    in_loop = [OpClass.KERNEL not in c and bool(c & _LOOP) for c in classes]
    takes_loops = [in_loop[i] or OpClass.REDUCTION in c for i, c in enumerate(classes)]
    # does the loop ending at this node compute anything (else it is a relabelled input)?
    carries = [False] * len(graph.nodes)
    for node in graph.nodes:
        i = node.index
        if in_loop[i]:
            computes = bool(classes[i] & _COMPUTES) and not is_fused_layout(node.primitive)
            carries[i] = computes or any(carries[p] for p in _producers(graph, node))
    ends = np.zeros(len(graph.nodes), dtype=bool)
    for v in graph.outputs:
        if isinstance(v, int) and graph.producer[v] >= 0:
            ends[graph.producer[v]] = True
    for node in graph.nodes:
        if not takes_loops[node.index]:
            ends[list(_producers(graph, node))] = True
    # an expensive elementwise result read by several operators is computed once, not
    # duplicated into each reader's loop
    for v, readers in enumerate(graph.users()):
        p = graph.producer[v]
        if len(readers) > 1 and p >= 0 and graph.nodes[p].name in _EXPENSIVE:
            ends[p] = True
    kernels = np.array([OpClass.KERNEL in c for c in classes], dtype=bool)
    return kernels | (ends & np.array(in_loop) & np.array(carries))


def is_fused_layout(primitive) -> bool:
    """Layout operators (reshapes, broadcasts, iotas, markers) and nothing else."""
    classes = operator_class(primitive)
    return OpClass.FUSED_LAYOUT in classes and OpClass.ELEMENTWISE not in classes


def _producers(graph, node):
    return {graph.producer[v] for v in node.invars
            if isinstance(v, int) and graph.producer[v] >= 0}

