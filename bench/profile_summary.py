"""Where the CPU went in a py-spy profile of the end-to-end run (``bench/gpu.py`` writes ``profile.txt``).

    python bench/profile_summary.py PROFILE [--top 15] [--json PATH]

The profile is py-spy's raw format: one line per distinct stack, ``frame;frame;... count``, each stack
starting with the processes it ran in (``process PID:"command line"``). Processes are given a role by what
their stacks hold: the engine (``serve`` in cxrtriage/inference/engine.py), CPU workers (any other spawned
process), the caller (the benchmark process itself). For each role: its share of all samples, and the
functions that held the most samples, inclusive (a function counts once per stack it is in) and as the
innermost frame (self time).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PROCESS = re.compile(r'process (\d+):"(.*?)"(?:;|$)')  # a command line may hold ";" itself


def parse(text: str) -> list[tuple[list[str], list[str], int]]:
    """(the stack's processes' pids, its frames outermost first, its sample count) of each line."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        pids, at = [], 0
        while (m := PROCESS.match(stack, at)) is not None:
            pids.append(m.group(1))
            at = m.end()
        stacks.append((pids, stack[at:].split(";") if at < len(stack) else [], int(count)))
    return stacks


def roles(stacks: list[tuple[list[str], list[str], int]]) -> dict[str, str]:
    """pid -> caller, engine or worker: the innermost process of each stack is where it ran."""
    role: dict[str, str] = {}
    for pids, frames, _ in stacks:
        if not pids:
            continue
        pid = pids[-1]
        if len(pids) == 1:
            role[pid] = "caller"
        elif any(f.startswith("serve (cxrtriage/inference/engine.py") for f in frames):
            role[pid] = "engine"
        else:
            role.setdefault(pid, "worker")
    return role


def summary(stacks: list[tuple[list[str], list[str], int]], top: int) -> dict[str, Any]:
    role_of = roles(stacks)
    total = sum(count for *_, count in stacks) or 1
    samples: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    innermost: dict[str, Counter[str]] = defaultdict(Counter)
    processes: dict[str, set[str]] = defaultdict(set)
    for pids, frames, count in stacks:
        role = role_of.get(pids[-1], "unknown") if pids else "unknown"
        processes[role].add(pids[-1] if pids else "?")
        samples[role] += count
        for frame in set(frames):
            inclusive[role][frame] += count
        if frames:
            innermost[role][frames[-1]] += count
    return {role: {"processes": len(processes[role]), "share_of_samples": round(samples[role] / total, 3),
                   "samples": samples[role],
                   "inclusive": [(f, round(c / samples[role], 3)) for f, c in inclusive[role].most_common(top)],
                   "innermost": [(f, round(c / samples[role], 3)) for f, c in innermost[role].most_common(top)]}
            for role in sorted(samples, key=lambda r: -samples[r])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = summary(parse(args.profile.read_text()), args.top)
    for role, facts in result.items():
        print(f"{role}: {facts['processes']} process(es), {facts['share_of_samples']:.1%} of the samples")
        for kind in ("innermost", "inclusive"):
            print(f"  {kind}:")
            for frame, share in facts[kind]:
                print(f"    {share:6.1%}  {frame}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
