"""Plan LLaMA2-13B for 50 nodes x 4 V100-32GB without the cluster (the seed 001 scenario).

`alpa_lite.simulate.simulate` traces the model from shapes only (no weights, no devices),
prices its layers with the intra-op ILP on every candidate submesh and runs Alpa's stage DP
with the cluster's link and flop/s numbers. It plans mixed precision as a V100 user trains
(float16 compute, float32 weights and optimizer state) and lets the stage DP rematerialize the
stages that need it to fit. Takes several minutes on 2 CPU cores (every layer is priced with
and without rematerialization):

    python examples/simulate_llama.py [--hosts 50] [--memory 32GiB] [--dtype float16]
                                      [--remat auto] [--compare]

The same as: alpa-lite plan --model llama2-13b --cluster 50x4 --device v100-32gb-4x
             --memory-per-device 32GiB
"""

import argparse

from alpa_lite.cluster import get_cluster_preset
from alpa_lite.models import get_preset
from alpa_lite.simulate import simulate


def report(plan, cluster) -> None:
    gib, info = 2**30, plan.extra
    fits = plan.peak_memory_bytes <= cluster.memory_per_device_bytes
    print(f"\nmethod {info.method}: predicted step time {plan.predicted_step_time_s:.1f} s, "
          f"memory/device {plan.peak_memory_bytes / gib:.2f} GiB "
          f"({'fits' if fits else 'does NOT fit'}), search {plan.plan_time_s:.1f} s")
    print(f"  {info.details(plan.num_micro_batches)}")
    if plan.stages:
        print(f"  {'stage':>5} {'blocks':<8} {'submesh':<9} {'logical':<9} "
              f"{'s/micro-batch':>13} {'memory':>10}")
        for st in plan.stages:
            blocks = f"{st.layers[0]}-{st.layers[-1]}"
            print(f"  {st.stage:>5} {blocks:<8} {str(st.submesh):<9} "
                  f"{str(st.logical_mesh):<9} {st.forward_s + st.backward_s:>13.4f} "
                  f"{st.peak_memory_bytes / gib:>6.2f} GiB")
        used = sum(st.submesh[0] * st.submesh[1] for st in plan.stages)
        print(f"  {len(plan.stages)} stages on {used} of {cluster.num_devices} devices")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-13b")
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--memory", default="32GiB")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default: the device's faster half type)")
    parser.add_argument("--remat", default="auto", choices=("off", "layer", "auto"))
    parser.add_argument("--compare", action="store_true",
                        help="also plan the best Megatron-style (dp, tp, pp) layout")
    args = parser.parse_args()

    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(args.hosts).with_memory(args.memory)
    dtype = args.dtype or cluster.training_dtype
    preset = get_preset(args.model).with_overrides(dtype=None if dtype == "float32" else dtype)
    print(f"{preset.name}: {preset.config.num_layers} blocks, batch {preset.default_batch_size} "
          f"x {preset.config.seq_len} tokens; cluster {cluster.num_hosts} hosts x "
          f"{cluster.devices_per_host} devices ({cluster.device_kind}), "
          f"{cluster.memory_per_device_bytes / 2**30:.0f} GiB each; {dtype} compute, "
          f"remat {args.remat}")
    auto = simulate(preset, cluster, method="auto", remat=args.remat)
    report(auto, cluster)
    if args.compare:
        manual = simulate(preset, cluster, method="megatron", remat=args.remat)
        report(manual, cluster)
        print(f"\nauto vs best Megatron-style layout: "
              f"{manual.predicted_step_time_s / auto.predicted_step_time_s:.2f}x predicted speedup")
    print("\nPredicted times come from the cost model (V100 preset links and flop/s); they rank "
          "plans, they are not measurements.")


if __name__ == "__main__":
    main()
