"""Train LLaVA on packed sequences: ``torchrun --nproc_per_node N train/train.py --packing True ...``.

LLaVA's arguments carry over (``--model_name_or_path --version --data_path --image_folder --vision_tower
--tune_mm_mlp_adapter --lora_enable --deepspeed --bf16 ...``, see ``train/args.py``); ``--packing True
--packing_max_tokens 4096`` packs samples best-fit-decreasing into micro-batches of at most that many tokens.

    # stage 1 (projector only) from a plain LM and a CLIP tower
    torchrun --nproc_per_node 8 train/train.py --model_name_or_path lmsys/vicuna-7b-v1.5-local \\
        --vision_tower clip-vit-large-patch14-336-local --version plain --tune_mm_mlp_adapter True \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images --packing True --bf16 True \\
        --output_dir checkpoints/stage1 --learning_rate 1e-3 --deepspeed train/configs/zero2.json

The loop, per optimizer step: take this rank's micro-batches of the global step (the sampler plans
``world_size * gradient_accumulation_steps`` of them), all-reduce their target count, and backpropagate each
micro-batch's *summed* CE divided by the global count -- so the step optimises the mean over every target token
of the global batch, whatever the packing or the split over ranks. The strategy (``train/strategy.py``: one
process, torch DDP, FSDP2 or DeepSpeed) reduces the gradients over ranks and clips; then check loss and grad norm
are finite (skip or stop), step, log ``{'loss': ...}``, checkpoint atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # `torchrun train/train.py` puts train/ itself on sys.path: import our modules through the installed
    # `fastllava.train` package (or the checkout's root) instead.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fastllava.data.dataset import SupervisedDataset, TrainBatch, collate  # noqa: E402
from fastllava.data.sampler import MicroBatchSampler  # noqa: E402
from fastllava.packing import pack  # noqa: E402
from fastllava.train import checkpointing as ckpt  # noqa: E402
from fastllava.train import modeling  # noqa: E402
from fastllava.train.args import parse_args  # noqa: E402
from fastllava.train.strategy import Local, TrainModule, all_reduce_sum, init_distributed, make_strategy  # noqa: E402

log = logging.getLogger("fastllava.train")


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (HF's grouping); the projector at ``--mm_projector_lr``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        proj = modeling.is_projector_param(name) and args.mm_projector_lr is not None
        groups.setdefault((decay, proj), []).append(p)
    param_groups = [
        {
            "params": ps,
            "weight_decay": args.weight_decay if decay else 0.0,
            "lr": args.mm_projector_lr if proj else args.learning_rate,
        }
        for (decay, proj), ps in sorted(groups.items())
    ]
    if not param_groups:
        raise SystemExit("nothing to train: every parameter is frozen (check the freeze / tune flags)")
    return torch.optim.AdamW(
        param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def build_scheduler(optimizer, args, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler(--lr_scheduler_type)`` with ``--warmup_steps`` (else ``--warmup_ratio`` of the
    steps) of linear warmup, as HF's Trainer builds it."""
    from transformers import SchedulerType, get_scheduler

    kinds = [k.value for k in SchedulerType]
    if args.lr_scheduler_type not in kinds:
        raise SystemExit(f"--lr_scheduler_type {args.lr_scheduler_type!r}: one of {', '.join(kinds)}")
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class Reporter:
    """``{'loss': ...}`` lines (HF Trainer's format), ``log_history.jsonl``, tensorboard / wandb."""

    def __init__(self, args, out_dir: Path, rank: int, run_config: dict) -> None:
        self.rank, self.out_dir = rank, out_dir
        targets = {"all": {"tensorboard", "wandb"}, "none": set()}.get(args.report_to, set(args.report_to.split(",")))
        self.tb = self.wandb = None
        if rank != 0:
            return
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("--report_to tensorboard needs tensorboard: pip install tensorboard") from exc
            self.tb = SummaryWriter(args.logging_dir or str(out_dir / "runs"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("--report_to wandb needs wandb: pip install wandb") from exc
            self.wandb = wandb.init(name=args.run_name, config=run_config)

    def log(self, record: dict, step: int, echo) -> None:
        if self.rank != 0:
            return
        echo(str({k: (round(v, 4) if isinstance(v, float) and k != "learning_rate" else v) for k, v in record.items()}))
        with open(self.out_dir / "log_history.jsonl", "a") as f:
            f.write(json.dumps({**record, "step": step}) + "\n")
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(out_dir: Path) -> None:
    """``loss_curve.png`` from ``log_history.jsonl`` (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no loss_curve.png (pip install matplotlib)")
        return
    path = out_dir / "log_history.jsonl"
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


class Window:
    """Losses and tokens since the last log line (its record is HF Trainer's ``{'loss': ...}``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.t0 = 0, time.perf_counter()

    def record(self, grad_norm: float, lr: float, epoch: float) -> dict:
        """The log record of the window (collective: tokens are summed over ranks); starts a new window."""
        dt = time.perf_counter() - self.t0
        tokens = float(all_reduce_sum(torch.tensor([float(self.tokens)]))[0])
        record = {
            "loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "epoch": round(epoch, 4),
            "tokens_per_s": round(tokens / max(dt, 1e-9), 1),
        }
        self.__init__()
        return record


def setup_device(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under ``torchrun``."""
    use_cuda = torch.cuda.is_available() and not (args.no_cuda or args.use_cpu)
    rank, world, local_rank = init_distributed(args.ddp_backend, "cuda" if use_cuda else "cpu")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    return rank, world, device


def build_data(model_args, data_args, args, tokenizer, model, processor, world: int):
    """The dataset, the micro-batch sampler, the steps of each epoch and the total optimizer steps."""
    budget = args.packing_max_tokens if args.packing else args.model_max_length
    ds = SupervisedDataset(
        data_args.data_path,
        tokenizer,
        model.config,
        image_folder=data_args.image_folder,
        image_processor=processor,
        template=model_args.version,
        max_tokens=min(budget, args.model_max_length),
        on_bad_sample=data_args.on_bad_sample,
        image_aspect_ratio=data_args.image_aspect_ratio,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
    )
    per_step = world * args.gradient_accumulation_steps
    sampler = MicroBatchSampler(
        ds.lengths,
        ds.is_multimodal,
        ds.indices,
        micro_batches_per_step=per_step,
        token_budget=args.packing_max_tokens if args.packing else None,
        batch_size=args.per_device_train_batch_size,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        group_by_modality=args.group_by_modality_length or args.packing,
        window=args.packing_window,
        strategy=args.packing_strategy,
    )
    steps_in_epoch = [sampler.steps_per_epoch(0)]
    if steps_in_epoch[0] == 0:
        raise SystemExit(f"not one full optimizer step of data: {per_step} micro-batches needed per step")
    if args.max_steps > 0:
        return ds, sampler, steps_in_epoch, args.max_steps
    n_epochs = math.ceil(args.num_train_epochs)
    steps_in_epoch = [sampler.steps_per_epoch(e) for e in range(n_epochs)]
    frac = args.num_train_epochs - (n_epochs - 1)
    return ds, sampler, steps_in_epoch, sum(steps_in_epoch[:-1]) + math.ceil(frac * steps_in_epoch[-1])


def epoch_steps(ds, sampler, state: dict, rank: int, world: int, args, config, pad_id: int):
    """This rank's micro-batches (``TrainBatch``, or ``None`` when none of its samples is left) of each remaining
    optimizer step of the current epoch, ``--gradient_accumulation_steps`` at a time."""
    plan = [mbs[rank::world] for _, mbs in sampler.steps(state["epoch"], state["step_in_epoch"])]
    loader = torch.utils.data.DataLoader(
        [mb for step_mbs in plan for mb in step_mbs],
        batch_size=None,
        shuffle=False,
        num_workers=args.dataloader_num_workers,
        collate_fn=lambda mb: collate(
            [ds[i] for i in mb],
            config,
            pad_to=max(ds.lengths[i] for i in mb) if not args.packing else None,
            pad_id=pad_id,
        ),
    )
    it = iter(loader)
    for _ in plan:
        yield [next(it) for _ in range(args.gradient_accumulation_steps)]


def idle_batch(config, pad_id: int) -> TrainBatch:
    """One pad token, no target: what a rank runs for a micro-batch it has nothing in, so that every rank runs
    the same forwards and backwards (the engines' collectives pair up); it adds zero to every gradient."""
    rows = torch.zeros(0, dtype=torch.long)
    return TrainBatch(pack([[pad_id]], [[]], config), rows, rows, n_targets=0, n_tokens=0, sample_indices=[])


def train_step(strat: Local, module, batches: list, idle: TrainBatch, device, autocast, max_grad_norm: float):
    """Forward and backward of this rank's micro-batches of one optimizer step; (mean loss over every target of
    the global batch, grad norm before clipping, tokens run here). Each micro-batch backpropagates its summed CE
    divided by the global target count, so the step optimises the mean whatever the packing or the ranks."""
    n_global = float(
        all_reduce_sum(torch.tensor([sum(b.n_targets for b in batches if b is not None)], dtype=torch.float64))[0]
    )
    scale = strat.grad_scale / max(n_global, 1.0)
    real = [b if b is not None and b.n_targets > 0 else None for b in batches]
    run = [b or idle for b in real] if strat.lockstep else [b for b in real if b is not None]
    loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
    for i, b in enumerate(run):
        with autocast:
            s = module(b.packed.to(device), b.target_rows.to(device), b.targets.to(device))
        loss_sum += s.detach().double().cpu()
        strat.backward(s * scale, last=i == len(run) - 1)
        tokens += b.n_tokens
    loss = float(all_reduce_sum(loss_sum)) / max(n_global, 1.0)
    return loss, strat.clip(max_grad_norm), tokens


def save(out_dir: Path, strat: Local, state: dict, rank: int, args) -> None:
    """Checkpoint ``checkpoint-<global_step>`` (collective under the sharding strategies)."""
    opt_sd, rank_extra = strat.optimizer_state()
    ckpt.save_checkpoint(
        out_dir,
        state["global_step"],
        strat.trainable_state(),
        opt_sd,
        strat.scheduler.state_dict(),
        state,
        rank,
        args.save_total_limit,
        rank_extra,
    )


def resume(out_dir: Path, strat: Local, rank: int, args) -> dict:
    """The trainer state to start from: a fresh one, or the checkpoint's (weights, optimizer, schedule, RNGs
    and the log as it was put back)."""
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "log_history": [], "nonfinite_skipped": 0}
    path = ckpt.resolve_resume(out_dir, args.resume_from_checkpoint)
    if path is None:
        return state
    loaded = ckpt.load_checkpoint(path, rank)
    missing = [n for n, p in strat.model.named_parameters() if p.requires_grad and n not in loaded["trainable"]]
    if missing:
        raise SystemExit(f"{path} lacks trainable weights {missing[:4]}: was it written by another setup?")
    strat.load_state(loaded)
    strat.scheduler.load_state_dict(loaded["scheduler"])
    ckpt.set_rng_state(loaded["rank_state"]["rng"])
    if rank == 0:
        log.info("resumed from %s at step %d", path, loaded["trainer_state"]["global_step"])
    with open(out_dir / "log_history.jsonl", "w") as f:  # the log as it was at the checkpoint
        f.writelines(json.dumps(r) + "\n" for r in loaded["trainer_state"]["log_history"])
    return loaded["trainer_state"]


def on_nonfinite(loss: float, grad_norm: float, out_dir: Path, strat: Local, state: dict, rank: int, args) -> None:
    """A step whose global loss or grad norm is not finite: count it, then skip it, or save and stop."""
    state["nonfinite_skipped"] = state.get("nonfinite_skipped", 0) + 1
    state["nonfinite_in_a_row"] = state.get("nonfinite_in_a_row", 0) + 1
    msg = f"step {state['global_step'] + 1}: non-finite loss {loss} / grad norm {grad_norm}"
    if args.on_nonfinite == "stop" or state["nonfinite_in_a_row"] >= args.max_nonfinite_steps:
        save(out_dir, strat, state, rank, args)
        raise SystemExit(msg + " -- stopping (state saved)")
    log.warning(msg + strat.nonfinite_note)
    strat.skip()


def write_outputs(out_dir: Path, strat: Local, ds, tokenizer, processor, run_args: dict, args, model_args) -> None:
    """Rank 0 writes the final model (llava-hf layout), the LoRA adapter / projector, the run's arguments, the
    data report and the loss curve. Collective first: a sharded model is gathered onto rank 0."""
    strat.gather_full_model()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    model = strat.model.to("cpu").float()
    if args.lora_enable:
        modeling.save_lora_adapter(model, out_dir / "adapter", run_args)
        modeling.merged_model(model)
    if model_args.tune_mm_mlp_adapter:
        modeling.save_projector(model, out_dir / "mm_projector.safetensors")
    modeling.save_final(model, out_dir, tokenizer, processor)
    (out_dir / "training_args.json").write_text(json.dumps(run_args, indent=2, default=str))
    (out_dir / "data_report.json").write_text(
        json.dumps({"bad": ds.report.counts, "runtime_bad": dict(ds.runtime_bad), **{"n_total": ds.report.n_total}})
    )
    plot_loss_curve(out_dir)
    log.info("saved %s", out_dir)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_args, data_args, args = parse_args(argv)
    rank, world, device = setup_device(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ model, data, strategy
    tokenizer, model, processor = modeling.build_model(model_args, data_args, args)
    modeling.configure_trainable(model, model_args, args)
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    ds, sampler, steps_in_epoch, total_steps = build_data(
        model_args, data_args, args, tokenizer, model, processor, world
    )
    if rank == 0:
        log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
        log.info("data: %s", ds.report.summary())
    strat = make_strategy(args, world, device, model.config.text.hidden_size)
    module = strat.wrap(
        TrainModule(model, args.loss_chunk_size, args.loss_impl),
        lambda m: build_optimizer(m, args),
        lambda opt: build_scheduler(opt, args, total_steps),
    )
    state = resume(out_dir, strat, rank, args)
    run_args = modeling.run_args_dict(model_args, data_args, args)
    reporter = Reporter(args, out_dir, rank, run_args)
    save_every = int(args.save_steps) if args.save_steps >= 1 else max(1, int(args.save_steps * total_steps))
    log_every = int(args.logging_steps) if args.logging_steps >= 1 else max(1, int(args.logging_steps * total_steps))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and strat.autocast_ok)
    pad_id = tokenizer.pad_token_id or 0
    idle = idle_batch(model.config, pad_id)
    bar = tqdm(
        total=total_steps, initial=state["global_step"], disable=args.disable_tqdm or rank != 0, dynamic_ncols=True
    )
    window = Window()
    module.train()

    # ------------------------------------------------------------------ the loop
    while state["global_step"] < total_steps:
        for batches in epoch_steps(ds, sampler, state, rank, world, args, model.config, pad_id):
            loss, grad_norm, tokens = train_step(strat, module, batches, idle, device, autocast, args.max_grad_norm)
            if math.isfinite(loss) and math.isfinite(grad_norm):
                strat.step()
                state["nonfinite_in_a_row"] = 0
                window.losses.append(loss)
            else:
                on_nonfinite(loss, grad_norm, out_dir, strat, state, rank, args)
            window.tokens += tokens
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            bar.update(1)
            if state["global_step"] % log_every == 0 or state["global_step"] == total_steps:
                in_epoch = steps_in_epoch[min(state["epoch"], len(steps_in_epoch) - 1)]
                epoch = state["epoch"] + state["step_in_epoch"] / max(in_epoch, 1)
                record = window.record(grad_norm, strat.scheduler.get_last_lr()[0], epoch)
                state["log_history"].append({**record, "step": state["global_step"]})
                reporter.log(record, state["global_step"], bar.write)
            if args.save_strategy == "steps" and state["global_step"] % save_every == 0:
                save(out_dir, strat, state, rank, args)
            if state["global_step"] == args.halt_after_step:
                bar.write(f"halting after step {state['global_step']} (--halt_after_step)")
                sys.stdout.flush()
                os._exit(3)
            if state["global_step"] >= total_steps:
                break
        else:  # the epoch ran out
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if args.save_strategy == "epoch":
                save(out_dir, strat, state, rank, args)
    bar.close()

    # ------------------------------------------------------------------ outputs
    write_outputs(out_dir, strat, ds, tokenizer, processor, run_args, args, model_args)
    reporter.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
