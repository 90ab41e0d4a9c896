"""Cut a traced train step into per-stage programs for the pipeline runtime.

Input: the step's `OpGraph` (traced at micro-batch size, with layer and gradient markers) and
a layer -> stage map. Output: `PipelinePartition`: for every stage a forward and a backward
program (run once per micro-batch), and apply programs (run once per step) placed on the
stages' meshes in *phases*, so that values crossing meshes (e.g. the global gradient norm of
`clip_by_global_norm`) are computed before the phase that needs them.

Each node of the compute part belongs to the region opened by the last marker before it:
forward layer i (from its ``start`` marker) or backward layer i (from the mirrored marker).

Programs are per model *chunk*: a run of consecutive layers on one mesh. Without interleaving
a chunk is a stage; an interleaved layer -> mesh map (e.g. ``[0, 0, 1, 1, 0, 0, 1, 1]``) has
several chunks per mesh. With ``split_backward`` (ZB-H1) each chunk's backward is cut into the
input-gradient program (what the previous chunk waits for) and the weight-gradient program
(the rest, `PipelinePartition.weight`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict


from alpa_lite.cost.registry import nbytes
from alpa_lite.pipeline_model.grad_split import GradSplit, split_at_grad_boundary
from alpa_lite.graph import OpGraph, OpNode
from alpa_lite.loop_regions import remap_loops
from alpa_lite.markers import grad_boundary_p, layer_boundary_p


@dataclasses.dataclass
class Program:
    """Nodes of the step graph that run as one jitted call on one mesh.

    Attributes:
        name: e.g. ``"forward[1]"``, ``"backward[0]"``, ``"apply[2]@1"``.
        mesh: the stage (mesh) index it runs on.
        nodes: global node indices in program order.
        inputs: global value ids it reads that are produced elsewhere (or graph inputs).
        outputs: global value ids it produces that are needed elsewhere.
    """

    name: str
    mesh: int
    nodes: tuple[int, ...]
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()


@dataclasses.dataclass
class PipelinePartition:
    """All programs of a pipelined step.

    Attributes:
        forward / backward: one program per model chunk (a stage, unless interleaved), in
            model order; ``program.mesh`` is its stage.
        weight: with ``split_backward``, the weight-gradient program of every chunk (its
            ``backward`` then computes only what the previous chunk needs); else empty.
        apply: programs run once per step, in order (phase by phase).
        sinks: boundary operand value id -> the mesh that accumulates it over micro-batches.
        boundary: the grad_boundary node.
        input_mesh: graph input value id -> the mesh it lives on.
        mesh_nodes: per mesh, every node it runs (for the per-stage intra-op plan).
    """

    forward: list[Program]
    backward: list[Program]
    apply: list[Program]
    sinks: dict[int, int]
    boundary: OpNode
    input_mesh: dict[int, int]
    mesh_nodes: list[list[int]]
    split: GradSplit
    weight: list[Program] = dataclasses.field(default_factory=list)

    def compute_programs(self) -> list[Program]:
        """Every program run per micro-batch."""
        return self.forward + self.backward + self.weight

    def chunks_of(self, mesh: int) -> list[int]:
        """The chunks (indices into ``forward``) that run on ``mesh``."""
        return [c for c, program in enumerate(self.forward) if program.mesh == mesh]


def count_layers(graph: OpGraph) -> int:
    """How many pipeline layers the graph's layer markers delimit (0: none)."""
    layers = {n.params["layer"] for n in graph.nodes
              if n.primitive is layer_boundary_p and not n.params["backward"]}
    return max(layers) + 1 if layers else 0


def assign_regions(graph: OpGraph, nodes) -> dict[int, tuple[str, int]]:
    """node -> ("F" | "B", layer) from the layer markers preceding it in program order."""
    region = ("F", 0)
    result = {}
    for index in nodes:
        node = graph.nodes[index]
        if node.primitive is layer_boundary_p:
            direction = "B" if node.params["backward"] else "F"
            region = (direction, node.params["layer"])
        result[index] = region
    return result


def layer_chunks(layer_to_stage) -> list[int]:
    """The chunk of every layer: runs of consecutive layers on one stage, numbered in order.

    Example:
        >>> layer_chunks([0, 0, 1, 1, 0, 0, 1, 1])
        [0, 0, 1, 1, 2, 2, 3, 3]
    """
    chunks, chunk = [], -1
    for layer, stage in enumerate(layer_to_stage):
        if layer == 0 or stage != layer_to_stage[layer - 1]:
            chunk += 1
        chunks.append(chunk)
    return chunks


def partition_pipeline(graph: OpGraph, batch_inputs: list[int], layer_to_stage: list[int],
                       num_stages: int, per_micro_batch_nodes=(),
                       split_backward: bool = False) -> PipelinePartition:
    """Splits the step into forward/backward programs per chunk and phased apply programs.

    ``per_micro_batch_nodes`` (random draws of a batch-sized shape) differ per micro-batch
    though they read no batch value, as in `split_at_grad_boundary`. ``split_backward`` cuts
    every backward into input- and weight-gradient programs (`split_weight_gradients`)."""
    split = split_at_grad_boundary(graph, batch_inputs, per_micro_batch_nodes)
    # Batch-independent operators after the boundary (constants the optimizer builds, e.g. a
    # zero tree) run with the update that reads them, not on the first layer's mesh.
    late = [i for i in split.pre if i > split.boundary]
    split = dataclasses.replace(split, pre=tuple(i for i in split.pre if i < split.boundary),
                                post=tuple(sorted(split.post + tuple(late))))
    boundary = graph.nodes[split.boundary]
    compute_nodes = sorted(set(split.pre) | set(split.compute) - {split.boundary})
    regions = assign_regions(graph, compute_nodes)
    chunk_of_layer = layer_chunks(layer_to_stage)
    chunk_mesh = {chunk_of_layer[layer]: stage for layer, stage in enumerate(layer_to_stage)}
    chunk_of = {i: chunk_of_layer[min(layer, len(layer_to_stage) - 1)]
                for i, (_, layer) in regions.items()}
    mesh_of = {i: chunk_mesh[c] for i, c in chunk_of.items()}
    num_chunks = len(chunk_mesh)
    forward = [[] for _ in range(num_chunks)]
    backward = [[] for _ in range(num_chunks)]
    for index in compute_nodes:
        (forward if regions[index][0] == "F" else backward)[chunk_of[index]].append(index)
    weight = []
    if split_backward:
        backward, weight = split_weight_gradients(graph, backward, chunk_of)
    producer_mesh = {v: mesh_of[n.index] for n in graph.nodes if n.index in mesh_of
                     for v in n.outvars}
    sinks = {v: producer_mesh.get(v, 0) for v in boundary.invars if isinstance(v, int)}
    for src, dst in zip(boundary.invars, boundary.outvars):
        if isinstance(src, int):
            producer_mesh[dst] = sinks[src]
    input_mesh = _input_meshes(graph, compute_nodes, mesh_of)
    producer_mesh.update(input_mesh)
    apply_mesh = _place_apply(graph, split.post, producer_mesh)
    for v, m in input_mesh.items():  # inputs only the apply part reads live where it runs
        producer_mesh[v] = m
    phases = _apply_phases(graph, split.post, apply_mesh, producer_mesh)
    programs_f = [Program(f"forward[{c}]", chunk_mesh[c], tuple(n))
                  for c, n in enumerate(forward)]
    programs_b = [Program(f"backward[{c}]", chunk_mesh[c], tuple(n))
                  for c, n in enumerate(backward)]
    programs_w = [Program(f"weight[{c}]", chunk_mesh[c], tuple(n)) for c, n in enumerate(weight)]
    grouped = defaultdict(list)
    for index in split.post:
        grouped[(phases[index], apply_mesh[index])].append(index)
    programs_a = [Program(f"apply[{p}]@{m}", m, tuple(nodes))
                  for (p, m), nodes in sorted(grouped.items())]
    _fill_inputs_outputs(graph, programs_f + programs_b + programs_w + programs_a, boundary)
    mesh_nodes = [sorted([i for c in range(num_chunks) if chunk_mesh[c] == s
                          for i in forward[c] + backward[c] + (weight[c] if weight else [])]
                         + [i for i in split.post if apply_mesh[i] == s])
                  for s in range(num_stages)]
    for v in graph.inputs:
        input_mesh.setdefault(v, 0)
    return PipelinePartition(programs_f, programs_b, programs_a, sinks, boundary, input_mesh,
                             mesh_nodes, split, programs_w)


def split_weight_gradients(graph: OpGraph, backwards: list[list[int]], group_of: dict[int, int]
                           ) -> tuple[list[list[int]], list[list[int]]]:
    """Each group's backward nodes cut into (input-gradient part, weight-gradient part).

    The input-gradient part is every node that a value read by another group's compute node
    (``group_of``: node -> chunk or layer) depends on, with whole scans; the rest (the weight
    gradients and what only they need) can run later. Values the weight part reads from the
    input part stay on the mesh in between. Backward layer markers should carry one value
    each (`split_layer_markers`): a marker carrying a cotangent and weight gradients together
    would pull the weight gradients into the input part."""
    users = graph.users()
    loop_of = graph.innermost_loop()
    outer = {}  # node -> its outermost loop region's node range
    for loop in graph.loops:
        for i in range(loop.first, loop.last + 1):
            outer.setdefault(i, range(loop.first, loop.last + 1))
    inputs, weights = [], []
    for nodes in backwards:
        group = group_of[nodes[0]] if nodes else None
        inside = set(nodes)
        producer = {v: i for i in nodes for v in graph.nodes[i].outvars}
        needed = [i for i in nodes if any(
            u in group_of and u not in inside and group_of[u] != group
            for v in graph.nodes[i].outvars if v < len(users) for u in users[v])]
        keep = set()
        while needed:
            index = needed.pop()
            if index in keep:
                continue
            keep.add(index)
            needed.extend(producer[v] for v in graph.nodes[index].invars
                          if isinstance(v, int) and v in producer)
            if loop_of[index] != -1:  # a scan runs whole in one program
                needed.extend(i for i in outer[index] if i in inside)
        inputs.append([i for i in nodes if i in keep])
        weights.append([i for i in nodes if i not in keep])
    return inputs, weights


def split_layer_markers(graph: OpGraph) -> tuple[OpGraph, dict[int, int]]:
    """The graph with every backward layer marker of several values cut into one marker per
    value (a marker is the identity on each value), and the map old node -> new node (a cut
    marker's first piece). Node order, regions and value ids are kept."""
    nodes: list[OpNode] = []
    index_map = {}
    for node in graph.nodes:
        index_map[node.index] = len(nodes)
        if (node.primitive is layer_boundary_p and node.params["backward"]
                and len(node.outvars) > 1):
            for a, out in zip(node.invars, node.outvars):
                nodes.append(OpNode(len(nodes), node.primitive, node.params, (a,), (out,),
                                    node.name_stack, node.repeat, node.source_info))
        else:
            nodes.append(dataclasses.replace(node, index=len(nodes)))
    producer = list(graph.producer)
    for node in nodes:
        for v in node.outvars:
            producer[v] = node.index
    return dataclasses.replace(graph, nodes=nodes, producer=producer,
                               loops=remap_loops(graph.loops, index_map)), index_map


def _input_meshes(graph, compute_nodes, mesh_of) -> dict[int, int]:
    """Each graph input lives on the mesh of its first consumer in the compute part."""
    result = {}
    inputs = set(graph.inputs)
    for index in compute_nodes:
        for v in graph.nodes[index].invars:
            if isinstance(v, int) and v in inputs and v not in result:
                result[v] = mesh_of[index]
    return result


def _place_apply(graph, post, known: dict[int, int]) -> dict[int, int]:
    """A mesh per apply node: that of its largest placed operand; unplaced ones follow users.

    Optimizer state is read only here, so it is placed with the update that reads it (the
    mesh of the gradient or parameter it is combined with).
    """
    location = dict(known)
    mesh = {}
    for _ in range(4):  # forward and backward passes until nothing changes
        changed = False
        for index in post:
            node = graph.nodes[index]
            placed = [(nbytes(graph.avals[v]), location[v]) for v in node.invars
                      if isinstance(v, int) and v in location]
            if placed and index not in mesh:
                mesh[index] = max(placed)[1]
                location.update({v: mesh[index] for v in node.outvars})
                changed = True
        for index in reversed(post):
            node = graph.nodes[index]
            used_on = [location[v] for v in node.outvars if v in location]
            if index not in mesh and used_on:
                mesh[index] = used_on[0]
                changed = True
            if index in mesh:
                for v in node.invars:
                    if isinstance(v, int) and v not in location:
                        location[v] = mesh[index]
                        changed = True
        if not changed:
            break
    for index in post:
        mesh.setdefault(index, 0)
    for v in graph.inputs:
        if v not in known and v in location:
            known[v] = location[v]
    return mesh


def _apply_phases(graph, post, apply_mesh, value_mesh) -> dict[int, int]:
    """phase(node) = max over operands of phase(producer) + (1 if it crosses meshes)."""
    value_phase = {}
    phases = {}
    for index in post:
        node = graph.nodes[index]
        phase = 0
        for v in node.invars:
            if isinstance(v, int) and v in value_phase:
                crossing = value_mesh.get(v, apply_mesh[index]) != apply_mesh[index]
                phase = max(phase, value_phase[v] + int(crossing))
        phases[index] = phase
        for v in node.outvars:
            value_phase[v] = phase
            value_mesh[v] = apply_mesh[index]
    return phases


def _fill_inputs_outputs(graph: OpGraph, programs: list[Program], boundary: OpNode) -> None:
    produced_by = {}
    for p, program in enumerate(programs):
        for index in program.nodes:
            for v in graph.nodes[index].outvars:
                produced_by[v] = p
    needed_outside = defaultdict(set)
    consts = {v for v, _ in graph.consts}  # closed-over constants: bound inside each program
    for p, program in enumerate(programs):
        reads = []
        for index in program.nodes:
            for v in graph.nodes[index].invars:
                if isinstance(v, int) and produced_by.get(v) != p and v not in consts:
                    reads.append(v)
                    if v in produced_by:
                        needed_outside[produced_by[v]].add(v)
        program.inputs = tuple(dict.fromkeys(reads))
    final = {v for v in graph.outputs if isinstance(v, int)}
    final |= {v for v in boundary.invars if isinstance(v, int)}
    for v in final:
        if v in produced_by:
            needed_outside[produced_by[v]].add(v)
    for p, program in enumerate(programs):
        outs = [v for index in program.nodes for v in graph.nodes[index].outvars
                if v in needed_outside[p]]
        program.outputs = tuple(outs)


def build_subgraph(graph: OpGraph, items: list, users: list[list[int]] | None = None
                   ) -> tuple[OpGraph, dict[int, int]]:
    """The sub-graph of some nodes: values read from outside become its inputs.

    ``items`` are global node indices or extra `OpNode`s (e.g. a `boundary_slice`). Value ids
    stay the global ones; ``inputs`` are the outside values in first-use order and
    ``outputs`` the values used outside. Returns the graph and the map global -> sub index.
    ``users``: ``graph.users()``, when the caller has it (it costs a pass over the graph).
    """
    nodes = [graph.nodes[i] if isinstance(i, int) else i for i in items]
    produced = {v for n in nodes for v in n.outvars}
    const_ids = {v for v, _ in graph.consts}
    reads = [v for n in nodes for v in n.invars
             if isinstance(v, int) and v not in produced and v not in const_ids]
    inside = {i for i in items if isinstance(i, int)}
    users = graph.users() if users is None else users
    outputs = [v for n in nodes for v in n.outvars
               if v < len(users) and (any(u not in inside for u in users[v])
                                      or v in graph.outputs)]
    sub_nodes, index_map = [], {}
    producer = list(graph.producer)
    for k, (item, node) in enumerate(zip(items, nodes)):
        sub_nodes.append(OpNode(k, node.primitive, node.params, node.invars, node.outvars,
                                node.name_stack, node.repeat))
        if isinstance(item, int):
            index_map[item] = k
        for v in node.outvars:
            producer[v] = k
    for v in reads:
        producer[v] = -1
    used = {v for n in nodes for v in n.invars if isinstance(v, int)}
    consts = tuple((v, c) for v, c in graph.consts if v in used)
    sub = OpGraph(avals=graph.avals, inputs=tuple(dict.fromkeys(reads)), consts=consts,
                  nodes=sub_nodes, outputs=tuple(dict.fromkeys(outputs)), producer=producer,
                  loops=remap_loops(graph.loops, index_map))
    return sub, index_map


def boundary_slice(boundary: OpNode, sinks: dict[int, int], mesh: int, index: int) -> OpNode:
    """The part of the grad boundary whose operands this mesh accumulates (a transparent node,
    so the plan gives a gradient the same sharding before and after averaging)."""
    pairs = [(s, d) for s, d in zip(boundary.invars, boundary.outvars)
             if isinstance(s, int) and sinks.get(s) == mesh]
    return OpNode(index, grad_boundary_p, {}, tuple(s for s, _ in pairs),
                  tuple(d for _, d in pairs), boundary.name_stack)


def count_cross_mesh_bytes(graph: OpGraph, partition: PipelinePartition) -> float:
    """Bytes moved between meshes per micro-batch by the forward and backward programs."""
    total = 0.0
    for program in partition.compute_programs():
        for v in program.inputs:
            if v in graph.inputs:
                continue
            total += nbytes(graph.avals[v])
    return float(total)
