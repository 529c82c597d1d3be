"""Compile the trainer's step for a TPU pod on this machine, before renting the pod.

    python -m launch.compile --config=configs/qwen3_5_0_8b.py --topology=v5p:2x2x4 \\
        [--num_slices=N] [--config.a.b=value ...] [--dump=DIR] \\
        [--decode [--decode_batch=B] [--decode_context=S]]

The TPU compiler (`libtpu`, the wheel `jax[tpu]` pins) builds the devices of a topology without
any TPU (`jax.experimental.topologies.get_topology_desc`); the config's mesh is laid out on them
(`--num_slices`: the `mesh.dcn_*` axes span the slices) and the trainer's own jitted step
(`train.loop.jitted_step`: `train.step.make_train_step` with the state's and the batch's
shardings, the state donated: the function `train.main` runs) is lowered and compiled for it.
Printed: compile time; per chip, the compiler's argument / temporary / output / aliased bytes
(`compiled.memory_analysis()`), their total (arguments + temporaries + outputs - aliased) against
the chip's HBM; the planner's figure (`launch/plan.py`) for the same settings and the ratio; the
collectives of one step per chip, read from the compiled HLO (`launch/hlo_collectives.py`). A
program that does not fit is refused by the TPU compiler itself: its figure is printed.

Topology names are libtpu's: `v5p:XxYxZ` (chips; v5p-N in Cloud TPU names has N/2 chips:
v5p-32 = v5p:2x2x4), `v4:XxYxZ`, `v5e:XxY`, `v6e:XxY`; Cloud TPU accelerator types (v5p-512,
v5litepod-16, v6e-64, v4-32) are accepted and mapped to their standard slice shapes.
Exit status: 0 fits, 1 does not fit, 2 bad input (an unknown topology, a mesh that does not
match its chips, a bad override, no libtpu). Nothing needs a TPU, the network or credentials.
`--decode` then compiles one decode step of generation (`launch/compile_decode.py`:
`qwen35_jax.decode.decode_step`, one token for each of `--decode_batch` rows, default
`train.batch_size`, with `--decode_context` cache slots, default `train.seq_len`) on the same mesh
and prints the same figures for it (its exit status counts too).
`--dump DIR` writes the compiled HLO (`train_step.hlo.txt`, `decode_step.hlo.txt`; when the
compiler refuses a program, its StableHLO `train_step.stablehlo.mlir`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from typing import Any, NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; never a TPU client

from absl import app, flags  # noqa: E402

from launch.hlo_collectives import KINDS, Collective, collectives, largest_sources  # noqa: E402
from train import main as train_main  # noqa: E402  (defines --config with its override checks)

_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "libtpu topology name, e.g. v5p:2x2x4, v5p:8x8x16, or a Cloud TPU type: v5p-32, v6e-64",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices of that topology (multi-slice)")
_DUMP = flags.DEFINE_string("dump", None, "directory for the compiled HLO text")
_DECODE = flags.DEFINE_boolean(
    "decode", False, "also compile one decode step (generation) after the train step"
)
_DECODE_BATCH = flags.DEFINE_integer(
    "decode_batch", None, "rows of the decode step (default: train.batch_size)"
)
_DECODE_CONTEXT = flags.DEFINE_integer(
    "decode_context", None, "cache slots per attention layer (default: train.seq_len)"
)

GiB = 1024**3
_CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


class UsageError(ValueError):
    """Bad input to launch.compile; the message is one line naming the flag."""


class Memory(NamedTuple):
    arguments: float
    temporaries: float
    outputs: float
    aliased: float
    code: float

    @property
    def total(self) -> float:
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


class Result(NamedTuple):
    lower_s: float
    compile_s: float
    memory: Memory | None  # None: the compiler refused the program (out of memory)
    refused: str  # the compiler's out-of-memory message ("" when it compiled)
    required: float | None  # bytes the compiler says it needs (refused programs)
    hbm: float | None  # bytes of HBM the compiler says the chip has (refused programs)
    collectives: dict[str, Collective]
    notes: list[str]
    hlo_text: str
    mesh: dict[str, int]  # the mesh as built on the topology's devices


# ---------------------------------------------------------------------------- topology


def topology_of(name: str) -> str:
    """A Cloud TPU accelerator type (v5p-512, v5litepod-16, v6e-64, v4-32) -> libtpu's topology
    name (v5p:4x8x8, v5e:4x4, v6e:8x8, v4:2x2x4); a topology name is returned as it is."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        return name
    kind, n = chip_of(m.group(1)), int(m.group(2))
    chips = n // 2 if kind in ("v4", "v5p") else n
    if chips < 1 or chips & (chips - 1) or (kind in ("v4", "v5p") and (chips < 4 or n % 2)):
        raise UsageError(
            f"--topology={name!r}: no standard slice shape for {chips} chips; give libtpu's "
            "name, e.g. v5p:2x2x4"
        )
    dims = [1, 1, 1] if kind in ("v4", "v5p") else [1, 1]
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    dims.sort()
    if dims[0] == 1 and len(dims) == 3:  # 4 chips: 2x2x1
        dims = dims[1:] + [1]
    return f"{kind}:{'x'.join(map(str, dims))}"


def chip_of(topology: str) -> str:
    """'v5p:2x2x4' -> 'v5p' (the key of launch.plan.CHIPS)."""
    kind = topology.split(":", 1)[0].strip().lower()
    return _CHIP_ALIASES.get(kind, kind)


def chips_of(topology: str) -> int:
    """'v5p:2x2x4' -> 16 (chips in one slice)."""
    _, sep, dims = topology.partition(":")
    if not sep or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise UsageError(
            f"--topology={topology!r}: expected NAME:XxYxZ, e.g. v5p:2x2x4 (v5p-32) or v5e:4x4"
        )
    return math.prod(int(d) for d in dims.strip().split("x"))


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        import jax  # noqa: PLC0415

        raise UsageError(
            "the TPU compiler is not installed (no libtpu): "
            f"pip install 'jax[tpu]=={jax.__version__}' (or the project's test extras: "
            "pip install -e '.[test]')"
        )


def tpu_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `num_slices` slices of `topology` (libtpu, no TPU needed)."""
    topology = topology_of(topology)
    chips = chips_of(topology)
    if num_slices < 1:
        raise UsageError(f"--num_slices={num_slices}: expected >= 1")
    require_libtpu()
    cores = 2 if chip_of(topology) in ("v4", "v5p") else 1
    # libtpu's start-up otherwise looks for a TPU VM's metadata and logs errors about it
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip_of(topology)}-{cores * chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compile-only: no TPU is opened, so other processes holding libtpu's lockfile don't matter
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, num_slices=num_slices
        )
    except Exception as e:  # noqa: BLE001  (libtpu raises JaxRuntimeError/RuntimeError)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--topology={topology!r}: libtpu cannot build it ({reason}); expected e.g. "
            "v5p:2x2x1, v5p:8x8x16, v4:2x2x2, v5e:4x4, v6e:8x8"
        ) from None
    return list(desc.devices)


# ----------------------------------------------------------------------------- compile


def _refusal(message: str) -> tuple[float | None, float | None]:
    """(bytes required, bytes of HBM) from the TPU compiler's out-of-memory message."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

    def size(num: str, unit: str) -> float:
        return float(num) * units.get(unit, 1)

    m = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
    if not m:
        m = re.search(r"\(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)", message)
    if not m:
        return None, None
    return size(m.group(1), m.group(2)), size(m.group(3), m.group(4))


def compile_step(config: Any, devices: list[Any], dump: str | None = None) -> Result:
    """Lowers and compiles `train.loop.jitted_step` for `devices` (see the module doc)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from qwen35_jax import mesh as mesh_lib  # noqa: PLC0415
    from train import config_schema, loop  # noqa: PLC0415
    from train.data.input import batch_shapes  # noqa: PLC0415
    from train.state import batch_shardings  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)  # as train.main
    model_cfg = config_schema.model_config(config)
    runtime = config_schema.runtime_config(config)
    mesh = mesh_lib.mesh_from_config(config.mesh, devices)
    shapes = batch_shapes(config, model_cfg)
    batch_sh = batch_shardings(mesh, shapes)
    setup = loop.jitted_step(config, model_cfg, runtime, mesh, batch_sh)
    batch = {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32 if k == "pixel_values" else jnp.int32, sharding=batch_sh[k]
        )
        for k, shape in shapes.items()
    }
    return compile_jitted(setup.fn, (setup.abstract, batch), mesh, dump, "train_step")


def compile_jitted(
    fn: Any, args: tuple[Any, ...], mesh: Any, dump: str | None, name: str
) -> Result:
    """Lowers and compiles the jitted `fn` on abstract `args` under `mesh` for its devices: the
    compiler's memory and the collectives of its HLO, or its out-of-memory refusal. `--dump`
    files are named `name`."""
    from qwen35_jax import sharding  # noqa: PLC0415

    with sharding.use_mesh(mesh):
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED)
            if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
                raise
            t2 = time.perf_counter()
            if dump:
                _write(dump, f"{name}.stablehlo.mlir", lowered.as_text())
            required, hbm = _refusal(str(e))
            message = str(e).strip().splitlines()[0]
            empty = {k: Collective(0, 0.0) for k in KINDS}
            shape = dict(mesh.shape)
            return Result(t1 - t0, t2 - t1, None, message, required, hbm, empty, [], "", shape)
        t2 = time.perf_counter()
    m = compiled.memory_analysis()
    memory = Memory(
        float(m.argument_size_in_bytes),
        float(m.temp_size_in_bytes),
        float(m.output_size_in_bytes),
        float(m.alias_size_in_bytes),
        float(m.generated_code_size_in_bytes),
    )
    text = compiled.as_text()
    if dump:
        _write(dump, f"{name}.hlo.txt", text)
    comms, notes = collectives(text)
    return Result(t1 - t0, t2 - t1, memory, "", None, None, comms, notes, text, dict(mesh.shape))


def compile_decode(
    config: Any, devices: list[Any], batch: int, context: int, dump: str | None = None
) -> tuple[Result, Any]:
    """Lowers and compiles one decode step (`launch/compile_decode.py`) for `batch` rows and
    `context` cache slots on the config's mesh; (its Result, its `compile_decode.Inputs`)."""
    import jax  # noqa: PLC0415

    from launch import compile_decode as decode_lib  # noqa: PLC0415
    from qwen35_jax import mesh as mesh_lib  # noqa: PLC0415
    from train import config_schema  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)
    model_cfg = config_schema.model_config(config)
    runtime = config_schema.runtime_config(config)
    mesh = mesh_lib.mesh_from_config(config.mesh, devices)
    inputs = decode_lib.decode_inputs(model_cfg, runtime, mesh, batch, context)
    return compile_jitted(inputs.fn, inputs.args, mesh, dump, "decode_step"), inputs


def _write(directory: str, name: str, text: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------ planner


def planner_total(config: Any, chip: str, chips: int) -> tuple[float | None, str]:
    """(launch.plan's per-chip bytes for the config's settings, or None; why not)."""
    from launch import plan as planner  # noqa: PLC0415
    from train import config_schema  # noqa: PLC0415

    if chip not in planner.CHIPS:
        return None, f"the planner knows no chip {chip!r}"
    t = config.train
    model_cfg = config_schema.model_config(config)
    runtime = config_schema.runtime_config(config)
    mesh = {k: int(v) for k, v in config.mesh.items()}
    try:
        result = planner.plan(
            model_cfg,
            mesh,
            chip,
            chips,
            t.seq_len,
            t.batch_size,
            runtime.moe_capacity_factor or None,
            t.mtp_lambda > 0,
            "config",
            t.loss_chunk,
            t.grad_accum,
            runtime,
        )
    except ValueError as e:
        return None, str(e)
    return result.total, ""


# ------------------------------------------------------------------------------- report


def report(
    config: Any, topology: str, num_slices: int, devices: list[Any], result: Result
) -> tuple[str, bool]:
    """(the printed report, whether the step fits the chip's HBM)."""
    from launch import plan as planner  # noqa: PLC0415

    chip = chip_of(topology)
    hbm = result.hbm or planner.CHIPS.get(chip, (None,))[0]
    mesh = " ".join(f"{k}={v}" for k, v in result.mesh.items())
    t = config.train
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    lines = [
        f"{topology}{slices}: {len(devices)} chips ({devices[0].device_kind}); mesh {mesh}",
        f"step: batch {t.batch_size} x {t.seq_len} (grad_accum {t.grad_accum}), remat "
        f"{config.runtime.remat_policy}, loss_chunk {t.loss_chunk}",
        f"lowered in {result.lower_s:.1f} s, compiled in {result.compile_s:.1f} s",
    ]
    planned, why = planner_total(config, chip, len(devices))
    body, fits, total = _memory_lines(result, hbm)
    lines += body
    if planned is None:
        lines.append(f"planner: no figure ({why})")
    elif total:
        lines.append(
            f"planner (launch/plan.py): {planned / GiB:.2f} GiB per chip; compiler - planner = "
            f"{(total - planned) / GiB:+.2f} GiB (compiler / planner = {total / planned:.2f})"
        )
    lines += _collective_lines(result)
    return "\n".join(lines), fits


def decode_report(
    topology: str, batch: int, context: int, result: Result, inputs: Any
) -> tuple[str, bool]:
    """(the printed report of the decode step, whether it fits the chip's HBM)."""
    from launch import plan as planner  # noqa: PLC0415

    hbm = result.hbm or planner.CHIPS.get(chip_of(topology), (None,))[0]
    lines = [
        f"decode step: {batch} rows x 1 token, {context} cache slots per attention layer",
        f"lowered in {result.lower_s:.1f} s, compiled in {result.compile_s:.1f} s",
    ]
    body, fits, _ = _memory_lines(result, hbm)
    lines += body
    both = inputs.param_bytes + inputs.state_bytes
    lines.append(
        f"shards per chip: parameters {inputs.param_bytes / GiB:.2f} GiB + decode state "
        f"{inputs.state_bytes / GiB:.2f} GiB = {both / GiB:.2f} GiB (the compiler's arguments, "
        "less the token ids)"
    )
    lines += _collective_lines(result)
    return "\n".join(lines), fits


def _memory_lines(result: Result, hbm: float | None) -> tuple[list[str], bool, float | None]:
    """(report lines of the compiler's memory per chip, fits, total bytes)."""
    if result.memory is None:
        need = f"{result.required / GiB:.2f} GiB" if result.required else "more than HBM"
        lines = [
            f"DOES NOT FIT: the TPU compiler refused the program: needs {need} per chip",
            f"  compiler: {result.refused}",
        ]
        return lines, False, result.required
    mem = result.memory
    rows = [
        ("arguments", mem.arguments),
        ("temporaries", mem.temporaries),
        ("outputs", mem.outputs),
        ("aliased (donated)", -mem.aliased),
        ("generated code", mem.code),
    ]
    lines = [f"{'per chip (TPU compiler)':<30}{'GiB':>9}"]
    lines += [f"  {name:<28}{b / GiB:>9.2f}" for name, b in rows]
    total = mem.total
    fits = hbm is None or total <= hbm
    hbm_txt = f" of {hbm / GiB:.2f} GiB HBM" if hbm else ""
    pct = f" ({100 * total / hbm:.0f}%)" if hbm else ""
    lines.append(
        f"  {'total':<28}{total / GiB:>9.2f}{hbm_txt}: {'FITS' if fits else 'DOES NOT FIT'}{pct}"
    )
    return lines, fits, total


def _collective_lines(result: Result) -> list[str]:
    if result.memory is None:
        return []
    lines = [f"{'collectives per step per chip':<30}{'count':>9}{'GiB':>11}"]
    for kind in KINDS:
        c = result.collectives[kind]
        lines.append(f"  {kind:<28}{c.count:>9}{c.bytes / GiB:>11.3f}")
    all_bytes = sum(c.bytes for c in result.collectives.values())
    lines.append(f"  {'total':<28}{'':>9}{all_bytes / GiB:>11.3f}")
    if result.hlo_text and all_bytes:
        lines.append("  largest sources (by op_name):")
        for kind, source, count, nbytes in largest_sources(result.hlo_text, 5):
            lines.append(f"    {kind:<20}{count:>7}{nbytes / GiB:>11.3f} GiB  {source}")
    lines += [f"  note: {n}" for n in result.notes]
    return lines


def fill_data_inputs(config: Any) -> None:
    """Placeholders for the data path and tokenizer directory when unset: a compile reads
    neither (the pod recipes leave them to the command line)."""
    if not config.data.path:
        config.data.path = "<unused by launch.compile>"
    if config.data.tokenizer == "hf" and not config.data.tokenizer_path:
        config.data.tokenizer_path = "<unused by launch.compile>"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from train import config_schema  # noqa: PLC0415

    config = flags.FLAGS.config
    try:
        if not _TOPOLOGY.value:
            raise UsageError("--topology is required, e.g. --topology=v5p:2x2x4 (v5p-32)")
        fill_data_inputs(config)
        config_schema.validate(config)
        topology = topology_of(_TOPOLOGY.value)
        devices = tpu_devices(topology, _NUM_SLICES.value)
        try:
            config_schema.mesh_devices_check(config, len(devices))
        except config_schema.ConfigValueError as e:
            raise UsageError(f"--topology={topology} ({len(devices)} chips): {e}") from None
        decode_batch = _DECODE_BATCH.value or config.train.batch_size
        decode_context = _DECODE_CONTEXT.value or config.train.seq_len
        if _DECODE.value and (decode_batch < 1 or decode_context < 2):
            raise UsageError(
                f"--decode_batch={decode_batch} --decode_context={decode_context}: expected a "
                "batch >= 1 and a context >= 2"
            )
    except (UsageError, config_schema.ConfigValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"compiling the train step for {topology} ...", flush=True)
    result = compile_step(config, devices, _DUMP.value)
    text, fits = report(config, topology, _NUM_SLICES.value, devices, result)
    print(text, flush=True)
    if _DECODE.value:
        print(f"compiling the decode step for {topology} ...", flush=True)
        result, inputs = compile_decode(config, devices, decode_batch, decode_context, _DUMP.value)
        text, decode_fits = decode_report(topology, decode_batch, decode_context, result, inputs)
        print(text, flush=True)
        fits = fits and decode_fits
    return 0 if fits else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=train_main.parse_flags)
