"""Communication of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

    collectives(hlo_text) -> {kind: Collective(count, bytes)}     per execution, per device
    largest_sources(hlo_text, n) -> [(kind, source, count, bytes)]  the n heaviest, by op_name
    collective_ops(hlo_text) -> [CollectiveOp]      each collective instruction: kind, runs,
                                                    bytes per run, result shape, source

Kinds: all-gather, reduce-scatter, all-reduce, all-to-all (also ragged), collective-permute; the
synchronous ops and their asynchronous `-start` halves (the `-done` halves are not counted
again). Ops inside a `while` body count once per iteration (the loop's `known_trip_count`, which
XLA records for the scans over layers, chunks and micro-batches); ops in a called computation
(fusions, `async-start` wrappers, calls) count once per call; both branches of a `conditional`
count (an upper bound). A loop without a known trip count counts once and is reported.

Bytes per op and device: the buffer the collective produces on each device (all-gather: the
gathered array; all-reduce: the reduced array; all-to-all, collective-permute: the exchanged
array), except reduce-scatter: its input (the array being reduced). On a ring of n devices the
bytes on the wire are about (n-1)/n of that (twice for all-reduce).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OPCODES = {
    "all-gather": "all-gather",
    "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2}
_DTYPE_BYTES |= {"bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_DTYPE_BYTES |= {"c64": 8, "c128": 16}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|body|to_apply|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")


def _trip_count(ins: _Instr, comps: dict[str, list[_Instr]]) -> int | None:
    """A while loop's iterations: its known_trip_count, or a condition `i < constant` (XLA's
    scans count i from 0; the TPU compiler's HLO drops known_trip_count)."""
    m = _TRIP.search(ins.attrs)
    if m:
        return int(m.group(1))
    cond = _CONDITION.search(ins.attrs)
    instrs = comps.get(cond.group(1), []) if cond else []
    by_name = {i.name: i for i in instrs}
    root = next((i for i in instrs if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
        return None
    if len(root.operands) == 2:
        bound = by_name.get(root.operands[1])
        if bound is not None and bound.opcode == "constant" and bound.args.strip().isdigit():
            return int(bound.args)
    return None


class Collective(NamedTuple):
    count: int  # executions per step
    bytes: float  # summed over those executions, per device


class _Instr(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str  # the text between the opcode's parentheses
    root: bool


def _split_shape(rest: str) -> tuple[str, str]:
    """('(f32[2], s32[])', 'tuple(...)...') from an instruction's right-hand side."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _arrays(shape: str) -> list[float]:
    """Bytes of each array in a (tuple) shape, in order (tokens and unknown types: 0)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _DTYPE_BYTES.get(dtype, 0))
    return out


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None or line.strip() == "}":
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, tail = _split_shape(m.group(3))
        op = re.match(r"([\w\-]+)\((.*)", tail)
        if not op:
            continue
        args, _, attrs = op.group(2).partition(")")
        operands = re.findall(r"%([\w.\-]+)", args)
        instr = _Instr(m.group(2), shape, op.group(1), operands, attrs, args, bool(m.group(1)))
        comps[current].append(instr)
    return comps, entry


def _runs(comps: dict[str, list[_Instr]], entry: str) -> tuple[dict[str, int], list[str]]:
    """Executions of each computation per run of `entry` (loops by trip count), and notes."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # caller -> (callee, times)
    notes = []
    for name, instrs in comps.items():
        for ins in instrs:
            if ins.opcode.endswith(("-done", "-update")):
                continue
            trip = 1
            if ins.opcode == "while":
                trip = _trip_count(ins, comps)
                if trip is None:
                    trip = 1
                    notes.append(f"while loop {ins.name} has no known trip count: counted once")
            for key, value in _CALLEES.findall(ins.attrs):
                times = trip if key == "body" else 1
                for callee in re.findall(r"[\w.\-]+", value.replace("%", " ")):
                    if callee in comps:
                        calls[name].append((callee, times))

    runs: dict[str, int] = defaultdict(int)

    def visit(comp: str, times: int, depth: int = 0) -> None:
        runs[comp] += times
        if depth < 64:
            for callee, k in calls.get(comp, ()):
                visit(callee, times * k, depth + 1)

    visit(entry, 1)
    return runs, notes


class CollectiveOp(NamedTuple):
    kind: str  # one of KINDS
    executions: int  # per run of the program
    bytes: float  # per execution, per device (module doc)
    shape: str  # the instruction's result shape, e.g. 'bf16[256,4096]{1,0}' (or a tuple)
    source: str  # `source_of` its op_name; '?' without one


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective instruction of the program that runs, with its executions per run."""
    return _each(hlo_text)[0]


def _each(hlo_text: str) -> tuple[list[CollectiveOp], list[str]]:
    """The collectives (`CollectiveOp`) of one run, and notes."""
    comps, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    runs, notes = _runs(comps, entry)
    out = []
    for name, instrs in comps.items():
        if not runs.get(name):
            continue
        shapes = {ins.name: ins.shape for ins in instrs}
        for ins in instrs:
            kind = _OPCODES.get(ins.opcode)
            if kind is None:
                continue
            arrays = _arrays(ins.shape)
            if kind == "reduce-scatter":
                size = sum(sum(_arrays(shapes.get(o, ""))) for o in ins.operands)
            elif ins.opcode.endswith("-start") and kind != "all-reduce":
                arrays = [a for a in arrays if a > 4] or arrays  # drop u32[] context scalars
                size = sum(arrays[len(arrays) // 2 :])  # (inputs..., outputs...)
            else:
                size = sum(arrays)
            m = _OP_NAME.search(ins.attrs)
            source = source_of(m.group(1)) if m else "?"
            out.append(CollectiveOp(kind, runs[name], size, ins.shape, source))
    return out, notes


def collectives(hlo_text: str) -> tuple[dict[str, Collective], list[str]]:
    """({kind: Collective} for the kinds in KINDS, notes) of one execution of the program."""
    ops, notes = _each(hlo_text)
    count: dict[str, int] = defaultdict(int)
    nbytes: dict[str, float] = defaultdict(float)
    for kind, times, size, _, _ in ops:
        count[kind] += times
        nbytes[kind] += times * size
    return {k: Collective(count[k], nbytes[k]) for k in KINDS}, notes


def source_of(op_name: str) -> str:
    """The JAX source of a collective, shortened: 'bwd mtp/layers_0/mlp/dot_general' from
    'jit(train_step)/transpose(jvp(Model))/mtp/while/body/closed_call/layers_0/mlp/dot_general'
    ('fwd'/'bwd': the forward pass or its transpose; loop and call wrappers dropped)."""
    phase = "bwd " if "transpose(" in op_name else "fwd " if "jvp(" in op_name else ""
    parts = [
        p
        for p in op_name.split("/")
        if p
        and not p.startswith(("jit(", "jvp(", "transpose(", "checkpoint", "rematted_computation"))
        and p not in ("while", "body", "closed_call", "cond")
    ]
    return phase + "/".join(parts[-4:])


def largest_sources(hlo_text: str, n: int = 5) -> list[tuple[str, str, int, float]]:
    """The `n` (kind, source, executions, bytes per step per device) that move the most bytes,
    by the op_name XLA kept for each collective (`source_of`; '?' without one)."""
    ops, _ = _each(hlo_text)
    count: dict[tuple[str, str], int] = defaultdict(int)
    nbytes: dict[tuple[str, str], float] = defaultdict(float)
    for kind, times, size, _, source in ops:
        key = (kind, source)
        count[key] += times
        nbytes[key] += times * size
    top = sorted(nbytes, key=lambda k: -nbytes[k])[:n]
    return [(k, src, count[(k, src)], nbytes[(k, src)]) for k, src in top]
