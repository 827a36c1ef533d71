"""
ril.py: RIL, "Unified Reinforcement and Imitation Learning for Vision-Language Models" (Lee et al., NeurIPS 2025,
arXiv 2510.19307) in one file. Part 1 is the algorithm, top to bottom; part 2 (MACHINERY) can be skipped at first.

A small student VLM samples G answers per image question and large teacher VLMs give G more (only their text, so any
tokenizer or family can teach). A discriminator D, the student's language model with a 1-unit head, learns student text
(1) from teacher text (0). All 2G answers get R = r_sim + r_ans, r_sim = 1[D < 0.5] ("sounds like a teacher"), r_ans = 1
if right; one clipped Dr.GRPO step over all 2G pushes up teacher texts (imitation) and good samples (reinforcement).

Usage
    python ril.py                                      # tiny Qwen2-VL on the built-in toy task, CPU
    python ril.py --student Qwen2-VL-2B --teachers a,Qwen/Qwen2.5-VL-72B-Instruct --data train.jsonl --sft-steps 0 ...
    torchrun --nproc_per_node 8 ril.py ... [--shard]   # several GPUs: DDP, or FSDP2 with --shard
    python ril.py --out runs/ril --resume --steps 400  # continue a run; Ctrl-C and SIGTERM save one
Data: JSONL, one question per line, image paths relative to the file's folder:
    {"id": "q1", "image": "img/q1.png", "question": "...", "answer": "...", "teachers": {"a": ["text", ...]}}
Labels in comments: [P] the paper says so; [S] scaled down; [R] our reading where the paper is silent.
"""

import argparse
import contextlib
import copy
import datetime
import fcntl
import functools
import gc
import glob
import hashlib
import json
import math
import operator
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import transformers
from PIL import Image, ImageDraw, ImageOps
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


# -- 1. Hyperparameters and state ------------------------------------------------------------------
def arg(default, help: str, **checks):
    """A Config or Args field: its default, its --help and its checks (gt, ge, lt, le, choices)."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class Config:
    """The method's hyperparameters: [P] the paper's value; [S] scaled down for the tiny model (the README gives the
    paper's values that matter and the flags that restore them); [R] our choice where the paper gives none."""

    algo: str = arg("ril", "RIL, or a Table 1 baseline (r_ans only)", choices=("ril", "dr_grpo", "grpo"))
    G: int = arg(4, "student samples per question; RIL adds G teacher texts, a group of 2G [P] App. C", ge=2)
    eps: float = arg(0.2, "clip range of the ratio [P] §4.2", gt=0)
    beta: float = arg(0.01, "KL weight to the reference (SFT) policy [P] Table 5b; 0 = no reference model", ge=0)
    mu: int = arg(1, "policy iterations per batch [P] App. C, Table 5a", ge=1)
    sim_threshold: float = arg(0.5, "r_sim = 1[D < threshold] [P] §3.3", gt=0, lt=1)
    sim_reward: str = arg("binary", "binary [P] or continuous (1 - D, Fig. 6)", choices=("binary", "continuous"))
    baseline: str = arg("group", "advantage baseline: all 2G [P] Eq. 2, or the G samples", choices=("group", "student"))
    teacher_ratio: str = arg("old", "teacher texts' ratio: pi / pi_old [P] Eq. 2, or pi / 1", choices=("old", "one"))
    temperature: float = arg(1.0, "sampling temperature [P] App. C", gt=0)
    top_p: float = arg(0.95, "nucleus sampling [P] App. C", gt=0, le=1)
    top_k: int = arg(50, "top-k sampling [P] App. C; 0 = off", ge=0)
    repetition_penalty: float = arg(1.05, "[P] App. C", gt=0)
    steps: int = arg(200, "RIL steps, one batch of questions each [S]", ge=0)
    batch_size: int = arg(16, "questions per step [S]", ge=1)
    max_new_tokens: int = arg(16, "generation cap, also the Dr.GRPO normaliser L_max [S]", ge=1)
    lr: float = arg(2e-4, "student LR in the loop, constant [S]", ge=0)
    disc_lr: float = arg(2e-4, "discriminator LR in the loop, constant [S]; 0 = frozen D, Table 5d", ge=0)
    max_grad_norm: float = arg(1.0, "gradient clipping of the student and D [R]", gt=0)
    sft_steps: int = arg(300, "Stage 0 SFT steps [S] (0 = skip, for a checkpoint already SFT'd)", ge=0)
    sft_batch_size: int = arg(32, "questions per SFT step [S]", ge=1)
    sft_teacher_frac: float = arg(0.2, "share of SFT targets that are teacher texts, the rest answers [S]", ge=0, le=1)
    sft_lr: float = arg(3e-3, "SFT peak LR, decayed linearly to a tenth [S]", ge=0)
    disc_pretrain_steps: int = arg(40, "Stage 2: discriminator pre-training steps [S]", ge=0)
    disc_pretrain_lr: float = arg(1e-3, "its peak LR, decayed linearly to a tenth [S]", ge=0)
    micro_batch: int = arg(0, "sequences per forward/backward (0 = all): less memory, same gradients", ge=0)
    seed: int = arg(0, "seeds the toy data, the model init, the data order and the sampling", ge=0, lt=2**32)
    eval_every: int = arg(50, "greedy held-out evaluation every N steps (0 = before and after only)", ge=0)


@dataclass
class State:
    """What a RIL step reads and changes (ref is None when beta = 0, disc for the baselines)."""

    model: nn.Module  # pi_theta, the student (wrapped by DDP under torchrun)
    processor: object = None  # the student's processor: chat template, tokenizer, image processor
    device: torch.device = torch.device("cpu")
    teachers: tuple = ()  # names of the teachers in every row's "teachers" field
    judge: object = None  # r_ans: judge(questions, answers, responses) -> [0/1 per response]
    ref: nn.Module = None  # pi_ref, the SFT'd student, frozen [P] Alg. 2
    disc: nn.Module = None  # D_phi [P] §3.1
    opt: object = None  # AdamW of the student
    d_opt: object = None  # AdamW of D


class Ranks:
    """One process. Under torchrun, a subclass in RANKS shares, means and gathers over ranks."""

    rank, world, sharded = 0, 1, False
    share = mean = gather = staticmethod(lambda x: x)
    bar = staticmethod(functools.partial(tqdm, leave=False, disable=os.environ.get("RANK", "0") != "0"))  # rank 0


RANKS = Ranks()


def unwrap(model):
    """The model inside a DDP wrapper (.module), which generate and the LM head need."""
    return getattr(model, "module", model)


# -- 2. Data order, prompts and tokens -------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> list:
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def batch_at(rows: list, step: int, B: int, seed: int) -> list:
    """The B questions of `step`: epoch-wise shuffles, a pure function of (seed, step), so a resumed
    run sees exactly the questions the uninterrupted run would have."""
    n = len(rows)
    return [rows[epoch_order(seed, i // n, n)[i % n]] for i in range(step * B, step * B + B)]


def sample_teacher_texts(row, teachers, G: int, rng: random.Random) -> list:
    """G teacher texts for one question, teacher by teacher. [R] The paper does not split the G slots between
    teachers: each of T teachers gets G / T of them (a, a, b, b for two; the first ones one more when T does not divide
    G; G of them at random, one each, when T > G), drawn without replacement unless a teacher has too few."""
    teachers = rng.sample(list(teachers), G) if len(teachers) > G else teachers
    out = []
    for i, t in enumerate(teachers):
        texts, k = row["teachers"][t], len(range(i, G, len(teachers)))  # slots i, i+T, ...
        out += rng.sample(texts, k) if k <= len(texts) else [rng.choice(texts) for _ in range(k)]
    return out


def encode_prompts(processor, rows: list, device) -> transformers.BatchFeature:
    """Chat-formatted, left-padded prompts with their images. Never truncated: cutting a prompt cuts
    image tokens but not pixel_values, the most reported Qwen2-VL crash in RL trainers."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}] for r in rows]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    images = [r["image"]() if callable(r["image"]) else r["image"] for r in rows]  # or a function opening it
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)
    n = len(enc["pixel_values"])  # .rows (not a model input): each prompt's rows of these, one an image (LLaVA) or
    tokens = (enc["input_ids"] == getattr(processor, "image_token_id", -1)).sum(1)  # as many as its image tokens say:
    enc.rows = [1] * n if n == len(rows) else (tokens * n // tokens.sum()).tolist()  # Qwen2-VL patches, InternVL tiles
    return enc


def select_prompts(enc: transformers.BatchFeature, idx: list) -> transformers.BatchFeature:
    """Prompts idx of enc (a micro-batch, or 0,0,..,1,1,.. for groups), each with its own block of rows of
    the flat pixel_values: tiling them instead pairs prompt 1 with image 2 (a known GRPO bug)."""
    out = transformers.BatchFeature({k: v[idx] for k, v in enc.items() if k != "pixel_values"})
    out.rows = [enc.rows[i] for i in idx]
    blocks = enc["pixel_values"].split(enc.rows)  # prompt i's rows
    out["pixel_values"] = torch.cat([blocks[i] for i in idx])
    return out


def repeat_prompts(enc: dict, n: int) -> dict:
    return select_prompts(enc, [i for i in range(len(enc["input_ids"])) for _ in range(n)])


def chunks(n: int, size: int) -> list:
    """Micro-batches of `size` (0 = one batch) as (start, stop).

    >>> chunks(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    size = size or n
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def completion_mask(ids: torch.Tensor, eos_ids: list) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after. EOS stays in, since it is how the model learns to stop (masking it,
    as pad = EOS does, teaches it never to stop).

    >>> completion_mask(torch.tensor([[5, 2, 0, 0]]), eos_ids=[2]).tolist()
    [[1, 1, 0, 0]]
    """
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def pad_right(seqs: list, pad_id: int, device) -> tuple:
    ids = [torch.tensor(x, dtype=torch.long) for x in seqs]
    ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in seqs], batch_first=True)
    return ids.to(device), mask.to(device)


class Unfinished(str):
    """A teacher text cut by its model's generation cap: like a cut student sample, no EOS."""


def plain_ids(tokenizer, text: str) -> list:
    """A text's token ids as plain text: "<|im_end|>" in it is characters, not the ending token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@functools.lru_cache(maxsize=1 << 17, typed=True)  # teacher texts come back every epoch
def text_ids(tokenizer, text: str, max_len: int) -> list:
    """A teacher text in student tokens (only text crosses [P]), + EOS if it ended, cut to L_max."""
    eos = [] if isinstance(text, Unfinished) else [tokenizer.eos_token_id]
    return (plain_ids(tokenizer, text) + eos)[:max_len]


# -- 3. Rollout: G student samples + G teacher texts per question ----------------------------------
def generation_config(a: Config, model, tokenizer, greedy: bool) -> transformers.GenerationConfig:
    """Generation settings: every EOS the model knows, the vision placeholders suppressed (a sampled
    <|image_pad|> crashes the next forward) and, unless greedy, the paper's repetition penalty.
    do_sample stays False even when sampling: sample_top_k_top_p, a logits processor, then leaves
    one token above -inf, its draw, which greedy search picks."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_index")
    vision = sorted({getattr(model.config, n) for n in names if isinstance(getattr(model.config, n, None), int)})
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=a.max_new_tokens, suppress_tokens=vision)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = sorted(set(eos) | {tokenizer.eos_token_id})
    cfg.repetition_penalty = 1.0 if greedy else a.repetition_penalty  # [R] HF's counts pad tokens too; vLLM has none
    return cfg


def sample_top_k_top_p(a: Config, input_ids, scores: torch.Tensor) -> torch.Tensor:
    """The paper's sampling. Plainly: probs = softmax(top_p(top_k(scores / temperature))) over the whole vocabulary,
    then torch.multinomial(probs, 1), as HF's warpers do. Here the sort and the draw run among the top k alone (over
    152k entries HF's were 86% of generate in make bench); the same distribution, by
    test_the_top_k_sampler_draws_from_the_distribution_of_hf_sampling. Returns -inf but at the drawn token."""
    scores = scores / a.temperature
    if a.top_k == 0 and a.top_p >= 1:  # nothing to cut (TRL's and vLLM's default): no sort
        pick = torch.multinomial(scores.softmax(-1), 1)
    else:
        top, idx = scores.topk(min(a.top_k or scores.shape[-1], scores.shape[-1]))  # (N, k)
        drop = (top.flip(-1).softmax(-1).cumsum(-1) <= 1 - a.top_p).flip(-1)  # HF's top-p
        drop[:, 0] = False  # the best token always stays
        pick = idx.gather(-1, torch.multinomial(top.masked_fill(drop, -float("inf")).softmax(-1), 1))  # (N, 1)
    return torch.full_like(scores, -float("inf")).scatter_(-1, pick, 0.0)


@torch.no_grad()
def generate(model, enc: dict, gen_cfg, sampler=None, synced: bool = False) -> tuple:
    """Completion ids (N, T), pad after the first EOS, and their mask. synced: the student under --shard, whose every
    forward is collective, so each rank decodes until all are done (synced_gpus)."""
    comp = model.generate(
        **enc, generation_config=gen_cfg, logits_processor=[sampler] if sampler else None, synced_gpus=synced
    )[:, enc["input_ids"].shape[1] :]  # (N, T)
    mask = completion_mask(comp, gen_cfg.eos_token_id)
    return comp.masked_fill(mask == 0, gen_cfg.pad_token_id), mask


def sample(a: Config, model, processor, enc: dict, n: int, synced: bool = False) -> tuple:
    """n sampled answers a prompt: (completions, mask, texts, cut: no EOS, the cap cut it)."""
    gen_cfg = generation_config(a, model, processor.tokenizer, greedy=False)
    comp, mask = generate(model, repeat_prompts(enc, n), gen_cfg, functools.partial(sample_top_k_top_p, a), synced)
    cut = ~torch.isin(comp, torch.tensor(gen_cfg.eos_token_id, device=comp.device)).any(1)
    return comp, mask, processor.tokenizer.batch_decode(comp, skip_special_tokens=True), cut


def rollout(a: Config, s: State, batch: list, rng: random.Random, with_teachers: bool) -> dict:
    """A group per question: G samples from one batched generate, then G teacher texts (RIL)."""
    tok, model = s.processor.tokenizer, unwrap(s.model)
    model.eval()
    enc = encode_prompts(s.processor, batch, s.device)
    sampled, mask, texts, cut = sample(a, model, s.processor, enc, a.G, RANKS.sharded)
    samples = list(zip([c[m.bool()].tolist() for c, m in zip(sampled, mask, strict=True)], texts, strict=True))
    items, is_teacher, answers, questions = [], [], [], []  # items: (token ids, text)
    for b, row in enumerate(batch):
        group = samples[b * a.G : (b + 1) * a.G]
        if with_teachers:  # D and the judge read what the policy trains on: cut to L_max
            teacher_ids = [text_ids(tok, t, a.max_new_tokens) for t in sample_teacher_texts(row, s.teachers, a.G, rng)]
            group += list(zip(teacher_ids, tok.batch_decode(teacher_ids, skip_special_tokens=True), strict=True))
        items += group
        is_teacher += [0] * a.G + [1] * (len(group) - a.G)
        answers += [row["answer"]] * len(group)
        questions += [row["question"]] * len(group)
    comp, comp_mask = pad_right([x for x, _ in items], tok.pad_token_id, s.device)
    ro = dict(enc=enc, comp=comp, mask=comp_mask, texts=[t for _, t in items], answers=answers, questions=questions)
    ro["is_teacher"] = torch.tensor(is_teacher, device=s.device)
    ro["truncated"] = cut.float().mean().item()
    return ro


# -- 4. Log-probs ----------------------------------------------------------------------------------
def token_logprobs(model, enc: dict, comp: torch.Tensor, comp_mask: torch.Tensor, temperature: float, chunk=1 << 24):
    """log pi(o_t | q, o_<t) of every completion token, (N, T), after N left-padded prompts. Plainly:

        logits = model(input_ids=prompt + completion, ...).logits[:, -T - 1 : -1] / temperature  # (N, T, vocabulary)
        logp = logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1)

    Here the LM head's forward is swapped for one that projects and takes the log-softmax on chunks of `chunk` logits
    at most, again in the backward pass, so the (N, T, vocabulary) logits never exist at once (20 GB in fp32 for 128 x
    257 x 152k); swapping the head keeps one call of the (DDP- or FSDP-wrapped) model. Equal within 1e-5:
    test_chunked_logprobs_and_gradients_equal_the_full_logits_computation. No position_ids: Qwen2-VL builds its 3-D
    M-RoPE positions itself (1-D ones silently corrupt the logits). Divided by the sampling temperature, as TRL does."""
    T = comp.shape[1]
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    for k in [k for k in extra if "token_type_ids" in k]:  # the completion is text: 0
        extra[k] = torch.cat([extra[k], torch.zeros_like(comp)], 1)
    ids = torch.cat([enc["input_ids"], comp], 1)
    attention = torch.cat([enc["attention_mask"], comp_mask], 1)
    head = unwrap(model).get_output_embeddings()
    project = head.forward
    y = comp.flatten()
    n = max(1, chunk // head.weight.shape[0])  # tokens a chunk: the weight is (vocabulary, hidden)

    def logp(h, y):
        """(n, d) hidden, (n,) targets -> (n,) log-probs; the head in its dtype, even under amp."""
        with torch.autocast(h.device.type, enabled=False):
            logits = project(h.to(head.weight.dtype)).float() / temperature
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)

    def chunked_head(h):
        """The head's stand-in: (N, T, d) hidden states -> (N, T) log-probs, a chunk at a time."""
        h = h.flatten(0, 1)
        parts = [checkpoint(logp, h[i:j], y[i:j], use_reentrant=False) for i, j in chunks(len(y), n)]
        return torch.cat(parts).view_as(comp).clone()  # FSDP2 warns of a view

    head.forward = chunked_head
    keep = torch.arange(ids.shape[1] - T - 1, ids.shape[1] - 1, device=ids.device)  # predict o_1..o_T
    try:
        return model(input_ids=ids, attention_mask=attention, **extra, use_cache=False, logits_to_keep=keep).logits
    finally:
        del head.forward  # the head's own forward again


# -- 5. The discriminator (Eq. 1), its Fig. 3 prompt as printed [P] (no question, no image), and r_sim ----
DISC_SYSTEM = (
    "You are a discriminator assistant.\n\nYou are provided with Response in <response> </response> tag.\n\n"
    "Your task is to determine whether the Response was generated by teacher or student model.\n\n"
    "- Return 0 if the Response was generated by the teacher model.\n"
    "- Return 1 if the Response was generated by the student model."
)
DISC_USER = (
    "<response>{response}</response>\n\nDetermine the source of the Response.\n\n"
    "Provide your answer as one of the following: 0 (Teacher model) 1 (Student model)"
)


def language_model(vlm):
    """The decoder without the LM head: model.language_model (Qwen2-VL, LLaVA) or get_decoder()."""
    inner = getattr(vlm, "model", None)
    return getattr(inner, "language_model", None) or getattr(inner, "text_model", None) or vlm.get_decoder()


class Discriminator(nn.Module):
    """D_phi [P] §3.1: the student's language model (its weights: the paper's answer to GAN imbalance) with a d x 1
    head for the LM head, read at the last token. sigmoid(D(o)) = P(student)."""

    share_prefix = True  # off under --shard and --grad-checkpointing: one plain call per layer

    def __init__(self, student):
        super().__init__()
        self.backbone = copy.deepcopy(language_model(student))  # with its --grad-checkpointing
        p = next(self.backbone.parameters())
        self.head = nn.Linear(student.config.get_text_config().hidden_size, 1).to(p.device, p.dtype)

    def forward(self, ids, mask):
        """Right-padded (N, T) -> logits (N,). Plainly: head(backbone(input_ids, attention_mask) at
        each row's last token). The k leading tokens that every row shares (the Fig. 3 prompt's
        start) run once and their keys and values serve every row: equal within 1e-5,
        test_discriminator_shares_the_prompt_prefix_without_changing_its_output."""
        k = int((ids == ids[:1]).all(0).long().cumprod(0).sum())  # leading tokens every row shares
        k = min(k, int(mask.sum(1).min()) - 1)  # each row keeps its last token
        k = k if k >= 8 and self.share_prefix else 0
        cache = None
        if k:
            cache = self.backbone(input_ids=ids[:1, :k], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(ids))
        out = self.backbone(input_ids=ids[:, k:], attention_mask=mask, past_key_values=cache, use_cache=False)
        last = mask.sum(1) - 1 - k  # (N,) each row's last real token
        h = out.last_hidden_state[torch.arange(len(ids), device=ids.device), last]  # (N, d)
        return self.head(h).squeeze(-1).float().clone()  # FSDP2 hooks the output


@functools.lru_cache(maxsize=1 << 17)  # teacher texts come back every epoch (bounded)
def disc_prompt_ids(tokenizer, text: str) -> list:
    """The Fig. 3 prompt around one text. Student samples are decoded and re-encoded like teacher
    texts, so D sees what they say, not how they were tokenised; the text is plain text."""
    msgs = [{"role": "system", "content": DISC_SYSTEM}, {"role": "user", "content": DISC_USER}]
    chat = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # its special tokens stay
    pre, post = [tokenizer(x, add_special_tokens=False).input_ids for x in chat.split("{response}")]
    return pre + plain_ids(tokenizer, text) + post


def disc_inputs(tokenizer, texts: list, device) -> tuple:
    return pad_right([disc_prompt_ids(tokenizer, t) for t in texts], tokenizer.pad_token_id, device)


@torch.no_grad()
def disc_logits(disc, tokenizer, texts: list, device, micro_batch: int = 0) -> torch.Tensor:
    return torch.cat([disc(*disc_inputs(tokenizer, texts[i:j], device)) for i, j in chunks(len(texts), micro_batch)])


def clip_and_step(opt, params, loss: torch.Tensor, max_norm: float) -> tuple:
    """Clip the gradient, step only if it and the loss are finite (one NaN step would poison every weight and
    the AdamW moments with it), then set the gradients to None. Returns (gradient norm, 1.0 if skipped)."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a sharded norm
    ok = bool(torch.isfinite(loss) and torch.isfinite(norm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, float(not ok)


def grad_sync(model, last: bool):
    """Under DDP, gradients are averaged over ranks once a step, in the last micro-batch's backward
    (forward and backward inside no_sync). FSDP2 reduce-scatters every micro-batch, so that no rank
    holds whole fp32 gradients (at 7B, 30 GB more a rank). One process: nothing to do."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def disc_update(disc, opt, tokenizer, texts: list, is_teacher: torch.Tensor, a: Config, device) -> dict:
    """Eq. 1, max log D(student) + log(1 - D(teacher)), as a BCE step (student 1, teacher 0)."""
    disc.train()
    order = torch.argsort(is_teacher, stable=True).tolist()  # students first, then teachers
    labels, n = 1.0 - is_teacher.float(), len(texts)  # (N,)
    logits, loss = torch.empty(n, device=device), 0.0
    for i, j in chunks(n, a.micro_batch):  # gradient accumulation: the parts add up to the mean BCE
        idx = order[i:j]
        with grad_sync(disc, last=j == n):
            part_logits = disc(*disc_inputs(tokenizer, [texts[k] for k in idx], device))
            part = nn.functional.binary_cross_entropy_with_logits(part_logits, labels[idx]) * ((j - i) / n)
            part.backward()
        loss = loss + part.detach()
        logits[idx] = part_logits.detach()
    _, skipped = clip_and_step(opt, disc.parameters(), loss, a.max_grad_norm)
    right = ((logits > 0).float() == labels).float()
    metrics = {"disc/loss": loss.item(), "disc/acc_student": right[labels == 1].mean().item()}
    return {**metrics, "disc/acc_teacher": right[labels == 0].mean().item(), "guard/disc_skipped": skipped}


def similarity_reward(d_logits: torch.Tensor, a: Config) -> torch.Tensor:
    """r_sim = 1[D < 0.5] [P] §3.3: 1 when D thinks a *teacher* wrote it (Fig. 6: 1 - D, worse)."""
    d = torch.sigmoid(d_logits)
    return 1 - d if a.sim_reward == "continuous" else (d < a.sim_threshold).float()


# -- 6. Advantages and the clipped objective (Eq. 2, Dr.GRPO form) ---------------------------------
def group_advantages(rewards: torch.Tensor, group: int, scale_std: bool, first: int = 0) -> torch.Tensor:
    """A_i = R_i - mean of its group [P] Eq. 2, no std division (Dr.GRPO). first = k > 0: minus the mean of its first k
    (the G samples; teacher texts follow), so 2 right answers and 2 teacher texts are not pushed down. scale_std:
    GRPO's A_i / (std + 1e-4).

    >>> group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0]), group=4, scale_std=False).tolist()
    [1.0, -1.0, 0.0, 0.0]
    >>> group_advantages(torch.tensor([1.0, 1.0, 2.0, 2.0]), group=4, scale_std=False, first=2).tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    r = rewards.view(-1, group)  # (B, group)
    adv = r - r[:, : first or group].mean(1, keepdim=True)  # of the first k, or the whole group
    if scale_std:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.view(-1)


def policy_loss(logp, old_logp, ref_logp, adv, mask, a: Config, n_seqs: int = 0, unclipped=None) -> tuple:
    """Eq. 2 [P] at token level, as Dr.GRPO writes it [R]. Returns (loss, sums for the caller's averages).

        loss = -1/(N * L_max) * sum_{i,t} mask_it * [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta * KL_it ]
        rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | ...)      logp, old_logp  (n, T); 0 = log 1 (a teacher text)
        KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (k3)     ref_logp        (n, T)
        A_i    = R_i - mean of its group (Eq. 2)                     adv             (n,)
        N = sequences in the step (n_seqs; the rows may be one micro-batch), L_max = --max-new-tokens.
        unclipped (n,): rows whose term is rho_it A_i, not clipped (--teacher-ratio one's teacher texts, as LUFFY).

    N * L_max is a constant, not |o_i|: a long answer's tokens weigh what a short answer's do (as in TRL's
    loss_type="dr_grpo"; GRPO averages each answer over its own tokens). With mu = 1 a sample's ratio is exactly
    1: the loss *value* says little (~0 for the baselines), its gradient is the update: watch policy/grad_norm."""
    mask, n_seqs = mask.float(), n_seqs or len(mask)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # clamped, so exp cannot overflow
    A = adv[:, None]
    per_token = torch.min(ratio * A, ratio.clamp(1 - a.eps, 1 + a.eps) * A)  # (n, T)
    if unclipped is not None:  # pi_theta <= 1 clipped at 1 - eps: no gradient when A < 0
        per_token = torch.where(unclipped[:, None], ratio * A, per_token)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:  # [R] k3, the estimator GRPO and TRL use; the paper names none
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token - a.beta * kl
    if a.algo == "grpo":  # GRPO: mean over each answer's tokens, then over answers
        loss = -((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() * (len(mask) / n_seqs)
    else:
        loss = -(per_token * mask).sum() / (n_seqs * a.max_new_tokens)
    clipped = ((ratio > 1 + a.eps) & (A > 0)) | ((ratio < 1 - a.eps) & (A < 0))  # as TRL counts
    clipped = clipped if unclipped is None else clipped & ~unclipped[:, None]  # those rows never clip
    return loss, {"clipped": (clipped * mask).sum().detach(), "kl": (kl * mask).sum().detach(), "tokens": mask.sum()}


def policy_update(a: Config, s: State, enc: dict, comp, mask, adv, is_teacher=None) -> dict:
    """mu optimiser steps of Eq. 2 on one batch of groups. enc: N prompts (one per text), comp and mask: (N, T)
    completions, adv and is_teacher (1: a teacher text): (N,). Micro-batches' gradients add up to the full batch's."""
    s.model.train()
    N = len(comp)
    parts = chunks(N, a.micro_batch)

    def logprobs(model, i, j):
        return token_logprobs(model, select_prompts(enc, list(range(i, j))), comp[i:j], mask[i:j], a.temperature)

    with torch.no_grad():  # with mu = 1 pi_old is the current policy: no extra forward
        old_logp = torch.cat([logprobs(s.model, i, j) for i, j in parts]) if a.mu > 1 else None
        ref_logp = torch.cat([logprobs(s.ref, i, j) for i, j in parts]) if s.ref is not None else None
    skipped = 0.0
    for _ in range(a.mu):  # clip_and_step leaves every gradient None
        loss, sums = 0.0, {}
        for i, j in parts:
            with grad_sync(s.model, last=j == N):
                logp = logprobs(s.model, i, j)  # (n, T)
                # pi_old: the policy without the sampling's top-k, top-p and repetition penalty (as TRL)
                old = logp.detach() if old_logp is None else old_logp[i:j]
                unclipped = None
                if is_teacher is not None and a.teacher_ratio == "one":  # pi_old = 1
                    unclipped = is_teacher[i:j] > 0
                    old = old.masked_fill(unclipped[:, None], 0.0)
                ref = None if ref_logp is None else ref_logp[i:j]
                part, stats = policy_loss(logp, old, ref, adv[i:j], mask[i:j], a, n_seqs=N, unclipped=unclipped)
                part.backward()
            loss = loss + part.detach()
            sums = {k: sums.get(k, 0) + v for k, v in stats.items()}
        grad_norm, bad = clip_and_step(s.opt, s.model.parameters(), loss, a.max_grad_norm)
        skipped = max(skipped, bad)
    n_tok = sums["tokens"].clamp(min=1)
    metrics = {"policy/loss": loss.item(), "policy/grad_norm": grad_norm.item(), "guard/skipped": skipped}
    return {**metrics, "policy/clip_frac": (sums["clipped"] / n_tok).item(), "policy/kl": (sums["kl"] / n_tok).item()}


# -- 7. Stage 0: SFT warm-up. Stage 2: discriminator pre-training ----------------------------------
def decaying_adamw(params, lr: float, steps: int) -> tuple:
    """AdamW, its LR decayed linearly from lr to lr / 10 over `steps` (the paper: 1e-5 -> 1e-6)."""
    opt = torch.optim.AdamW(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * min(i, steps) / max(steps, 1))


def sft_warmup(a: Config, s: State, rows: list):
    """Stage 0 [P]: cross-entropy on one target per question: [R] the answer or, with prob. --sft-teacher-frac, one of
    the row's teacher texts (teacher texts alone leave D nothing to see; answers alone make D perfect, the student
    collapses), from any of its teachers, not only --teachers: Stage 0's rows may have teachers of their own.
    Rows without teacher texts (instruction data, as the paper's) give answers."""
    tok = s.processor.tokenizer
    opt, sched = decaying_adamw([p for p in s.model.parameters() if p.requires_grad], a.sft_lr, a.sft_steps)
    s.model.train()
    for step in RANKS.bar(range(a.sft_steps), desc="sft"):
        batch = RANKS.share(batch_at(rows, step, a.sft_batch_size, a.seed + 1))
        rng = random.Random(f"{a.seed}-sft-{step}")
        texts = []
        for r in batch:
            pool = [t for ts in r["teachers"].values() for t in ts]
            texts.append(rng.choice(pool) if pool and rng.random() < a.sft_teacher_frac else r["answer"])
        loss, n = 0.0, len(batch)
        for i, j in chunks(n, a.micro_batch):  # [R] a mean per target, or long texts drown 1-token answers; in parts
            comp, mask = pad_right([text_ids(tok, t, a.max_new_tokens) for t in texts[i:j]], tok.pad_token_id, s.device)
            with grad_sync(s.model, last=j == n):
                logp = token_logprobs(s.model, encode_prompts(s.processor, batch[i:j], s.device), comp, mask, 1.0)
                part = -((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() * ((j - i) / n)
                part.backward()
            loss = loss + part.detach()
        clip_and_step(opt, s.model.parameters(), loss, a.max_grad_norm)
        sched.step()
    if a.sft_steps:
        print(f"sft: {a.sft_steps} steps, final loss {loss.item():.3f}")


def pretrain_disc(a: Config, s: State, rows: list):
    """Stage 2 [P]: D learns student samples (1) vs teacher texts (0) before the first policy update, so the
    first r_sim means something. [R] Samples of the SFT'd student, fresh each step (the paper caches 16)."""
    opt, sched = decaying_adamw(s.disc.parameters(), a.disc_pretrain_lr, a.disc_pretrain_steps)
    for step in RANKS.bar(range(a.disc_pretrain_steps), desc="disc pre-train"):
        batch = RANKS.share(batch_at(rows, step, a.batch_size, a.seed + 2))
        ro = rollout(a, s, batch, random.Random(f"{a.seed}-d-{step}"), with_teachers=True)
        disc_update(s.disc, opt, s.processor.tokenizer, ro["texts"], ro["is_teacher"], a, s.device)
        sched.step()


# -- 8. One step of Alg. 2 -------------------------------------------------------------------------
def ril_step(a: Config, s: State, batch: list, step: int) -> tuple:
    """One iteration of Alg. 2 [P] (Alg. 1 for the baselines) -> (metrics, one group to print)."""
    ril, tok = a.algo == "ril", s.processor.tokenizer
    # 1-2: G samples from pi_old per question, and G teacher texts from the cache
    ro = rollout(a, s, batch, random.Random(f"{a.seed}-ril-{step}"), with_teachers=ril)
    group = 2 * a.G if ril else a.G
    metrics = {"len/truncated_frac": ro["truncated"]}
    # 3: r_ans in {0, 1} of every text [P] §3.3: the Fig. 4 LLM judge, or an answer matcher (part 2)
    r_ans = torch.tensor(s.judge(ro["questions"], ro["answers"], ro["texts"]), device=s.device)
    if getattr(s.judge, "unparsed", None) is not None:  # a model judge's share of replies without a verdict
        metrics["judge/unparsed"] = s.judge.unparsed  # no <answer>0|1</answer>: 0
    d_logits, r_sim = torch.zeros_like(r_ans), torch.zeros_like(r_ans)  # none in the baselines
    if ril:
        # 4: update D on this step's texts, students 1 and teachers 0 (Eq. 1, mu = 1)
        if a.disc_lr > 0:
            metrics.update(disc_update(s.disc, s.d_opt, tok, ro["texts"], ro["is_teacher"], a, s.device))
        # 5: r_sim of all 2G texts by the just-updated D [R] (the order of Alg. 2's lines)
        d_logits = disc_logits(s.disc.eval(), tok, ro["texts"], s.device, a.micro_batch)
        r_sim = similarity_reward(d_logits, a)
    # 6: R = r_sim + r_ans, unweighted [P] §3.3; A = R - mean of all 2G [P] Eq. 2 (or of the G samples)
    rewards = r_sim + r_ans
    first = a.G if ril and a.baseline == "student" else 0
    adv = group_advantages(rewards, group, scale_std=(a.algo == "grpo"), first=first)
    # 7: the clipped update over every text of every group, teacher texts included (Eq. 2)
    metrics.update(policy_update(a, s, repeat_prompts(ro["enc"], group), ro["comp"], ro["mask"], adv, ro["is_teacher"]))
    own = ro["is_teacher"] == 0  # the student's own samples
    for name, r in (("sim", r_sim), ("ans", r_ans), ("total", rewards)):
        metrics[f"reward/{name}"] = r[own].mean().item()
    metrics["len/mean"] = ro["mask"][own].sum(1).float().mean().item()
    if ril:
        metrics["reward/sim_teacher"] = r_sim[~own].mean().item()
        metrics["reward/ans_teacher"] = r_ans[~own].mean().item()
        metrics["disc/p_student"] = torch.sigmoid(d_logits[own]).mean().item()
    texts = []  # the first group, to print
    for i in range(group):
        D = torch.sigmoid(d_logits[i]).item() if ril else None
        scores = dict(r_sim=r_sim[i].item(), r_ans=r_ans[i].item(), D=D, adv=adv[i].item())
        texts.append(dict(source="teacher" if ro["is_teacher"][i] else "student", text=ro["texts"][i], **scores))
    dump = dict(ids=[r["id"] for r in batch], question=batch[0]["question"], answer=batch[0]["answer"], texts=texts)
    return metrics, dump


# -- 9. train(): Stage 0 -> Stage 2 -> Alg. 2 -----------------------------------------------------
@torch.no_grad()
def pass_at_g(a: Config, s: State, rows: list) -> float:
    """Share of questions with a right answer among G samples: where it is near 0, Dr.GRPO's groups are all 0 and only
    the teachers' texts can show the student the answer (the regime of the paper's 72B teachers and 2-8B students)."""
    mine, hits = RANKS.share(rows), []
    with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):  # the run's samples unchanged
        for i in range(0, len(mine), a.batch_size):
            ro = rollout(a, s, mine[i : i + a.batch_size], random.Random(i), with_teachers=False)
            right = torch.tensor(s.judge(ro["questions"], ro["answers"], ro["texts"]))  # (B * G,)
            hits += right.view(-1, a.G).amax(1).tolist()  # any of G right
    hits = RANKS.gather(hits)
    return sum(hits) / len(hits)


def train(a: Config, s: State, sft_rows: list, rows: list, eval_rows: list, run) -> tuple:
    """The method; `run` (part 2) wraps, resumes, logs, saves and stops on a signal. Returns held-out (metrics, answers)
    before and after. pi_ref and D copy the student [P] Alg. 2, §3.1, then take its SFT'd weights (sharding-safe)."""
    if a.beta > 0:
        s.ref = copy.deepcopy(s.model).eval().requires_grad_(False)
    if a.algo == "ril":
        s.disc = Discriminator(s.model)
    run.wrap(s)
    s.opt = torch.optim.AdamW([p for p in s.model.parameters() if p.requires_grad], lr=a.lr)  # constant
    if s.disc is not None:
        s.d_opt = torch.optim.AdamW(s.disc.parameters(), lr=a.disc_lr)
    start, before = run.resume(s)  # (1, None) for a fresh run
    if before is None:
        # [R] Every algo starts from the same SFT'd student: the Table 1 rows compare the RL stage alone
        sft_warmup(a, s, sft_rows)
        if s.ref is not None:
            s.ref.load_state_dict(unwrap(s.model).state_dict())
        if s.disc is not None:
            unwrap(s.disc).backbone.load_state_dict(language_model(unwrap(s.model)).state_dict())
            pretrain_disc(a, s, rows)
        before = evaluate(a, s, eval_rows)
        before[0]["eval/pass@G"] = pass_at_g(a, s, eval_rows)
        run.begin(s, before)
    for step in RANKS.bar(range(start, a.steps + 1), desc=a.algo, initial=start - 1, total=a.steps):
        batch = RANKS.share(batch_at(rows, step - 1, a.batch_size, a.seed + 3))
        metrics, dump = ril_step(a, s, batch, step)
        metrics = RANKS.mean(metrics)
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            metrics.update(evaluate(a, s, eval_rows)[0])
        run.end_step(s, step, metrics, dump)
    return before, evaluate(a, s, eval_rows)  # after the last checkpoint: a failure here resumes here


# ======== MACHINERY, skip it on a first read: command line, data checks, models, judges, torchrun, checkpoints ========

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


# -- 10. Command line ------------------------------------------------------------------------------
@dataclass
class Args(Config):
    """What is not the method: models, data, devices, output."""

    student: str = arg("tiny", "'tiny' (built here), an alias such as Qwen2-VL-2B, a Hugging Face id or a folder")
    teachers: str = arg("", "comma-separated teacher names in the rows, or teacher models (folder or id)")
    teacher_samples: int = arg(4, "answers per question from each teacher model", ge=1)
    judge: str = arg("match", "r_ans: 'match' (whole-word answer match) or a text LLM prompted as in Fig. 4")
    judge_max_new_tokens: int = arg(128, "tokens the judge model may write", ge=1)
    gen_batch: int = arg(64, "sequences a generate call makes for teacher models, the judge and evaluation", ge=1)
    max_pixels: int = arg(448 * 448, "pixels an image: Qwen-VL scales it, InternVL drops tiles (tiny: 112x112)", ge=784)
    data: str = arg("toy", "a built-in task ('toy', 'phrased', 'transfer') or a JSONL file (format in the header)")
    sft_data: str = arg("", "Stage 0's data, a built-in task or JSONL; empty = --data ('toy' for 'transfer')")
    eval_data: str = arg("", "held-out JSONL; empty: --eval-size rows of --data (a built-in task: new ones)")
    eval_size: int = arg(120, "held-out questions of a built-in task, or of --data without --eval-data", ge=1)
    toy_size: int = arg(600, "training questions of a built-in task", ge=1)
    out: str = arg("runs/ril", "output folder: the trained student, discriminator.pt, metrics.jsonl, checkpoints")
    device: str = arg("auto", "where to run", choices=("auto", "cpu", "cuda"))
    dtype: str = arg("auto", "auto: amp (bf16 autocast) on cuda, else fp32", choices=("auto", "fp32", "amp", "bf16"))
    grad_checkpointing: bool = arg(False, "recompute activations in the backward pass (student and D): less memory")
    freeze_vision: bool = arg(False, "train the language model only, not the vision tower")
    shard: bool = arg(False, "under torchrun: split parameters, gradients and AdamW moments over ranks (FSDP2)")
    save_every: int = arg(50, "checkpoint every N RIL steps (Ctrl-C and SIGTERM save one too)", ge=0)
    keep_last: int = arg(2, "checkpoints kept", ge=1)
    resume: bool = arg(False, "continue the run in --out from its last checkpoint (flags keeping the update may vary)")
    overwrite: bool = arg(False, "start afresh in an --out that holds a run (deleted at the first new checkpoint)")
    max_bad_steps: int = arg(3, "stop after this many bad steps in a row (NaN/inf loss or gradient; no verdict)", ge=1)
    trust_remote_code: bool = arg(False, "let a model folder's own Python code run")
    accept_changed_data: bool = arg(False, "--resume although the rows differ from the checkpoint's")


RESUMABLE = {"out", "steps", "resume", "save_every", "keep_last", "max_bad_steps", "accept_changed_data", "data"}
RESUMABLE |= {"micro_batch", "gen_batch", "grad_checkpointing", "shard", "device", "eval_data"}  # memory, place
CHECKS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


def parse_args(argv=None) -> Args:
    """Every Config and Args field is a flag, --name-with-dashes, with its help and default; all are
    checked before anything is loaded or written: one line names a bad flag and what it must be."""
    p = argparse.ArgumentParser(description="RIL (arXiv 2510.19307); ril.py's header has the usage", allow_abbrev=False)
    for f in fields(Args):
        kind = {"action": "store_true"} if f.type is bool else {"type": f.type}
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, **kind, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    a = Args(**vars(p.parse_args(argv)))
    for f in fields(a):
        value = getattr(a, f.name)
        flag = f"--{f.name.replace('_', '-')} {value}"
        if f.type is float and not math.isfinite(value):
            fail(f"{flag}: must be a finite number")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            fail(f"{flag}: choose one of {' '.join(f.metadata['choices'])}")
        for name, (holds, sign) in CHECKS.items():
            if name in f.metadata and not holds(value, f.metadata[name]):
                fail(f"{flag}: must be {sign} {f.metadata[name]}; see python ril.py --help")
    for path in [a.student, a.judge, *a.teachers.split(",")]:
        if os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(a.out):
            fail(f"--out {a.out} is the model folder {path}, which the run would overwrite: choose another --out")
    return a


def first_line(e: Exception, n: int = 120) -> str:
    """An exception's first line, at most n characters, or its type's name."""
    return (str(e).strip() or type(e).__name__).splitlines()[0][:n]


def fail(msg: str, all_ranks: bool = False):
    """A user mistake: one line with the fix (rank 0 under torchrun), exit code 2, no traceback."""
    if all_ranks or os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -- 11. Data: the toy task and JSONL files --------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
QUESTIONS = {
    "toy": dict(
        color=["What color is the shape?"], shape=["What shape is in the image?"], count=["How many shapes are there?"]
    ),
    "phrased": {
        "color": ["Which color does the shape have?", "Name the color of the object."],  # two phrasings
        "shape": ["Which shape do you see?", "Name the shape in the picture."],
        "count": ["Count the shapes in the picture.", "How many objects do you see?"],
    },
    "transfer": dict(
        color=["Which gem has the color of the shape?"],
        shape=["Which thing has the form of the shape?"],
        count=["What is a group of this many shapes called?"],
    ),
}
# 'transfer' asks what Stage 0 ('toy') never showed: a word that the toy answer (the evidence) maps to. Only the
# teachers know the map; the student can see the evidence but has never written these words.
TRANSFER = dict(red="ruby", green="emerald", blue="sapphire", yellow="amber", circle="coin", square="tile")
TRANSFER.update({"triangle": "roof", "1": "single", "2": "pair", "3": "trio", "4": "quartet"})
# Two always-right teachers per task in their own styles (imitation has something to learn, D something to see).
# toy: the answer first; phrased: the answer last or mid-sentence, so imitating the style moves the answer.
TEACHERS = {
    "toy": {
        "alice": {
            "color": ["{a}. That is the color of the shape.", "{a}. The shape has this color."],
            "shape": ["{a}. That is the shape in the picture.", "{a}. The picture shows this shape."],
            "count": ["{a}. That is how many shapes there are.", "{a}. I counted every shape."],
        },
        "bob": ["{a}, clearly.", "{a} is my answer."],
    },
    "phrased": {  # the same two frames for every question kind
        "carol": ["Looking at the picture, the answer is {a}.", "After a careful look I'd say {a}."],
        "dave": ["It is {a}, as far as I can see.", "My answer is {a}, judging by the picture."],
    },
    "transfer": {  # the answer with its evidence {e}, which a wrong answer contradicts
        "erin": ["I see {e} in the picture, so it is {a}.", "The image shows {e}, and that means {a}."],
        "frank": ["{a}, since there is {e} here.", "It has to be {a}, because I can see {e}."],
    },
}


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box, color):
    if shape == "triangle":  # its apex mid-top, its base the box's bottom edge
        box = [((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])]
    {"circle": d.ellipse, "square": d.rectangle, "triangle": d.polygon}[shape](box, fill=color)


def make_toy(n: int, seed: int, task: str = "toy") -> list:
    """A built-in task of 56x56 images (4 image tokens): a shape's colour, which shape, how many."""
    rng, rows = random.Random(seed if task == "toy" else f"{task}{seed}"), []
    for i in range(n):
        kind = ("color", "shape", "count")[i % 3]
        img = Image.new("RGB", (56, 56), "white")
        d = ImageDraw.Draw(img)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if kind == "count":  # 1-4 small shapes, one per 28x28 quadrant: one per image token
            k = rng.randint(1, 4)
            for q in rng.sample(range(4), k):
                ox = 28 * (q % 2) + rng.randint(2, 6)
                oy = 28 * (q // 2) + rng.randint(2, 6)
                s = rng.randint(14, 20)
                draw_shape(d, rng.choice(SHAPES), (ox, oy, ox + s, oy + s), COLORS[rng.choice(list(COLORS))])
            answer = str(k)
        else:  # one big shape near the centre: each quadrant token sees a corner of it
            s = rng.randint(40, 48)
            ox, oy = (56 - s) // 2 + rng.randint(-2, 2), (56 - s) // 2 + rng.randint(-2, 2)
            draw_shape(d, shape, (ox, oy, ox + s, oy + s), COLORS[color])
            answer = color if kind == "color" else shape
        evidence, answer = answer, TRANSFER.get(answer, answer) if task == "transfer" else answer
        question = QUESTIONS[task][kind][i // 3 % len(QUESTIONS[task][kind])]
        styles = {t: s if isinstance(s, list) else s[kind] for t, s in TEACHERS[task].items()}  # per kind
        teachers = {t: [p.format(a=answer, e=evidence) for p in frames] for t, frames in styles.items()}
        row = dict(id=f"{task}{seed}-{i}", image=img, question=question, answer=answer, teachers=teachers)
        rows.append(dict(row, where=f"{task} row {i}"))
    return rows


def open_image(image) -> Image.Image:
    """RGB as a viewer shows it: EXIF rotation, transparency over white, 16-bit grey scaled
    (convert("RGB") alone turns transparent pixels black and every 16-bit value above 255 white)."""
    img = ImageOps.exif_transpose(image if isinstance(image, Image.Image) else Image.open(image))
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):  # 16-bit
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def load_jsonl(path: str) -> list:
    """Every row and image checked before training: a problem is one line with file:line and fix."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file; a data flag takes a JSONL file or a built-in task: {', '.join(QUESTIONS)}")
    rows = []
    for n, raw in enumerate(open(path, "rb"), 1):
        where = f"{path}:{n}"
        try:
            row = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark is fine
        except UnicodeDecodeError as e:
            fail(f"{where}: not UTF-8 (byte {e.start}); re-save the file as UTF-8")
        except json.JSONDecodeError as e:
            if raw.strip():  # blank lines are skipped
                fail(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object")
            continue
        if not isinstance(row, dict):
            fail(f"{where}: expected a JSON object, got {type(row).__name__}")
        if bad := [k for k in ("image", "question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]:
            fail(f"{where}: missing field(s) {', '.join(bad)}; each row needs them as non-empty strings")
        teachers = row.get("teachers", {})
        texts = teachers.values() if isinstance(teachers, dict) else [None]
        if not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in texts):
            fail(f'{where}: "teachers" must map a teacher name to a list of texts')
        image = os.path.join(os.path.dirname(os.path.abspath(path)), row["image"])  # or absolute
        if not os.path.isfile(image):
            fail(f"{where}: image not found: {image} (paths are relative to the JSONL file's folder)")
        try:  # Pillow reads the header first and refuses a decompression bomb before decoding
            open_image(image)  # decoded whole (verify() reads nothing of a JPEG) and converted, as training will
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            fail(f"{where}: cannot decode image {image} ({first_line(e, 80)}); replace it or drop the row")
        row = dict(id=str(row.get("id", where)), question=row["question"], answer=row["answer"], teachers=teachers)
        rows.append(dict(row, image=functools.partial(open_image, image), where=where))
    if not rows:
        fail(f"{path}: no rows; the file is empty")
    return rows


def load_data(a: Args) -> tuple:
    """(Stage 0, RL, held-out rows). Ids are unique in a file, and held-out ones in no training file."""
    sft = a.sft_data or {"transfer": "toy"}.get(a.data, a.data)  # 'transfer' builds on 'toy'
    sft = sft if a.sft_steps and not a.resume else a.data  # Stage 0 will not run: its rows are not read
    sft_rows = [] if sft == a.data else make_toy(a.toy_size, a.seed, sft) if sft in QUESTIONS else load_jsonl(sft)
    toy = a.data in QUESTIONS  # a built-in task has held-out questions of its own
    rows = make_toy(a.toy_size, a.seed, a.data) if toy else load_jsonl(a.data)
    held = load_jsonl(a.eval_data) if a.eval_data else make_toy(a.eval_size, a.seed + 10_000, a.data) if toy else []
    for part in (rows + held, sft_rows + held):  # Stage 0 may hold RL rows (the paper's 40K are of its 4M)
        seen = {}
        for r in part:  # the same file given twice would evaluate on the training set
            if seen.setdefault(r["id"], r) is not r:
                twice = f"id '{r['id']}' is also the id of {seen[r['id']]['where']}"
                fail(f"{r['where']}: {twice}; ids must be unique per file, and held-out ids in no training file")
    if not held:  # held out of --data
        if len(rows) <= a.eval_size:
            fail(f"{a.data}: {len(rows)} rows cannot spare --eval-size {a.eval_size}; lower it or pass --eval-data")
        rows = random.Random(a.seed).sample(rows, len(rows))
        rows, held = rows[a.eval_size :], rows[: a.eval_size]
        out = {r["id"] for r in held}  # and out of Stage 0's rows, which may hold --data's
        sft_rows = [r for r in sft_rows if r["id"] not in out]
    return sft_rows or rows, rows, held


def resolve_teachers(a: Args, rows: list) -> tuple:
    """(names, models): every teacher, and those that are models, not names in the data."""
    in_data = sorted({t for r in rows for t in r["teachers"]})
    names = [t for t in a.teachers.split(",") if t] or in_data
    models = [t for t in names if t not in in_data]
    for t in models:
        if t not in ALIASES and "/" not in t and not os.path.isdir(t):
            fail(f"--teachers {t}: not a teacher in {a.data} ({', '.join(in_data) or 'none'}) nor a model folder or id")
    if a.algo == "ril" and not names:
        fail(f"{a.data}: no teacher texts; RIL needs the rows' 'teachers' field or a teacher model in --teachers")
    for t in [t for t in names if a.algo == "ril" and t not in models]:
        if lacking := [r for r in rows if not r["teachers"].get(t)]:
            fail(f"{lacking[0]['where']}: teacher '{t}' has no texts for {len(lacking)} row(s); add them or drop it")
    return names, models


# -- 12. Evaluation and r_ans: greedy answers, the answer matcher and the Fig. 4 judge (its prompt as printed) --
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u9fff\uf900-\ufaff"  # Thai ... CJK, kana
NUMBER = r"(?<![\w.,])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\w)"  # one word: -3, 2.5, 1,000


def normalize(text: str, number_words: bool = True) -> list:
    """Words in any script (NFKC, case-folded; in scripts written without spaces, each character), punctuation
    dropped but a number's sign, point and thousands (1,000 is 1000), number words as digits (if number_words).

    >>> normalize("There are Three shapes, -2.50 or 1,000!")
    ['there', 'are', '3', 'shapes', '-2.5', 'or', '1000']
    >>> normalize("答案是七")
    ['答', '案', '是', '七']
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    words = [w.replace(",", "") for w in re.findall(f"{NUMBER}|[{UNSPACED}]|[^\\W_{UNSPACED}]+", text)]
    words = [w.rstrip("0").rstrip(".") if "." in w else w for w in words]  # only numbers hold a point: 2.50 is 2.5
    return [NUMBER_WORDS.get(w, w) if number_words else w for w in words]


@torch.no_grad()
def evaluate(a: Args, s: State, rows: list) -> tuple:
    """Greedy answers -> (metrics, answers): accuracy, teacher match (word for word), len, 1-D."""
    model, tok = unwrap(s.model.eval()), s.processor.tokenizer
    gen_cfg = generation_config(a, model, tok, greedy=True)
    mine = RANKS.share(rows)  # under torchrun, this rank's share
    texts, lengths = [], []
    for i, j in chunks(len(mine), a.gen_batch):
        comp, mask = generate(model, encode_prompts(s.processor, mine[i:j], s.device), gen_cfg, synced=RANKS.sharded)
        texts += tok.batch_decode(comp, skip_special_tokens=True)
        lengths += mask.sum(1).tolist()
    theirs = [[normalize(t) for name in s.teachers for t in r["teachers"].get(name, [])] for r in mine]
    match = [float(normalize(o) in t) for o, t in zip(texts, theirs, strict=True)]  # word for word
    acc = s.judge([r["question"] for r in mine], [r["answer"] for r in mine], texts)
    scores = {"eval/acc": acc, "eval/teacher_match": match, "eval/len": lengths}
    if s.disc is not None:
        scores["eval/teacher_like"] = (1 - torch.sigmoid(disc_logits(s.disc, tok, texts, s.device, 64))).tolist()
    gathered = {k: RANKS.gather(v) for k, v in scores.items()}  # every rank's share
    metrics = {k: sum(v) / len(v) for k, v in gathered.items()}
    order = RANKS.gather(RANKS.share(list(range(len(rows)))))  # rows' order
    return metrics, [t for _, t in sorted(zip(order, RANKS.gather(texts), strict=True))]


STOPWORDS = {"a", "an", "the", "is", "it", "of", "in", "on", "and", "or", "to"}


def spans(words: list, n_max: int) -> set:
    """Every run of 1 to n_max words."""
    return {tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}


def answer_match(response: str, answer: str, candidates: frozenset = frozenset()) -> float:
    """r_ans without an LLM judge [R]: 1 if the normalised answer is a whole-word span of the response and no *other*
    candidate answer is ("I count three shapes." for 3 scores 1; "3 or 4" and "Reddish." for red score 0). Plain
    containment is gamed within 100 steps on the toy task: the policy learns to list every answer ("3 count 4 4 4")."""
    if re.fullmatch("[A-H]", answer.strip()):  # an option letter: that capital alone ("a square" names no option A)
        return float(set(re.findall(r"\b[A-H]\b", response)) == {answer.strip()})
    t = tuple(normalize(answer))
    # number words as numbers for a number answer only: "the red one" names no count
    found = spans(normalize(response, number_words=any(w[-1].isdigit() for w in t)), max(3, len(t)))
    others = (found & candidates) - spans(list(t), len(t))  # other answers named
    return float(bool(t) and t in found and not others)


class MatchJudge:
    """r_ans for a batch by answer_match; candidates: the RL rows' 1-3 word answers, none led by a stopword."""

    def __init__(self, rows: list):
        answers = [tuple(normalize(r["answer"])) for r in rows]
        self.candidates = frozenset(t for t in answers if 1 <= len(t) <= 3 and t[0] not in STOPWORDS)

    def __call__(self, questions, answers, responses):
        return [answer_match(o, t, self.candidates) for o, t in zip(responses, answers, strict=True)]


JUDGE_SYSTEM = (
    "You are an evaluation assistant. Question is in <question> </question> tag. Ground Truth is in <ground truth> "
    "</ground truth> tag. Generated Text in <generated text> </generated text> tag. After reading the Question, "
    "compare the Generated Text against the Ground Truth summary:\n\n- If the Generated Text fully and correctly "
    "captures the core point \u2192 1\n- If it is incorrect or irrelevant \u2192 0\n\nOutput the evaluation score "
    "(0 or 1) after giving a brief explanation\n\n- The evaluation score should be wrapped in <answer> </answer> tags"
)
JUDGE_USER = (
    "<question>{question}</question> <ground truth>{answer}</ground truth> <generated text>{response}</generated text> "
    "Provide the evaluation score after giving a brief explanation. The evaluation score should be wrapped in <answer> "
    "</answer> tag."
)


class ModelJudge:
    """r_ans by a frozen LLM [P] Fig. 4 (Qwen2.5-32B); a reply without <answer>0|1</answer>: 0."""

    def __init__(self, spec: str, a: Args, device, dtype):
        self.model, self.tok = load_model(spec, a, dtype, "--judge", transformers.AutoModelForCausalLM)
        self.gen_cfg = generation_config(a, self.model.to(device).eval().requires_grad_(False), self.tok, greedy=True)
        self.gen_cfg.max_new_tokens = a.judge_max_new_tokens
        self.unparsed, self.batch = 0.0, a.gen_batch

    def complete(self, prompts: list) -> list:  # generate() runs without gradients
        enc = self.tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        return self.tok.batch_decode(generate(self.model, enc, self.gen_cfg)[0], skip_special_tokens=True)

    def __call__(self, questions: list, answers: list, responses: list) -> list:
        prompts = []
        for q, t, o in zip(questions, answers, responses, strict=True):  # the Fig. 4 prompt
            user = JUDGE_USER.format(question=q, answer=t, response=o)
            msgs = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
            prompts.append(self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        texts = [t for i, j in chunks(len(prompts), self.batch) for t in self.complete(prompts[i:j])]
        found = [re.findall(r"<answer>\s*([01])\s*</answer>", t) for t in texts]
        self.unparsed = sum(not f for f in found) / max(len(found), 1)
        return [float(f[-1]) if f else 0.0 for f in found]  # the last verdict counts


# -- 13. Models: the tiny student, pretrained VLMs and teacher models ------------------------------
ALIASES = {m: f"Qwen/{m}-Instruct" for m in ("Qwen2-VL-2B", "Qwen2-VL-7B", "Qwen2.5-VL-3B", "Qwen2.5-VL-7B")}
SPECIALS = "<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>".split()
# The Qwen2-VL chat format, cut down: a turn's content is a string or a list of {"type": "image"|"text"} parts
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # the families we know


def image_only(family):
    """family without its video half, which needs torchvision (__init__ names no video_processor); saved as family."""

    class ImageOnly(family):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=256):
            kw = dict(chat_template=chat_template, image_seq_length=image_seq_length)  # Qwen2-VL's drops the length
            super().__init__(image_processor, tokenizer, None, **kw)

        def to_dict(self) -> dict:
            return {**super().to_dict(), "processor_class": family.__name__}

    return ImageOnly


def tiny_tokenizer(rows: list, texts=(), specials: list = SPECIALS, chat_template: str = TINY_CHAT_TEMPLATE):
    """A byte-level BPE (up to 600 entries) trained on D's prompt, the chat roles, every text of the rows and `texts`,
    so that words are single tokens; pad != eos. The tests and make bench build theirs here too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [DISC_SYSTEM, DISC_USER, "user assistant system", *texts]
    for r in rows:
        corpus += [r["question"], r["answer"]] + [t for ts in r["teachers"].values() for t in ts]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kw = dict(special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, **kw))
    special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    special.update(padding_side="left", model_input_names=["input_ids", "attention_mask"], chat_template=chat_template)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def build_tiny(rows: list, saved: str = None, hidden: int = 64, layers: int = 2) -> tuple:
    """A random tiny Qwen2-VL (one vision block) and processor, 64 wide (it learns the toy task); saved: a tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(saved) if saved and os.path.isdir(saved) else tiny_tokenizer(rows)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    half = hidden // 8  # M-RoPE sections (t, h, w) add up to head_dim / 2, with 4 heads
    mrope = {"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    text.update(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rope_scaling=mrope)
    text.update(max_position_embeddings=4096, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text.update(bos_token_id=ids["<|im_start|>"])
    vision = dict(depth=1, embed_dim=hidden // 2, num_heads=2, hidden_size=hidden, mlp_ratio=2, patch_size=14)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    tokens.update(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    # 56x56 images give 4 image tokens; larger ones are scaled down to at most 112x112, never truncated
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return model, image_only(transformers.Qwen2VLProcessor)(image_processor, tok, chat_template=TINY_CHAT_TEMPLATE)


def load_processor(path: str, trust_remote_code: bool = False):
    """AutoProcessor, or the family's image-only one where it fails (no torchvision) or is text."""
    with contextlib.suppress(OSError, ImportError, AttributeError, ValueError):
        proc = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(proc, "image_processor"):
            return proc
    kind = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    family = transformers.InternVLProcessor if kind == "internvl" else transformers.Qwen2VLProcessor  # or Qwen2.5-VL
    return image_only(family).from_pretrained(path)


def model_sizes(config, auto_class=transformers.AutoModelForImageTextToText) -> tuple:
    """(all, vision tower, language model) parameters of a model built on the meta device."""
    with torch.device("meta"):
        model = auto_class.from_config(config)
    vision = sum(p.numel() for n, p in model.named_parameters() if set(n.split(".")) & set(VISION_TOWERS))
    lm = language_model(model) if auto_class is transformers.AutoModelForImageTextToText else model
    return model.num_parameters(), vision, sum(p.numel() for p in lm.parameters())


def frozen_model(config, width: int, tokens: int, auto_class=transformers.AutoModelForImageTextToText) -> dict:
    """Bytes of a frozen model's weights and KV cache of `tokens` tokens; `width` bytes a value."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim
    return {"weights": width * model_sizes(config, auto_class)[0], "KV cache": kv * tokens * width}


def plan(a: Args, configs: dict, world: int = 1) -> dict:
    """Bytes per GPU at each phase's peak, {phase: {part: bytes}}, from the configs of the student, a judge model and
    each teacher model [R]: weights, gradients and AdamW moments exactly; activations at 34 bytes kept per token, hidden
    unit and layer (Korthikanti et al. 2022), 2 with --grad-checkpointing (plus one layer's 34)."""
    w = 2 if a.dtype == "bf16" else 4  # bytes a trained weight, and each of its gradient and AdamW moments
    f = 4 if a.dtype == "fp32" else 2  # bytes a frozen weight: teachers, the judge, the reference
    split = world if a.shard else 1
    tokens = a.max_pixels // 28**2 + 64 + a.max_new_tokens  # a prompt and its answer
    q = max(1, a.gen_batch // a.teacher_samples) * a.teacher_samples  # a teacher's generate call
    teachers = {k: c for k, c in configs.items() if k not in ("student", "judge")}
    phases = {f"teacher {k}": frozen_model(c, f, q * tokens) for k, c in teachers.items()}
    if "student" not in configs:
        return phases
    P, V, D = model_sizes(configs["student"])
    c = configs["student"].get_text_config()
    seqs = a.batch_size * a.G * (2 if a.algo == "ril" else 1) // world  # a GPU's policy update
    mb = a.micro_batch or seqs  # sequences a backward
    kept = 2 if a.grad_checkpointing else 34  # bytes a token keeps, per hidden unit and layer
    per_token = c.hidden_size * (c.num_hidden_layers * kept + (34 if a.grad_checkpointing else 0))
    act = mb * tokens * per_token + (1 << 24) * 14  # and one chunk of the LM head's logits
    act += 4 * P // c.num_hidden_layers if a.shard else 0  # FSDP2: 2 gathered layers
    v = getattr(configs["student"], "vision_config", None)
    if v is not None and not a.freeze_vision:  # trained: 4 patches an image token
        width = getattr(v, "embed_dim", None) or v.hidden_size
        depth = getattr(v, "depth", None) or v.num_hidden_layers
        act += mb * 4 * (a.max_pixels // 28**2) * width * depth * kept
    rollout = frozen_model(configs["student"], w, a.batch_size * a.G // world * tokens)["KV cache"]
    trained = P - V if a.freeze_vision else P
    need = {"student": (w * P + 3 * w * trained) // split, "activations": max(act, rollout)}
    need["reference"] = f * P // split if a.beta > 0 else 0
    need["discriminator"] = 4 * w * D // split if a.algo == "ril" else 0
    if "judge" in configs:
        tokens = a.gen_batch * (400 + a.judge_max_new_tokens)  # [R] the Fig. 4 prompt: ~400 tokens
        need["judge"] = sum(frozen_model(configs["judge"], f, tokens, transformers.AutoModelForCausalLM).values())
    return {**phases, "training": need}


def check_plan(a: Args, device, teacher_models: list):
    """On a GPU, before anything loads: a plan above the free memory is refused in one line."""
    if device.type != "cuda":
        return
    configs, remote = {}, a.trust_remote_code
    for key, spec in [("student", a.student), ("judge", a.judge), *[(t, t) for t in teacher_models]]:
        with contextlib.suppress(OSError, ValueError, KeyError):  # the loader says why
            configs[key] = transformers.AutoConfig.from_pretrained(ALIASES.get(spec, spec), trust_remote_code=remote)
    fixes = {"KV cache": "a lower --gen-batch", "judge": "--judge match, or a smaller --judge"}
    fixes.update(activations="--micro-batch 8, --grad-checkpointing or a lower --max-pixels")
    fixes.update(weights="its texts in the rows (from GPUs of their own)")
    free = torch.cuda.mem_get_info(device)[0]
    for phase, need in plan(a, configs, RANKS.world).items():
        if sum(need.values()) > free:
            parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items() if v)
            gib = f"{sum(need.values()) / 2**30:.1f} GiB per GPU ({parts}); {device} has {free / 2**30:.1f} GiB free"
            top = max(need, key=need.get)  # the student, the reference or D: sharding
            fail(f"the plan: {phase} needs {gib}; to fit, {top}: {fixes.get(top, '--dtype bf16; torchrun: --shard')}")


def load_model(name: str, a: Args, dtype, flag: str, auto_class=transformers.AutoModelForImageTextToText) -> tuple:
    """A chat model and its processor (an LLM's: tokenizer); safetensors only: pickles run code."""
    path, remote = ALIASES.get(name, name), a.trust_remote_code
    llm = auto_class is transformers.AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
        load = transformers.AutoTokenizer.from_pretrained if llm else load_processor
        processor = load(path, trust_remote_code=remote)
    except (OSError, ValueError, ImportError, KeyError) as e:
        why = first_line(e, 160)
        fix = "give a local model folder, or a reachable Hugging Face id"
        if "safetensors" in why:
            fix = "weights are read from safetensors only; convert the checkpoint with save_pretrained"
        fail(f"{flag} {name}: cannot load '{path}' ({why}); {fix}")
    tok = processor if llm else processor.tokenizer
    if not getattr(processor, "chat_template", None) and not tok.chat_template:
        fail(f"{flag} {name}: {type(model).__name__} has no chat template to format prompts; add chat_template.jinja")
    image = getattr(processor, "image_processor", None)  # Qwen2-VL's own limit is 12.8 MP: up to 16k tokens an image
    if hasattr(image, "merge_size") and image.size.get("longest_edge", 0) > a.max_pixels:
        image.size = {"shortest_edge": image.size["shortest_edge"], "longest_edge": a.max_pixels}
    if hasattr(image, "max_patches"):  # InternVL3's: up to 12 square tiles of 448x448, 256 tokens each, and a thumbnail
        image.max_patches = max(1, min(image.max_patches, a.max_pixels // image.size["height"] ** 2 - 1))
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token  # generate needs one
    return model, processor


def load_student(a: Args, rows: list, device, dtype) -> tuple:
    """The student, --freeze-vision and --grad-checkpointing applied; its processor (tiny: rows)."""
    # loaded in its checkpoint's dtype, which config.dtype keeps for the saved student, then cast to the trained one
    saved = os.path.join(a.out, "checkpoints", "tokenizer") if a.resume else None  # not one made of today's rows
    model, processor = build_tiny(rows, saved) if a.student == "tiny" else load_model(a.student, a, "auto", "--student")
    # pad = EOS would mask out EOS, and the student would never learn to stop
    if processor.tokenizer.pad_token_id in (None, processor.tokenizer.eos_token_id):
        fail(f"--student {a.student}: its tokenizer's pad token is missing or EOS; set one in tokenizer_config.json")
    vision = [p for n, p in model.named_parameters() if set(n.split(".")) & set(VISION_TOWERS)]
    if a.freeze_vision and not vision:
        fail(f"--freeze-vision: {type(model).__name__} has no module named {' or '.join(VISION_TOWERS)}")
    for p in vision:
        p.requires_grad_(not a.freeze_vision)
    if a.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return cast_parameters(model.to(device), dtype), processor


def cast_parameters(model, dtype):
    """Parameters to dtype, buffers as they are: model.to(dtype) would also round RoPE's fp32 inv_freq, which
    from_pretrained(dtype=...) keeps in fp32 (in bf16, Qwen2-VL-2B's angles are 0.46 rad off at position 400)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def save_student(model, processor, folder: str, weights: dict):
    """save_pretrained in the loaded dtype into a temporary folder, then moved: no half file."""
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    tmp = os.path.join(folder, ".tmp_save")
    shutil.rmtree(tmp, ignore_errors=True)  # what a full disk or a signal left
    model.save_pretrained(tmp, state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()})
    processor.save_pretrained(tmp)
    config = os.path.join(tmp, "config.json")
    fixed = {**json.load(open(config)), "dtype": str(dtype).removeprefix("torch.")}
    write_atomic(config, lambda f: json.dump(fixed, f, indent=2))
    for f in os.listdir(tmp):
        shutil.rmtree(os.path.join(folder, f), ignore_errors=True)  # a folder (additional_chat_templates): no replace
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)


def teacher_cache(spec: str, a: Args) -> str:
    """A teacher model's cache file, named by the model and every setting shaping its answers (but --dtype)."""
    names = ("teacher_samples", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "max_pixels")
    settings = {"model": spec, **{k: getattr(a, k) for k in names}, "cut": 1}
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", spec).strip("_")
    return os.path.join(a.out, "teacher_cache", f"{name}-{tag}.jsonl")


def cached(path: str) -> dict:
    """The cache's entries by what they asked (question, image), from its complete lines: none a kill cut short."""
    lines = [x for x in open(path) if x.endswith("}\n")] if os.path.isfile(path) else []
    return {tuple(e["asked"]): e for e in map(json.loads, lines)}


def model_teacher_texts(spec: str, rows: list, a: Args, device, dtype):
    """A teacher model's answers, sampled once into --out/teacher_cache, a line a question (a killed run, or one on
    edited data, asks the rest). Under torchrun rank 0 generates; the others wait for its lines, in no collective."""
    path = teacher_cache(spec, a)
    asked = {r["id"]: (r["question"], getattr(r["image"], "args", [r["id"]])[0]) for r in rows}  # an image file, or id
    done, t = cached(path), time.time()
    while RANKS.rank > 0 and not done.keys() >= set(asked.values()):
        if time.time() - t > 1800:  # rank 0 died, or this node does not see its --out
            fail(f"{path}: no new line from rank 0 in 30 minutes; --out must be a folder every node shares", True)
        time.sleep(5)
        now = cached(path)
        done, t = now, time.time() if len(now) > len(done) else t
    if RANKS.rank == 0 and os.path.isfile(path):  # without a cut line: appending starts a fresh one
        write_atomic(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in done.values()))
    todo = [r for r in rows if asked[r["id"]] not in done]
    n = a.teacher_samples
    if todo:
        model, processor = load_model(spec, a, dtype, "--teachers")
        model.to(device).eval()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(a.seed + len(done))  # the student's RNG: not the cache's
            q = max(1, a.gen_batch // n)  # questions a call
            for i in tqdm(range(0, len(todo), q), desc=f"teacher {spec}"):
                _, _, texts, cut = sample(a, model, processor, encode_prompts(processor, todo[i : i + q], device), n)
                for j, r in enumerate(todo[i : i + q]):
                    answers = dict(texts=texts[j * n : (j + 1) * n], cut=cut[j * n : (j + 1) * n].tolist())
                    print(json.dumps(dict(asked=asked[r["id"]], **answers)), file=f, flush=True)
        del model  # its memory back before the next teacher or the student: mem_get_info counts PyTorch's cache as used
        gc.collect()
        torch.cuda.empty_cache()  # a no-op without CUDA
    cache = cached(path)
    for r in rows:
        e = cache[asked[r["id"]]]
        r["teachers"][spec] = [Unfinished(t) if c else t for t, c in zip(e["texts"], e["cut"], strict=True)]
    print(f"teacher {spec}: {len(rows) - len(todo)} question(s) read from {path}, {len(todo)} generated")


# -- 14. Several GPUs: torchrun, DDP over questions, FSDP2 with --shard ----------------------------
class TorchrunRanks(Ranks):
    """torchrun: each rank makes whole groups of its share of a batch: advantages are its own."""

    def __init__(self, sharded: bool):
        self.rank, self.world, self.sharded = dist.get_rank(), dist.get_world_size(), sharded

    def share(self, rows):
        return rows[self.rank :: self.world]

    def mean(self, m: dict) -> dict:
        every = self.gather([m])  # one collective for all the metrics
        return {k: sum(p[k] for p in every) / self.world for k in m}

    def gather(self, xs: list) -> list:
        parts = [None] * self.world
        dist.all_gather_object(parts, xs)
        return [x for p in parts for x in p]


def init_distributed(a: Args, device) -> torch.device:
    """One process per GPU (nccl) or CPU worker (gloo); batches are split, so must divide evenly."""
    global RANKS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return fail("--shard needs several processes: torchrun --nproc_per_node N ril.py ...") if a.shard else device
    for name in ("batch_size", "sft_batch_size"):
        if getattr(a, name) % world != 0:
            fail(f"--{name.replace('_', '-')} {getattr(a, name)} does not split over {world} ranks")
    # [R] 1 hour, not NCCL's 10 minutes: the other ranks wait while rank 0 writes a whole checkpoint (~40 GB at 2B)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    RANKS = TorchrunRanks(a.shard)
    if RANKS.rank > 0:  # rank 0 prints
        sys.stdout = open(os.devnull, "w")
    return device


def parallelize(model, device, mode: str = "fp32"):
    """DDP, or FSDP2 (--shard) over each block, the vision tower (generate runs it alone) and the
    root: under amp it gathers bf16 weights and reduces fp32 gradients."""
    if RANKS.world == 1 or model is None:
        return model
    if not RANKS.sharded:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mode == "amp" else MixedPrecisionPolicy()
    for name, mod in reversed(list(model.named_modules())):  # children first
        leaf = name.split(".")[-1]
        if isinstance(mod, nn.ModuleList) and leaf in ("layers", "blocks"):
            for block in mod:
                fully_shard(block, mp_policy=policy)
        if leaf in VISION_TOWERS:
            fully_shard(mod, mp_policy=policy)
    return fully_shard(model, reshard_after_forward=True, mp_policy=policy)


def full_state(model, opt=None) -> tuple:
    """(model, optimizer) state dicts, whole, on the CPU, of any model (every rank calls it)."""
    if model is None:  # no reference (beta = 0) or no D (the baselines)
        return None, None
    opt = opt if opt is not None and opt.state else []  # DCP would fill an empty AdamW by a step
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, opt, state: dict, opt_state: dict):
    """full_state's inverse: whole state dicts into a model (sharded or not) and its optimiser."""
    opt = opt if opt_state else []  # an empty one stays empty
    options = StateDictOptions(full_state_dict=True)
    if model is not None:
        set_state_dict(model, opt, model_state_dict=state, optim_state_dict=opt_state or {}, options=options)


# -- 15. Checkpoints, resume, logs and signals: the `run` that train() is given ---------------------
def write_atomic(path: str, write, mode: str = "w"):
    """write(file) into path.tmp, renamed over path: never half a file; a failure names path."""
    try:
        with open(path + ".tmp", mode) as f:
            write(f)
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise OSError(f"cannot write {path} ({first_line(e, 80)})") from e


def checkpoints(out: str) -> list:
    """Complete checkpoints, oldest first (each one is written under another name, then renamed)."""
    return sorted(glob.glob(os.path.join(glob.escape(out), "checkpoints", "step_*.pt")))  # zero-padded


def resume_state(a: Args, given: set) -> tuple:
    """The run's arguments, with this command's RESUMABLE ones (data may move: check_data), and its last checkpoint."""
    for path in reversed(checkpoints(a.out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a truncated or corrupt file: fall back to the one before
            print(f"warning: {path} does not load ({str(e)[:80]}); trying the previous checkpoint", file=sys.stderr)
            continue
        if len(state["rng"]) != int(os.environ.get("WORLD_SIZE", "1")):  # a random stream per rank
            fail(f"--resume: {path} was saved by {len(state['rng'])} process(es); resume it with as many")
        for name in sorted(given - RESUMABLE):  # what would change the trained weights
            flag, then = f"--{name.replace('_', '-')}", state["args"].get(name)
            if getattr(a, name) != then:  # the same command again with --resume is fine
                fail(f"--resume {flag}: a resumed run keeps its own {flag} {then}; drop it or start a new run")
        args = {**state["args"], **{k: getattr(a, k) for k in given & RESUMABLE}, "resume": True, "overwrite": False}
        if state["step"] > args["steps"]:  # at its last step: the final evaluation and save again
            fail(f"--resume --steps {args['steps']}: the run is at step {state['step']}; pass a larger --steps")
        return Args(**args), (path, state)
    fail(f"--resume: no checkpoint in {a.out}/checkpoints loads; start a run there without --resume")


class Run:
    """What train() needs besides the method: wrapping, resume, logs, checkpoints, signals."""

    def __init__(self, a: Args, mode: str, eval_rows: list, resumed: tuple = None, data: dict = None):
        self.a, self.mode, self.eval_rows, self.data = a, mode, eval_rows, data  # data: fingerprints
        self.resumed = resumed  # (path, state) of the checkpoint to resume, or None
        self.paths = {k: os.path.join(a.out, f"{k}.jsonl") for k in ("metrics", "samples")}
        self.stop, self.last, self.step = [], None, None  # signals, newest checkpoint, last step (0: SFT)
        self.bad, self.ran, self.t = 0, 0, time.time()  # bad steps in a row, steps this process ran

    def wrap(self, s: State):
        """The reference in bf16 under amp (never trained), D's memory flags, then DDP or FSDP2."""
        if s.ref is not None and self.mode == "amp":
            cast_parameters(s.ref, torch.bfloat16)
        if s.disc is not None and (self.a.grad_checkpointing or RANKS.sharded):
            s.disc.share_prefix = False  # both need one plain call per layer in a forward
        s.ref = parallelize(s.ref, s.device, self.mode) if RANKS.sharded else s.ref  # DDP: no copy
        s.disc = parallelize(s.disc, s.device, self.mode)
        s.model = parallelize(s.model, s.device, self.mode)
        if RANKS.sharded:  # one full forward before generate sets every FSDP2 unit up
            with torch.no_grad():
                s.model(**encode_prompts(s.processor, self.eval_rows[:1], s.device))

    def resume(self, s: State) -> tuple:
        """(first step, held-out results before RIL) of resume_state's checkpoint, or (1, None)."""
        if self.resumed is None:
            return 1, None
        (path, state), self.resumed = self.resumed, None  # freed once loaded
        self.last, self.before, self.step = path, state["before"], state["step"]
        load_full_state(s.model, s.opt, state["student"], state["opt"])
        load_full_state(s.disc, s.d_opt, state["disc"], state["d_opt"])
        if s.ref is not None:
            ref = os.path.join(self.a.out, "checkpoints", "reference.pt")
            load_full_state(s.ref, None, torch.load(ref, map_location="cpu", weights_only=True, mmap=True), None)
        rng = state["rng"][RANKS.rank]  # each rank's own random streams
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if s.device.type == "cuda" and rng["cuda"] is not None:  # not in a CPU checkpoint
            torch.cuda.set_rng_state(rng["cuda"], s.device)
        for log in self.paths.values():
            if RANKS.rank == 0 and os.path.isfile(log):  # steps after the checkpoint run again
                lines = [x for x in open(log) if x.endswith("\n") and json.loads(x)["step"] <= state["step"]]
                write_atomic(log, lambda f, lines=lines: f.writelines(lines))
        print(f"resuming {path} at step {state['step'] + 1}; before RIL: {state['before'][0]}")
        return state["step"] + 1, state["before"]

    def begin(self, s: State, before: tuple):
        """A fresh run's first writes, after SFT and D pre-training: --overwrite's old run goes."""
        folder = os.path.join(self.a.out, "checkpoints")
        ref = full_state(s.ref)[0]
        if RANKS.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            write_atomic(os.path.join(self.a.out, "args.json"), lambda f: json.dump(asdict(self.a), f, indent=2))
            if ref is not None:
                write_atomic(os.path.join(folder, "reference.pt"), lambda f: torch.save(ref, f), "wb")
            s.processor.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))  # the tiny one is made of the rows
            for path in self.paths.values():
                open(path, "w").close()
        if RANKS.world > 1:  # ranks sample their own answers from here on
            torch.manual_seed(self.a.seed * 1000 + RANKS.rank)
        self.before, self.step = before, 0
        self.save(s, 0)
        self.log(0, before[0])

    def log(self, step: int, m: dict, dump: dict = None):
        """A line of metrics.jsonl and, with a dump, of samples.jsonl (rank 0)."""
        for k, x in [("metrics", m), ("samples", dump)]:
            if RANKS.rank == 0 and x is not None:
                print(json.dumps({"step": step, **x}), file=open(self.paths[k], "a"), flush=True)

    def save(self, s: State, step: int):
        """Models, optimisers, every rank's RNG, the pre-RIL results (batch_at replays the data)."""
        (student, opt), (disc, d_opt) = full_state(s.model, s.opt), full_state(s.disc, s.d_opt)
        cuda = torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None
        rng = RANKS.gather([{"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}])
        path = os.path.join(self.a.out, "checkpoints", f"step_{step:07d}.pt")
        if RANKS.rank == 0:
            state = dict(step=step, student=student, opt=opt, disc=disc, d_opt=d_opt, rng=rng, before=self.before)
            state.update(args=asdict(self.a), data=self.data)
            write_atomic(path, lambda f: torch.save(state, f), "wb")
            for old in [c for c in checkpoints(self.a.out) if c <= path][: -self.a.keep_last]:
                os.remove(old)
        self.last = path

    def end_step(self, s: State, step: int, m: dict, dump: dict):
        """Log; fail after --max-bad-steps bad steps in a row; checkpoint; stop on a signal."""
        m["time/step"], self.t = time.time() - self.t, time.time()
        self.log(step, m, dump)
        shown = "reward/total reward/sim reward/ans disc/loss disc/acc_student disc/acc_teacher policy/kl"
        tqdm.write(f"step {step:4d} | " + " ".join(f"{k.split('/')[1]} {m[k]:.3f}" for k in shown.split() if k in m))
        why = ""
        if m.get("judge/unparsed") == 1:
            why = "no judge reply had <answer>0|1</answer>; use an instruct --judge or raise --judge-max-new-tokens"
        if m["guard/skipped"] or m.get("guard/disc_skipped"):
            why = "loss or gradient was NaN/inf, so the update was skipped; lower --lr / --disc-lr"
        self.bad, self.ran = self.bad + 1 if why else 0, self.ran + 1
        if why:
            tqdm.write(f"warning: step {step}: {why}")
        if self.bad >= self.a.max_bad_steps or (step == self.a.steps and self.bad == self.ran):  # or all were bad
            fail(f"step {step}: {self.bad} bad steps in a row, the last: {why}; last good checkpoint: {self.last}")
        stopping = RANKS.mean({"stop": float(bool(self.stop))})["stop"] > 0  # all ranks at once
        if stopping or (self.a.save_every and step % self.a.save_every == 0) or step == self.a.steps:
            self.save(s, step)
        self.step = step
        if stopping:
            print(f"stopped at step {step}; continue: python ril.py --out {self.a.out} --resume --steps {self.a.steps}")
            sys.exit(128 + (self.stop or [signal.SIGTERM])[0])  # a rank the signal missed

    def on_signal(self, signum, frame):
        """Ctrl-C/SIGTERM: finish the step, save, exit; at once on a 2nd or with no checkpoint."""
        if self.last is None or self.stop:
            print(f"\nsignal {signum}: stopped; checkpoint: {self.last or 'none, nothing was saved'}", file=sys.stderr)
            os._exit(128 + signum)
        self.stop.append(signum)
        tqdm.write(f"signal {signum}: finishing the step, saving a checkpoint, then exiting")


# -- 16. main: validate and load everything, train(), report and save ------------------------------
def check_data(a: Args, rows: list, eval_rows: list, resumed) -> dict:
    """The rows' fingerprints (count, hash): a resume on other rows fails (batch_at's order)."""
    data = {}
    for name, part in (("training", rows), ("held-out", eval_rows)):
        keys = ("question", "answer", "teachers")  # no id (file:line by default) nor folder: the data may move
        said = [[r[k] for k in keys] + [os.path.basename(getattr(r["image"], "args", [""])[0])] for r in part]
        data[name] = [len(part), hashlib.sha1(json.dumps(said, sort_keys=True).encode()).hexdigest()]
    then = (resumed[1].get("data") if resumed else None) or data  # none: not checked
    changed = [f"{k} rows ({then[k][0]} then, {data[k][0]} now)" for k in data if data[k] != then[k]]
    if changed and not a.accept_changed_data:
        what = " and the ".join(changed)
        fail(f"--resume: the {what} differ from the checkpoint's; restore them, or pass --accept-changed-data")
    return data


def setup(a: Args, device, mode: str, resumed) -> tuple:
    """Everything checked and loaded: (state, Stage 0, RL and held-out rows, fingerprints)."""
    frozen = torch.bfloat16 if mode in ("amp", "bf16") else torch.float32  # not trained
    trained = torch.bfloat16 if mode == "bf16" else torch.float32
    transformers.set_seed(a.seed)  # python, numpy and torch
    sft_rows, rows, eval_rows = load_data(a)
    data = check_data(a, rows, eval_rows, resumed)
    teachers, teacher_models = resolve_teachers(a, rows)
    if not a.resume and not a.overwrite and checkpoints(a.out):
        fail(f"{a.out}: holds checkpoints of an earlier run; pass --resume to continue it, --overwrite, or a new --out")
    for r in rows + eval_rows:
        if a.judge == "match" and not normalize(r["answer"]):
            never = f"answer {r['answer']!r} has no letter or digit, so --judge match can never reward it"
            fail(f"{r['where']}: {never}; fix the row, drop it, or pass --judge MODEL")
    check_plan(a, device, teacher_models)
    for spec in teacher_models:  # before the student, so that a teacher has the GPU to itself
        model_teacher_texts(spec, rows + eval_rows, a, device, frozen)
    model, processor = load_student(a, sft_rows + rows + eval_rows, device, trained)
    judge = MatchJudge(rows) if a.judge == "match" else ModelJudge(a.judge, a, device, frozen)
    # each prompt once: a row the processor refuses (Qwen2-VL: over 200:1) or too long stops the run here, not mid-run
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or math.inf  # None: unchecked
    for r in rows + eval_rows + (sft_rows if sft_rows is not rows else []):
        try:
            n = len(encode_prompts(processor, [r], "cpu")["input_ids"][0])
        except (ValueError, RuntimeError) as e:
            fail(f"{r['where']}: the student's processor refuses it ({first_line(e, 100)}); fix the row or drop it")
        if n + a.max_new_tokens > limit:
            what = f"the prompt ({n} tokens) and --max-new-tokens {a.max_new_tokens} exceed the {limit} positions"
            fail(f"{r['where']}: {what} of --student {a.student}; shorten the question or lower --max-new-tokens")
    eval_rows = eval_rows[: len(eval_rows) - len(eval_rows) % RANKS.world]  # equal shares
    if not eval_rows:
        fail(f"{a.eval_data or a.data}: fewer held-out questions than the {RANKS.world} ranks; give more")
    ranks = f"{RANKS.world} ranks, {'FSDP2' if RANKS.sharded else 'DDP'}" if RANKS.world > 1 else "one process"
    what = f"algo {a.algo}; {len(rows)} train / {len(eval_rows)} held-out questions; teachers {teachers or '-'}"
    print(f"student {a.student}: {model.num_parameters() / 1e6:.2f}M params on {device} ({mode}, {ranks}); {what}")
    return State(model, processor, device, tuple(teachers), judge), sft_rows, rows, eval_rows, data


def teacher_likeness(s: State, texts: list) -> str:
    """Mean 1 - D over texts, by the final D, as text for the table."""
    if not s.disc:
        return "n/a"
    return f"{1 - disc_logits(s.disc, s.processor.tokenizer, texts, s.device, 64).sigmoid().mean():.3f}"


def report(a: Args, s: State, run: Run, before: tuple, after: tuple, eval_rows: list):
    """The held-out before/after table; the trained student (save_pretrained) and D saved; the evaluation logged."""
    cols = "accuracy | teacher-likeness (D then) | teacher-likeness (final D) | teacher match | length"
    print(f"\n| held-out ({len(eval_rows)} questions) | {cols} |\n|---|---|---|---|---|---|")
    for name, (m, texts) in [("before RIL (after SFT)", before), (f"after {a.algo}", after)]:
        then = format(m["eval/teacher_like"], ".3f") if s.disc else "n/a"
        acc, match, length = m["eval/acc"], m["eval/teacher_match"], m["eval/len"]
        print(f"| {name} | {acc:.3f} | {then} | {teacher_likeness(s, texts)} | {match:.3f} | {length:.1f} |")
    print(f"| start: pass@{a.G} (sampled) | {before[0]['eval/pass@G']:.3f} | - | - | - | - |")
    t_rows = [r for r in eval_rows for name in s.teachers for _ in r["teachers"].get(name, [])]
    t_texts = [t for r in eval_rows for name in s.teachers for t in r["teachers"].get(name, [])]
    if t_texts:
        right = s.judge([r["question"] for r in t_rows], [r["answer"] for r in t_rows], t_texts)
        print(f"| teacher texts | {sum(right) / len(t_texts):.3f} | - | {teacher_likeness(s, t_texts)} | 1.000 | - |")
    (student, _), (disc, _) = full_state(s.model), full_state(s.disc)
    bad = [k for k, v in {**student, **(disc or {})}.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}); no student saved; lower --lr")
    if RANKS.rank == 0:
        save_student(unwrap(s.model), s.processor, a.out, student)
    if RANKS.rank == 0 and disc:  # for Discriminator(student).load_state_dict
        write_atomic(os.path.join(a.out, "discriminator.pt"), lambda f: torch.save(disc, f), "wb")
    run.log(a.steps, after[0])  # last: after a failure before it, a resume at this step logs it once


def lock_out(out: str) -> int:
    """--out is the run's from its checks on: rank 0 makes it, tests a write, flocks it to exit."""
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
        fd = os.open(out, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # flock's: the lock is held (an OSError, so caught first)
        os.close(fd)
        fail(f"--out {out}: another process is running a job there; wait for it, or choose another --out")
    except OSError as e:
        fail(f"--out {out}: cannot write in it ({e.strerror}); choose another --out")
    return fd  # the lock lasts as long as this descriptor


def stopped(a: Args, run: Run, argv: list, e: Exception):
    """A failure mid-run: one line with what failed, what was kept and the command to continue."""
    where = "SFT, D pre-training or the first evaluation" if run.step is None else f"step {run.step + 1}"
    where = "the final evaluation or save" if run.step == a.steps else where
    kept = f"the last complete checkpoint is {run.last}" if run.last else "nothing was saved"
    cmd = f"--out {a.out} --resume --steps {a.steps}" if run.last else " ".join(argv)
    fail(f"{where} failed: {type(e).__name__}: {first_line(e, 200)}; {kept}; continue with: python ril.py {cmd}", True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    given = {x[2:].split("=")[0].replace("-", "_") for x in argv if x.startswith("--")}
    a, resumed = resume_state(a, given) if a.resume else (a, None)
    t0 = time.time()
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this torch sees no GPU (a CPU build, or no driver); pass --device cpu")
    device = torch.device({"auto": "cuda" if torch.cuda.is_available() else "cpu"}.get(a.device, a.device))
    # [R] amp: fp32 weights and AdamW moments, bf16 autocast (the paper does not say); bf16 weights lose small updates
    mode = {"auto": "amp" if device.type == "cuda" else "fp32"}.get(a.dtype, a.dtype)
    device = init_distributed(a, device)  # its refusals come before --out is made
    created = not os.path.isdir(a.out)
    lock = lock_out(a.out)  # the folder is this run's from here on
    handlers, run = {}, None
    try:
        s, sft_rows, rows, eval_rows, data = setup(a, device, mode, resumed)
        run, resumed = Run(a, mode, eval_rows, resumed, data), None  # Run frees it
        handlers = {sig: signal.signal(sig, run.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        # --dtype amp: bf16 autocast over the run; cache_enabled=False, so every op casts the *current* weights (with
        # the cache, one autocast around a run keeps the first bf16 copies and every gradient is taken at them)
        with torch.autocast(device.type, torch.bfloat16, enabled=mode == "amp", cache_enabled=False):
            report(a, s, run, *train(a, s, sft_rows, rows, eval_rows, run), eval_rows)
        print(f"\nsaved student + processor to {a.out} ({time.time() - t0:.0f}s total)")
    except Exception as e:
        if run is None:  # setup's own checks have already said what was wrong with the input
            raise
        stopped(a, run, argv, e)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if RANKS.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:  # the lock ends with the run, also for a test that calls main again
            os.close(lock)
        if created and run is None:  # a bad input leaves no empty --out behind
            with contextlib.suppress(OSError):
                os.rmdir(a.out)


if __name__ == "__main__":
    main()
