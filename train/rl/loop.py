"""The RL loop: the story of a run, each part in the module it names.

    run(config, workdir)
      model config, tokenizer, task, reward                      init.py, tasks.py, rewards.py
      mesh, optimizer, abstract state; resume or init            qwen35_jax.mesh, state.py,
                                                                 checkpointing.py, init.py
      per step s:
        rollouts: the step's prompts x group_size -> qwen35_jax.generate on the training mesh
          with state.params (the arrays being trained: no copy), rng fold_in(seed, s, attempt);
          rewards, overlong shaping, dynamic sampling            rollout.py
        old_logp: generate's log-probs (temperature 1) or recomputed (update.sequence_logp);
          rl.routing_replay: the experts recorded in that pass (or an extra one), per
          minibatch, kept on the devices with the batch sharding          replay.py
          ref_logp from the frozen reference copy when rl.beta > 0
        advantages per group                                     advantages.py
        rl.num_iterations x rl.num_minibatches jitted updates    update.py (state donated)
        metrics.jsonl / TensorBoard / console; held-out greedy accuracy every rl.eval_every
          (scored by rl.eval_reward, default rl.reward)
        checkpoint every checkpoint.every_steps; SIGTERM -> save, exit
      save

Everything a step draws is a function of (train.seed, step): prompts (tasks.Task.records) and
sampling keys. A checkpoint holds the TrainState and a small JSON of counters, so a resumed run
repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

import qwen35_jax
from qwen35_jax import mesh as mesh_lib
from qwen35_jax import sharding
from train import config_schema, init
from train.checkpointing import Checkpointer, PreemptionGuard
from train.data.multimodal import VisualSpec
from train.data.tokenizers import Tokenizer, WordTokenizer, load_tokenizer
from train.metrics import MetricsLogger, format_duration
from train.optimizer import make_optimizer
from train.prepare import write_atomic
from train.rl import envs, prompts, replay, rewards, rollout, tasks
from train.rl.advantages import group_advantages
from train.rl.config import resolved
from train.rl.update import make_update, sequence_logp
from train.state import abstract_state, batch_shardings, init_state
from train.step_gate import StepGate


def _say(*args: Any) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


class Progress:
    """The run's counters, saved with each checkpoint (the trainer's data-iterator slot)."""

    def __init__(self):
        self.counters = {"reward_errors": 0}

    def get_state(self) -> bytes:
        # the keys train/data/iterator.py's handler merges across processes
        return json.dumps(
            {"layout": {}, "shards": {}, "rows": 0, "records": 0, "skipped": 0, **self.counters}
        ).encode()

    def set_state(self, state: bytes | str) -> None:
        d = json.loads(state)
        self.counters = {k: int(d.get(k, 0)) for k in self.counters}

    def start_prefetch(self) -> None:
        pass


class RLMetricsLogger(MetricsLogger):
    def console_line(self, row: dict[str, Any]) -> str:
        parts = [f"step {row['step']}/{self.total_steps}"]
        if "reward_mean" in row:
            parts.append(f"reward {row['reward_mean']:.3f}")
        if "eval_accuracy" in row:
            parts.append(f"eval acc {100 * row['eval_accuracy']:.1f}%")
        if "loss" not in row:  # the evaluation before the first step
            return " | ".join(parts)
        parts += [
            f"loss {row['loss']:.4f}",
            f"kl {row['kl']:.4f}",
            f"clip {row['clip_frac_low']:.3f}/{row['clip_frac_high']:.3f}",
            f"len {row['response_len_mean']:.1f}",
            f"ent {row['entropy']:.3f}",
        ]
        if "routing_changed_frac" in row:
            parts.append(f"routing changed {100 * row['routing_changed_frac']:.2f}%")
        if row.get("dropped_frac"):
            parts.append(f"dropped {100 * row['dropped_frac']:.0f}%")
        if row.get("reward_errors"):
            parts.append(f"reward errors {row['reward_errors']}")
        parts.append(f"rollout {100 * row['rollout_share']:.0f}%")
        if self._rate:
            parts.append(f"eta {format_duration((self.total_steps - row['step']) * self._rate)}")
        return " | ".join(parts)


def rl_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """data.tokenizer_path, else the digits pretraining's word tokenizer (data.kind="digits"),
    else the tokenizer.json of init.from_hf / a converted checkpoint."""
    data = config.data
    if not data.tokenizer_path and data.kind == "digits":
        from train.data import digits  # noqa: PLC0415

        return WordTokenizer(digits.WORDS)
    if data.tokenizer_path:
        path, kind = data.tokenizer_path, data.tokenizer
    else:
        path = config.init.from_hf or config.init.from_checkpoint
        kind = "hf"
        if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise config_schema.ConfigValueError(
                f"data.tokenizer_path='' and no tokenizer.json beside the init checkpoint "
                f"({path!r}): set data.tokenizer_path (and data.tokenizer)"
            )
    try:
        return load_tokenizer(kind, path)
    except (OSError, ValueError) as e:
        raise config_schema.ConfigValueError(f"data.tokenizer_path: {e}") from None


def _put(x: np.ndarray, s: jax.sharding.Sharding) -> jax.Array:
    """A host array every process holds whole -> a global array sharded as `s`."""
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


def run(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, Any]:
    """Trains per `config` in `workdir` (resuming if it holds checkpoints) on `devices`
    (default: all); returns {"start_step", "step", "rows": the logged metrics}."""
    with PreemptionGuard() as guard:
        return _run(config, workdir, guard, devices)


def _run(config, workdir: str, guard: PreemptionGuard, devices) -> dict:
    rl = resolved(config.rl)
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    model_cfg, runtime = init.model_config(config), config_schema.runtime_config(config)
    tokenizer = rl_tokenizer(config)
    try:
        task = tasks.make_task(config.rl, t.seed, image_size=config.data.image_size)
        reward_fn = rewards.resolve(rl["reward"])
        eval_fn = (
            rewards.resolve(rl["eval_reward"], "rl.eval_reward") if rl["eval_reward"] else reward_fn
        )
        env = envs.resolve(rl["env"]) if rl["env"] else None
    except (OSError, ValueError) as e:
        raise config_schema.ConfigValueError(str(e)) from None
    eos = int(model_cfg.text_config.eos_token_id)
    pad = _pad(model_cfg)
    spec = VisualSpec.of(model_cfg) if model_cfg.vision_config is not None else None
    images = prompts.has_images(task.train) or prompts.has_images(task.held_out)
    if images and rl["routing_replay"]:
        raise config_schema.ConfigValueError(
            "rl.routing_replay=True: the recording forward takes text prompts; "
            f"rl.task={config.rl.task!r} has images"
        )
    if images and env is not None:
        raise config_schema.ConfigValueError(
            f"rl.env={config.rl.env!r}: multi-turn episodes take text prompts; "
            f"rl.task={config.rl.task!r} has images"
        )
    if images and spec is None:
        raise config_schema.ConfigValueError(
            f"rl.task={config.rl.task!r}: its records have images but the model has no "
            "vision_config"
        )

    mesh = mesh_lib.mesh_from_config(config.mesh, devices)
    updates_per_step = rl["num_iterations"] * rl["num_minibatches"]
    tx, schedule = make_optimizer(config.optimizer, t.steps * updates_per_step)
    abstract, shardings = abstract_state(model_cfg, tx, mesh, runtime=runtime)
    ckpt = Checkpointer(
        os.path.join(workdir, config.checkpoint.dir),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    progress = Progress()
    restored = ckpt.restore_latest(abstract, progress)
    initial = None
    if restored is not None:
        state, start = restored
        _say(f"resumed from checkpoint step {start} in {ckpt.directory}")
    else:
        initial = init.initial_params(config, model_cfg, abstract.params)
        state = init_state(model_cfg, tx, mesh, jax.random.key(t.seed), initial, runtime=runtime)
        start = 0
    ref_params = None
    if rl["beta"] > 0:  # the frozen reference: the initial policy, sharded like it
        if initial is None:
            initial = init.initial_params(config, model_cfg, abstract.params)
        ref = initial if initial is not None else _random_params(model_cfg, t.seed, runtime)
        ref_params = jax.device_put(ref, shardings.params)
    if jax.process_index() == 0:
        d = config.to_dict()
        d["model"], d["rl"] = model_cfg.to_dict(), rl
        write_atomic(
            os.path.join(workdir, "config.json"),
            json.dumps(d, indent=2, sort_keys=True, default=str),
        )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    _say(f"model: {n_params:,} parameters, {len(jax.devices())} device(s), mesh {dict(mesh.shape)}")

    rows = rl["prompts_per_step"] * rl["group_size"]
    width = rollout.row_width(rl)
    mb = rows // rl["num_minibatches"]
    shapes = {"ids": (mb, width), "mask": (mb, width - 1), "adv": (mb,)}
    if images:  # the per-row form of prompts.py
        shapes.update(pixels=(mb, rl["max_patches"], spec.patch_dim), grids=(mb, 1, 3))
    bs = batch_shardings(mesh, shapes)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    full = batch_shardings(mesh, {"ids": (rows, width)})["ids"]
    key_sharding = {"ids": "ids", "valid": "ids", "mask": "mask", "old_logp": "mask"}
    key_sharding.update(ref_logp="mask", adv="adv")
    if rl["routing_replay"]:  # the rollout's experts [B, L, W, k] (train/rl/replay.py)
        bs["routing"] = batch_shardings(
            mesh, {"routing": replay.routing_shape(model_cfg, mb, width)}
        )["routing"]
        key_sharding["routing"] = "routing"
        # per minibatch: log-probs replicated (read on the host), experts left on the devices
        # with the batch sharding, as the update takes them (no host round trip)
        record_fn = replay.recorder(model_cfg, replicated, bs["routing"], runtime=runtime)
    if images:
        key_sharding.update(pixels="pixels", grids="grids")
    update_fn = jax.jit(
        make_update(model_cfg, tx, schedule, rl, runtime=runtime),
        in_shardings=(
            shardings,
            {
                k: bs[v]
                for k, v in key_sharding.items()
                if k != "ref_logp" or ref_params is not None
            },
        ),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    logp_fn = jax.jit(  # replicated out: every process reads every row
        lambda p, i, v, px=None, g=None: sequence_logp(model_cfg, p, i, v, px, g, runtime=runtime),
        out_shardings=replicated,
    )
    logger = RLMetricsLogger(
        workdir,
        total_steps=t.steps,
        tokens_per_step=rows * width,
        flops_per_step=0.0,
        peak_flops=None,
        enabled=jax.process_index() == 0,
        resume_step=start,
    )
    base_key = jax.random.key(t.seed)
    recompute = rl["recompute_old_logp"] or rl["temperature"] != 1.0
    history: list[dict] = []
    step = start
    with sharding.use_mesh(mesh):
        if start == 0 and rl["eval_every"]:  # the starting point of the held-out curve
            acc = evaluate(
                model_cfg, state.params, task, tokenizer, eval_fn, rl, eos, runtime, spec
            )
            history.append(logger.log(0, {"eval_accuracy": acc}))
            logger.restart_clock()

        drafts = []  # (accepted, drafted) per generate call of the step

        def sample(rows, attempt, *, params, step, **visual):
            key = jax.random.fold_in(jax.random.fold_in(base_key, step), attempt)
            out = qwen35_jax.generate(
                model_cfg,
                params,
                rows,
                max_new_tokens=rl["max_new_tokens"],
                rng=key,
                temperature=rl["temperature"],
                top_p=rl["top_p"],
                stop_token_ids=(eos,),
                runtime=runtime,
                num_draft_tokens=rl["num_draft_tokens"],
                **visual,
            )
            out = jax.device_get(out)
            if rl["num_draft_tokens"]:
                drafts.append((int(out.num_accepted.sum()), int(out.num_drafted.sum())))
            return qwen35_jax.GenerateOutput(out.tokens, out.lengths, out.logprobs)

        # every process agrees after each step, so a stop sent to one of them stops all together
        gate, preempted = StepGate(guard), False
        while step < t.steps:
            t0 = time.perf_counter()
            drafts.clear()
            ro = rollout.collect(
                functools.partial(sample, params=state.params, step=step),
                task,
                tokenizer,
                reward_fn,
                rl,
                step,
                eos,
                pad,
                env,
                spec,
            )
            adv_B = np.asarray(
                group_advantages(ro.rewards_B.reshape(-1, rl["group_size"]), rl["advantage"])
            ).reshape(-1)
            batch = {
                "ids": ro.ids_BW,
                "valid": ro.valid_BW,
                "mask": ro.mask_BT,
                "old_logp": ro.old_logp_BT,
                "adv": adv_B.astype(np.float32),
            }
            visual = []  # the recomputed log-probs' pixels and grids (all rows)
            if images:
                batch.update(pixels=ro.pixels_BPF, grids=ro.grids_BG3)
                vs = batch_shardings(mesh, {k: batch[k].shape for k in ("pixels", "grids")})
                visual = [_put(batch[k], vs[k]) for k in ("pixels", "grids")]
            t1 = time.perf_counter()
            routing = []  # rl.routing_replay: each minibatch's experts, global device arrays
            if rl["routing_replay"]:  # one forward with the pre-update params records both
                logps = []
                for k in range(rl["num_minibatches"]):
                    sl = slice(k * mb, (k + 1) * mb)
                    ids, valid = (_put(a[sl], bs["ids"]) for a in (ro.ids_BW, ro.valid_BW))
                    logp, experts = record_fn(state.params, ids, valid)
                    logps.append(logp)
                    routing.append(experts)
                if recompute:
                    batch["old_logp"] = np.concatenate(jax.device_get(logps)) * ro.mask_BT
            elif recompute:
                batch["old_logp"] = (
                    np.asarray(
                        logp_fn(
                            state.params, _put(ro.ids_BW, full), _put(ro.valid_BW, full), *visual
                        )
                    )
                    * ro.mask_BT
                )
            if ref_params is not None:
                batch["ref_logp"] = (
                    np.asarray(
                        logp_fn(ref_params, _put(ro.ids_BW, full), _put(ro.valid_BW, full), *visual)
                    )
                    * ro.mask_BT
                )
            step_metrics = []
            for _ in range(rl["num_iterations"]):
                for k in range(rl["num_minibatches"]):
                    sl = slice(k * mb, (k + 1) * mb)
                    part = {n: _put(a[sl], bs[key_sharding[n]]) for n, a in batch.items()}
                    if routing:
                        part["routing"] = routing[k]
                    state, m = update_fn(state, part)
                    step_metrics.append(m)
            host = jax.device_get(step_metrics)
            t2 = time.perf_counter()
            step += 1
            progress.counters["reward_errors"] += ro.reward_errors
            row = _row(host, ro, rl, t0, t1, t2)
            row["reward_errors_total"] = progress.counters["reward_errors"]
            if drafts:  # speculative rollouts: how often the MTP drafter agreed with the policy
                row["draft_acceptance"] = sum(a for a, _ in drafts) / max(
                    sum(d for _, d in drafts), 1
                )
            if rl["eval_every"] and (step % rl["eval_every"] == 0 or step == t.steps):
                row["eval_accuracy"] = evaluate(
                    model_cfg, state.params, task, tokenizer, eval_fn, rl, eos, runtime, spec
                )
            history.append(logger.log(step, row))
            if "eval_accuracy" in row:
                logger.restart_clock()  # the ETA leaves evaluation out
            if step % config.checkpoint.every_steps == 0:
                ckpt.save(step, state, progress)
            _, preempted = gate.agree(True, guard.requested)
            if preempted:
                break
    ckpt.save(step, state, progress)
    ckpt.close()
    if preempted:
        _say(f"preempted: checkpoint saved at step {step}; rerun the same command to resume")
    logger.close()
    return {"start_step": start, "step": step, "rows": history}


def _pad(model_cfg: qwen35_jax.Qwen35Config) -> int:
    pad = model_cfg.text_config.pad_token_id
    return 0 if pad is None else int(pad)


def _random_params(model_cfg, seed: int, runtime) -> Any:
    return qwen35_jax.init_params(model_cfg, jax.random.key(seed), runtime=runtime)


def _row(host: list[dict], ro: rollout.Rollouts, rl: dict, t0, t1, t2) -> dict[str, float]:
    """One step's metrics: updates averaged over the minibatches, rollout statistics."""
    row = {k: float(np.mean([np.asarray(m[k], np.float64) for m in host])) for k in host[0]}
    row["ratio_max"] = float(max(np.asarray(m["ratio_max"]) for m in host))
    step_s = t2 - t0
    gen_tokens = float(ro.lengths_B.sum())
    upd_tokens = float(np.sum(ro.valid_BW)) * rl["num_iterations"]
    row.update(
        reward_mean=float(ro.rewards_B.mean()),
        reward_std=float(ro.rewards_B.std()),
        raw_reward_mean=float(ro.raw_rewards_B.mean()),
        response_len_mean=float(ro.lengths_B.mean()),
        response_len_max=int(ro.lengths_B.max()),
        truncated_frac=float(ro.truncated_B.mean()),
        dropped_frac=float(ro.dropped_frac),
        rollout_attempts=int(ro.attempts),
        reward_errors=int(ro.reward_errors),
        rollout_tokens_per_s=gen_tokens / max(ro.seconds, 1e-9),
        update_tokens_per_s=upd_tokens / max(t2 - t1, 1e-9),
        rollout_share=ro.seconds / step_s,
        update_share=(t2 - t1) / step_s,
        step_seconds=step_s,
    )
    return row


def evaluate(model_cfg, params, task, tokenizer, reward_fn, rl, eos, runtime, spec=None) -> float:
    """Held-out greedy accuracy: the fraction of greedy completions that `reward_fn` (the run's
    rl.eval_reward) scores >= 1."""
    records = task.held_out
    if not records:
        return float("nan")
    enc = prompts.encode(records, tokenizer, rl["max_prompt_len"], spec, rl["max_patches"])
    out = jax.device_get(
        qwen35_jax.generate(
            model_cfg,
            params,
            enc.rows,
            max_new_tokens=rl["max_new_tokens"],
            stop_token_ids=(eos,),
            runtime=runtime,
            **enc.visual(),
        )
    )
    texts = [
        rollout.completion_text(tokenizer, out.tokens[i], out.lengths[i], eos)
        for i in range(len(records))
    ]
    scores, _ = rewards.score(reward_fn, [r["prompt"] for r in records], texts, records)
    return float(np.mean(np.asarray(scores) >= 1.0))
