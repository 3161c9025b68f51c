"""The training loop: the stages of a recipe on a DeepSpeed engine (ZeRO 0-3, CPU or GPU).

Per stage, ``run_stage`` = start / loop / finish:
- start: build the model (fresh, from the previous stage, or from a model directory), apply the stage's freeze
  policy, wrap it with the REPA projector (janusflow.train.losses), make the engine (janusflow.train.optim,
  janusflow.train.distributed), the EMA and the data stream, and resume from the last checkpoint if any;
- loop: each optimizer step consumes one deterministic global batch, updates the EMA, logs, and now and then
  draws a sample grid (through the sampling pipeline), calls the evaluation hook and writes a checkpoint;
- finish: the stage's final weights and EMA, written atomically (``final_ema`` marks the stage complete).

    Trainer(load_recipe("2to8")).run()                  # every stage, then runs/2to8/export
    Trainer(recipe, evaluate=hook).run()                # hook(trainer, stage_index, step, ema_model) -> metrics
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from janusflow.config import Recipe, StageConfig, to_dict
from janusflow.data.mixture import Batch, MixtureStream
from janusflow.export import export_model
from janusflow.imaging import save_labelled_grid
from janusflow.io import write_dir_atomic
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.train import data_setup, stage_init
from janusflow.train.checkpoint import CheckpointManager, ResumeError, rng_state, set_rng_state
from janusflow.train.distributed import (
    EnginePolicy,
    barrier,
    free_memory,
    full_state_dict,
    gather_floats,
    init_distributed,
    num_parameters,
    peak_memory_gb,
    rank0_first,
    release_engine,
)
from janusflow.train.logging import RunLogger, print0
from janusflow.train.losses import TrainModule
from janusflow.train.optim import EMA, apply_speed_options, build_optimizer, clip_gradients
from janusflow.train.stages import apply_freeze_policy

__all__ = ["EvalHook", "NonFiniteError", "ResumeError", "StageResult", "Trainer"]

EvalHook = Callable[["Trainer", int, int, JanusFlow], "dict[str, float] | None"]
"""``hook(trainer, stage_index, step, ema_model)`` at every sample point (and at step 0 of a fresh stage):
metrics to log as ``eval/*``, or None."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients it cannot recover from."""


@dataclasses.dataclass
class StageResult:
    name: str
    dir: Path
    steps: int
    last_metrics: dict


@dataclasses.dataclass
class StageRun:
    """The live state of one stage: what its loop reads and updates."""

    index: int
    stage: StageConfig
    dir: Path
    engine: object
    ema: EMA
    trainable: list[str]
    stream: MixtureStream
    ckpt: CheckpointManager
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_dir: Path | None
    """The folder the stage started from (the REPA projector beside it is carried on when this stage has none)."""
    start: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    bad_streak: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)


class Trainer:
    def __init__(self, recipe: Recipe, resume: str = "auto", group: str | None = None, run_name: str | None = None,
                 stop_after_steps: int | None = None, evaluate: EvalHook | None = None):
        self.recipe, self.resume, self.evaluate = recipe, resume, evaluate
        self.steps_left = stop_after_steps  # optimizer steps this invocation may run (time-limited jobs)
        self.run_dir = recipe.resolved_run_dir
        self.rank, self.world, self.device = init_distributed()
        want = recipe.train.dtype
        on_gpu = self.device.type == "cuda"
        self.dtype = (torch.bfloat16 if on_gpu else torch.float32) if want == "auto" else getattr(torch, want)
        self.group, self.run_name = group, run_name or recipe.name
        self.skipped_steps = 0

    # -------------------------------------------------------------- set-up

    def setup(self) -> None:
        from janusflow.train.prep import prepare, run_tokenizer

        r = self.recipe
        stage_init.check_paths(r)
        stage_init.check_run_dir(r, self.resume, self.rank == 0)
        self.policy = EnginePolicy.of(r.train, self.world, self.dtype)
        self.prep = rank0_first(lambda: prepare(r, print0 if self.rank == 0 else lambda *_: None))
        self.tokenizer = run_tokenizer(r, self.prep["tokenizer_path"])
        torch.manual_seed(r.train.seed)  # an untrained codec (tests) must be the same on every rank
        codec_cfg = dataclasses.replace(r.codec, path=self.prep["codec_path"])
        self.codec = LatentCodec.from_config(codec_cfg).to(self.device)
        self.data = data_setup.RunData(r, self.prep.get("data_dir"), self.codec, self.prep["codec_path"])
        self.data.latents(0)  # build the first stage's caches before any stage starts
        self.logger = RunLogger(self.run_dir, r.logging, to_dict(r), enabled=self.rank == 0,
                                run_name=self.run_name, group=self.group)
        if self.rank == 0:
            (self.run_dir / "recipe.json").write_text(json.dumps(to_dict(r), indent=2))

    def build_model(self, index: int, stage: StageConfig) -> tuple[JanusFlow, JanusFlow | None]:
        """The stage's starting weights, and the EMA weights to continue from (or None)."""
        return stage_init.starting_model(self.recipe, index, self.stage_dir, self.prep)

    def stage_dir(self, index: int) -> Path:
        return self.run_dir / "stages" / f"{index + 1}-{self.recipe.stages[index].name}"

    def global_step_offset(self, index: int) -> int:
        return sum(s.max_steps for s in self.recipe.stages[:index])

    # -------------------------------------------------------------- the run

    def run(self) -> list[StageResult]:
        self.setup()
        results = []
        for i, stage in enumerate(self.recipe.stages):
            results.append(self.run_stage(i, stage))
            if self.steps_left == 0:
                print0(f"stopped after the requested number of steps; resume with --resume auto ({self.run_dir})")
                self.logger.finish()
                return results
        if self.rank == 0:
            model = JanusFlow.from_pretrained(self.stage_dir(len(self.recipe.stages) - 1) / "final_ema")
            out = write_dir_atomic(self.run_dir / "export", lambda d: export_model(
                d, model, self.codec.cpu(), self.tokenizer, self.recipe.data.und_system_prompt))
            self.codec.to(self.device)
            print0(f"exported the EMA model to {out}")
        barrier()
        self.logger.finish()
        return results

    def run_stage(self, index: int, stage: StageConfig) -> StageResult:
        sdir = self.stage_dir(index)
        if (sdir / "final_ema" / "model.safetensors").exists():
            print0(f"stage {stage.name}: already complete ({sdir}), skipping")
            return StageResult(stage.name, sdir, stage.max_steps, {})
        result = self._train_stage(index, stage)
        free_memory()  # the stage's engine, optimizer and EMA, now unreferenced, before the next stage builds its own
        return result

    def _train_stage(self, index: int, stage: StageConfig) -> StageResult:
        run = self._start_stage(index, stage)
        stop = stage.max_steps if self.steps_left is None else min(stage.max_steps, run.start + self.steps_left)
        self._loop(run, stop)
        if stop < stage.max_steps:
            return StageResult(stage.name, run.dir, stop, run.metrics)
        self._finish_stage(run)
        release_engine(run.engine)
        return StageResult(stage.name, run.dir, stage.max_steps, run.metrics)

    def _start_stage(self, index: int, stage: StageConfig) -> StageRun:
        import deepspeed

        r = self.recipe
        model, ema_init = self.build_model(index, stage)
        trainable = apply_freeze_policy(model, stage.policy)
        repa_weight = r.train.repa.weight if stage.repa_weight is None else stage.repa_weight
        repa_targets = self.data.repa_targets(index, model, self.device) if repa_weight > 0 else None
        torch.manual_seed(stage_init.stage_seed(r.train.seed, index))  # a fresh projector: from (seed, stage) alone
        module = TrainModule(model, repa_weight, r.train.repa.layer, r.train.repa.hidden_dim,
                             repa_cached=repa_targets is not None)
        start_dir = stage_init.start_directory(r, index, self.stage_dir)
        if module.projector is not None and not stage_init.load_projector(module.projector, start_dir):
            print0(f"stage {stage.name}: a fresh REPA projector (none beside the start weights)")
        ema = EMA(model, r.train.ema_decay) if ema_init is None else EMA(ema_init, r.train.ema_decay, own=True)
        ema.model.to(self.device)
        apply_speed_options(model, r.train.activation_checkpointing, r.train.compile)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(params, stage, r.train, self.device)
        ds_config = self.policy.engine_config(stage, self.world, r.train.grad_clip, self.dtype == torch.bfloat16)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        if self.policy.zero_stage == 3:
            # A parameter of JanusFlow itself (whose forward is never called): gather it for ours.
            deepspeed.zero.register_external_parameter(engine.module, model.beg_of_und_embed)
        ckpt = CheckpointManager(self.stage_dir(index) / "checkpoints", keep=r.train.keep_checkpoints)
        ckpt.clean_incomplete()
        stream = self.data.stream(index, self.tokenizer, repa_targets, repa=repa_weight > 0)
        run = StageRun(index, stage, self.stage_dir(index), engine, ema, trainable, stream, ckpt, scheduler, start_dir)
        self._resume(run)
        print0(f"stage {stage.name}: {len(trainable)} trainable tensors ({num_parameters(params) / 1e6:.2f}M "
               f"parameters), {stage.max_steps} steps, batch {stage.batch_size}, REPA weight {repa_weight}, world "
               f"{self.world}, ZeRO stage {self.policy.zero_stage}, {self.dtype}")
        return run

    def _resume(self, run: StageRun) -> None:
        tag = run.ckpt.latest() if self.resume != "none" else None
        if tag is not None:
            module_only = run.ckpt.check_resumable(tag, run.ema.model, self.world, self.policy.zero_stage,
                                                   self.resume)
            state = run.ckpt.load(run.engine, tag, module_only=module_only)
            run.start = state["step"]
            set_rng_state(state["rng"])
            run.stream.stats.update(state.get("data_stats", {}))
            run.ema.model.load_state_dict(state["ema"])
            print0(f"stage {run.stage.name}: resumed from {run.ckpt.root / tag} at step {run.start}")
        # Rows a killed run logged past its last checkpoint (all of this stage's when it starts afresh).
        self.logger.truncate_after(run.stage.name, run.start if run.start else -1)
        if run.start == 0 and self.evaluate is not None:
            self._evaluate(run, 0)

    def _loop(self, run: StageRun, stop: int) -> None:
        r, stage = self.recipe, run.stage
        self.logger.start_bar(stage.name, run.start, stage.max_steps)
        batches = run.stream.batches(run.start, stop, stage.batch_size, stage.micro_batch_size, self.rank,
                                     self.world, num_workers=r.data.num_workers, pin_memory=self.device.type == "cuda")
        for step in range(run.start, stop):
            t0 = time.time()
            lr = run.scheduler.get_last_lr()[0]  # this step's (the scheduler steps inside the engine's step)
            run.engine.module.repa_projector_only = step < stage.repa_warmup_steps
            sums, skipped, grad_norm = self._optimizer_step(run.engine, next(batches), step)
            done = step + 1
            self._count_bad_steps(run, skipped, done)
            run.step_times.append(time.time() - t0)
            run.metrics = self._reduce_metrics(sums) | {"step_time": run.step_times[-1], "lr": lr,
                                                        "skipped_steps": self.skipped_steps}
            if grad_norm is not None:
                run.metrics["grad_norm"] = grad_norm
            self._log(run, done)
            if r.logging.sample_every and done % r.logging.sample_every == 0 and done != stage.max_steps:
                self._sample_point(run, done)
            if self.steps_left is not None:
                self.steps_left -= 1
            if done % r.train.save_every == 0 or done == stage.max_steps or self.steps_left == 0:
                self.save(run, done)
        self.logger.close_bar()

    def _count_bad_steps(self, run: StageRun, skipped: bool, done: int) -> None:
        if not skipped:
            run.bad_streak = 0
            run.ema.update(run.engine.module.model, run.trainable)
            return
        self.skipped_steps += 1
        run.bad_streak += 1
        if run.bad_streak >= self.recipe.train.max_bad_steps:
            self.save(run, done)
            raise NonFiniteError(
                f"stage {run.stage.name}: {run.bad_streak} consecutive steps had a non-finite loss (last: step "
                f"{done}); the weights were not updated by them and a checkpoint was written to {run.ckpt.root}. "
                f"Lower the learning rate or check the data, then resume.")

    def _log(self, run: StageRun, done: int) -> None:
        if done % self.recipe.logging.log_every == 0 or done == run.stage.max_steps:
            stream = run.stream
            run.metrics.update({f"data/{k}": v for k, v in (stream.stats | stream.builder.stats).items()})
            self.logger.log(run.stage.name, done, self.global_step_offset(run.index) + done, run.metrics)
        self.logger.update_bar(done, run.metrics)

    def _finish_stage(self, run: StageRun) -> None:
        peaks = gather_floats(peak_memory_gb(self.device))
        steps = gather_floats(statistics.median(run.step_times) if run.step_times else 0.0)
        print0(f"stage {run.stage.name}: peak memory per rank {', '.join(f'{g:.2f}' for g in peaks)} GiB, median "
               f"step time per rank {', '.join(f'{t:.3f}' for t in steps)} s")
        self._sample_point(run, run.stage.max_steps)
        final_model, projector = run.engine.module.model, run.engine.module.projector
        raw = full_state_dict(final_model)
        projector_state = full_state_dict(projector) if projector is not None else None
        if self.rank == 0:
            def write_final(d: Path) -> None:  # the weights and, beside them, the REPA projector (never exported)
                final_model.save_pretrained(d, state_dict=raw)
                if projector_state is not None:
                    stage_init.save_projector(projector_state, d)
                elif run.start_dir is not None and (run.start_dir / stage_init.PROJECTOR_FILE).exists():
                    shutil.copy(run.start_dir / stage_init.PROJECTOR_FILE, d / stage_init.PROJECTOR_FILE)

            write_dir_atomic(run.dir / "final", write_final)

            def write_ema(d: Path) -> None:  # final_ema marks the stage complete, so it is written last
                run.ema.model.save_pretrained(d)
                (d / "stage.json").write_text(json.dumps({"steps": run.stage.max_steps, **run.metrics}))

            write_dir_atomic(run.dir / "final_ema", write_ema)
        barrier()

    # -------------------------------------------------------------- one step

    def _optimizer_step(self, engine, micros: list[Batch], step: int
                        ) -> tuple[dict[str, list[float]], bool, float | None]:
        """Forward/backward every micro-batch of this rank, then the optimizer step; returns the losses, whether
        the step was skipped and the gradient norm before clipping.

        A non-finite loss on any rank skips the whole step: that micro-batch's backward is replaced by
        an all-placeholder one (zero gradients, the same graph on every rank) and the learning rate is
        0 for this update, so the weights do not change. A non-finite gradient norm cannot be undone
        (DeepSpeed has applied it) and stops the run before anything is saved.
        """
        sums: dict[str, list[float]] = {}
        bad, own_norm = False, None
        for i, micro in enumerate(micros):
            losses = engine(micro.to_device(self.device, self.dtype, self.codec, self.recipe.model))
            if self._any_rank_non_finite(losses["loss"]):
                bad = True
                losses = engine(Batch(size=1))  # all placeholders: zero gradients, the same graph on every rank
            last = i == len(micros) - 1
            if bad and last:
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0  # the LR scheduler sets it again after this step
            engine.backward(losses["loss"])
            if last and self.policy.clips_itself:
                own_norm = clip_gradients([p for p in engine.module.parameters() if p.grad is not None],
                                          self.recipe.train.grad_clip)
            engine.step()
            if not bad:
                for k, v in losses.items():
                    sums.setdefault(k, []).append(float(v.detach()))
        norm = own_norm if self.policy.clips_itself else engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteError(f"step {step + 1}: the gradient norm is {norm}; the weights are no longer valid, "
                                 f"so nothing was saved. Resume from the last checkpoint with a lower learning rate.")
        return sums, bad, None if norm is None else float(norm)

    def _any_rank_non_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor(0.0 if torch.isfinite(loss).item() else 1.0)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _reduce_metrics(self, sums: dict[str, list[float]]) -> dict[str, float]:
        """Mean over this step's micro-batches and ranks, per loss."""
        keys = sorted(sums)
        if self.world > 1:
            names = [None] * self.world
            dist.all_gather_object(names, keys)
            keys = sorted(set().union(*names))
        local = torch.tensor([[sum(sums.get(k, [])), len(sums.get(k, []))] for k in keys], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(local)
        return {k: (local[i, 0] / local[i, 1]).item() for i, k in enumerate(keys) if local[i, 1] > 0}

    def save(self, run: StageRun, step: int) -> None:
        state = {"step": step, "rng": rng_state(), "data_stats": dict(run.stream.stats),
                 "ema": run.ema.model.state_dict(), "world_size": self.world, "zero_stage": self.policy.zero_stage}
        run.ckpt.save(run.engine, step, state)

    # -------------------------------------------------------------- samples and evaluation

    def _sample_point(self, run: StageRun, step: int) -> None:
        self.sample_grid(run.ema.model, run.stage.name, step, run.index)
        if self.evaluate is not None:
            self._evaluate(run, step)

    def _evaluate(self, run: StageRun, step: int) -> None:
        results = self.evaluate(self, run.index, step, run.ema.model)
        if results and self.rank == 0:
            metrics = {f"eval/{k}": v for k, v in results.items()}
            self.logger.log(run.stage.name, step, self.global_step_offset(run.index) + step, metrics)

    @torch.no_grad()
    def sample_grid(self, model: JanusFlow, stage: str, step: int, index: int) -> Path | None:
        """The recipe's sample prompts drawn by the sampling pipeline at ``logging.sample_seed``: the same images
        as ``tools/sample.py --seed S`` of these weights."""
        from janusflow.pipeline import Pipeline

        lg = self.recipe.logging
        if self.rank != 0 or not lg.sample_prompts:
            return None
        pipe = Pipeline(model, self.codec, self.tokenizer, self.recipe.data.und_system_prompt)
        images = pipe.generate(lg.sample_prompts, seed=lg.sample_seed, steps=lg.sample_steps, cfg_weight=lg.sample_cfg,
                               solver=lg.sample_solver, sde_noise=lg.sample_sde_noise,
                               batch_size=len(lg.sample_prompts))
        name = f"{index + 1}-{stage}-step{step:06d}.png"
        path = save_labelled_grid(images, lg.sample_prompts, self.run_dir / "samples" / name)
        self.logger.log_image("samples", path, f"{stage} step {step}", self.global_step_offset(index) + step)
        return path
