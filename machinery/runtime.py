"""Where and how a run executes: devices and processes, precision, state across ranks, the order of the data.

  devices        setup_device (cuda > mps > cpu; torchrun: NCCL on GPUs, gloo on CPUs), DeviceEnv, print0
  precision      amp_dtype, autocast_for: bf16/fp16 autocast on CUDA only, fp32 elsewhere
  across ranks   sync_buffers, average_gradients, rng_states / restore_rng (every rank's dropout stream)
  data order     EpochSeeded, epoch_batches: which samples, augmented how, a rank sees at a step, a pure function of
                 (seed, epoch, rank), so a resumed run sees the same; shard_loader (evaluation), to_device
"""

import contextlib
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

import data
from machinery.flags import UsageError

# -----------------------------------------------------------------------------
# devices and processes


@dataclass(frozen=True)
class DeviceEnv:
    device: torch.device
    ddp: bool  # launched by torchrun: a process group is up
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def device_rule(device: str) -> tuple[str, bool, str]:
    """--device's rule for every script's config (check_fields, when the flags are read): a kind of device torch
    knows, which would otherwise be a RuntimeError with a traceback. Whether this machine has it: check_device."""
    return "device", device.split(":")[0] in ("auto", "cpu", "cuda", "mps"), "auto, cpu, cuda or mps"


def check_device(device: str, local_rank: int = 0) -> None:
    """--device names one this machine has (torch's own error would come later, as a traceback about drivers)."""
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); pass --device cpu (or auto)")
    if kind == "cuda" and local_rank >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: process {local_rank} of this node needs GPU {local_rank}, but the "
                         f"machine has {torch.cuda.device_count()}; start at most that many (--nproc_per_node)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple's MPS is not available on this machine; pass --device cpu "
                         f"(or auto)")


def setup_device(device: str = "auto") -> DeviceEnv:
    """Pick the device (cuda > mps > cpu unless told; one this machine lacks is a UsageError) and, under torchrun,
    join the process group: NCCL on CUDA, gloo on CPU (so a 2-process CPU run works on a laptop)."""
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    check_device(device, local_rank)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DeviceEnv(dev, ddp, rank, local_rank, world)


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# precision

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_NAMES = ("auto", *DTYPES, *DTYPE_ALIASES)  # what --dtype accepts (a config's CHOICES)


def amp_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None = fp32) for --dtype auto|float32|bfloat16|float16 (or fp32|bf16|fp16): autocast on
    CUDA only; auto = bf16 on GPUs that support it natively (Ampere and later), fp32 elsewhere."""
    name = DTYPE_ALIASES.get(dtype, dtype)  # one of DTYPE_NAMES: the configs check --dtype when they read it
    if device.type != "cuda":
        if name in ("bfloat16", "float16"):
            raise UsageError(f"--dtype {dtype} needs CUDA: on {device.type} everything runs in float32")
        return None
    if name == "auto":
        # not torch's default including_emulation=True: it says yes on V100 and T4 too, where bf16 is emulated, slowly
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    return DTYPES[name]


def autocast_for(device: torch.device, dtype: str = "auto"):
    """The autocast context for amp_dtype(device, dtype), or a no-op. Losses and box maths stay fp32 regardless."""
    amp = amp_dtype(device, dtype)
    return torch.autocast("cuda", amp) if amp is not None else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# state across processes and restarts


def sync_buffers(model: torch.nn.Module, env: DeviceEnv) -> None:
    """Rank 0's buffers (BatchNorm statistics with trainable_bn) on every rank, as DDP broadcasts them before each
    training forward: evaluation and checkpoints then see one model, whichever rank runs them."""
    if env.ddp:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def average_gradients(params, world_size: int) -> None:
    """All-reduce the gradients of parameters DDP does not manage, as one flat buffer (one collective, not one
    per tensor), and divide by the world size, as DDP does for the model it wraps."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def rng_states(env: DeviceEnv) -> dict[str, list[torch.Tensor]]:
    """Every rank's torch RNG state, CPU and (where dropout runs on it) CUDA, gathered on all ranks."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}
    states = [state]
    if env.ddp:
        states = [None] * env.world_size
        dist.all_gather_object(states, state)
    return {"cpu": [s["cpu"] for s in states], "cuda": [s["cuda"] for s in states if s["cuda"] is not None]}


def restore_rng(rng: dict[str, list[torch.Tensor]], env: DeviceEnv) -> None:
    """This rank's streams from rng_states (a run resumed on another number of ranks cycles through them)."""
    torch.set_rng_state(rng["cpu"][env.rank % len(rng["cpu"])])
    if env.device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][env.rank % len(rng["cuda"])])


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """A collated batch on the device: its tensors, and those inside tuples (a cached visual branch's outputs, a
    teacher's targets), moved; the canvases in channels_last memory format if asked (--channels_last)."""
    def move(v):
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    batch = {k: move(v) for k, v in batch.items()}
    if channels_last and batch.get("image") is not None:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


# -----------------------------------------------------------------------------
# data order: a pure function of (seed, epoch, rank), so a resumed run sees exactly the same samples


class EpochSeeded(Dataset):
    """Makes each sample's augmentation a function of (seed, epoch, index) instead of the worker and the order in
    which samples are drawn: resuming mid-epoch, or changing num_workers, replays the very same crops and flips."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if not getattr(self.dataset, "train", True):  # unaugmented samples draw no random number: nothing to seed
            return self.dataset[i]  # (seeding costs ~60 us a sample, 6 % of a laptop step on cached tokens)
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**62
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator, the one transforms use
            torch.default_generator.manual_seed(sample_seed)  # not torch.manual_seed: it would reseed CUDA's too
            random.seed(sample_seed)
            try:
                return self.dataset[i]
            finally:
                random.setstate(state)


def epoch_indices(n: int, epoch: int, seed: int, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """This rank's sample indices for an epoch: one shuffle shared by all ranks (drop_last), each global batch
    split into world_size contiguous slices. Shape (steps_per_epoch * batch_size / world,)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    steps = n // batch_size
    return perm[: steps * batch_size].view(steps, world, -1)[:, rank].reshape(-1)


def epoch_batches(train_set: EpochSeeded, step: int, steps_per_epoch: int, cfg, env: DeviceEnv):
    """An iterator over this rank's micro-batches from optimizer step `step` to the end of its epoch (cfg: the
    TrainConfig's seed, batch_size, micro_batch and num_workers)."""
    epoch = step // steps_per_epoch
    train_set.epoch = epoch
    order = epoch_indices(len(train_set), epoch, cfg.seed, env.rank, env.world_size, cfg.batch_size)
    order = order[(step % steps_per_epoch) * cfg.batch_size // env.world_size:]  # skip what a resume has done
    # its own generator: a DataLoader otherwise draws its worker seed from the global RNG (dropout's stream)
    return iter(DataLoader(train_set, batch_size=cfg.micro_batch, sampler=order.tolist(), collate_fn=data.collate,
                           num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda", drop_last=True,
                           generator=torch.Generator()))


def shard_loader(dataset: torch.utils.data.Dataset, device: torch.device, batch_size: int, num_workers: int
                 ) -> DataLoader:
    """This rank's share of dataset, in order: indices rank, rank + W, ... (no padding, unlike DistributedSampler)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world))
    # its own generator: otherwise the loader draws a seed from the global RNG and shifts training's dropout stream
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=data.collate,
                      pin_memory=device.type == "cuda", generator=torch.Generator())
