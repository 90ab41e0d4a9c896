"""Train a small GPT through `parallelize` on real text, with checkpoints and resume.

The corpus is the Python source of an installed package (optax by default: no download),
read as bytes (byte-level tokens, non-ASCII bytes folded to 127). Every ``--every`` steps the
train state and the loss history are saved with `alpa_lite.checkpoint` (with the plan JSON);
``--resume`` continues from the latest complete step, also under another ``--method`` (the
state is restored straight into the new plan's shardings). A loss-curve PNG is written at the
end. Runs on 8 simulated CPU devices:

    python examples/train_gpt.py --steps 200 --method shard --checkpoint-dir /tmp/gpt
    python examples/train_gpt.py --steps 400 --method zero3 --checkpoint-dir /tmp/gpt --resume

``--quick`` (CI) runs the drill: train half the steps with ShardParallel, stop, resume with
DataParallel to the end, and check the loss curve against an uninterrupted serial run.
"""

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from rich.progress import Progress  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite import checkpoint  # noqa: E402
from alpa_lite.models import GPT, GPTConfig, create_train_state, make_train_step  # noqa: E402

METHODS = {
    "shard": lambda: alpa_lite.ShardParallel(),
    "data": lambda: alpa_lite.DataParallel(),
    "zero3": lambda: alpa_lite.Zero3Parallel(),
    "pipeline": lambda: alpa_lite.PipeshardParallel(
        num_micro_batches=2, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option=alpa_lite.UniformStageOption(num_stages=2)),
}


MAX_STEPS = 100_000


def load_corpus(package: str = "optax", max_bytes: int = 4 * 2**20) -> np.ndarray:
    """The sorted ``*.py`` files of an installed package as byte tokens (int32, < 128)."""
    module = __import__(package)
    files = sorted(pathlib.Path(module.__file__).parent.rglob("*.py"))
    data = b"\n".join(path.read_bytes() for path in files)[:max_bytes]
    tokens = np.minimum(np.frombuffer(data, np.uint8), 127).astype(np.int32)
    if tokens.size < 10_000:
        raise SystemExit(f"The corpus from {package!r} has only {tokens.size} bytes; pick a "
                         "larger installed package with --corpus-package.")
    return tokens


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int) -> dict:
    """The batch of ``step``: the same for every run, so a resumed run sees the same data."""
    starts = np.random.default_rng(step).integers(0, tokens.size - seq_len - 1, batch_size)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    return {"tokens": jnp.asarray(windows[:, :-1]), "targets": jnp.asarray(windows[:, 1:])}


def build(args):
    config = GPTConfig(vocab_size=128, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=4, seq_len=args.seq_len)
    model = GPT(config)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, eps=1e-3))
    state = create_train_state(model, rng=0, batch_size=args.batch_size, optimizer=optimizer)
    # A restored step counter is an int32 array: start with one, so a saved plan fits.
    state = state.replace(step=jnp.asarray(state.step, jnp.int32))
    return state, make_train_step(model, optimizer)


def train(args, method_name: str, stop_at: int, tokens: np.ndarray, resume: bool) -> np.ndarray:
    """Trains (or resumes) up to step ``stop_at``; returns the loss history so far."""
    state, train_step = build(args)
    # The loss history is saved with the state; a fixed length, so a resume with another
    # --steps still fits the saved shape.
    losses = np.full((MAX_STEPS,), np.nan, np.float32)
    first_batch = get_batch(tokens, 0, args.batch_size, args.seq_len)
    if method_name == "serial":
        step_fn = jax.jit(train_step)
    else:
        step_fn = alpa_lite.parallelize(train_step, method=METHODS[method_name]())
    start = 0
    latest = checkpoint.latest_step(args.checkpoint_dir) if resume else None
    if latest is not None:
        saved_plan = checkpoint.load_plan(args.checkpoint_dir)
        if method_name != "serial" and saved_plan is not None and \
                saved_plan.method == type(step_fn.method).__name__:
            step_fn.use_plan(saved_plan)  # same method: reuse the plan, no solving
        like = jax.eval_shape(lambda: {"state": state, "losses": losses})
        shardings = None
        if method_name != "serial":
            state_shardings = step_fn.input_shardings(state, first_batch)[0]
            replicated = step_fn.input_shardings(state, first_batch)[1]["tokens"]
            shardings = {"state": state_shardings,
                         "losses": jax.sharding.NamedSharding(replicated.mesh,
                                                              jax.sharding.PartitionSpec())}
        restored = checkpoint.restore(args.checkpoint_dir, like=like, shardings=shardings)
        state, losses = restored["state"], np.array(restored["losses"])
        start = latest
        print(f"resumed from step {latest} of {args.checkpoint_dir} with {method_name}")
    plan = None if method_name == "serial" else step_fn.plan(state, first_batch)
    ckpt = None
    if args.checkpoint_dir and method_name != "serial":
        ckpt = checkpoint.Checkpointer(args.checkpoint_dir, max_to_keep=args.keep, async_=True)
    with Progress() as progress:
        task = progress.add_task(f"{method_name}", total=stop_at, completed=start)
        for step in range(start, stop_at):
            state, loss = step_fn(state, get_batch(tokens, step, args.batch_size, args.seq_len))
            losses[step] = float(loss)
            progress.update(task, advance=1, description=f"{method_name} loss {losses[step]:.3f}")
            done = step + 1
            if ckpt is not None and (done % args.every == 0 or done == stop_at) and \
                    done not in ckpt.all_steps():
                ckpt.save({"state": state, "losses": jnp.asarray(losses)}, done, plan=plan)
    if ckpt is not None:
        ckpt.close()  # waits for the last async save
    return losses[:stop_at]


def plot(curves: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, (x, y)) in enumerate(curves.items()):
        ax.plot(x, y, label=label, linestyle=":" if i == 0 and len(curves) > 1 else "-",
                linewidth=3 if i == 0 and len(curves) > 1 else 1.5, zorder=3 if i == 0 else 2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_drill(args, tokens) -> None:
    """Stop half-way under ShardParallel, resume under DataParallel, compare with serial."""
    half = args.steps // 2
    seconds = [time.perf_counter()]
    first = train(args, "shard", half, tokens, resume=False)
    seconds.append(time.perf_counter())
    second = train(args, "data", args.steps, tokens, resume=True)
    seconds.append(time.perf_counter())
    reference = train(args, "serial", args.steps, tokens, resume=False)
    seconds.append(time.perf_counter())
    print("seconds (including planning and compiling): shard {:.1f}, resume on data {:.1f}, "
          "serial {:.1f}".format(*np.diff(seconds)))
    assert np.array_equal(second[:half], first[:half]), "the resumed history must be the saved one"
    steps = np.arange(1, args.steps + 1)
    png = plot({"serial, uninterrupted": (steps, reference),
                "shard, steps 1..%d" % half: (steps[:half], first[:half]),
                "data, resumed": (steps[half:], second[half:])},
               os.path.join(args.out_dir, "train_gpt_loss.png"))
    diff = float(np.max(np.abs(second - reference) / np.abs(reference)))
    print(f"loss curve: {png}")
    print(f"loss {reference[0]:.3f} -> {reference[-1]:.3f} (serial), "
          f"{second[-1]:.3f} (stopped at {half}, resumed on DataParallel)")
    if diff > 1e-3:
        raise SystemExit(f"FAIL: the resumed run left the serial loss curve (max rel diff "
                         f"{diff:.2e} > 1e-3)")
    print(f"OK: the resumed run continues the serial loss curve (max rel diff {diff:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", choices=sorted(METHODS), default="shard")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--keep", type=int, default=3, help="keep the last N checkpoints")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corpus-package", default="optax")
    parser.add_argument("--out-dir", default=tempfile.gettempdir())
    parser.add_argument("--quick", action="store_true",
                        help="CI: a tiny model, 16 steps, stop at 8 and resume on DataParallel")
    args = parser.parse_args()
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be in 1..{MAX_STEPS}; got {args.steps}")
    os.makedirs(args.out_dir, exist_ok=True)
    tokens = load_corpus(args.corpus_package)
    print(f"corpus: {tokens.size} bytes of {args.corpus_package}'s Python sources")
    if args.quick:
        args.steps, args.every, args.layers, args.hidden, args.seq_len = 16, 4, 1, 64, 32
        if args.checkpoint_dir is not None:
            run_drill(args, tokens)
            return
        with tempfile.TemporaryDirectory(prefix="train_gpt_") as directory:
            args.checkpoint_dir = directory
            run_drill(args, tokens)
        return
    if args.checkpoint_dir is None:
        parser.error("--checkpoint-dir is required (or pass --quick)")
    losses = train(args, args.method, args.steps, tokens, resume=args.resume)
    steps = np.arange(1, args.steps + 1)
    png = plot({args.method: (steps, losses)}, os.path.join(args.out_dir, "train_gpt_loss.png"))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; loss curve: {png}")


if __name__ == "__main__":
    main()
