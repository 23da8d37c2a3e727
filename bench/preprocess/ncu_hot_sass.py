"""The SASS instructions with the most stall samples in an Nsight Compute report, from its source page as CSV.

    ncu --set full -k regex:grid_fused -c 1 -o /tmp/rep python3 bench/preprocess/profile_preprocess.py --ep 1 \\
        --sizes 8388608 --calls 1
    ncu --import /tmp/rep.ncu-rep --page source --csv --print-source sass | python3 bench/preprocess/ncu_hot_sass.py

Prints the total of the warp stall samples, then the ``--top`` instructions in program order: index in the
kernel's SASS, share of all samples, address, instruction and how many times a warp executed it (the count tells
which loop an instruction is in: once per warp, per 32-slot round, ...).
"""

from __future__ import annotations

import argparse
import csv
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=60, help="instructions to print")
    args = parser.parse_args()
    rows = list(csv.reader(sys.stdin))
    try:
        header_at = next(i for i, r in enumerate(rows) if "Source" in r and "Address" in r)
    except StopIteration:
        print("no source-page table on stdin: pass `ncu --import REPORT --page source --csv --print-source sass`",
              file=sys.stderr)
        return 1
    header = rows[header_at]
    source, address = header.index("Source"), header.index("Address")
    samples = next(i for i, c in enumerate(header) if c.startswith("Warp Stall Sampling (All"))
    executed = header.index("Instructions Executed") if "Instructions Executed" in header else None
    table = []
    for r in rows[header_at + 1:]:
        try:
            table.append((float(r[samples] or 0), r))
        except (IndexError, ValueError):
            continue
    total = sum(v for v, _ in table) or 1.0
    print(f"total samples {total:.0f}, instructions {len(table)}")
    for i in sorted(sorted(range(len(table)), key=lambda i: -table[i][0])[:args.top]):
        v, r = table[i]
        count = r[executed] if executed is not None else ""
        print(f"{i:6d} {v / total * 100:5.1f}% {r[address]} {r[source][:70]} exec={count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
