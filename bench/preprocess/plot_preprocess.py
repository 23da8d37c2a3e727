"""Plot a preprocess benchmark JSON (bench_preprocess.py) into a PNG: time and bandwidth against N*K, and (when
the JSON has them) the decode-size path comparisons: every kernel that can run there, timed in CUDA graphs in the
same process.

    python3 bench/preprocess/plot_preprocess.py bench/results/preprocess-h100.json bench/results/preprocess-h100.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> int:
    with open(src) as f:
        data = json.load(f)
    rows = data["rows"]
    nk = [r["num_slots"] for r in rows]
    compare = data.get("path_compare") or []
    fig, axes = plt.subplots(1, 3 if compare else 2, figsize=(19.5 if compare else 13, 6.5 if compare else 5))
    left, right = axes[0], axes[1]
    left.loglog(nk, [r["ours_us"] for r in rows], "o-", label="cupy (events, L2 flushed)")
    left.loglog(nk, [r["peer_us"] for r in rows], "s-", label="torch reference")
    floor = [(n, r["copy_floor_us"]) for n, r in zip(nk, rows) if r.get("copy_floor_us")]
    if floor:
        left.loglog(*zip(*floor), "^:", color="black", alpha=0.7,
                    label="copy floor: ids -> one int per slot (same launch, same timer)")
    graph = [(n, r["ours_graph_us"]) for n, r in zip(nk, rows) if r.get("ours_graph_us")]
    if graph:
        left.loglog(*zip(*graph), "o--", alpha=0.6, label="cupy in a CUDA graph")
    left.axhline(data["launch_us"], color="gray", ls=":", label=f"empty kernel {data['launch_us']:.1f} us")
    left.axhline(1.2 * data["launch_us"], color="gray", ls="--", lw=0.8, label="1.2x empty kernel (decode goal)")
    if data.get("launch_graph_us"):
        left.axhline(data["launch_graph_us"], color="green", ls=":", alpha=0.6,
                     label=f"empty kernel in a CUDA graph {data['launch_graph_us']:.2f} us")
    left.set_xlabel("N*K slots")
    left.set_ylabel("microseconds per call (median)")
    left.set_title(f"preprocess: lookup + counts + aligned layout\n{data['gpu']}")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    right.semilogx(nk, [r["gbps"] for r in rows], "o-", label="cupy: bytes it must move / time")
    floor_bw = [(n, 2 * 4 * n / (r["copy_floor_us"] * 1e-6) / 1e9) for n, r in zip(nk, rows) if r.get("copy_floor_us")]
    if floor_bw:
        right.semilogx(*zip(*floor_bw), "^:", color="black", alpha=0.7, label="copy floor: its bytes / its time")
    same = [(n, r["bytes"] / (r["copy_same_bytes_us"] * 1e-6) / 1e9) for n, r in zip(nk, rows)
            if r.get("copy_same_bytes_us")]
    if same:
        right.semilogx(*zip(*same), "v:", color="tab:red", alpha=0.7,
                       label="torch D2D copy of the same bytes, same timer")
    model = [(n, r["launch_then_copy_frac"] * data["copy_gbps"]) for n, r in zip(nk, rows)
             if r.get("launch_then_copy_frac")]
    if model:
        right.semilogx(*zip(*model), "-", color="gray", alpha=0.5,
                       label="an empty kernel's time, then the bytes at the copy rate")
    right.axhline(data["copy_gbps"], color="gray", ls=":", label=f"D2D copy {data['copy_gbps']:.0f} GB/s (1 GiB)")
    right.axhline(0.7 * data["copy_gbps"], color="gray", ls="--", lw=0.8, label="70% of copy (goal, N*K >= 1M)")
    right.set_xlabel("N*K slots")
    right.set_ylabel("GB/s")
    right.set_title("bandwidth")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    if compare:
        plot_path_compare(axes[2], compare, data.get("launch_graph_us"))
    cfg = data.get("config", {})
    code = data.get("code_version", "").split(":")[0]
    fig.text(0.5, 0.005, f"E={cfg.get('global_experts')} EP={cfg.get('ep_size')} top-{cfg.get('top_k')} "
                         f"block_m={cfg.get('block_m')} {cfg.get('id_dtype')} ids; {data['date'][:10]}"
                         + (f"; {code}" if code else ""), ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(dst, dpi=120)
    return 0


# The kernel each path comparison entry ran (bench_preprocess.py: "<path>" runs the lane kernels where they fit,
# the block path's as one thread-block cluster past 1024 slots on sm_90; "<path>_no_cluster" the independent blocks,
# "<path>_no_lanes" the older kernel of that path).
KERNEL_OF = {"warp": "lane_preprocess", "warp_no_lanes": "warp_preprocess",
             "block": "block_lane_preprocess, cluster_lane_preprocess past 1024 slots (16 blocks past 2048)",
             "block_cluster8": "cluster_lane_preprocess as 8 blocks", "block_cluster16":
             "cluster_lane_preprocess as 16 blocks", "block_no_cluster": "block_lane_preprocess",
             "block_no_lanes": "block_preprocess", "grid": "grid_fused"}


def plot_path_compare(ax, compare: list[dict], launch_graph_us: float | None) -> None:
    """Per kernel, its CUDA-graph time at each decode size where the benchmark timed it."""
    names = sorted({key[:-len("_graph_us")] for entry in compare for key in entry if key.endswith("_graph_us")},
                   key=list(KERNEL_OF).index)
    for name in names:
        points = [(e["num_slots"], e[f"{name}_graph_us"]) for e in compare if e.get(f"{name}_graph_us")]
        ran = [k for e in compare for k in e.get(f"{name}_kernels", ())]  # recorded since run 101
        kernels = ", ".join(dict.fromkeys(ran)) if ran else KERNEL_OF.get(name, name)
        ax.loglog(*zip(*points), "o-" if name in ("warp", "block", "grid") else "x--",
                  label=f"path={name.split('_')[0]}: {kernels}")
    if launch_graph_us:
        ax.axhline(launch_graph_us, color="green", ls=":", alpha=0.6,
                   label=f"empty kernel in a CUDA graph {launch_graph_us:.2f} us")
    ax.set_xlabel("N*K slots")
    ax.set_ylabel("microseconds per call in a CUDA graph (median)")
    ax.set_title("up to 128K slots: each kernel, same process")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: the lines fill the axes
    ax.grid(True, which="both", alpha=0.3)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
