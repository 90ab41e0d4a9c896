"""Train a small GPT on many processes: the same script on every process.

    alpa-lite launch --num-processes 2 --devices-per-process 4 -- \
        python examples/multihost_train.py --method pipeshard --steps 3
    srun python examples/multihost_train.py          # in a Slurm allocation
    (Kubernetes: see examples/deploy/k8s/job.yaml)

`alpa_lite.distributed.initialize()` finds the job (the launcher's variables, Slurm, Open
MPI, ...); every process passes the same global values; process 0 plans and the others run
its plan; process 0 prints the losses.
"""

from __future__ import annotations

import argparse
import time

import alpa_lite
from alpa_lite import distributed

METHODS = {
    "data": lambda k: alpa_lite.DataParallel(),
    "zero3": lambda k: alpa_lite.Zero3Parallel(),
    "shard": lambda k: alpa_lite.ShardParallel(),
    "pipeshard": lambda k: alpa_lite.PipeshardParallel(
        num_micro_batches=k, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option="uniform"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="pipeshard")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()

    info = distributed.initialize()  # before anything touches jax's backend
    import jax

    from alpa_lite.models import build_workload, get_preset

    work = build_workload(get_preset("gpt-tiny"), args.batch_size, rng=0)
    state, batch = jax.device_get((work.state, work.batch))  # the same values everywhere
    step = alpa_lite.parallelize(work.train_step,
                                 method=METHODS[args.method](args.micro_batches))
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"{info.num_processes} process(es) ({info.source}), {jax.device_count()} devices, "
        f"method {args.method}")
    for i in range(args.steps):
        start = time.perf_counter()
        state, loss = step(state, batch)
        loss = float(distributed.to_host(loss))
        say(f"step {i}: loss {loss:.4f} ({time.perf_counter() - start:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
