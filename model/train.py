"""Training: AdamW (or Muon + AdamW, model/muon.py), warm-up + cosine decay, gradient clipping,
periodic validation, checkpoints, resume.

The learning-rate schedule runs on progress = max(step / max_steps, elapsed / time_limit), so a
time-limited run still warms up, decays fully and ends on schedule on a slower machine.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.config import BUDGET_STEP_MULTIPLES, GPTConfig, TrainConfig
from model.gpt import GPT
from model.muon import Muon, OptimizerPair

LN2 = math.log(2)


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    train_seconds: float
    val_loss: float  # nats per token
    val_bpc: float  # bits per character
    tokens_seen: int
    history: list[dict] = field(default_factory=list)


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def lr_at(progress: float, tc: TrainConfig, warmup_frac: float) -> float:
    if progress < warmup_frac:
        return tc.lr * progress / max(warmup_frac, 1e-9)
    p = min(1.0, (progress - warmup_frac) / max(1e-9, 1 - warmup_frac))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def get_batch(data: np.ndarray, block: int, batch: int, rng: np.random.Generator, device: str):
    ix = rng.integers(0, len(data) - block - 1, size=batch)
    x = np.stack([data[i : i + block] for i in ix]).astype(np.int64)
    y = np.stack([data[i + 1 : i + 1 + block] for i in ix]).astype(np.int64)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def make_optimizer(model: GPT, tc: TrainConfig, device: str):
    """AdamW on everything, or Muon on the blocks' matrices and AdamW on embeddings and LayerNorms."""
    if tc.optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {tc.optimizer!r}")
    params = dict(model.named_parameters())  # the tied head appears once, as wte.weight
    on_muon = [n for n, p in params.items() if p.dim() == 2 and n.startswith("blocks.")] if tc.optimizer == "muon" else []
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in on_muon]
    no_decay = [p for p in params.values() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.startswith("cuda"))
    if tc.optimizer == "adamw":
        return adamw
    groups = [{"params": [params[n]], "split": 3 if n.endswith("attn.qkv.weight") else 1, "lr_scale": tc.muon_lr_scale}
              for n in on_muon]
    return OptimizerPair(Muon(groups, lr=tc.lr, momentum=tc.muon_momentum, weight_decay=tc.weight_decay), adamw)


# Periodic sampled evaluations and bookkeeping on top of the steps themselves (measured on `small`).
EVAL_OVERHEAD = 1.05


def steps_for_budget(base_steps: int, step_seconds: float, budget_s: float,
                     multiples: tuple[float, ...] = BUDGET_STEP_MULTIPLES) -> int:
    """The largest multiple of ``base_steps`` whose projected training time fits ``budget_s``;
    ``base_steps`` when none does (a slow machine takes longer rather than training less)."""
    fits = [m for m in multiples if m * base_steps * step_seconds * EVAL_OVERHEAD <= budget_s]
    return round(max(fits, default=1.0) * base_steps)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), per /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_step(model: GPT, opt: torch.optim.Optimizer | OptimizerPair, x: torch.Tensor, y: torch.Tensor, grad_clip: float,
               device: str, bf16: bool) -> torch.Tensor:
    """One optimizer step (forward, backward, clipping, update); the loss, still on the device."""
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss


def time_train_step(model: GPT, tc: TrainConfig, data: np.ndarray, block: int, device: str,
                    steps: int = 6, skip: int = 2, bf16: bool = False) -> float:
    """Median seconds of a training step (forward, backward, clipping, optimizer), measured on a
    copy of the model with its own optimizer and batches; torch's random state is restored, so the
    run itself is the same with or without the probe."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.startswith("cuda") else None
    probe = copy.deepcopy(model)
    opt = make_optimizer(probe, tc, device)
    rng = np.random.default_rng(0)
    times = []
    try:
        for i in range(skip + steps):
            x, y = get_batch(data, block, tc.batch_size, rng, device)
            t = time.perf_counter()
            train_step(probe, opt, x, y, tc.grad_clip, device, bf16).item()  # .item() waits for the device
            if i >= skip:
                times.append(time.perf_counter() - t)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return float(np.median(times))


@torch.no_grad()
def evaluate_nats(model: GPT, data: np.ndarray, block: int, device: str, max_windows: int = 0,
                  batch: int = 16, bf16: bool = False) -> tuple[float, int]:
    """Total next-token nats over the stream and the number of scored tokens.

    Sliding windows with a stride of half a block: every token after the first window is scored
    with at least half a block of context, and each token is scored exactly once.
    """
    model.eval()
    stride = max(1, block // 2)
    last = len(data) - block - 1
    starts = [*range(0, last, stride), last]
    if max_windows:  # a quick, sampled estimate for periodic evaluation
        starts = starts[:: max(1, len(starts) // max_windows)][:max_windows]
    total, count, scored_until = 0.0, 0, 0  # targets at stream index <= scored_until are done
    for b in range(0, len(starts), batch):
        s = starts[b : b + batch]
        x = torch.from_numpy(np.stack([data[i : i + block] for i in s]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block] for i in s]).astype(np.int64)).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model.causal_logits(x)
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        for row, i in enumerate(s):
            first = 0 if max_windows else max(0, scored_until - i)  # y[row, k] is the target at index i + 1 + k
            total += float(nll[row, first:].sum())
            count += block - first
            scored_until = max(scored_until, i + block)
    model.train()
    return total, count


def save_checkpoint(path: Path, model: GPT, opt, step: int, tc: TrainConfig, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model_config": model.cfg.to_dict(), "train_config": asdict(tc), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "step": step, **extra}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_model(checkpoint: Path, device: str = "cpu") -> tuple[GPT, dict]:
    """Rebuild the model from the config stored in the checkpoint."""
    ck = torch.load(checkpoint, map_location=device, weights_only=False)
    model = GPT(GPTConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.to(device), ck


def plot_losses(history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    va = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train (smoothed)", lw=1)
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def train(
    model_cfg: GPTConfig,
    tc: TrainConfig,
    train_data: np.ndarray,
    val_data: np.ndarray,
    val_chars: int,
    out_dir: Path,
    resume: bool = False,
    device: str | None = None,
) -> TrainResult:
    device = device or pick_device()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    block = min(tc.block_size, model_cfg.context_length)
    if len(train_data) <= block + 1 or len(val_data) <= block + 1:
        raise ValueError(f"corpus too small for block size {block}: {len(train_data)} train / {len(val_data)} val tokens")

    model = GPT(model_cfg).to(device)
    opt = make_optimizer(model, tc, device)
    step, history, elapsed_before = 0, [], 0.0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        was = ck.get("train_config", {}).get("optimizer", "adamw")
        if was != tc.optimizer:
            raise ValueError(f"{ckpt_path} was trained with optimizer {was!r}, not {tc.optimizer!r}: "
                             f"resume with --optimizer {was} or start a new work dir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, history, elapsed_before = ck["step"], ck.get("history", []), ck.get("train_seconds", 0.0)
        rng = np.random.default_rng([tc.seed, step])
        print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)

    use_bf16 = tc.bf16 and device.startswith("cuda")
    probe_bf16 = tc.bf16 and tc.cpu_bf16 and device == "cpu" and cpu_native_bf16()
    if step == 0 and (tc.budget_s or probe_bf16):
        step_s = time_train_step(model, tc, train_data, block, device, bf16=use_bf16)
        if probe_bf16:
            bf16_s = time_train_step(model, tc, train_data, block, device, bf16=True)
            use_bf16 = bf16_s < 0.9 * step_s  # fp32 unless bf16 clearly pays
            print(f"bf16 autocast probe: {bf16_s:.3f}s a step vs {step_s:.3f}s in fp32 -> "
                  f"{'bf16' if use_bf16 else 'fp32'}", file=sys.stderr)
            step_s = min(step_s, bf16_s)
    elif step and probe_bf16:  # resuming: keep the precision the run started with
        use_bf16 = bool(ck.get("bf16_autocast", False))
    if tc.budget_s and step == 0:
        planned = steps_for_budget(tc.max_steps, step_s, tc.budget_s)
        print(f"training budget {tc.budget_s:.0f}s: {step_s:.3f}s a step (probe) -> {planned} steps "
              f"({planned / tc.max_steps:g} x {tc.max_steps})", file=sys.stderr)
        tc = dataclasses.replace(tc, max_steps=planned)
    elif tc.budget_s:  # resuming: keep the step count the run was planned with
        tc = dataclasses.replace(tc, max_steps=ck["train_config"]["max_steps"])
    n_params = model.num_parameters()
    warmup_frac = tc.warmup_steps / tc.max_steps
    print(f"training {n_params / 1e6:.2f}M parameters on {device} (bf16 autocast: {use_bf16}), "
          f"{len(train_data):,} train tokens, block {block}, batch {tc.batch_size}", file=sys.stderr)
    t0 = time.perf_counter() - elapsed_before
    smooth = None
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / tc.max_steps
        if tc.time_limit_s:
            progress = max(progress, elapsed / tc.time_limit_s)
        if progress >= 1.0:
            break
        lr = lr_at(progress, tc, warmup_frac)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        x, y = get_batch(train_data, block, tc.batch_size, rng, device)
        loss = train_step(model, opt, x, y, tc.grad_clip, device, use_bf16)
        step += 1
        lv = loss.item()
        smooth = lv if smooth is None else 0.95 * smooth + 0.05 * lv
        tok_s = step * tc.batch_size * block / max(1e-9, time.perf_counter() - t0)
        bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        if step % 10 == 0:
            history.append({"step": step, "train_loss": smooth, "lr": lr, "time": time.perf_counter() - t0})
        if step % tc.eval_interval == 0:
            tot, cnt = evaluate_nats(model, val_data, block, device, max_windows=8 * 16, bf16=use_bf16)
            history.append({"step": step, "val_loss": tot / cnt, "time": time.perf_counter() - t0})
            bar.write(f"step {step}: val loss {tot / cnt:.4f} (sampled)")
            save_checkpoint(ckpt_path, model, opt, step, tc, {"history": history, "train_seconds": time.perf_counter() - t0,
                                                               "bf16_autocast": use_bf16})
    bar.close()
    train_seconds = time.perf_counter() - t0
    tot, cnt = evaluate_nats(model, val_data, block, device)  # the whole validation set, fp32
    val_loss, val_bpc = tot / cnt, tot / val_chars / LN2
    history.append({"step": step, "val_loss": val_loss, "time": train_seconds})
    save_checkpoint(ckpt_path, model, opt, step, tc, {"history": history, "train_seconds": train_seconds,
                                                       "val_loss": val_loss, "val_bpc": val_bpc,
                                                       "bf16_autocast": use_bf16})
    plot_losses(history, out_dir / "loss.png")
    (out_dir / "train_summary.json").write_text(json.dumps({
        "steps": step, "train_seconds": round(train_seconds, 1), "val_loss": val_loss, "val_bpc": val_bpc,
        "parameters": n_params, "tokens_seen": step * tc.batch_size * block, "device": device,
        "bf16_autocast": use_bf16}, indent=2))
    print(f"done: {step} steps in {train_seconds:.0f}s, val loss {val_loss:.4f} nats/token, "
          f"{val_bpc:.4f} bits/char", file=sys.stderr)
    return TrainResult(ckpt_path, step, train_seconds, val_loss, val_bpc, step * tc.batch_size * block, history)
