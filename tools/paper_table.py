r"""The paper's tables in miniature (make paper-table), not a test: Table 1, Table 2, Table 5b/5d and Fig. 6 of RIL on
each built-in task of ril.py, 3 seeds, every row a ril.py run of its own; about 90 minutes on 2 CPU cores.

    python tools/paper_table.py                              # make paper-table: writes runs/paper_table/table.md
    python tools/paper_table.py --jobs 4 --root /tmp/table   # 4 runs at a time, elsewhere
    python tools/paper_table.py --frames OUT TASK SEED [STEP]  # how a saved student answers in each teacher's frame
    python tools/paper_table.py --search                     # scale-downs for the paper's regime: runs/search/search.md

The table goes to runs/paper_table at the repo root (where ril.py is) wherever this is run from, unless --root says
otherwise. A run that finished in an earlier call (its folder has the saved student) is kept, so a stopped table goes on
where it stopped: delete ROOT to start afresh. After --, more ril.py flags for every run; a smoke run of a few minutes:

    python tools/paper_table.py --root /tmp/table --tasks toy --seeds 0 --rows 1 -- --toy-size 24 --eval-size 4 \
        --sft-steps 3 --disc-pretrain-steps 2 --batch-size 2 --steps 3
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, where ril.py is
import ril

ROOT = os.path.dirname(os.path.abspath(ril.__file__))
CPU = torch.device("cpu")

# ---------------------------------------------------------------- the paper's tables in miniature (make paper-table)
# (row, flags): every row starts from the same SFT'd student of its seed, 200 RIL steps. FIRST: the first of the task's
# two teachers (alice on toy, carol on phrased). Every RIL row is Eq. 2 as written (ril.py's default) but for its flags.
PAPER_ROWS = [
    ("GRPO", ["--algo", "grpo"]),
    ("Dr.GRPO", ["--algo", "dr_grpo"]),
    ("RIL, one teacher (alice; carol)", ["--teachers", "FIRST"]),
    ("RIL, two teachers", []),  # the default: Eq. 2 and Alg. 2 as written
    ("RIL, the G samples' baseline", ["--baseline", "student"]),  # variant: the teacher texts leave the group mean
    ("RIL, teacher ratio pi_theta / 1", ["--teacher-ratio", "one"]),  # variant: a teacher text's pi_old taken as 1
    ("RIL, both variants", ["--baseline", "student", "--teacher-ratio", "one"]),
    ("RIL, frozen discriminator", ["--disc-lr", "0"]),
    ("RIL, continuous r_sim", ["--sim-reward", "continuous"]),
    ("RIL, beta = 0", ["--beta", "0"]),
    ("RIL, the G samples' baseline and continuous r_sim", ["--baseline", "student", "--sim-reward", "continuous"]),
    # not RL: Stage 0 on the task's teacher texts alone from the same start, as many steps as the RL rows take
    (
        "Imitation ceiling (Stage 0 on the teachers' texts)",
        ["--algo", "dr_grpo", "--sft-data", "TASK", "--sft-steps", "200", "--sft-teacher-frac", "1", "--steps", "0"],
    ),
]
PAPER_SEEDS = [0, 1, 2]
PAPER_TASKS = ["toy", "phrased", "transfer"]
# per task, flags for each of its runs, the same for every row: on 'transfer' (the student starts at 0, pass@G 0) the
# RL stage runs at Stage 0's peak learning rate, since at 2e-4 even 200 Stage 0 steps on the teachers' texts reach 0.000
TASK_FLAGS = {"transfer": ["--lr", "3e-3"]}

# ------------------------------------------------------------------ the search for the paper's regime (--search)
# (name, ril.py flags, tasks, the tiny student's (hidden, layers)): scale adaptations only, each a flag or size that
# would apply to any --data, none a change of the method; every entry runs Dr.GRPO and the paper's RIL (the default)
# from the same SFT'd start. Wanted: RIL above Dr.GRPO and above its start, teacher-likeness rising.
SEARCH_TASKS = ["toy", "phrased"]  # the search ran before the regime task existed
SEARCH = [
    ("defaults (SFT 300 steps, lr 2e-4)", [], SEARCH_TASKS, (64, 2)),
    ("weak start: SFT 100 steps", ["--sft-steps", "100"], SEARCH_TASKS, (64, 2)),
    ("weak start, RL lr 1e-3", ["--sft-steps", "100", "--lr", "1e-3"], SEARCH_TASKS, (64, 2)),
    ("SFT 200 steps", ["--sft-steps", "200"], SEARCH_TASKS, (64, 2)),
    ("SFT 200 steps, RL lr 1e-3", ["--sft-steps", "200", "--lr", "1e-3"], SEARCH_TASKS, (64, 2)),
    ("RL lr 1e-3", ["--lr", "1e-3"], SEARCH_TASKS, (64, 2)),
    ("SFT without teacher texts (the paper's SFT)", ["--sft-teacher-frac", "0"], SEARCH_TASKS, (64, 2)),
    ("SFT half teacher texts", ["--sft-teacher-frac", "0.5"], SEARCH_TASKS, (64, 2)),
    ("SFT half teacher texts, RL lr 1e-3", ["--sft-teacher-frac", "0.5", "--lr", "1e-3"], SEARCH_TASKS, (64, 2)),
    ("600 RL steps", ["--steps", "600", "--eval-every", "100"], ["phrased"], (64, 2)),
    ("a 3.2M student (hidden 256, 4 layers)", [], ["phrased"], (256, 4)),
    ("D's loop lr 1e-3 (faster D)", ["--disc-lr", "1e-3"], SEARCH_TASKS, (64, 2)),
    ("D's loop lr 2e-5 (slower D)", ["--disc-lr", "2e-5"], SEARCH_TASKS, (64, 2)),
]
# the search's columns: (row, score) with score 0 the accuracy, 1 the teacher-likeness
COLUMNS = [("SFT'd student alone", 0), ("Dr.GRPO", 0), ("RIL, two teachers", 0), ("RIL, two teachers", 1)]
# a ril.py run whose built-in tiny student has another size (the SFT runs; every row loads its SFT'd student)
SIZED = "import sys, ril; ril.build_tiny.__defaults__ = ({}, {}); ril.main(sys.argv[1:])"


def run_paper_table(
    root: str = os.path.join(ROOT, "runs", "paper_table"),
    jobs: int = 2,
    flags: tuple = (),
    tasks: list = PAPER_TASKS,
    rows: list = PAPER_ROWS,
    seeds: list = PAPER_SEEDS,
    sft_root: str = "",
    tiny: tuple = (64, 2),
) -> dict:
    """Table 1, Table 2, Table 5b/5d and Fig. 6 of the paper in miniature, on each built-in task, 3 seeds.
    Per task and seed: one SFT run (its student is the first row and the start of every other row), then each
    row as its own process, two at a time with one thread each. Every row is scored the same way: greedy
    answers on the 120 held-out questions; accuracy; teacher-likeness by one ruler per task and seed, the
    discriminator pre-trained in its two-teacher RIL run (the D that learned the SFT'd student vs the teachers),
    so that rows without a discriminator of their own can be scored too; teacher match. Writes ROOT/table.md and
    returns the scores. flags: more ril.py flags for every run (a smaller budget, for a smoke run); sft_root: the
    folder of an earlier table whose SFT'd students to start from, for rows that change no SFT flag; tiny: the built-in
    student's (hidden size, layers)."""
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    common = ["--keep-last", "1000", "--overwrite", *flags]  # every checkpoint: the ruler is step 0's D
    # the ruler's run is row 0, always made: its pre-trained D scores every row of its task and seed
    ruler = "RIL, two teachers"
    rows = ([r for r in rows if r[0] == ruler] or [(ruler, [])]) + [r for r in rows if r[0] != ruler]

    def folder(task, seed, i=None):  # the SFT run of a task and seed (i None), or its row i
        if i is None:
            return os.path.join(sft_root or root, task, f"seed{seed}", "sft")
        return os.path.join(root, task, f"seed{seed}", f"row{i}")

    def run_all(cmds):  # [(out, argv)], `jobs` at a time; a run that saved its student in an earlier call is kept
        running, todo = [], [(out, argv) for out, argv in cmds if not os.path.isfile(os.path.join(out, "config.json"))]
        while todo or running:
            while todo and len(running) < jobs:
                out, argv = todo.pop(0)
                os.makedirs(out, exist_ok=True)
                log = open(os.path.join(out, "run.log"), "w")
                ril_py = [os.path.join(ROOT, "ril.py")] if tiny == (64, 2) else ["-c", SIZED.format(*tiny)]
                cmd = [sys.executable, *ril_py, *argv, "--out", out]
                running.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
            time.sleep(0.5)
            for out, p in [r for r in running if r[1].poll() is not None]:
                running.remove((out, p))
                if p.returncode != 0:
                    sys.exit(f"paper-table: the run in {out} failed; see {out}/run.log")
                print(f"  done {os.path.relpath(out, root)} ({time.time() - t0:.0f}s)", flush=True)

    runs = [(t, seed) for t in tasks for seed in seeds]
    first = {}  # the first teacher of each task
    for t in tasks:
        first[t] = sorted(ril.load_data(ril.parse_args(["--data", t, "--toy-size", "1"]))[1][0]["teachers"])[0]
    if not sft_root:  # with sft_root, the SFT'd students of an earlier table
        sft = ["--algo", "dr_grpo", *common, "--steps", "0"]
        run_all(
            [(folder(t, seed), ["--data", t, "--seed", str(seed), *sft, *TASK_FLAGS.get(t, [])]) for t, seed in runs]
        )
    cmds = []
    for t, seed in runs:
        for i, (_, row) in enumerate(rows):
            row_flags = [{"FIRST": first[t], "TASK": t}.get(x, x) for x in row]
            argv = ["--data", t, "--seed", str(seed), "--student", folder(t, seed), *common, *TASK_FLAGS.get(t, [])]
            argv += ["--sft-steps", "0"]
            cmds.append((folder(t, seed, i), argv + row_flags))
    run_all(cmds)

    scores = {}  # (task, row) -> list over seeds of (accuracy, teacher-likeness, teacher match, length)
    for task, seed in runs:
        a = ril.parse_args(["--data", task, "--seed", str(seed), *flags])
        _, train_rows, eval_rows = ril.load_data(a)
        judge = ril.MatchJudge(train_rows)
        ruler_state = torch.load(
            os.path.join(folder(task, seed, 0), "checkpoints", "step_0000000.pt"), weights_only=True
        )["disc"]
        outs = [("SFT'd student alone", folder(task, seed))] + [
            (r, folder(task, seed, i)) for i, (r, _) in enumerate(rows)
        ]
        for name, out in outs:
            model = transformers.AutoModelForImageTextToText.from_pretrained(out)
            ruler = ril.Discriminator(model)
            ruler.load_state_dict(ruler_state)
            m, _ = ril.evaluate(
                a, ril.State(model, ril.load_processor(out), CPU, judge=judge, disc=ruler.eval()), eval_rows
            )
            scores.setdefault((task, name), []).append(
                (m["eval/acc"], m["eval/teacher_like"], m["eval/teacher_match"], m["eval/len"])
            )

    def cell(xs, j, fmt="{:.3f}"):
        v = [x[j] for x in xs]
        mean = sum(v) / len(v)
        sd = (sum((x - mean) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
        return f"{fmt.format(mean)} ± {fmt.format(sd)}"

    order = ["SFT'd student alone"] + [r for r, _ in PAPER_ROWS if r in dict(rows)]
    lines = [
        f"{a.eval_size} held-out questions per task, seeds {seeds}, {a.steps} RIL steps per row from the same SFT'd "
        f"student; mean ± standard deviation over seeds. Teacher-likeness = mean(1 - D) under one ruler per task and "
        f"seed (the discriminator pre-trained in its two-teacher RIL run)."
    ]
    for task in tasks:
        starts = [json.loads(open(os.path.join(folder(task, s), "metrics.jsonl")).readline()) for s in seeds]
        passes = " / ".join(f"{m.get('eval/pass@G', float('nan')):.3f}" for m in starts)
        lines += [
            "",
            f"**--data {task}** {' '.join(TASK_FLAGS.get(task, []))} (the SFT'd start's pass@G by seed: {passes})",
            "",
            "| row | accuracy | teacher-likeness | teacher match | length (tokens) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {cell(xs, 0)} | {cell(xs, 1)} | {cell(xs, 2)} | {cell(xs, 3, '{:.1f}')} |"
            for n in order
            for xs in [scores[(task, n)]]
        ]
    lines += [
        "",
        "Per seed (accuracy / teacher-likeness):",
        "",
        "| task | row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    lines += [
        f"| {task} | {n} | " + " | ".join(f"{x[0]:.3f} / {x[1]:.3f}" for x in scores[(task, n)]) + " |"
        for task in tasks
        for n in order
    ]
    lines += ["", f"{time.time() - t0:.0f} s in all, {jobs} runs at a time with one thread each."]
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten to {os.path.join(root, 'table.md')}")
    return scores


def run_seconds(folder: str) -> int:
    """The seconds that the ril.py runs under folder took, summed, as each run.log's last line says ("(93s total)")."""
    logs = [os.path.join(d, "run.log") for d, _, files in os.walk(folder) if "run.log" in files]
    return sum(int(re.findall(r"\((\d+)s total\)", open(log).read())[-1]) for log in logs)


def run_search(root: str, jobs: int = 2, seeds: list = (0,), numbers: list = (), more: tuple = ()) -> str:
    """SEARCH entry N (all, or those in numbers) as a table of its own, Dr.GRPO and the paper's RIL, under ROOT/N; then
    ROOT/search.md: per entry, for each task the held-out accuracy of the SFT'd start, Dr.GRPO and RIL (mean over
    seeds) and RIL's teacher-likeness, and the seconds its runs took, added up. more: ril.py flags after each entry's
    own (a smaller budget, for a smoke run)."""
    rows = [PAPER_ROWS[1], PAPER_ROWS[3]]  # Dr.GRPO; RIL, two teachers (the default)
    lines = [
        f"Seeds {list(seeds)}; held-out accuracy of the SFT'd start / Dr.GRPO / the paper's RIL (Eq. 2, two teachers), "
        "mean over seeds, RIL's teacher-likeness in brackets; per seed in ROOT/N/table.md.",
        "",
        "| # | scale-down | " + " | ".join(f"`{t}`" for t in SEARCH_TASKS) + " | run time |",
        "|---|---|" + "---|" * len(SEARCH_TASKS) + "---|",
    ]
    for i in numbers or range(len(SEARCH)):
        name, flags, tasks, tiny = SEARCH[i]
        scores = run_paper_table(os.path.join(root, str(i)), jobs, (*flags, *more), tasks, rows, list(seeds), tiny=tiny)
        cells = []
        for task in SEARCH_TASKS:
            mean = [sum(x[j] for x in scores[(task, r)]) / len(seeds) for r, j in COLUMNS] if task in tasks else []
            cells.append(" / ".join(f"{m:.3f}" for m in mean[:3]) + f" ({mean[3]:.2f})" if mean else "-")
        lines.append(f"| {i} | {name} | {' | '.join(cells)} | {run_seconds(os.path.join(root, str(i)))} s |")
    with open(os.path.join(root, "search.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten to {os.path.join(root, 'search.md')}")
    return "\n".join(lines)


def frame_accuracy(out: str, task: str, seed: int, step: int = -1) -> dict:
    """How well a saved student answers inside each sentence frame of its task's teachers ("It is {a}", ...), the bare
    answer first: per held-out question, the candidate answer of its kind (those in the training rows) with the highest
    log pi(frame + answer | image, question) against the true one. Greedy answers in a frame cannot be better than this.
    First the run's greedy accuracy and its share of one-word (bare) answers; step >= 0 scores that checkpoint
    instead."""
    a = ril.parse_args(["--data", task, "--seed", str(seed)])
    _, train_rows, eval_rows = ril.load_data(a)
    kind = {q: k for k, qs in ril.QUESTIONS[task].items() for q in qs}
    cands = {k: sorted({r["answer"] for r in train_rows if kind[r["question"]] == k}) for k in ril.QUESTIONS[task]}
    frames = ["{a}"] + sorted(
        {
            p.split("{a}")[0] + "{a}"
            for t in ril.TEACHERS[task].values()
            for ps in (t.values() if isinstance(t, dict) else [t])
            for p in ps
        }
    )
    model, proc = transformers.AutoModelForImageTextToText.from_pretrained(out).eval(), ril.load_processor(out)
    if step >= 0:  # the student of a checkpoint of that run instead of its final one
        model.load_state_dict(
            torch.load(os.path.join(out, "checkpoints", f"step_{step:07d}.pt"), weights_only=False)["student"]
        )
    # ril.py's own scoring
    scores, texts = ril.evaluate(a, ril.State(model, proc, judge=ril.MatchJudge(train_rows)), eval_rows)
    acc = {
        "greedy accuracy": scores["eval/acc"],
        "greedy answers that are one word": sum(len(ril.normalize(t)) == 1 for t in texts) / len(texts),
    }
    for frame in frames:
        right = 0
        for r in eval_rows:
            c = cands[kind[r["question"]]]
            comp, mask = ril.pad_right(
                [ril.plain_ids(proc.tokenizer, frame.format(a=x)) for x in c], proc.tokenizer.pad_token_id, CPU
            )
            with torch.no_grad():
                lp = ril.token_logprobs(
                    model, ril.repeat_prompts(ril.encode_prompts(proc, [r], CPU), len(c)), comp, mask, 1.0
                )
            right += c[int((lp * mask).sum(1).argmax())] == r["answer"]
        acc[frame] = right / len(eval_rows)
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="ril.py runs at a time, one thread each (default: 2)")
    p.add_argument(
        "--root",
        default=os.path.join(ROOT, "runs", "paper_table"),
        help="output folder (default: runs/paper_table at the repo root)",
    )
    p.add_argument(
        "--sft-root",
        default="",
        help="start every row from the SFT'd students in this earlier --root instead of SFT runs of its own (for rows "
        "that change no SFT flag)",
    )
    p.add_argument(
        "--tasks", nargs="+", choices=PAPER_TASKS, default=PAPER_TASKS, help="built-in tasks (default: all three)"
    )
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2; with --search: 0)")
    p.add_argument(
        "--rows",
        nargs="+",
        type=int,
        metavar="N",
        help="rows by number (default: all; the two-teacher row, the ruler, is always run): "
        + "; ".join(f"{i} {name}" for i, (name, _) in enumerate(PAPER_ROWS)),
    )
    p.add_argument(
        "--frames",
        nargs="+",
        metavar="ARG",
        help="OUT TASK SEED [STEP]: instead of the table, score the saved student in OUT (or its checkpoint of STEP) "
        "in each sentence frame of the teachers of TASK, and print it",
    )
    p.add_argument(
        "--search",
        nargs="*",
        type=int,
        metavar="N",
        help="instead of the table, the search for a scale-down in the paper's regime: Dr.GRPO and the paper's RIL "
        "for SEARCH entries N (default: all) into ROOT/N, and ROOT/search.md (default ROOT: runs/search): "
        + "; ".join(f"{i} {name}" for i, (name, *_) in enumerate(SEARCH)),
    )
    p.add_argument(
        "ril_flags",
        nargs="*",
        metavar="-- RIL_FLAGS",
        help="after --, more ril.py flags for every run, e.g. a smaller budget for a smoke run: "
        "-- --toy-size 24 --eval-size 4 --sft-steps 3 --disc-pretrain-steps 2 --batch-size 2 --steps 3",
    )
    a = p.parse_args(argv)
    if a.frames:
        if len(a.frames) not in (3, 4):
            p.error("--frames takes OUT TASK SEED [STEP]")
        out, task, seed, *step = a.frames
        print(
            " | ".join(f"{f}: {x:.3f}" for f, x in frame_accuracy(out, task, int(seed), int((step or [-1])[0])).items())
        )
        return
    if a.search is not None:
        if not all(0 <= i < len(SEARCH) for i in a.search):
            p.error(f"--search: numbers from 0 to {len(SEARCH) - 1}")
        root = os.path.join(ROOT, "runs", "search") if a.root == p.get_default("root") else a.root
        run_search(root, a.jobs, a.seeds or [0], a.search, a.ril_flags)
        return
    if a.rows is not None and not all(0 <= i < len(PAPER_ROWS) for i in a.rows):
        p.error(f"--rows: numbers from 0 to {len(PAPER_ROWS) - 1}")
    rows = PAPER_ROWS if a.rows is None else [PAPER_ROWS[i] for i in a.rows]
    run_paper_table(
        root=a.root,
        jobs=a.jobs,
        flags=tuple(a.ril_flags),
        tasks=a.tasks,
        rows=rows,
        seeds=a.seeds or PAPER_SEEDS,
        sft_root=a.sft_root,
    )


if __name__ == "__main__":
    main()
