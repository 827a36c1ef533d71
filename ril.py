"""
ril.py: RIL, "Unified Reinforcement and Imitation Learning for Vision-Language Models"
(Lee et al., NeurIPS 2025, arXiv 2510.19307), the whole method in one readable file.

A small student VLM answers image questions. For each question it samples G answers, and we take G
answers written by one or more large teacher VLMs (only their *text*: any tokenizer or model family
can teach; this is black-box distillation). A discriminator D, a copy of the student's language model
with a 1-unit head, learns to tell student text (label 1) from teacher text (label 0). All 2G answers
are rewarded with r_sim = 1[D < 0.5] ("sounds like a teacher") plus r_ans (the answer is right), and
the student takes a clipped policy-gradient step in the Dr.GRPO form over all 2G answers: advantage =
reward minus group mean (no std), no per-answer length normalisation, k3 KL to the SFT reference.
Teacher texts therefore get a likelihood push under the student ("imitation"), student samples get
an RL push ("reinforcement"), in one objective.

Usage
    python ril.py                                    # tiny Qwen2-VL + built-in toy task; CPU, ~1-2 min
    python ril.py --algo dr_grpo                     # Table 1 baselines: answer reward only, G student samples
    python ril.py --algo grpo                        #   ... with std-scaled advantages and length normalisation
    python ril.py --student Qwen2-VL-2B --teachers a,Qwen/Qwen2.5-VL-72B-Instruct --judge Qwen/Qwen2.5-32B-Instruct \\
                  --data train.jsonl --eval-data val.jsonl --sft-steps 0 --lr 1e-6 --disc-lr 1e-6 --max-new-tokens 256 \\
                  --micro-batch 4 --grad-checkpointing --freeze-vision --offload   # README "Memory"
    torchrun --nproc_per_node 8 ril.py ... [--shard] # several GPUs: DDP, or FSDP2 with --shard
    python ril.py --out runs/ril --plot              # redraw metrics.png of a run
    python ril.py --save-tiny DIR                    # write the tiny student as a Hugging Face folder

Data: JSONL, one question per line, image paths relative to the JSONL file's folder:
    {"id": "q1", "image": "img/q1.png", "question": "...", "answer": "...",
     "teachers": {"a": ["text", ...], "b": ["text", ...]}}

Stages: SFT warm-up (ground-truth answers with a share of teacher texts) -> discriminator
pre-training -> held-out evaluation -> RIL loop (Alg. 2) -> held-out evaluation -> save_pretrained.

Left out on purpose (go to TRL's GRPOTrainer or verl for these): vLLM rollouts, DeepSpeed, LoRA,
quantisation, video, multi-turn. r_ans is a normalised matcher unless --judge names a judge model.
Labels in comments: [P] the paper says so; [R] our reading where the paper is silent (see
RIL_PAPER.md section 6). Requires torch and transformers >= 5 (tested with 5.23), pillow, tqdm.
"""
import ast
import argparse
import contextlib
import copy
import hashlib
import dataclasses
import functools
import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# ================================================================================================
# 1. Config
# ================================================================================================
@dataclass
class Args:
    # --- what to train, on what
    student: str = "tiny"
    """student VLM: 'tiny' (built in this file), an alias such as Qwen2-VL-2B, a Hugging Face id, or a local folder"""
    teachers: str = ""
    """comma-separated teachers: a name in the rows' "teachers" field, or a model (local folder or Hugging Face id) whose
    answers are generated once and cached in --out/teacher_cache; empty = every teacher in the data"""
    teacher_samples: int = 4
    """answers generated per question by each model teacher (the paper's sampling settings below)"""
    judge: str = "match"
    """r_ans: 'match' (normalised whole-word answer match) or a model (folder or id) prompted as the paper's Fig. 4 judge"""
    judge_max_new_tokens: int = 128
    """tokens the judge model may write (its explanation, then <answer>0|1</answer>)"""
    data: str = "toy"
    """'toy' (built-in shapes task drawn with Pillow) or a JSONL file (format in the header)"""
    eval_data: str = ""
    """held-out JSONL; empty = hold out --eval-size rows of --data"""
    eval_size: int = 120
    """held-out questions (toy split size, or rows taken from --data when --eval-data is empty)"""
    toy_size: int = 600
    """training questions in the toy task"""
    algo: str = "ril"
    """ril | dr_grpo | grpo (paper Table 1 rows; the baselines use r_ans only and no teacher texts)"""
    out: str = "runs/ril"
    """output folder: the trained student (save_pretrained), discriminator.pt, metrics.jsonl"""
    seed: int = 0
    """seeds the toy data, the model init, the data order and the sampling"""
    device: str = "auto"
    """auto | cpu | cuda"""
    dtype: str = "auto"
    """auto (amp on cuda, fp32 on cpu) | fp32 | amp (fp32 weights, bf16 autocast) | bf16 (bf16 weights and AdamW moments)"""
    save_tiny: str = ""
    """write the tiny student (model + processor) to this folder and exit; the tests load it back"""
    tiny_hidden: int = 64
    """tiny student: hidden size (measured here: 64 trains the toy task in about a minute on 2 cores)"""
    tiny_layers: int = 2
    """tiny student: decoder layers"""
    # --- RIL (paper values where it gives them)
    G: int = 4
    """student samples per question; RIL adds G teacher texts, so a group is 2G [P] App. C"""
    eps: float = 0.2
    """clip range of the ratio [P] §4.2"""
    beta: float = 0.01
    """KL weight to the reference (SFT) policy [P] Table 5b; 0 = no reference model is built"""
    mu: int = 1
    """policy iterations per batch [P] App. C, Table 5a"""
    score_before_update: bool = False
    """score texts with D's logits from its update forward (one forward less, not the paper's order)"""
    sim_threshold: float = 0.5
    """r_sim = 1[D < threshold] [P] §3.3"""
    sim_reward: str = "binary"
    """binary [P] | continuous (1 - D; the Fig. 6 ablation)"""
    temperature: float = 1.0
    """sampling temperature [P] App. C"""
    top_p: float = 0.95
    """[P] App. C"""
    top_k: int = 50
    """[P] App. C"""
    repetition_penalty: float = 1.05
    """[P] App. C"""
    # --- budget (the paper gives none of these for a tiny task; values measured on the toy task)
    steps: int = 200
    """RIL steps (one batch of questions each)"""
    batch_size: int = 16
    """questions per step; the paper's "144" [P] is likely questions per optimiser step [R]"""
    max_new_tokens: int = 16
    """generation cap; also the Dr.GRPO constant normaliser L_max (the paper does not give one)"""
    lr: float = 1e-3
    """student LR in the RIL loop (paper: 1e-6 constant for 3-8B models)"""
    disc_lr: float = 2e-4
    """discriminator LR in the RIL loop (paper: 1e-6 constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping for student and discriminator [R] (GAD clips at 0.2)"""
    sft_steps: int = 300
    """SFT warm-up steps (0 = skip, for a checkpoint that is already SFT'd)"""
    sft_batch_size: int = 32
    """questions per SFT step"""
    sft_teacher_frac: float = 0.2
    """share of SFT targets that are teacher texts; the rest are the rows' ground-truth answers (1 = teacher texts only)"""
    sft_lr: float = 3e-3
    """SFT peak LR, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)"""
    disc_pretrain_steps: int = 40
    """discriminator pre-training steps (student samples vs teacher texts)"""
    disc_pretrain_lr: float = 1e-3
    """discriminator pre-training peak LR, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)"""
    # --- images
    min_pixels: int = 56 * 56
    """image processor lower bound (tiny student only; a pretrained processor keeps its own)"""
    max_pixels: int = 112 * 112
    """image processor upper bound, tiny student only: caps image tokens instead of truncating prompts (PEERS §4.1b)"""
    # --- memory (for real model sizes; README "Memory")
    grad_checkpointing: bool = False
    """recompute activations in the backward pass (non-reentrant), for the student and the discriminator"""
    freeze_vision: bool = False
    """train the language model only: the vision tower gets no gradients and no AdamW moments"""
    micro_batch: int = 0
    """sequences per forward/backward in the policy, reference and discriminator passes (0 = all at once)"""
    offload: bool = False
    """keep the reference, the discriminator (with its AdamW moments) and the judge on the CPU while they are not in use"""
    shard: bool = False
    """under torchrun: split the parameters, gradients and AdamW moments of the student, the reference and the
    discriminator across ranks (FSDP2); without it each rank holds full copies (DDP)"""
    # --- checkpoints and safety
    save_every: int = 50
    """checkpoint every N RIL steps into --out/checkpoints (Ctrl-C and SIGTERM also save one)"""
    keep_last: int = 2
    """checkpoints kept; older ones are deleted once a newer one is complete"""
    resume: bool = False
    """continue from the newest complete checkpoint in --out, with its arguments (only --steps may change)"""
    overwrite: bool = False
    """start afresh in an --out that holds checkpoints (they are deleted)"""
    max_bad_steps: int = 3
    """stop after this many steps in a row whose loss or gradient is NaN/inf (each one is skipped)"""
    max_image_pixels: int = 40_000_000
    """refuse images larger than this (a decompression bomb must not exhaust memory)"""
    trust_remote_code: bool = False
    """allow a model folder's own Python code to run (off: only transformers' classes are used)"""
    # --- logging
    eval_every: int = 50
    """evaluate on the held-out split every N RIL steps (0 = only before and after); greedy, so it draws no random numbers"""
    dump_every: int = 20
    """print one group (texts, r_sim, r_ans, D) every N steps (0 = never)"""
    plot: bool = False
    """draw --out/metrics.png from --out/metrics.jsonl and exit (every run also draws it at its end)"""


def parse_args(argv=None) -> Args:
    """Turn Args into argparse flags; the docstring under each field becomes its --help text."""
    tree = ast.parse(inspect.getsource(Args))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        kind = {"action": "store_true"} if f.type is bool else {"type": f.type}
        p.add_argument("--" + f.name.replace("_", "-"), **kind, default=f.default, help=f"{docs.get(f.name, '')} (default: {f.default})")
    return Args(**vars(p.parse_args(argv)))


def fail(msg: str):
    """User mistakes get one actionable line and exit code 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_args(a: Args):
    if a.algo not in ("ril", "dr_grpo", "grpo"):
        fail(f"--algo {a.algo}: choose ril, dr_grpo or grpo")
    if a.dtype not in ("auto", "fp32", "amp", "bf16"):
        fail(f"--dtype {a.dtype}: choose auto, fp32, amp or bf16")
    if a.sim_reward not in ("binary", "continuous"):
        fail(f"--sim-reward {a.sim_reward}: choose binary or continuous")
    for name, ok in [("G", a.G >= 2), ("eps", a.eps > 0), ("beta", a.beta >= 0), ("mu", a.mu >= 1),
                     ("steps", a.steps >= 0), ("sft-steps", a.sft_steps >= 0), ("batch-size", a.batch_size >= 1),
                     ("sft-batch-size", a.sft_batch_size >= 1), ("sft-teacher-frac", 0 <= a.sft_teacher_frac <= 1),
                     ("max-new-tokens", a.max_new_tokens >= 1), ("lr", a.lr >= 0), ("disc-lr", a.disc_lr >= 0),
                     ("temperature", a.temperature > 0), ("top-p", 0 < a.top_p <= 1), ("eval-size", a.eval_size >= 1),
                     ("sim-threshold", 0 < a.sim_threshold < 1), ("save-every", a.save_every >= 0),
                     ("keep-last", a.keep_last >= 1), ("max-bad-steps", a.max_bad_steps >= 1),
                     ("teacher-samples", a.teacher_samples >= 1), ("micro-batch", a.micro_batch >= 0),
                     ("judge-max-new-tokens", a.judge_max_new_tokens >= 1)]:
        if not ok:
            fail(f"--{name} {getattr(a, name.replace('-', '_'))} is impossible; see python ril.py --help")


# ================================================================================================
# 2. Data: the built-in toy task and the JSONL format
# ================================================================================================
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Two teachers, always correct, in two distinct styles, so imitation has something to learn and the
# discriminator has something to see. Both give the answer first, then a phrase of their own (many
# large VLMs answer this way), so the one word that depends on the image sits where the SFT'd student
# already puts it, and imitation changes the framing around it. Two phrasings per teacher and kind.
TOY_TEACHERS = {
    "alice": {"color": ["{a}. That is the color of the shape.", "{a}. The shape has this color."],
              "shape": ["{a}. That is the shape in the picture.", "{a}. The picture shows this shape."],
              "count": ["{a}. That is how many shapes there are.", "{a}. I counted every shape."]},
    "bob": {"color": ["{a}, clearly.", "{a} is my answer."],
            "shape": ["{a}, clearly.", "{a} is my answer."],
            "count": ["{a}, clearly.", "{a} is my answer."]},
}
TOY_QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is in the image?",
                 "count": "How many shapes are there?"}


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box, color):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_toy(n: int, seed: int) -> list:
    """The built-in task: 56x56 images (4 image tokens after 2x2 merging), three question kinds.

    >>> make_toy(1, 0)[0]["question"], make_toy(1, 0)[0]["answer"]
    ('What color is the shape?', 'yellow')
    """
    rng, rows = random.Random(seed), []
    for i in range(n):
        kind = ("color", "shape", "count")[i % 3]
        img = Image.new("RGB", (56, 56), (255, 255, 255))
        d = ImageDraw.Draw(img)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if kind == "count":  # 1-4 small shapes, one per 28x28 quadrant, so each image token sees one
            k = rng.randint(1, 4)
            for q in rng.sample(range(4), k):
                ox, oy, s = 28 * (q % 2) + rng.randint(2, 6), 28 * (q // 2) + rng.randint(2, 6), rng.randint(14, 20)
                draw_shape(d, rng.choice(SHAPES), (ox, oy, ox + s, oy + s), COLORS[rng.choice(list(COLORS))])
            answer = str(k)
        else:
            s = rng.randint(40, 48)  # big and near the centre: each quadrant token sees a corner
            ox, oy = (56 - s) // 2 + rng.randint(-2, 2), (56 - s) // 2 + rng.randint(-2, 2)
            draw_shape(d, shape, (ox, oy, ox + s, oy + s), COLORS[color])
            answer = color if kind == "color" else shape
        teachers = {t: [p.format(a=answer) for p in styles[kind]] for t, styles in TOY_TEACHERS.items()}
        rows.append(dict(id=f"toy{seed}-{i}", image=img, question=TOY_QUESTIONS[kind], answer=answer,
                         teachers=teachers, where=f"toy row {i}"))
    return rows


def load_jsonl(path: str, max_pixels: int) -> list:
    """Read the JSONL format and check every row and image before any training starts; every problem
    is reported as file:line with the fix."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file; --data takes 'toy' or a JSONL file")
    base, rows = os.path.dirname(os.path.abspath(path)), []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path}:{n}: not UTF-8 (byte {e.start}); re-save the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: invalid JSON ({e.msg}); each line must be one JSON object")
            if not isinstance(row, dict):
                fail(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in ("image", "question", "answer") if k not in row]
            if missing:
                fail(f"{path}:{n}: missing field(s) {', '.join(missing)}; each row needs image, question, answer")
            image = row["image"] if os.path.isabs(row["image"]) else os.path.join(base, row["image"])
            check_image(image, f"{path}:{n}", max_pixels)
            teachers = row.get("teachers", {})
            if not isinstance(teachers, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v)
                                                         for v in teachers.values()):
                fail(f'{path}:{n}: "teachers" must map a teacher name to a list of texts')
            rows.append(dict(id=str(row.get("id", n)), image=image, question=str(row["question"]),
                             answer=str(row["answer"]), teachers=teachers, where=f"{path}:{n}"))
    if not rows:
        fail(f"{path}: no rows; the file is empty")
    return rows


def check_image(image: str, where: str, max_pixels: int):
    """Exists, is small enough (read from the header, before any pixel is decoded) and decodes."""
    if not os.path.isfile(image):
        fail(f"{where}: image not found: {image} (paths are relative to the JSONL file's folder)")
    try:
        with Image.open(image) as im:
            w, h = im.size
            if w * h > max_pixels:
                fail(f"{where}: image {image} is {w}x{h} pixels, over --max-image-pixels {max_pixels}; resize it")
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        fail(f"{where}: cannot decode image {image} ({str(e).splitlines()[0][:80]}); replace it or drop the row")


def load_data(a: Args):
    """Returns (train_rows, eval_rows)."""
    if a.data == "toy":
        return make_toy(a.toy_size, a.seed), make_toy(a.eval_size, a.seed + 10_000)
    Image.MAX_IMAGE_PIXELS = None  # check_image reads each size from the header and says which file
    rows = load_jsonl(a.data, a.max_image_pixels)
    held = load_jsonl(a.eval_data, a.max_image_pixels) if a.eval_data else None
    Image.MAX_IMAGE_PIXELS = a.max_image_pixels  # then Pillow's own bomb check, with our limit
    seen = {}
    for r in rows + (held or []):  # ids key the teacher cache and the logs
        if seen.setdefault(r["id"], r["where"]) != r["where"]:
            fail(f"{r['where']}: id '{r['id']}' is also the id of {seen[r['id']]}; ids must be unique")
    if held is not None:
        return rows, held
    if len(rows) <= a.eval_size:
        fail(f"{a.data}: {len(rows)} rows cannot spare --eval-size {a.eval_size} held-out rows; lower it or pass --eval-data")
    rows = random.Random(a.seed).sample(rows, len(rows))
    return rows[a.eval_size:], rows[:a.eval_size]


def resolve_teachers(a: Args, rows: list) -> tuple:
    """Returns (names, models): every teacher, and the ones among them that are models (a --teachers
    entry that is not a name in the rows' "teachers" field). Data teachers are checked here, before
    anything is written; model teachers get their texts from model_teacher_texts."""
    in_data = sorted({t for r in rows for t in r["teachers"]})
    names = [t for t in a.teachers.split(",") if t] or in_data
    models = [t for t in names if t not in in_data]
    for t in models:
        if not (t in ALIASES or "/" in t or os.path.isdir(t)):  # a path or an id; it is loaded only without a cache
            fail(f"--teachers {t}: not a teacher in {a.data} (it has: {', '.join(in_data) or 'none'}) and not a model "
                 f"folder or Hugging Face id; fix the name or the path")
    if a.algo == "ril" or (a.sft_steps > 0 and a.sft_teacher_frac > 0):
        if not names:
            fail(f"{a.data}: no teacher texts in the data; RIL needs a 'teachers' field in the rows or a teacher model "
                 f"in --teachers (the baselines can run with --sft-teacher-frac 0)")
        for i, t in enumerate(names):
            k = len(range(i, a.G, len(names)))  # group slots this teacher fills (sample_teacher_texts)
            if t in models:
                if a.teacher_samples < k and a.algo == "ril":
                    print(f"warning: --teacher-samples {a.teacher_samples} < {k} slots of teacher '{t}'; its texts are "
                          f"reused within a group", file=sys.stderr)
                continue
            lacking = [r for r in rows if not r["teachers"].get(t)]
            if lacking:
                fail(f"{lacking[0]['where']}: teacher '{t}' has no texts for {len(lacking)} row(s); "
                     f"add them or drop '{t}' from --teachers")
            short = [r for r in rows if len(r["teachers"][t]) < k]
            if short and a.algo == "ril":
                print(f"warning: teacher '{t}' has fewer than {k} texts for {len(short)} row(s) (first: "
                      f"{short[0]['where']}); their texts are reused within a group", file=sys.stderr)
    return names, models


def load_image(row) -> Image.Image:
    return row["image"] if isinstance(row["image"], Image.Image) else Image.open(row["image"]).convert("RGB")


def batch_at(rows: list, step: int, B: int, seed: int) -> list:
    """The B questions of `step`: epoch-wise shuffles, a pure function of (seed, step), so a resumed
    run sees exactly the questions the uninterrupted run would have (PEERS §4.4)."""
    n = len(rows)
    return [rows[epoch_order(seed, i // n, n)[i % n]] for i in range(step * B, step * B + B)]


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> list:
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def sample_teacher_texts(row, teachers: list, G: int, rng: random.Random) -> list:
    """G teacher texts for one question. [R] The paper does not say how the G slots are split
    between teachers (RIL_PAPER §6.5): slot i goes to teacher i mod T (2 + 2 for two teachers). A
    teacher's texts are drawn without replacement, or with replacement if it has too few."""
    out = []
    for i, t in enumerate(teachers):
        texts, k = row["teachers"][t], len(range(i, G, len(teachers)))  # slots i, i+T, ... -> teacher i
        out += rng.sample(texts, k) if k <= len(texts) else [rng.choice(texts) for _ in range(k)]
    return out


# ================================================================================================
# 3. Models: the student (tiny or pretrained), the reference, the discriminator
# ================================================================================================
ALIASES = {"Qwen2-VL-2B": "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-7B": "Qwen/Qwen2-VL-7B-Instruct",
           "Qwen2.5-VL-3B": "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B": "Qwen/Qwen2.5-VL-7B-Instruct"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# The Qwen2-VL chat format, cut down: a string or a list of {"type": "image"|"text"} parts per turn.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor  # noqa: E402


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video half: the stock one cannot be built without torchvision
    (OFFLINE_NOTES §2c). Used for the tiny student and as a fallback when AutoProcessor fails."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)


def tiny_tokenizer(corpus: list, specials: list = SPECIALS, chat_template: str = TINY_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (600 entries) trained in-process on the task's own texts, so that words
    are single tokens. Qwen's special tokens; pad != eos, as in real Qwen. The tests reuse it for other
    families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder, tok.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:],
        padding_side="left", model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_text_config(a: Args, tokenizer, mrope: bool = True) -> dict:
    h, heads = a.tiny_hidden, 4
    half = h // heads // 2  # M-RoPE sections (t, h, w) must add up to head_dim / 2
    rope = {"rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}} if mrope else {}
    return dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=a.tiny_layers,
                num_attention_heads=heads, num_key_value_heads=2, rope_theta=1e4, **rope, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"))


def build_tiny(a: Args, corpus: list):
    """A random tiny Qwen2-VL (hidden --tiny-hidden, --tiny-layers layers, a 1-block vision tower) with
    the in-process tokenizer: a 64-wide model learns the toy task in a minute on a CPU."""
    tokenizer = tiny_tokenizer(corpus)
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    h = a.tiny_hidden
    vision = dict(depth=1, embed_dim=h // 2, num_heads=2, hidden_size=h, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=tiny_text_config(a, tokenizer), vision_config=vision, tie_word_embeddings=True,
                                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|im_start|>"])
    return model, processor


def load_processor(path: str, trust_remote_code: bool = False):
    """AutoProcessor, or the image-only Qwen2-VL processor where AutoProcessor cannot be built
    (no torchvision) or silently returns a bare tokenizer (OFFLINE_NOTES §2c)."""
    try:
        proc = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(proc, "image_processor"):
            return proc
    except (OSError, ImportError, AttributeError, ValueError):
        pass
    return ImageOnlyQwen2VLProcessor.from_pretrained(path)


def load_vlm(name: str, a: Args, dtype, flag: str):
    """Any AutoModelForImageTextToText with a chat template, and its processor (left padding). Used for
    the student and for teacher models. Every failure is one line that names the model and the fix."""
    path = ALIASES.get(name, name)
    try:
        # Safe loading: weights from safetensors only (a pickle can run code), and a model folder's own
        # Python code only with --trust-remote-code.
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=a.trust_remote_code)
        processor = load_processor(path, a.trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        fix = ("weights are read from safetensors only; convert the checkpoint with save_pretrained" if "safetensors" in why
               else "it is not an image-text-to-text model that transformers knows" if "Unrecognized" in why
               else "give a local model folder, or a Hugging Face id that is downloaded or reachable")
        fail(f"{flag} {name}: cannot load '{path}' ({why}); {fix}")
    family, tok = type(model).__name__, processor.tokenizer
    if not (getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)):
        fail(f"{flag} {name}: {family} has no chat template, so prompts cannot be formatted; add chat_template.jinja to the folder")
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # generation needs some pad id; the student is checked more strictly below
        tok.pad_token = tok.eos_token
    return model, processor


def load_student(a: Args, corpus: list, device, dtype):
    """Returns (model, processor); the tokenizer pads on the left for batched generation."""
    if a.student == "tiny":
        model, processor = build_tiny(a, corpus)
    else:
        model, processor = load_vlm(a.student, a, dtype, "--student")
    tok = processor.tokenizer
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # pad == eos makes every mask drop EOS too, and the model never learns to stop (tiny-grpo's bug)
        fail(f"--student {a.student}: its tokenizer has no pad token distinct from EOS; set one in tokenizer_config.json")
    if language_model(model) is None:
        fail(f"--student {a.student}: {type(model).__name__} has no language model that the discriminator can copy")
    return model.to(device=device, dtype=dtype), processor


VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # the vision encoder's module name in the families we know


def memory_settings(model, a: Args):
    """--freeze-vision and --grad-checkpointing on the student (README "Memory")."""
    if a.freeze_vision:
        vision = [p for n, p in model.named_parameters() if set(n.split(".")) & set(VISION_TOWERS)]
        if not vision:
            fail(f"--freeze-vision: found no vision tower ({', '.join(VISION_TOWERS)}) in {type(model).__name__}")
        for p in vision:
            p.requires_grad_(False)
    if a.grad_checkpointing:
        checkpoint_activations(model)


def checkpoint_activations(model):
    """--grad-checkpointing: each decoder layer's activations are recomputed in the backward pass.
    Non-reentrant, the variant that works when the inputs need no gradient (a frozen vision tower)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def language_model(vlm):
    """The decoder stack without the LM head: model.language_model (Qwen2-VL, LLaVA, ...) or get_decoder()."""
    lm = getattr(getattr(vlm, "model", None), "language_model", None) or getattr(getattr(vlm, "model", None), "text_model", None)
    return lm if lm is not None else vlm.get_decoder()


def save_student(model, processor, folder: str, state_dict=None):
    """save_pretrained, loadable by plain transformers, written to a temporary folder and moved into
    place file by file, so a kill never leaves a half-written weight file. Our image-only processor is
    saved under the stock class name, so AutoProcessor builds the full one wherever torchvision exists."""
    tmp = os.path.join(folder, ".tmp_save")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:  # a gathered state dict names tied weights twice (lm_head = embed_tokens)
        first = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state_dict.pop(name, None)
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "processor_config.json")
    if isinstance(processor, ImageOnlyQwen2VLProcessor) and os.path.isfile(cfg_path):
        cfg = json.load(open(cfg_path))
        cfg["processor_class"] = "Qwen2VLProcessor"
        json.dump(cfg, open(cfg_path, "w"), indent=2)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)


class Discriminator(nn.Module):
    """D_phi [P] §3.1: the student's language model (same architecture, same initial weights: the
    paper's answer to the GAN "balance problem") with the LM head swapped for a d x 1 linear head,
    read at the last non-pad token. D(o) = sigmoid(logit) = P(student wrote o)."""

    def __init__(self, student):
        super().__init__()
        self.backbone = copy.deepcopy(language_model(student))
        p = next(self.backbone.parameters())
        self.head = nn.Linear(student.config.get_text_config().hidden_size, 1).to(p.device, p.dtype)

    def forward(self, input_ids, attention_mask):  # right-padded (N, T) -> logits (N,)
        # Every text sits in the same Fig. 3 prompt, so the tokens all rows share (k of them, ~45 of ~70
        # in the toy task) run once, and their keys and values serve every row: the same function and
        # gradients, with a fraction of the compute. Not with activation checkpointing, which turns the
        # cache off in training, nor under --shard: FSDP2 expects one call per layer in a forward.
        k = int((input_ids == input_ids[:1]).all(0).long().cumprod(0).sum())
        k = min(k, int(attention_mask.sum(1).min()) - 1)  # each row keeps at least its last token
        if k < 8 or SHARDED or getattr(self.backbone, "gradient_checkpointing", False):
            k, cache = 0, None
        else:
            cache = self.backbone(input_ids=input_ids[:1, :k], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(input_ids))
        h = self.backbone(input_ids=input_ids[:, k:], attention_mask=attention_mask, past_key_values=cache,
                          use_cache=False).last_hidden_state  # (N, T - k, d)
        last = attention_mask.sum(1) - 1 - k  # (N,) index of the last real token
        # a fresh tensor, not a view: FSDP2 hooks its backward onto the module's output
        return self.head(h[torch.arange(len(h), device=h.device), last]).squeeze(-1).float().clone()


# ================================================================================================
# 4. Batching: prompts with images, completions, masks
# ================================================================================================
def encode_prompts(processor, rows: list, device) -> dict:
    """Chat-formatted, left-padded prompts with their images. Never truncated: cutting a prompt cuts
    image tokens but not pixel_values, the most reported Qwen2-VL crash (PEERS §4.1b)."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}] for r in rows]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    enc = processor(text=texts, images=[load_image(r) for r in rows], padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def image_rows(enc: dict) -> torch.Tensor:
    """Offsets of each prompt's block of pixel_values rows, (N + 1,). Qwen2-VL's pixel_values is one
    flat (sum_i t*h*w, D) patch matrix (one image per prompt here); other families have one row per
    prompt."""
    n = len(enc["input_ids"])
    sizes = enc["image_grid_thw"].prod(-1) if "image_grid_thw" in enc else torch.ones(n, dtype=torch.long)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).tolist()


def repeat_prompts(enc: dict, n: int) -> dict:
    """Repeat every prompt n times in place: order q1,q1,..,q2,q2. pixel_values is repeated per image
    block, never tiled, which would give I1,I2,I1,I2 (R1-V's bug, PEERS §1)."""
    out = {k: v.repeat_interleave(n, 0) for k, v in enc.items() if k != "pixel_values"}
    if "pixel_values" in enc:
        off = image_rows(enc)
        out["pixel_values"] = torch.cat([enc["pixel_values"][i:j] for i, j in zip(off, off[1:]) for _ in range(n)])
    return out


def slice_prompts(enc: dict, start: int, stop: int) -> dict:
    """Prompts start..stop-1 of enc, with their pixel rows (a micro-batch)."""
    out = {k: v[start:stop] for k, v in enc.items() if k != "pixel_values"}
    if "pixel_values" in enc:
        off = image_rows(enc)
        out["pixel_values"] = enc["pixel_values"][off[start]:off[stop]]
    return out


def completion_mask(ids: torch.Tensor, eos_ids: list) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after. EOS stays in: it is how the model learns to stop.

    >>> completion_mask(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), [2])
    tensor([[1, 1, 0, 0],
            [1, 1, 1, 1]])
    """
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def pad_right(seqs: list, pad_id: int, device) -> tuple:
    """list of token-id lists -> ids (N, T), mask (N, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


class TextTokens:
    """Teacher texts re-tokenised by the *student* tokenizer (only text crosses over [P]) + EOS,
    cut to max_new_tokens so the Dr.GRPO normaliser stays an upper bound. Cached: teacher texts
    repeat every epoch."""

    def __init__(self, tokenizer, eos_id: int, max_len: int):
        self.tok, self.eos, self.max_len, self.cache, self.cut = tokenizer, eos_id, max_len, {}, 0

    def __call__(self, text: str) -> list:
        if text not in self.cache:
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]
            self.cut += len(ids) > self.max_len
            self.cache[text] = ids[:self.max_len]
        return self.cache[text]


# ================================================================================================
# 5. Rollouts and log-probs
# ================================================================================================
def vision_token_ids(model) -> list:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index")
    return sorted({getattr(model.config, n) for n in names if isinstance(getattr(model.config, n, None), int)})


def generation_config(a: Args, model, tokenizer, greedy: bool) -> transformers.GenerationConfig:
    sampling = {} if greedy else dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                      repetition_penalty=a.repetition_penalty)
    return transformers.GenerationConfig(
        do_sample=not greedy, max_new_tokens=a.max_new_tokens, **sampling,
        # A policy that samples <|image_pad|> crashes the next forward ("Image features and image
        # tokens do not match", PEERS §4.1a): vision placeholders are never allowed in a completion.
        suppress_tokens=vision_token_ids(model),
        eos_token_id=eos_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)


def eos_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tokenizer.eos_token_id})


@torch.no_grad()
def generate(model, enc: dict, gen_cfg, output_logits: bool = False):
    """One batched generate for every prompt in enc. Returns completion ids (N, T) with pad after the
    first EOS, their mask (N, T) and, if asked, generate's raw logits (N, T, V)."""
    # synced_gpus: a sharded model's forward is collective, so ranks keep stepping until all are done
    out = model.generate(**enc, generation_config=gen_cfg, return_dict_in_generate=True, output_logits=output_logits,
                         synced_gpus=SHARDED)
    comp = out.sequences[:, enc["input_ids"].shape[1]:]  # (N, T)
    mask = completion_mask(comp, gen_cfg.eos_token_id)
    comp = comp.masked_fill(mask == 0, gen_cfg.pad_token_id)
    bad = torch.isin(comp, torch.tensor(gen_cfg.suppress_tokens or [-1], device=comp.device))
    assert not bad.any(), "a completion contains a vision placeholder token"
    logits = torch.stack(out.logits, 1) if output_logits else None
    return comp, mask, logits


def model_teacher_texts(spec: str, rows: list, a: Args, device, dtype):
    """A teacher that is a model: --teacher-samples answers per question, sampled with the paper's
    settings, generated once and cached in --out/teacher_cache (one JSON line per question id, keyed by
    the model and the sampling settings), then put in row["teachers"][spec]. A run that finds every
    question in the cache never loads the model; an interrupted generation resumes at the first
    question without a line. Only the text crosses over, so any family and tokenizer can teach [P]."""
    settings = {k: getattr(a, k) for k in ("teacher_samples", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")}
    tag = hashlib.sha1(json.dumps({"model": spec, **settings}, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(a.out, "teacher_cache", f"{re.sub(r'[^A-Za-z0-9.-]+', '_', spec).strip('_')}-{tag}.jsonl")
    cache, lines = {}, open(path).readlines() if os.path.isfile(path) else []
    for line in lines:
        try:
            entry = json.loads(line)
            cache[entry["id"]] = entry["texts"]
        except (json.JSONDecodeError, KeyError, TypeError):  # the line a kill cut short
            pass
    if len(cache) < len(lines):  # drop it, so that appending starts on a fresh line
        replace_atomic(path, lambda tmp: open(tmp, "w").writelines(json.dumps({"id": k, "texts": v}) + "\n" for k, v in cache.items()))
    todo, n = [r for r in rows if r["id"] not in cache], a.teacher_samples
    if todo:
        model, processor = load_vlm(spec, a, dtype, "--teachers")
        model.to(device).eval()
        gen_cfg = generation_config(a, model, processor.tokenizer, greedy=False)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(a.seed + len(cache))  # the student's random stream does not depend on the cache
            for i in tqdm(range(0, len(todo), a.batch_size), desc=f"teacher {spec}"):
                batch = todo[i:i + a.batch_size]
                comp, _, _ = generate(model, repeat_prompts(encode_prompts(processor, batch, device), n), gen_cfg)
                texts = [t.strip() for t in processor.tokenizer.batch_decode(comp, skip_special_tokens=True)]
                for j, r in enumerate(batch):
                    cache[r["id"]] = texts[j * n:(j + 1) * n]
                    f.write(json.dumps({"id": r["id"], "texts": cache[r["id"]]}) + "\n")
                f.flush()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["teachers"][spec] = cache[r["id"]]
    print(f"teacher {spec}: {len(rows) - len(todo)} question(s) read from {path}, {len(todo)} generated")


def token_logprobs(model, enc: dict, comp: torch.Tensor, comp_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, (N, T). enc holds N left-padded prompts.
    No position_ids: Qwen2-VL builds its 3-D M-RoPE positions itself, 1-D ones corrupt the logits
    silently (PEERS §6). Logits are divided by the sampling temperature, so these are the log-probs of
    the distribution that was sampled (TRL does the same)."""
    T = comp.shape[1]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    for k in ("mm_token_type_ids", "token_type_ids"):  # per-token types (transformers >= 5 wants them with images): 0 = text
        if k in enc:
            extra[k] = torch.cat([enc[k], torch.zeros_like(comp)], 1)
    logits = model(input_ids=torch.cat([enc["input_ids"], comp], 1),
                   attention_mask=torch.cat([enc["attention_mask"], comp_mask], 1),
                   logits_to_keep=T + 1, **extra).logits[:, :-1]  # (N, T, V): position P-1+t predicts o_t
    logits = logits.float() / temperature
    return logits.gather(-1, comp[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (N, T)


# ================================================================================================
# 6. Discriminator: the Fig. 3 prompt, scoring, one BCE update (Eq. 1)
# ================================================================================================
DISC_SYSTEM = ("You are a discriminator. Given a response in <response></response>, "
               "say whether a teacher model (0) or a student model (1) wrote it.")
DISC_USER = "<response>{response}</response>\nTeacher (0) or student (1)?"


def disc_inputs(tokenizer, texts: list, device) -> tuple:
    """Fig. 3 [P]: only the response is shown, no question and no image (RIL_PAPER §6.2). Student
    samples are decoded and re-encoded exactly like teacher texts, so D cannot tell them apart by
    tokenisation artefacts, only by what they say. Right-padded (N, T) ids and mask. Token ids are
    cached per text: teacher texts come back every epoch."""
    cache = tokenizer.__dict__.setdefault("_disc_ids", {})
    if len(cache) > 200_000:
        cache.clear()
    for t in texts:
        if t not in cache:
            prompt = tokenizer.apply_chat_template(
                [{"role": "system", "content": DISC_SYSTEM}, {"role": "user", "content": DISC_USER.format(response=t)}],
                tokenize=False, add_generation_prompt=True)
            cache[t] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return pad_right([cache[t] for t in texts], tokenizer.pad_token_id, device)


@torch.no_grad()
def disc_logits(disc, tokenizer, texts: list, device, micro_batch: int = 0) -> torch.Tensor:
    return torch.cat([disc(*disc_inputs(tokenizer, texts[i:j], device)) for i, j in chunks(len(texts), micro_batch)])


def disc_update(disc, opt, tokenizer, texts: list, is_teacher: torch.Tensor, a: Args, device) -> tuple:
    """One step of Eq. 1: BCE with student = 1, teacher = 0. Returns (metrics, logits of the texts
    *before* the step, (N,)), so that scoring needs no second forward."""
    disc.train()
    order = torch.argsort(is_teacher, stable=True).tolist()  # students first, then teachers
    labels, n = 1.0 - is_teacher.float(), len(texts)  # (N,)
    logits, loss = torch.empty(n, device=device), 0.0
    opt.zero_grad(set_to_none=True)
    for i, j in chunks(n, a.micro_batch):  # gradient accumulation: the parts add up to the mean BCE
        idx = order[i:j]
        part_logits = disc(*disc_inputs(tokenizer, [texts[k] for k in idx], device))
        part = F.binary_cross_entropy_with_logits(part_logits, labels[idx]) * ((j - i) / n)
        part.backward()
        loss, logits[idx] = loss + part.detach(), part_logits.detach()
    grad_norm = full(torch.nn.utils.clip_grad_norm_(disc.parameters(), a.max_grad_norm))
    ok = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    right = ((logits > 0).float() == labels).float()
    return {"disc/loss": loss.item(), "disc/acc_student": right[labels == 1].mean().item(),
            "disc/acc_teacher": right[labels == 0].mean().item(), "guard/disc_skipped": float(not ok)}, logits


# ================================================================================================
# 7. Rewards: r_sim (discriminator), r_ans (answer match), R = r_sim + r_ans
# ================================================================================================
def normalize(text: str) -> list:
    """Lower-case words, punctuation dropped, number words as digits.

    >>> normalize("There are Three shapes!")
    ['there', 'are', '3', 'shapes']
    """
    return [NUMBER_WORDS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


STOPWORDS = {"a", "an", "the", "is", "it", "of", "in", "on", "and", "or", "to"}


def spans(words: list, n_max: int) -> set:
    return {tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}


def answer_vocab(rows: list) -> frozenset:
    """The short answers (1-3 words) of a dataset: the candidates a response may not list besides
    the right one."""
    return frozenset(t for r in rows if 1 <= len(t := tuple(normalize(r["answer"]))) <= 3 and t[0] not in STOPWORDS)


def answer_match(response: str, answer: str, candidates: frozenset = frozenset()) -> float:
    """r_ans without an LLM judge: 1 if the normalised answer is a whole-word span of the response and
    no *other* candidate answer is. [R] The paper's judge (Qwen2.5-32B, Fig. 4) is replaced by this
    matcher. Plain containment is gamed within 100 steps: the policy learns to list every answer
    ("3 count 4 4 4 4", measured on the toy task), so rival answers make the match fail.

    >>> c = frozenset({("3",), ("4",), ("red",)})
    >>> answer_match("I count three shapes.", "3", c), answer_match("3 or 4", "3", c), answer_match("Reddish.", "red", c)
    (1.0, 0.0, 0.0)
    """
    r, t = normalize(response), tuple(normalize(answer))
    found = spans(r, max(3, len(t)))
    if not t or t not in found:
        return 0.0
    rivals = (found & candidates) - spans(list(t), len(t))
    return float(not rivals)


class MatchJudge:
    """r_ans for a batch without a model (--judge match): answer_match against the dataset's answers."""
    unparsed = None

    def __init__(self, rows: list):
        self.candidates = answer_vocab(rows)

    def __call__(self, questions: list, answers: list, responses: list) -> list:
        return [answer_match(o, ans, self.candidates) for o, ans in zip(responses, answers)]


JUDGE_SYSTEM = ("You are an evaluation assistant. The question is in <question></question>, the ground truth in "
                "<ground truth></ground truth> and a model's response in <generated text></generated text>. Output 1 if "
                "the generated text fully and correctly captures the core point of the ground truth, and 0 if it is "
                "incorrect or irrelevant. Give a brief explanation, then the score wrapped in <answer></answer>.")
JUDGE_USER = ("<question>{question}</question>\n<ground truth>{answer}</ground truth>\n<generated text>{response}"
              "</generated text>\nDoes the generated text correctly capture the ground truth? Explain briefly, then give "
              "the score as <answer>1</answer> or <answer>0</answer>.")


class ModelJudge:
    """r_ans = LLM-as-a-judge [P] §3.1, Fig. 4: a frozen text LLM (the paper: Qwen2.5-32B) or VLM reads
    the question, the ground truth and the response, explains, then writes <answer>0|1</answer>. Greedy,
    batched; a verdict per (question, answer, response) is cached, since teacher texts come back every
    epoch. An unparseable verdict scores 0 and is counted (self.unparsed: share of the last call)."""

    def __init__(self, spec: str, a: Args, device, dtype):
        path = ALIASES.get(spec, spec)
        try:  # a text LLM, else a VLM used with text only
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=a.trust_remote_code)
            self.chat = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=a.trust_remote_code)
            self.chat.padding_side = "left"
            self.chat.pad_token = self.chat.pad_token or self.chat.eos_token
        except (OSError, ValueError, KeyError):
            self.model, self.chat = load_vlm(spec, a, dtype, "--judge")
        self.tok = getattr(self.chat, "tokenizer", self.chat)
        self.model.to(device).eval().requires_grad_(False)
        self.gen_cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=a.judge_max_new_tokens,
                                                     eos_token_id=eos_ids(self.model, self.tok), pad_token_id=self.tok.pad_token_id)
        self.device, self.offload, self.verdicts, self.unparsed = device, a.offload, {}, 0.0
        if a.offload:
            self.model.to("cpu")

    def prompt(self, question: str, answer: str, response: str) -> str:
        msgs = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_USER.format(question=question, answer=answer, response=response)}]
        return self.chat.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def complete(self, prompts: list) -> list:
        enc = self.tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
        out = self.model.generate(**enc, generation_config=self.gen_cfg)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, questions: list, answers: list, responses: list, bs: int = 32) -> list:
        keys = list(zip(questions, answers, responses))
        if len(self.verdicts) > 200_000:
            self.verdicts.clear()
        new = list(dict.fromkeys(k for k in keys if k not in self.verdicts))
        with resident(self.model, self.device, self.offload):
            for i in range(0, len(new), bs):
                for k, text in zip(new[i:i + bs], self.complete([self.prompt(*k) for k in new[i:i + bs]])):
                    found = re.findall(r"<answer>\s*([01])\s*</answer>", text)
                    self.verdicts[k] = float(found[-1]) if found else None  # the last verdict counts
        verdicts = [self.verdicts[k] for k in keys]
        self.unparsed = sum(v is None for v in verdicts) / max(len(verdicts), 1)
        return [v or 0.0 for v in verdicts]


def similarity_reward(d_logits: torch.Tensor, a: Args) -> torch.Tensor:
    """r_sim = 1[D < 0.5] [P] §3.3: 1 when D thinks a *teacher* wrote the text. Binary on purpose:
    the paper's Fig. 6 finds a continuous 1 - D worse (the policy exploits tiny gaps in D)."""
    d = torch.sigmoid(d_logits)
    return (d < a.sim_threshold).float() if a.sim_reward == "binary" else 1 - d


# ================================================================================================
# 8. Advantages and the clipped policy objective (Eq. 2, Dr.GRPO form)
# ================================================================================================
def group_advantages(rewards: torch.Tensor, group: int, scale_std: bool) -> torch.Tensor:
    """A_i = R_i - mean of its group [P] Eq. 2 (Dr.GRPO: no std division). scale_std=True is the
    GRPO baseline's A_i / (std + 1e-4).

    >>> group_advantages(torch.tensor([2., 0., 1., 1.]), 4, False)
    tensor([ 1., -1.,  0.,  0.])
    """
    r = rewards.view(-1, group)  # (B, group)
    adv = r - r.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.view(-1)


def policy_loss(logp, old_logp, ref_logp, adv, mask, a: Args, n_seqs: int = 0) -> tuple:
    """Eq. 2 at token level. All tensors (n, T) except adv (n,). The rows may be one micro-batch of a
    step with n_seqs sequences: the micro-batch losses then add up to the step's loss. Returns (loss,
    sums) with the clipped tokens, the summed KL and the token count, for the caller's averages.

    With mu = 1, old_logp = logp.detach(): the ratio is exactly 1, the clip never binds, and the loss
    *value* is ~0 because advantages are centred, while its gradient is not (the most-asked GRPO
    question, PEERS §1). Watch policy/grad_norm, not policy/loss."""
    mask, n_seqs = mask.float(), n_seqs or len(mask)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # clamp as verl does, so exp cannot overflow
    A = adv[:, None]
    surrogate = torch.min(ratio * A, ratio.clamp(1 - a.eps, 1 + a.eps) * A)  # (n, T)
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        # [R] k3 estimator of KL(pi || ref) per token (the paper names none; GRPO and TRL use k3)
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = surrogate - a.beta * kl
    if a.algo == "grpo":  # GRPO: mean over each answer's tokens, then over answers
        loss = -((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() * (len(mask) / n_seqs)
    else:
        # Dr.GRPO [R] (RIL_PAPER §6.6): loss = -sum_{i,t} mask_it * term_it / (N * L_max), with
        # N = sequences in the step and L_max = --max-new-tokens. A constant, so a long answer's tokens
        # weigh what a short answer's do (TRL's loss_type="dr_grpo" divides the same way; verl's
        # default divides by the batch's padded length, which varies).
        loss = -(per_token * mask).sum() / (n_seqs * a.max_new_tokens)
    clipped = ((ratio - 1).abs() > a.eps).float()
    return loss, {"clipped": (clipped * mask).sum().detach(), "kl": (kl * mask).sum().detach(), "tokens": mask.sum()}


def chunks(n: int, size: int) -> list:
    """(start, stop) pairs that cover range(n) in micro-batches of `size` (0 = one batch).

    >>> chunks(5, 2), chunks(5, 0)
    ([(0, 2), (2, 4), (4, 5)], [(0, 5)])
    """
    size = size or n
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@contextlib.contextmanager
def resident(module, device, offload: bool, opt=None):
    """--offload: the module (and its AdamW moments) sits on the GPU only inside the with-block and on
    the CPU outside it, so the reference, the discriminator and the judge do not all hold GPU memory
    while the student generates and trains."""
    if not offload or module is None or device.type == "cpu":
        yield
        return
    def move(to):
        module.to(to)
        for state in (opt.state.values() if opt is not None else []):
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":  # AdamW keeps its step counters on the CPU
                    state[k] = v.to(to)
    move(device)
    try:
        yield
    finally:
        move("cpu")
        torch.cuda.empty_cache()


# ================================================================================================
# 9. Evaluation
# ================================================================================================
@torch.no_grad()
def evaluate(model, processor, disc, rows: list, judge, a: Args, device, bs: int = 32) -> tuple:
    """Greedy answers on the held-out split. Returns (metrics, answers)."""
    model.eval()
    tok, gen_cfg = processor.tokenizer, generation_config(a, unwrap(model), processor.tokenizer, greedy=True)
    mine, texts, lengths = share(rows), [], []  # each rank answers and scores its share
    for i in range(0, len(mine), bs):
        comp, mask, _ = generate(unwrap(model), encode_prompts(processor, mine[i:i + bs], device), gen_cfg)
        texts += tok.batch_decode(comp, skip_special_tokens=True)
        lengths += mask.sum(1).tolist()
    scores = {"eval/acc": judge([r["question"] for r in mine], [r["answer"] for r in mine], texts),
              "eval/teacher_match": [float(norm_eq(t, r)) for t, r in zip(texts, mine)], "eval/len": lengths}
    if disc is not None:
        with resident(disc, device, a.offload):
            scores["eval/teacher_like"] = teacher_scores(disc, tok, texts, device)
    m = {k: sum(v) / len(v) for k, v in ((k, gather_lists(v)) for k, v in scores.items())}
    order = gather_lists(list(range(len(rows)))[RANK::WORLD])  # every rank gets every answer, in row order
    return m, [t for _, t in sorted(zip(order, gather_lists(texts)))]


def norm_eq(text: str, row) -> bool:
    """The answer is word for word one of the row's teacher texts (an exact imitation measure)."""
    return any(normalize(text) == normalize(t) for ts in row["teachers"].values() for t in ts)


def teacher_scores(disc, tokenizer, texts: list, device) -> list:
    """1 - D per text: how teacher-like D finds it."""
    return (1 - torch.sigmoid(disc_logits(disc, tokenizer, texts, device, micro_batch=64))).tolist()


def teacher_likeness(disc, tokenizer, texts: list, device) -> float:
    """mean(1 - D) over the texts."""
    return sum(teacher_scores(disc, tokenizer, texts, device)) / len(texts)


# ================================================================================================
# 10. Stages: SFT warm-up, discriminator pre-training, one RIL step
# ================================================================================================
def linear_decay(opt, total: int, floor: float = 0.1):
    """LR decayed linearly from its peak to floor x peak (the paper: 1e-5 -> 1e-6)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - (1 - floor) * min(s, total) / max(total, 1))


def sft_warmup(model, processor, rows, teachers, text_tokens, a: Args, device):
    """Stage 0 [P]: the paper starts RIL from a student SFT'd on its instruction data. Cross-entropy on
    one target per question, through the same forward as the policy update. [R] The target is the row's
    ground-truth answer, as in the paper's SFT set, or with probability --sft-teacher-frac a teacher
    text. Measured on the toy task: teacher texts alone make the student's style identical to the
    teachers' (D has nothing to see); answers alone make D perfect from the start, every student sample
    then gets a negative advantage and the student collapses into noise."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.sft_lr)
    sched = linear_decay(opt, a.sft_steps)
    model.train()
    for step in (bar := tqdm(range(a.sft_steps), desc="sft", leave=False, disable=RANK > 0)):
        batch = share(batch_at(rows, step, a.sft_batch_size, a.seed + 1))
        rng = random.Random(f"{a.seed}-sft-{step}")
        texts = [sample_teacher_texts(r, teachers, 1, rng)[0] if rng.random() < a.sft_teacher_frac else r["answer"] for r in batch]
        comp, mask = pad_right([text_tokens(t) for t in texts], processor.tokenizer.pad_token_id, device)
        logp = token_logprobs(model, encode_prompts(processor, batch, device), comp, mask, 1.0)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"sft: {a.sft_steps} steps, final loss {loss.item():.3f}" if a.sft_steps else "sft: skipped")


def clock(device) -> float:
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def policy_update(model, ref, opt, enc, comp, mask, adv, a: Args) -> dict:
    """mu optimiser steps of Eq. 2 on one batch of groups. enc: N prompts (already repeated per
    group member), comp/mask: (N, T) completions, adv: (N,)."""
    model.train()
    N, mb, T = len(comp), a.micro_batch, a.temperature

    def logprobs(m):  # no-grad log-probs of model m, micro-batch by micro-batch
        return torch.cat([token_logprobs(m, slice_prompts(enc, i, j), comp[i:j], mask[i:j], T) for i, j in chunks(N, mb)])

    old_logp = ref_logp = None
    t0 = clock(comp.device)
    with torch.no_grad():
        if a.mu > 1:  # with mu = 1 the old log-probs are the current ones, detached: no extra forward
            old_logp = logprobs(model)
        if ref is not None:
            with resident(ref, comp.device, a.offload):
                ref_logp = logprobs(ref)
    skipped, t_opt, t1 = 0.0, 0.0, clock(comp.device)
    for _ in range(a.mu):
        opt.zero_grad(set_to_none=True)
        loss, sums = 0.0, {}
        for i, j in chunks(N, mb):  # gradient accumulation: the micro-batch losses add up to Eq. 2
            logp = token_logprobs(model, slice_prompts(enc, i, j), comp[i:j], mask[i:j], T)  # (n, T)
            part, st = policy_loss(logp, logp.detach() if old_logp is None else old_logp[i:j],
                                   None if ref_logp is None else ref_logp[i:j], adv[i:j], mask[i:j], a, n_seqs=N)
            part.backward()
            loss, sums = loss + part.detach(), {k: sums.get(k, 0) + v for k, v in st.items()}
        grad_norm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm))
        t2 = clock(comp.device)
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            opt.step()
        else:  # non-finite guard: one NaN step would poison every weight and the Adam moments with it
            opt.zero_grad(set_to_none=True)
            skipped = 1.0
        t_opt += clock(comp.device) - t2
    opt.zero_grad(set_to_none=True)  # free the gradients before the discriminator's turn
    n_tok = sums["tokens"].clamp(min=1)
    return {"policy/loss": loss.item(), "policy/grad_norm": grad_norm.item(), "guard/skipped": skipped,
            "policy/clip_frac": (sums["clipped"] / n_tok).item(), "policy/kl": (sums["kl"] / n_tok).item(),
            "time/ref": t1 - t0, "time/optimizer": t_opt}


def rollout(model, processor, batch, teachers, text_tokens, a: Args, device, rng, with_teachers: bool) -> dict:
    """G student samples per question from one batched generate, plus G teacher texts per question.
    Group layout for question b: [G student samples, G teacher texts] (RIL) or [G samples] (baselines)."""
    tok = processor.tokenizer
    enc = encode_prompts(processor, batch, device)
    t0 = clock(device)
    model.eval()
    gen_cfg = generation_config(a, unwrap(model), tok, greedy=False)
    comp, mask, _ = generate(unwrap(model), repeat_prompts(enc, a.G), gen_cfg)
    t_gen = clock(device) - t0
    truncated = ~torch.isin(comp, torch.tensor(gen_cfg.eos_token_id, device=device)).any(1)  # hit the cap
    student_texts = tok.batch_decode(comp, skip_special_tokens=True)
    student_ids = [c[m.bool()].tolist() for c, m in zip(comp, mask)]
    seqs, texts, is_teacher, answers, questions = [], [], [], [], []
    for b, row in enumerate(batch):
        group = list(zip(student_ids[b * a.G:(b + 1) * a.G], student_texts[b * a.G:(b + 1) * a.G]))
        if with_teachers:
            group += [(text_tokens(t), t) for t in sample_teacher_texts(row, teachers, a.G, rng)]
        seqs += [s for s, _ in group]
        texts += [t for _, t in group]
        is_teacher += [0] * a.G + [1] * (len(group) - a.G)
        answers += [row["answer"]] * len(group)
        questions += [row["question"]] * len(group)
    ids, m = pad_right(seqs, tok.pad_token_id, device)
    return dict(enc=enc, comp=ids, mask=m, texts=texts, is_teacher=torch.tensor(is_teacher, device=device),
                answers=answers, questions=questions, truncated=truncated.float().mean().item(), t_gen=t_gen)


def pretrain_disc(disc, model, processor, rows, teachers, text_tokens, eval_rows, a: Args, device):
    """Stage 2 [P]: D learns student samples (1) vs teacher texts (0) before any policy update, so the
    first similarity rewards mean something. [R] Samples come from the SFT'd student, drawn fresh each
    step instead of cached (the paper caches N = 16 per question; same distribution)."""
    opt = torch.optim.AdamW(disc.parameters(), lr=a.disc_pretrain_lr)
    sched = linear_decay(opt, a.disc_pretrain_steps)
    for step in (bar := tqdm(range(a.disc_pretrain_steps), desc="disc pre-train", leave=False, disable=RANK > 0)):
        batch = share(batch_at(rows, step, a.batch_size, a.seed + 2))
        ro = rollout(model, processor, batch, teachers, text_tokens, a, device, random.Random(f"{a.seed}-d-{step}"), True)
        m, _ = disc_update(disc, opt, processor.tokenizer, ro["texts"], ro["is_teacher"], a, device)
        sched.step()
        bar.set_postfix(loss=f"{m['disc/loss']:.3f}")
    # held-out accuracy: sampled student answers vs teacher texts of questions D never saw
    held = share([r for r in eval_rows if all(r["teachers"].get(t) for t in teachers)][:32])
    if not held:
        print("disc pre-train: the held-out rows have no teacher texts; no held-out accuracy")
        return
    ro = rollout(model, processor, held, teachers, text_tokens, a, device, random.Random(a.seed), True)
    pred = disc_logits(disc, processor.tokenizer, ro["texts"], device) > 0
    acc = mean_over_ranks({"acc": (pred == (ro["is_teacher"] == 0)).float().mean().item()}, device)["acc"]
    print(f"disc pre-train: {a.disc_pretrain_steps} steps, held-out accuracy {acc:.3f} (student vs teacher texts)")


def ril_step(step, model, ref, disc, opt, d_opt, processor, batch, teachers, text_tokens, judge, a: Args, device) -> tuple:
    """One iteration of Alg. 2 [P] (or Alg. 1 for the baselines). Returns (metrics, dump)."""
    tok, ril = processor.tokenizer, a.algo == "ril"
    rng = random.Random(f"{a.seed}-ril-{step}")
    ro = rollout(model, processor, batch, teachers, text_tokens, a, device, rng, with_teachers=ril)
    group = 2 * a.G if ril else a.G
    metrics = {"time/generate": ro["t_gen"], "len/truncated_frac": ro["truncated"]}

    # (a) discriminator update on this step's texts: students 1, teachers 0 (Eq. 1, mu = 1), and
    t0 = clock(device)
    r_ans = torch.tensor(judge(ro["questions"], ro["answers"], ro["texts"]), device=device)
    if judge.unparsed is not None:
        metrics["judge/unparsed"] = judge.unparsed  # verdicts without <answer>0|1</answer>, scored 0
    if ril:
        with resident(disc, device, a.offload, d_opt):
            if a.disc_lr > 0:
                m, d_logits = disc_update(disc, d_opt, tok, ro["texts"], ro["is_teacher"], a, device)  # (B * 2G,)
                metrics.update(m)
            # (b) score all 2G texts with the just-updated D, the order Alg. 2 implies. [R] With
            # --score-before-update the update's own logits are used instead (D before this step): one D
            # forward less per step (make bench), but measured on the toy task, a D near its threshold then
            # gives noisy verdicts and one seed in four drifted (accuracy 0.98 -> 0.83).
            if a.disc_lr == 0 or not a.score_before_update:
                d_logits = disc_logits(disc.eval(), tok, ro["texts"], device, a.micro_batch)
            r_sim = similarity_reward(d_logits, a)
    else:
        d_logits, r_sim = torch.zeros_like(r_ans), torch.zeros_like(r_ans)
    rewards = r_sim + r_ans  # R = r_sim + r_ans, unweighted [P] §3.3
    adv = group_advantages(rewards, group, scale_std=(a.algo == "grpo"))
    metrics["time/disc"] = clock(device) - t0

    # (c) policy update over all texts of every group (Eq. 2), mu iterations
    t0 = clock(device)
    stats = policy_update(model, ref, opt, repeat_prompts(ro["enc"], group), ro["comp"], ro["mask"], adv, a)
    metrics["time/policy"] = clock(device) - t0

    s = ro["is_teacher"] == 0
    metrics.update({"reward/sim": r_sim[s].mean().item(), "reward/ans": r_ans[s].mean().item(),
                    "reward/total": rewards[s].mean().item(), **stats, "len/mean": ro["mask"][s].sum(1).float().mean().item()})
    if ril:
        metrics.update({"reward/sim_teacher": r_sim[~s].mean().item(), "reward/ans_teacher": r_ans[~s].mean().item(),
                        "disc/p_student": torch.sigmoid(d_logits[s]).mean().item()})
    dump = [dict(source="teacher" if ro["is_teacher"][i] else "student", text=ro["texts"][i], r_sim=r_sim[i].item(),
                 r_ans=r_ans[i].item(), D=torch.sigmoid(d_logits[i]).item() if ril else None, adv=adv[i].item())
            for i in range(group)]
    return metrics, {"ids": [r["id"] for r in batch], "question": batch[0]["question"], "answer": batch[0]["answer"], "texts": dump}


# ================================================================================================
# 11. Several GPUs: torchrun, data parallel over questions (DDP), parameter sharding (FSDP2)
# ================================================================================================
RANK, WORLD, SHARDED = 0, 1, False  # set once by init_distributed; a single process keeps these


def init_distributed(a: Args):
    """Under `torchrun --nproc_per_node N ril.py ...`: one process per GPU (nccl) or per CPU worker
    (gloo). Each rank takes a disjoint share of every batch of questions and makes its own groups, so
    rewards and advantages never need another rank. Only rank 0 prints, logs and saves."""
    global RANK, WORLD, SHARDED
    WORLD = int(os.environ.get("WORLD_SIZE", "1"))
    if WORLD == 1:
        if a.shard:
            fail("--shard needs several processes; start with torchrun --nproc_per_node N ril.py ...")
        return
    for name, n in (("batch-size", a.batch_size), ("sft-batch-size", a.sft_batch_size)):
        if n % WORLD:
            fail(f"--{name} {n} does not split evenly over {WORLD} ranks; make it a multiple of {WORLD}")
    if a.offload:
        fail("--offload works in a single process; under torchrun use --shard, which spreads the memory over the ranks")
    cuda = torch.cuda.is_available() and a.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    RANK, SHARDED = dist.get_rank(), a.shard
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if RANK != 0:
        sys.stdout = open(os.devnull, "w")


def share(rows: list) -> list:
    """This rank's questions of a batch (all of them in a single process)."""
    return rows[RANK::WORLD]


def unwrap(model):
    """The model itself: DDP wraps it (generate, config and saving need the inner one); FSDP2 does not."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parallelize(model, device):
    """DDP: full copies, gradients averaged across ranks in backward. FSDP2 (--shard): each decoder or
    vision block is its own unit, then the vision tower, then the whole model (OFFLINE_NOTES §5:
    generate runs the vision tower outside forward, so it must be a unit of its own)."""
    if WORLD == 1:
        return model
    if not SHARDED:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "blocks"):
            for block in mod:
                fully_shard(block)
    for name, mod in list(model.named_modules()):
        if name.split(".")[-1] in VISION_TOWERS:
            fully_shard(mod)
    fully_shard(model, reshard_after_forward=True)  # the root too: outside a pass, every parameter is a shard
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value as an ordinary tensor, e.g. the global gradient norm under FSDP2."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def mean_over_ranks(m: dict, device) -> dict:
    """Metrics averaged over ranks (every rank logs the same keys in the same order)."""
    if WORLD == 1:
        return m
    keys = sorted(m)
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / WORLD).tolist()))


def gather_lists(xs: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if WORLD == 1:
        return xs
    parts = [None] * WORLD
    dist.all_gather_object(parts, xs)
    return [x for p in parts for x in p]


def full_state(model, opt=None) -> tuple:
    """(model state dict, optimizer state dict), whole and on the CPU: a sharded model's pieces are
    gathered (every rank must call this), so a checkpoint is always an ordinary one."""
    if not SHARDED:
        return unwrap(model).state_dict(), None if opt is None else opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), None if opt is None else get_optimizer_state_dict(model, opt, options=o)


def checksum(model) -> tuple:
    """Two float64 sums of the whole parameters: ranks that agree give the same pair."""
    ts = [full(p.detach()).double() for p in unwrap(model).parameters()]
    return sum(t.sum().item() for t in ts), sum((t * t).sum().item() for t in ts)


def load_optimizer(model, opt, state: dict):
    if not SHARDED:
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


# ================================================================================================
# 12. Checkpoints: atomic writes, exact resume, a checkpoint on Ctrl-C / SIGTERM
# ================================================================================================
def replace_atomic(path: str, write):
    """write(tmp), then rename it over path: a kill mid-write leaves the old file, never half a file."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def checkpoints(out: str) -> list:
    """Complete checkpoints, oldest first. A folder gets its step_ name only once fully written."""
    root = os.path.join(out, "checkpoints")
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []


def save_checkpoint(out: str, step: int, model, disc, opt, d_opt, before, keep_last: int) -> str:
    """Everything the rest of the run depends on: both models, both optimizers, the step, every rank's
    RNG states and the pre-RIL evaluation. The data order needs no state: batch_at is a pure function
    of (seed, step), so a resumed run replays the same questions (PEERS §4.4). Every rank calls this;
    rank 0 writes."""
    root = os.path.join(out, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f"tmp_step_{step:07d}")
    student, opt_state = full_state(model, opt)
    d_state, d_opt_state = full_state(disc, d_opt) if disc is not None else (None, None)
    rng = gather_lists([{"python": random.getstate(), "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}])
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save({"step": step, "student": student, "opt": opt_state, "disc": d_state, "d_opt": d_opt_state,
                    "rng": rng, "before": before}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears complete, or not at all
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old)
    return final


def resume_args(a: Args) -> tuple:
    """The interrupted run's own arguments, with this command's --steps. Returns (args, checkpoint)."""
    found, args_path = checkpoints(a.out), os.path.join(a.out, "args.json")
    if not found or not os.path.isfile(args_path):
        fail(f"--resume: no complete checkpoint in {a.out}/checkpoints; start a run there without --resume")
    saved = json.load(open(args_path))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, before init_distributed
        print(f"resuming {found[-1]} with the arguments in {args_path} (only --steps comes from this command)")
    return Args(**{**saved, "steps": a.steps, "resume": True, "overwrite": False}), found[-1]


def trim_jsonl(path: str, last_step: int):
    """Drop what was logged after the checkpoint: those steps are about to run again."""
    if os.path.isfile(path):
        keep = []
        for line in open(path):
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut by the kill
                pass
        replace_atomic(path, lambda tmp: open(tmp, "w").writelines(keep))


# ================================================================================================
# 13. Pictures: metrics.png, drawn with Pillow
# ================================================================================================
PANELS = [  # title, y label, [(metric, legend)]
    ("rewards of student samples", "reward", [("reward/total", "total"), ("reward/ans", "r_ans"), ("reward/sim", "r_sim")]),
    ("discriminator accuracy", "accuracy", [("disc/acc_student", "on student texts"), ("disc/acc_teacher", "on teacher texts")]),
    ("KL to the reference", "KL per token", [("policy/kl", "policy/kl")]),
    ("answer length", "tokens", [("len/mean", "student samples")]),
    ("held-out evaluation", "score", [("eval/acc", "accuracy"), ("eval/teacher_like", "teacher-likeness (D then)"),
                                      ("eval/teacher_match", "teacher match")]),
    ("discriminator loss", "BCE", [("disc/loss", "disc/loss")]),
]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def plot_metrics(out: str) -> str:
    """One panel per group of metrics, step on x. Training curves are drawn raw (light) and as a moving
    average over a twentieth of the run (dark); evaluations as points joined by lines."""
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    W, H, cols, rows = 1500, 900, 3, 2
    img, font = Image.new("RGB", (W, H), "white"), ImageFont.load_default(size=14)
    d = ImageDraw.Draw(img)
    for k, (title, ylabel, series) in enumerate(PANELS):
        x0, y0 = (k % cols) * W // cols + 80, (k // cols) * H // rows + 40
        pw, ph = W // cols - 110, H // rows - 110  # plot area
        data = [(name, [(m["step"], m[key]) for m in lines if key in m]) for key, name in series]
        data = [(name, pts) for name, pts in data if pts]
        d.text((x0 + pw // 2, y0 - 22), title, fill="black", font=font, anchor="mm")
        d.text((x0 + pw // 2, y0 + ph + 34), "step", fill="black", font=font, anchor="mm")
        label = Image.new("RGB", (ph, 18), "white")
        ImageDraw.Draw(label).text((ph // 2, 9), ylabel, fill="black", font=font, anchor="mm")
        img.paste(label.rotate(90, expand=True), (x0 - 72, y0))
        if not data:
            d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
            d.text((x0 + pw // 2, y0 + ph // 2), "not logged in this run", fill="gray", font=font, anchor="mm")
            continue
        xs, ys = [p[0] for _, pts in data for p in pts], [p[1] for _, pts in data for p in pts]
        xlo, xhi, ylo, yhi = min(xs), max(max(xs), min(xs) + 1), min(ys), max(ys)
        if yhi - ylo < 1e-9:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        X = lambda x: x0 + (x - xlo) / (xhi - xlo) * pw  # noqa: E731
        Y = lambda y: y0 + ph - (y - ylo) / (yhi - ylo) * ph  # noqa: E731
        for t in range(3):  # ticks: ends and middle of each axis
            xv, yv = xlo + t * (xhi - xlo) / 2, ylo + t * (yhi - ylo) / 2
            d.line([X(xv), y0 + ph, X(xv), y0 + ph + 5], fill="black")
            d.text((X(xv), y0 + ph + 16), f"{xv:.0f}", fill="black", font=font, anchor="mm")
            d.line([x0 - 5, Y(yv), x0, Y(yv)], fill="black")
            d.text((x0 - 8, Y(yv)), f"{yv:.3g}", fill="black", font=font, anchor="rm")
        for j, (name, pts) in enumerate(data):
            c = COLOURS[j % len(COLOURS)]
            if len(pts) > 20 and title != "held-out evaluation":
                d.line([(X(x), Y(y)) for x, y in pts], fill=tuple(v + (255 - v) * 2 // 3 for v in c), width=1)
                w = max(1, len(pts) // 20)
                pts = [(pts[i][0], sum(y for _, y in pts[max(0, i - w + 1):i + 1]) / len(pts[max(0, i - w + 1):i + 1]))
                       for i in range(len(pts))]
            d.line([(X(x), Y(y)) for x, y in pts], fill=c, width=2)
            if title == "held-out evaluation":
                for x, y in pts:
                    d.ellipse([X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], fill=c)
        d.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")  # the frame, over the curves' ends
        for j, (name, _) in enumerate(data):  # the legend, on white, over the curves
            d.rectangle([x0 + 4, y0 + 3 + 18 * j, x0 + 44 + d.textlength(name, font=font), y0 + 21 + 18 * j], fill="white")
            d.line([x0 + 10, y0 + 12 + 18 * j, x0 + 30, y0 + 12 + 18 * j], fill=COLOURS[j % len(COLOURS)], width=3)
            d.text((x0 + 36, y0 + 12 + 18 * j), name, fill="black", font=font, anchor="lm")
    path = os.path.join(out, "metrics.png")
    replace_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


# ================================================================================================
# 14. Main: SFT -> D pre-training -> eval -> RIL loop -> eval -> save
# ================================================================================================
def prepare_out(a: Args, rows: list, teacher_models: list, device, dtype):
    """The first writes to --out, once everything is validated: args.json, then the teacher models'
    answers (rank 0 generates; the other ranks wait and read the cache)."""
    if RANK == 0:
        os.makedirs(a.out, exist_ok=True)
        if a.overwrite:
            shutil.rmtree(os.path.join(a.out, "checkpoints"), ignore_errors=True)
        replace_atomic(os.path.join(a.out, "args.json"), lambda tmp: json.dump(dataclasses.asdict(a), open(tmp, "w"), indent=2))
        for spec in teacher_models:  # generated once, then read from --out/teacher_cache
            model_teacher_texts(spec, rows, a, device, dtype)
    if WORLD > 1:
        dist.barrier()
        for spec in teacher_models if RANK > 0 else []:
            model_teacher_texts(spec, rows, a, device, dtype)


def stages_before_ril(model, processor, train_rows, eval_rows, teachers, text_tokens, state, ref_path, a: Args, device,
                      mode, frozen_dtype):
    """Stage 0 (SFT), the reference, stage 2 (D pre-training), or all three from a checkpoint's state.
    Returns (student, reference or None, discriminator or None), wrapped for torchrun when it runs."""
    if state is not None:
        model.load_state_dict(state["student"])

    def make_ref():  # the starting (SFT'd) student, frozen [P] Alg. 2; not built when beta = 0
        if a.beta == 0:
            return None
        ref = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        if state is not None:
            ref.load_state_dict(torch.load(ref_path, weights_only=True))
        if mode == "amp" or a.offload:  # never trained: no fp32 master copy needed
            ref.to(dtype=frozen_dtype, device="cpu" if a.offload else device)
        return ref

    def make_disc():  # D from the same weights as the student, new 1-unit head [P] §3.1 / [R] §6.3
        if a.algo != "ril":
            return None
        disc = Discriminator(unwrap(model))
        if a.grad_checkpointing:
            checkpoint_activations(disc.backbone)
        if state is not None:
            disc.load_state_dict(state["disc"])
        return disc

    if SHARDED:  # FSDP2: copies are made before sharding, and take the SFT'd weights after it (below)
        ref, disc = make_ref(), make_disc()
        ref, disc = (parallelize(m, device) if m is not None else None for m in (ref, disc))
        model = parallelize(model, device)
        with torch.no_grad():  # one full forward before the first generate (OFFLINE_NOTES §5)
            model(**encode_prompts(processor, train_rows[:1], device))
    else:
        model = parallelize(model, device)

    # Stage 0: SFT warm-up. [R] Every algo starts from the same SFT'd student, so Table 1 rows compare
    # the RL stage alone (the paper does not say whether its baselines were SFT'd, RIL_PAPER §6.9).
    if state is None and a.sft_steps > 0:
        sft_warmup(model, processor, train_rows, teachers, text_tokens, a, device)
    if not SHARDED:
        ref, disc = make_ref(), make_disc()
        disc = parallelize(disc, device) if disc is not None else None
    elif state is None:  # same sharding, so the shards copy over one to one
        if ref is not None:
            ref.load_state_dict(model.state_dict())
        if disc is not None:
            disc.backbone.load_state_dict(language_model(model).state_dict())
    # Stage 2: discriminator pre-training
    if disc is not None and state is None and a.disc_pretrain_steps > 0:
        with resident(disc, device, a.offload):
            pretrain_disc(disc, model, processor, train_rows, teachers, text_tokens, eval_rows, a, device)
    if disc is not None and a.offload:
        disc.to("cpu")
    return model, ref, disc


def log_line(step: int, m: dict) -> str:
    f = lambda k, fmt="{:.3f}": fmt.format(m[k]) if k in m else "-"  # noqa: E731
    return (f"step {step:4d} | R {f('reward/total')} sim {f('reward/sim')} ans {f('reward/ans')} | "
            f"D loss {f('disc/loss')} acc s/t {f('disc/acc_student', '{:.2f}')}/{f('disc/acc_teacher', '{:.2f}')} | "
            f"pg loss {f('policy/loss', '{:+.4f}')} gn {f('policy/grad_norm', '{:.2f}')} kl {f('policy/kl', '{:.4f}')} | "
            f"len {f('len/mean', '{:.1f}')} | gen {f('time/generate', '{:.2f}')}s pol {f('time/policy', '{:.2f}')}s")


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    if a.plot:
        if not os.path.isfile(os.path.join(a.out, "metrics.jsonl")):
            fail(f"--plot: {a.out}/metrics.jsonl not found; give the --out of a run")
        return print(f"wrote {plot_metrics(a.out)}")
    last_ckpt = None
    if a.resume:  # continue the interrupted run exactly as it was configured
        a, last_ckpt = resume_args(a)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    # [R] Precision. amp: fp32 weights and AdamW moments, bf16 matmuls (autocast). bf16: bf16 weights and
    # moments, half the memory, but an update smaller than ~1/256 of a weight rounds away, which at the
    # paper's LR of 1e-6 is most of them. The paper does not say which it used.
    mode = a.dtype if a.dtype != "auto" else ("amp" if device.type == "cuda" else "fp32")
    init_distributed(a)
    if WORLD > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "amp"):
            train(a, device, mode, last_ckpt)
    finally:
        if WORLD > 1 and dist.is_initialized():
            dist.destroy_process_group()


def print_table(before, after, after_texts, disc, tok, eval_rows, teachers, a: Args, device):
    """The before/after table of the held-out set."""
    # Before/after table. Teacher-likeness twice: by the D of that moment (the pre-trained D before,
    # the final D after), and by the final D for every row. The final D no longer sees terse student
    # text, so its verdict on old answers can drift; teacher match is the check that needs no D.
    print(f"\n| held-out ({len(eval_rows)} questions) | accuracy | teacher-likeness (D then) | "
          "teacher-likeness (final D) | teacher match | length |")
    print("|---|---|---|---|---|---|")
    with resident(disc, device, a.offload):
        for name, m, texts in [("before RIL (after SFT)", before["metrics"], before["texts"]), (f"after {a.algo}", after, after_texts)]:
            tl = (f"{m['eval/teacher_like']:.3f} | {teacher_likeness(disc, tok, texts, device):.3f}" if disc is not None else "n/a | n/a")
            print(f"| {name} | {m['eval/acc']:.3f} | {tl} | {m['eval/teacher_match']:.3f} | {m['eval/len']:.1f} |")
        t_texts = [t for r in eval_rows for name in teachers for t in r["teachers"].get(name, [])]
        if disc is not None and t_texts:
            print(f"| teacher texts | 1.000 | - | {teacher_likeness(disc, tok, t_texts, device):.3f} | 1.000 | - |")


def train(a: Args, device, mode: str, last_ckpt):
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32  # trained weights
    frozen_dtype = torch.bfloat16 if mode in ("amp", "bf16") else torch.float32  # reference, teachers, judge
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    t_start = time.time()

    # Everything is validated before anything is written: a bad row or flag costs nothing in --out.
    train_rows, eval_rows = load_data(a)
    teachers, teacher_models = resolve_teachers(a, train_rows)
    if not a.resume and checkpoints(a.out) and not a.overwrite and not a.save_tiny:
        fail(f"{a.out}: holds checkpoints of an earlier run; pass --resume to continue it, "
             f"--overwrite to start again, or another --out")
    corpus = [s for r in train_rows + eval_rows for s in [r["question"], r["answer"]] + [t for ts in r["teachers"].values() for t in ts]]
    model, processor = load_student(a, corpus + [DISC_SYSTEM, DISC_USER, "user assistant system"], device, dtype)
    if a.save_tiny:
        os.makedirs(a.save_tiny, exist_ok=True)
        save_student(model, processor, a.save_tiny)
        print(f"saved the tiny student to {a.save_tiny}")
        return
    tok = processor.tokenizer
    text_tokens = TextTokens(tok, tok.eos_token_id, a.max_new_tokens)
    memory_settings(model, a)
    if WORLD > 1:  # each rank evaluates an equal share, so every rank makes the same number of collective calls
        eval_rows = eval_rows[:len(eval_rows) - len(eval_rows) % WORLD]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student {a.student}: {n_params / 1e6:.2f}M params on {device} ({mode}); algo {a.algo}; "
          f"{len(train_rows)} train / {len(eval_rows)} held-out questions; teachers {teachers or '-'}"
          + (f"; {WORLD} ranks, {'FSDP2' if SHARDED else 'DDP'}" if WORLD > 1 else ""))
    prepare_out(a, train_rows + eval_rows, teacher_models, device, frozen_dtype)
    # r_ans(questions, answers, responses) -> scores: the matcher, or the paper's judge model
    judge = MatchJudge(train_rows) if a.judge == "match" else ModelJudge(a.judge, a, device, frozen_dtype)
    state = torch.load(os.path.join(last_ckpt, "state.pt"), weights_only=True) if a.resume else None
    ref_path = os.path.join(a.out, "checkpoints", "reference.pt")
    model, ref, disc = stages_before_ril(model, processor, train_rows, eval_rows, teachers, text_tokens, state, ref_path,
                                         a, device, mode, frozen_dtype)
    # Stage 3 optimisers: the paper uses constant LRs in the loop [P] App. C.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=a.disc_lr) if disc is not None else None

    metrics_path, samples_path = os.path.join(a.out, "metrics.jsonl"), os.path.join(a.out, "samples.jsonl")
    if state is not None:
        load_optimizer(model, opt, state["opt"])
        if d_opt is not None:
            load_optimizer(disc, d_opt, state["d_opt"])
        before, start = state["before"], state["step"] + 1
        if RANK == 0:
            trim_jsonl(metrics_path, state["step"])
            trim_jsonl(samples_path, state["step"])
        rng = state["rng"][RANK]  # each rank's own random streams
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        m, texts = evaluate(model, processor, disc, eval_rows, judge, a, device)
        before, start = {"metrics": m, "texts": texts}, 1
        ref_state = full_state(ref)[0] if ref is not None else None
        if RANK == 0:
            for path in (metrics_path, samples_path):
                open(path, "w").close()
            if ref is not None:
                os.makedirs(os.path.dirname(ref_path), exist_ok=True)
                replace_atomic(ref_path, lambda tmp: torch.save(ref_state, tmp))
        if WORLD > 1:
            torch.manual_seed(a.seed * 1000 + RANK)  # ranks sample their own answers from here on
        last_ckpt = save_checkpoint(a.out, 0, model, disc, opt, d_opt, before, a.keep_last)
    metrics_file, samples_file = (open(metrics_path, "a"), open(samples_path, "a")) if RANK == 0 else (None, None)

    def log(step, m, dump=None):
        if RANK == 0:
            metrics_file.write(json.dumps({"step": step, **m}) + "\n")
            metrics_file.flush()
            if dump is not None:
                samples_file.write(json.dumps({"step": step, **dump}) + "\n")
                samples_file.flush()

    if state is None:
        log(0, before["metrics"])
    print("eval before RIL: " + "  ".join(f"{k} {v:.3f}" for k, v in before["metrics"].items()))

    # Ctrl-C and SIGTERM (a cluster's pre-emption) finish the step, save a checkpoint and exit.
    stop = []

    def on_signal(signum, frame):
        if stop:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write(f"signal {signum}: finishing step, saving a checkpoint, then exiting")

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bad = 0  # steps in a row whose loss or gradient was not finite
    for step in tqdm(range(start, a.steps + 1), desc=a.algo, initial=start - 1, total=a.steps, disable=RANK > 0):
        batch = share(batch_at(train_rows, step - 1, a.batch_size, a.seed + 3))
        m, dump = ril_step(step, model, ref, disc, opt, d_opt, processor, batch, teachers, text_tokens, judge, a, device)
        m = mean_over_ranks(m, device)
        bad = bad + 1 if m["guard/skipped"] or m.get("guard/disc_skipped") else 0
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            m.update(evaluate(model, processor, disc, eval_rows, judge, a, device)[0])
        log(step, m, dump)
        tqdm.write(log_line(step, m), file=sys.stdout)
        if a.dump_every and step % a.dump_every == 0:
            tqdm.write(f"--- step {step} group: {dump['question']} (answer: {dump['answer']})", file=sys.stdout)
            for d in dump["texts"]:
                tqdm.write(f"    {d['source']:7s} r_sim {d['r_sim']:.0f} r_ans {d['r_ans']:.0f} "
                           f"D {'-' if d['D'] is None else format(d['D'], '.2f')} adv {d['adv']:+.2f} | {d['text']!r}", file=sys.stdout)
        if bad >= a.max_bad_steps:
            fail(f"step {step}: loss or gradient was NaN/inf for {bad} steps in a row (each was skipped); "
                 f"the last good checkpoint is {last_ckpt}; lower --lr / --disc-lr or check the data")
        stopping = mean_over_ranks({"stop": float(bool(stop))}, device)["stop"] > 0  # every rank stops at the same step
        if stopping or (a.save_every and step % a.save_every == 0) or step == a.steps:
            last_ckpt = save_checkpoint(a.out, step, model, disc, opt, d_opt, before, a.keep_last)
        if stopping:
            print(f"stopped after step {step}; checkpoint {last_ckpt}; continue with: python ril.py --out {a.out} --resume")
            sys.exit(128 + (stop[0] if stop else signal.SIGTERM))
    for sig, h in handlers.items():
        signal.signal(sig, h)

    after, after_texts = evaluate(model, processor, disc, eval_rows, judge, a, device)
    log(a.steps, after)
    if text_tokens.cut:
        print(f"note: {text_tokens.cut} teacher text(s) were longer than --max-new-tokens and were cut")

    print_table(before, after, after_texts, disc, tok, eval_rows, teachers, a, device)

    if WORLD > 1:  # gradients were averaged, so every rank must hold the same weights
        sums = gather_lists([(checksum(model), checksum(disc) if disc is not None else None)])
        if any(x != sums[0] for x in sums):
            fail(f"ranks disagree after training (parameter checksums {sums}); the gradient reduction is broken")
        print(f"ranks agree: identical student and discriminator parameters on {WORLD} ranks")
    student_state, disc_state = full_state(model)[0], full_state(disc)[0] if disc is not None else None
    if RANK == 0:
        save_student(unwrap(model), processor, a.out, student_state)
        if disc is not None:
            parts = {p: {k[len(p) + 1:]: v for k, v in disc_state.items() if k.startswith(p + ".")} for p in ("backbone", "head")}
            replace_atomic(os.path.join(a.out, "discriminator.pt"), lambda tmp: torch.save(parts, tmp))
        metrics_file.close()
        samples_file.close()
        print(f"wrote {plot_metrics(a.out)}")
    print(f"\nsaved student + processor to {a.out} ({time.time() - t_start:.0f}s total)")


if __name__ == "__main__":
    main()
