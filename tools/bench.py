"""Benchmarks of ril.py, not tests.

    python tools/bench.py            # make bench (about 13 minutes on 2 CPU cores, as measured for the README)
    python tools/bench.py --memory   # make memory: ril.plan of the README's real-model commands (seconds)
    python tools/bench.py --memory "--student Qwen2-VL-7B --shard ..." --world 8   # the plan of any command

make bench: a RIL step, phase by phase, against the bare model calls it cannot avoid (the floor), on four tiny
workloads (the real vocabulary with top-k 50 and with top-k off); a Stage 0 (SFT) step at the tiny default and the real
vocabulary; then the policy update's peak memory at the real vocabulary and 256 new tokens, all logits at once against
ril's chunked LM head, each in a fresh process (--policy-peak). make memory: what ril.py plans per GPU, phase by phase,
from the models' published configs, before it loads anything.

Models are random tiny Qwen2-VLs built here; nothing is downloaded. Runs on CUDA when there is one, else the CPU.
"""

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, where ril.py is
import ril

# ---------------------------------------------------------------- a RIL step against its floor (make bench)
# name: (tiny model size, ril.Args overrides, vocabulary); random models: answers run to the token cap
BENCH_WORKLOADS = {
    "tiny default": (dict(), dict(), 0),
    "larger (hidden 256, 4 layers, 8 questions x G=4, 32 new tokens)": (
        dict(hidden=256, layers=4),
        dict(batch_size=8, G=4, max_new_tokens=32),
        0,
    ),
    "real vocabulary (151,936 entries, hidden 64, 2 layers, 8 questions x G=4, 32 new tokens)": (
        dict(),
        dict(batch_size=8, G=4, max_new_tokens=32),
        151936,
    ),
    "real vocabulary, top-k off (--top-k 0 --top-p 1: TRL's and vLLM's default; otherwise as above)": (
        dict(),
        dict(batch_size=8, G=4, max_new_tokens=32, top_k=0, top_p=1.0),
        151936,
    ),
}


def _clock(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


class PeakMemory:
    """Peak memory inside time windows: on CUDA the allocator's peak since the window opened; on a CPU this process's
    resident set, sampled every 5 ms by a thread (glibc keeps freed memory, so a window also counts what earlier
    ones left resident: compare phases within one process, and variants in fresh processes)."""

    def __init__(self, dev):
        self.dev, self.samples, self.on = dev, [], dev.type != "cuda"
        if self.on:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.on:
            self.samples.append((time.perf_counter(), int(open("/proc/self/statm").read().split()[1]) * page))
            time.sleep(0.005)

    def open(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        return time.perf_counter()

    def peak(self, t0: float) -> float:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev)
        time.sleep(0.01)  # one more sample
        return max((r for t, r in self.samples if t >= t0), default=0)


def plain_token_logprobs(model, enc, comp, comp_mask, temperature, chunk=None):
    """token_logprobs as it was before the chunked head (every position's full-vocabulary logits at once): the floor's
    log-probs, and ril.token_logprobs's stand-in in policy_peak("plain"). chunk is there for the same signature."""
    T = comp.shape[1]
    extra = {
        k: torch.cat([v, torch.zeros_like(comp)], 1) if "token_type_ids" in k else v
        for k, v in enc.items()
        if k not in ("input_ids", "attention_mask")
    }
    ids, attention = torch.cat([enc["input_ids"], comp], 1), torch.cat([enc["attention_mask"], comp_mask], 1)
    logits = (
        model(input_ids=ids, attention_mask=attention, logits_to_keep=T + 1, **extra).logits[:, :-1].float()
        / temperature
    )
    return logits.gather(-1, comp[..., None]).squeeze(-1) - logits.logsumexp(-1)


def bench_model(size: dict, vocab: int = 0, rows: list = ()) -> tuple:
    """A random tiny Qwen2-VL; with vocab, its (tied) embedding and LM head grown to that many entries, as a real
    student's."""
    torch.manual_seed(0)
    model, proc = ril.build_tiny(list(rows), **size)
    if vocab:
        model.resize_token_embeddings(vocab)
    return model, proc


def bench_workload(name: str, size: dict, overrides: dict, vocab: int = 0, steps: int = 7, warmup: int = 2) -> dict:
    """Time full RIL steps and, on the same shapes in the same process, the bare model calls a step cannot
    avoid: the floor. The step's phases are timed from outside, by wrapping ril's own functions."""
    a = ril.Args(sft_steps=0, disc_pretrain_steps=0, **overrides)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ril.make_toy(64, 0)
    model, proc = bench_model(size, vocab, rows)
    model.to(dev)
    mem = PeakMemory(dev)
    tok = proc.tokenizer
    ref, disc = ril.copy.deepcopy(model).eval().requires_grad_(False), ril.Discriminator(model)
    s = ril.State(
        model,
        proc,
        dev,
        ("alice", "bob"),
        ril.MatchJudge(rows),
        ref,
        disc,
        torch.optim.AdamW(model.parameters(), lr=1e-5),
        torch.optim.AdamW(disc.parameters(), lr=1e-5),
    )
    phase, real, peaks = {}, {}, {}

    def always(*x):
        return True

    def timed(key, fn, counts):
        def wrapper(*x, **kw):
            t0, m0 = _clock(dev), key in ("generate", "policy") and mem.open()
            out = fn(*x, **kw)
            if counts(*x):
                phase[key] = phase.get(key, 0.0) + _clock(dev) - t0
            if m0:
                peaks[key] = max(peaks.get(key, 0), mem.peak(m0))
            return out

        return wrapper

    def of_ref(m, *x):  # token_logprobs: the reference's calls alone (the policy's own are inside policy_update)
        return m is ref

    def of_student(opt, *x):  # clip_and_step: the student's optimizer step (D's is inside disc_update)
        return opt is s.opt

    for fn, key, counts in [
        ("generate", "generate", always),
        ("disc_update", "disc", always),
        ("disc_logits", "disc", always),
        ("policy_update", "policy", always),
        ("token_logprobs", "ref", of_ref),
        ("clip_and_step", "optimizer", of_student),
    ]:
        real[fn] = getattr(ril, fn)
        setattr(ril, fn, timed(key, real[fn], counts))
    step_t, phases = [], []
    try:
        for step in range(warmup + steps):
            phase.clear()
            t0 = _clock(dev)
            ril.ril_step(a, s, ril.batch_at(rows, step, a.batch_size, 3), step)
            if step >= warmup:
                step_t.append(_clock(dev) - t0)
                phases.append(dict(phase))
    finally:
        for fn, f in real.items():
            setattr(ril, fn, f)

    # the floor: the same calls, bare, on one step's shapes (prompts, completions and D inputs prepared outside the
    # clock)
    ro = ril.rollout(a, s, ril.batch_at(rows, 0, a.batch_size, 3), ril.random.Random(0), True)
    enc_g, enc_2g = ril.repeat_prompts(ro["enc"], a.G), ril.repeat_prompts(ro["enc"], 2 * a.G)
    gen_cfg = hf_sampling(a, model, tok)
    d_ids, d_mask = ril.disc_inputs(tok, ro["texts"], dev)
    labels = (1 - ro["is_teacher"]).float()
    floor = {k: [] for k in ("generate", "ref forward", "policy fwd+bwd", "disc fwd+bwd", "optimizers")}
    shared = []  # D's forward+backward as ril.Discriminator runs it (the prompt prefix once): reported beside the floor
    for i in range(warmup + steps):
        t = [_clock(dev)]
        with torch.no_grad():
            model.generate(**enc_g, generation_config=gen_cfg)
        t.append(_clock(dev))
        with torch.no_grad():
            plain_token_logprobs(ref, enc_2g, ro["comp"], ro["mask"], a.temperature)
        t.append(_clock(dev))
        plain_token_logprobs(model, enc_2g, ro["comp"], ro["mask"], a.temperature).mean().backward()
        t.append(_clock(dev))
        h = disc.backbone(input_ids=d_ids, attention_mask=d_mask).last_hidden_state  # plain: every row in full
        d_logits = disc.head(h[torch.arange(len(h), device=dev), d_mask.sum(1) - 1]).squeeze(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(d_logits, labels).backward()
        t.append(_clock(dev))
        for opt in (s.opt, s.d_opt):
            opt.step()
        for opt in (s.opt, s.d_opt):
            opt.zero_grad()
        t.append(_clock(dev))
        t1 = _clock(dev)
        torch.nn.functional.binary_cross_entropy_with_logits(disc(d_ids, d_mask), labels).backward()
        s.d_opt.zero_grad()
        if i >= warmup:
            for k, t0, t1_ in zip(floor, t[:-1], t[1:], strict=True):
                floor[k].append(t1_ - t0)
            shared.append(_clock(dev) - t1)
    floor = {k: statistics.median(v) for k, v in floor.items()}
    ph = {
        k: statistics.median([p.get(k, 0.0) for p in phases])
        for k in ("generate", "ref", "disc", "policy", "optimizer")
    }
    mem.on = False
    return dict(
        name=name,
        step=statistics.median(step_t),
        phases=ph,
        floor=floor,
        floor_total=sum(floor.values()),
        shared=statistics.median(shared),
        peaks={k: v / 2**20 for k, v in peaks.items()},
        device=str(dev),
        sampling=sampling_share(model, enc_g, a, tok),
    )


def hf_sampling(a, model, tok) -> transformers.GenerationConfig:
    """The paper's sampling settings as HF's own do_sample (warpers, then a multinomial over the whole vocabulary)."""
    return transformers.GenerationConfig(
        **{
            **ril.generation_config(a, model, tok, greedy=False).to_dict(),
            "do_sample": True,
            **{k: getattr(a, k) for k in ("temperature", "top_k", "top_p")},
        }
    )


def sampling_share(model, enc, a, tok) -> tuple:
    """Seconds to generate the same tokens (every answer to the cap) with HF's sampling, with ril's sampler, and
    greedily with no logits processors: the differences are what sampling costs each way."""
    times, cfgs = {}, {"hf": hf_sampling(a, model, tok), "ril": ril.generation_config(a, model, tok, greedy=False)}
    cfgs["bare"] = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=a.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=cfgs["ril"].eos_token_id,
    )
    for name, c in cfgs.items():
        c.min_new_tokens = a.max_new_tokens
        with torch.no_grad():
            for _ in range(3):
                t0 = _clock(model.device)
                model.generate(
                    **enc,
                    generation_config=c,
                    logits_processor=[ril.functools.partial(ril.sample_top_k_top_p, a)] if name == "ril" else None,
                )
                times[name] = min(times.get(name, 1e9), _clock(model.device) - t0)
    return times["hf"], times["ril"], times["bare"]


def policy_peak(variant: str) -> tuple:
    """Peak memory (MiB) of the policy update of one RIL step at the real vocabulary and 256 new tokens (2 questions x
    2G = 16 sequences), with ril's chunked log-probs or the plain all-logits ones, and the memory at its start; run each
    in a fresh process (make bench does)."""
    a = ril.Args(sft_steps=0, disc_pretrain_steps=0, batch_size=2, max_new_tokens=256)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ril.make_toy(8, 0)
    model, proc = bench_model({}, 151936, rows)
    model.to(dev)
    s = ril.State(
        model,
        proc,
        dev,
        ("alice", "bob"),
        ril.MatchJudge(rows),
        ril.copy.deepcopy(model).requires_grad_(False),
        ril.Discriminator(model),
        torch.optim.AdamW(model.parameters(), lr=1e-5),
    )
    s.d_opt = torch.optim.AdamW(s.disc.parameters(), lr=1e-5)
    if variant == "plain":
        ril.token_logprobs = plain_token_logprobs
    mem, real, out = PeakMemory(dev), ril.policy_update, {}

    def measured(*x, **kw):
        t0 = mem.open()
        r = real(*x, **kw)
        out["peak"], out["before"] = mem.peak(t0), min((m for t, m in mem.samples if t >= t0), default=0)
        return r

    ril.policy_update = measured
    ril.ril_step(a, s, rows[:2], 0)
    mem.on = False
    return out["peak"] / 2**20, out["before"] / 2**20


def run_bench():
    """make bench, first part: the table of each workload in BENCH_WORKLOADS."""
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    cpu = platform.processor() or platform.machine()
    print(
        f"# make bench: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads; medians of 7 steps after 2 warm-up"
    )
    for name, (size, overrides, vocab) in BENCH_WORKLOADS.items():
        r = bench_workload(name, size, overrides, vocab)
        p, f = r["phases"], r["floor"]
        print(f"\n## {name} ({r['device']})\n")
        print("| phase | RIL step (s) | floor: bare call (s) |\n|---|---|---|")
        print(f"| generate (one batched call; floor: HF's own sampling) | {p['generate']:.3f} | {f['generate']:.3f} |")
        print(
            f"| reference log-probs (floor: all logits, then log-softmax) | {p['ref']:.3f} | {f['ref forward']:.3f} |"
        )
        print(
            f"| discriminator update + scoring | {p['disc']:.3f} | {f['disc fwd+bwd']:.3f} "
            f"(with the shared prefix: {r['shared']:.3f}) |"
        )
        print(
            f"| policy forward/backward | {p['policy'] - p['ref'] - p['optimizer']:.3f} | {f['policy fwd+bwd']:.3f} |"
        )
        print(
            f"| optimizer steps (student; D's is inside its update) | {p['optimizer']:.3f} | "
            f"{f['optimizers']:.3f} (both) |"
        )
        print(f"| **whole step** | **{r['step']:.3f}** | **{r['floor_total']:.3f}** |")
        hf, gen, bare = r["sampling"]
        print(
            f"\npeak memory ({'CUDA allocated' if r['device'].startswith('cuda') else 'resident set'}): generate "
            f"{r['peaks']['generate']:.0f} MiB, policy update (reference log-probs included) "
            f"{r['peaks']['policy']:.0f} MiB"
        )
        print(
            f"generate, the same tokens: {hf:.3f} s with HF's sampling (sampling {(hf - bare) / hf:.0%} of it), "
            f"{gen:.3f} s with ril's sampler ({(gen - bare) / gen:.0%}), "
            f"{bare:.3f} s greedy without logits processors"
        )
        print(
            f"ratio step / floor: {r['step'] / r['floor_total']:.2f}; against a floor whose D call also shares "
            f"the prompt prefix: {r['step'] / (r['floor_total'] - f['disc fwd+bwd'] + r['shared']):.2f}"
        )


def sft_step_time(vocab: int = 0, steps: int = 7, warmup: int = 2) -> float:
    """Seconds per Stage 0 step (ril.sft_warmup at the default --sft-batch-size and --max-new-tokens) of the tiny
    default student, or of it at the real vocabulary: the median time between consecutive optimizer steps."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = ril.make_toy(64, 0)
    model, proc = bench_model({}, vocab, rows)
    done, real = [], ril.clip_and_step

    def stamped(*x, **kw):
        out = real(*x, **kw)
        done.append(_clock(dev))
        return out

    ril.clip_and_step = stamped
    try:  # quiet: sft_warmup's progress bar and final-loss line
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ril.sft_warmup(ril.Args(sft_steps=warmup + steps + 1), ril.State(model.to(dev), proc, dev), rows)
    finally:
        ril.clip_and_step = real
    return statistics.median([t1 - t0 for t0, t1 in zip(done[warmup:-1], done[warmup + 1 :], strict=True)])


def run_sft_bench():
    """make bench, second part: a Stage 0 step."""
    a = ril.Args()
    print(f"\n## Stage 0 (SFT): {a.sft_batch_size} targets per step, up to {a.max_new_tokens} tokens each\n")
    print("| student | seconds per SFT step |\n|---|---|")
    for name, vocab in (("tiny default", 0), ("real vocabulary (151,936 entries, hidden 64, 2 layers)", 151936)):
        print(f"| {name} | {sft_step_time(vocab):.3f} |")


def run_policy_peaks():
    """make bench, third part: the policy update's memory at 256 new tokens, each variant in a fresh process."""
    print("\n## policy update at the real vocabulary, 256 new tokens (2 questions x 2G = 16 sequences)\n")
    print("| log-probs | peak memory of the policy update | at its start | above its start |\n|---|---|---|---|")
    for variant in ("plain", "chunked"):
        p = subprocess.run(
            [sys.executable, __file__, "--policy-peak", variant], capture_output=True, text=True, check=True
        )
        peak, before = map(float, p.stdout.split()[-2:])
        print(
            f"| {'all logits at once (before)' if variant == 'plain' else 'chunked head (ril.py)'} | {peak:.0f} MiB | "
            f"{before:.0f} MiB | {peak - before:.0f} MiB |"
        )


# ---------------------------------------------------------------- the memory plan (make memory)
# Published config.json values of each Hugging Face repo, built on the meta device by ril.plan: nothing is downloaded.
# (hidden, layers, intermediate, heads, KV heads, vocabulary, tied embeddings)
PUBLISHED = {
    "Qwen2-VL-2B": ("qwen2_vl", 1536, 28, 8960, 12, 2, 151936, True),
    "Qwen2-VL-7B": ("qwen2_vl", 3584, 28, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-VL-72B-Instruct": ("qwen2_5_vl", 8192, 80, 29568, 64, 8, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": ("qwen2", 5120, 64, 27648, 40, 8, 152064, False),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 3584, 28, 18944, 28, 4, 152064, False),
}
# The README's real-model commands: (GPUs, the GPU they are planned for, ril.py flags)
PAPER_LRS = "--lr 1e-6 --disc-lr 1e-6 --disc-pretrain-lr 1e-5"
DATA = "--data train.jsonl --eval-data val.jsonl --sft-steps 0 --max-new-tokens 256 --dtype amp"
README_COMMANDS = [
    (
        1,
        "one 80 GB GPU",
        f"--student Qwen2-VL-2B --judge Qwen/Qwen2.5-7B-Instruct {DATA} --batch-size 8 --micro-batch 8 "
        f"--grad-checkpointing --freeze-vision {PAPER_LRS} --out runs/qwen2vl2b",
    ),
    (
        8,
        "8 x 80 GB GPUs",
        f"--student Qwen2-VL-2B --judge Qwen/Qwen2.5-32B-Instruct {DATA} --batch-size 64 --gen-batch 16 "
        f"--micro-batch 8 --grad-checkpointing --freeze-vision --shard {PAPER_LRS} --out runs/8gpu",
    ),
]
# Two more: a 7B student on 8 GPUs, and the paper's teacher model and judge on one GPU, which ril.py refuses
MORE_COMMANDS = [
    (
        8,
        "8 x 80 GB GPUs, a 7B student",
        f"--student Qwen2-VL-7B --judge Qwen/Qwen2.5-7B-Instruct {DATA} --batch-size 64 --micro-batch 8 "
        f"--grad-checkpointing --freeze-vision --shard {PAPER_LRS} --out runs/8gpu",
    ),
    (
        1,
        "one 80 GB GPU, the paper's teacher model and judge (refused)",
        f"--student Qwen2-VL-2B --teachers a,Qwen/Qwen2.5-VL-72B-Instruct --judge Qwen/Qwen2.5-32B-Instruct {DATA} "
        f"--batch-size 8 --micro-batch 8 --grad-checkpointing --freeze-vision {PAPER_LRS} --out runs/qwen2vl2b",
    ),
]
GPU_FREE = 78 * 2**30  # what torch.cuda.mem_get_info reports free on an idle 80 GB H100


def published_config(name: str):
    """The config of a model in PUBLISHED, or of a local folder (AutoConfig)."""
    if name not in PUBLISHED:
        return transformers.AutoConfig.from_pretrained(name)
    kind, hidden, layers, inter, heads, kv, vocab, tied = PUBLISHED[name]
    text = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads)
    text.update(num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    if kind == "qwen2":
        return transformers.Qwen2Config(**text)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    if kind == "qwen2_vl":
        vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=hidden, mlp_ratio=4, patch_size=14)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def plan_command(flags: str, world: int) -> dict:
    """ril.plan of a ril.py command line, with the configs of its student, judge and teacher models."""
    a = ril.parse_args(flags.split())
    names = {"student": a.student, "judge": a.judge, **{t: t for t in a.teachers.split(",") if "/" in t}}
    configs = {k: published_config(v) for k, v in names.items() if v not in ("tiny", "match")}
    return ril.plan(a, configs, world)


def memory_table(commands=README_COMMANDS + MORE_COMMANDS):
    """make memory: each command's plan per GPU, phase by phase, as ril.py computes it before it loads anything (and
    refuses the command when a phase exceeds the GPU's free memory)."""
    print("# make memory: ril.plan per GPU (GiB), an estimate; ril.py refuses a phase above the GPU's free memory\n")
    for world, gpu, flags in commands:
        launch = f"torchrun --nproc_per_node {world} ril.py" if world > 1 else "python ril.py"
        print(f"## {gpu}: `{launch} {flags}`\n")
        print("| phase | parts (GiB) | total | fits |\n|---|---|---|---|")
        for phase, need in plan_command(flags, world).items():
            parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items() if v)
            total = sum(need.values())
            print(f"| {phase} | {parts} | **{total / 2**30:.1f}** | {'yes' if total <= GPU_FREE else 'no'} |")
        print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--memory",
        nargs="?",
        const="",
        metavar="FLAGS",
        help="print the memory plan of the README's real-model commands (make memory), or of FLAGS: ril.py's flags "
        "in one string, with --world N for torchrun's processes",
    )
    p.add_argument("--world", type=int, default=1, help="with --memory FLAGS: the number of torchrun processes")
    p.add_argument(
        "--policy-peak",
        metavar="VARIANT",
        choices=("plain", "chunked"),
        help="print the policy update's peak and starting memory (MiB) with plain or chunked log-probs, then "
        "exit: the bench runs each variant in a fresh process this way",
    )
    a = p.parse_args(argv)
    if a.policy_peak:
        print(*policy_peak(a.policy_peak))
    elif a.memory is not None:
        memory_table([(a.world, f"{a.world} GPU(s)", a.memory)] if a.memory else README_COMMANDS + MORE_COMMANDS)
    else:
        run_bench()
        run_sft_bench()
        run_policy_peaks()


if __name__ == "__main__":
    main()
