"""StyleGAN2-ADA training loop (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN", sec. 2-3 and appendix B; "Training Generative Adversarial Networks with Limited Data",
sec. 2-3).

One iteration runs four phases, each with its own optimizer step:
  Gmain  non-saturating logistic loss on fakes (style mixing)
  Greg   path-length regularisation, every `pl_interval` iterations (lazy)
  Dmain  logistic loss on reals and fakes; the ADA controller watches sign(D(real))
  Dreg   R1 on reals, every `r1_interval` iterations (lazy)
Learning rates and Adam betas are adjusted for the lazy intervals as in the paper. Several
processes (`--gpus N`, or torchrun) average their gradients with all-reduce (NCCL on CUDA, gloo on
CPU). Snapshots are written atomically; resuming our own snapshot restores kimg, ADA p, the
optimizers, G_ema and the RNG state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from stylegan import losses
from stylegan.augment import AdaController, AugmentConfig, AugmentPipe
from stylegan.checkpoint import (load_network, load_training_state, restore_rng_state,
                                 rng_state, save_networks, save_training_state)
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json
from stylegan.imageutil import from_uint8, save_grid, to_uint8
from stylegan.networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig
from stylegan.progress import progress
from stylegan.runtime import EndlessSampler, RunLog, cuda_backend_settings, resolve_device

SNAPSHOT_PREFIX = "network-snapshot-"


@dataclass(frozen=True)
class TrainOptions:
    """Resolved options of one training run (preset + flags). Saved as training_options.json."""

    outdir: str
    data: str
    cfg: str
    gpus: int
    batch: int  # total batch over all processes
    batch_gpu: int  # batch per process and accumulation round
    gamma: float
    glr: float
    dlr: float
    kimg: float  # total training length in thousands of real images shown to D
    tick: float  # kimg between progress reports
    snap: int  # ticks between snapshots
    workers: int
    mirror: bool
    rot90: bool
    aug: str  # 'ada' | 'fixed' | 'noaug'
    p: float  # initial (ada) or fixed augmentation probability
    target: float  # ADA target for E[sign(D(real))]
    freezed: int  # freeze the first N layers of D
    seed: int
    fp32: bool
    ema_kimg: float
    ema_rampup: float | None
    pl_weight: float
    style_mixing: float
    resume: str | None
    strict_resume: bool
    device: str
    generator: GeneratorConfig
    discriminator: DiscriminatorConfig
    r1_interval: int = 16
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    ada_interval: int = 4
    ada_kimg: float = 500.0
    max_minutes: float | None = None  # stop with a final snapshot after this wall time
    # The data's preprocessing policy (prepare.json beside --data), carried opaquely into every
    # snapshot so that raw images are later fitted the same way; None when the data records none.
    preprocessing: dict | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainState:
    """Everything that changes while training; what a snapshot saves."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    augment: AugmentPipe | None
    ada: AdaController | None
    pl_mean: torch.Tensor
    cur_nimg: int = 0
    batch_idx: int = 0


@dataclass
class Dist:
    """Where this process sits among the training processes."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------
# Entry points


def train(opts: TrainOptions, *, resume_networks: dict | None = None) -> Path:
    """Run one training run and return its run folder. Spawns `opts.gpus` processes if needed.

    `resume_networks` is what `load_network(opts.resume)` returned, when the caller has it.
    """
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        run_dir = _train_process(rank, world, opts, resume_networks, init_method="env://")
        if rank != 0:
            _exit_without_teardown()  # the main process reports the run; see _spawned
        return run_dir
    if opts.gpus == 1:
        return _train_process(0, 1, opts, resume_networks, init_method=None)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'dist_init')}"
        torch.multiprocessing.spawn(_spawned, args=(opts, resume_networks, init),
                                    nprocs=opts.gpus, join=True)
        return Path(Path(tmp, "run_dir").read_text())


def _spawned(rank: int, opts: TrainOptions, resume_networks: dict | None, init: str) -> None:
    run_dir = _train_process(rank, opts.gpus, opts, resume_networks, init_method=init)
    if rank == 0:
        Path(init.removeprefix("file://")).parent.joinpath("run_dir").write_text(str(run_dir))
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """Leave a helper process whose work is written and whose process group is gone.

    Its interpreter shutdown can still abort in C++ ("terminate called without an active
    exception": a library thread destroyed while joinable, seen in CI under spawn and torchrun
    about once in 15 runs), which the launcher reports as a failed run; skip that shutdown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_process(rank: int, world: int, opts: TrainOptions, resume_networks: dict | None, *,
                   init_method: str | None) -> Path:
    device = resolve_device(opts.device, rank=int(os.environ.get("LOCAL_RANK", rank)))
    cuda_backend_settings(device)
    env = Dist(rank=rank, world=world, device=device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        run_dir = _run(opts, env, resume_networks)
        if world > 1:
            # Every process waits here until the main one has written its last snapshot: a
            # process that tears down gloo while a peer is still busy can be aborted (seen in CI).
            dist.barrier()
        return run_dir
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(opts: TrainOptions, env: Dist, resume_networks: dict | None) -> Path:
    _seed_everything(opts.seed, env.rank)
    dataset = ImageDataset(opts.data, xflip=opts.mirror, rot90=opts.rot90)
    state, resumed_rng = _build_state(opts, env, resume_networks)
    run_dir = _make_run_dir(opts) if env.main else Path()
    log = _Logger(run_dir if env.main else None)
    if env.main:
        log(f"run folder: {run_dir}")
        log(f"dataset: {opts.data} ({len(dataset)} images, {dataset.resolution} px)")
        log(f"G: {_count(state.G)} parameters, D: {_count(state.D)}, num_ws {state.G.num_ws}")
    if resumed_rng is not None:
        restore_rng_state(resumed_rng)
    _sync_replicas(state, env)
    reals = _real_batches(dataset, opts, env, start=state.cur_nimg)
    grid_z = _grid_latents(state.G, env.device)
    if env.main:
        _save_reals_grid(dataset, run_dir)
        _save_fakes(state.G_ema, grid_z, run_dir / f"fakes{kimg_tag(state.cur_nimg)}.png")
    _loop(opts, env, state, reals, grid_z, run_dir, log)
    return run_dir


def _loop(opts: TrainOptions, env: Dist, state: TrainState, reals: Iterator[torch.Tensor],
          grid_z: torch.Tensor, run_dir: Path, log: "_Logger") -> None:
    total = int(opts.kimg * 1000)
    tick_nimg, tick_start, tick_idx = state.cur_nimg, time.time(), 0
    stats = _StatsCollector()
    bar = progress(total=opts.kimg, initial=state.cur_nimg / 1000, desc="train-gan", unit="kimg",
                   disable=not env.main,
                   bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}"
                              "{postfix}]")
    deadline = None if opts.max_minutes is None else time.time() + 60 * opts.max_minutes
    out_of_time = False
    while state.cur_nimg < total and not out_of_time:
        _iteration(opts, env, state, reals, stats)
        bar.update(opts.batch / 1000)
        out_of_time = _time_is_up(deadline, env)
        done = state.cur_nimg >= total or out_of_time
        if not done and state.cur_nimg < tick_nimg + opts.tick * 1000:
            continue
        tick_idx += 1
        sec_per_kimg = (time.time() - tick_start) / max((state.cur_nimg - tick_nimg) / 1000, 1e-9)
        bar.set_postfix_str(f"{sec_per_kimg:.1f} s/kimg", refresh=False)
        record = stats.summary(state, sec_per_kimg, env)
        snapshot = done or (opts.snap > 0 and tick_idx % opts.snap == 0)
        if snapshot and env.world > 1:
            _check_replicas(state, env, log)
        if env.main:
            log.tick(record)
            if snapshot:
                _save_snapshot(opts, state, grid_z, run_dir, log)
        tick_nimg, tick_start = state.cur_nimg, time.time()
    bar.close()
    if env.main:
        if out_of_time:
            log(f"--max-minutes {opts.max_minutes:g} reached: stopped with a snapshot")
        log(f"done: {state.cur_nimg / 1000:.3f} kimg")


def _time_is_up(deadline: float | None, env: Dist) -> bool:
    """Whether the wall-time limit has passed; every process gets the main process's answer,
    so all stop after the same iteration."""
    if deadline is None:
        return False
    up = torch.tensor([float(time.time() >= deadline)], device=env.device)
    if env.world > 1:
        dist.broadcast(up, src=0)
    return bool(up.item())


def _iteration(opts: TrainOptions, env: Dist, state: TrainState, reals: Iterator[torch.Tensor],
               stats: "_StatsCollector") -> None:
    rounds = opts.batch // (opts.batch_gpu * env.world)
    real_chunks = [next(reals) for _ in range(rounds)]
    G, D = state.G, state.D
    # Gmain (+ Greg every pl_interval iterations); D's weights need no gradients meanwhile.
    with _no_weight_grads(state.opt_D):
        _phase(state.opt_G, G, env, [lambda: _loss_g_main(opts, state, env)] * rounds, stats,
               "G")
        if opts.pl_weight > 0 and state.batch_idx % opts.pl_interval == 0:
            _phase(state.opt_G, G, env, [lambda: _loss_g_pl(opts, state, env)] * rounds, stats,
                   "Gpl")
    # Dmain (+ Dreg every r1_interval iterations).
    with _no_weight_grads(state.opt_G):
        _phase(state.opt_D, D, env, [lambda r=r: _loss_d_main(opts, state, env, r)
                                     for r in real_chunks], stats, "D")
        _average_w_avg(G, env)  # each process tracked W's mean on its own fakes
        if opts.gamma > 0 and state.batch_idx % opts.r1_interval == 0:
            _phase(state.opt_D, D, env, [lambda r=r: _loss_d_r1(opts, state, r)
                                         for r in real_chunks], stats, "Dr1")
    state.cur_nimg += opts.batch
    state.batch_idx += 1
    beta = losses.ema_beta(opts.batch, opts.ema_kimg, state.cur_nimg, opts.ema_rampup)
    losses.update_ema(state.G_ema, G, beta)
    if state.ada is not None and state.augment is not None:
        state.augment.p.copy_(torch.as_tensor(state.ada.p, dtype=state.augment.p.dtype))


@contextmanager
def _no_weight_grads(opt: torch.optim.Optimizer) -> Iterator[None]:
    """The other network's trainable weights get no gradients during a phase (as in the official
    loop): backward then computes only what flows through them, which saves D's weight gradients
    in the G phases. Frozen layers are not in the optimizer and stay frozen."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TrainingStep:
    """One process's training state and stream of real batches, advanced one iteration per call:
    the public handle on the training loop for benchmarks and tests (`train` runs the same
    iterations)."""

    def __init__(self, opts: TrainOptions, env: Dist | None = None) -> None:
        self.opts, self.env = opts, Dist() if env is None else env
        self.state, _ = _build_state(opts, self.env, None)
        dataset = ImageDataset(opts.data, xflip=opts.mirror)
        self.reals = _real_batches(dataset, opts, self.env, start=0)
        self.stats = _StatsCollector()

    def __call__(self, *, batch_idx: int | None = None) -> None:
        """One iteration; `batch_idx` picks which lazy regularisers run (both when it is 0)."""
        if batch_idx is not None:
            self.state.batch_idx = batch_idx
        _iteration(self.opts, self.env, self.state, self.reals, self.stats)


def _phase(opt: torch.optim.Optimizer, module: torch.nn.Module, env: Dist, closures: list,
           stats: "_StatsCollector", name: str) -> None:
    """One optimizer step: accumulate the closures' losses, average gradients, check, step."""
    opt.zero_grad(set_to_none=True)
    for closure in closures:
        loss, value = closure()
        loss.backward()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the {name} loss became {value} at this step; training "
                                   f"stopped and the last good snapshot is kept — lower the "
                                   f"learning rates (--glr/--dlr) or raise --gamma")
        stats.add(name, value)
    _average_gradients(module, env)
    opt.step()


def _run_D(state: TrainState, images: torch.Tensor) -> torch.Tensor:
    if state.augment is not None:
        images = state.augment(images)
    return state.D(images, None)


def _generate(opts: TrainOptions, state: TrainState, env: Dist, n: int, *,
              update_emas: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    G = state.G
    z = torch.randn([n, G.z_dim], device=env.device)
    ws = G.mapping(z, None, update_emas=update_emas)  # [n, num_ws, w_dim]
    ws = losses.style_mixing_ws(lambda z2, c2: G.mapping(z2, c2, update_emas=False), ws,
                                torch.randn_like(z), None, opts.style_mixing)
    return G.synthesis(ws, noise_mode="random"), ws


def _loss_g_main(opts: TrainOptions, state: TrainState, env: Dist):
    fake, _ = _generate(opts, state, env, opts.batch_gpu)
    loss = losses.g_nonsaturating_loss(_run_D(state, fake))
    return loss, loss.item()


def _loss_g_pl(opts: TrainOptions, state: TrainState, env: Dist):
    n = max(opts.batch_gpu // opts.pl_batch_shrink, 1)
    fake, ws = _generate(opts, state, env, n)
    penalty, state.pl_mean = losses.path_length_penalty(fake, ws, state.pl_mean,
                                                        decay=opts.pl_decay)
    loss = penalty.mean() * opts.pl_weight * opts.pl_interval  # lazy: scale by the interval
    # Touch the image so that every G parameter takes part in the graph (as the official loss).
    loss = loss + fake[:, 0, 0, 0].sum() * 0
    return loss, penalty.mean().item()


def _loss_d_main(opts: TrainOptions, state: TrainState, env: Dist, real: torch.Tensor):
    with torch.no_grad():
        fake, _ = _generate(opts, state, env, real.shape[0], update_emas=True)
    real_logits = _run_D(state, real)
    fake_logits = _run_D(state, fake)
    if state.ada is not None:
        state.ada.update(_gather(real_logits.detach(), env))
    loss = losses.d_logistic_loss(real_logits, fake_logits)
    return loss, loss.item()


def _loss_d_r1(opts: TrainOptions, state: TrainState, real: torch.Tensor):
    real = real.detach().requires_grad_(True)
    penalty = losses.r1_penalty(_run_D(state, real), real)  # [N]
    loss = penalty.mean() * (opts.gamma / 2) * opts.r1_interval
    return loss, penalty.mean().item()


class TrainingDiverged(UserError):
    """A loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Building and resuming


def _build_state(opts: TrainOptions, env: Dist,
                 loaded: dict | None) -> tuple[TrainState, dict | None]:
    G = Generator(opts.generator).to(env.device)
    D = Discriminator(opts.discriminator).to(env.device)
    extra: dict[str, Any] = {}
    training_state = None
    if opts.resume is not None:
        loaded = loaded if loaded is not None else load_network(opts.resume)
        _copy_weights(loaded, G, D, opts)
        extra = (loaded.get("meta") or {}).get("extra") or {}
        state_path = _state_path(Path(opts.resume))
        if state_path.exists():
            training_state = load_training_state(state_path)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if loaded is not None and loaded.get("G_ema") is not None:
        G_ema.load_state_dict(loaded["G_ema"].state_dict())
    for layer in D.freezable_layers()[: opts.freezed]:
        layer.requires_grad_(False)
    opt_G = _adam(G, opts.glr, opts.pl_interval if opts.pl_weight > 0 else None)
    opt_D = _adam(D, opts.dlr, opts.r1_interval if opts.gamma > 0 else None)
    augment, ada = _augmentation(opts, env, extra)
    state = TrainState(G=G, D=D, G_ema=G_ema, opt_G=opt_G, opt_D=opt_D, augment=augment, ada=ada,
                       pl_mean=torch.zeros([], device=env.device))
    rng = None
    if training_state is not None:
        rng = _restore_training_state(state, training_state, env)
    return state, rng


def _adam(module: torch.nn.Module, lr: float, reg_interval: int | None) -> torch.optim.Adam:
    betas = (0.0, 0.99)
    if reg_interval is not None:
        lr, betas = losses.lazy_regularization_adjust(lr, betas, reg_interval)
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=1e-8)


def _augmentation(opts: TrainOptions, env: Dist, extra: dict) -> tuple[AugmentPipe | None,
                                                                        AdaController | None]:
    if opts.aug == "noaug":
        return None, None
    # As the official tools: ada starts from p = 0 (or the resumed snapshot's p); fixed uses --p.
    p = float(extra.get("augment_p", 0.0)) if opts.aug == "ada" else opts.p
    augment = AugmentPipe(AugmentConfig(), p=p).to(env.device)
    if opts.aug == "fixed":
        return augment, None
    ada = AdaController(opts.batch, target=opts.target, interval=opts.ada_interval,
                        kimg=opts.ada_kimg, p=p)
    return augment, ada


def _copy_weights(loaded: dict, G: Generator, D: Discriminator, opts: TrainOptions) -> None:
    """Copy every tensor by name; `resolve` made sure the architectures agree."""
    for name, module in (("G", G), ("D", D)):
        source = loaded.get(name)
        if source is None:
            if name == "G" and loaded.get("G_ema") is not None:
                source = loaded["G_ema"]
            else:
                raise UserError(f"{opts.resume} holds no {name} network to resume from")
        module.load_state_dict(source.state_dict(), strict=True)


def _state_path(network_path: Path) -> Path:
    return network_path.with_name(network_path.name.replace(".safetensors", ".state.pt"))


def _restore_training_state(state: TrainState, saved: dict, env: Dist) -> dict:
    state.opt_G.load_state_dict(saved["opt_G"])
    state.opt_D.load_state_dict(saved["opt_D"])
    state.pl_mean = saved["pl_mean"].to(env.device)
    state.cur_nimg = int(saved["cur_nimg"])
    state.batch_idx = int(saved["batch_idx"])
    if state.ada is not None and "ada" in saved:
        state.ada.load_state_dict(saved["ada"])
        state.augment.p.fill_(state.ada.p)
    return saved["rng"]


# ----------------------------------------------------------------------------------------------
# Snapshots


def _save_snapshot(opts: TrainOptions, state: TrainState, grid_z: torch.Tensor, run_dir: Path,
                   log: "_Logger") -> None:
    tag = kimg_tag(state.cur_nimg)
    stem = run_dir / f"{SNAPSHOT_PREFIX}{tag}"
    training_state = {
        "opt_G": state.opt_G.state_dict(), "opt_D": state.opt_D.state_dict(),
        "pl_mean": state.pl_mean.detach().cpu(), "cur_nimg": state.cur_nimg,
        "batch_idx": state.batch_idx, "rng": rng_state(),
    }
    if state.ada is not None:
        training_state["ada"] = state.ada.state_dict()
    # The state file goes first: a network file without its state is never the newest complete one.
    save_training_state(f"{stem}.state.pt", training_state)
    augment_p = float(state.augment.p) if state.augment is not None else 0.0
    save_networks(f"{stem}.safetensors", G=state.G, D=state.D, G_ema=state.G_ema,
                  extra={"kimg": state.cur_nimg / 1000, "cur_nimg": state.cur_nimg,
                         "augment_p": augment_p, "training_options": opts.to_json(),
                         "preprocessing": opts.preprocessing})
    _save_fakes(state.G_ema, grid_z, run_dir / f"fakes{tag}.png")
    log(f"snapshot {stem.name}.safetensors")


def kimg_tag(nimg: int) -> str:
    """'000012' for 12 kimg as the official tools name files; '000000.032' below whole kimg."""
    whole, rest = divmod(nimg, 1000)
    return f"{whole:06d}" if rest == 0 else f"{whole:06d}.{rest:03d}"


def find_latest_snapshot(outdir: str | Path) -> Path:
    """The newest complete snapshot (network + training state) below `outdir`."""
    candidates = [p for p in Path(outdir).glob(f"*/{SNAPSHOT_PREFIX}*.safetensors")
                  if _state_path(p).exists()]
    if not candidates:
        raise UserError(f"--resume latest found no snapshot in {outdir}; train first or name a "
                        f"snapshot file")
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name))


def _grid_latents(G: Generator, device: torch.device, n: int = 32) -> torch.Tensor:
    z = [np.random.RandomState(seed).randn(G.z_dim) for seed in range(n)]
    return torch.from_numpy(np.stack(z)).float().to(device)


@torch.no_grad()
def _save_fakes(G_ema: Generator, grid_z: torch.Tensor, path: Path) -> None:
    images = torch.cat([G_ema(z, None, noise_mode="const") for z in grid_z.split(8)])
    save_grid(to_uint8(images), path, cols=8)


def _save_reals_grid(dataset: ImageDataset, run_dir: Path, n: int = 32) -> None:
    images = np.stack([dataset[i][0] for i in range(min(n, len(dataset)))])  # [n, C, H, W]
    save_grid(images.transpose(0, 2, 3, 1), run_dir / "reals.png", cols=8)


# ----------------------------------------------------------------------------------------------
# Data, randomness, multi-process helpers


def _real_batches(dataset: ImageDataset, opts: TrainOptions, env: Dist, *,
                  start: int) -> Iterator[torch.Tensor]:
    """Endless float batches [batch_gpu, C, H, W] in [-1, 1] for this process."""
    sampler = EndlessSampler(len(dataset), rank=env.rank, world=env.world, seed=opts.seed,
                               start=start // env.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_gpu, sampler=sampler,
                                         num_workers=opts.workers, drop_last=True,
                                         pin_memory=env.device.type == "cuda",
                                         persistent_workers=opts.workers > 0)
    for images, _labels in loader:
        yield from_uint8(torch.as_tensor(images).to(env.device, non_blocking=True))


def _seed_everything(seed: int, rank: int) -> None:
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)






def _sync_replicas(state: TrainState, env: Dist) -> None:
    """Make every process start from rank 0's weights."""
    if env.world == 1:
        return
    for module in (state.G, state.D, state.G_ema):
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def _average_gradients(module: torch.nn.Module, env: Dist) -> None:
    if env.world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= env.world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def replica_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """A float64 [1] digest of all parameters and buffers (fixed random weights per element)."""
    flat = torch.cat([t.detach().flatten().double().cpu()
                      for t in list(module.parameters()) + list(module.buffers())])
    weights = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(1234),
                         dtype=torch.float64)
    return (flat * weights).sum().reshape(1)


def _check_replicas(state: TrainState, env: Dist, log: "_Logger") -> None:
    """Stop if the processes' networks have drifted apart (they must stay bit-identical)."""
    local = torch.cat([replica_fingerprint(m) for m in (state.G, state.D, state.G_ema)])
    parts = [torch.empty_like(local) for _ in range(env.world)]
    dist.all_gather(parts, local)
    if not all(torch.equal(parts[0], p) for p in parts[1:]):
        raise RuntimeError("training processes hold different weights; this is a bug in the "
                           "gradient averaging, please report it")
    log(f"replicas identical across {env.world} processes")


def _average_w_avg(G: Generator, env: Dist) -> None:
    # The EMA update is linear, so averaging the processes' results equals one update with the
    # mean over the whole batch.
    if env.world > 1:
        dist.all_reduce(G.mapping.w_avg)
        G.mapping.w_avg /= env.world


def _gather(x: torch.Tensor, env: Dist) -> torch.Tensor:
    if env.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Run folder, logging, stats


def _make_run_dir(opts: TrainOptions) -> Path:
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ids = [int(p.name.split("-")[0]) for p in outdir.iterdir()
           if p.is_dir() and p.name.split("-")[0].isdigit()]
    data_name = Path(opts.data).stem
    desc = f"{data_name}-{opts.cfg}-gpus{opts.gpus}-batch{opts.batch}-gamma{opts.gamma:g}"
    run_dir = outdir / f"{max(ids, default=-1) + 1:05d}-{desc}"
    run_dir.mkdir()
    atomic_write_json(run_dir / "training_options.json", opts.to_json())
    return run_dir


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Logger(RunLog):
    """The shared run log (console + log.txt + stats.jsonl), plus TensorBoard when installed."""

    def __init__(self, run_dir: Path | None):
        super().__init__(run_dir)
        self.tb = _tensorboard(run_dir) if run_dir is not None else None

    def tick(self, record: dict) -> None:
        self.stats(record)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "kimg":
                    self.tb.add_scalar(key, value, global_step=int(record["kimg"] * 1000))
            self.tb.flush()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir))


class _StatsCollector:
    """Averages of the phase losses over one tick."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def summary(self, state: TrainState, sec_per_kimg: float, env: Dist) -> dict:
        names = {"G": "loss_G", "Gpl": "pl_penalty", "D": "loss_D", "Dr1": "r1_penalty"}
        record: dict[str, Any] = {"kimg": round(state.cur_nimg / 1000, 3),
                                  "sec_per_kimg": round(sec_per_kimg, 3)}
        for key, label in names.items():
            if self.values.get(key):
                record[label] = float(np.mean(self.values[key]))
        record["augment_p"] = float(state.augment.p) if state.augment is not None else 0.0
        if state.ada is not None and state.ada.r_t is not None:
            record["ada_r_t"] = float(state.ada.r_t)
        record["pl_mean"] = float(state.pl_mean)
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if env.device.type == "cuda":
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
        record["timestamp"] = time.time()
        self.values.clear()
        return record
