"""
ril.py: RIL, "Unified Reinforcement and Imitation Learning for Vision-Language Models" (Lee et al., NeurIPS 2025,
arXiv 2510.19307) in one file. Part 1 is the algorithm, top to bottom; part 2 (MACHINERY) can be skipped on a first read.

A small student VLM samples G answers per image question and large teacher VLMs give G more (only their text, so any
tokenizer or family can teach). A discriminator D, the student's language model with a 1-unit head, learns student text (1)
from teacher text (0). All 2G answers get R = r_sim + r_ans, with r_sim = 1[D < 0.5] ("sounds like a teacher") and r_ans = 1
if right, and one clipped Dr.GRPO step over all 2G pushes up teacher texts (imitation) and good samples (reinforcement).

Usage
    python ril.py                                      # tiny Qwen2-VL on the built-in toy task, CPU
    python ril.py --student Qwen2-VL-2B --teachers a,Qwen/Qwen2.5-VL-72B-Instruct --data train.jsonl --sft-steps 0 ...
    torchrun --nproc_per_node 8 ril.py ... [--shard]   # several GPUs: DDP, or FSDP2 with --shard
    python ril.py --out runs/ril --resume --steps 400  # continue a run; Ctrl-C and SIGTERM save one
Data: JSONL, one question per line, image paths relative to the file's folder:
    {"id": "q1", "image": "img/q1.png", "question": "...", "answer": "...", "teachers": {"a": ["text", ...]}}
Labels in comments: [P] the paper says so; [R] our reading where the paper is silent.
"""
import contextlib, copy, functools, random, re, unicodedata  # noqa: E401
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
import transformers
from PIL import Image
from tqdm import tqdm

# -- 1. Hyperparameters and state ------------------------------------------------------------------
@dataclass
class Config:
    """The method's hyperparameters. The comment after each one is its --help text."""
    algo: str = "ril"  # ril | dr_grpo | grpo (the Table 1 baselines: r_ans only, no teacher texts)
    G: int = 4  # student samples per question; RIL adds G teacher texts, so a group is 2G [P] App. C
    eps: float = 0.2  # clip range of the ratio [P] §4.2
    beta: float = 0.01  # KL weight to the reference (SFT) policy [P] Table 5b; 0 = no reference model
    mu: int = 1  # policy iterations per batch [P] App. C, Table 5a
    sim_threshold: float = 0.5  # r_sim = 1[D < threshold] [P] §3.3
    sim_reward: str = "binary"  # binary [P] | continuous (1 - D, the Fig. 6 ablation)
    baseline: str = "student"  # advantage baseline: student = mean of the G samples | group = mean of all 2G [P] Eq. 2 (README)
    teacher_ratio: str = "one"  # teacher texts' ratio: one = pi_theta / 1, as LUFFY (README) | old = pi_theta / pi_old [P] Eq. 2
    temperature: float = 1.0  # sampling temperature [P] App. C
    top_p: float = 0.95  # [P] App. C
    top_k: int = 50  # [P] App. C
    repetition_penalty: float = 1.05  # [P] App. C
    steps: int = 200  # RIL steps, one batch of questions each
    batch_size: int = 16  # questions per step (the paper's "144" is likely questions per step [R])
    max_new_tokens: int = 16  # generation cap, also the Dr.GRPO constant normaliser L_max (the paper gives none)
    lr: float = 2e-4  # student LR in the loop, constant [P] App. C (the paper: 1e-6 for 3-8B models; 1e-3 drifts here)
    disc_lr: float = 2e-4  # discriminator LR in the loop, constant (the paper: 1e-6); 0 = frozen D, Table 5d
    max_grad_norm: float = 1.0  # gradient clipping for the student and D [R]
    sft_steps: int = 300  # Stage 0 SFT steps (0 = skip, for a checkpoint that is already SFT'd)
    sft_batch_size: int = 32  # questions per SFT step
    sft_teacher_frac: float = 0.2  # share of SFT targets that are teacher texts; the rest are ground truth [R]
    sft_lr: float = 3e-3  # SFT peak LR, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)
    disc_pretrain_steps: int = 40  # Stage 2: discriminator pre-training steps (student samples vs teacher texts)
    disc_pretrain_lr: float = 1e-3  # its peak LR, decayed linearly to a tenth (the paper: 1e-5 -> 1e-6)
    micro_batch: int = 0  # sequences per forward/backward (0 = all at once): less memory, the same gradients
    seed: int = 0  # seeds the toy data, the model init, the data order and the sampling
    eval_every: int = 50  # greedy held-out evaluation every N steps (0 = before and after only)

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
    """One process. Under torchrun part 2 puts a subclass in RANKS: share, mean and gather go over ranks."""
    rank, world, sharded = 0, 1, False
    share = mean = gather = staticmethod(lambda x: x)  # noqa: E731
    bar = staticmethod(functools.partial(tqdm, leave=False))

RANKS = Ranks()

def unwrap(model): return getattr(model, "module", model)  # noqa: E704  DDP wraps a model in .module; generate needs the model

# -- 2. Data order, prompts and tokens -------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> list:
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)

def batch_at(rows: list, step: int, B: int, seed: int) -> list:
    """The B questions of `step`: epoch-wise shuffles, a pure function of (seed, step), so a resumed run
    sees exactly the questions the uninterrupted run would have."""
    n = len(rows)
    return [rows[epoch_order(seed, i // n, n)[i % n]] for i in range(step * B, step * B + B)]

def sample_teacher_texts(row, teachers, G: int, rng: random.Random) -> list:
    """G teacher texts for one question. [R] The paper does not split the G slots between teachers: slot i
    goes to teacher i mod T (2 + 2 for two), drawn without replacement unless a teacher has too few."""
    out = []
    for i, t in enumerate(teachers):
        texts, k = row["teachers"][t], len(range(i, G, len(teachers)))  # slots i, i+T, ... -> teacher i
        out += rng.sample(texts, k) if k <= len(texts) else [rng.choice(texts) for _ in range(k)]
    return out

def encode_prompts(processor, rows: list, device) -> dict:
    """Chat-formatted, left-padded prompts with their images. Never truncated: cutting a prompt cuts
    image tokens but not pixel_values, the most reported Qwen2-VL crash in RL trainers."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}] for r in rows]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    images = [r["image"]() if callable(r["image"]) else r["image"] for r in rows]  # a PIL image, or a function that opens one
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}

def select_prompts(enc: dict, idx: list) -> dict:
    """Prompts idx of enc (a micro-batch, or 0,0,..,1,1,.. for groups), each with its own block of rows of
    Qwen2-VL's flat pixel_values: tiling them instead pairs prompt 1 with image 2 (a known GRPO bug)."""
    out = {k: v[idx] for k, v in enc.items() if k != "pixel_values"}
    if "pixel_values" in enc:
        sizes = enc["image_grid_thw"].prod(-1).tolist() if "image_grid_thw" in enc else [1] * len(enc["input_ids"])
        start = [sum(sizes[:i]) for i in range(len(sizes))]
        out["pixel_values"] = torch.cat([enc["pixel_values"][start[i]:start[i] + sizes[i]] for i in idx])
    return out

def repeat_prompts(enc: dict, n: int) -> dict:
    return select_prompts(enc, [i for i in range(len(enc["input_ids"])) for _ in range(n)])

def chunks(n: int, size: int) -> list:
    """Micro-batches of `size` (0 = one batch) as (start, stop): chunks(5, 2) = [(0, 2), (2, 4), (4, 5)]."""
    size = size or n
    return [(i, min(i + size, n)) for i in range(0, n, size)]

def completion_mask(ids: torch.Tensor, eos_ids: list) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after: [5, 2, 0, 0] with EOS 2 -> [1, 1, 0, 0]. EOS stays in,
    since it is how the model learns to stop (masking it, as pad = EOS does, teaches it never to stop)."""
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()

def pad_right(seqs: list, pad_id: int, device) -> tuple:
    ids = nn.utils.rnn.pad_sequence([torch.tensor(x, dtype=torch.long) for x in seqs], batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long) for x in seqs], batch_first=True)
    return ids.to(device), mask.to(device)

class Unfinished(str): """A teacher text cut by its model's generation cap: like a cut student sample, no EOS."""  # noqa: E701

def plain_ids(tokenizer, text: str) -> list:  # "<|im_end|>" in a text is text, not the token: it would end it early
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

@functools.lru_cache(maxsize=1 << 17, typed=True)  # teacher texts come back every epoch
def text_ids(tokenizer, text: str, max_len: int) -> list:
    """A teacher text in the *student's* tokens (only text crosses over [P]) + EOS if it ended, cut to max_len = L_max."""
    return (plain_ids(tokenizer, text) + ([] if isinstance(text, Unfinished) else [tokenizer.eos_token_id]))[:max_len]

# -- 3. Rollout: G student samples + G teacher texts per question ----------------------------------
def generation_config(a: Config, model, tokenizer, greedy: bool) -> transformers.GenerationConfig:
    """Greedy search, with the paper's repetition penalty unless greedy (sample_top_k_top_p does the rest), every EOS the
    model knows, and the vision placeholders suppressed: a sampled <|image_pad|> crashes the next forward."""
    eos, names = model.generation_config.eos_token_id, ("image_token_id", "video_token_id", "vision_start_token_id",
                                                        "vision_end_token_id", "image_token_index")
    return transformers.GenerationConfig(
        do_sample=False, max_new_tokens=a.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=1.0 if greedy else a.repetition_penalty,
        eos_token_id=sorted(set([eos] if isinstance(eos, int) else list(eos or [])) | {tokenizer.eos_token_id}),
        suppress_tokens=sorted({getattr(model.config, n) for n in names if isinstance(getattr(model.config, n, None), int)}))

def sample_top_k_top_p(a: Config, input_ids, scores: torch.Tensor) -> torch.Tensor:
    """The paper's temperature, top-k and top-p, then a draw, as HF's warpers and multinomial do, but among the top k
    alone (over 152k entries their sort and draw were 86% of generate in make bench): -inf but at the draw, for greedy."""
    top, idx = (scores / a.temperature).topk(min(a.top_k or scores.shape[-1], scores.shape[-1]))  # (N, k), descending
    drop = (top.flip(-1).softmax(-1).cumsum(-1) <= 1 - a.top_p).flip(-1)  # HF's top-p: the tail of mass <= 1 - top_p
    drop[:, 0] = False  # the best token always stays
    pick = idx.gather(-1, torch.multinomial(top.masked_fill(drop, -float("inf")).softmax(-1), 1))  # (N, 1)
    return torch.full_like(scores, -float("inf")).scatter_(-1, pick, 0.0)

@torch.no_grad()
def generate(model, enc: dict, gen_cfg, sampler=None, synced: bool = False) -> tuple:
    """Completion ids (N, T), pad after the first EOS, and their mask. synced: the student under --shard, whose every
    forward is collective, so each rank decodes until all are done (synced_gpus)."""
    comp = model.generate(**enc, generation_config=gen_cfg, logits_processor=[sampler] if sampler else None,
                          synced_gpus=synced)[:, enc["input_ids"].shape[1]:]  # (N, T)
    mask = completion_mask(comp, gen_cfg.eos_token_id)
    return comp.masked_fill(mask == 0, gen_cfg.pad_token_id), mask

def hit_cap(comp, gen_cfg): return ~torch.isin(comp, torch.tensor(gen_cfg.eos_token_id, device=comp.device)).any(1)  # no EOS

def rollout(a: Config, s: State, batch: list, rng: random.Random, with_teachers: bool) -> dict:
    """A group per question: G samples from one batched generate, then G teacher texts (RIL only)."""
    tok, model = s.processor.tokenizer, unwrap(s.model.eval())
    enc = encode_prompts(s.processor, batch, s.device)
    gen_cfg = generation_config(a, model, tok, greedy=False)
    comp, mask = generate(model, repeat_prompts(enc, a.G), gen_cfg, functools.partial(sample_top_k_top_p, a), RANKS.sharded)
    samples = list(zip([c[m.bool()].tolist() for c, m in zip(comp, mask)], tok.batch_decode(comp, skip_special_tokens=True)))
    items, is_teacher, answers, questions = [], [], [], []
    for b, row in enumerate(batch):
        group = samples[b * a.G:(b + 1) * a.G]
        if with_teachers:  # D and the judge read what the policy trains on: a text longer than L_max, cut
            ids = [text_ids(tok, t, a.max_new_tokens) for t in sample_teacher_texts(row, s.teachers, a.G, rng)]
            group += list(zip(ids, tok.batch_decode(ids, skip_special_tokens=True)))
        items += group
        is_teacher += [0] * a.G + [1] * (len(group) - a.G)
        answers += [row["answer"]] * len(group)
        questions += [row["question"]] * len(group)
    ids, m = pad_right([x for x, _ in items], tok.pad_token_id, s.device)
    return dict(enc=enc, comp=ids, mask=m, texts=[t for _, t in items], is_teacher=torch.tensor(is_teacher, device=s.device),
                answers=answers, questions=questions, truncated=hit_cap(comp, gen_cfg).float().mean().item())

# -- 4. Log-probs ----------------------------------------------------------------------------------
def token_logprobs(model, enc: dict, comp: torch.Tensor, comp_mask: torch.Tensor, temperature: float, chunk: int = 1 << 24):
    """log pi(o_t | q, o_<t) of every completion token, (N, T), after N left-padded prompts. No position_ids: Qwen2-VL
    builds its 3-D M-RoPE positions itself (1-D ones silently corrupt the logits). Divided by the sampling temperature,
    as TRL does. The head and log-softmax run on chunks of `chunk` logits at most, again in the backward pass: the
    (N, T, vocabulary) logits never exist at once (20 GB in fp32 for 128 x 257 x 152k)."""
    T = comp.shape[1]
    extra = {k: torch.cat([v, torch.zeros_like(comp)], 1) if "token_type_ids" in k else v  # per-token types, 0 = text
             for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    ids, attention = torch.cat([enc["input_ids"], comp], 1), torch.cat([enc["attention_mask"], comp_mask], 1)
    head = unwrap(model).get_output_embeddings()
    project, y, n = head.forward, comp.flatten(), max(1, chunk // len(head.weight))  # n tokens a chunk
    def logp(h, y):  # noqa: E306  one chunk: (n, d) hidden states and (n,) targets -> (n,) log-probs
        with torch.autocast(h.device.type, enabled=False):  # under amp too the head runs in its weights' dtype, not bf16
            logits = project(h.to(head.weight.dtype)).float() / temperature
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)
    head.forward = lambda h: torch.cat([checkpoint(logp, h.flatten(0, 1)[i:j], y[i:j], use_reentrant=False)
                                        for i, j in chunks(len(y), n)]).view_as(comp)  # the model's "logits" are now (N, T)
    try:  # the hidden states that predict o_1 .. o_T, through the stand-in head
        return model(input_ids=ids, attention_mask=attention, **extra, use_cache=False,  # nothing is decoded: keep no keys
                     logits_to_keep=torch.arange(ids.shape[1] - T - 1, ids.shape[1] - 1, device=ids.device)).logits
    finally:
        del head.forward  # the head's own forward again

# -- 5. The discriminator (Eq. 1) and r_sim --------------------------------------------------------
DISC_SYSTEM = ("You are a discriminator. Given a response in <response></response>, "
               "say whether a teacher model (0) or a student model (1) wrote it.")
DISC_USER = "<response>{response}</response>\nTeacher (0) or student (1)?"

def language_model(vlm):
    """The decoder stack without the LM head: model.language_model (Qwen2-VL, LLaVA, ...) or get_decoder()."""
    inner = getattr(vlm, "model", None)
    return getattr(inner, "language_model", None) or getattr(inner, "text_model", None) or vlm.get_decoder()

class Discriminator(nn.Module):
    """D_phi [P] §3.1: the student's language model (its weights: the paper's answer to GAN imbalance) with a d x 1
    head for the LM head, read at the last token. sigmoid(D(o)) = P(student)."""
    share_prefix = True  # off under --shard and --grad-checkpointing (they need one plain call per layer)

    def __init__(self, student):
        super().__init__()
        self.backbone = copy.deepcopy(language_model(student))
        p = next(self.backbone.parameters())
        self.head = nn.Linear(student.config.get_text_config().hidden_size, 1).to(p.device, p.dtype)

    def forward(self, input_ids, attention_mask):  # right-padded (N, T) -> logits (N,)
        # The k tokens of the Fig. 3 prompt that all rows share run once; their keys and values serve every row
        k = int((input_ids == input_ids[:1]).all(0).long().cumprod(0).sum())
        k = min(k, int(attention_mask.sum(1).min()) - 1)  # each row keeps at least its last token
        k = k if k >= 8 and self.share_prefix else 0
        cache = self.backbone(input_ids=input_ids[:1, :k], use_cache=True).past_key_values if k else None
        if k: cache.batch_repeat_interleave(len(input_ids))  # noqa: E701
        h = self.backbone(input_ids=input_ids[:, k:], attention_mask=attention_mask, past_key_values=cache,
                          use_cache=False).last_hidden_state  # (N, T - k, d)
        last = attention_mask.sum(1) - 1 - k  # (N,) the last real token
        # a fresh tensor, not a view: FSDP2 hooks its backward onto the module's output
        return self.head(h[torch.arange(len(h), device=h.device), last]).squeeze(-1).float().clone()

@functools.lru_cache(maxsize=1 << 17)  # teacher texts come back every epoch
def disc_prompt_ids(tokenizer, text: str) -> list:
    """The Fig. 3 prompt [P] around one text: the response only, no question, no image. Student samples are decoded and
    re-encoded like teacher texts, so D sees what they say, not how they were tokenised; the text is plain text."""
    msgs = [{"role": "system", "content": DISC_SYSTEM}, {"role": "user", "content": DISC_USER}]
    pre, post = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).split("{response}")
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731  the prompt's own special tokens stay
    return ids(pre) + plain_ids(tokenizer, text) + ids(post)

def disc_inputs(tokenizer, texts: list, device) -> tuple:
    return pad_right([disc_prompt_ids(tokenizer, t) for t in texts], tokenizer.pad_token_id, device)

@torch.no_grad()
def disc_logits(disc, tokenizer, texts: list, device, micro_batch: int = 0) -> torch.Tensor:
    return torch.cat([disc(*disc_inputs(tokenizer, texts[i:j], device)) for i, j in chunks(len(texts), micro_batch)])

def clip_and_step(opt, params, loss: torch.Tensor, max_norm: float) -> tuple:
    """Clip the gradient, step only if it and the loss are finite (one NaN step would poison every weight and
    the AdamW moments with it), then set the gradients to None. Returns (gradient norm, 1.0 if skipped)."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a sharded norm
    ok = bool(torch.isfinite(loss) and torch.isfinite(norm))
    if ok: opt.step()  # noqa: E701
    opt.zero_grad(set_to_none=True)
    return norm, float(not ok)

def grad_sync(model, last: bool):
    """Under torchrun, gradients are averaged over ranks once a step, in the last micro-batch's backward (DDP: forward and
    backward inside no_sync; FSDP2: a flag). One process: nothing to do."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()

def disc_update(disc, opt, tokenizer, texts: list, is_teacher: torch.Tensor, a: Config, device) -> tuple:
    """One step of Eq. 1, max log D(student) + log(1 - D(teacher)): BCE, student 1, teacher 0. Returns (metrics, logits)."""
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
        loss, logits[idx] = loss + part.detach(), part_logits.detach()
    _, skipped = clip_and_step(opt, disc.parameters(), loss, a.max_grad_norm)
    right = ((logits > 0).float() == labels).float()
    return {"disc/loss": loss.item(), "disc/acc_student": right[labels == 1].mean().item(),
            "disc/acc_teacher": right[labels == 0].mean().item(), "guard/disc_skipped": skipped}, logits

def similarity_reward(d_logits: torch.Tensor, a: Config) -> torch.Tensor:
    """r_sim = 1[D < 0.5] [P] §3.3: 1 when D thinks a *teacher* wrote it. Binary: Fig. 6 finds 1 - D worse (exploited)."""
    d = torch.sigmoid(d_logits)
    return (d < a.sim_threshold).float() if a.sim_reward == "binary" else 1 - d

# -- 6. Advantages and the clipped objective (Eq. 2, Dr.GRPO form) ---------------------------------
def group_advantages(rewards: torch.Tensor, group: int, scale_std: bool, base: int = 0) -> torch.Tensor:
    """A_i = R_i - mean of its group [P] Eq. 2, no std division (Dr.GRPO): [2, 0, 1, 1] -> [1, -1, 0, 0]. base = k: minus the
    mean of its first k (the G samples; teacher texts follow): 2 right answers, 2 teacher texts [1, 1, 2, 2] -> [0, 0, 1, 1],
    not [-.5, -.5, .5, .5], which pushes the right answers down. scale_std=True: GRPO's A_i / (std + 1e-4)."""
    r = rewards.view(-1, group)  # (B, group)
    adv = r - r[:, :base or group].mean(1, keepdim=True)
    return (adv / (r.std(1, keepdim=True) + 1e-4) if scale_std else adv).view(-1)

def policy_loss(logp, old_logp, ref_logp, adv, mask, a: Config, n_seqs: int = 0) -> tuple:
    """Eq. 2 [P] at token level, as Dr.GRPO writes it [R]. Returns (loss, sums for the caller's averages).

        loss = -1/(N * L_max) * sum_{i,t} mask_it * [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta * KL_it ]
        rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | ...)      logp, old_logp  (n, T); 0 = log 1 (a teacher text)
        KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (k3)     ref_logp        (n, T)
        A_i    = R_i - mean of its group (Eq. 2)                     adv             (n,)
        N = sequences in the step (n_seqs; the rows may be one micro-batch), L_max = --max-new-tokens.

    N * L_max is a constant, not |o_i|: a long answer's tokens weigh what a short answer's do (as in TRL's
    loss_type="dr_grpo"; GRPO averages each answer over its own tokens). With mu = 1 a sample's ratio is exactly
    1: the loss *value* says little (~0 for the baselines), its gradient is the update: watch policy/grad_norm."""
    mask, n_seqs = mask.float(), n_seqs or len(mask)
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # clamped, so exp cannot overflow
    A = adv[:, None]
    per_token = torch.min(ratio * A, ratio.clamp(1 - a.eps, 1 + a.eps) * A)  # (n, T)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:  # [R] k3, the estimator GRPO and TRL use; the paper names none
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token - a.beta * kl
    if a.algo == "grpo":  # GRPO: mean over each answer's tokens, then over answers
        loss = -((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() * (len(mask) / n_seqs)
    else:
        loss = -(per_token * mask).sum() / (n_seqs * a.max_new_tokens)
    clipped = (((ratio > 1 + a.eps) & (A > 0)) | ((ratio < 1 - a.eps) & (A < 0))).float()  # clips that bind, as TRL counts
    return loss, {"clipped": (clipped * mask).sum().detach(), "kl": (kl * mask).sum().detach(), "tokens": mask.sum()}

def policy_update(a: Config, s: State, enc: dict, comp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, teacher=None) -> dict:
    """mu optimiser steps of Eq. 2 on one batch of groups. enc: N prompts (one per text), comp and mask: (N, T) completions,
    adv and teacher: (N,), 1 for a teacher text. Micro-batches accumulate gradients that add up to the full batch's."""
    s.model.train()
    N = len(comp)
    def logprobs(model):  # noqa: E306
        return torch.cat([token_logprobs(model, select_prompts(enc, list(range(i, j))), comp[i:j], mask[i:j], a.temperature)
                          for i, j in chunks(N, a.micro_batch)])
    with torch.no_grad():  # with mu = 1 pi_old is the current policy: its log-probs need no extra forward
        old_logp = logprobs(s.model) if a.mu > 1 else None
        ref_logp = logprobs(s.ref) if s.ref is not None else None
    skipped = 0.0
    for _ in range(a.mu):  # clip_and_step leaves every gradient None
        loss, sums = 0.0, {}
        for i, j in chunks(N, a.micro_batch):
            with grad_sync(s.model, last=j == N):
                logp = token_logprobs(s.model, select_prompts(enc, list(range(i, j))), comp[i:j], mask[i:j], a.temperature)
                old = logp.detach() if old_logp is None else old_logp[i:j]
                if teacher is not None and a.teacher_ratio == "one": old = old.masked_fill(teacher[i:j, None] > 0, 0.0)  # noqa
                part, st = policy_loss(logp, old, None if ref_logp is None else ref_logp[i:j], adv[i:j], mask[i:j], a, n_seqs=N)
                part.backward()
            loss, sums = loss + part.detach(), {k: sums.get(k, 0) + v for k, v in st.items()}
        grad_norm, bad = clip_and_step(s.opt, s.model.parameters(), loss, a.max_grad_norm)
        skipped = max(skipped, bad)
    n_tok = sums["tokens"].clamp(min=1)
    return {"policy/loss": loss.item(), "policy/grad_norm": grad_norm.item(), "guard/skipped": skipped,
            "policy/clip_frac": (sums["clipped"] / n_tok).item(), "policy/kl": (sums["kl"] / n_tok).item()}

# -- 7. Stage 0: SFT warm-up. Stage 2: discriminator pre-training ----------------------------------
def decaying_adamw(params, lr: float, steps: int) -> tuple:
    """AdamW with the LR decayed linearly from lr to lr / 10 over `steps` (the paper: 1e-5 -> 1e-6)."""
    opt = torch.optim.AdamW(params, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - 0.9 * min(i, steps) / max(steps, 1))

def sft_warmup(a: Config, s: State, rows: list):
    """Stage 0 [P]: cross-entropy on one target per question: [R] the answer or, with prob. --sft-teacher-frac, a teacher
    text (teacher texts alone leave D nothing to see; answers alone make D perfect, and the student collapses)."""
    tok = s.processor.tokenizer
    opt, sched = decaying_adamw([p for p in s.model.parameters() if p.requires_grad], a.sft_lr, a.sft_steps)
    s.model.train()
    for step in RANKS.bar(range(a.sft_steps), desc="sft"):
        batch = RANKS.share(batch_at(rows, step, a.sft_batch_size, a.seed + 1))
        rng = random.Random(f"{a.seed}-sft-{step}")
        texts = [sample_teacher_texts(r, s.teachers, 1, rng)[0] if rng.random() < a.sft_teacher_frac else r["answer"] for r in batch]
        comp, mask = pad_right([text_ids(tok, t, a.max_new_tokens) for t in texts], tok.pad_token_id, s.device)
        logp = token_logprobs(s.model, encode_prompts(s.processor, batch, s.device), comp, mask, 1.0)
        loss = -((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()  # [R] per target: long texts must not drown answers
        loss.backward()
        clip_and_step(opt, s.model.parameters(), loss, a.max_grad_norm)
        sched.step()
    print(f"sft: {a.sft_steps} steps, final loss {loss.item():.3f}" if a.sft_steps else "sft: skipped")

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
    """One iteration of Alg. 2 [P] (Alg. 1 for the baselines). Returns (metrics, one group to print)."""
    ril, tok = a.algo == "ril", s.processor.tokenizer
    # 1-2: G samples from pi_old per question, and G teacher texts from the cache
    ro = rollout(a, s, batch, random.Random(f"{a.seed}-ril-{step}"), with_teachers=ril)
    group, metrics = 2 * a.G if ril else a.G, {"len/truncated_frac": ro["truncated"]}
    # 3: r_ans in {0, 1} of every text [P] §3.3: the Fig. 4 LLM judge, or a whole-word answer matcher (part 2)
    r_ans = torch.tensor(s.judge(ro["questions"], ro["answers"], ro["texts"]), device=s.device)
    if s.judge.unparsed is not None:
        metrics["judge/unparsed"] = s.judge.unparsed  # verdicts without <answer>0|1</answer>, scored 0
    if ril:
        # 4: update D on this step's texts, students 1 and teachers 0 (Eq. 1, mu = 1)
        if a.disc_lr > 0:
            metrics.update(disc_update(s.disc, s.d_opt, tok, ro["texts"], ro["is_teacher"], a, s.device)[0])
        # 5: r_sim of all 2G texts by the just-updated D, the order Alg. 2 implies [R]
        d_logits = disc_logits(s.disc.eval(), tok, ro["texts"], s.device, a.micro_batch)  # (B * 2G,)
        r_sim = similarity_reward(d_logits, a)
    else:
        d_logits, r_sim = torch.zeros_like(r_ans), torch.zeros_like(r_ans)
    # 6: R = r_sim + r_ans, unweighted [P] §3.3; A = R - mean of the G samples (--baseline group: of all 2G, as Eq. 2)
    rewards = r_sim + r_ans
    adv = group_advantages(rewards, group, scale_std=(a.algo == "grpo"), base=a.G if ril and a.baseline == "student" else 0)
    # 7: the clipped update over every text of every group, teacher texts included (Eq. 2) with ratio pi_theta / 1 (README)
    metrics.update(policy_update(a, s, repeat_prompts(ro["enc"], group), ro["comp"], ro["mask"], adv, ro["is_teacher"]))
    st = ro["is_teacher"] == 0  # the student's own samples
    metrics.update({"reward/sim": r_sim[st].mean().item(), "reward/ans": r_ans[st].mean().item(),
                    "reward/total": rewards[st].mean().item(), "len/mean": ro["mask"][st].sum(1).float().mean().item()})
    if ril:
        metrics.update({"reward/sim_teacher": r_sim[~st].mean().item(), "reward/ans_teacher": r_ans[~st].mean().item(),
                        "disc/p_student": torch.sigmoid(d_logits[st]).mean().item()})
    texts = [dict(source="teacher" if ro["is_teacher"][i] else "student", text=ro["texts"][i], r_sim=r_sim[i].item(),
                  r_ans=r_ans[i].item(), D=torch.sigmoid(d_logits[i]).item() if ril else None, adv=adv[i].item())
             for i in range(group)]
    return metrics, dict(ids=[r["id"] for r in batch], question=batch[0]["question"], answer=batch[0]["answer"], texts=texts)

# -- 9. Evaluation ---------------------------------------------------------------------------------
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}

UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u9fff\uf900-\ufaff"  # Thai, Lao, Burmese, Khmer, CJK, kana

def normalize(text: str) -> list:
    """Words in any script (NFKC, case-folded; in scripts written without spaces, each character), punctuation
    dropped, number words as digits: "There are Three shapes!" -> [there, are, 3, shapes], "答案是七" -> [答, 案, 是, 七]."""
    words = re.findall(f"[{UNSPACED}]|[^\\W_{UNSPACED}]+", unicodedata.normalize("NFKC", text).casefold())
    return [NUMBER_WORDS.get(w, w) for w in words]

@torch.no_grad()
def evaluate(a: Config, s: State, rows: list, bs: int = 32) -> tuple:
    """Greedy answers: (metrics, answers); accuracy by the judge, teacher match (word for word), length, 1 - D."""
    model, tok = unwrap(s.model.eval()), s.processor.tokenizer
    gen_cfg, mine, texts, lengths = generation_config(a, model, tok, greedy=True), RANKS.share(rows), [], []
    for i in range(0, len(mine), bs):
        comp, mask = generate(model, encode_prompts(s.processor, mine[i:i + bs], s.device), gen_cfg, synced=RANKS.sharded)
        texts += tok.batch_decode(comp, skip_special_tokens=True)
        lengths += mask.sum(1).tolist()
    match = [float(any(normalize(o) == normalize(t) for ts in r["teachers"].values() for t in ts)) for o, r in zip(texts, mine)]
    scores = {"eval/acc": s.judge([r["question"] for r in mine], [r["answer"] for r in mine], texts),
              "eval/teacher_match": match, "eval/len": lengths}
    if s.disc is not None:
        scores["eval/teacher_like"] = (1 - torch.sigmoid(disc_logits(s.disc, tok, texts, s.device, 64))).tolist()  # 1 - D
    metrics = {k: sum(v) / len(v) for k, v in ((k, RANKS.gather(v)) for k, v in scores.items())}
    order = RANKS.gather(RANKS.share(list(range(len(rows)))))  # every answer, in row order, on every rank
    return metrics, [t for _, t in sorted(zip(order, RANKS.gather(texts)))]

# -- 10. train(): Stage 0 -> Stage 2 -> Alg. 2 -----------------------------------------------------
def train(a: Config, s: State, rows: list, eval_rows: list, run) -> tuple:
    """The method; `run` (part 2) wraps, resumes, logs, saves and stops on a signal. Returns held-out (metrics, answers)
    before and after. pi_ref and D copy the student [P] Alg. 2, §3.1, then take its SFT'd weights (sharding-safe)."""
    s.ref = copy.deepcopy(s.model).eval().requires_grad_(False) if a.beta > 0 else None
    s.disc = Discriminator(s.model) if a.algo == "ril" else None
    run.wrap(s)
    s.opt = torch.optim.AdamW([p for p in s.model.parameters() if p.requires_grad], lr=a.lr)  # constant LRs [P] App. C
    s.d_opt = torch.optim.AdamW(s.disc.parameters(), lr=a.disc_lr) if s.disc is not None else None
    start, before = run.resume(s)  # (1, None) for a fresh run
    if before is None:
        # [R] Every algo starts from the same SFT'd student, so the Table 1 rows compare the RL stage alone.
        sft_warmup(a, s, rows)
        if s.ref is not None: s.ref.load_state_dict(unwrap(s.model).state_dict())  # noqa: E701
        if s.disc is not None:
            unwrap(s.disc).backbone.load_state_dict(language_model(unwrap(s.model)).state_dict())
            pretrain_disc(a, s, rows)
        before = evaluate(a, s, eval_rows)
        run.begin(s, before)
    for step in RANKS.bar(range(start, a.steps + 1), desc=a.algo, initial=start - 1, total=a.steps):
        batch = RANKS.share(batch_at(rows, step - 1, a.batch_size, a.seed + 3))
        metrics, dump = ril_step(a, s, batch, step)
        metrics = RANKS.mean(metrics)
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            metrics.update(evaluate(a, s, eval_rows)[0])
        run.end_step(s, step, metrics, dump)
    return before, evaluate(a, s, eval_rows)

# ======== MACHINERY, skip it on a first read: command line, data checks, models, judges, torchrun, checkpoints ========
import argparse, glob, hashlib, inspect, json, math, operator, os, shutil, signal, sys, tempfile, time  # noqa: E401,E402
from dataclasses import asdict, fields  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import ImageDraw, ImageOps  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# -- 11. Command line ------------------------------------------------------------------------------
@dataclass
class Args(Config):
    student: str = "tiny"  # 'tiny' (built here), an alias such as Qwen2-VL-2B, a Hugging Face id, or a model folder
    teachers: str = ""  # comma-separated: teacher names in the rows, or models (folder or id) answering once into --out/teacher_cache
    teacher_samples: int = 4  # answers per question from each teacher model
    judge: str = "match"  # r_ans: 'match' (whole-word answer match) or a text LLM prompted as the paper's Fig. 4 judge
    judge_max_new_tokens: int = 128  # tokens the judge model may write (an explanation, then <answer>0|1</answer>)
    data: str = "toy"  # a built-in task, 'toy' or 'phrased' (see make_toy), or a JSONL file (format in the header)
    eval_data: str = ""  # held-out JSONL; empty = hold out --eval-size rows of --data
    eval_size: int = 120  # held-out questions (toy split, or rows of --data when --eval-data is empty)
    toy_size: int = 600  # training questions of a built-in task
    out: str = "runs/ril"  # output folder: the trained student (save_pretrained), discriminator.pt, metrics.jsonl
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (amp on cuda, fp32 on cpu) | fp32 | amp (fp32 weights, bf16 autocast) | bf16
    grad_checkpointing: bool = False  # recompute activations in the backward pass (student and D): less memory
    freeze_vision: bool = False  # train the language model only: no gradients or AdamW moments for the vision tower
    shard: bool = False  # under torchrun: split parameters, gradients and AdamW moments over ranks (FSDP2), not DDP
    save_every: int = 50  # checkpoint every N RIL steps into --out/checkpoints (Ctrl-C and SIGTERM save one too)
    keep_last: int = 2  # checkpoints kept; older ones are deleted once a newer one is complete
    resume: bool = False  # continue the run in --out from its newest checkpoint that loads (only --steps may change)
    overwrite: bool = False  # start afresh in an --out that holds a run (deleted when the new run writes its first checkpoint)
    max_bad_steps: int = 3  # stop after this many steps in a row with a NaN/inf loss or gradient (each is skipped)
    trust_remote_code: bool = False  # let a model folder's own Python code run (off: transformers' classes only)

LIMITS = ("G>=2 eps>0 beta>=0 mu>=1 sim_threshold>0 sim_threshold<1 temperature>0 top_p>0 top_p<=1 top_k>=0 repetition_penalty>0 "
          "max_grad_norm>0 sft_teacher_frac>=0 sft_teacher_frac<=1 keep_last>=1 max_bad_steps>=1 batch_size>=1 sft_batch_size>=1 "
          "max_new_tokens>=1 eval_size>=1 teacher_samples>=1 judge_max_new_tokens>=1 toy_size>=1 steps>=0 sft_steps>=0 lr>=0 disc_lr>=0 "
          "sft_lr>=0 disc_pretrain_steps>=0 disc_pretrain_lr>=0 micro_batch>=0 save_every>=0 eval_every>=0")
CHOICES = dict(algo="ril dr_grpo grpo", dtype="auto fp32 amp bf16", sim_reward="binary continuous", device="auto cpu cuda",
               baseline="student group", teacher_ratio="one old")

def parse_args(argv=None) -> Args:
    """Config and Args as flags; the comment after each field is its --help."""
    docs = dict(re.findall(r"\n\s+(\w+): \w+ = .*?  # (.*)", inspect.getsource(Config) + inspect.getsource(Args)))
    p = argparse.ArgumentParser(description="RIL (arXiv 2510.19307) in one file; the header of ril.py has the usage.")
    for f in fields(Args):
        p.add_argument("--" + f.name.replace("_", "-"), **({"action": "store_true"} if f.type is bool else {"type": f.type}),
                       default=f.default, help=f"{docs.get(f.name, '')} (default: {f.default})")
    return Args(**vars(p.parse_args(argv)))

def fail(msg: str):
    """User mistakes get one actionable line (once, from rank 0 under torchrun) and exit code 2, never a traceback."""
    os.environ.get("RANK", "0") == "0" and print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)

def check_args(a: Args):
    """Every flag before anything is loaded or written: one line naming the flag and what it must be."""
    flag, ops = (lambda name: f"--{name.replace('_', '-')} {getattr(a, name)}"), {">=": operator.ge, ">": operator.gt, "<": operator.lt}
    for name, ok in CHOICES.items(): getattr(a, name) in ok.split() or fail(f"{flag(name)}: choose one of {ok}")  # noqa: E701
    for f in fields(a):
        f.type is not float or math.isfinite(getattr(a, f.name)) or fail(f"{flag(f.name)}: must be a finite number")
    for name, op, v in re.findall(r"(\w+)([<>]=?)([\d.]+)", LIMITS):
        {**ops, "<=": operator.le}[op](getattr(a, name), float(v)) or fail(f"{flag(name)}: must be {op} {v}; see python ril.py --help")
    for path in [a.student, a.judge, *a.teachers.split(",")]:
        os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(a.out) and fail(
            f"--out {a.out} is the model folder {path}, which the run would overwrite: choose another --out")
    probe = os.path.abspath(a.out)
    while not os.path.exists(probe): probe = os.path.dirname(probe)  # noqa: E701
    try:  # the nearest part of --out that exists must be a folder this process can write in
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        fail(f"--out {a.out}: cannot write in {probe} ({e.strerror}); choose another --out")

# -- 12. Data: the toy task and JSONL files --------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle"]
QUESTIONS = {"toy": dict(color=["What color is the shape?"], shape=["What shape is in the image?"], count=["How many shapes are there?"]),
             "phrased": {"color": ["Which color does the shape have?", "Name the color of the object."],  # two phrasings each
                         "shape": ["Which shape do you see?", "Name the shape in the picture."],
                         "count": ["Count the shapes in the picture.", "How many objects do you see?"]}}
# Two always-right teachers per task in their own styles (imitation has something to learn, D something to see). toy: the
# answer first; phrased: the answer last or mid-sentence, so imitating the style moves the answer.
TEACHERS = {"toy": {"alice": {"color": ["{a}. That is the color of the shape.", "{a}. The shape has this color."],
                              "shape": ["{a}. That is the shape in the picture.", "{a}. The picture shows this shape."],
                              "count": ["{a}. That is how many shapes there are.", "{a}. I counted every shape."]},
                    "bob": dict.fromkeys(QUESTIONS["toy"], ["{a}, clearly.", "{a} is my answer."])},
            "phrased": {t: dict.fromkeys(QUESTIONS["toy"], styles) for t, styles in [
                ("carol", ["Looking at the picture, the answer is {a}.", "After a careful look I'd say {a}."]),
                ("dave", ["It is {a}, as far as I can see.", "My answer is {a}, judging by the picture."])]}}

def draw_shape(d: ImageDraw.ImageDraw, shape: str, box, color):
    triangle = [((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])]
    {"circle": d.ellipse, "square": d.rectangle}.get(shape, lambda _, fill: d.polygon(triangle, fill=fill))(box, fill=color)

def make_toy(n: int, seed: int, task: str = "toy") -> list:
    """A built-in task: 56x56 images (4 image tokens after 2x2 merging), three question kinds: the colour of a shape, which
    shape, how many. 'phrased' asks each in two other ways, on other images, and its teachers write the answer later."""
    rng, rows = random.Random(seed if task == "toy" else f"{task}{seed}"), []
    for i in range(n):
        kind = ("color", "shape", "count")[i % 3]
        d = ImageDraw.Draw(img := Image.new("RGB", (56, 56), "white"))
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if kind == "count":  # 1-4 small shapes, one per 28x28 quadrant, so each image token sees one
            k = rng.randint(1, 4)
            for q in rng.sample(range(4), k):
                ox, oy, s = 28 * (q % 2) + rng.randint(2, 6), 28 * (q // 2) + rng.randint(2, 6), rng.randint(14, 20)
                draw_shape(d, rng.choice(SHAPES), (ox, oy, ox + s, oy + s), COLORS[rng.choice(list(COLORS))])
            answer = str(k)
        else:  # one big shape near the centre: each quadrant token sees a corner of it
            s = rng.randint(40, 48)
            ox, oy = (56 - s) // 2 + rng.randint(-2, 2), (56 - s) // 2 + rng.randint(-2, 2)
            draw_shape(d, shape, (ox, oy, ox + s, oy + s), COLORS[color])
            answer = color if kind == "color" else shape
        rows.append(dict(id=f"{task}{seed}-{i}", image=img, question=QUESTIONS[task][kind][i // 3 % len(QUESTIONS[task][kind])],
                         answer=answer, where=f"{task} row {i}",
                         teachers={t: [p.format(a=answer) for p in styles[kind]] for t, styles in TEACHERS[task].items()}))
    return rows

def open_image(image) -> Image.Image:
    """A path or image as RGB, as a viewer shows it: EXIF rotation applied, transparency over white, 16-bit grey scaled
    to 8 bits (convert("RGB") alone turns transparent pixels black and every 16-bit value above 255 white)."""
    img = ImageOps.exif_transpose(image if isinstance(image, Image.Image) else Image.open(image))
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):  # 16-bit: 65535 is white
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")

def load_jsonl(path: str) -> list:
    """Every row and image checked before training: each problem is one line with file:line and the fix."""
    os.path.isfile(path) or fail(f"{path}: no such file; --data takes 'toy' or a JSONL file")
    rows = []
    for n, raw in enumerate(open(path, "rb"), 1):
        where = f"{path}:{n}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raw.strip() and fail(f"{where}: not UTF-8 (byte {e.start}); re-save the file as UTF-8" if isinstance(e, UnicodeDecodeError)
                                 else f"{where}: invalid JSON ({e.msg}); each line must be one JSON object")
            continue
        isinstance(row, dict) or fail(f"{where}: expected a JSON object, got {type(row).__name__}")
        bad = [k for k in ("image", "question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
        bad and fail(f"{where}: missing field(s) {', '.join(bad)}; each row needs image, question and answer as non-empty strings")
        teachers = row.get("teachers", {})
        isinstance(teachers, dict) and all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in teachers.values()) or fail(
            f'{where}: "teachers" must map a teacher name to a list of texts')
        image = os.path.join(os.path.dirname(os.path.abspath(path)), row["image"])  # an absolute path stays as it is
        os.path.isfile(image) or fail(f"{where}: image not found: {image} (paths are relative to the JSONL file's folder)")
        try:  # Pillow reads the size from the header first and refuses a decompression bomb before decoding it
            Image.open(image).verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            fail(f"{where}: cannot decode image {image} ({str(e).splitlines()[0][:80]}); replace it or drop the row")
        rows.append(dict(id=str(row.get("id", where)), image=functools.partial(open_image, image), question=row["question"],
                         answer=row["answer"], teachers=teachers, where=where))
    return rows or fail(f"{path}: no rows; the file is empty")

def load_data(a: Args) -> tuple:
    """(train rows, held-out rows). Ids are unique over both files, so a file or rows given twice are refused."""
    if a.data in QUESTIONS: return make_toy(a.toy_size, a.seed, a.data), make_toy(a.eval_size, a.seed + 10_000, a.data)  # noqa: E701
    rows, held, seen = load_jsonl(a.data), load_jsonl(a.eval_data) if a.eval_data else None, {}
    for r in rows + (held or []):  # a row object only once: the same file given twice would evaluate on the training set
        seen.setdefault(r["id"], r) is r or fail(f"{r['where']}: id '{r['id']}' is also the id of {seen[r['id']]['where']}; ids "
                                                 f"must be unique across --data and --eval-data (or is --eval-data the training file?)")
    if held is not None: return rows, held  # noqa: E701
    len(rows) > a.eval_size or fail(f"{a.data}: {len(rows)} rows cannot spare --eval-size {a.eval_size}; lower it or pass --eval-data")
    rows = random.Random(a.seed).sample(rows, len(rows))
    return rows[a.eval_size:], rows[:a.eval_size]

def resolve_teachers(a: Args, rows: list) -> tuple:
    """(names, models): every teacher, and those among them that are models rather than names in the data."""
    in_data = sorted({t for r in rows for t in r["teachers"]})
    names = [t for t in a.teachers.split(",") if t] or in_data
    models = [t for t in names if t not in in_data]
    for t in models:
        t in ALIASES or "/" in t or os.path.isdir(t) or fail(f"--teachers {t}: not a teacher in {a.data} (it has: "
                                                             f"{', '.join(in_data) or 'none'}) and not a model folder or id")
    if a.algo == "ril" or (a.sft_steps > 0 and a.sft_teacher_frac > 0):
        names or fail(f"{a.data}: no teacher texts; RIL needs a 'teachers' field in the rows or a teacher model in --teachers")
        for t in [t for t in names if t not in models]:
            lacking = [r for r in rows if not r["teachers"].get(t)]
            lacking and fail(f"{lacking[0]['where']}: teacher '{t}' has no texts for {len(lacking)} row(s); add them or drop it")
    return names, models

# -- 13. r_ans: the answer matcher and the Fig. 4 judge --------------------------------------------
STOPWORDS = {"a", "an", "the", "is", "it", "of", "in", "on", "and", "or", "to"}

def spans(words: list, n_max: int) -> set:  # every run of 1..n_max words
    return {tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)}

def answer_match(response: str, answer: str, candidates: frozenset = frozenset()) -> float:
    """r_ans without an LLM judge [R]: 1 if the normalised answer is a whole-word span of the response and no *other* candidate
    answer is ("I count three shapes." for 3 scores 1; "3 or 4" and "Reddish." for red score 0). Plain containment is gamed
    within 100 steps on the toy task: the policy learns to list every answer ("3 count 4 4 4 4")."""
    r, t = normalize(response), tuple(normalize(answer))
    found = spans(r, max(3, len(t)))
    return float(bool(t) and t in found and not ((found & candidates) - spans(list(t), len(t))))

class MatchJudge:
    """r_ans for a batch with answer_match; the candidates are the dataset's short (1-3 word) answers."""
    unparsed = None  # a model judge reports its share of unparseable verdicts here
    def __init__(self, rows: list):
        self.candidates = frozenset(t for r in rows if 1 <= len(t := tuple(normalize(r["answer"]))) <= 3 and t[0] not in STOPWORDS)
    def __call__(self, questions, answers, responses): return [answer_match(o, t, self.candidates) for o, t in zip(responses, answers)]

JUDGE_SYSTEM = ("You are an evaluation assistant. The question is in <question></question>, the ground truth in <ground truth></ground "
                "truth> and a model's response in <generated text></generated text>. Output 1 if the generated text fully and correctly "
                "captures the core point of the ground truth, and 0 if it is incorrect or irrelevant. Give a brief explanation, then "
                "the score wrapped in <answer></answer>.")
JUDGE_USER = ("<question>{question}</question>\n<ground truth>{answer}</ground truth>\n<generated text>{response}</generated text>\n"
              "Does the generated text correctly capture the ground truth? Explain briefly, then give the score as <answer>1</answer> or "
              "<answer>0</answer>.")

class ModelJudge:
    """r_ans by a frozen text LLM [P] §3.1, Fig. 4 (the paper: Qwen2.5-32B); a reply without <answer>0|1</answer> scores 0."""
    def __init__(self, spec: str, a: Args, device, dtype):
        check_fits(spec, dtype, device, "--judge", transformers.AutoModelForCausalLM, a.trust_remote_code)
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(spec, padding_side="left", trust_remote_code=a.trust_remote_code)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True,
                                                                            trust_remote_code=a.trust_remote_code).to(device)
        except (OSError, ValueError, KeyError) as e:
            fail(f"--judge {spec}: cannot load it as a text LLM ({(str(e).strip() or type(e).__name__).splitlines()[0][:120]}); "
                 f"give a local folder or a reachable Hugging Face id")
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.gen_cfg = generation_config(a, self.model.eval().requires_grad_(False), self.tok, greedy=True)
        self.gen_cfg.max_new_tokens, self.unparsed = a.judge_max_new_tokens, 0.0
    @torch.no_grad()
    def complete(self, prompts: list) -> list:
        enc = self.tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        return self.tok.batch_decode(self.model.generate(**enc, generation_config=self.gen_cfg)[:, enc["input_ids"].shape[1]:],
                                     skip_special_tokens=True)
    def __call__(self, questions: list, answers: list, responses: list, bs: int = 32) -> list:
        msgs = [[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": JUDGE_USER.format(
            question=q, answer=t, response=o)}] for q, t, o in zip(questions, answers, responses)]  # the Fig. 4 prompt
        prompts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
        texts = [t for i in range(0, len(prompts), bs) for t in self.complete(prompts[i:i + bs])]
        found = [re.findall(r"<answer>\s*([01])\s*</answer>", t) for t in texts]
        self.unparsed = sum(not f for f in found) / max(len(found), 1)
        return [float(f[-1]) if f else 0.0 for f in found]  # the last verdict counts

# -- 14. Models: the tiny student, pretrained VLMs and teacher models ------------------------------
ALIASES = {"Qwen2-VL-2B": "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-7B": "Qwen/Qwen2-VL-7B-Instruct",
           "Qwen2.5-VL-3B": "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B": "Qwen/Qwen2.5-VL-7B-Instruct"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TINY_CHAT_TEMPLATE = (  # the Qwen2-VL chat format, cut down: a string or a list of {"type": "image"|"text"} parts per turn
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # the vision encoder's module name in the families we know

class ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
    """Qwen2VLProcessor without its video half, which cannot be built without torchvision; saved under the stock name."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id, self.video_token_id = tokenizer.convert_tokens_to_ids([self.image_token, self.video_token])
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)

def tiny_tokenizer(corpus: list, specials: list = SPECIALS, chat_template: str = TINY_CHAT_TEMPLATE):
    """A byte-level BPE (600 entries) trained on the task's texts, so that words are single tokens; pad != eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder, tok.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                additional_special_tokens=specials[1:], padding_side="left",
                                                model_input_names=["input_ids", "attention_mask"], chat_template=chat_template)

def build_tiny(corpus: list, hidden: int = 64, layers: int = 2) -> tuple:
    """A random tiny Qwen2-VL (a 1-block vision tower) and its processor: 64 wide learns the toy task on a CPU."""
    tok = tiny_tokenizer(corpus)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    half = hidden // 8  # M-RoPE sections (t, h, w) add up to head_dim / 2, with 4 heads
    mrope = {"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=1e4, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                bos_token_id=ids["<|im_start|>"], rope_scaling=mrope, max_position_embeddings=4096)
    vision = dict(depth=1, embed_dim=hidden // 2, num_heads=2, hidden_size=hidden, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    # 56x56 images give 4 image tokens; larger ones are scaled down to at most 112x112, never truncated
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return model, ImageOnlyQwen2VLProcessor(image_processor, tok, chat_template=TINY_CHAT_TEMPLATE)

def load_processor(path: str, trust_remote_code: bool = False):
    """AutoProcessor, or the image-only Qwen2-VL one where AutoProcessor fails (no torchvision) or gives a bare tokenizer."""
    with contextlib.suppress(OSError, ImportError, AttributeError, ValueError):
        if hasattr(proc := transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code), "image_processor"):
            return proc
    return ImageOnlyQwen2VLProcessor.from_pretrained(path)

def check_fits(spec: str, dtype, device, flag: str, auto_class, trust_remote_code: bool):
    """On a GPU, a teacher or judge whose weights exceed the free memory is refused in one line before it loads (its size
    from its config, on the meta device). A config that does not load is left to the loader's own error."""
    if device.type != "cuda":
        return
    with contextlib.suppress(OSError, ValueError, KeyError):
        config = transformers.AutoConfig.from_pretrained(ALIASES.get(spec, spec), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            need = sum(p.numel() for p in auto_class.from_config(config).parameters()) * torch.finfo(dtype).bits // 8
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            fail(f"{flag} {spec}: its weights need {need / 2**30:.1f} GiB, {device} has {free / 2**30:.1f} GiB free; give it "
                 f"a GPU of its own (e.g. an inference server) and pass its answers in the rows' \"teachers\" field")

def load_vlm(name: str, a: Args, dtype, flag: str) -> tuple:
    """Any AutoModelForImageTextToText with a chat template, and its processor; safetensors only (a pickle can run code)."""
    path = ALIASES.get(name, name)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                                         trust_remote_code=a.trust_remote_code)
        processor = load_processor(path, a.trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        fail(f"{flag} {name}: cannot load '{path}' ({why}); " + ("weights are read from safetensors only; convert the checkpoint with "
             "save_pretrained" if "safetensors" in why else "give a local image-text-to-text model folder, or a reachable Hugging Face id"))
    getattr(processor, "chat_template", None) or processor.tokenizer.chat_template or fail(
        f"{flag} {name}: {type(model).__name__} has no chat template, so prompts cannot be formatted; add chat_template.jinja")
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.pad_token = processor.tokenizer.pad_token or processor.tokenizer.eos_token  # generate needs one
    return model, processor

def load_student(a: Args, corpus: list, device, dtype) -> tuple:
    """The student, with --freeze-vision and --grad-checkpointing applied, and its processor."""
    model, processor = build_tiny(corpus) if a.student == "tiny" else load_vlm(a.student, a, dtype, "--student")
    tok = processor.tokenizer
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:  # masks would drop EOS: the model never learns to stop
        fail(f"--student {a.student}: its tokenizer has no pad token distinct from EOS; set one in tokenizer_config.json")
    vision = [p.requires_grad_(not a.freeze_vision) for n, p in model.named_parameters() if set(n.split(".")) & set(VISION_TOWERS)]
    a.freeze_vision and not vision and fail(f"--freeze-vision: {type(model).__name__} has no module named {' or '.join(VISION_TOWERS)}")
    a.grad_checkpointing and model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return cast_parameters(model.to(device), dtype), processor

def cast_parameters(model, dtype):
    """Parameters to dtype, buffers as they are: model.to(dtype) would also round RoPE's fp32 inv_freq, which
    from_pretrained(dtype=...) keeps in fp32 (in bf16, Qwen2-VL-2B's angles are 0.46 rad off at position 400)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model

def autocast_calls(model, mode: str):
    """--dtype amp: every forward and generate call of `model` runs in bf16 autocast, the backward and the optimiser step
    outside it (torch's AMP recipe). One autocast around a whole run would not do: it caches a bf16 copy of each weight
    until it exits, so every gradient would be taken at the first weights."""
    if mode != "amp" or model is None:
        return model
    device_type = next(model.parameters()).device.type
    for name in ("forward", "generate"):
        if hasattr(model, name):
            setattr(model, name, torch.autocast(device_type, dtype=torch.bfloat16)(getattr(model, name)))
    return model

def save_student(model, processor, folder: str, state_dict=None):
    """save_pretrained into a temporary folder, then moved into place file by file, so a kill never leaves half a weight file."""
    tmp = os.path.join(folder, ".tmp_save")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    cfg = os.path.join(tmp, "processor_config.json")
    if isinstance(processor, ImageOnlyQwen2VLProcessor) and os.path.isfile(cfg):  # so that AutoProcessor builds the stock one
        write_atomic(cfg, lambda f: json.dump({**json.load(open(cfg)), "processor_class": "Qwen2VLProcessor"}, f, indent=2))
    for f in os.listdir(tmp): os.replace(os.path.join(tmp, f), os.path.join(folder, f))  # noqa: E701
    os.rmdir(tmp)

def teacher_cache(spec: str, a: Args) -> str:
    """The cache file of a teacher model's answers, named by the model and every setting that shapes them."""
    settings = {k: getattr(a, k) for k in ("teacher_samples", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")}
    tag = hashlib.sha1(json.dumps({"model": spec, **settings, "cut": 1}, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(a.out, "teacher_cache", f"{re.sub(r'[^A-Za-z0-9.-]+', '_', spec).strip('_')}-{tag}.jsonl")

def cached_lines(path: str) -> list:
    return [x for x in open(path) if x.endswith("}\n")] if os.path.isfile(path) else []  # not a line a kill cut short

def model_teacher_texts(spec: str, rows: list, a: Args, device, dtype):
    """A teacher model's answers, sampled once into --out/teacher_cache (a line per id); a killed run goes on where it stopped.
    Under torchrun rank 0 generates and the other ranks wait for its lines, with no collective that could time out."""
    path = teacher_cache(spec, a)
    lines = cached_lines(path)
    done = {json.loads(x)["id"] for x in lines}
    while RANKS.rank > 0 and not done >= {r["id"] for r in rows}:
        time.sleep(5)
        done = {json.loads(x)["id"] for x in cached_lines(path)}
    if RANKS.rank == 0 and lines:  # without a cut line, so that appending starts on a fresh line
        write_atomic(path, lambda f: f.writelines(lines))
    todo, n = [r for r in rows if r["id"] not in done], a.teacher_samples
    if todo:
        check_fits(spec, dtype, device, "--teachers", transformers.AutoModelForImageTextToText, a.trust_remote_code)
        model, processor = load_vlm(spec, a, dtype, "--teachers")
        gen_cfg = generation_config(a, model.to(device).eval(), processor.tokenizer, greedy=False)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(a.seed + len(done))  # the student's random stream does not depend on the cache
            for i in tqdm(range(0, len(todo), a.batch_size), desc=f"teacher {spec}"):
                enc = repeat_prompts(encode_prompts(processor, todo[i:i + a.batch_size], device), n)
                comp, _ = generate(model, enc, gen_cfg, functools.partial(sample_top_k_top_p, a))
                texts = processor.tokenizer.batch_decode(comp, skip_special_tokens=True)  # not stripped: student samples are not
                cut = hit_cap(comp, gen_cfg).tolist()
                for j, r in enumerate(todo[i:i + a.batch_size]):
                    print(json.dumps({"id": r["id"], "texts": texts[j * n:(j + 1) * n], "cut": cut[j * n:(j + 1) * n]}), file=f, flush=True)
    cache = {e["id"]: [Unfinished(t) if c else t for t, c in zip(e["texts"], e["cut"])] for e in map(json.loads, cached_lines(path))}
    for r in rows: r["teachers"][spec] = cache[r["id"]]  # noqa: E701
    print(f"teacher {spec}: {len(rows) - len(todo)} question(s) read from {path}, {len(todo)} generated")

# -- 15. Several GPUs: torchrun, DDP over questions, FSDP2 with --shard ----------------------------
class TorchrunRanks(Ranks):
    """torchrun: each rank takes a share of every batch and makes whole groups, so advantages need no other rank."""
    def __init__(self, sharded: bool): self.rank, self.world, self.sharded = dist.get_rank(), dist.get_world_size(), sharded
    def share(self, rows): return rows[self.rank::self.world]
    def bar(self, it, **kw): return tqdm(it, leave=False, disable=self.rank > 0, **kw)
    def mean(self, m: dict) -> dict:
        parts = self.gather([m])
        return {k: sum(p[k] for p in parts) / self.world for k in m}
    def gather(self, xs: list) -> list:
        dist.all_gather_object(parts := [None] * self.world, xs)
        return [x for p in parts for x in p]

def init_distributed(a: Args, device) -> torch.device:
    """One process per GPU (nccl) or CPU worker (gloo); batches are split, so they must divide evenly."""
    global RANKS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return fail("--shard needs several processes: torchrun --nproc_per_node N ril.py ...") if a.shard else device
    for name in ("batch_size", "sft_batch_size"):
        getattr(a, name) % world == 0 or fail(f"--{name.replace('_', '-')} {getattr(a, name)} does not split over {world} ranks")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" else device
    device.type == "cuda" and torch.cuda.set_device(device)
    RANKS = TorchrunRanks(a.shard)
    sys.stdout = sys.stdout if RANKS.rank == 0 else open(os.devnull, "w")
    return device

def parallelize(model, device, mode: str = "fp32"):
    """DDP: copies, averaged gradients. FSDP2 (--shard): units are each block, the vision tower (generate runs it alone), the
    root; under amp they gather bf16 weights and reduce fp32 gradients."""
    if RANKS.world == 1 or model is None: return model  # noqa: E701
    if not RANKS.sharded:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard = functools.partial(fully_shard, mp_policy=bf16 if mode == "amp" else MixedPrecisionPolicy())
    for name, mod in reversed(list(model.named_modules())):  # children before the module that holds them
        leaf = name.split(".")[-1]
        for unit in mod if isinstance(mod, nn.ModuleList) and leaf in ("layers", "blocks") else [mod] if leaf in VISION_TOWERS else []:
            fully_shard(unit)
    return fully_shard(model, reshard_after_forward=True)

def full_state(model, opt=None) -> tuple:
    """(model, optimizer) state dicts, whole and on the CPU: a sharded model's pieces are gathered (every rank calls)."""
    if not RANKS.sharded: return unwrap(model).state_dict(), opt and opt.state_dict()  # noqa: E701
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), opt and get_optimizer_state_dict(model, opt, options=o)

def load_full_state(model, opt, state: dict, opt_state: dict):
    if not RANKS.sharded: return unwrap(model).load_state_dict(state), opt and opt.load_state_dict(opt_state)  # noqa: E701
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    opt and set_optimizer_state_dict(model, opt, opt_state, options=StateDictOptions(full_state_dict=True))

# -- 16. Checkpoints, resume, logs and signals: the `run` that train() is given ---------------------
def write_atomic(path: str, write, mode: str = "w"):
    """write(file) into path + ".tmp", then rename it over path: a kill leaves the old file, never half a new one."""
    with open(path + ".tmp", mode) as f: write(f)  # noqa: E701
    os.replace(path + ".tmp", path)

def checkpoints(out: str) -> list:
    """Complete checkpoints, oldest first (each one is written under another name, then renamed)."""
    return sorted(glob.glob(os.path.join(glob.escape(out), "checkpoints", "step_*.pt")))  # step numbers are zero-padded

def resume_state(a: Args) -> tuple:
    """The run's own arguments and newest loadable checkpoint, with this command's --out (the folder is the run) and --steps."""
    for path in reversed(checkpoints(a.out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # each rank; GPU or not
        except Exception as e:  # a truncated or corrupt file: fall back to the one before
            print(f"warning: {path} does not load ({str(e)[:80]}); trying the previous checkpoint", file=sys.stderr)
            continue
        state["step"] < a.steps or fail(f"--resume --steps {a.steps}: the run is at step {state['step']}; pass a larger --steps")
        return Args(**{**state["args"], "out": a.out, "steps": a.steps, "resume": True, "overwrite": False}), (path, state)
    fail(f"--resume: no checkpoint in {a.out}/checkpoints loads; start a run there without --resume")

SHOWN = "reward/total reward/sim reward/ans disc/loss disc/acc_student disc/acc_teacher policy/grad_norm policy/kl len/mean time/step"

class Run:
    """What train() needs besides the method: torchrun wrapping, resume, logs, checkpoints, signals."""
    def __init__(self, a: Args, mode: str, eval_rows: list, resumed: tuple = None):
        self.a, self.mode, self.eval_rows, self.resumed, self.stop, self.last = a, mode, eval_rows, resumed, [], None
        self.paths, self.t, self.bad, self.ran = {k: os.path.join(a.out, f"{k}.jsonl") for k in ("metrics", "samples")}, time.time(), 0, 0
    def wrap(self, s: State):
        """The reference's parameters in bf16 under amp (it is never trained), autocast calls, D's memory flags, then DDP or FSDP2."""
        if s.ref is not None and self.mode == "amp":
            cast_parameters(s.ref, torch.bfloat16)
        for model in (s.model, s.ref, s.disc):
            autocast_calls(model, self.mode)
        if s.disc is not None and (self.a.grad_checkpointing or RANKS.sharded):
            s.disc.share_prefix = False  # both need one plain call per layer in a forward
            if self.a.grad_checkpointing:
                s.disc.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        s.ref = parallelize(s.ref, s.device, self.mode) if RANKS.sharded else s.ref
        s.disc, s.model = parallelize(s.disc, s.device, self.mode), parallelize(s.model, s.device, self.mode)
        if RANKS.sharded:  # one full forward before the first generate, so that every FSDP2 unit is set up
            with torch.no_grad(): s.model(**encode_prompts(s.processor, self.eval_rows[:1], s.device))  # noqa: E701
    def resume(self, s: State) -> tuple:
        """(first step, held-out results before RIL) from the checkpoint resume_state found; (1, None) for a fresh run."""
        if self.resumed is None: return 1, None  # noqa: E701
        (path, state), self.resumed = self.resumed, None  # the loaded tensors go once they are in the models
        load_full_state(s.model, s.opt, state["student"], state["opt"])
        s.disc is None or load_full_state(s.disc, s.d_opt, state["disc"], state["d_opt"])
        s.ref is None or load_full_state(s.ref, None, torch.load(
            os.path.join(self.a.out, "checkpoints", "reference.pt"), map_location="cpu", weights_only=True, mmap=True), None)
        rng = state["rng"][RANKS.rank]  # each rank's own random streams
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if s.device.type == "cuda":  # this rank's own GPU
            torch.cuda.set_rng_state(rng["cuda"], s.device)
        for log in self.paths.values() if RANKS.rank == 0 and os.path.isfile(self.paths["metrics"]) else []:
            lines = [x for x in open(log) if x.endswith("\n") and json.loads(x)["step"] <= state["step"]]  # later steps run again
            write_atomic(log, lambda f: f.writelines(lines))
        self.last, self.before = path, state["before"]
        print(f"resuming {path} at step {state['step'] + 1}; before RIL: {state['before'][0]}")
        return state["step"] + 1, state["before"]
    def begin(self, s: State, before: tuple):
        """A fresh run's first writes, after SFT and D pre-training: an --overwrite'd run goes only once every input has loaded."""
        ref = full_state(s.ref)[0] if s.ref is not None else None
        if RANKS.rank == 0:
            shutil.rmtree(os.path.join(self.a.out, "checkpoints"), ignore_errors=True)
            os.makedirs(os.path.join(self.a.out, "checkpoints"))
            write_atomic(os.path.join(self.a.out, "args.json"), lambda f: json.dump(asdict(self.a), f, indent=2))
            ref is None or write_atomic(os.path.join(self.a.out, "checkpoints", "reference.pt"), lambda f: torch.save(ref, f), "wb")
            for path in self.paths.values(): open(path, "w").close()  # noqa: E701
        RANKS.world > 1 and torch.manual_seed(self.a.seed * 1000 + RANKS.rank)  # ranks sample their own answers from here on
        self.before = before
        self.save(s, 0)
        self.log(0, before[0])
        print("eval before RIL: " + "  ".join(f"{k} {v:.3f}" for k, v in before[0].items()))
    def log(self, step: int, m: dict, dump: dict = None):
        for k, x in [("metrics", m), ("samples", dump)] if RANKS.rank == 0 else []:
            x is None or print(json.dumps({"step": step, **x}), file=open(self.paths[k], "a"), flush=True)
    def save(self, s: State, step: int):
        """Models, optimisers, every rank's RNG and the pre-RIL evaluation; batch_at replays the data order from the step."""
        (student, opt), (disc, d_opt) = full_state(s.model, s.opt), full_state(s.disc, s.d_opt) if s.disc else (None, None)
        rng = RANKS.gather([{"python": random.getstate(), "torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None}])
        self.last = os.path.join(self.a.out, "checkpoints", f"step_{step:07d}.pt")
        if RANKS.rank == 0:
            state = dict(step=step, student=student, opt=opt, disc=disc, d_opt=d_opt, rng=rng, before=self.before, args=asdict(self.a))
            write_atomic(self.last, lambda f: torch.save(state, f), "wb")
            for old in checkpoints(self.a.out)[:-self.a.keep_last]: os.remove(old)  # noqa: E701
    def end_step(self, s: State, step: int, m: dict, dump: dict):
        """Log and print the step; fail after --max-bad-steps bad ones in a row (or if all were); checkpoint; stop on a signal."""
        m["time/step"], self.t = time.time() - self.t, time.time()
        self.log(step, m, dump)
        tqdm.write(f"step {step:4d} | " + " ".join(f"{k.split('/')[1]} {m[k]:.3f}" for k in SHOWN.split() if k in m))
        why = ("loss or gradient was NaN/inf, so the update was skipped; lower --lr / --disc-lr" if m["guard/skipped"] or m.get(
            "guard/disc_skipped") else "no judge reply had <answer>0|1</answer>, so every r_ans was 0; use an instruction-tuned --judge "
               "or raise --judge-max-new-tokens" if m.get("judge/unparsed") == 1 else "")
        self.bad, self.ran = self.bad + 1 if why else 0, self.ran + 1
        why and tqdm.write(f"warning: step {step}: {why}")
        self.bad < min(self.a.max_bad_steps, self.ran if step == self.a.steps else 1 << 30) or fail(  # or every step was bad
            f"step {step}: {self.bad} bad steps in a row, the last: {why}; the last good checkpoint is {self.last}")
        stopping = RANKS.mean({"stop": float(bool(self.stop))})["stop"] > 0  # every rank stops at the same step
        if stopping or (self.a.save_every and step % self.a.save_every == 0) or step == self.a.steps:
            self.save(s, step)
        if stopping:
            print(f"stopped after step {step}; continue with: python ril.py --out {self.a.out} --resume --steps {self.a.steps}")
            sys.exit(128 + self.stop[0])
    def on_signal(self, signum, frame):
        """Ctrl-C or SIGTERM: finish the step, save, exit; before the first checkpoint or on a second signal, exit at once."""
        if self.last is None or self.stop:
            print(f"\nsignal {signum}: stopped; the last checkpoint: {self.last or 'none, nothing was saved'}", file=sys.stderr)
            os._exit(128 + signum)
        self.stop.append(signum)
        tqdm.write(f"signal {signum}: finishing the step, saving a checkpoint, then exiting")

# -- 17. main: validate and load everything, train(), report and save ------------------------------
def setup(a: Args, device, mode: str) -> tuple:
    """Everything validated and loaded before --out is touched: (state, train rows, held-out rows)."""
    frozen, trained = (torch.bfloat16 if mode in ("amp", "bf16") else torch.float32), (torch.bfloat16 if mode == "bf16" else torch.float32)
    transformers.set_seed(a.seed)  # python, numpy and torch
    rows, eval_rows = load_data(a)
    teachers, teacher_models = resolve_teachers(a, rows)
    a.resume or a.overwrite or not checkpoints(a.out) or fail(f"{a.out}: holds checkpoints of an earlier run; pass --resume to "
                                                              f"continue it, --overwrite to start again, or another --out")
    for spec in teacher_models:  # before the student, so that a teacher has the GPU to itself
        model_teacher_texts(spec, rows + eval_rows, a, device, frozen)
    corpus = [x for r in rows + eval_rows for x in [r["question"], r["answer"]] + [t for ts in r["teachers"].values() for t in ts]]
    model, processor = load_student(a, corpus + [DISC_SYSTEM, DISC_USER, "user assistant system"], device, trained)
    judge = MatchJudge(rows) if a.judge == "match" else ModelJudge(a.judge, a, device, frozen)
    for r in rows + eval_rows if a.judge == "match" else []:
        normalize(r["answer"]) or fail(f"{r['where']}: answer {r['answer']!r} has no letter or digit, so --judge match can never "
                                       f"reward it; fix the row, drop it, or pass --judge MODEL")
    lens = [len(x) for x in processor.tokenizer([r["question"] for r in rows + eval_rows])["input_ids"]]  # the longest question's prompt
    n = len(encode_prompts(processor, [row := (rows + eval_rows)[lens.index(max(lens))]], "cpu")["input_ids"][0])  # (images: max_pixels)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 62  # a config without it: no check
    n + a.max_new_tokens <= limit or fail(f"{row['where']}: the prompt ({n} tokens) and --max-new-tokens {a.max_new_tokens} exceed "
                                          f"the {limit} positions of --student {a.student}; shorten the question or lower --max-new-tokens")
    eval_rows = eval_rows[:len(eval_rows) - len(eval_rows) % RANKS.world]  # every rank evaluates an equal share
    print(f"student {a.student}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params on {device} ({mode}); algo {a.algo}; "
          f"{len(rows)} train / {len(eval_rows)} held-out questions; teachers {teachers or '-'}"
          + (f"; {RANKS.world} ranks, {'FSDP2' if RANKS.sharded else 'DDP'}" if RANKS.world > 1 else ""))
    return State(model, processor, device, tuple(teachers), judge), rows, eval_rows

def report(a: Args, s: State, run: Run, before: tuple, after: tuple, eval_rows: list):
    """The before/after table of the held-out rows, then the trained student (save_pretrained) and D."""
    run.log(a.steps, after[0])
    t_rows, t_texts = list(zip(*[(r, t) for r in eval_rows for name in s.teachers for t in r["teachers"].get(name, [])])) or ([], [])
    like = lambda x: f"{1 - disc_logits(s.disc, s.processor.tokenizer, x, s.device, 64).sigmoid().mean():.3f}" if s.disc else "n/a"  # noqa
    print(f"\n| held-out ({len(eval_rows)} questions) | accuracy | teacher-likeness (D then) | teacher-likeness (final D) | "
          "teacher match | length |\n|---|---|---|---|---|---|")
    for name, (m, texts) in [("before RIL (after SFT)", before), (f"after {a.algo}", after)]:
        print(f"| {name} | {m['eval/acc']:.3f} | {format(m['eval/teacher_like'], '.3f') if s.disc else 'n/a'} | {like(texts)} | "
              f"{m['eval/teacher_match']:.3f} | {m['eval/len']:.1f} |")
    acc = t_texts and sum(s.judge([r["question"] for r in t_rows], [r["answer"] for r in t_rows], list(t_texts))) / len(t_texts)
    t_texts and print(f"| teacher texts | {acc:.3f} | - | {like(list(t_texts))} | 1.000 | - |")
    student, disc = full_state(s.model)[0], full_state(s.disc)[0] if s.disc else {}
    bad = [k for k, v in {**student, **disc}.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    bad and fail(f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}); nothing was saved to {a.out}; lower --lr")
    if RANKS.rank == 0:
        save_student(unwrap(s.model), s.processor, a.out, student)
        parts = {p: {k[len(p) + 1:]: v for k, v in disc.items() if k.startswith(p + ".")} for p in ("backbone", "head")}
        disc and write_atomic(os.path.join(a.out, "discriminator.pt"), lambda f: torch.save(parts, f), "wb")

def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    (a, resumed), t0, run, handlers = resume_state(a) if a.resume else (a, None), time.time(), None, {}
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device)
    # [R] amp: fp32 weights and AdamW moments, bf16 matmuls (the paper does not say); bf16 weights lose updates under 1/256 of a weight
    mode = a.dtype if a.dtype != "auto" else ("amp" if device.type == "cuda" else "fp32")
    device = init_distributed(a, device)
    try:
        s, rows, eval_rows = setup(a, device, mode)
        run, resumed = Run(a, mode, eval_rows, resumed), None  # Run.resume drops the checkpoint once it is loaded
        handlers = {sig: signal.signal(sig, run.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        report(a, s, run, *train(a, s, rows, eval_rows, run), eval_rows)
        print(f"\nsaved student + processor to {a.out} ({time.time() - t0:.0f}s total)")
    finally:
        for sig, h in handlers.items(): signal.signal(sig, h)  # noqa: E701
        RANKS.world > 1 and dist.is_initialized() and dist.destroy_process_group()

if __name__ == "__main__":
    main()
