"""Draw OUT/metrics.png of a ril.py run from its OUT/metrics.jsonl: one panel per group of metrics (rewards,
discriminator accuracy and loss, KL to the reference, answer length, held-out evaluation), step on x.

    python tools/plot.py runs/ril        # make run calls it after its run
"""

import argparse
import json
import os

from PIL import Image, ImageDraw, ImageFont

PANELS = [  # title, y label, [(metric, legend)]
    (
        "rewards of student samples",
        "reward",
        [("reward/total", "total"), ("reward/ans", "r_ans"), ("reward/sim", "r_sim")],
    ),
    (
        "discriminator accuracy",
        "accuracy",
        [("disc/acc_student", "on student texts"), ("disc/acc_teacher", "on teacher texts")],
    ),
    ("KL to the reference", "KL per token", [("policy/kl", "policy/kl")]),
    ("answer length", "tokens", [("len/mean", "student samples")]),
    (
        "held-out evaluation",
        "score",
        [
            ("eval/acc", "accuracy"),
            ("eval/teacher_like", "teacher-likeness (D then)"),
            ("eval/teacher_match", "teacher match"),
        ],
    ),
    ("discriminator loss", "BCE", [("disc/loss", "disc/loss")]),
]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]


def moving_average(pts: list, n: int) -> list:
    """Each point's y replaced by the mean of it and the n - 1 points before it (fewer at the start)."""
    out = []
    for i, (x, _) in enumerate(pts):
        window = pts[max(0, i - n + 1) : i + 1]
        out.append((x, sum(y for _, y in window) / len(window)))
    return out


def scales(x0, y0, w, h, xlo, xhi, ylo, yhi) -> tuple:
    """A panel's pixel x of a step and pixel y of a value: [xlo, xhi] onto x0 .. x0 + w, [ylo, yhi] onto y0 + h .. y0
    (y grows downwards in a picture)."""

    def X(x):
        return x0 + (x - xlo) / (xhi - xlo) * w

    def Y(y):
        return y0 + h - (y - ylo) / (yhi - ylo) * h

    return X, Y


def plot_metrics(out: str) -> str:
    """One panel per group of metrics, step on x: training curves as a moving average over a twentieth of the run (the
    raw curve light behind it), evaluations as points. Returns the path of the picture."""
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    img, font = Image.new("RGB", (1500, 900), "white"), ImageFont.load_default(size=14)
    d = ImageDraw.Draw(img)
    for k, (title, ylabel, series) in enumerate(PANELS):
        x0, y0, w, h = (k % 3) * 500 + 80, (k // 3) * 450 + 40, 390, 340
        data = [(name, pts) for key, name in series if (pts := [(m["step"], m[key]) for m in lines if key in m])]
        xs, ys = [x for _, p in data for x, _ in p] or [0], [y for _, p in data for _, y in p] or [0]
        xlo, xhi, ylo, yhi = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-9)
        X, Y = scales(x0, y0, w, h, xlo, xhi, ylo, yhi)
        texts = [
            (title, (x0 + w // 2, y0 - 22), "mm"),
            ("step", (x0 + w // 2, y0 + h + 34), "mm"),
            (ylabel, (x0 - 8, y0 - 8), "rb"),
        ]
        texts += [(f"{xlo + t * (xhi - xlo):.0f}", (X(xlo + t * (xhi - xlo)), y0 + h + 14), "mm") for t in (0, 0.5, 1)]
        texts += [(f"{ylo + t * (yhi - ylo):.3g}", (x0 - 8, Y(ylo + t * (yhi - ylo))), "rm") for t in (0, 0.5, 1)]
        for txt, xy, anchor in texts:
            d.text(xy, txt, fill="black", font=font, anchor=anchor)
        for j, (name, pts) in enumerate(data):
            c, n = COLOURS[j % 3], max(1, len(pts) // 20)
            if title == "held-out evaluation":
                for x, y in pts:
                    d.ellipse([X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], fill=c)
            if len(pts) > 20:
                d.line([(X(x), Y(y)) for x, y in pts], fill=tuple(v + (255 - v) * 2 // 3 for v in c))
                pts = moving_average(pts, n)
            d.line([(X(x), Y(y)) for x, y in pts], fill=c, width=2)
            d.line([x0 + 8, y0 + 12 + 18 * j, x0 + 26, y0 + 12 + 18 * j], fill=c, width=3)
            d.text((x0 + 32, y0 + 12 + 18 * j), name, fill=c, font=font, anchor="lm")
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        if not data:
            d.text((x0 + w // 2, y0 + h // 2), "not logged in this run", fill="gray", font=font, anchor="mm")
    path = os.path.join(out, "metrics.png")
    img.save(path + ".tmp", format="PNG")  # then renamed over the old picture: a kill never leaves half of one
    os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a run's output folder (ril.py --out): reads OUT/metrics.jsonl, writes OUT/metrics.png")
    print(f"wrote {plot_metrics(p.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
