"""Checkpoint conversion: Hugging Face safetensors <-> orbax, streaming, through the CLI.

Tiny multi-shard checkpoints written by transformers (`save_pretrained(max_shard_size=...)`),
dense and MoE, with a vision tower and synthesized MTP tensors in an extra shard, bfloat16 and
float32: hf -> orbax -> hf is bit-identical tensor by tensor, transformers loads the export with
identical logits, `restore_params` gives the `abstract_params` tree (sharded when asked), and bad
checkpoints fail with one message naming the file or key and leave no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import qwen35_jax as q
from qwen35_jax.convert import orbax_io
from qwen35_jax.convert.__main__ import main
from qwen35_jax.convert.hf_names import hf_rules
from qwen35_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from qwen35_jax.hf_config import from_hf as config_from_hf
from tests.test_config import SMALL_MOE, SMALL_TEXT, SMALL_VISION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = {**SMALL_VISION, "out_hidden_size": SMALL_TEXT["hidden_size"]}


def _add_mtp(path: str, seed: int, dtype: np.dtype) -> None:
    """Append `mtp.*` tensors (one MTP layer) as an extra shard and declare them in the config."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    keys = list(index["weight_map"])
    fused = any(k.endswith("experts.gate_up_proj") for k in keys)
    config = config_from_hf(path)
    rng = np.random.default_rng(seed)
    tensors = {}
    for r in hf_rules(config, multimodal_prefix=True, fused_experts=fused):
        if r.key.startswith("mtp."):
            tensors[r.key] = rng.standard_normal(r.shape).astype(dtype)
    write_safetensors(os.path.join(path, "mtp.safetensors"), tensors)
    index["weight_map"].update({k: "mtp.safetensors" for k in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def _build(path, moe: bool, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    text = {**SMALL_TEXT, **(SMALL_MOE if moe else {"intermediate_size": 40})}
    cls_cfg = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    cls = (
        transformers.Qwen3_5MoeForConditionalGeneration
        if moe
        else transformers.Qwen3_5ForConditionalGeneration
    )
    model = cls(cls_cfg(text_config=text, vision_config=VISION))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.save_pretrained(str(path), max_shard_size="20KB")
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float32)
    _add_mtp(str(path), seed, np_dtype)
    return model


def _tensors(path: str) -> dict[str, np.ndarray]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for key, fname in weight_map.items():
        st = SafetensorsFile(os.path.join(path, fname))
        out[key] = np.array(st.get(key))
        st.close()
    return out


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=[("moe", torch.bfloat16), ("dense", torch.float32)], ids=str)
def converted(request, tmp_path_factory):
    kind, dtype = request.param
    base = tmp_path_factory.mktemp(f"{kind}")
    hf_dir, ckpt, back = str(base / "hf"), str(base / "orbax"), str(base / "hf_back")
    model = _build(hf_dir, kind == "moe", dtype)
    assert len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]) > 3
    assert main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", ckpt]) == 0
    assert main(["orbax-to-hf", "--ckpt", ckpt, "--out", back, "--max_shard_bytes", "30000"]) == 0
    return model, hf_dir, ckpt, back


def test_round_trip_is_bit_identical(converted):
    _, hf_dir, ckpt, back = converted
    src, dst = _tensors(hf_dir), _tensors(back)
    assert set(src) == set(dst)
    assert any(k.startswith("mtp.") for k in src) and any(".visual." in k for k in src)
    for key, a in src.items():
        b = dst[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        assert a.tobytes() == b.tobytes(), key
    shards = [f for f in os.listdir(back) if f.endswith(".safetensors")]
    assert len(shards) > 3 and not any(".tmp-" in f for f in os.listdir(os.path.dirname(back)))


def test_transformers_loads_the_export(converted):
    model, _, _, back = converted
    cls = type(model)
    loaded = cls.from_pretrained(back, dtype=next(model.parameters()).dtype).eval()
    ids = np.array([[1, 5, 9, 3, 7, 2]])
    np.testing.assert_array_equal(_logits(loaded, ids), _logits(model, ids))


def test_restore_params_matches_abstract_params(converted):
    _, hf_dir, ckpt, _ = converted
    config, params = orbax_io.restore_params(ckpt)
    assert config == config_from_hf(hf_dir)
    shapes = nn.meta.unbox(q.abstract_params(config))
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes), strict=True):
        assert p.shape == s.shape
    # the embedding equals the HF tensor exactly
    emb = _tensors(hf_dir)["model.language_model.embed_tokens.weight"]
    assert params["embed_tokens"].tobytes() == emb.tobytes()
    # restore straight into a sharded layout
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rep = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: rep, shapes)
    shardings["norm"]["scale"] = NamedSharding(mesh, PartitionSpec("model"))
    _, sharded = orbax_io.restore_params(ckpt, shardings)
    assert sharded["norm"]["scale"].sharding == shardings["norm"]["scale"]
    np.testing.assert_array_equal(np.asarray(sharded["norm"]["scale"]), params["norm"]["scale"])
    assert sharded["embed_tokens"].sharding == rep


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "hf")
    _build(path, moe=False, dtype=torch.bfloat16, seed=1)
    return path


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _no_output(out: str) -> None:
    parent = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if ".tmp-" in f]


def test_truncated_shard_is_refused_by_the_cli(small_hf, tmp_path):
    hf = _copy(small_hf, str(tmp_path / "hf"))
    shards = sorted(f for f in os.listdir(hf) if f.startswith("model-0"))
    shard = os.path.join(hf, shards[1])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    out = str(tmp_path / "out")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "qwen35_jax.convert", "hf-to-orbax", "--hf_dir", hf]
    r = subprocess.run(cmd + ["--out", out], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode != 0
    assert os.path.basename(shard) in r.stderr and "truncated" in r.stderr, r.stderr
    _no_output(out)


def test_missing_tensor_names_the_key(small_hf, tmp_path, capsys):
    hf = _copy(small_hf, str(tmp_path / "hf"))
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        index = json.load(f)
    victim = "model.language_model.layers.1.mlp.up_proj.weight"
    fname = os.path.join(hf, index["weight_map"][victim])
    st = SafetensorsFile(fname)
    keep = {k: np.array(st.get(k)) for k in st.keys() if k != victim}
    st.close()
    write_safetensors(fname, keep)
    out = str(tmp_path / "out")
    assert main(["hf-to-orbax", "--hf_dir", hf, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "missing (1)" in err and victim in err, err
    _no_output(out)


def test_wrong_config_is_refused(small_hf, tmp_path, capsys):
    hf = _copy(small_hf, str(tmp_path / "hf"))
    cfg_path = os.path.join(hf, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["text_config"]["intermediate_size"] = 44
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "out")
    assert main(["hf-to-orbax", "--hf_dir", hf, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "wrong shape" in err and "mlp.up_proj.weight: expected (44, 32)" in err, err
    _no_output(out)
    with open(cfg_path, "w") as f:
        f.write("{not json")
    assert main(["hf-to-orbax", "--hf_dir", hf, "--out", out]) == 1
    assert "config.json is not valid JSON" in capsys.readouterr().err
    _no_output(out)


def test_existing_output_is_not_overwritten(small_hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["hf-to-orbax", "--hf_dir", small_hf, "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_float32_conversion_of_bfloat16_exports_bfloat16_bit_exactly(small_hf, tmp_path):
    import orbax.checkpoint as ocp

    ckpt, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    args = ["hf-to-orbax", "--hf_dir", small_hf, "--out", ckpt, "--dtype", "float32"]
    assert main(args + ["--no_progress"]) == 0
    # a plain orbax PyTree checkpoint: orbax restores it without our code
    raw = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, "params"))
    assert raw["embed_tokens"].dtype == np.float32
    _, params = orbax_io.restore_params(ckpt)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert main(["orbax-to-hf", "--ckpt", ckpt, "--out", back, "--no_progress"]) == 0
    src, dst = _tensors(small_hf), _tensors(back)
    assert set(src) == set(dst)
    for key, a in src.items():
        assert a.dtype == dst[key].dtype == ml_dtypes.bfloat16, key
        assert a.tobytes() == dst[key].tobytes(), key


# ---- memory: a synthetic ~1 GB bfloat16 checkpoint converts with bounded peak RSS ----
BIG_TEXT = dict(
    SMALL_TEXT,
    vocab_size=32768,
    hidden_size=1024,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=8,
    head_dim=128,
    linear_num_value_heads=8,
    linear_value_head_dim=128,
    linear_key_head_dim=128,
    dtype="bfloat16",
)
# The checkpoint is 1009 MiB; loading it whole would need that plus the runtime (~300 MiB).
# Streaming writes each tensor (<= 64 MiB here) into its slice on disk: runtime + a few tensors.
# Measured (2 shared cores): 507 MiB peak VmHWM of the converting process, 167 MiB after imports.
RSS_BOUND_MB = 700
RSS_ABOVE_RUNTIME_MB = 450


@pytest.mark.slow
def test_memory_is_bounded_for_a_1gb_checkpoint(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = transformers.Qwen3_5TextConfig(**BIG_TEXT)
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    cfg.save_pretrained(str(hf))
    config = config_from_hf(str(hf))
    rng = np.random.default_rng(0)
    weight_map, shard, nbytes, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, nbytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        write_safetensors(str(hf / name), shard)
        weight_map.update({k: name for k in shard})
        shard, nbytes = {}, 0

    for r in hf_rules(config, multimodal_prefix=False):
        n = int(np.prod(r.shape))
        shard[r.key] = np.frombuffer(rng.bytes(2 * n), ml_dtypes.bfloat16).reshape(r.shape)
        nbytes += 2 * n
        total += 2 * n
        if nbytes > 100 * 2**20:
            flush()
    flush()
    with open(hf / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    assert total > 10**9
    script = textwrap.dedent(
        f"""
        import sys
        from qwen35_jax.convert.__main__ import main
        from qwen35_jax.convert import orbax_io

        def hwm_mb():  # this process's own peak (ru_maxrss would include the forking parent's)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        print("BASE_MB", hwm_mb())
        rc = main(["hf-to-orbax", "--hf_dir", {str(hf)!r}, "--out", {str(tmp_path / "ckpt")!r},
                   "--no_progress"])
        print("RSS_MB", hwm_mb())
        sys.exit(rc)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr
    base = float(r.stdout.split("BASE_MB")[1].split()[0])
    rss = float(r.stdout.split("RSS_MB")[1])
    print(f"checkpoint {total / 2**20:.0f} MiB, peak RSS {rss:.0f} MiB (runtime {base:.0f} MiB)")
    assert rss < RSS_BOUND_MB, (rss, total)
    assert rss - base < RSS_ABOVE_RUNTIME_MB, (rss, base)


def test_mesh_layout_chunks_fit_the_shards_and_restore_sharded(converted, tmp_path):
    """--mesh: no zarr chunk spans two devices' shards; restoring into the table's shardings on
    that mesh gives the same parameters."""
    from qwen35_jax import sharding

    _, hf_dir, plain, _ = converted
    ckpt = str(tmp_path / "meshed")
    assert (
        main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", ckpt, "--mesh", "fsdp=2,expert=4"]) == 0
    )
    config = config_from_hf(hf_dir)
    shards = orbax_io.shard_shapes(config, {"fsdp": 2, "expert": 4})
    full_shapes = orbax_io.leaf_shapes(config)
    split = 0
    for path, shard in shards.items():
        with open(os.path.join(ckpt, "params", ".".join(path), ".zarray")) as f:
            chunks = json.load(f)["chunks"]
        full = full_shapes[path].shape
        assert all(s % c == 0 for s, c in zip(shard, chunks, strict=True)), (path, shard, chunks)
        split += shard != tuple(full)
    assert split > 10  # most leaves are really sharded on this mesh
    with open(os.path.join(ckpt, "convert.json")) as f:
        assert json.load(f)["mesh"] == {"fsdp": 2, "expert": 4}

    mesh = sharding.make_mesh(fsdp=2, expert=4)
    shardings = sharding.logical_to_mesh_sharding(q.abstract_params(config), mesh)
    _, restored = orbax_io.restore_params(ckpt, shardings)
    _, reference = orbax_io.restore_params(plain)
    for (kp, x), y in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(reference), strict=True
    ):
        assert x.sharding == _at(shardings, kp), jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(kp))

    assert main(["hf-to-orbax", "--hf_dir", hf_dir, "--out", ckpt + "2", "--mesh", "fsdp=x"]) == 1
    assert not os.path.exists(ckpt + "2")


def _at(tree, keypath):
    for k in keypath:
        tree = tree[k.key]
    return tree
