#!/usr/bin/env python3
"""An independent eager PyTorch implementation of ONE EH-MAM training update, for benches/train.rs.

The model is the method's §7 tiny preset (`ModelConfig::tiny()` in stages/src/model/config.rs):
fbank front-end LayerNorm(160) -> Linear(160->128); positional conv depth 2, kernel 9, groups 4
(each Conv1d -> LayerNorm without affine -> GELU, added to the frames); input LayerNorm; 4 post-LN
blocks (D = 128, 4 heads, FFN 512, exact GELU) with learned-scale ALiBi; targets = mean of the
instance-normalised FFN outputs of the top 3 blocks; decoder and loss predictor of 2 conv layers
(dim 64, kernel 7, groups 8; LayerNorm without affine, GELU, residual where the width is kept) and a
Linear(64->128) (the predictor with an affine LayerNorm(64) before it, its per-frame value the mean
of the 128 outputs).

One update, as the paper's algorithm runs it (method §1), all of it timed:
  teacher (no grad, eval): frontend -> pos conv -> LN -> blocks -> targets y, predicted losses lp
  easy-to-hard mask from lp (method §4.1, P = 0.5, span 5, hard ratio ramping 0 -> 1 over the run)
  student: frontend with gradient, masked frames zeroed for the pos conv, only the visible frames
           through the blocks (ALiBi on original distances), dropout 0.1 everywhere the preset has it
           (input, attention probabilities, attention output, FFN output, head inputs), decoder and
           predictor over noise-filled sequences (N(0, 0.01^2) tokens at masked frames),
           L = (sum of per-frame L_rec + alpha * ranking sum) / N with alpha = 0.05 (method §1.9),
           backward, global gradient norm, AdamW (0.9, 0.98), eps 1e-6, wd 0.01 on every parameter,
           warm-up + cosine lr, EMA of the teacher (pos conv, input LN, blocks, ALiBi scales,
           loss predictor) with the linear tau ramp 0.99 -> 0.999, and the step's health metrics
           (target/prediction std, rank agreement of student and teacher predictors).

Input: random features standing in for precomputed 160-dim stacked fbank (8 x 200 frames = 8 x 4 s at
50 Hz by default). Prints machine-readable lines:
  torch_parameters student=... teacher=...
  torch_ms_per_update threads=1 value=... teacher_mask_ms=... student_ms=... masked_frac=... updates=...
and, where torch is missing, one line starting `torch_missing:` (exit status 0).

  python3 benches/train_reference.py [--updates N] [--warmup W] [--threads 1,2] [--batch 8] [--frames 200]
                                     [--profile N]   (PyTorch's profiler: its N heaviest ops)
                                     [--preset tiny|base] [--device cpu|cuda] [--dtype f32|bf16]

`--preset base` is method §2's model (ModelConfig::base(): the 7-layer CNN front-end over waveforms,
12 x 768 blocks, FFN 3072, top 8, positional conv depth 5 kernel 19 groups 16, heads of dim 384 with
4 layers and 16 groups, layerdrop 0.05), `--frames` then counting 16 kHz samples. `--device cuda`
runs on the GPU (timings synchronised); `--dtype bf16` under torch.autocast (bf16 matmuls and
convolutions; f32 weights, norms, softmax, losses and AdamW, as ehmam's `model.dtype: bf16`), and
the GPU's peak allocated memory is printed too.
"""

import argparse
import math
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print(
        "torch_missing: PyTorch is not importable by this python3; install it with "
        "`bash benches/install_references.sh` (pip install 'torch==2.15.*')"
    )
    sys.exit(0)

# Method §7 / ModelConfig::tiny().
IN_DIM, D, HEADS, FFN, LAYERS, TOP_K = 160, 128, 4, 512, 4, 3
POS_DEPTH, POS_K, POS_G = 2, 9, 4
HEAD_DIM, HEAD_LAYERS, HEAD_K, HEAD_G = 64, 2, 7, 8
DROPOUT = ATT_DROPOUT = HEAD_DROPOUT = 0.1
NOISE_STD = 0.01
ALPHA = 0.05
MASK_P, SPAN = 0.5, 5
# StudentParams defaults and specs/tiny.yaml's student.
LR, BETAS, ADAM_EPS, WD = 1e-3, (0.9, 0.98), 1e-6, 0.01
TAU0, TAU_END = 0.99, 0.999
EPS = 1e-5
# Front-end: None for fbank (LayerNorm(IN_DIM) -> Linear), else the CNN's [channels, kernel, stride].
CONV = None
LAYERDROP = 0.0
DEV = "cpu"
AMP = None  # torch.bfloat16 under --dtype bf16


def set_preset(name):
    """ModelConfig::tiny() (the constants above) or ModelConfig::base()."""
    global IN_DIM, D, HEADS, FFN, LAYERS, TOP_K, POS_DEPTH, POS_K, POS_G
    global HEAD_DIM, HEAD_LAYERS, HEAD_K, HEAD_G, CONV, LAYERDROP
    if name == "base":
        IN_DIM, D, HEADS, FFN, LAYERS, TOP_K = 1, 768, 12, 3072, 12, 8
        POS_DEPTH, POS_K, POS_G = 5, 19, 16
        HEAD_DIM, HEAD_LAYERS, HEAD_K, HEAD_G = 384, 4, 7, 16
        CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
        LAYERDROP = 0.05


def alibi_slopes(h):
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if h & (h - 1) == 0:
        return pow2(h)
    p = 1 << (h.bit_length() - 1)
    return pow2(p) + pow2(2 * p)[0::2][: h - p]


def init_params(gen):
    """Every parameter, named as ehmam names them (stages/src/model/init.rs), initialised per §2.8."""
    p = {}

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, b):
        return (torch.rand(shape, generator=gen) * 2 - 1) * b

    def ln(name, n):
        p[f"{name}.weight"] = torch.ones(n)
        p[f"{name}.bias"] = torch.zeros(n)

    def lin_bert(name, i, o):
        p[f"{name}.weight"] = normal((o, i), 0.02)
        p[f"{name}.bias"] = torch.zeros(o)

    def lin_default(name, i, o):
        b = 1 / math.sqrt(i)
        p[f"{name}.weight"] = uniform((o, i), b)
        p[f"{name}.bias"] = uniform((o,), b)

    def conv_default(name, i, o, k, g):
        b = 1 / math.sqrt(i // g * k)
        p[f"{name}.weight"] = uniform((o, i // g, k), b)
        p[f"{name}.bias"] = uniform((o,), b)

    if CONV is None:
        ln("frontend.ln", IN_DIM)
        lin_default("frontend.proj", IN_DIM, D)
    else:
        c_in = 1
        for i, (c, k, _) in enumerate(CONV):
            # Kaiming normal (fan_in, gain sqrt 2), no bias, a LayerNorm after each (init.rs).
            p[f"frontend.conv.{i}.weight"] = normal((c, c_in, k), math.sqrt(2.0 / (c_in * k)))
            ln(f"frontend.conv.{i}.ln", c)
            c_in = c
        ln("frontend.ln", c_in)
        lin_default("frontend.proj", c_in, D)
    for l in range(POS_DEPTH):
        conv_default(f"encoder.pos_conv.{l}", D, D, POS_K, POS_G)
    ln("encoder.ln_in", D)
    p["encoder.alibi_scale"] = torch.ones(HEADS)
    for l in range(LAYERS):
        b = f"encoder.blocks.{l}"
        lin_bert(f"{b}.attn.qkv", D, 3 * D)
        lin_bert(f"{b}.attn.proj", D, D)
        ln(f"{b}.ln1", D)
        lin_bert(f"{b}.fc1", D, FFN)
        lin_bert(f"{b}.fc2", FFN, D)
        ln(f"{b}.ln2", D)
    for head, pred in (("decoder", False), ("loss_predictor", True)):
        for l in range(HEAD_LAYERS):
            conv_default(f"{head}.blocks.{l}.conv", D if l == 0 else HEAD_DIM, HEAD_DIM, HEAD_K, HEAD_G)
        if pred:
            ln(f"{head}.ln", HEAD_DIM)
        lin_default(f"{head}.proj", HEAD_DIM, D)
    return p


def in_teacher(name):
    return name.startswith("encoder.") or name.startswith("loss_predictor.")


class Model:
    """Forward functions over a weight dict (student: leaf tensors with grad; teacher: EMA copies)."""

    def __init__(self, w, train):
        self.w = w
        self.train = train
        self.slopes = torch.tensor(alibi_slopes(HEADS), device=DEV).view(1, HEADS, 1, 1)

    def drop(self, x, p):
        return F.dropout(x, p, training=True) if self.train and p > 0 else x

    def ln(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"], self.w[f"{name}.bias"], EPS)

    def lin(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def conv(self, x, name, groups):
        """Same-length grouped conv over time of a [B, T, C] tensor -> [B, T, O]."""
        wt = self.w[f"{name}.weight"]
        y = F.conv1d(x.transpose(1, 2), wt, self.w[f"{name}.bias"], padding=wt.shape[2] // 2, groups=groups)
        return y.transpose(1, 2)

    def frontend(self, x):
        if CONV is not None:
            # [B, samples, 1] -> [B, T, 512]: conv (no bias), LayerNorm over channels, GELU.
            h = x.transpose(1, 2)
            for i, (c, k, st) in enumerate(CONV):
                h = F.conv1d(h, self.w[f"frontend.conv.{i}.weight"], stride=st)
                h = F.gelu(self.ln(h.transpose(1, 2), f"frontend.conv.{i}.ln").transpose(1, 2))
            x = h.transpose(1, 2)
        return self.lin(self.ln(x, "frontend.ln"), "frontend.proj")

    def pos_conv(self, x):
        h = x
        for l in range(POS_DEPTH):
            h = self.conv(h, f"encoder.pos_conv.{l}", POS_G)
            h = F.gelu(F.layer_norm(h, (D,), eps=EPS))
        return h

    def alibi(self, pos):
        """[B|1, H, Tv, Tv] bias for the kept positions `pos` [B|1, Tv] (original distances)."""
        dist = (pos.unsqueeze(2) - pos.unsqueeze(1)).abs().to(torch.float32).unsqueeze(1)
        m = self.slopes * F.relu(self.w["encoder.alibi_scale"]).view(1, HEADS, 1, 1)
        return -(dist * m)

    def block(self, l, x, bias):
        b, t, d = x.shape
        dh = d // HEADS
        p = f"encoder.blocks.{l}"
        qkv = self.lin(x, f"{p}.attn.qkv").view(b, t, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (1.0 / math.sqrt(dh)), qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        att = self.drop(att, ATT_DROPOUT)
        o = (att @ v).transpose(1, 2).reshape(b, t, d)
        o = self.drop(self.lin(o, f"{p}.attn.proj"), DROPOUT)
        h1 = self.ln(x + o, f"{p}.ln1")
        f = self.lin(F.gelu(self.lin(h1, f"{p}.fc1")), f"{p}.fc2")
        out = self.ln(h1 + self.drop(f, DROPOUT), f"{p}.ln2")
        return out, f

    def head(self, name, u, pred):
        x = u
        for l in range(HEAD_LAYERS):
            y = F.gelu(F.layer_norm(self.conv(x, f"{name}.blocks.{l}.conv", HEAD_G), (HEAD_DIM,), eps=EPS))
            x = x + y if x.shape[-1] == y.shape[-1] else y
        if pred:
            x = self.ln(x, f"{name}.ln")
        return self.lin(x, f"{name}.proj")

    def teacher(self, z):
        """§1.3-1.4 on detached frames z [B, T, D]: targets [B, T, D] and predicted losses [B, T]."""
        t = z.shape[1]
        x = self.ln(z + self.pos_conv(z), "encoder.ln_in")
        bias = self.alibi(torch.arange(t, device=DEV).unsqueeze(0))
        acc = None
        for l in range(LAYERS):
            x, f = self.block(l, x, bias)
            if l + TOP_K >= LAYERS:
                f = f.float()  # the instance norm in f32 (as ehmam's teacher)
                mean = f.mean(dim=1, keepdim=True)
                var = f.var(dim=1, unbiased=False, keepdim=True)
                n = (f - mean) / torch.sqrt(var + EPS)
                acc = n if acc is None else acc + n
        y = (acc / TOP_K).float()
        lp = self.head("loss_predictor", y, True).float().mean(dim=-1)
        return y, lp

    def fill(self, dropped, keep, mask):
        """Visible frames back in place, fresh N(0, σ²) noise tokens at the masked ones (§1.6)."""
        b, t = keep.shape
        u = torch.empty(b, t, D, device=DEV, dtype=dropped.dtype)
        u[mask] = (torch.randn(int(mask.sum()), D, device=DEV) * NOISE_STD).to(dropped.dtype)
        return u.index_put((keep,), dropped.reshape(-1, D))


def eh_mask(lp, r, gen):
    """Easy-to-hard span mask of method §4.1 from predicted losses lp [B, T]; bool [B, T], True = hidden."""
    lp = lp.float().cpu()
    b, n = lp.shape
    u = torch.rand((), generator=gen).item()
    rows = []
    for i in range(b):
        s = max(1, math.floor(MASK_P * n / SPAN + u))
        rng = n - SPAN
        if rng <= s:
            rng = s + 1
        s_rand = math.floor(s * (1 - r) + 1e-9)
        s_hard = s - s_rand
        hard = torch.topk(lp[i], s_hard).indices if s_hard > 0 else torch.empty(0, dtype=torch.long)
        cand = torch.randperm(rng, generator=gen)[:s]
        rest = cand[~torch.isin(cand, hard)]
        rand = rest[torch.randperm(len(rest), generator=gen)[:s_rand]]
        starts = torch.cat([hard, rand])
        frames = (starts.unsqueeze(1) + torch.arange(SPAN)).flatten()
        row = torch.zeros(n, dtype=torch.bool)
        row[frames[frames < n]] = True
        rows.append(row)
    m = min(int(r_.sum()) for r_ in rows)
    for i, row in enumerate(rows):
        idx = row.nonzero().flatten()
        if len(idx) > m:
            row[idx[torch.randperm(len(idx), generator=gen)[m:]]] = False
    return torch.stack(rows).to(DEV)


def mean_channel_std(x):
    """Mean over channels of the per-channel (unbiased) std over rows of [N, C]."""
    return x.std(dim=0).mean().item()


def rank_agreement(pred, actual):
    """Share of distinct-target pairs (i < j) in each row that `pred` orders like `actual`."""
    dp = pred.unsqueeze(1) - pred.unsqueeze(2)
    da = actual.unsqueeze(1) - actual.unsqueeze(2)
    upper = torch.triu(torch.ones(dp.shape[-1], dp.shape[-1], dtype=torch.bool, device=dp.device), diagonal=1)
    distinct = (da != 0) & upper
    total = int(distinct.sum())
    return float(((dp * da > 0) & distinct).sum()) / total if total else float("nan")


def lr_at(t, total):
    warmup = total // 10
    if warmup > 0 and t < warmup:
        return LR * t / warmup
    x = min(1.0, (t - warmup) / max(1, total - warmup))
    return 0.5 * LR * (1 + math.cos(math.pi * x))


def tau_at(n, tau_steps):
    if n >= tau_steps:
        return TAU_END
    return TAU_END - (TAU_END - TAU0) * (1 - n / tau_steps)


class Trainer:
    def __init__(self, seed, total):
        gen = torch.Generator().manual_seed(seed)
        w = {k: v.to(DEV) for k, v in init_params(gen).items()}
        self.vars = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        self.teacher_w = {k: v.clone() for k, v in w.items() if in_teacher(k)}
        self.layer_gen = torch.Generator().manual_seed(seed + 3)
        self.student = Model(self.vars, train=True)
        self.opt = torch.optim.AdamW(
            list(self.vars.values()), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD
        )
        self.ema_pairs = [(self.teacher_w[k], self.vars[k]) for k in self.teacher_w]
        self.mask_gen = torch.Generator().manual_seed(seed + 1)
        self.step = 0
        self.total = total

    def update(self, x):
        """One EH-MAM update on features x [B, N, IN_DIM]. Returns (teacher+mask ms, student ms, masked frac)."""
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=DEV, dtype=AMP, enabled=AMP is not None):
            return self._update(x, t0)

    def _update(self, x, t0):
        b = x.shape[0]
        # Teacher: eval, no dropout, on the weights of the previous EMA update; its front-end is
        # the student's current one (method §1.2), applied without gradient.
        with torch.no_grad():
            tw = dict(self.teacher_w)
            for k, v_ in self.vars.items():
                if k.startswith("frontend."):
                    tw[k] = v_
            teacher = Model(tw, train=False)
            y, lp = teacher.teacher(teacher.frontend(x))
            sync()
            t_teach = time.perf_counter()
            mask = eh_mask(lp, self.step / self.total, self.mask_gen)
        t = mask.shape[1]
        t1 = time.perf_counter()

        s = self.student
        keep = ~mask
        m = int(mask[0].sum())
        tv = t - m
        n_masked = b * m
        # Student encoder over the visible frames (§1.5).
        z = s.frontend(x)
        pos = s.pos_conv(z * keep.unsqueeze(-1).to(z.dtype))
        v = (z + pos)[keep].view(b, tv, D)
        h = s.drop(s.ln(v, "encoder.ln_in"), DROPOUT)
        positions = keep.nonzero()[:, 1].view(b, tv)
        bias = s.alibi(positions)
        for l in range(LAYERS):
            # Layerdrop (base: 0.05): the whole block skipped for the batch.
            if LAYERDROP > 0 and torch.rand((), generator=self.layer_gen).item() < LAYERDROP:
                continue
            h, _ = s.block(l, h, bias)
        # Decoder over the noise-filled sequence (§1.6) and the reconstruction loss (§1.7).
        yhat = s.head("decoder", s.fill(s.drop(h, HEAD_DROPOUT), keep, mask), False)
        y_m = y[mask].view(b, m, D)
        yhat_m = yhat[mask].view(b, m, D).float()
        ell = (yhat_m - y_m).pow(2).sum(-1) * (1.0 / math.sqrt(D))
        rec_sum = ell.sum()
        # Loss predictor with its own dropout and noise tokens, pairwise ranking loss (§1.8).
        p_all = s.head("loss_predictor", s.fill(s.drop(h, HEAD_DROPOUT), keep, mask), True).float().mean(-1)
        p_m = p_all[mask].view(b, m)
        l_det = ell.detach()
        gt = (l_det.unsqueeze(1) > l_det.unsqueeze(2)).to(p_m.dtype)  # [b, i, j]: l_j > l_i
        lt = (l_det.unsqueeze(1) < l_det.unsqueeze(2)).to(p_m.dtype)
        d = (p_m.unsqueeze(1) - p_m.unsqueeze(2)).clamp(-80, 80)  # p_j - p_i
        raw = (-torch.log(torch.sigmoid(d) + 1e-6) * gt - torch.log(torch.sigmoid(-d) + 1e-6) * lt).sum()
        loss = (rec_sum + ALPHA * raw) / n_masked
        # Backward, gradient norm, AdamW with the schedule, EMA (§1 steps 9-10, §3, §5).
        self.opt.zero_grad(set_to_none=True)
        sync()
        t_fwd = time.perf_counter()
        loss.backward()
        sync()
        t_bwd = time.perf_counter()
        grads = [v_.grad for v_ in self.vars.values() if v_.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        loss_value = loss.item()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total)
        self.opt.step()
        self.step += 1
        tau = tau_at(self.step, self.total // 2)
        with torch.no_grad():
            for tw_, sv in self.ema_pairs:
                tw_.lerp_(sv, 1 - tau)
            sync()
            t_opt = time.perf_counter()
            # The step's health metrics (§1.10), as ehmam's step record carries them.
            target_std = mean_channel_std(y_m.reshape(-1, D))
            pred_std = mean_channel_std(yhat_m.detach().reshape(-1, D))
            agree = rank_agreement(p_m.detach(), l_det)
            teacher_agree = rank_agreement(lp[mask].view(b, m), l_det)
        sync()
        t2 = time.perf_counter()
        if not all(math.isfinite(v_) for v_ in (loss_value, grad_norm, target_std, pred_std)):
            raise SystemExit(f"non-finite update {self.step}: loss {loss_value}, grad norm {grad_norm}")
        self.last = (loss_value, grad_norm, agree, teacher_agree)
        self.last_shape = (b, t, m)
        # Phases as ehmam's bench splits them: teacher forward, mask, student forward (and the
        # losses), backward, gradient norm + AdamW + EMA, metrics.
        self.phases = [(b_ - a_) * 1e3 for a_, b_ in [(t0, t_teach), (t_teach, t1), (t1, t_fwd), (t_fwd, t_bwd), (t_bwd, t_opt), (t_opt, t2)]]
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, m / t


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def main():
    global DEV, AMP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=20, help="timed updates per thread count")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    ap.add_argument("--batch", type=int, default=8, help="utterances per batch")
    ap.add_argument("--frames", type=int, default=200, help="frames per utterance (50 Hz; 200 = 4 s)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also run PyTorch's profiler over the timed updates at the first thread count and print its N heaviest ops (self CPU time)",
    )
    ap.add_argument(
        "--count-flops",
        action="store_true",
        help="count one update's FLOPs with torch.utils.flop_counter (matmuls and convolutions) and print them",
    )
    ap.add_argument("--preset", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    set_preset(a.preset)
    DEV = a.device
    AMP = torch.bfloat16 if a.dtype == "bf16" else None
    if DEV == "cuda":
        # f32 matmuls in full f32 (no TF32), as candle's cuBLAS calls by default.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_interop_threads(1)
    n_student = sum(v.numel() for v in init_params(torch.Generator().manual_seed(0)).values())
    n_teacher = sum(v.numel() for k, v in init_params(torch.Generator().manual_seed(0)).items() if in_teacher(k))
    print(f"torch_version value={torch.__version__}")
    print(f"torch_parameters student={n_student} teacher={n_teacher}")
    rate = 16000 if CONV is not None else 50
    print(f"torch_shapes preset={a.preset} device={DEV} dtype={a.dtype} batch={a.batch} frames={a.frames} feature_dim={IN_DIM} audio_s_per_batch={a.batch * a.frames / rate:g}")
    for threads in [int(s) for s in a.threads.split(",") if s]:
        torch.set_num_threads(threads)
        torch.manual_seed(a.seed)
        total = a.warmup + a.updates
        tr = Trainer(a.seed, total)
        gen = torch.Generator().manual_seed(a.seed + 2)
        batches = [torch.randn(a.batch, a.frames, IN_DIM, generator=gen).to(DEV) for _ in range(min(total, 8))]
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, teach, stud, frac = [], [], [], []
        phases = [[] for _ in range(6)]
        prof = None
        if a.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            fc = FlopCounterMode(display=False)
            with fc:
                tr.update(batches[0])
            m = tr.last_shape
            print(f"torch_flops value={fc.get_total_flops()} batch={m[0]} frames={m[1]} masked={m[2]}")
            return
        for i in range(total):
            if a.profile and i == a.warmup and threads == int(a.threads.split(",")[0]):
                from torch.profiler import ProfilerActivity, profile

                prof = profile(activities=[ProfilerActivity.CPU])
                prof.__enter__()
            tm, sm, mf = tr.update(batches[i % len(batches)])
            if i >= a.warmup:
                times.append(tm + sm)
                teach.append(tm)
                stud.append(sm)
                frac.append(mf)
                for k, v in enumerate(tr.phases):
                    phases[k].append(v)
        if prof is not None:
            prof.__exit__(None, None, None)
            print(f"torch_profile threads={threads} updates={a.updates} (self CPU time over all of them)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))
        print(
            f"torch_ms_per_update threads={threads} value={statistics.median(times):.2f} "
            f"teacher_mask_ms={statistics.median(teach):.2f} student_ms={statistics.median(stud):.2f} "
            f"masked_frac={statistics.mean(frac):.3f} updates={len(times)} "
            f"last_loss={tr.last[0]:.4f} last_grad_norm={tr.last[1]:.4f} "
            f"phases_ms={','.join(f'{statistics.median(v):.2f}' for v in phases)}"
            + (f" peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}" if DEV == "cuda" else "")
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
