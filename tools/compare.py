"""The table make run prints: ril.py runs side by side, each by the held-out evaluation its metrics.jsonl logged. The
first folder is the start (a --steps 0 run: its Stage 0 student and its pass@G); each other folder is an RL run
from it (--student START --sft-steps 0), read at its last step.

    python tools/compare.py runs/start runs/dr_grpo runs/ril
"""

import json
import os
import sys

DEFAULTS = {
    "baseline": "group",
    "teacher_ratio": "old",
    "sim_reward": "binary",
}  # RIL's variant flags, as ril.py has them


def evaluations(out: str) -> list:
    """The lines of OUT/metrics.jsonl that hold a held-out evaluation, in order."""
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [m for m in lines if "eval/acc" in m]


def main(argv=None):
    outs = sys.argv[1:] if argv is None else argv
    if len(outs) < 2:
        sys.exit("usage: python tools/compare.py START RUN [RUN ...]")
    start = evaluations(outs[0])[0]
    args = [json.load(open(os.path.join(out, "args.json"))) for out in outs]
    G = args[1]["G"]
    print(f"\n| held-out, greedy | accuracy | teacher-likeness (its D) | teacher match | length | pass@{G} (sampled) |")
    print("|---|---|---|---|---|---|")
    print(f"| start: {outs[0]} | {start['eval/acc']:.3f} | - | {start['eval/teacher_match']:.3f} | ", end="")
    print(f"{start['eval/len']:.1f} | {start.get('eval/pass@G', float('nan')):.3f} |")
    for out, a in zip(outs[1:], args[1:], strict=True):
        end = evaluations(out)[-1]
        like = f"{end['eval/teacher_like']:.3f}" if "eval/teacher_like" in end else "n/a"
        variants = [f"--{k.replace('_', '-')} {a[k]}" for k, v in DEFAULTS.items() if a.get(k, v) != v]
        name = ", ".join([a["algo"], *variants, f"{a['steps']} steps, lr {a['lr']:g}: {out}"])
        print(
            f"| {name} | {end['eval/acc']:.3f} | {like} | {end['eval/teacher_match']:.3f} | {end['eval/len']:.1f} | - |"
        )


if __name__ == "__main__":
    main()
