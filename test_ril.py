"""Tests for ril.py. Each test states a property of the paper or of a correct VLM RL loop, and each
can fail. Run with `make test` (HF_HUB_OFFLINE=1: nothing is downloaded; the tests build and save
their own tiny checkpoints and load them through the real from_pretrained path). The tools (plot,
bench, paper table) are in tools/; the plot tool has a test here."""

import dataclasses
import doctest
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

# before transformers is imported: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch
import transformers

import ril

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")


def argv(cmd: str, **values) -> list:
    """A command line written as one string: its words, split on spaces, each formatted with values.
    A word {out} becomes str(values["out"]) whole, spaces and all: paths are passed as values, never
    spliced into cmd, so a temporary folder with a space in its name still works."""
    return [word.format(**values) for word in cmd.split()]


TINY_RUN = argv("--toy-size 24 --eval-size 4 --sft-steps 3 --disc-pretrain-steps 2 --batch-size 2")


def args(**kw) -> ril.Args:
    return ril.Args(**kw)


def state(model, proc, **kw) -> ril.State:
    return ril.State(model, proc, CPU, ("alice", "bob"), **kw)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    """One finished 2-step run with a checkpoint after each step, made once; tests copy it before changing it."""
    return main_out(tmp_path_factory.mktemp("two_steps"), "--steps", "2", "--save-every", "1")


def copy_of(run: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(run, str(tmp_path / "run"))


def main_out(tmp_path, *flags, name="o") -> str:
    """ril.main on the tiny run with these flags, into tmp_path/name; returns the output folder."""
    out = str(tmp_path / name)
    ril.main([*TINY_RUN, *flags, "--out", out])
    return out


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen2-VL + processor and the toy rows."""
    torch.manual_seed(0)
    train, held = ril.make_toy(24, 0), ril.make_toy(8, 1)
    model, proc = ril.build_tiny(train + held)
    return dict(a=args(), model=model, proc=proc, rows=train, held=held)


# ---------------------------------------------------------------- advantages and the objective
def test_advantages_are_group_mean_centred_and_not_std_scaled():
    r = torch.tensor([2.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 0.0])  # two groups of 4
    adv = ril.group_advantages(r, 4, scale_std=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5, -1.5]))
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2))
    # the magnitude is the raw reward gap: scaling rewards scales advantages (no std division)
    assert torch.allclose(ril.group_advantages(3 * r, 4, scale_std=False), 3 * adv)


def test_ril_advantages_subtract_the_mean_of_the_students_own_samples_unless_baseline_is_group(tiny):
    # two right answers and two teacher texts: the 2G mean of Eq. 2 pushes the right answers down, the samples' mean
    # does not
    assert ril.group_advantages(torch.tensor([1.0, 1.0, 2.0, 2.0]), 4, scale_std=False, first=2).tolist() == [
        0,
        0,
        1,
        1,
    ]
    assert ril.group_advantages(torch.tensor([1.0, 1.0, 2.0, 2.0]), 4, scale_std=False).tolist() == [
        -0.5,
        -0.5,
        0.5,
        0.5,
    ]
    got = {}
    for baseline in ("student", "group"):  # lr 0 and a frozen D: the step changes nothing
        a = args(baseline=baseline, batch_size=2, beta=0.0, lr=0.0, disc_lr=0.0)
        model = ril.copy.deepcopy(tiny["model"])
        s = state(
            model,
            tiny["proc"],
            judge=ril.MatchJudge(tiny["rows"]),
            disc=ril.Discriminator(model),
            opt=torch.optim.AdamW(model.parameters(), lr=0.0),
        )
        texts = ril.ril_step(a, s, tiny["rows"][:2], 0)[1]["texts"]
        R = [t["r_sim"] + t["r_ans"] for t in texts]
        base = R[: a.G] if baseline == "student" else R  # the G samples open each group, its G teacher texts follow
        assert [t["adv"] for t in texts] == pytest.approx([r - sum(base) / len(base) for r in R])
        got[baseline] = [t["adv"] for t in texts]
    assert got["student"] != pytest.approx(got["group"])  # the random student's samples score below the teacher texts


class _FixedJudge:
    """r_ans by position in the step's texts, whatever they say; records what it was asked."""

    unparsed = None

    def __init__(self, verdicts):
        self.verdicts, self.seen = verdicts, []

    def __call__(self, questions, answers, texts):
        self.seen.append((questions, answers, texts))
        return list(self.verdicts[: len(texts)])


@pytest.mark.parametrize("baseline", ["student", "group"])
def test_ril_step_rewards_r_sim_plus_r_ans_when_d_and_the_judge_split_every_group(tiny, monkeypatch, baseline):
    """D's verdicts and the judge's differ inside each group, among the G samples and among the G teacher texts, so
    neither r_sim nor r_ans cancels in R - baseline. The advantages the update gets are r_sim + r_ans minus the mean of
    the group's samples (--baseline group: of all 2G), number for number; D is trained on, and D, the judge and the
    policy read, the same 2G texts per question: the G samples, then its G teacher texts, each with its own question's
    prompt."""
    G, B, tok = 4, 2, tiny["proc"].tokenizer
    rows = tiny["rows"][:B]  # a colour question and a shape question, on different images
    r_ans = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float)
    d_logits = torch.tensor([2.0, -1.0, 0.5, -3.0, -2.0, -0.5, 1.0, 3.0, -1.5, -2.0, 2.5, 1.0, 0.5, -1.0, -2.5, -4.0])
    r_sim = (d_logits < 0).float()  # D < 0.5: "a teacher wrote it"; samples' and teacher texts' means differ too
    seen = {}

    def fake_disc_update(disc, opt, tok, texts, is_teacher, *rest, **kw):
        seen["order"] = seen.get("order", []) + ["update D"]
        seen["d_update"] = (list(texts), is_teacher.clone())
        return {"disc/loss": 0.0}

    def fake_disc_logits(disc, tok, texts, *rest, **kw):
        seen["order"] = seen.get("order", []) + ["r_sim by D"]
        seen["d_texts"] = list(texts)
        return d_logits.clone()

    def fake_policy_update(a, s, enc, comp, mask, adv, teacher=None, *rest, **kw):
        seen["update"] = dict(enc=enc, comp=comp, mask=mask, adv=adv.clone(), teacher=teacher.clone())
        return {}

    monkeypatch.setattr(ril, "disc_update", fake_disc_update)
    monkeypatch.setattr(ril, "disc_logits", fake_disc_logits)
    monkeypatch.setattr(ril, "policy_update", fake_policy_update)
    judge = _FixedJudge(r_ans.tolist())
    a = args(G=G, batch_size=B, baseline=baseline, disc_lr=1e-3, max_new_tokens=6)
    metrics, dump = ril.ril_step(a, state(tiny["model"], tiny["proc"], judge=judge, disc=torch.nn.Module()), rows, 1)

    up = seen["update"]
    teacher = up["teacher"].bool()
    assert up["teacher"].tolist() == ([0] * G + [1] * G) * B  # each group: its G samples, then its G teacher texts
    R = (r_sim + r_ans).view(B, 2 * G)
    base = R[:, :G] if baseline == "student" else R
    want = (R - base.mean(1, keepdim=True)).view(-1)
    assert up["adv"].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    ans = r_ans.view(B, 2 * G)  # the test's own check that r_sim does not cancel: r_ans alone gives other advantages
    assert not torch.allclose(
        want, (ans - (ans[:, :G] if baseline == "student" else ans).mean(1, keepdim=True)).view(-1)
    )
    # D, the judge and the policy read the same texts, and D learns them with the labels the policy's split has
    [(questions, answers, texts)] = judge.seen
    assert seen["order"] == ["update D", "r_sim by D"]  # r_sim by the just-updated D
    assert (
        seen["d_texts"] == texts and seen["d_update"][0] == texts and torch.equal(seen["d_update"][1].bool(), teacher)
    )
    assert questions == [r["question"] for r in rows for _ in range(2 * G)] and answers == [
        r["answer"] for r in rows for _ in range(2 * G)
    ]
    for i, (ids, m) in enumerate(zip(up["comp"], up["mask"], strict=True)):
        ids = ids[m.bool()].tolist()
        assert texts[i] == tok.decode(ids, skip_special_tokens=True)
        if teacher[i]:  # a teacher text of its own question, in the student's tokens
            assert ids in [
                ril.text_ids(tok, t, a.max_new_tokens) for ts in rows[i // (2 * G)]["teachers"].values() for t in ts
            ]
    # every text with its question's prompt
    direct = ril.encode_prompts(tiny["proc"], [r for r in rows for _ in range(2 * G)], CPU)
    assert set(up["enc"]) == set(direct) and all(torch.equal(up["enc"][k], direct[k]) for k in direct)
    # the logged means split samples from teacher texts the same way
    st = ~teacher
    for key, want_mean in [
        ("reward/sim", r_sim[st]),
        ("reward/ans", r_ans[st]),
        ("reward/total", (r_sim + r_ans)[st]),
        ("reward/sim_teacher", r_sim[teacher]),
        ("reward/ans_teacher", r_ans[teacher]),
        ("disc/p_student", torch.sigmoid(d_logits[st])),
    ]:
        assert metrics[key] == pytest.approx(want_mean.mean().item(), abs=1e-6), key
    assert [(t["source"], t["r_sim"], t["r_ans"]) for t in dump["texts"]] == [
        ("teacher" if teacher[i] else "student", r_sim[i].item(), r_ans[i].item()) for i in range(2 * G)
    ]
    assert [t["adv"] for t in dump["texts"]] == pytest.approx(want[: 2 * G].tolist(), abs=1e-6)


def test_with_no_method_flag_the_advantage_and_ratio_are_eq2s(tiny, monkeypatch):
    """The default is the paper: A = R - mean of all 2G rewards of the group (Eq. 2). (Its ratio, pi_theta / pi_old for
    a teacher text as for a sample: test_teacher_ratio_one_weighs_each_teacher_token_...[default].)"""
    G, B = 4, 2
    r_ans = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.float)
    d_logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, -0.5, 1.0, -3.0, 1.5, 2.0, -2.5, 1.0, -0.5, -1.0, 2.5, -4.0])
    seen = {}
    monkeypatch.setattr(ril, "disc_update", lambda *x, **kw: {})
    monkeypatch.setattr(ril, "disc_logits", lambda *x, **kw: d_logits.clone())
    monkeypatch.setattr(ril, "policy_update", lambda a, s, enc, comp, mask, adv, *x, **kw: seen.update(adv=adv) or {})
    a = args(G=G, batch_size=B)
    ril.ril_step(
        a,
        state(tiny["model"], tiny["proc"], judge=_FixedJudge(r_ans.tolist()), disc=torch.nn.Module()),
        tiny["rows"][:B],
        1,
    )
    R = ((d_logits < 0).float() + r_ans).view(B, 2 * G)
    assert seen["adv"].tolist() == pytest.approx((R - R.mean(1, keepdim=True)).view(-1).tolist(), abs=1e-6)


def test_baseline_steps_reward_r_ans_alone_minus_the_group_mean(tiny, monkeypatch):
    """Dr.GRPO and GRPO: G samples a question, no teacher texts, no D; A = r_ans - the group's mean (GRPO: over its
    std)."""
    G, B = 4, 2
    r_ans = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for algo in ("dr_grpo", "grpo"):
        seen = {}
        monkeypatch.setattr(
            ril,
            "policy_update",
            lambda a, s, enc, comp, mask, adv, teacher=None, *rest, seen=seen, **kw: (
                seen.update(adv=adv, teacher=teacher) or {}
            ),
        )
        s = state(tiny["model"], tiny["proc"], judge=_FixedJudge(r_ans.tolist()))
        metrics, _ = ril.ril_step(args(algo=algo, G=G, batch_size=B, max_new_tokens=6), s, tiny["rows"][:B], 1)
        r = r_ans.view(B, G)
        want = r - r.mean(1, keepdim=True)
        want = want / (r.std(1, keepdim=True) + 1e-4) if algo == "grpo" else want
        assert seen["adv"].tolist() == pytest.approx(want.view(-1).tolist(), abs=1e-4) and not seen["teacher"].any(), (
            algo
        )
        assert metrics["reward/ans"] == pytest.approx(0.625) and metrics["reward/sim"] == 0, algo


def test_grpo_advantages_are_std_scaled():
    r = torch.tensor([2.0, 0.0, 1.0, 1.0])
    adv = ril.group_advantages(r, 4, scale_std=True)
    assert torch.allclose(adv, (r - r.mean()) / (r.std() + 1e-4))
    assert torch.allclose(ril.group_advantages(3 * r, 4, scale_std=True), adv, atol=1e-4)


def _token_weights(algo: str, lengths: list, L_max: int = 8) -> torch.Tensor:
    """d loss / d logp_t for every token of answers of the given lengths, all with advantage 1."""
    a = args(algo=algo, max_new_tokens=L_max, beta=0.0)
    mask = torch.tensor([[1] * n + [0] * (L_max - n) for n in lengths])
    logp = torch.zeros(mask.shape, requires_grad=True)
    loss, _ = ril.policy_loss(logp, logp.detach(), None, torch.ones(len(lengths)), mask, a)
    loss.backward()
    return logp.grad


def test_dr_grpo_normaliser_does_not_depend_on_answer_length():
    g = _token_weights("ril", [1, 3, 8])
    valid = g[torch.tensor([[1] + [0] * 7, [1] * 3 + [0] * 5, [1] * 8]).bool()]
    # every token of every answer weighs -A / (N * L_max), long answer or short
    assert torch.allclose(valid, torch.full_like(valid, -1 / (3 * 8)))
    assert (g[0, 1:] == 0).all()  # padding gets no gradient


def test_grpo_normalises_each_answer_by_its_length():
    g = _token_weights("grpo", [1, 4])
    assert torch.isclose(g[0, 0], torch.tensor(-1 / 2)) and torch.isclose(g[1, 0], torch.tensor(-1 / 8))


def test_clipping_bounds_the_ratio():
    a = args(eps=0.2, beta=0.0)
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_(True)  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, -1.0])
    loss, stats = ril.policy_loss(logp, old, None, adv, torch.ones(2, 1), a)
    # A > 0: the objective stops at (1 + eps) A; A < 0: at (1 - eps) A. Outside the range, no gradient.
    assert torch.isclose(loss, -torch.tensor((1.2 * 1.0 + 0.8 * -1.0) / (2 * a.max_new_tokens)))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 1))
    assert stats["clipped"] / stats["tokens"] == 1.0
    # a ratio outside the range with the other sign of advantage is not clipped (min takes the unclipped term): not
    # counted
    _, stats = ril.policy_loss(
        torch.log(torch.tensor([[1.5], [0.5], [1.0]])),
        torch.zeros(3, 1),
        None,
        torch.tensor([-1.0, 1.0, 0.0]),
        torch.ones(3, 1),
        a,
    )
    assert stats["clipped"] == 0
    # inside the range the gradient flows
    logp2 = torch.log(torch.tensor([[1.1]])).requires_grad_(True)
    ril.policy_loss(logp2, torch.zeros(1, 1), None, torch.tensor([1.0]), torch.ones(1, 1), a)[0].backward()
    assert logp2.grad.abs().item() > 0


def test_rows_never_clipped_are_not_counted_as_clipped():
    """--teacher-ratio one: a teacher text's term is rho * A, never clipped; policy/clip_frac must not count it even
    where pi < 1 - eps and A < 0 (a clipped sample's token would count)."""
    logp = torch.full((2, 3), math.log(0.5), requires_grad=True)  # pi_theta = 0.5 on every token
    mask, adv = torch.ones(2, 3), torch.tensor([-1.0, -1.0])
    unclipped = torch.tensor([True, False])  # a teacher text, then a sample with the same ratio
    loss, sums = ril.policy_loss(
        logp, torch.zeros(2, 3), None, adv, mask, args(teacher_ratio="one"), unclipped=unclipped
    )
    loss.backward()
    assert (logp.grad[0] != 0).all() and (logp.grad[1] == 0).all()  # only the sample is clipped
    assert sums["clipped"].item() == 3  # the sample's 3 tokens, not the teacher text's


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    a = args(beta=0.5)
    logp = torch.tensor([[-1.0, -2.0]])
    _, same = ril.policy_loss(logp, logp, logp.clone(), torch.zeros(1), torch.ones(1, 2), a)
    _, diff = ril.policy_loss(logp, logp, logp - 1.0, torch.zeros(1), torch.ones(1, 2), a)
    assert same["kl"] == 0.0 and diff["kl"] > 0


def test_the_kl_term_costs_beta_times_k3_and_its_gradient_pulls_log_probs_back_to_the_reference():
    """A = 0, so the clipped term is 0 and the loss is the KL term alone: + beta * sum k3 / (N L_max), never negative,
    linear in beta; d loss / d logp = beta (1 - pi_ref / pi_theta) / (N L_max), so a descent step lowers log pi where it
    is above log pi_ref, raises it where it is below, and the KL to the reference falls."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -4.0, -1.0, -1.0]])
    # log pi above, below, at log pi_ref; padding
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-1.0, -3.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1) * mask
    for algo, weight in (("ril", torch.full((2, 1), 1 / (2 * 4))), ("grpo", 1 / (2 * mask.sum(1, keepdim=True)))):
        for beta in (0.5, 0.125):
            lp = logp.clone().requires_grad_(True)
            loss, stats = ril.policy_loss(
                lp, lp.detach(), ref, torch.zeros(2), mask, args(algo=algo, beta=beta, max_new_tokens=4)
            )
            assert loss.item() == pytest.approx(beta * (k3 * weight).sum().item(), rel=1e-5) and loss > 0, (algo, beta)
            assert stats["kl"].item() == pytest.approx(k3.sum().item(), rel=1e-5)
            loss.backward()
            assert torch.allclose(lp.grad, beta * (1 - torch.exp(ref - logp)) * mask * weight, atol=1e-7), (algo, beta)
            above, below = (logp > ref) & mask.bool(), (logp < ref) & mask.bool()
            assert (
                (lp.grad[above] > 0).all()
                and (lp.grad[below] < 0).all()
                and (lp.grad[(logp == ref) | ~mask.bool()] == 0).all()
            )
            with torch.no_grad():  # one descent step moves log pi towards log pi_ref
                _, after = ril.policy_loss(
                    lp - lp.grad, lp, ref, torch.zeros(2), mask, args(algo=algo, beta=beta, max_new_tokens=4)
                )
            assert after["kl"] < stats["kl"]


def test_policy_loss_is_eq2_number_for_number_with_clipping_kl_padding_and_a_micro_batch():
    """The whole per-token objective at once, against a plain restatement: min(rho A, clip(rho) A) - beta k3, masked,
    over N L_max (Dr.GRPO, N the step's sequences, here twice the rows: a micro-batch) or per answer (GRPO); the value,
    every token's gradient and the counts of clipped tokens and of KL. Ratios and advantages of both signs, some
    clipped."""
    g = torch.Generator().manual_seed(0)
    N, T, eps, beta = 5, 6, 0.3, 0.3  # eps not the default, so that a fixed 0.2 shows
    logp = -3 * torch.rand(N, T, generator=g)
    old = logp + 0.4 * torch.randn(N, T, generator=g)  # ratios well inside and outside [0.7, 1.3]
    ref = logp + 0.7 * torch.randn(N, T, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.25])
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in (6, 3, 1, 5, 4)])
    for algo in ("dr_grpo", "ril", "grpo"):
        a = args(algo=algo, eps=eps, beta=beta, max_new_tokens=T)
        lp = logp.clone().requires_grad_(True)
        loss, stats = ril.policy_loss(lp, old, ref, adv, mask, a, n_seqs=2 * N)
        loss.backward()
        want_lp = logp.clone().requires_grad_(True)
        rho, A = torch.exp(want_lp - old), adv[:, None]
        obj = torch.minimum(rho * A, torch.clamp(rho, 1 - eps, 1 + eps) * A) - beta * (
            torch.exp(ref - want_lp) - (ref - want_lp) - 1
        )
        obj = obj * mask
        want = -(obj.sum(1) / mask.sum(1)).sum() / (2 * N) if algo == "grpo" else -obj.sum() / (2 * N * T)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), algo
        assert torch.allclose(lp.grad, want_lp.grad, atol=1e-7), algo
        r = torch.exp(logp - old)
        binding = (((r > 1 + eps) & (A > 0)) | ((r < 1 - eps) & (A < 0))) & mask.bool()
        assert 0 < stats["clipped"].item() == binding.sum().item() < mask.sum().item()
        assert stats["tokens"].item() == mask.sum().item()


def test_teacher_text_with_positive_advantage_gains_log_probability(tiny):
    model, proc, a = ril.copy.deepcopy(tiny["model"]), tiny["proc"], args(lr=1e-3, beta=0.0)
    rows = tiny["rows"][:1]
    texts = [rows[0]["teachers"]["alice"][0], rows[0]["teachers"]["bob"][0]]  # a group of 2: teacher text, other
    comp, mask = ril.pad_right(
        [ril.text_ids(proc.tokenizer, t, a.max_new_tokens) for t in texts], proc.tokenizer.pad_token_id, CPU
    )
    enc = ril.repeat_prompts(ril.encode_prompts(proc, rows, CPU), 2)
    adv = ril.group_advantages(torch.tensor([2.0, 0.0]), 2, scale_std=False)  # teacher text: +1
    with torch.no_grad():
        before = (ril.token_logprobs(model, enc, comp, mask, 1.0) * mask).sum(1)
    ril.policy_update(a, state(model, proc, opt=torch.optim.AdamW(model.parameters(), lr=1e-3)), enc, comp, mask, adv)
    with torch.no_grad():
        after = (ril.token_logprobs(model, enc, comp, mask, 1.0) * mask).sum(1)
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.parametrize("ratio", ["one", "old", "default"])
def test_teacher_ratio_one_weighs_each_teacher_token_by_the_students_probability_of_it(tiny, ratio):
    # gradient of the step = d/dtheta of -1/(N L_max) sum_it w_it logp_it, w = A p_it on a teacher text under "one",
    # else A
    proc, rows = tiny["proc"], tiny["rows"][:1]
    # a teacher text, then one standing for a sample
    texts = [rows[0]["teachers"]["alice"][0], rows[0]["teachers"]["bob"][0]]
    a = (
        args(beta=0.0, max_grad_norm=1e9)
        if ratio == "default"
        else args(teacher_ratio=ratio, beta=0.0, max_grad_norm=1e9)
    )
    comp, mask = ril.pad_right(
        [ril.text_ids(proc.tokenizer, t, a.max_new_tokens) for t in texts], proc.tokenizer.pad_token_id, CPU
    )
    enc, adv, teacher = (
        ril.repeat_prompts(ril.encode_prompts(proc, rows, CPU), 2),
        torch.tensor([1.0, -0.5]),
        torch.tensor([1, 0]),
    )
    model, expected = ril.copy.deepcopy(tiny["model"]), ril.copy.deepcopy(tiny["model"]).train()
    logp = ril.token_logprobs(expected, enc, comp, mask, a.temperature)
    weight = adv[:, None] * (logp.detach().exp() if ratio == "one" else torch.ones_like(logp)) ** teacher[:, None]
    (-(weight * logp * mask).sum() / (2 * a.max_new_tokens)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    ril.policy_update(
        a, state(model, proc, opt=torch.optim.SGD(model.parameters(), lr=1.0)), enc, comp, mask, adv, teacher
    )
    steps = [
        b - p.detach() for b, p in zip(before, model.parameters(), strict=True)
    ]  # SGD at lr 1: the step is the gradient
    assert all(
        torch.allclose(s, e.grad if e.grad is not None else torch.zeros_like(s), atol=1e-6)
        for s, e in zip(steps, expected.parameters(), strict=True)
    )
    assert (weight[0] < adv[0]).all() == (ratio == "one")  # a teacher token counts p < 1 times its advantage


def test_teacher_ratio_one_does_not_clip_a_teacher_token_with_a_negative_advantage(tiny):
    """Under --teacher-ratio one a teacher token's ratio is pi_theta <= 1: clipped at 1 - eps it would get no gradient
    whenever A < 0 and pi_theta < 0.8 (the min picks the constant (1 - eps) A). LUFFY does not clip its off-policy
    term; neither does this: the step is A * pi_theta * grad log pi_theta on every teacher token."""
    proc, rows = tiny["proc"], tiny["rows"][:1]
    text = rows[0]["teachers"]["alice"][0]
    a = args(teacher_ratio="one", beta=0.0, max_grad_norm=1e9)
    comp, mask = ril.pad_right([ril.text_ids(proc.tokenizer, text, a.max_new_tokens)], proc.tokenizer.pad_token_id, CPU)
    enc, adv, teacher = ril.encode_prompts(proc, rows, CPU), torch.tensor([-1.0]), torch.tensor([1])
    model, expected = ril.copy.deepcopy(tiny["model"]), ril.copy.deepcopy(tiny["model"]).train()
    logp = ril.token_logprobs(expected, enc, comp, mask, a.temperature)
    assert (logp.exp()[mask.bool()] < 1 - a.eps).any()  # tokens the clip would have frozen
    (-(adv[:, None] * logp.exp() * mask).sum() / a.max_new_tokens).backward()  # d/dtheta of A * pi_theta
    before = [p.detach().clone() for p in model.parameters()]
    ril.policy_update(
        a, state(model, proc, opt=torch.optim.SGD(model.parameters(), lr=1.0)), enc, comp, mask, adv, teacher
    )
    moved = False
    for b, p, e in zip(before, model.parameters(), expected.parameters(), strict=True):
        want = e.grad if e.grad is not None else torch.zeros_like(b)
        assert torch.allclose(b - p.detach(), want, atol=1e-6)
        moved = moved or bool(want.abs().sum() > 0)
    assert moved


def test_mu_policy_iterations_take_their_ratio_against_the_policy_that_sampled(tiny):
    """--mu 2: two optimiser steps on one batch; the second one's ratio is pi_theta (already moved once) over pi_old,
    the policy before the first step, not over itself (which would make every ratio 1 and the clip a no-op), for a
    teacher text as for a sample (Eq. 2). Checked against the two steps done by hand, with SGD at lr 1."""
    proc, rows = tiny["proc"], tiny["rows"][:1]
    texts = [rows[0]["teachers"]["alice"][0], rows[0]["teachers"]["bob"][0], rows[0]["answer"]]
    a = args(mu=2, beta=0.0, max_grad_norm=1e9, eps=0.05)
    comp, mask = ril.pad_right(
        [ril.text_ids(proc.tokenizer, t, a.max_new_tokens) for t in texts], proc.tokenizer.pad_token_id, CPU
    )
    enc, adv, teacher = (
        ril.repeat_prompts(ril.encode_prompts(proc, rows, CPU), 3),
        torch.tensor([1.0, 2.0, -1.5]),
        torch.tensor([1, 0, 0]),
    )
    model, by_hand = ril.copy.deepcopy(tiny["model"]), ril.copy.deepcopy(tiny["model"]).train()
    opt = torch.optim.SGD(by_hand.parameters(), lr=1.0)
    with torch.no_grad():
        old = ril.token_logprobs(by_hand, enc, comp, mask, 1.0)
    ratios = []
    for _ in range(2):
        logp = ril.token_logprobs(by_hand, enc, comp, mask, 1.0)
        ratios.append(torch.exp(logp.detach() - old)[mask.bool()])
        (
            -(
                torch.min(
                    torch.exp(logp - old) * adv[:, None],
                    torch.exp(logp - old).clamp(1 - a.eps, 1 + a.eps) * adv[:, None],
                )
                * mask
            ).sum()
            / (3 * a.max_new_tokens)
        ).backward()
        opt.step()
        opt.zero_grad()
    # the clip binds in step 2
    assert torch.allclose(ratios[0], torch.ones_like(ratios[0])) and (ratios[1] - 1).abs().max() > a.eps
    ril.policy_update(
        a, state(model, proc, opt=torch.optim.SGD(model.parameters(), lr=1.0)), enc, comp, mask, adv, teacher
    )
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), by_hand.parameters(), strict=True))


def test_clip_and_step_bounds_the_gradient_norm_and_skips_a_step_that_is_not_finite():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    (w * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()  # gradient norm 5
    norm, skipped = ril.clip_and_step(opt, [w], torch.tensor(1.0), max_norm=0.5)
    assert norm.item() == pytest.approx(5.0) and skipped == 0.0 and w.grad is None
    assert w.detach().tolist() == pytest.approx([-0.3, -0.4, 0.0, 0.0])  # the step has norm max_norm
    (w * torch.tensor([1.0, 0.0, 0.0, 0.0])).sum().backward()
    _, skipped = ril.clip_and_step(opt, [w], torch.tensor(float("nan")), max_norm=0.5)
    assert skipped == 1.0 and w.detach().tolist() == pytest.approx([-0.3, -0.4, 0.0, 0.0]) and w.grad is None


# ---------------------------------------------------------------- Stage 0, the discriminator and rewards
def test_discriminator_updates_lower_its_bce_and_tell_student_texts_from_teacher_texts(tiny):
    """disc_update reports the pre-step BCE; 20 updates on a fixed batch (Eq. 1: student 1, teacher 0) more than
    halve the BCE and put every student text above 0 and every teacher text below. A single step's BCE is no test of
    the labels' direction on a random model: either labelling first shrinks the logits' common offset."""
    torch.manual_seed(0)  # D's new head: the same whatever ran before
    disc = ril.Discriminator(tiny["model"])
    tok = tiny["proc"].tokenizer
    student, teacher = ["red", "3", "circle"], ["The shape is red.", "There are 3 shapes.", "Answer: circle."]
    labels = torch.tensor([1.0] * 3 + [0.0] * 3)

    def logits():
        return ril.disc_logits(disc, tok, student + teacher, CPU)

    before = torch.nn.functional.binary_cross_entropy_with_logits(logits(), labels)
    opt, is_teacher = torch.optim.AdamW(disc.parameters(), lr=1e-3), torch.tensor([0, 0, 0, 1, 1, 1])
    first = ril.disc_update(disc, opt, tok, student + teacher, is_teacher, args(), CPU)
    assert abs(first["disc/loss"] - before.item()) < 1e-6
    for _ in range(19):
        ril.disc_update(disc, opt, tok, student + teacher, is_teacher, args(), CPU)
    d = logits()
    assert torch.nn.functional.binary_cross_entropy_with_logits(d, labels) < before / 2
    assert d[:3].min() > 0 > d[3:].max()


def test_discriminator_starts_from_the_student_weights_and_ignores_padding(tiny):
    disc = ril.Discriminator(tiny["model"])
    lm = tiny["model"].model.language_model.state_dict()
    assert all(torch.equal(v, lm[k]) for k, v in disc.backbone.state_dict().items())
    tok = tiny["proc"].tokenizer
    batch = ril.disc_logits(disc, tok, ["red", "The color of the shape is yellow."], CPU)
    alone = ril.disc_logits(disc, tok, ["red"], CPU)
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


class _NoRun:
    """train()'s `run` with nothing to wrap, resume, save or log."""

    def wrap(self, s):
        pass

    def resume(self, s):
        return 1, None

    def begin(self, s, before):
        pass

    def end_step(self, s, step, m, dump):
        pass


def test_the_reference_and_d_take_the_sft_students_weights_before_d_pretraining(tiny, monkeypatch):
    """pi_ref and D's backbone are the student *after* Stage 0 [P] Alg. 2, §3.1, not the student before it, when D's
    pre-training begins: a reference from before SFT would pull the policy back to a random model."""
    model, rows = ril.copy.deepcopy(tiny["model"]), tiny["rows"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def pretrain(a, s, rows):
        seen["student"] = {k: v.clone() for k, v in ril.unwrap(s.model).state_dict().items()}
        seen["ref"] = {k: v.clone() for k, v in s.ref.state_dict().items()}
        seen["backbone"] = {k: v.clone() for k, v in s.disc.backbone.state_dict().items()}
        seen["trainable_ref"] = [p for p in s.ref.parameters() if p.requires_grad]

    monkeypatch.setattr(ril, "pretrain_disc", pretrain)
    monkeypatch.setattr(ril, "evaluate", lambda *a, **kw: ({}, []))
    a = args(sft_steps=1, sft_batch_size=4, steps=0)
    ril.train(a, state(model, tiny["proc"], judge=ril.MatchJudge(rows)), rows, rows, tiny["held"], _NoRun())
    sft = seen["student"]
    assert any(not torch.equal(sft[k], start[k]) for k in sft), "SFT changed nothing"
    assert all(torch.equal(seen["ref"][k], sft[k]) for k in sft) and not seen["trainable_ref"]
    lm = {k[len("model.language_model.") :]: v for k, v in sft.items() if k.startswith("model.language_model.")}
    assert lm and set(seen["backbone"]) == set(lm) and all(torch.equal(seen["backbone"][k], lm[k]) for k in lm)


def test_each_stage_takes_its_own_learning_rate(tiny, monkeypatch):
    """--sft-lr reaches Stage 0's AdamW, --disc-pretrain-lr D's pre-training, --lr and --disc-lr the RL stage's
    (on 7777159 every test still passed with --sft-lr wired to the RL stage)."""
    lrs, real = [], ril.decaying_adamw

    def decaying_adamw(params, lr, steps):
        lrs.append(lr)
        return real(params, lr, steps)

    monkeypatch.setattr(ril, "decaying_adamw", decaying_adamw)
    monkeypatch.setattr(ril, "evaluate", lambda *a, **kw: ({}, []))
    monkeypatch.setattr(ril, "pass_at_g", lambda *a, **kw: 0.0)
    a = args(sft_steps=1, sft_batch_size=4, disc_pretrain_steps=1, batch_size=2, steps=0)
    a.lr, a.sft_lr, a.disc_lr, a.disc_pretrain_lr = 1e-4, 2e-3, 3e-5, 4e-4
    s = state(ril.copy.deepcopy(tiny["model"]), tiny["proc"], judge=ril.MatchJudge(tiny["rows"]))
    ril.train(a, s, tiny["rows"], tiny["rows"], tiny["held"], _NoRun())
    assert lrs == [2e-3, 4e-4]
    assert [g["lr"] for g in s.opt.param_groups] == [1e-4] and [g["lr"] for g in s.d_opt.param_groups] == [3e-5]


def test_the_sft_loss_is_each_targets_mean_token_loss_averaged_over_targets(tiny, capsys, monkeypatch):
    """Not a token mean over the batch, which lets a long text drown a 1-token answer (README: phrased, 0.242 after
    SFT with a token mean, 0.858 with this). Target i's every token gets log-prob -(i + 1)."""
    answers = ["red", "two shapes of every color are here", "3", "blue square"]
    rows = [dict(r, answer=x, teachers={}) for r, x in zip(tiny["rows"][:4], answers, strict=True)]
    seen = {}

    def token_logprobs(model, enc, comp, mask, temperature):
        seen["lengths"] = mask.sum(1)
        return -torch.arange(1.0, len(comp) + 1)[:, None].expand(comp.shape).clone().requires_grad_()

    monkeypatch.setattr(ril, "token_logprobs", token_logprobs)
    ril.sft_warmup(args(sft_steps=1, sft_batch_size=4, sft_teacher_frac=0.0), state(tiny["model"], tiny["proc"]), rows)
    loss = float(re.search(r"final loss (\S+)", capsys.readouterr().out).group(1))
    token_mean = (seen["lengths"] * torch.arange(1.0, 5)).sum() / seen["lengths"].sum()
    assert loss == pytest.approx(2.5, abs=1e-3) and abs(token_mean - 2.5) > 0.1, token_mean


def test_discriminator_shares_the_prompt_prefix_without_changing_its_output(tiny):
    """D runs the tokens every text shares (the Fig. 3 prompt) once. Its logits and gradients equal
    those of running every row in full, for texts of different lengths, one that starts with
    punctuation (whose first token may merge with the prompt's) and right padding."""
    tok = tiny["proc"].tokenizer
    torch.manual_seed(0)
    disc = ril.Discriminator(tiny["model"])
    ids, mask = ril.disc_inputs(tok, ["red.", ">.< odd start", "blue, clearly.", "3 is my answer. " * 3], CPU)

    def plain():
        h = disc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return disc.head(h[torch.arange(len(h)), mask.sum(1) - 1]).squeeze(-1)

    grads = []
    for f in (lambda: disc(ids, mask), plain):
        disc.zero_grad()
        out = f()
        (out * torch.tensor([1.0, -2.0, 3.0, 0.5])).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in disc.named_parameters()}))
    (o1, g1), (o2, g2) = grads
    assert torch.allclose(o1, o2, atol=1e-5)
    assert all(torch.allclose(g1[n], g2[n], atol=1e-5, rtol=1e-4) for n in g1)


def test_similarity_reward_is_one_when_d_says_teacher():
    logits = torch.logit(torch.tensor([0.1, 0.49, 0.51, 0.9]))
    assert ril.similarity_reward(logits, args()).tolist() == [1.0, 1.0, 0.0, 0.0]
    # --sim-threshold is D's cut
    assert ril.similarity_reward(logits, args(sim_threshold=0.3)).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(
        ril.similarity_reward(logits, args(sim_reward="continuous")), torch.tensor([0.9, 0.51, 0.49, 0.1])
    )


def test_answer_match_normalises_wants_whole_words_and_refuses_lists():
    c = ril.MatchJudge(ril.make_toy(30, 0)).candidates
    assert {("red",), ("circle",), ("3",)} <= c
    assert ril.answer_match("There are three shapes.", "3", c) == 1.0
    assert ril.answer_match("The shape is RED.", "red", c) == 1.0
    assert ril.answer_match("Reddish.", "red", c) == 0.0
    assert ril.answer_match("There are 13 shapes.", "3", c) == 0.0
    # listing candidates is not an answer (the hack plain containment rewards)
    assert ril.answer_match("3 count 4 4 4", "3", c) == 0.0
    assert ril.answer_match("red, blue or green", "red", c) == 0.0
    # an option letter is that capital alone: the article "a" is no answer A (it matched every "a square"); other
    # answers still fold case, with option letters among the candidates (a lone capital kept its case in ad4d9d4,
    # which scored "He wears a T-shirt." 0 for t-shirt, and "A square." 0 for square beside answers A to D)
    both = ril.MatchJudge([dict(answer=x) for x in ["A", "B", "C", "D", "square", "Vitamin C", "t-shirt"]]).candidates
    for response, answer, right in [
        ("It is a square.", "A", 0.0),
        ("A", "A", 1.0),
        ("(A) a square", "A", 1.0),
        ("A or B", "A", 0.0),
        ("I think it is B.", "B", 1.0),
        ("A square.", "square", 1.0),
        ("It is vitamin c.", "Vitamin C", 1.0),
        ("He wears a T-shirt.", "t-shirt", 1.0),
    ]:
        assert ril.answer_match(response, answer, both) == right, (response, answer)
    # every toy teacher text is judged correct
    for r in ril.make_toy(30, 0):
        assert all(ril.answer_match(t, r["answer"], c) == 1.0 for ts in r["teachers"].values() for t in ts)


def test_answer_match_reads_a_number_as_one_word_and_one_as_a_count_only_for_a_count():
    """A sign, a decimal point and thousands belong to the number (the word pattern split "3.5" into 3 and 5, and
    dropped the minus), 0.50 is 0.5; "one" is the number 1 only where the answer is a number ("the red one" named the
    count 1)."""
    c = ril.MatchJudge(ril.make_toy(30, 0)).candidates
    for response, answer, right in [
        ("The value is 3.", "-3", 0.0),
        ("The value is -3.", "3", 0.0),
        ("The slope is 3.5.", "3", 0.0),
        ("It is 2.5 cm long.", "2", 0.0),
        ("There are 1000 people.", "1,000", 1.0),
        ("There are 1,000 people.", "1000", 1.0),
        ("It is -2.5.", "-2.5", 1.0),
        ("3.", "3", 1.0),
        ("It is the red one.", "red", 1.0),
        ("This one is blue.", "blue", 1.0),
        ("Only one, or three.", "3", 0.0),
        ("There is one shape.", "1", 1.0),
        ("The share is 0.50.", "0.5", 1.0),  # trailing zeros after a point say nothing
        ("It is 2.0 cm long.", "2", 1.0),
        ("It is 0.05.", "0.5", 0.0),
        ("It is 20 or 100.", "2", 0.0),
    ]:
        assert ril.answer_match(response, answer, c) == right, (response, answer)


# ---------------------------------------------------------------- held-out evaluation
def test_evaluate_scores_each_greedy_answer_against_its_own_row(tiny, monkeypatch):
    """Fixed greedy answers (generate stubbed) to rows with several teacher texts each: teacher match is 1 when the
    answer equals any one teacher text word for word (after normalize), of either teacher, and 0 when it equals none;
    accuracy is the judge's, length the answer's tokens with EOS, teacher-likeness the mean of 1 - D; answers come back
    in row order."""
    tok = tiny["proc"].tokenizer
    said = ["The shape is red.", "I think blue.", "3", "Four."]
    # two of three
    rows = [
        dict(tiny["rows"][i], answer=ans, teachers=t)
        for i, (ans, t) in enumerate(
            [
                ("red", {"alice": ["It is red.", "the shape is RED"], "bob": ["Red."]}),  # one of alice's two texts
                # bob's only text; a wrong answer
                ("green", {"alice": ["Blue.", "It is blue."], "bob": ["I think blue!"]}),
                ("2", {"alice": ["There are 3 shapes."], "bob": ["three shapes"]}),  # none
                ("4", {"alice": ["4"], "bob": ["four", "4 shapes"]}),
            ]
        )
    ]
    comp, mask = ril.pad_right([ril.text_ids(tok, t, 16) for t in said], tok.pad_token_id, CPU)
    calls = []
    monkeypatch.setattr(
        ril, "generate", lambda model, enc, *rest, **kw: calls.append(len(enc["input_ids"])) or (comp, mask)
    )
    d = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    seen = []
    monkeypatch.setattr(ril, "disc_logits", lambda disc, tok, texts, *rest, **kw: seen.append(list(texts)) or d.clone())
    s = state(tiny["model"], tiny["proc"], judge=ril.MatchJudge(tiny["rows"]), disc=torch.nn.Module())
    metrics, answers = ril.evaluate(args(), s, rows)
    assert calls == [4] and answers == said and seen == [said]
    assert metrics["eval/teacher_match"] == pytest.approx(3 / 4)
    assert metrics["eval/acc"] == pytest.approx(2 / 4)  # red and 4 are right; blue for green and 3 for 2 are not
    assert metrics["eval/len"] == pytest.approx(mask.sum().item() / 4)
    assert metrics["eval/teacher_like"] == pytest.approx((1 - torch.sigmoid(d)).mean().item())
    s.teachers = ("alice",)  # --teachers alice: bob's texts are not a teacher's of this run
    assert ril.evaluate(args(), s, rows)[0]["eval/teacher_match"] == pytest.approx(2 / 4)


def test_pass_at_g_counts_questions_with_a_right_sample_and_leaves_the_runs_random_stream_alone(tiny):
    a = args(G=2, batch_size=3)
    s = state(tiny["model"], tiny["proc"], judge=_FixedJudge([1, 0, 0, 0, 0, 1]))  # questions 1 and 3 of each batch
    rng = torch.get_rng_state()
    assert ril.pass_at_g(a, s, tiny["held"][:6]) == pytest.approx(4 / 6)
    assert torch.equal(torch.get_rng_state(), rng)
    s.judge = _FixedJudge([0] * 6)
    assert ril.pass_at_g(a, s, tiny["held"][:6]) == 0.0


def test_the_teacher_texts_row_is_judged_not_assumed(tmp_path, capsys):
    """A teacher whose texts are wrong lowers the accuracy the final table shows for the teachers' own texts."""
    rows = ril.make_toy(14, 0)
    for r in rows:
        r["teachers"] = {"alice": r["teachers"]["alice"], "bob": ["I do not know."]}
    _save_jsonl(tmp_path, rows[:10], "train.jsonl")
    _save_jsonl(tmp_path, rows[10:], "held.jsonl")
    ril.main(
        argv(
            "--data {train} --eval-data {held} --steps 1 --sft-steps 1"
            " --disc-pretrain-steps 1 --batch-size 2 --out {out}",
            train=tmp_path / "train.jsonl",
            held=tmp_path / "held.jsonl",
            out=tmp_path / "o",
        )
    )
    # per held-out row: alice's 2 texts right, bob's 1 wrong
    assert "| teacher texts | 0.667 |" in capsys.readouterr().out


# ---------------------------------------------------------------- masks, tokens, sampling, log-probs, images
def test_masks_keep_eos_and_drop_padding():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, 8, 9], [5, 6, 7, 8, 9]])
    assert ril.completion_mask(ids, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    comp, mask = ril.pad_right([[5, eos], [5, 6, 7, eos]], pad, CPU)
    assert comp.tolist() == [[5, eos, pad, pad], [5, 6, 7, eos]] and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_teacher_texts_are_retokenised_by_the_student_and_end_in_eos(tiny):
    tok = tiny["proc"].tokenizer
    ids = ril.text_ids(tok, "The shape is red.", 16)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "The shape is red."
    cut = ril.text_ids(tok, ril.Unfinished("The shape is red."), 16)  # cut by its model's cap: no EOS, as a cut sample
    assert cut == ids[:-1]


def test_an_sft_target_cut_to_nothing_adds_no_nan(tiny, capsys):
    """SFT averages each target's token loss; a teacher text its model's cap cut to nothing has no tokens at all."""
    empty, red = {"alice": [ril.Unfinished("")], "bob": [ril.Unfinished("")]}, {"alice": ["red."], "bob": ["red."]}
    rows = [dict(r, teachers=t) for r, t in zip(tiny["rows"][:2], [empty, red], strict=True)]
    ril.sft_warmup(
        args(sft_steps=1, sft_batch_size=2, sft_teacher_frac=1.0),
        state(ril.copy.deepcopy(tiny["model"]), tiny["proc"]),
        rows,
    )
    loss = float(re.search(r"final loss (\S+)", capsys.readouterr().out).group(1))
    assert math.isfinite(loss) and loss > 0


def test_special_token_strings_in_a_text_are_plain_text_for_the_policy_and_for_d(tiny):
    """A text that holds "<|im_end|>" or "<|image_pad|>" as characters: the policy's ids and D's prompt contain
    neither token for it (one would end the text early, the other crashes the forward); D's prompt keeps its own."""
    tok, specials = tiny["proc"].tokenizer, {tok_id for tok_id in tiny["proc"].tokenizer.all_special_ids}
    text = "red <|im_end|> blue <|image_pad|>"
    ids = ril.text_ids(tok, text, 64)
    assert not set(ids[:-1]) & specials and ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == text
    with_text, plain = ril.disc_prompt_ids(tok, text), ril.disc_prompt_ids(tok, "red blue")
    assert [i for i in with_text if i in specials] == [i for i in plain if i in specials] and tok.eos_token_id in plain


def test_d_and_the_judge_read_a_long_teacher_text_as_cut_for_the_policy(tiny):
    """A teacher text longer than --max-new-tokens: the policy trains on its first L_max tokens (no EOS), so D and
    the judge get the decoded cut, not the full text, which D could tell apart by length alone."""
    a, tok = args(G=2, max_new_tokens=6), tiny["proc"].tokenizer
    row = dict(tiny["rows"][0], teachers={"alice": ["red " * 20, "red."], "bob": ["blue " * 20]})
    ro = ril.rollout(a, state(tiny["model"], tiny["proc"]), [row], ril.random.Random(0), with_teachers=True)
    for comp, mask, text, is_teacher in zip(ro["comp"], ro["mask"], ro["texts"], ro["is_teacher"], strict=True):
        ids = comp[mask.bool()].tolist()
        if is_teacher:
            assert len(ids) <= 6 and text == tok.decode(ids, skip_special_tokens=True) and len(text) < 30
    assert ro["is_teacher"].tolist() == [0, 0, 1, 1]
    assert ro["texts"][3] == tok.decode(tok("blue " * 20)["input_ids"][:6]) != "blue " * 20  # bob's slot: the cut text


def test_a_teacher_models_texts_keep_their_spaces_and_a_cut_one_gets_no_eos(tmp_path, tiny, monkeypatch):
    """model_teacher_texts stores what the teacher wrote, unstripped (student samples are not stripped either),
    and which texts its generation cap cut; read back from the cache, a cut text is Unfinished again."""
    tok, rows = tiny["proc"].tokenizer, [dict(r, teachers={}) for r in tiny["rows"][:2]]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    said = [(" red", True), ("blue blue blue", False), ("3.", True), (" two words", False)]  # (text, ended)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + ([eos] if ended else []) for t, ended in said]
    comp = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in seqs], batch_first=True, padding_value=pad)
    monkeypatch.setattr(ril, "load_model", lambda *a, **k: (tiny["model"], tiny["proc"]))
    monkeypatch.setattr(ril, "generate", lambda *a, **k: (comp, (comp != pad).long()))
    a = args(teacher_samples=2, out=str(tmp_path))
    for _ in range(2):  # generated, then read from the cache
        ril.model_teacher_texts("m", rows, a, CPU, torch.float32)
        texts = rows[0]["teachers"]["m"] + rows[1]["teachers"]["m"]
        assert texts == [t for t, _ in said] and [isinstance(t, ril.Unfinished) for t in texts] == [
            not e for _, e in said
        ]
        assert [ril.text_ids(tok, t, 16)[-1] == eos for t in texts] == [e for _, e in said]


def test_completions_never_contain_vision_placeholder_tokens(tiny):
    model, proc = ril.copy.deepcopy(tiny["model"]), tiny["proc"]
    image_pad = model.config.image_token_id

    def favour_image_pad(module, inputs, logits):  # make <|image_pad|> the policy's favourite token
        return logits.index_add(-1, torch.tensor([image_pad]), torch.full((*logits.shape[:-1], 1), 100.0))

    model.lm_head.register_forward_hook(favour_image_pad)
    enc = ril.repeat_prompts(ril.encode_prompts(proc, tiny["rows"][:2], CPU), 4)
    cfg = ril.generation_config(args(), model, proc.tokenizer, greedy=False)
    vision = cfg.suppress_tokens
    assert image_pad in vision and model.config.vision_start_token_id in vision
    raw = model.generate(
        **enc, generation_config=transformers.GenerationConfig(**{**cfg.to_dict(), "suppress_tokens": None})
    )
    assert (raw[:, enc["input_ids"].shape[1] :] == image_pad).any(), "the biased model should want image tokens"
    comp, _ = ril.generate(model, enc, cfg)
    assert not torch.isin(comp, torch.tensor(vision)).any()


def test_the_top_k_sampler_draws_from_the_distribution_of_hf_sampling(monkeypatch):
    """sample_top_k_top_p draws among the top k alone. The probabilities it draws from, put back at their token ids,
    equal those of HF's temperature, top-k and top-p warpers followed by a softmax over the whole vocabulary (within
    1e-6), for flat and sharp logits with a suppressed token; the scores it returns make greedy search take exactly the
    draw; and 20,000 draws match HF's probabilities."""
    a = args(temperature=0.7, top_k=50, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(2, 3000, generator=g) * scale for scale in (0.3, 3.0, 12.0)])  # flat to sharp
    scores[:, 7] = -float("inf")  # a suppressed token
    warpers = transformers.LogitsProcessorList(
        [
            transformers.TemperatureLogitsWarper(0.7),
            transformers.TopKLogitsWarper(50),
            transformers.TopPLogitsWarper(0.95),
        ]
    )
    want = warpers(None, scores.clone()).softmax(-1)  # what HF's do_sample draws from
    drawn_from, real = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n, **kw: drawn_from.append(p) or real(p, n, **kw))
    out = ril.sample_top_k_top_p(a, None, scores)
    _, idx = (scores / 0.7).topk(50)
    got = torch.zeros_like(scores).scatter(-1, idx, drawn_from[0])
    assert (got - want).abs().max() < 1e-6
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum(-1).eq(scores.shape[1] - 1).all()
    assert (want.gather(-1, out.argmax(-1, keepdim=True)) > 0).all()  # every draw is a token HF could draw
    row = scores[2:3].expand(20000, -1)  # one moderately sharp row, drawn 20,000 times
    freq = torch.bincount(ril.sample_top_k_top_p(a, None, row).argmax(-1), minlength=scores.shape[1]) / 20000
    assert (freq - want[2]).abs().max() < 0.015


def test_with_top_k_off_and_top_p_1_the_sampler_sorts_nothing_and_draws_from_the_softmax(monkeypatch):
    """--top-k 0 --top-p 1 (TRL's and vLLM's default): on 7777159 a topk over the whole vocabulary at every token
    (24 s a step at Qwen2's 151,936 entries, against 8.5 s with top-k 50)."""
    a = args(temperature=0.7, top_k=0, top_p=1.0)
    scores = torch.randn(1, 300, generator=torch.Generator().manual_seed(0)) * 3
    scores[:, 7] = -float("inf")

    def no_sort(*x, **kw):
        raise AssertionError("sorted")

    monkeypatch.setattr(torch.Tensor, "topk", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    freq = torch.bincount(ril.sample_top_k_top_p(a, None, scores.expand(20000, -1)).argmax(-1), minlength=300) / 20000
    assert (freq - (scores[0] / 0.7).softmax(-1)).abs().max() < 0.015 and freq[7] == 0


def test_truncated_means_no_eos_even_at_the_last_position(tiny, monkeypatch):
    eos, pad = tiny["proc"].tokenizer.eos_token_id, tiny["proc"].tokenizer.pad_token_id
    fake = torch.tensor([[7, 8, eos], [7, 8, 9], [7, eos, pad], [7, 8, 9]])  # ends on EOS / cap / early EOS / cap
    monkeypatch.setattr(ril, "generate", lambda model, enc, cfg, *rest, **kw: (fake, ril.completion_mask(fake, [eos])))
    ro = ril.rollout(
        args(G=4), state(tiny["model"], tiny["proc"]), tiny["rows"][:1], ril.random.Random(0), with_teachers=False
    )
    assert ro["truncated"] == 0.5


def test_training_logprobs_match_generate(tiny):
    model, proc = tiny["model"], tiny["proc"]
    a = args(temperature=1.0)
    enc = ril.repeat_prompts(ril.encode_prompts(proc, tiny["rows"][:3], CPU), 2)
    cfg = ril.generation_config(a, model, proc.tokenizer, greedy=False)
    with torch.no_grad():
        # sampled, as in a rollout
        out = model.generate(
            **enc,
            generation_config=cfg,
            return_dict_in_generate=True,
            output_logits=True,
            logits_processor=[ril.functools.partial(ril.sample_top_k_top_p, a)],
        )
        comp, logits = out.sequences[:, enc["input_ids"].shape[1] :], torch.stack(out.logits, 1)
        mask = ril.completion_mask(comp, cfg.eos_token_id)
        lp = ril.token_logprobs(model, enc, comp, mask, a.temperature)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, comp[..., None]).squeeze(-1)
    assert (lp - ref)[mask.bool()].abs().max() < 1e-4


def plain_token_logprobs(model, enc, comp, comp_mask, temperature):
    """token_logprobs computed plainly, the oracle of the test below: every position's full-vocabulary logits at once,
    then the log-softmax."""
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


def test_chunked_logprobs_and_gradients_equal_the_full_logits_computation(tiny):
    """token_logprobs never holds the (N, T, V) logits: the LM head and log-softmax run a chunk of tokens at a time and
    again in the backward pass. Against the plain computation (all logits, then log-softmax), for chunks that split
    sequences mid-way and one chunk for all: the same log-probs and gradients within 1e-5, and the head's own forward
    back."""
    model, proc = tiny["model"], tiny["proc"]
    enc = ril.repeat_prompts(ril.encode_prompts(proc, tiny["rows"][:3], CPU), 2)
    comp = torch.randint(10, len(proc.tokenizer) - 8, (6, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(comp)
    mask[0, 5:] = 0
    want = plain_token_logprobs(model, enc, comp, mask, 0.7)  # all (N, T, V) logits at once, then the log-softmax
    weights = torch.randn(comp.shape, generator=torch.Generator().manual_seed(1))
    want_grads = torch.autograd.grad((want * weights).sum(), list(model.parameters()))
    for tokens in (5, 7, 1024):  # tokens a chunk: 5 and 7 split sequences mid-way, 1024 takes all 42 at once
        chunk = tokens * model.config.get_text_config().vocab_size
        got = ril.token_logprobs(model, enc, comp, mask, 0.7, chunk=chunk)
        grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
        assert (got - want).abs().max() < 1e-5, chunk
        assert max((g - w).abs().max().item() for g, w in zip(grads, want_grads, strict=True)) < 1e-5, chunk
    assert "forward" not in model.get_output_embeddings().__dict__
    assert model(**enc).logits.shape[-1] == model.config.get_text_config().vocab_size  # the head gives logits again


def test_repeat_prompts_keeps_each_image_with_its_prompt(tiny):
    proc, rows = tiny["proc"], tiny["rows"][:3]
    rep = ril.repeat_prompts(ril.encode_prompts(proc, rows, CPU), 2)
    direct = ril.encode_prompts(proc, [r for r in rows for _ in range(2)], CPU)
    for k in direct:
        assert torch.equal(rep[k], direct[k]), k


def _rows_with_images_of_three_sizes(tiny) -> list:
    """Three questions whose images give 16, 48 and 32 patches (56x56, 112x84, 56x112): no block offset is i * one
    size."""
    sizes = [(56, 56), (112, 84), (56, 112)]
    return [dict(r, image=r["image"].resize(wh)) for r, wh in zip(tiny["rows"][3:6], sizes, strict=True)]


def test_prompts_with_images_of_different_sizes_keep_their_own_pixel_blocks(tiny):
    """select_prompts and repeat_prompts on a batch whose images differ in size: each prompt keeps its own block of
    pixel_values rows, as encoding the chosen prompts directly gives, in any order and with repeats."""
    proc, rows = tiny["proc"], _rows_with_images_of_three_sizes(tiny)
    enc = ril.encode_prompts(proc, rows, CPU)
    patches = enc["image_grid_thw"].prod(-1).tolist()
    assert len(set(patches)) == 3 and len(enc["pixel_values"]) == sum(patches)
    for idx in ([2, 0, 1], [1, 2, 2, 0, 1], [0, 0, 0, 1, 1, 1, 2, 2, 2]):
        picked, direct = ril.select_prompts(enc, idx), ril.encode_prompts(proc, [rows[i] for i in idx], CPU)
        assert set(picked) == set(direct) and all(torch.equal(picked[k], direct[k]) for k in direct), idx
    rep, direct = ril.repeat_prompts(enc, 3), ril.encode_prompts(proc, [r for r in rows for _ in range(3)], CPU)
    assert all(torch.equal(rep[k], direct[k]) for k in direct)


def test_a_forward_pass_over_images_of_different_sizes_sees_each_prompts_own_image(tiny):
    """The log-probs of a text after a prompt are the same in a batch of prompts with images of three sizes, in
    micro-batches of that batch (select_prompts per micro-batch, as policy_update takes them) and with the prompt
    encoded alone; and they depend on the image (so a prompt given another's pixels would show)."""
    model, proc, rows = tiny["model"], tiny["proc"], _rows_with_images_of_three_sizes(tiny)
    other = ril.encode_prompts(proc, [dict(rows[0], image=rows[2]["image"])], CPU)
    _sees_each_prompts_own_image(model, proc, rows, other)  # micro-batches of 16+16+48+48 and 32+32 pixel rows


def _sees_each_prompts_own_image(model, proc, rows: list, other):
    """The log-probs of six texts after prompts 0, 0, 1, 1, 2, 2 of rows agree within 1e-5 in one batch, in
    micro-batches of 4 and 2 (select_prompts, as policy_update takes them) and with each prompt encoded alone; prompt 0
    with another image's pixels (`other`, its encoding) gets other log-probs."""
    enc = ril.repeat_prompts(ril.encode_prompts(proc, rows, CPU), 2)
    texts = ["red.", "It is a circle.", "3", "blue", "4 shapes", "red."]
    comp, mask = ril.pad_right([ril.text_ids(proc.tokenizer, t, 8) for t in texts], proc.tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        full = ril.token_logprobs(model, enc, comp, mask, 1.0)
        parts = torch.cat(
            [
                ril.token_logprobs(model, ril.select_prompts(enc, list(range(i, j))), comp[i:j], mask[i:j], 1.0)
                for i, j in ril.chunks(6, 4)
            ]
        )
        alone = torch.cat(
            [
                ril.token_logprobs(
                    model, ril.encode_prompts(proc, [rows[i // 2]], CPU), comp[i : i + 1], mask[i : i + 1], 1.0
                )
                for i in range(6)
            ]
        )
        swapped = ril.token_logprobs(model, other, comp[:1], mask[:1], 1.0)
    m = mask.bool()
    assert (full - parts)[m].abs().max() < 1e-5 and (full - alone)[m].abs().max() < 1e-5
    assert (swapped - alone[:1])[m[:1]].abs().max() > 1e-4


# ---------------------------------------------------------------- data: tasks, images, batch and teacher-text order
def test_the_second_built_in_task_asks_other_ways_and_its_teachers_answer_later(tmp_path):
    """--data phrased: other images, six other phrasings, teachers that never lead with the answer (so imitating
    them moves the answer); every teacher text is right by the matcher; it trains end to end."""
    toy, phrased = ril.make_toy(60, 0), ril.make_toy(60, 0, "phrased")
    questions = {r["question"] for r in phrased}
    assert len(questions) == 6 and not questions & {r["question"] for r in toy}
    assert [r["image"].tobytes() for r in phrased[:6]] != [r["image"].tobytes() for r in toy[:6]]
    judge = ril.MatchJudge(phrased)
    for r in phrased:
        texts = [t for ts in r["teachers"].values() for t in ts]
        assert judge([r["question"]] * 4, [r["answer"]] * 4, texts) == [1.0] * 4
        assert all(ril.normalize(t)[0] != ril.normalize(r["answer"])[0] for t in texts)
    out = main_out(tmp_path, "--data", "phrased", "--steps", "1")
    assert json.load(open(os.path.join(out, "args.json")))["data"] == "phrased"
    assert "phrased" in open(os.path.join(out, "samples.jsonl")).readline()


def test_the_transfer_task_asks_what_stage_0_never_showed_with_teachers_that_give_their_evidence():
    sft, rows, held = ril.load_data(ril.parse_args(["--data", "transfer", "--toy-size", "60", "--eval-size", "30"]))
    assert [r["question"] for r in sft] == [r["question"] for r in ril.make_toy(60, 0)]  # Stage 0: the toy task
    stage0 = {w for r in sft for t in [r["answer"], *sum(r["teachers"].values(), [])] for w in ril.normalize(t)}
    assert not {r["answer"] for r in rows + held} & stage0  # no RL answer is a word Stage 0 ever wrote
    evidence = {v: k for k, v in ril.TRANSFER.items()}
    for r in rows:
        for t in sum(r["teachers"].values(), []):
            assert ril.answer_match(t, r["answer"]) == 1.0 and evidence[r["answer"]] in ril.normalize(t)
    judge, r = ril.MatchJudge(rows), rows[0]
    wrong = next(x for x in rows if x["question"] == r["question"] and x["answer"] != r["answer"])
    assert judge([r["question"]], [r["answer"]], [wrong["teachers"]["erin"][0]]) == [0.0]  # teacher-styled, wrong


def test_images_of_every_mode_reach_the_model_as_a_viewer_shows_them(tmp_path):
    """Transparent pixels over white (not black), 16-bit grey scaled (not clipped to white), EXIF rotation applied, and
    every mode Pillow opens becomes an RGB image the processor takes."""
    from PIL import Image

    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 4))  # red left half, transparent right half
    cases = {
        "rgba.png": rgba,
        "la.png": rgba.convert("LA"),
        "p.png": rgba.convert("P"),
        "grey16.png": Image.new("I;16", (8, 4), 32768),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (8, 4), "blue").save(tmp_path / "rotated.jpg", exif=exif)
    seen = {name: ril.open_image(str(tmp_path / name)) for name in [*cases, "rotated.jpg"]}
    assert all(img.mode == "RGB" for img in seen.values())
    assert seen["rgba.png"].getpixel((0, 0)) == (255, 0, 0) and seen["rgba.png"].getpixel((7, 0)) == (255, 255, 255)
    assert seen["la.png"].getpixel((7, 0)) == (255, 255, 255) and seen["p.png"].getpixel((7, 0)) == (255, 255, 255)
    assert seen["grey16.png"].getpixel((0, 0)) == (128, 128, 128)
    assert seen["rotated.jpg"].size == (4, 8)
    # the modes files open as
    for mode in "1 L P RGB RGBA LA PA CMYK YCbCr LAB HSV I F I;16 I;16B RGBa".split():
        img = ril.open_image(
            Image.new("RGB", (8, 4), (200, 30, 30)).convert(mode) if "I;16" not in mode else Image.new(mode, (8, 4), 9)
        )
        assert img.mode == "RGB" and img.size == (8, 4), mode


def _jsonl_run(tmp_path, n=6) -> tuple:
    """A JSONL task of n rows with their own image files, and the flags of a tiny run on it."""
    rows = ril.make_toy(n, 0)
    for r in rows:
        r["image"].save(tmp_path / f"{r['id']}.png")
    lines = [
        json.dumps(
            {
                "id": r["id"],
                "image": f"{r['id']}.png",
                "question": r["question"],
                "answer": r["answer"],
                "teachers": r["teachers"],
            }
        )
        for r in rows
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    flags = argv(
        "--data {data} --eval-size 2 --sft-steps 2 --disc-pretrain-steps 1"
        " --batch-size 2 --sft-batch-size 2 --save-every 1",
        data=tmp_path / "d.jsonl",
    )
    return rows, flags


def test_a_jsonl_with_a_byte_order_mark_is_read_as_utf8(tmp_path):
    _, flags = _jsonl_run(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    rows = ril.load_jsonl(str(data))
    assert len(rows) == 6 and rows[0]["id"] == "toy0-0"


def test_batches_are_a_pure_function_of_the_step():
    """The same (seed, step) gives the same questions in a fresh process (epoch_order's cache cleared) whatever the
    global random and torch states are, as a resumed run needs; every epoch is a new shuffle, and another seed another
    order."""
    rows = list(range(10))
    assert ril.batch_at(rows, 3, 4, 0) == ril.batch_at(rows, 3, 4, 0)
    epoch = [x for s in range(5) for x in ril.batch_at(rows, s, 2, 0)]
    assert sorted(epoch) == rows  # one epoch sees every question once
    saved = ril.random.getstate(), torch.get_rng_state()
    try:
        runs = []
        for disturb in (1, 2):  # as a resumed process: nothing cached, the global streams elsewhere
            ril.epoch_order.cache_clear()
            ril.random.seed(disturb)
            torch.manual_seed(disturb)
            runs.append([ril.batch_at(rows, s, 4, 7) for s in range(10)])  # 4 epochs of 10
        assert runs[0] == runs[1]
    finally:
        ril.random.setstate(saved[0])
        torch.set_rng_state(saved[1])
        ril.epoch_order.cache_clear()
    epochs = [ril.batch_at(rows, s, 10, 7) for s in range(3)]
    # shuffled, anew each epoch
    assert all(sorted(e) == rows for e in epochs) and len({tuple(e) for e in epochs + [rows]}) == 4
    assert ril.batch_at(rows, 0, 10, 7) != ril.batch_at(rows, 0, 10, 8)


def test_teacher_slots_are_split_evenly_between_teachers_teacher_by_teacher():
    row = {"teachers": {"a": ["a1", "a2"], "b": ["b1"]}}
    out = ril.sample_teacher_texts(row, ["a", "b"], 4, ril.random.Random(0))
    assert sorted(out[:2]) == ["a1", "a2"] and out[2:] == ["b1", "b1"]


def test_with_more_teachers_than_slots_each_question_draws_g_of_them_one_text_each():
    """T > G: the first G teachers took every slot and the rest never taught; now G of them at random, one each."""
    row, rng = {"teachers": {t: [f"{t}1", f"{t}2"] for t in "abc"}}, ril.random.Random(0)
    draws = [ril.sample_teacher_texts(row, ["a", "b", "c"], 2, rng) for _ in range(60)]
    assert all(len({t[0] for t in d}) == 2 for d in draws)  # two teachers, a text each
    assert {t[0] for d in draws for t in d} == {"a", "b", "c"}
    assert ril.sample_teacher_texts(row, ["a", "b"], 4, ril.random.Random(0))[:2] in (["a1", "a2"], ["a2", "a1"])


def test_stage_0_draws_teacher_targets_from_every_teacher_of_its_rows_and_answers_where_rows_have_none(
    tiny, monkeypatch
):
    """On 7777159 every Stage 0 teacher target came from the first teacher (sample_teacher_texts with G = 1)."""
    seen, real = [], ril.text_ids

    def text_ids(tok, text, n):
        seen.append(text)
        return real(tok, text, n)

    monkeypatch.setattr(ril, "text_ids", text_ids)
    two = [dict(r, teachers={"x": ["from x"], "y": ["from y"]}) for r in tiny["rows"][:8]]
    none = [dict(r, teachers={}) for r in tiny["rows"][8:16]]
    a = args(sft_steps=4, sft_batch_size=16, sft_teacher_frac=1.0)
    ril.sft_warmup(a, state(ril.copy.deepcopy(tiny["model"]), tiny["proc"]), two + none)
    assert {"from x", "from y"} <= set(seen) and set(seen) <= {"from x", "from y"} | {r["answer"] for r in none}
    assert any(r["answer"] in seen for r in none)


# ---------------------------------------------------------------- the script: end to end, doctests, --help, plot tool
def _save_jsonl(folder, rows, name):
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        for r in rows:
            r["image"].save(os.path.join(folder, "img", f"{r['id']}.png"))
            f.write(
                json.dumps(
                    {
                        "id": r["id"],
                        "image": f"img/{r['id']}.png",
                        "question": r["question"],
                        "answer": r["answer"],
                        "teachers": r["teachers"],
                    }
                )
                + "\n"
            )


def test_sft_data_gives_stage_0_its_own_rows_with_teacher_texts_optional(tmp_path, monkeypatch, capsys):
    rows = [dict(r, teachers={}) for r in ril.make_toy(8, 5)]  # instruction data: no teacher texts
    _save_jsonl(tmp_path, rows, "sft.jsonl")
    got, real = [], ril.sft_warmup

    def sft_warmup(a, s, sft_rows):
        got.extend(r["id"] for r in sft_rows)
        real(a, s, sft_rows)

    monkeypatch.setattr(ril, "sft_warmup", sft_warmup)
    flags = ["--sft-data", str(tmp_path / "sft.jsonl"), "--algo", "dr_grpo", "--steps", "1"]
    ril.main([*TINY_RUN, *flags, "--out", str(tmp_path / "o")])
    assert got == [r["id"] for r in rows]  # Stage 0 on the file's rows, the RL stage on --data's
    assert re.search(r"\| start: pass@4 \(sampled\) \| \d\.\d{3} \|", capsys.readouterr().out)


def test_script_trains_student_and_discriminator_from_a_saved_checkpoint(tmp_path):
    """The real user path: a saved checkpoint through --student PATH, JSONL data, a few RIL steps;
    both models change, metrics.jsonl is written, and --out reloads with plain transformers."""
    ckpt, out = tmp_path / "tiny", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*flags):
        cmd = [sys.executable, os.path.join(HERE, "ril.py"), *flags]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    _tiny_family("qwen2_vl", ckpt)
    _save_jsonl(tmp_path, ril.make_toy(12, 0), "train.jsonl")
    _save_jsonl(tmp_path, ril.make_toy(4, 1), "val.jsonl")
    p = run(
        *argv(
            "--student {ckpt} --data {train} --eval-data {val} --sft-steps 0 --disc-pretrain-steps 2"
            " --steps 3 --batch-size 2 --out {out} --lr 1e-3 --disc-lr 1e-3",
            ckpt=ckpt,
            train=tmp_path / "train.jsonl",
            val=tmp_path / "val.jsonl",
            out=out,
        )
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "after ril" in p.stdout
    # one group a step: G samples, then G teacher texts
    groups = [json.loads(x)["texts"] for x in open(out / "samples.jsonl")]
    assert len(groups) == 3 and all([d["source"] for d in g] == ["student"] * 4 + ["teacher"] * 4 for g in groups)

    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    steps = [m for m in lines if "reward/total" in m]
    assert len(steps) == 3
    for key in (
        "reward/sim reward/ans reward/total disc/loss disc/acc_student disc/acc_teacher"
        " policy/loss policy/grad_norm policy/clip_frac policy/kl len/mean time/step"
    ).split():
        assert all(key in m for m in steps), key
    assert {"eval/acc", "eval/teacher_like"} <= set(lines[0]) and {"eval/acc", "eval/teacher_like"} <= set(lines[-1])

    start = transformers.AutoModelForImageTextToText.from_pretrained(ckpt)
    trained = transformers.AutoModelForImageTextToText.from_pretrained(out)
    s0, s1 = start.state_dict(), trained.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0), "the student did not change"
    disc = torch.load(out / "discriminator.pt", weights_only=True)
    lm = start.model.language_model.state_dict()
    assert any(not torch.equal(disc[f"backbone.{k}"], v) for k, v in lm.items()), "the discriminator did not change"

    proc = ril.load_processor(str(out))
    enc = ril.encode_prompts(proc, ril.make_toy(2, 5), CPU)
    gen = trained.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.parametrize("algo", ["dr_grpo", "grpo"])
def test_baselines_run_without_discriminator_or_teachers(tmp_path, algo, capsys):
    ril.main(
        argv(
            "--algo {algo} --toy-size 12 --eval-size 4 --sft-steps 2 --steps 2 --batch-size 2 --out {out}",
            algo=algo,
            out=tmp_path,
        )
    )
    assert not (tmp_path / "discriminator.pt").exists()
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if "reward/total" in x]
    assert len(steps) == 2 and "disc/loss" not in steps[0]
    assert f"after {algo}" in capsys.readouterr().out


def test_docstring_examples_hold():
    failed, attempted = doctest.testmod(ril)
    assert attempted > 0, "no docstring example ran"
    assert failed == 0


def test_every_flag_has_help_and_help_prints_it(capsys):
    """Every field of ril.Args (Config's included) has a help text, and `ril.py --help` prints each flag with it."""
    flags = {"--" + f.name.replace("_", "-"): f.metadata.get("help", "") for f in dataclasses.fields(ril.Args)}
    assert flags
    assert not [flag for flag, text in flags.items() if not text.strip()], "flags without help"
    with pytest.raises(SystemExit) as e:
        ril.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", out)  # one entry per option: its flag, then its help, rewrapped by argparse
    for flag, text in flags.items():
        entry = [o for o in options if o.split()[0] == flag]
        assert len(entry) == 1, f"{flag} is not in --help"
        # argparse rewraps the help text, also at hyphens ("comma-separated" may end one line): ignore whitespace
        assert re.sub(r"\s+", "", text) in re.sub(r"\s+", "", entry[0]), f"{flag}: its help is not printed"


def _tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(HERE, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plot_tool_draws_every_panel_from_a_runs_metrics(tmp_path, capsys):
    """`python tools/plot.py OUT` (make run calls it) draws metrics.png; every panel's metrics are logged, with
    held-out evaluations at step 0, every --eval-every steps and at the end."""
    from PIL import Image

    out = main_out(tmp_path, "--steps", "3", "--eval-every", "2")
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    logged = set().union(*lines)
    for title, _, series in _tool("plot").PANELS:
        assert all(key in logged for key, _ in series), title
    assert [m["step"] for m in lines if "eval/acc" in m] == [0, 2, 3]
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "tools", "plot.py"), out], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"wrote {os.path.join(out, 'metrics.png')}"
    assert Image.open(os.path.join(out, "metrics.png")).size == (1500, 900)
    _tool("compare").main([out, out])  # make run's table: the start (step 0) and a run's last evaluation
    table = capsys.readouterr().out.splitlines()
    start, end = [m for m in lines if "eval/acc" in m][0], [m for m in lines if "eval/acc" in m][-1]
    assert (
        table[-2].startswith(f"| start: {out} | {start['eval/acc']:.3f} |")
        and f"| {start['eval/pass@G']:.3f} |" in table[-2]
    )
    assert table[-1].startswith(
        f"| ril, 3 steps, lr 0.0002: {out} | {end['eval/acc']:.3f} | {end['eval/teacher_like']:.3f} |"
    )


# ---------------------------------------------------------------- bad input: one line, exit 2
GOOD = '{"image": "ok.png", "question": "q", "answer": "a", "teachers": {"t": ["x", "y"]}}'


def _bad_input(tmp_path, capsys, lines, extra=(), data_bytes=None):
    """Run main on a JSONL whose line 2 is bad; return (exit code, stderr). --out must stay untouched."""
    data = tmp_path / "d.jsonl"
    ril.Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    if data_bytes is not None:
        data.write_bytes(data_bytes)
    else:
        data.write_text("\n".join(lines) + "\n")
    (tmp_path / "held.jsonl").write_text(GOOD + "\n")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("old")
    with pytest.raises(SystemExit) as e:
        ril.main(["--data", str(data), "--eval-data", str(tmp_path / "held.jsonl"), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    return e.value.code, err, str(data)


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in its header and has no pixel data: a decompression bomb's shape."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "line,expect",
    [
        ("{not json", "invalid JSON"),
        ('{"image": "x.png", "question": "q"}', "missing field(s) answer"),
        ('{"image": "nowhere.png", "question": "q", "answer": "a"}', "image not found"),
        ('{"image": "broken.png", "question": "q", "answer": "a"}', "cannot decode image"),
        ('{"image": "huge.png", "question": "q", "answer": "a"}', "exceeds limit"),
        ('{"image": "ok.png", "question": "q", "answer": "a", "teachers": {"t": "x"}}', "list of texts"),
    ],
)
def test_bad_rows_get_one_line_naming_file_and_line(tmp_path, capsys, line, expect):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (tmp_path / "huge.png").write_bytes(_png_header(100_000, 100_000))
    code, err, data = _bad_input(tmp_path, capsys, [GOOD, line])
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{data}:2" in err and expect in err


def test_non_utf8_text_is_named_with_its_line(tmp_path, capsys):
    code, err, data = _bad_input(tmp_path, capsys, [], data_bytes=(GOOD + "\n").encode() + b'{"question": "caf\xe9"}\n')
    assert code == 2 and f"{data}:2: not UTF-8" in err


def test_the_training_file_or_its_ids_as_held_out_data_are_refused(tmp_path, capsys):
    rows = ril.make_toy(4, 0)
    _save_jsonl(tmp_path, rows, "train.jsonl")
    _save_jsonl(tmp_path, rows[:1], "same_ids.jsonl")
    for held in ("train.jsonl", "same_ids.jsonl"):
        with pytest.raises(SystemExit) as e:
            ril.main(
                argv(
                    "--data {train} --eval-data {held} --out {out}",
                    train=tmp_path / "train.jsonl",
                    held=tmp_path / held,
                    out=tmp_path / "o",
                )
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is also the id of" in err and not (tmp_path / "o").exists()


def test_stage_0_rows_may_hold_the_rl_rows_but_no_file_the_held_out_ids(tmp_path, capsys):
    """The paper's layout: the RL questions are a subset of the SFT set (40K of 4M), so --sft-data and --data may
    share ids; a held-out id in either is refused."""
    rows = ril.make_toy(8, 0)
    _save_jsonl(tmp_path, rows[:6], "sft.jsonl")
    _save_jsonl(tmp_path, rows[2:6], "rl.jsonl")
    _save_jsonl(tmp_path, rows[6:], "held.jsonl")
    files = dict(sft_data=str(tmp_path / "sft.jsonl"), data=str(tmp_path / "rl.jsonl"))
    sft, rl, held = ril.load_data(args(**files, eval_data=str(tmp_path / "held.jsonl")))
    assert [len(sft), len(rl), len(held)] == [6, 4, 2]
    sft, rl, held = ril.load_data(args(**files, eval_size=1))  # held out of --data, so out of Stage 0's rows too
    assert [len(sft), len(rl), len(held)] == [5, 3, 1] and held[0]["id"] not in {r["id"] for r in sft}
    with pytest.raises(SystemExit):
        ril.load_data(args(**files, eval_data=str(tmp_path / "sft.jsonl")))
    assert "is also the id of" in capsys.readouterr().err


def test_answers_in_any_script_are_matched_and_an_unmatchable_answer_is_refused(tmp_path, capsys):
    """Whole-word matching in scripts with spaces (Greek, Cyrillic), character spans in scripts without (Chinese,
    Japanese, Thai), full-width digits as digits; a row whose answer has no letter or digit could never earn r_ans = 1
    and is refused."""
    assert ril.answer_match("答案是七", "七") == 1.0 and ril.answer_match("答案是七", "八") == 0.0
    assert ril.answer_match("これは赤です", "赤") == 1.0 and ril.answer_match("คำตอบคือเจ็ด", "เจ็ด") == 1.0
    assert (
        ril.answer_match("Это красный круг.", "Красный") == 1.0 and ril.answer_match("Είναι κόκκινο.", "ΚΌΚΚΙΝΟ") == 1.0
    )
    assert ril.answer_match("There are ３ shapes.", "3") == 1.0 and ril.answer_match("Ελλάδα", "Ελ") == 0.0
    assert ril.MatchJudge([{"answer": "七"}, {"answer": "赤"}])(["q"] * 2, ["七", "赤"], ["七或赤", "是七"]) == [
        0.0,
        0.0,
    ]
    for answer in ("★", "?!"):
        code, err, data = _bad_input(tmp_path, capsys, [GOOD, GOOD.replace('"answer": "a"', f'"answer": "{answer}"')])
        assert code == 2 and len(err.splitlines()) == 1 and f"{data}:2: answer '{answer}' has no letter or digit" in err


def test_a_prompt_too_long_for_the_student_is_one_line(tmp_path, capsys):
    long = GOOD.replace('"question": "q"', '"question": "' + "how many " * 3000 + '"')
    code, err, data = _bad_input(tmp_path, capsys, [GOOD, long])
    assert (
        code == 2
        and len(err.splitlines()) == 1
        and f"{data}:2: the prompt (" in err
        and "exceed the 4096 positions" in err
    )


def test_a_row_the_students_processor_refuses_is_named_before_training(tmp_path, capsys):
    """A decodable image Qwen2-VL's processor refuses (over 200:1) or "<|image_pad|>" in a question (one image token
    too many): one line naming the row, before Stage 0, not a failed step that every resume repeats."""
    ril.Image.new("RGB", (6000, 20)).save(tmp_path / "wide.png")
    for bad, said in [
        (GOOD.replace("ok.png", "wide.png"), "the student's processor refuses it (absolute aspect ratio"),
        (GOOD.replace('"question": "q"', '"question": "q <|image_pad|>"'), "the student's processor refuses it ("),
    ]:
        code, err, data = _bad_input(tmp_path, capsys, [GOOD, bad])
        assert code == 2 and len(err.splitlines()) == 1 and f"{data}:2: {said}" in err, err


def test_an_out_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ril, "load_student", lambda *a, **kw: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits; an immutable folder refuses even root
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    else:
        locked.chmod(0o555)
    try:
        for out, why in [
            (tmp_path / "file", "File exists"),
            (tmp_path / "file" / "run", "Not a directory"),
            (locked, "Operation not permitted" if os.geteuid() == 0 else "Permission denied"),
            (locked / "a" / "b", "Operation not permitted" if os.geteuid() == 0 else "Permission denied"),
        ]:
            with pytest.raises(SystemExit) as e:
                ril.main(["--out", str(out)])
            err = capsys.readouterr().err.strip()
            assert (
                e.value.code == 2
                and len(err.splitlines()) == 1
                and f"--out {out}: cannot write in" in err
                and why in err
            ), err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        else:
            locked.chmod(0o755)
    assert os.listdir(locked) == []


def test_a_model_that_cannot_be_found_gets_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ril.main(
            argv(
                "--student {student} --toy-size 6 --eval-size 2 --out {out}",
                student=tmp_path / "no-such-model",
                out=tmp_path / "o",
            )
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "no-such-model" in err


def test_weights_load_from_safetensors_only(tmp_path, capsys):
    """A pickled weight file can run code when loaded; such a checkpoint is refused, by name."""
    _tiny_family("qwen2_vl", tmp_path / "m")
    sd = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "m").state_dict()
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        ril.main(
            ["--student", str(tmp_path / "m"), "--toy-size", "6", "--eval-size", "2", "--out", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "safetensors only" in err and not (tmp_path / "o").exists()


def test_a_judge_that_never_gives_a_verdict_is_named_then_the_run_stops(tmp_path, capsys):
    """A random tiny judge never writes <answer>0|1</answer>: every step warns on the console, and after --max-bad-steps
    steps the run stops with one line instead of training on r_ans = 0 for every text."""
    with pytest.raises(SystemExit) as e:
        ril.main(
            TINY_RUN
            + argv(
                "--judge {judge} --judge-max-new-tokens 2 --steps 6 --max-bad-steps 2 --out {out}",
                judge=_tiny_judge(tmp_path / "judge"),
                out=tmp_path / "o",
            )
        )
    out, err = capsys.readouterr()
    assert (
        e.value.code == 2 and "step 2: 2 bad steps in a row, the last: no judge reply had <answer>0|1</answer>" in err
    )
    assert "warning: step 1: no judge reply had <answer>0|1</answer>" in out + err
    assert [json.loads(x)["judge/unparsed"] for x in open(tmp_path / "o" / "metrics.jsonl") if "reward/total" in x] == [
        1.0,
        1.0,
    ]


def test_an_empty_dataset_is_refused(tmp_path, capsys):
    code, err, data = _bad_input(tmp_path, capsys, [], data_bytes=b"\n")
    assert code == 2 and f"{data}: no rows" in err


def test_a_teacher_missing_from_rows_is_named_with_its_count(tmp_path, capsys):
    code, err, data = _bad_input(
        tmp_path, capsys, [GOOD, GOOD.replace('"t"', '"u"'), GOOD.replace('"t"', '"u"')], extra=["--teachers", "t"]
    )
    assert code == 2 and f"{data}:2: teacher 't' has no texts for 2 row(s)" in err


def test_a_truncated_jpeg_is_refused_before_training(tmp_path, capsys):
    """verify() reads none of a JPEG's data: the check decodes each image whole, so a file cut short is named in one
    line before anything loads, not in a traceback mid-run."""
    ril.Image.effect_noise((128, 128), 64).convert("RGB").save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 3 // 4])  # its header whole, its scan cut short
    code, err, path = _bad_input(tmp_path, capsys, [GOOD, GOOD.replace("ok.png", "cut.jpg")])
    assert code == 2 and f"{path}:2: cannot decode image" in err and err.count("\n") == 0


def test_refusals_before_the_run_starts_leave_no_out_behind(tmp_path, capsys, monkeypatch):
    """--shard without torchrun, --device cuda without a GPU, a seed numpy cannot take: one line, exit 2, and no
    --out made (nor a lock left that refuses the next run)."""
    out = tmp_path / "o"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags, said in [
        ("--shard", "--shard needs several processes"),
        ("--device cuda", "--device cuda: this torch sees no GPU"),
        ("--seed -1", "--seed -1: must be >= 0"),
        ("--seed 4294967296", "--seed 4294967296: must be < 4294967296"),
    ]:
        with pytest.raises(SystemExit) as e:
            ril.main(TINY_RUN + argv(flags + " --out {out}", out=out))
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and err.count("\n") == 1, flags
        assert not out.exists(), flags
    ril.main(TINY_RUN + argv("--steps 0 --out {out}", out=out))  # the folder is free


def test_eval_data_is_the_held_out_set_of_a_built_in_task_too(tmp_path):
    _save_jsonl(tmp_path, ril.make_toy(3, 5), "held.jsonl")
    sft_rows, rows, held = ril.load_data(ril.parse_args(argv("--eval-data {held}", held=tmp_path / "held.jsonl")))
    assert [r["where"] for r in held] == [f"{tmp_path / 'held.jsonl'}:{i}" for i in (1, 2, 3)]
    assert len(rows) == 600 and sft_rows is rows


def test_fewer_held_out_questions_than_ranks_are_refused_before_training(tmp_path, capsys, monkeypatch):
    """Each rank evaluates an equal share: 1 held-out question over 2 ranks left none, and the run failed only after
    Stage 0 and D pre-training, in the first evaluation."""
    monkeypatch.setattr(ril.RANKS, "world", 2)
    monkeypatch.setattr(ril, "sft_warmup", lambda *x: pytest.fail("Stage 0 ran"))
    with pytest.raises(SystemExit) as e:
        ril.main(TINY_RUN + argv("--eval-size 1 --out {out}", out=tmp_path / "o"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fewer held-out questions than the 2 ranks" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags,name",
    [
        (["--G", "1"], "--G 1"),
        (["--eps", "0"], "--eps 0"),
        (["--steps", "-1"], "--steps -1"),
        (["--top-p", "0"], "--top-p 0"),
        (["--algo", "ppo"], "--algo ppo"),
        (["--lr", "inf"], "--lr inf"),
        (["--top-k", "-1"], "--top-k -1"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm nan"),
        (["--sft-lr", "nan"], "--sft-lr nan"),
    ],
)
def test_impossible_arguments_are_refused(capsys, flags, name):
    with pytest.raises(SystemExit) as e:
        ril.main(flags)
    assert e.value.code == 2 and name in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints, resume, non-finite and --out guards
def _student(folder) -> dict:
    return transformers.AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def _ids(out) -> list:
    return [json.loads(x)["ids"] for x in open(os.path.join(out, "samples.jsonl"))]


def test_resume_equals_the_uninterrupted_run(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    ril.main([*TINY_RUN, "--steps", "6", "--save-every", "3", "--out", str(full)])
    ril.main([*TINY_RUN, "--steps", "3", "--save-every", "3", "--out", str(half)])
    ril.main(["--out", str(half), "--resume", "--steps", "6"])
    a, b = _student(full), _student(half)
    assert all(torch.equal(a[k], b[k]) for k in a), "student parameters differ after resume"
    da, db = (torch.load(p / "discriminator.pt", weights_only=True) for p in (full, half))
    assert all(torch.equal(da[k], db[k]) for k in da), "discriminator parameters differ after resume"
    assert _ids(full) == _ids(half) and len(_ids(full)) == 6  # same questions, same order, no step twice
    steps = [json.loads(x)["step"] for x in open(half / "metrics.jsonl") if "reward/total" in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_kill_during_a_checkpoint_write_leaves_the_last_one_loadable(tmp_path, monkeypatch, two_steps):
    out = copy_of(two_steps, tmp_path)
    good = ril.checkpoints(out)[-1]
    assert good.endswith("step_0000002.pt")
    real = ril.torch.save

    def killed(obj, f, *a, **k):  # the process dies half way through writing the next checkpoint
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ril.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ril.main(["--out", out, "--resume", "--steps", "3"])
    monkeypatch.setattr(ril.torch, "save", real)
    assert ril.checkpoints(out)[-1] == good and torch.load(good, weights_only=True)["step"] == 2
    ril.main(["--out", out, "--resume", "--steps", "3"])
    assert ril.checkpoints(out)[-1].endswith("step_0000003.pt")


def _steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return sum("reward/total" in x for x in open(path)) if path.exists() else 0


def test_sigterm_mid_run_leaves_a_checkpoint_that_resume_continues(tmp_path):
    out, log = tmp_path / "o", open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "ril.py"),
            *TINY_RUN,
            *argv("--steps 400 --save-every 1000 --out {out}", out=out),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and _steps_logged(out) < 3 and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    log.seek(0)
    text = log.read()
    assert p.returncode == 128 + signal.SIGTERM, text[-2000:]
    last = ril.checkpoints(str(out))[-1]
    done = torch.load(last, weights_only=True)["step"]
    assert 3 <= done < 400 and "--resume --steps 400" in text  # the command that really continues the run
    ril.main(["--out", str(out), "--resume", "--steps", str(done + 2)])
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert steps == list(range(1, done + 3))


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved_without_a_traceback(tmp_path):
    out, log = tmp_path / "o", open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ril.py"), *TINY_RUN, "--sft-steps", "100000", "--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline and "sft:" not in open(tmp_path / "log.txt").read()
    ):  # in Stage 0, long before any checkpoint
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    text = open(tmp_path / "log.txt").read()
    assert p.returncode == 130 and "nothing was saved" in text and "Traceback" not in text
    assert not (out / "checkpoints").exists()


def test_resume_writes_into_the_folder_named_not_where_the_run_was_made(tmp_path, two_steps):
    """A copied or moved run is resumed where it is now; the folder it came from is neither needed nor touched."""
    import shutil

    first = copy_of(two_steps, tmp_path)
    moved = str(tmp_path / "moved")
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    ril.main(["--out", moved, "--resume", "--steps", "3"])
    assert not os.path.exists(first) and ril.checkpoints(moved)[-1].endswith("step_0000003.pt")
    assert [json.loads(x)["step"] for x in open(os.path.join(moved, "metrics.jsonl")) if "reward/total" in x] == [
        1,
        2,
        3,
    ]


def test_resume_to_a_step_already_done_is_refused_before_anything_changes(tmp_path, capsys, two_steps):
    out = copy_of(two_steps, tmp_path)
    before, _ = sorted(os.listdir(os.path.join(out, "checkpoints"))), capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ril.main(["--out", out, "--resume", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--steps 1" in err and "at step 2" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_a_newest_checkpoint_that_does_not_load_falls_back_to_the_one_before(tmp_path, capsys, two_steps):
    out = copy_of(two_steps, tmp_path)
    newest = ril.checkpoints(out)[-1]
    open(newest, "r+b").truncate(1000)  # a disk that filled up, or a copy cut short
    ril.main(["--out", out, "--resume", "--steps", "3"])
    assert "does not load" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl")) if "reward/total" in x] == [1, 2, 3]


def test_after_a_fallback_the_newer_checkpoint_that_did_not_load_is_not_counted_when_pruning(tmp_path, two_steps):
    """--keep-last 1 after resuming past an unloadable newer checkpoint: the checkpoint just written stays (pruning by
    name order alone kept the broken one and deleted it, and the next --resume found nothing)."""
    out = copy_of(two_steps, tmp_path)
    folder = os.path.join(out, "checkpoints")
    os.replace(os.path.join(folder, "step_0000002.pt"), os.path.join(folder, "step_0000009.pt"))
    open(os.path.join(folder, "step_0000009.pt"), "r+b").truncate(1000)  # newer than any good one, and cut short
    ril.main(argv("--out {out} --resume --steps 3 --save-every 1 --keep-last 1", out=out))
    assert "step_0000003.pt" in os.listdir(folder)
    ril.main(argv("--out {out} --resume --steps 4", out=out))  # it resumes from step 3
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl")) if "reward/total" in x]
    assert steps == [1, 2, 3, 4]


def test_resume_checks_the_runs_own_steps_when_steps_is_not_given(tmp_path, two_steps):
    """--resume alone keeps the run's --steps: a run of 300 steps at step 250 goes on (the parsed default, 200, was
    taken for it and the resume refused)."""
    out = copy_of(two_steps, tmp_path)
    state = torch.load(ril.checkpoints(out)[-1], weights_only=True)
    state["step"], state["args"]["steps"] = 250, 300
    torch.save(state, os.path.join(out, "checkpoints", "step_0000250.pt"))
    resumed, (path, _) = ril.resume_state(ril.parse_args(argv("--out {out} --resume", out=out)), {"out", "resume"})
    assert resumed.steps == 300 and path.endswith("step_0000250.pt")


def test_a_failure_after_the_last_step_is_named_and_its_continue_command_saves_the_student(
    tmp_path, capsys, monkeypatch
):
    """A full disk in the final save: the line names the final evaluation or save, and the command it gives (--resume
    at the run's last step) runs the evaluation and the save again, training nothing."""
    out = str(tmp_path / "o")

    def full_disk(*x, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ril, "save_student", full_disk)
    with pytest.raises(SystemExit) as e:
        ril.main(TINY_RUN + argv("--steps 2 --out {out}", out=out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the final evaluation or save failed" in err
    assert f"continue with: python ril.py --out {out} --resume --steps 2" in err
    monkeypatch.undo()
    ril.main(argv("--out {out} --resume --steps 2", out=out))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines if "reward/total" in m] == [1, 2]  # no step trained twice
    assert [m["step"] for m in lines if "eval/acc" in m] == [0, 2]  # the final evaluation logged once


def test_a_checkpoint_of_a_fresh_optimiser_leaves_it_fresh():
    """torch.distributed.checkpoint fills an empty AdamW's state by a step at lr 0 (its step count becomes 1, and
    Adam's bias correction then differs from a run that never saved): full_state and load_full_state must not."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state, opt_state = ril.full_state(model, opt)
    ril.load_full_state(model, opt, state, opt_state)
    assert not opt.state and not opt_state
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    copy = torch.nn.Linear(3, 2)
    other = torch.optim.AdamW(copy.parameters(), lr=1e-3)
    ril.load_full_state(copy, other, *ril.full_state(model, opt))
    assert [s["step"].item() for s in other.state.values()] == [1.0, 1.0]


def test_overwrite_deletes_nothing_until_every_input_has_loaded(tmp_path, capsys):
    out = main_out(tmp_path, "--steps", "1")
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    with pytest.raises(SystemExit) as e:
        main_out(tmp_path, "--steps", "1", "--overwrite", "--teachers", "alice,org/no-such-model")
    assert e.value.code == 2 and "org/no-such-model" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == kept


def test_out_may_not_be_the_folder_of_an_input_model(tmp_path, capsys):
    student = _tiny_family("qwen2_vl", tmp_path / "student")
    files = sorted(os.listdir(student))
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--student", student, "--out", student])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "would overwrite" in err
    assert sorted(os.listdir(student)) == files


def test_non_finite_guard_skips_then_stops(tmp_path, monkeypatch, capsys):
    real = ril.policy_loss

    def nan_loss(*args, **kw):
        loss, stats = real(*args, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(ril, "policy_loss", nan_loss)
    out = tmp_path / "skip"
    with pytest.raises(
        SystemExit
    ) as e:  # fewer steps than --max-bad-steps, every one skipped: a failure, not a success
        ril.main([*TINY_RUN, "--steps", "2", "--max-bad-steps", "5", "--save-every", "1", "--out", str(out)])
    assert (
        e.value.code == 2
        and "step 2: 2 bad steps in a row, the last: loss or gradient was NaN/inf" in capsys.readouterr().err
    )
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert [m["guard/skipped"] for m in steps] == [1.0, 1.0] and not (out / "model.safetensors").exists()
    start = torch.load(os.path.join(out, "checkpoints", "reference.pt"), weights_only=True)
    end = torch.load(os.path.join(out, "checkpoints", "step_0000001.pt"), weights_only=True)["student"]
    assert all(torch.equal(start[k], end[k]) for k in start), "a skipped step changed the student"

    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--steps", "6", "--max-bad-steps", "3", "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "step 3:" in err and "step_0000000.pt" in err


def test_a_student_whose_processor_saves_a_folder_is_saved_again_over_it(tmp_path):
    """A tokenizer with named chat templates saves the folder additional_chat_templates; os.replace cannot move a folder
    over one that is not empty, so every later save into that --out (a resume that extends a finished run, a continue
    command) failed and left the new tokenizer beside the old weights."""
    model, proc = ril.build_tiny(ril.make_toy(6, 0))
    proc.tokenizer.chat_template = {"default": ril.TINY_CHAT_TEMPLATE, "tool_use": ril.TINY_CHAT_TEMPLATE}
    for _ in range(2):
        ril.save_student(model, proc, str(tmp_path), model.state_dict())
    assert os.listdir(tmp_path / "additional_chat_templates") and not (tmp_path / ".tmp_save").exists()


def test_weights_that_are_not_finite_are_never_saved(tmp_path, capsys, monkeypatch):
    real = ril.Run.end_step

    def poison(self, s, step, m, dump):  # the last step leaves a NaN in the student, as an overflowing update would
        real(self, s, step, m, dump)
        with torch.no_grad():
            next(ril.unwrap(s.model).parameters()).fill_(float("nan"))

    monkeypatch.setattr(ril.Run, "end_step", poison)
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--steps", "1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "the trained weights are not finite" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_fresh_run_will_not_overwrite_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    ril.main([*TINY_RUN, "--steps", "1", "--out", str(out)])
    before = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--steps", "1", "--out", str(out)])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_a_second_process_is_refused_while_a_run_holds_out_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    out = str(tmp_path / "o")
    os.makedirs(out)
    held = ril.lock_out(out)  # a run in another process, as far as flock is concerned
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--steps", "1", "--out", out, "--seed", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "another process is running a job there" in err
    assert os.listdir(out) == []  # nothing loaded, nothing written
    os.close(held)  # the process dies: its lock goes with it
    ril.main([*TINY_RUN, "--steps", "1", "--out", out])
    assert ril.checkpoints(out)


def test_out_is_locked_from_the_start_so_a_second_run_is_refused_while_the_first_is_in_stage_0(tmp_path, capsys):
    """On 7777159 the lock was taken at the first write: a second run into the same --out during Stage 0 ran to the
    end, and the first then wrote over it."""
    out = str(tmp_path / "o")
    cmd = [sys.executable, os.path.join(HERE, "ril.py"), *TINY_RUN, "--sft-steps", "100000", "--out", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # its first line comes as it is printed
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().startswith("student tiny")  # set up: Stage 0 is under way, nothing written
        with pytest.raises(SystemExit) as e:
            ril.main([*TINY_RUN, "--out", out, "--seed", "3"])
        assert e.value.code == 2 and "another process is running a job there" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert os.listdir(out) == []


def test_resume_refuses_a_flag_that_would_change_the_run_and_takes_those_that_cannot(tmp_path, capsys, two_steps):
    out = copy_of(two_steps, tmp_path)
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    with pytest.raises(SystemExit) as e:
        ril.main(["--out", out, "--resume", "--steps", "3", "--lr", "0.5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--resume --lr: a resumed run keeps its own --lr 0.0002" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    own = ["--lr", "0.0002", "--seed", "0"]  # the run's own values, as in the first command (7777159: refused)
    memory = argv("--micro-batch 2 --gen-batch 3 --grad-checkpointing --device cpu")  # the same update in less memory
    ril.main(["--out", out, "--resume", "--steps", "3", "--save-every", "5", "--keep-last", "1", *own, *memory])
    # a finished run extended: its final evaluation stays at its old end (a line of its own), the new end gets one
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [0, 1, 2, 2, 3, 3] and [m["step"] for m in lines if "eval/acc" in m] == [
        0,
        2,
        3,
    ]
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "samples.jsonl"))] == [1, 2, 3]
    assert [os.path.basename(p) for p in ril.checkpoints(out)] == ["step_0000003.pt"]


def test_resume_refuses_rows_that_changed_unless_told_to_accept_them(tmp_path, capsys):
    rows, flags = _jsonl_run(tmp_path)
    out, data = str(tmp_path / "o"), tmp_path / "d.jsonl"
    ril.main([*flags, "--steps", "1", "--out", out])
    original = data.read_text()
    with open(data, "a") as f:  # three more rows, as a user might append
        for i in range(3):
            row = {"id": f"new{i}", "image": f"{rows[0]['id']}.png", "question": "q", "answer": "red"}
            print(json.dumps({**row, "teachers": rows[0]["teachers"]}), file=f)
    with pytest.raises(SystemExit) as e:
        ril.main(["--out", out, "--resume", "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "the training rows (4 then, 7 now)" in err and "--accept-changed-data" in err
    assert "held-out rows (2 then, 2 now)" in err  # the held-out split is drawn from all the rows, so it moved too
    # the same rows, their images moved to a folder: the same rows (the folder is no part of them)
    os.makedirs(tmp_path / "img")
    for r in rows:
        os.rename(tmp_path / f"{r['id']}.png", tmp_path / "img" / f"{r['id']}.png")
    data.write_text(original.replace('"image": "', '"image": "img/'))
    ril.main(["--out", out, "--resume", "--steps", "2"])
    assert ril.checkpoints(out)[-1].endswith("step_0000002.pt")
    moved = data.read_text()  # another image for a row: changed
    data.write_text(moved.replace(f"img/{rows[0]['id']}.png", f"img/{rows[1]['id']}.png", 1))
    with pytest.raises(SystemExit):
        ril.main(["--out", out, "--resume", "--steps", "3"])
    assert "differ from the checkpoint's" in capsys.readouterr().err
    data.write_text(original.replace('"image": "', '"image": "img/'))
    tokenizer = open(os.path.join(out, "tokenizer.json")).read()  # the tiny student's, made from the rows' words
    with open(data, "a") as f:  # rows with words the tokenizer never saw: the run keeps its own tokenizer
        row = json.loads(data.read_text().splitlines()[0])
        print(json.dumps({**row, "id": "new", "question": "Which planet is it?"}), file=f)
    ril.main(["--out", out, "--resume", "--steps", "3", "--accept-changed-data"])
    assert ril.checkpoints(out)[-1].endswith("step_0000003.pt")
    assert open(os.path.join(out, "tokenizer.json")).read() == tokenizer


def test_a_resume_from_another_folder_takes_the_data_files_path_from_there(tmp_path, monkeypatch):
    """A run given relative data paths, resumed from another working directory: --data and --eval-data may name the
    same files another way (they were refused: a dead end, since without them the paths do not resolve). Rows
    without ids (file:line, the path as typed) and the images' folder are no part of the rows' fingerprint."""
    rows, flags = _jsonl_run(tmp_path)
    lines = [json.dumps({k: v for k, v in json.loads(x).items() if k != "id"}) for x in open(tmp_path / "d.jsonl")]
    (tmp_path / "val.jsonl").write_text("\n".join(lines[:2]))
    (tmp_path / "d.jsonl").write_text("\n".join(lines[2:]))
    monkeypatch.chdir(tmp_path)
    flags = [x if x != str(tmp_path / "d.jsonl") else "d.jsonl" for x in flags]
    ril.main([*flags, "--eval-data", "val.jsonl", "--steps", "1", "--out", "o"])
    monkeypatch.chdir(tmp_path / "o")
    ril.main(argv("--out . --resume --steps 2 --data ../d.jsonl --eval-data ../val.jsonl"))
    assert ril.checkpoints(".")[-1].endswith("step_0000002.pt")


def test_a_resume_does_not_check_stage_0_rows_again(tmp_path):
    """Stage 0 ran before the first checkpoint: a resume neither reads nor encodes its rows again (hours at the paper's
    4M) nor refuses one that changed since (here one the processor refuses, and one whose image is gone)."""
    rows, flags = _jsonl_run(tmp_path)
    (tmp_path / "sft.jsonl").write_text((tmp_path / "d.jsonl").read_text())
    out = str(tmp_path / "o")
    ril.main([*flags, "--sft-data", str(tmp_path / "sft.jsonl"), "--steps", "1", "--out", out])
    bad = dict(json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0]), id="new", question="q <|image_pad|>")
    with open(tmp_path / "sft.jsonl", "a") as f:  # a row the processor refuses: one image token too many
        print(json.dumps(bad), file=f)
        print(json.dumps(dict(bad, id="gone", question="q", image="gone.png")), file=f)
    ril.main(["--out", out, "--resume", "--steps", "2"])
    assert ril.checkpoints(out)[-1].endswith("step_0000002.pt")


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ril.main(["--out", str(tmp_path), "--resume"])
    assert e.value.code == 2 and "no checkpoint in" in capsys.readouterr().err


# ---------------------------------------------------------------- real models: families, teacher models, judge, memory
LLAVA_TEMPLATE = ril.TINY_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
INTERNVL_TEMPLATE = ril.TINY_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_NAMED = dict(
    start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>"
)


def _tiny_family(family: str, folder) -> str:
    """Save a tiny random checkpoint of one VLM family (the in-process tokenizer, real transformers
    classes) to folder, for --student / --teachers / --judge PATH."""
    rows = ril.make_toy(24, 0)

    def tower(image_size: int) -> dict:  # a one-block vision tower, 32 wide, of 14x14 patches
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
        return dict(tower, image_size=image_size)

    def text_config(tok, **kw):  # the tiny student's language model
        return dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1e4,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **kw,
        )

    mrope = {"rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}}
    if family == "qwen2_vl":
        model, proc = ril.build_tiny(rows)
    elif family == "qwen2_5_vl":
        tok = ril.tiny_tokenizer(rows)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ril.SPECIALS}
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        )
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=text_config(tok, **mrope),
            vision_config=vision,
            tie_word_embeddings=True,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
        proc = ril.image_only(transformers.Qwen2VLProcessor)(
            transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
            tok,
            chat_template=ril.TINY_CHAT_TEMPLATE,
        )
    elif family == "llava":  # a CLIP vision tower, a Qwen2 language model, its own <image> token
        tok = ril.tiny_tokenizer(rows, (), ril.SPECIALS + ["<image>"], LLAVA_TEMPLATE)
        vision = transformers.CLIPVisionConfig(**tower(28))
        cfg = transformers.LlavaConfig(
            vision_config=vision,
            text_config=transformers.Qwen2Config(**text_config(tok)),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=True,
        )
        model = transformers.LlavaForConditionalGeneration(cfg)
        ip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        proc = transformers.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
            image_token="<image>",
        )
    elif family == "internvl":  # InternVL3: an InternViT tower, a Qwen2 LM, images cut into 1-4 tiles of 56x56
        tok = ril.tiny_tokenizer(rows, (), INTERNVL_SPECIALS, INTERNVL_TEMPLATE)
        tok._set_model_specific_special_tokens(INTERNVL_NAMED)  # what InternVLProcessor reads off the tokenizer
        cfg = transformers.InternVLConfig(
            vision_config=tower(56),
            text_config=dict(model_type="qwen2", **text_config(tok)),
            image_token_id=tok.context_image_token_id,
            image_seq_length=4,  # (56 / 14)^2 patches, pixel-shuffled by 0.5: 4 tokens a tile
            tie_word_embeddings=True,
        )
        model = transformers.InternVLForConditionalGeneration(cfg)
        ip = transformers.GotOcr2ImageProcessorPil(
            size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        proc = ril.image_only(transformers.InternVLProcessor)(
            ip, tok, image_seq_length=4, chat_template=INTERNVL_TEMPLATE
        )
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=proc.tokenizer.eos_token_id, pad_token_id=proc.tokenizer.pad_token_id
    )
    os.makedirs(folder, exist_ok=True)
    ril.save_student(model, proc, str(folder), model.state_dict())
    return str(folder)


def _tiny_judge(folder) -> str:
    """A tiny random text LLM (Qwen2 with the tiny tokenizer and chat template) saved to folder, for --judge PATH."""
    tok = ril.tiny_tokenizer(ril.make_toy(24, 0), [ril.JUDGE_SYSTEM, ril.JUDGE_USER])
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "internvl"])
def test_each_family_trains_through_student_path_and_its_output_reloads(tmp_path, family, capsys):
    ckpt, out = _tiny_family(family, tmp_path / family), tmp_path / "out"
    ril.main([*TINY_RUN, "--student", ckpt, "--steps", "2", "--out", str(out)])
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(m["policy/grad_norm"])) for m in steps)
    trained = transformers.AutoModelForImageTextToText.from_pretrained(out)
    start = transformers.AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(trained) is type(start)
    s0, s1 = start.state_dict(), trained.state_dict()
    assert any(not torch.equal(s0[k], s1[k]) for k in s0), "the student did not change"
    proc = ril.load_processor(str(out))
    enc = ril.encode_prompts(proc, ril.make_toy(2, 5), CPU)
    assert trained.generate(**enc, max_new_tokens=3, do_sample=False).shape[1] > enc["input_ids"].shape[1]


def test_internvl_prompts_keep_their_own_tiles(tmp_path):
    """InternVL's processor cuts each image into 1 to max_patches tiles, flattens them all into pixel_values and
    drops the counts: select_prompts and repeat_prompts still give each prompt its own tiles (as encoding the chosen
    prompts directly does), the log-probs of a batch, its micro-batches and each prompt alone agree, they depend on
    the image, and a run on images of other aspect ratios (so other tile counts) trains and reloads."""
    folder = _tiny_family("internvl", tmp_path / "internvl")
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = ril.load_processor(folder)
    sizes = [(112, 56), (56, 56), (56, 168)]  # (W, H): 2x1 tiles + a thumbnail, one tile, 1x3 + a thumbnail
    rows = [dict(r, image=r["image"].resize(wh)) for r, wh in zip(ril.make_toy(3, 0), sizes, strict=True)]
    enc = ril.encode_prompts(proc, rows, CPU)
    tiles = ((enc["input_ids"] == proc.image_token_id).sum(1) // proc.image_seq_length).tolist()
    assert tiles == [3, 1, 4] and len(enc["pixel_values"]) == 8
    for idx in ([2, 0, 1], [1, 2, 2, 0, 1], [0, 0, 1, 1, 2, 2]):
        picked, direct = ril.select_prompts(enc, idx), ril.encode_prompts(proc, [rows[i] for i in idx], CPU)
        assert set(picked) == set(direct) and all(torch.equal(picked[k], direct[k]) for k in direct), idx
    one = ril.encode_prompts(proc, rows[:1], CPU)
    _sees_each_prompts_own_image(model, proc, rows, dict(one, pixel_values=enc["pixel_values"][4:7]))  # 2's 3 tiles
    data = tmp_path / "data"
    _save_jsonl(
        data, [dict(r, image=r["image"].resize(sizes[i % 3])) for i, r in enumerate(ril.make_toy(8, 0))], "d.jsonl"
    )
    out = tmp_path / "out"
    ril.main(
        [
            *argv("--eval-size 2 --sft-steps 1 --disc-pretrain-steps 1 --batch-size 2 --steps 1"),
            "--data",
            str(data / "d.jsonl"),
            "--student",
            folder,
            "--out",
            str(out),
        ]
    )
    assert sum("reward/total" in x for x in open(out / "metrics.jsonl")) == 1
    assert isinstance(ril.load_processor(str(out)), transformers.InternVLProcessor)
    _, capped = ril.load_model(folder, args(max_pixels=3 * 56 * 56), "auto", "--student")  # 3 tiles' pixels
    tiles = (ril.encode_prompts(capped, rows[2:], CPU)["input_ids"] == proc.image_token_id).sum() // 4
    assert (
        capped.image_processor.max_patches == 2 and tiles == 3 and proc.image_processor.max_patches == 4
    )  # + thumbnail


def test_a_family_that_cannot_work_is_named_in_one_line(tmp_path, capsys):
    """A text-only model is not an image-text-to-text model; a VLM without a chat template cannot
    format prompts. Each is one line naming the model, no traceback."""
    text_only = tmp_path / "text_only"
    tok = ril.tiny_tokenizer([], ["a b c"])
    transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(text_only)
    tok.save_pretrained(text_only)
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--student", str(text_only), "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "text_only" in err and "Qwen2Config" in err

    no_template = _tiny_family("llava", tmp_path / "llava")
    os.remove(os.path.join(no_template, "chat_template.jinja"))
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--student", no_template, "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2 and len(err.splitlines()) == 1 and "LlavaForConditionalGeneration has no chat template" in err
    )


def test_a_teacher_model_generates_once_then_its_cache_is_read(tmp_path, capsys):
    """A teacher given as a model folder (another family, another tokenizer) generates --teacher-samples
    answers per question into --out/teacher_cache. A second run reads the cache and never loads the
    model (its folder is gone); a run after a kill mid-write keeps the complete lines and generates the rest."""
    teacher, out = _tiny_family("llava", tmp_path / "teacher"), tmp_path / "out"

    def run():
        ril.main(
            TINY_RUN
            + argv(
                "--teachers alice,{teacher} --teacher-samples 2 --steps 2 --out {out} --overwrite",
                teacher=teacher,
                out=out,
            )
        )

    run()
    [cache] = [out / "teacher_cache" / f for f in os.listdir(out / "teacher_cache")]
    lines = open(cache).readlines()
    entries = [json.loads(x) for x in lines]
    assert len(entries) == 24 + 4 and all(len(e["texts"]) == 2 for e in entries)  # train + held-out questions
    assert len({tuple(e["asked"]) for e in entries}) == len(entries)
    assert "0 question(s) read" in capsys.readouterr().out
    # a cached text, as the student's tokens cut it
    tok, cap = (ril.load_processor(str(out)).tokenizer, ril.Args().max_new_tokens)
    texts = {tok.decode(ril.text_ids(tok, t, cap), skip_special_tokens=True) for e in entries for t in e["texts"]}
    dumped = [d for x in open(out / "samples.jsonl") for d in json.loads(x)["texts"] if d["source"] == "teacher"]
    assert any(d["text"] in texts for d in dumped), "no cached teacher text reached a group"

    with open(cache, "w") as f:  # a kill after 5 questions, mid-line
        f.writelines(lines[:5] + [lines[5][:20]])
    run()
    again = open(cache).readlines()
    assert again[:5] == lines[:5] and len(again) == 28 and all(json.loads(x) for x in again)
    printed = capsys.readouterr().out
    assert "5 question(s) read" in printed and "23 generated" in printed

    import shutil

    shutil.rmtree(teacher)  # a run that needed the model now would fail to load it
    run()
    assert "28 question(s) read" in capsys.readouterr().out and open(cache).readlines() == again


def test_a_teacher_cache_cut_in_its_first_line_or_asked_other_questions_is_generated_anew(tmp_path, capsys):
    """A kill in the cache's first line leaves a fragment that later lines must not be glued to (every later run
    failed on it); rows asking other questions under the same ids (another dataset's q1, q2 in the same --out) get
    the teacher's answers to those questions, not the cached ones. Edited data (a row dropped, one asked otherwise,
    the rest in another order, as another seed's split gives) asks the teacher the edited row alone: the file was
    named by every question, so any edit asked them all again (GPU hours with a 72B teacher)."""
    teacher, rows = _tiny_family("qwen2_vl", tmp_path / "teacher"), ril.make_toy(4, 0)
    a = args(out=str(tmp_path / "out"), teacher_samples=1)
    path = ril.teacher_cache(teacher, a)
    assert path != ril.teacher_cache(teacher, args(out=a.out, teacher_samples=1, max_pixels=784))  # other images
    os.makedirs(os.path.dirname(path))
    open(path, "w").write('{"asked": ["What color is the shape?", "te')  # killed in its first line
    ril.model_teacher_texts(teacher, rows, a, CPU, torch.float32)
    assert [json.loads(x)["asked"][1] for x in open(path)] == [r["id"] for r in rows]
    assert "0 question(s) read" in capsys.readouterr().out
    asked = [dict(r, question="Which shape do you see?", teachers={}) for r in rows]  # the same ids
    ril.model_teacher_texts(teacher, asked, a, CPU, torch.float32)
    assert "0 question(s) read" in capsys.readouterr().out
    edited = [dict(r, teachers={}) for r in rows[3:0:-1]]  # rows[0] dropped, the rest reversed
    edited[0]["question"] = "Which shape is it?"
    ril.model_teacher_texts(teacher, edited, a, CPU, torch.float32)
    assert "2 question(s) read" in capsys.readouterr().out and len(open(path).readlines()) == 4 + 4 + 1
    _jsonl_run(
        tmp_path, n=3
    )  # rows of a file without ids: the first line dropped moves every later row's id (file:line)
    lines = [dict(json.loads(x), id=None) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({k: v for k, v in x.items() if v}) + "\n" for x in lines))
    ril.model_teacher_texts(teacher, ril.load_jsonl(str(tmp_path / "d.jsonl")), a, CPU, torch.float32)
    assert "0 question(s) read" in capsys.readouterr().out
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({k: v for k, v in x.items() if v}) + "\n" for x in lines[1:]))
    ril.model_teacher_texts(teacher, ril.load_jsonl(str(tmp_path / "d.jsonl")), a, CPU, torch.float32)
    assert "2 question(s) read" in capsys.readouterr().out


def test_a_model_id_that_cannot_be_found_is_named_for_teachers_and_judge(tmp_path, capsys):
    for flag in ("--teachers", "--judge"):
        with pytest.raises(SystemExit) as e:
            ril.main([*TINY_RUN, flag, "org/no-such-model", "--out", str(tmp_path / flag.strip("-"))])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"{flag} org/no-such-model: cannot load" in err


def test_judge_model_reads_the_fig4_prompt_and_parses_its_verdict(tmp_path):
    judge = ril.ModelJudge(_tiny_judge(tmp_path / "judge"), ril.Args(judge_max_new_tokens=4), CPU, torch.float32)
    real, seen = judge.complete, []
    judge.complete = lambda prompts: seen.extend(prompts) or real(prompts)
    # random words: unparsed
    assert judge(["What color is the shape?"] * 2, ["red"] * 2, ["It is red.", "Blue."]) == [0.0, 0.0]
    assert judge.unparsed == 1.0 and len(seen) == 2
    for part in [
        "<question>What color is the shape?</question>",
        "<ground truth>red</ground truth>",
        "<generated text>It is red.</generated text>",
        ril.JUDGE_SYSTEM,
        "<|im_start|>assistant",
    ]:
        assert part in seen[0]
    said = {
        "r1": "Correct. <answer>1</answer>",
        "r0": "Wrong. <answer> 0 </answer>",
        "none": "I cannot tell.",
        "last": "<answer>0</answer> no, on reflection <answer>1</answer>",
    }
    judge.complete = lambda prompts: [
        said[p.rsplit("<generated text>", 1)[1].split("</generated text>")[0]] for p in prompts
    ]
    assert judge(["q"] * 4, ["a"] * 4, ["r1", "r0", "none", "last"]) == [1.0, 0.0, 0.0, 1.0]
    assert judge.unparsed == 0.25


def test_judge_verdicts_reach_reward_ans(tmp_path, monkeypatch):
    """--judge PATH: every text of every group is judged with the Fig. 4 prompt, and the parsed verdicts
    are r_ans. The tiny judge really runs; its random words are then replaced by a verdict that depends
    on the response: <answer>1</answer> for an odd-length response, an unparseable reply otherwise."""
    seen, real = [], ril.ModelJudge.complete

    def response(prompt):  # the judged text, from the Fig. 4 prompt
        return prompt.rsplit("<generated text>", 1)[1].split("</generated text>")[0]

    def complete(self, prompts):
        real(self, prompts)
        seen.extend(prompts)
        return ["fine <answer>1</answer>" if len(response(p)) % 2 else "no idea" for p in prompts]

    monkeypatch.setattr(ril.ModelJudge, "complete", complete)
    out = tmp_path / "out"
    ril.main(
        TINY_RUN
        + argv(
            "--judge {judge} --judge-max-new-tokens 2 --steps 3 --out {out}",
            judge=_tiny_judge(tmp_path / "judge"),
            out=out,
        )
    )
    assert seen and all("<question>" in p and "<ground truth>" in p and ril.JUDGE_SYSTEM in p for p in seen)
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert len(steps) == 3 and all("judge/unparsed" in m for m in steps)
    groups = [json.loads(x)["texts"] for x in open(out / "samples.jsonl")]
    verdicts = [(d["r_ans"], float(len(d["text"]) % 2)) for g in groups for d in g]
    assert len(verdicts) == 3 * 2 * 4 and all(r == v for r, v in verdicts)
    assert {v for _, v in verdicts} == {0.0, 1.0}  # both kinds of verdict occurred


def test_micro_batched_logprobs_and_gradients_equal_the_full_batch(tiny):
    """--micro-batch: the policy, reference and discriminator passes in pieces of 5 sequences (uneven:
    24 = 5+5+5+5+4) give the log-probs, losses and gradients of one pass over the whole batch."""
    import copy
    import random

    model, proc, tok = tiny["model"], tiny["proc"], tiny["proc"].tokenizer
    a = args(max_grad_norm=1e9)
    ro = ril.rollout(a, state(model, proc), tiny["rows"][:3], random.Random(0), True)
    enc, comp, mask = ril.repeat_prompts(ro["enc"], 2 * a.G), ro["comp"], ro["mask"]
    with torch.no_grad():
        full = ril.token_logprobs(model, enc, comp, mask, 1.0)
        parts = torch.cat(
            [
                ril.token_logprobs(model, ril.select_prompts(enc, list(range(i, j))), comp[i:j], mask[i:j], 1.0)
                for i, j in ril.chunks(len(comp), 5)
            ]
        )
    assert torch.allclose(full, parts, atol=1e-5)

    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a reference that differs, so the KL term has a gradient
    adv = torch.linspace(-1, 1, len(comp))
    out = {}

    def delta(m, before):  # the change of each parameter: SGD with lr 1, so minus the gradient
        return {n: p.detach() - before[n] for n, p in m.named_parameters()}

    for mb in (0, 5):
        torch.manual_seed(1)  # the same new head for both discriminators
        m, disc = copy.deepcopy(model), ril.Discriminator(model)
        m0, d0 = (
            {n: p.detach().clone() for n, p in m.named_parameters()},
            {n: p.detach().clone() for n, p in disc.named_parameters()},
        )
        s_mb = state(m, proc, ref=ref, opt=torch.optim.SGD(m.parameters(), lr=1.0))
        stats = ril.policy_update(args(micro_batch=mb, max_grad_norm=1e9), s_mb, enc, comp, mask, adv)
        d_stats = ril.disc_update(
            disc,
            torch.optim.SGD(disc.parameters(), lr=1.0),
            tok,
            ro["texts"],
            ro["is_teacher"],
            args(micro_batch=mb, max_grad_norm=1e9),
            CPU,
        )
        out[mb] = (stats, delta(m, m0), d_stats, delta(disc, d0))
    (s0, g0, ds0, dg0), (s1, g1, ds1, dg1) = out[0], out[5]
    for k in ("policy/loss", "policy/kl", "policy/clip_frac"):
        assert abs(s0[k] - s1[k]) < 1e-6, k
    assert s0["policy/kl"] > 0 and any(g.abs().sum() > 0 for g in g0.values())
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4) for n in g0)
    assert all(abs(ds0[k] - ds1[k]) < 1e-6 for k in ds0)  # the BCE and both accuracies
    assert all(torch.allclose(dg0[n], dg1[n], atol=1e-6, rtol=1e-4) for n in dg0)


def test_stage_0_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(tiny, monkeypatch):
    """--micro-batch in Stage 0 too: 8 targets (answers and teacher texts) in forwards of at most 3 sequences give the
    loss and gradient of one forward over all 8."""
    seen, sizes, real = {}, [], ril.token_logprobs

    def token_logprobs(model, enc, comp, *rest):
        sizes.append(len(comp))
        return real(model, enc, comp, *rest)

    def clip_and_step(opt, params, loss, max_norm):  # the gradient, not a step
        seen[mb] = (loss.item(), [p.grad.clone() for p in params if p.grad is not None])
        opt.zero_grad(set_to_none=True)
        return torch.tensor(0.0), 0.0

    monkeypatch.setattr(ril, "token_logprobs", token_logprobs)
    monkeypatch.setattr(ril, "clip_and_step", clip_and_step)
    for mb in (0, 3):
        sizes.clear()
        a = args(sft_steps=1, sft_batch_size=8, sft_teacher_frac=0.5, micro_batch=mb)
        ril.sft_warmup(a, state(ril.copy.deepcopy(tiny["model"]), tiny["proc"]), tiny["rows"])
        assert sizes == ([8] if mb == 0 else [3, 3, 2]), sizes
    (loss, grads), (mb_loss, mb_grads) = seen[0], seen[3]
    assert abs(loss - mb_loss) < 1e-6 and len(grads) == len(mb_grads) > 0
    assert all(torch.allclose(g, h, atol=1e-6, rtol=1e-4) for g, h in zip(grads, mb_grads, strict=True))


def test_memory_flags_train_the_language_model_only(tmp_path, monkeypatch):
    """--freeze-vision leaves every vision weight as loaded and trains the rest; --grad-checkpointing
    recomputes through torch's non-reentrant checkpoint; with --micro-batch and --dtype amp (bf16 autocast
    on the CPU here) the run completes and stays finite."""
    import transformers.modeling_utils as mu

    calls, real = [], mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda *x, **kw: calls.append(kw.get("use_reentrant")) or real(*x, **kw))
    start, out = _tiny_family("qwen2_vl", tmp_path / "start"), tmp_path / "out"
    ril.main(
        TINY_RUN
        + argv(
            "--student {start} --steps 2 --freeze-vision --grad-checkpointing --micro-batch 3 --dtype amp --out {out}",
            start=start,
            out=out,
        )
    )
    assert calls and set(calls) == {False}
    s0, s1 = _student(start), _student(out)
    vision = [k for k in s0 if ".visual." in k]
    assert vision and all(torch.equal(s0[k], s1[k]) for k in vision)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if k not in vision)
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert len(steps) == 2 and all(m["guard/skipped"] == 0 for m in steps)


# ---------------------------------------------------------------- several processes: torchrun on CPU, simulated ranks
def _torchrun(*cmd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=HERE,
    )


def _ranks_agree(folder: str, ril_args: list):
    """Under torchrun (`test_ril.py --ranks-agree FOLDER RIL_ARGS...`): ril.main on RIL_ARGS; at the end of the run each
    rank saves its own student (unsharded runs) as FOLDER/rank{r}.pt, for the test to compare."""
    real = ril.report

    def report(a, s, *rest):
        if not ril.RANKS.sharded:
            torch.save(ril.unwrap(s.model).state_dict(), os.path.join(folder, f"rank{ril.RANKS.rank}.pt"))
        real(a, s, *rest)

    ril.report = report
    ril.main(ril_args)


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_train_agree_and_save_an_ordinary_checkpoint(tmp_path, shard):
    out = tmp_path / "out"
    p = _torchrun(
        *argv("test_ril.py --ranks-agree {tmp}", tmp=tmp_path),
        *TINY_RUN,
        *argv("--sft-batch-size 4 --steps 3 --out {out}", out=out),
        *(["--shard"] if shard else []),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"2 ranks, {'FSDP2' if shard else 'DDP'}" in p.stdout
    if not shard:  # DDP keeps a full copy per rank, and gradient averaging must keep the copies identical
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
        assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0), "ranks disagree after training"
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if "reward/total" in x]
    assert [m["step"] for m in steps] == [1, 2, 3]  # rank 0 alone writes
    trained = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(trained).__name__ == "Qwen2VLForConditionalGeneration"
    ref = torch.load(out / "checkpoints" / "reference.pt", weights_only=True)
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in ref.items()), "the student did not change"
    disc = ril.Discriminator(trained)  # discriminator.pt loads into D as it is
    disc.load_state_dict(torch.load(out / "discriminator.pt", weights_only=True))


def test_under_torchrun_an_error_is_printed_once_and_every_rank_exits(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    p = _torchrun("ril.py", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), timeout=120)
    assert (
        p.returncode != 0
        and p.stderr.count("error: ") == 1
        and f"{tmp_path / 'd.jsonl'}:1: image not found" in p.stderr
    )
    # each rank exits with 2 (or is stopped by torchrun once the other has): never 1, an exception, or a traceback of
    # ours
    assert "exitcode  : 2" in p.stderr and "exitcode  : 1 " not in p.stderr and 'ril.py", line' not in p.stderr


def test_torchrun_resume_equals_the_uninterrupted_run(tmp_path):
    """Under DDP, 3 steps + --resume --steps 5 end where 5 steps in one go end: every rank's random
    streams are in the checkpoint."""
    full, half = tmp_path / "full", tmp_path / "half"
    flags = [*TINY_RUN, "--sft-batch-size", "4", "--save-every", "3"]
    for p in (
        _torchrun("ril.py", *flags, "--steps", "5", "--out", str(full)),
        _torchrun("ril.py", *flags, "--steps", "3", "--out", str(half)),
        _torchrun("ril.py", "--out", str(half), "--resume", "--steps", "5"),
    ):
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = _student(full), _student(half)
    assert all(torch.equal(a[k], b[k]) for k in a), "student parameters differ after resume"
    steps = [json.loads(x)["step"] for x in open(half / "metrics.jsonl") if "reward/total" in x]
    assert steps == [1, 2, 3, 4, 5]


def _reduction_update(rows_of_rank: list, shard: bool = False) -> dict:
    """One policy update on fixed groups: each question's 4 teacher texts, its answer and the answer
    with a full stop, with fixed advantages. Returns the student's parameters afterwards (in full)."""
    a = ril.Args(shard=shard, beta=0.01, lr=1e-3, max_grad_norm=1e9)
    torch.manual_seed(0)
    rows = ril.make_toy(4, 0)
    model, proc = ril.build_tiny(rows)
    ref = ril.copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mine = [rows[i] for i in rows_of_rank]
    if not mine:  # the parameters before the update
        return model.state_dict()
    texts = [t for r in mine for t in r["teachers"]["alice"] + r["teachers"]["bob"] + [r["answer"], r["answer"] + "."]]
    comp, mask = ril.pad_right(
        [ril.text_ids(proc.tokenizer, t, a.max_new_tokens) for t in texts], proc.tokenizer.pad_token_id, CPU
    )
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25] * len(mine))
    enc = ril.repeat_prompts(ril.encode_prompts(proc, mine, CPU), 6)
    model = ril.parallelize(model, CPU)
    # SGD with lr 1: the change is minus the (reduced) gradient. AdamW's first step is about lr x sign(g),
    # which turns float noise in a near-zero gradient into a full-size difference.
    ril.policy_update(
        a, ril.State(model, proc, CPU, ref=ref, opt=torch.optim.SGD(model.parameters(), lr=1.0)), enc, comp, mask, adv
    )
    return ril.full_state(model)[0]


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_with_two_questions_each_update_like_one_process_with_four(tmp_path, shard):
    """The reduction is right: ranks 0 and 1 take questions {0, 2} and {1, 3} of the same fixed groups;
    their one update gives the parameters of one process that takes all four."""
    p = _torchrun("test_ril.py", "--reduction-check", str(tmp_path), *(["--shard"] if shard else []))
    assert p.returncode == 0, p.stderr[-3000:]
    two_ranks = torch.load(tmp_path / "reduction.pt", weights_only=True)
    one = _reduction_update([0, 1, 2, 3])
    start = _reduction_update([])
    assert any(not torch.equal(one[k], start[k]) for k in one), "the update changed nothing"
    worst = max((two_ranks[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-6, worst


def test_gradients_are_reduced_once_per_step_not_once_per_micro_batch(tiny, tmp_path):
    """Under DDP each micro-batch's backward but the last runs in no_sync: one all-reduce per bucket a step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        calls = []

        def count(_, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model = torch.nn.parallel.DistributedDataParallel(ril.copy.deepcopy(tiny["model"]))
        model.register_comm_hook(None, count)
        a = args(micro_batch=2)
        ro = ril.rollout(a, state(tiny["model"], tiny["proc"]), tiny["rows"][:2], ril.random.Random(0), True)
        enc = ril.repeat_prompts(ro["enc"], 2 * a.G)
        s = state(model, tiny["proc"], opt=torch.optim.SGD(model.parameters(), lr=0.0))
        ril.policy_update(a, s, enc, ro["comp"], ro["mask"], torch.linspace(-1, 1, len(ro["comp"])))
        per_step = len(calls)
        calls.clear()
        ril.policy_update(args(), s, enc, ro["comp"], ro["mask"], torch.linspace(-1, 1, len(ro["comp"])))
        assert per_step == len(calls) >= 1  # 8 micro-batches reduce as often as one batch

        disc = torch.nn.parallel.DistributedDataParallel(ril.Discriminator(tiny["model"]))
        disc.register_comm_hook(None, count)
        calls.clear()
        ril.disc_update(
            disc,
            torch.optim.SGD(disc.parameters(), lr=0.0),
            tiny["proc"].tokenizer,
            ro["texts"],
            ro["is_teacher"],
            a,
            CPU,
        )
        assert 1 <= len(calls) <= 2  # buckets of one backward, not one per micro-batch (8)
    finally:
        dist.destroy_process_group()


def test_fsdp2_reduce_scatters_each_micro_batch_so_no_rank_holds_whole_gradients(tiny, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)))
        with ril.grad_sync(model, last=False):  # a micro-batch before the last
            model(torch.randn(3, 4)).sum().backward()
        assert all(type(p.grad).__name__ == "DTensor" for p in model.parameters())  # reduce-scattered: sharded
    finally:
        dist.destroy_process_group()


def test_under_fsdp2_the_log_probs_are_not_a_view_so_fsdp2_does_not_warn(tiny, tmp_path, monkeypatch):
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        monkeypatch.setattr(ril, "RANKS", type("Sharded", (ril.Ranks,), {"world": 2, "sharded": True})())
        model = ril.parallelize(ril.copy.deepcopy(tiny["model"]), CPU, "amp")
        enc, comp = ril.encode_prompts(tiny["proc"], tiny["rows"][:2], CPU), torch.randint(5, 50, (2, 4))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ril.token_logprobs(model, enc, comp, torch.ones_like(comp), 1.0).sum().backward()
        assert not [w for w in seen if "view" in str(w.message)], [str(w.message)[:100] for w in seen]
    finally:
        dist.destroy_process_group()


def test_a_steps_metrics_are_averaged_over_ranks_in_one_gather(monkeypatch):
    """RANKS.mean runs every step: one all_gather_object for the whole dict, not one a metric (there are ~20)."""
    calls = []

    def fake_all_gather(parts, xs):  # rank 1 reports each metric 2 higher
        calls.append(xs)
        parts[:] = [xs, [{k: v + 2 for k, v in xs[0].items()}]]

    monkeypatch.setattr(ril.dist, "all_gather_object", fake_all_gather)
    ranks = object.__new__(ril.TorchrunRanks)
    ranks.rank, ranks.world, ranks.sharded = 0, 2, False
    assert ranks.mean({"a": 1.0, "b": 3.0, "c": 0.0}) == {"a": 2.0, "b": 4.0, "c": 1.0}
    assert len(calls) == 1


def test_a_rank_that_got_no_signal_stops_with_the_others_cleanly(tmp_path, monkeypatch):
    """Under torchrun a signal may reach one rank only: every rank stops at the same step (the flag is averaged), and
    one that saw no signal exits as if it got SIGTERM, not with an IndexError reported as a failed step."""
    run = ril.Run(args(out=str(tmp_path), steps=5, save_every=0), "fp32", [])
    monkeypatch.setattr(ril, "RANKS", type("Rank1", (ril.Ranks,), {"rank": 1, "world": 2})())
    monkeypatch.setattr(ril.RANKS, "mean", lambda m: {k: 0.5 for k in m})  # the other rank was signalled
    monkeypatch.setattr(run, "save", lambda s, step: None)
    with pytest.raises(SystemExit) as e:
        run.end_step(None, 1, {"guard/skipped": 0.0}, {})
    assert e.value.code == 128 + signal.SIGTERM


def test_a_resume_with_another_number_of_processes_is_refused_in_one_line(two_steps, tmp_path, capsys, monkeypatch):
    out = copy_of(two_steps, tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        ril.resume_state(args(out=out, steps=5), {"out", "steps", "resume"})
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "saved by 1 process(es); resume it with as many" in err


def test_ranks_wait_an_hour_in_a_collective_while_rank_0_writes_a_checkpoint(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ril.dist, "init_process_group", lambda *x, **kw: seen.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ril.init_distributed(args(), CPU)
    assert seen["timeout"] >= ril.datetime.timedelta(hours=1)


def test_under_torchrun_other_ranks_wait_for_rank_0s_teacher_cache_and_never_generate(tmp_path, monkeypatch):
    rows = ril.make_toy(3, 0)
    a = args(out=str(tmp_path), teacher_samples=1)
    monkeypatch.setattr(ril, "RANKS", type("Rank1", (ril.Ranks,), {"rank": 1, "world": 2})())
    monkeypatch.setattr(ril, "load_model", lambda *x, **kw: pytest.fail("rank 1 loaded the teacher"))
    calls = []

    def rank0_writes(_):  # rank 0 appends its lines while rank 1 waits
        calls.append(1)
        with open(ril.teacher_cache("m/t", a), "a") as f:
            for r in rows[1:]:
                print(json.dumps({"asked": [r["question"], r["id"]], "texts": [f"t{r['id']}"], "cut": [0]}), file=f)

    monkeypatch.setattr(ril.time, "sleep", rank0_writes)
    os.makedirs(tmp_path / "teacher_cache")
    with open(ril.teacher_cache("m/t", a), "w") as f:
        print(json.dumps({"asked": [rows[0]["question"], rows[0]["id"]], "texts": ["first"], "cut": [0]}), file=f)
    ril.model_teacher_texts("m/t", rows, a, CPU, torch.float32)
    assert calls and [r["teachers"]["m/t"] for r in rows] == [["first"]] + [[f"t{r['id']}"] for r in rows[1:]]


def test_a_rank_waiting_for_teacher_texts_that_never_come_stops_with_a_message(tmp_path, capsys, monkeypatch):
    rows, clock = ril.make_toy(3, 0), [0.0]
    monkeypatch.setattr(ril, "RANKS", type("Rank1", (ril.Ranks,), {"rank": 1, "world": 2})())
    monkeypatch.setattr(ril.time, "time", lambda: clock[0])
    monkeypatch.setattr(ril.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 60))
    with pytest.raises(SystemExit) as e:
        ril.model_teacher_texts("m/t", rows, args(out=str(tmp_path)), CPU, torch.float32)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no new line from rank 0 in 30 minutes" in err
    assert 1800 <= clock[0] <= 1900


# ---------------------------------------------------------------- the GPU path, checked on the CPU
# (bf16 autocast and casts behave alike there)
def _sft_loss(capsys, tmp_path, dtype: str) -> float:
    ril.main(
        argv(
            "--algo dr_grpo --toy-size 48 --eval-size 4 --sft-steps 30 --sft-batch-size 8"
            " --steps 0 --dtype {dtype} --out {out}",
            dtype=dtype,
            out=tmp_path / dtype,
        )
    )
    return float(re.search(r"final loss ([\d.]+)", capsys.readouterr().out).group(1))


def test_amp_trains_like_fp32(capsys, tmp_path):
    """--dtype amp: every step's gradient is taken at the current weights. An autocast around the run with its weight
    cache kept bf16 copies of the first weights (amp 5.552 here on ca8f28a, 2.552 now, against fp32's 2.210); ril.py's
    autocast has the cache off."""
    fp32, amp = _sft_loss(capsys, tmp_path, "fp32"), _sft_loss(capsys, tmp_path, "amp")
    assert fp32 < 3.0, fp32  # SFT learns
    assert abs(amp - fp32) < 0.1 * fp32 + 0.05, (fp32, amp)


def test_parameters_change_dtype_and_buffers_keep_theirs(tiny):
    """bf16 parameters leave RoPE's fp32 inv_freq as it is (from_pretrained(dtype=bf16) keeps it in fp32 too):
    the student under --dtype bf16 and the reference under amp."""
    model, proc = ril.load_student(args(), tiny["rows"], CPU, torch.bfloat16)
    buffers = {n: b for n, b in model.named_buffers() if "inv_freq" in n}
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = ril.copy.deepcopy(tiny["model"])
    run = ril.Run(args(), "amp", tiny["held"])
    run.wrap(state(ril.copy.deepcopy(tiny["model"]), tiny["proc"], ref=ref))
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    assert all(b.dtype == torch.float32 for n, b in ref.named_buffers() if "inv_freq" in n)


def test_training_logprobs_keep_no_key_value_cache(tiny, monkeypatch):
    model, seen = tiny["model"], []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *x, **kw: seen.append(kw.get("use_cache")) or real(*x, **kw))
    enc = ril.encode_prompts(tiny["proc"], tiny["rows"][:2], CPU)
    tok = tiny["proc"].tokenizer
    comp, mask = ril.pad_right([ril.text_ids(tok, t, 8) for t in ("red", "two shapes")], tok.pad_token_id, CPU)
    with torch.no_grad():
        ril.token_logprobs(model, enc, comp, mask, 1.0)
    assert seen == [False]


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch, two_steps):
    """Checkpoints load to the CPU (map_location), whatever device wrote them: here every tensor is tagged cuda:0,
    as on a GPU machine, and this machine has no CUDA."""
    out = copy_of(two_steps, tmp_path)
    files = ril.checkpoints(out) + [os.path.join(out, "checkpoints", "reference.pt")]
    with monkeypatch.context() as m:
        m.setattr(
            torch.serialization,
            "_package_registry",
            [(-1, lambda obj: "cuda:0", lambda obj, loc: None)] + list(torch.serialization._package_registry),
        )
        for f in files:
            obj = torch.load(f, weights_only=True)
            torch.save(obj, f)
    with pytest.raises(RuntimeError):  # the files now name a GPU
        torch.load(files[0], weights_only=True)
    ril.main(["--out", out, "--resume", "--steps", "3"])
    assert ril.checkpoints(out)[-1].endswith("step_0000003.pt")


# ---------------------------------------------------------------- a real model that fits: the plan, and costs at 2B-7B
def _qwen2_vl_2b():
    """Qwen2-VL-2B-Instruct's published config (2.21B parameters), for the plan on the meta device."""
    text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
    text.update(num_key_value_heads=2, vocab_size=151936, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4, patch_size=14)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def test_the_plan_counts_every_model_of_the_run_per_gpu():
    cfg, judge = _qwen2_vl_2b(), transformers.Qwen2Config(num_hidden_layers=2, hidden_size=256, num_attention_heads=4)
    P, V, D = ril.model_sizes(cfg)
    assert 2.2e9 < P < 2.22e9 and 0.6e9 < V < 0.7e9 and D == P - V  # the head is the embedding (tied)
    a = args(dtype="amp", micro_batch=8, grad_checkpointing=True)
    need = ril.plan(a, {"student": cfg})["training"]
    assert need["student"] == 16 * P and need["reference"] == 2 * P and need["discriminator"] == 16 * D
    assert ril.plan(args(dtype="amp", beta=0.0, algo="dr_grpo"), {"student": cfg})["training"]["reference"] == 0
    sharded = ril.plan(args(dtype="amp", shard=True), {"student": cfg}, world=8)["training"]
    assert sharded["student"] == 16 * P // 8 and sharded["discriminator"] == 16 * D // 8
    frozen = ril.plan(args(dtype="amp", freeze_vision=True), {"student": cfg})["training"]
    assert frozen["activations"] < ril.plan(args(dtype="amp"), {"student": cfg})["training"]["activations"]
    more = ril.plan(args(dtype="amp", max_pixels=4 * 448 * 448), {"student": cfg})["training"]
    assert more["activations"] > ril.plan(args(dtype="amp"), {"student": cfg})["training"]["activations"]
    both = ril.plan(a, {"student": cfg, "judge": judge, "t/72b": cfg})  # a teacher alone, before the student
    assert set(both) == {"teacher t/72b", "training"} and both["training"]["judge"] > 0
    assert both["teacher t/72b"]["weights"] == 2 * P and both["teacher t/72b"]["KV cache"] > 0


def test_the_plan_counts_the_rollouts_samples_for_the_baselines_too():
    """Dr.GRPO and GRPO sample B x G answers as RIL does: their rollout's KV cache is the same size (it was halved)."""
    cfg = _qwen2_vl_2b()
    need = {
        algo: ril.plan(args(algo=algo, micro_batch=1, max_new_tokens=4000), {"student": cfg})
        for algo in ("ril", "dr_grpo")
    }
    rollout = ril.frozen_model(cfg, 4, args().batch_size * args().G * (448 * 448 // 784 + 64 + 4000))["KV cache"]
    assert need["ril"]["training"]["activations"] == need["dr_grpo"]["training"]["activations"] == rollout


def test_the_readmes_real_model_commands_fit_the_gpus_they_name_by_the_plan():
    """make memory plans the README's commands (tools/bench.py); each runs as printed, and fits but the refused one."""
    bench = _tool("bench")
    readme = open(os.path.join(HERE, "README.md")).read().replace("\\\n  ", "")
    for world, gpu, flags in bench.README_COMMANDS + bench.MORE_COMMANDS:
        assert flags in readme or (world, gpu, flags) in bench.MORE_COMMANDS, flags
        fits = all(sum(need.values()) <= bench.GPU_FREE for need in bench.plan_command(flags, world).values())
        assert fits == ("refused" not in gpu), gpu


def test_a_run_whose_plan_does_not_fit_the_gpu_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    student = _tiny_family("qwen2_vl", tmp_path / "student")
    monkeypatch.setattr(ril, "load_model", lambda *x, **kw: pytest.fail("a model loaded before the plan"))
    monkeypatch.setattr(ril, "build_tiny", lambda *x, **kw: pytest.fail("a model was built before the plan"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10**10))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is refused without one
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--student", student, "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "training needs" in err and "GiB free; to fit" in err
    assert not os.path.exists(tmp_path / "o")  # nothing written


def test_a_teacher_generates_in_bounded_batches_and_its_memory_goes_when_it_is_done(tmp_path, monkeypatch):
    import weakref

    teacher, rows, seen, alive = _tiny_family("qwen2_vl", tmp_path / "t"), ril.make_toy(9, 0), [], []
    load, generate = ril.load_model, ril.generate
    monkeypatch.setattr(ril, "load_model", lambda *x: alive.append(weakref.ref((m := load(*x))[0])) or m)
    monkeypatch.setattr(ril, "generate", lambda m, enc, *x: seen.append(len(enc["input_ids"])) or generate(m, enc, *x))
    released = []  # at release (gc.collect, then torch.cuda.empty_cache on a GPU): is the teacher gone?
    monkeypatch.setattr(ril.gc, "collect", lambda: released.append(alive[0]() is None))
    a = args(out=str(tmp_path / "o"), teacher_samples=3, gen_batch=7, max_new_tokens=4)
    ril.model_teacher_texts(teacher, rows, a, CPU, torch.float32)
    assert seen == [6] * 4 + [3] and all(len(r["teachers"][teacher]) == 3 for r in rows)  # 2 questions x 3 a call
    assert released == [True]  # the cache is emptied once the teacher is gone, before the student loads


def test_images_are_scaled_to_max_pixels_and_the_saved_student_keeps_its_dtype(tmp_path):
    student = _tiny_family("qwen2_vl", tmp_path / "s")
    config = json.load(open(os.path.join(student, "config.json")))
    json.dump({**config, "dtype": "bfloat16"}, open(os.path.join(student, "config.json"), "w"))
    proc = ril.load_model(student, args(max_pixels=56 * 56), torch.float32, "--student")[1]
    row = dict(ril.make_toy(1, 0)[0], image=ril.Image.new("RGB", (448, 448)))
    assert ril.encode_prompts(proc, [row], CPU)["image_grid_thw"].prod() == 16  # 4 tokens of 28x28, not 256
    out = main_out(tmp_path, "--student", student, "--steps", "1")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    weights = ril.transformers.AutoModelForImageTextToText.from_pretrained(out).state_dict()
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}


# ---------------------------------------------------------------- faults during a run: one line, nothing lost
def test_an_image_that_disappears_mid_run_ends_in_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    rows, flags = _jsonl_run(tmp_path)
    out = str(tmp_path / "o")
    real = ril.Run.end_step

    def then_lose_the_images(self, s, step, *rest):
        real(self, s, step, *rest)
        if step == 1:  # a cleaned folder, a network disk gone
            for r in rows:
                os.rename(tmp_path / f"{r['id']}.png", tmp_path / f"{r['id']}.bak")

    monkeypatch.setattr(ril.Run, "end_step", then_lose_the_images)
    with pytest.raises(SystemExit) as e:
        ril.main([*flags, "--steps", "3", "--out", out])
    [err] = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if x.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: step 2 failed: FileNotFoundError") and ".png" in err
    assert "step_0000001.pt" in err and f"continue with: python ril.py --out {out} --resume --steps 3" in err
    monkeypatch.undo()
    for r in rows:
        os.rename(tmp_path / f"{r['id']}.bak", tmp_path / f"{r['id']}.png")
    ril.main(["--out", out, "--resume", "--steps", "3"])
    assert ril.checkpoints(out)[-1].endswith("step_0000003.pt")


def test_a_full_disk_mid_run_leaves_the_last_checkpoint_whole_and_no_temporary_file(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    real, calls = torch.save, []

    def disk_full_at_step_2(obj, f, *x, **kw):
        calls.append(1)
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 4 vs 0")
        return real(obj, f, *x, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    with pytest.raises(SystemExit) as e:
        ril.main([*TINY_RUN, "--steps", "3", "--save-every", "1", "--out", out])
    [err] = [x for x in re.split(r"[\r\n]", capsys.readouterr().err) if x.startswith("error:")]
    assert e.value.code == 2 and err.startswith("error: step 2 failed: OSError")
    assert "cannot write" in err and "step_0000002.pt" in err and "the last complete checkpoint is" in err
    assert "step_0000001.pt" in err and "--resume --steps 3" in err
    names = os.listdir(os.path.join(out, "checkpoints"))
    assert not [n for n in names if n.endswith(".tmp")] and "step_0000002.pt" not in names
    monkeypatch.undo()
    ril.main(["--out", out, "--resume", "--steps", "3"])
    assert ril.checkpoints(out)[-1].endswith("step_0000003.pt")


# ---------------------------------------------------------------- entry points of the torchrun tests above (not tools)
if __name__ == "__main__":
    if "--reduction-check" in sys.argv:  # test_two_ranks_with_two_questions_each_update_like_one_process_with_four
        shard = "--shard" in sys.argv
        ril.init_distributed(ril.Args(shard=shard), CPU)
        update = _reduction_update([ril.RANKS.rank, ril.RANKS.rank + 2], shard)
        if ril.RANKS.rank == 0:
            torch.save(update, os.path.join(sys.argv[sys.argv.index("--reduction-check") + 1], "reduction.pt"))
        ril.dist.destroy_process_group()
    elif "--ranks-agree" in sys.argv:  # test_torchrun_two_ranks_train_agree_and_save_an_ordinary_checkpoint
        _ranks_agree(sys.argv[sys.argv.index("--ranks-agree") + 1], sys.argv[sys.argv.index("--ranks-agree") + 2 :])
