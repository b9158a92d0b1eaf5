"""Shared training-loop pieces: device/backends, AdamW, warmup + cosine LR, EMA, time budget, logs.

The LR schedule runs on *progress* = max(step / steps, elapsed / time budget), so a run cut short
by ``--max-minutes`` still warms up, anneals and ends at the minimum LR; training stops when
progress reaches 1. On CUDA the forward runs under bf16 autocast with TF32 matmuls.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DiffspeedError


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    max_minutes: float | None = None
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float | None = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    print_every_s: float = 20.0
    device: str = "auto"

    def validate(self) -> None:
        if self.steps <= 0:
            raise DiffspeedError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise DiffspeedError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise DiffspeedError(f"--lr must be positive, got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DiffspeedError(f"--max-minutes must be positive, got {self.max_minutes}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    stopped_by: str  # "steps" or "time"
    final_loss: float
    steps_per_second: float
    items_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        return out


# ---- device ------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffspeedError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- schedule, optimizer, EMA ------------------------------------------------------------------

def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup_steps`` (ending by 5 % progress at the latest, so a short time
    budget is not spent warming up), times a cosine from 1 to ``min_ratio`` over ``progress``."""
    progress = min(max(progress, 0.0), 1.0)
    warm = min(1.0, max((step + 1) / max(1, warmup_steps), progress / 0.05))
    cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return warm * cosine


def make_optimizer(module: nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"lr": settings.lr, "betas": settings.betas}
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


class EMA:
    """Exponential moving average of a module's float parameters (fp32 shadow copy)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().float() for p in module.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        named = dict(module.named_parameters())
        for name, value in zip(self.names, self.shadow):
            named[name].copy_(value.to(named[name].dtype))
        return module

    def averaged_copy(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` holding the EMA weights (the original is untouched)."""
        return self.copy_to(copy.deepcopy(module))


# ---- the loop ----------------------------------------------------------------------------------

def _is_tty() -> bool:
    return sys.stdout.isatty()


def _weights_of(module: nn.Module, ema: EMA | None) -> list[torch.Tensor]:
    return ema.shadow if ema is not None else [p.detach() for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def _take_snapshot(module: nn.Module, ema: EMA | None, snapshots: list, step: int) -> None:
    weights = _weights_of(module, ema)
    if len(snapshots) == 2:  # reuse the oldest buffers
        old_step, buffers = snapshots.pop(0)
        torch._foreach_copy_(buffers, weights)
    else:
        buffers = [w.clone() for w in weights]
    snapshots.append((step, buffers))


@torch.no_grad()
def _restore_snapshot(module: nn.Module, ema: EMA | None, snapshots: list) -> int | None:
    for step, buffers in reversed(snapshots):
        if all(bool(torch.isfinite(b).all()) for b in buffers):
            if ema is not None:
                torch._foreach_copy_(ema.shadow, buffers)
            else:
                params = [p for p in module.parameters() if p.requires_grad]
                torch._foreach_copy_(params, buffers)
            return step
    return None


def train_loop(
    module: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    settings: TrainSettings,
    device: torch.device,
    *,
    label: str,
    items_per_step: int,
    ema: EMA | None = None,
    console: Any = None,
) -> TrainResult:
    """Optimise ``module`` with ``loss_fn(step)`` (forward under autocast is up to ``loss_fn``).

    Prints throughput after a few steps and a log line every ``print_every_s`` seconds (so a
    captured, non-interactive log shows progress); a rich progress bar on an interactive terminal.
    If the loss turns NaN/Inf, training stops and the weights (the EMA if given) roll back to the
    last logged step whose weights are finite (``stopped_by="nonfinite"``) instead of losing the run.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(soft_wrap=True)
    settings.validate()
    optimizer = make_optimizer(module, settings, device)
    budget_s = settings.max_minutes * 60 if settings.max_minutes else None
    history: list[dict[str, float]] = []
    loss_acc = torch.zeros((), device=device)
    acc_n = 0
    last_loss = float("nan")
    module.train()
    start = time.monotonic()
    last_print = start
    t_warm, step_warm = None, 0
    stopped_by = "steps"
    snapshots: list[tuple[int, list[torch.Tensor]]] = []  # the last two (step, weights) with finite loss
    step = 0
    bar = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=console, transient=True, disable=not _is_tty())
    with bar:
        task = bar.add_task(label, total=settings.steps, info="")
        while step < settings.steps:
            elapsed = time.monotonic() - start
            progress = step / settings.steps
            if budget_s:
                progress = max(progress, elapsed / budget_s)
                if progress >= 1.0:
                    stopped_by = "time"
                    break
            factor = lr_factor(step, progress, settings.warmup_steps, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            loss = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), settings.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(module, step)
            loss_acc += loss.detach().float()
            acc_n += 1
            step += 1
            if step == 5:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_warm, step_warm = time.monotonic(), step
            if step % settings.log_every == 0 or step == settings.steps or step == 25:
                mean = float(loss_acc) / max(1, acc_n)  # syncs the device
                if not math.isfinite(mean):
                    # keep what was learned: roll back to the last snapshot whose weights are finite
                    restored = _restore_snapshot(module, ema, snapshots)
                    console.print(f"[{label}] WARNING: loss became {mean} at step {step}; stopping and "
                                  f"{'restoring the weights of step ' + str(restored) if restored is not None else 'no finite snapshot to restore'}"
                                  " (lower --lr)", highlight=False, markup=False)
                    if restored is None:
                        raise DiffspeedError(f"{label}: loss became {mean} at step {step}; lower --lr")
                    stopped_by = "nonfinite"
                    acc_n = 0
                    break
                _take_snapshot(module, ema, snapshots, step)
                loss_acc.zero_()
                acc_n = 0
                last_loss = mean
                now = time.monotonic()
                history.append({"step": step, "loss": mean, "lr": settings.lr * factor, "time_s": now - start})
                rate = (step - step_warm) / (now - t_warm) if t_warm is not None and now > t_warm and step > step_warm else 0.0
                bar.update(task, completed=step, info=f"loss {mean:.4f} | {rate:.2f} it/s")
                if step == 25 or now - last_print >= settings.print_every_s:
                    last_print = now
                    extra = f", budget {budget_s / 60:.1f} min" if budget_s else ""
                    if device.type == "cuda":
                        extra += f", peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                    console.print(f"[{label}] step {step}/{settings.steps} loss {mean:.4f} lr {settings.lr * factor:.2e} "
                                  f"| {rate:.2f} it/s, {rate * items_per_step:.0f} samples/s | {now - start:.0f}s{extra}",
                                  highlight=False, markup=False)
            else:
                bar.update(task, completed=step)
    if acc_n:
        mean = float(loss_acc) / acc_n
        last_loss = mean
        history.append({"step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                        "time_s": time.monotonic() - start})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - start
    if t_warm is not None and step > step_warm:
        sps = (step - step_warm) / max(1e-9, time.monotonic() - t_warm)
    else:
        sps = step / max(seconds, 1e-9)
    console.print(f"[{label}] done: {step} steps in {seconds:.0f}s (stopped by {stopped_by}), final loss {last_loss:.4f}, "
                  f"{sps:.2f} it/s, {sps * items_per_step:.0f} samples/s", highlight=False, markup=False)
    module.eval()
    return TrainResult(steps=step, seconds=seconds, stopped_by=stopped_by, final_loss=last_loss,
                       steps_per_second=sps, items_per_second=sps * items_per_step, history=history)


# ---- outputs -----------------------------------------------------------------------------------

def save_loss_curve(history: list[dict[str, float]], path: str | Path, title: str) -> Path | None:
    """Loss (log scale) and LR versus step as a PNG; returns the path (None if no history)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(h["loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def default_weights_dir() -> Path:
    from ..models.reference import WEIGHTS_DIR

    return WEIGHTS_DIR


def start_run(device: str | torch.device, seed: int, console: Any = None) -> tuple[Any, torch.device]:
    """The start of every training run: a console (``console`` or a new rich one), the resolved device
    with its backends configured, and the global torch seed set."""
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    dev = resolve_device(device)
    configure_backends(dev)
    torch.manual_seed(seed)
    return console, dev


def default_warmup(steps: int, cap: int) -> int:
    """Warmup steps when none are given: a tenth of the run, at least 1, at most ``cap``."""
    return min(cap, max(1, steps // 10))


def say(console: Any, label: str, message: str) -> None:
    """One plain (no markup, no highlighting) progress line, prefixed ``[label]``."""
    console.print(f"[{label}] {message}", highlight=False, markup=False)


def weights_folder(out: str | Path | None, name: str) -> Path:
    """``<out>/<name>``, ``out`` defaulting to the package weights dir."""
    return (Path(out) if out is not None else default_weights_dir()) / name


def write_history(log_dir: str | Path | None, label: str, result: TrainResult, summary: dict[str, Any]) -> None:
    """The loss curve PNG and the history JSON of a run into ``log_dir`` (nothing when it is None)."""
    if log_dir is None:
        return
    logs = Path(log_dir)
    save_loss_curve(result.history, logs / f"{label}-loss.png", f"{label} training loss")
    write_json(logs / f"{label}-history.json", {"summary": summary, "history": result.history})


def generator_for(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(int(seed))
    return gen


def randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(device)


def rand(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def sample_flow_t(batch: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Logit-normal(0, 1) times in (0, 1), as SD3."""
    return torch.sigmoid(randn((batch,), gen, device))



class MaybeCompiled:
    """Call ``module`` through ``torch.compile`` when ``enabled``; if compiling fails, say so and
    continue eagerly (compile time counts against the time budget).

    The first call is a trial: a compiled forward AND a backward through it (a throw-away gradient
    of the output, so the backward graph, which AOTAutograd compiles lazily at the first
    ``.backward()``, is built here, inside the try, and is reused by the real steps); any failure
    falls back to eager. ``dynamic=False``: training shapes are fixed, so one graph, no guards on
    sizes. After the trial the forward is run again to return an output with a fresh graph.
    """

    def __init__(self, module: nn.Module, enabled: bool, label: str, console: Any = None):
        self.eager = module
        self.enabled = enabled
        self.label = label
        self.console = console
        self.fn = torch.compile(module, dynamic=False) if enabled else module
        self.checked = not enabled

    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False, markup=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.checked:
            return self.fn(*args, **kwargs)
        self.checked = True
        t0 = time.monotonic()
        try:
            out = self.fn(*args, **kwargs)
            if torch.is_grad_enabled():
                params = [p for p in self.eager.parameters() if p.requires_grad]
                first = out[0] if isinstance(out, (tuple, list)) else out
                if params and isinstance(first, torch.Tensor) and first.requires_grad:
                    torch.autograd.grad(first.float().square().mean(), params, allow_unused=True)
            del out
            out = self.fn(*args, **kwargs)
            self._say(f"[{self.label}] torch.compile: forward + backward compiled in {time.monotonic() - t0:.0f}s")
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back to eager
            self._say(f"[{self.label}] torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); continuing eagerly")
            self.fn = self.eager
            return self.eager(*args, **kwargs)
