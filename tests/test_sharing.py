"""One backbone for every LoRA function: zero-copy binding is exact, the mapping is shared
and read-only, and adapters that would need private backbone copies are refused."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from faas import Client, HandlerError, SpecError, function
from faas.bundled import TINY_LLAMA, TINY_QWEN2, adapter_path, model_path
from faas.localnode import LocalNode
from runtime.backbone.skeleton import bind_shared
from runtime.backbone.weights import CpuSharedFile
from bench.accounting import processes
from tests.conftest import nodes_of, sandbox_host_pids, zygote_family, zygote_pid


@pytest.mark.parametrize(("model", "adapter"), [(TINY_LLAMA, "support"), (TINY_QWEN2, "chat")])
def test_bound_skeleton_logits_equal_from_pretrained(models, tmp_path, model, adapter):
    reference = AutoModelForCausalLM.from_pretrained(model_path(model))
    export = CpuSharedFile().export(dict(reference.state_dict()))
    shared = bind_shared(model_path(model), CpuSharedFile().attach(export.manifest, export.fds))
    tokenizer = AutoTokenizer.from_pretrained(model_path(model))
    inputs = tokenizer("Where is my parcel? It was due on Monday.", return_tensors="pt")
    ref_peft = PeftModel.from_pretrained(reference, adapter_path(adapter, model)).eval()
    shared_peft = PeftModel.from_pretrained(shared, adapter_path(adapter, model)).eval()
    with torch.no_grad():
        assert torch.equal(ref_peft(**inputs).logits, shared_peft(**inputs).logits)
    weight = shared.get_input_embeddings().weight
    if model == TINY_QWEN2:  # tied: one storage for input and output embeddings
        assert shared.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
    # Bound, not copied: the weight lives inside this process's read-only file mapping.
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines()
              if "/memfd:faas-backbone" in line and line.split()[1].startswith("r--")]
    assert any(lo <= weight.data_ptr() < hi for lo, hi in ranges)
    assert not any(p.requires_grad for p in shared.parameters())


def lora_folder(tmp_path: Path, **config) -> str:
    base = AutoModelForCausalLM.from_pretrained(model_path())
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], **config))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return str(out)


def test_adapter_with_modules_to_save_is_refused_at_declaration(models, tmp_path):
    adapter = lora_folder(tmp_path, modules_to_save=["lm_head"])
    with pytest.raises(SpecError, match="modules_to_save"):
        function(name="x", backbone=model_path(), adapter=adapter)(lambda e, c: e)


def backbone_mappings(pid: int) -> list[dict[str, int]]:
    """smaps entries (in kB, with the file's inode) of shared backbone files mapped in pid."""
    entries, current = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = None
            if "/memfd:faas-backbone" in line:
                # Read-only and shared: no write, and no copy-on-write, is possible.
                assert line.split()[1] == "r--s", line
                current = {"inode": int(line.split()[4])}
                entries.append(current)
        elif current is not None and line.split(":")[0] in (
                "Rss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty"):
            current[line.split(":")[0]] = int(line.split()[1])
    return entries


def mappings_by_backbone(pids: list[int]) -> dict[int, dict[int, list[dict[str, int]]]]:
    """Backbone file inode -> pid -> that process's smaps entries of it."""
    by_inode: dict[int, dict[int, list[dict[str, int]]]] = {}
    for pid in pids:
        for entry in backbone_mappings(pid):
            by_inode.setdefault(entry["inode"], {}).setdefault(pid, []).append(entry)
    return by_inode


async def test_sandboxes_and_the_engine_map_one_shared_read_only_backbone(client, node):
    for name, event in [("writer-sandbox", {"prompt": "hi"}), ("summarize", {"text": "t"}),
                        ("sql", {"question": "q"})]:
        await client.invoke(name, {**event, "max_new_tokens": 2}, timeout_s=120)
    (listing,) = await nodes_of(node)
    (llama,) = [b for b in listing["backbones"] if b["model"] == model_path()]
    # The engine (serving summarize and sql) holds it, and so does writer-sandbox's sandbox.
    assert llama["users"] >= 2 and llama["backend"] == "cpu-shm"
    engines = [p.pid for p in processes() if b"runtime.engine.server" in p.cmdline]
    for _ in range(100):  # the pre-loader may be replacing one: wait for it to map too
        by_inode = mappings_by_backbone([pid for pid, _, _ in zygote_family()] + engines)
        mapped = max(by_inode.values(), key=len)  # the Llama backbone: most processes map it
        if len(mapped) >= 2 and set(mapped) & set(engines):
            break
        await asyncio.sleep(0.1)
    assert len(mapped) >= 2 and set(mapped) & set(engines)
    for pid, entries in mapped.items():
        # tmpfs pages count as dirty; "private" ones are pages only this process touched.
        rss_kb = sum(e["Rss"] for e in entries)
        shared_kb = sum(e["Shared_Clean"] + e["Shared_Dirty"] for e in entries)
        assert shared_kb >= 0.95 * rss_kb > 0, f"process {pid}: {entries}"


async def test_write_to_shared_weights_kills_only_the_writer(client):
    event = {"message": "Is my refund on its way?", "max_new_tokens": 12}
    before = (await client.invoke("support", event, timeout_s=120)).output["token_ids"]
    with pytest.raises(HandlerError, match="exited with code -11"):
        await client.invoke("scribble", {}, timeout_s=120)
    after = (await client.invoke("support", event, timeout_s=120)).output["token_ids"]
    assert after == before
    with pytest.raises(HandlerError, match="exited with code -11"):  # replaced, and faults again
        await client.invoke("scribble", {}, timeout_s=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="uid separation and namespaces need a root node")
async def test_a_function_cannot_reach_beyond_its_sandbox(client, node):
    other = (await client.invoke("crash", {})).output
    (other_pid,) = sandbox_host_pids(other["uid"])
    event = {"node_pid": node.proc.pid, "zygote_pid": zygote_pid(node.proc.pid),
             "other_pid": other_pid, "nats": node.url}
    report = (await client.invoke("intruder", event, timeout_s=120)).output
    uid = report.pop("uid")
    assert uid != 0 and uid != os.getuid()
    assert all(result.startswith("blocked") for result in report.values()), report
    # untouched, still serving
    assert (await client.invoke("crash", {})).output["instance"] == other["instance"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="tells this node's sandboxes apart by their uids")
async def test_a_200m_backbone_is_mapped_once_by_four_lora_functions(models, faas_home, tmp_path):
    """The issue's scale: a ~190M-parameter Llama (bf16) and 4 LoRA functions on one node;
    every sandbox maps the same backbone, shared, with almost nothing private."""
    from bench.models import PROMPT, build_model, write_functions

    model_dir = build_model(faas_home / "bench-models", 4, "m200")
    functions = tmp_path / "functions"
    write_functions(functions, model_dir, [f"fn{i}" for i in range(4)], engine="sandbox")
    functions.chmod(0o755)
    for path in [tmp_path, *functions.iterdir()]:
        path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else 0o644)
    node = LocalNode(functions, state_dir=tmp_path / "nats", extra_args=("--sandbox-uids", "66000-66999"))
    node.start()
    try:
        async with Client(node.url) as client:
            for i in range(4):
                await client.invoke(f"fn{i}", {"prompt": PROMPT}, timeout_s=300)
        # This node's sandboxes (by their uids), not the session node's.
        by_inode = mappings_by_backbone([pid for pid, _, uid in zygote_family()
                                         if 66000 <= uid <= 66999])
        (mapped,) = by_inode.values()
        assert len(mapped) == 4
        backbone_kb = (model_dir / "model.safetensors").stat().st_size // 1024
        for pid, entries in mapped.items():
            rss_kb = sum(e["Rss"] for e in entries)
            private_kb = sum(e["Private_Clean"] + e["Private_Dirty"] for e in entries)
            assert rss_kb > 0.9 * backbone_kb, f"sandbox {pid} maps only {rss_kb} kB"
            assert private_kb < 0.02 * rss_kb, f"sandbox {pid}: {private_kb} kB private"
    finally:
        node.stop()


def test_digests_catch_a_changed_weight_and_swapped_rows():
    """What a GPU backbone uses to notice writes through its (writable) CUDA IPC mappings: a
    digest of the bytes, which a permutation changes too (swapping two rows of the output
    layer swaps two tokens' logits for every function; a sum of words would not change)."""
    from runtime.backbone.weights import corrupted, digest

    tensors = {"w": torch.randn(1000, dtype=torch.bfloat16), "odd": torch.randn(3, dtype=torch.bfloat16),
               "b": torch.arange(10, dtype=torch.int64), "lm_head": torch.randn(64, 32)}
    baseline = {name: digest(t) for name, t in tensors.items()}
    assert corrupted(tensors, baseline) == []
    tensors["w"][517] += 1
    tensors["odd"][1] = 0
    tensors["lm_head"][[3, 40]] = tensors["lm_head"][[40, 3]]
    assert corrupted(tensors, baseline) == ["w", "odd", "lm_head"]
    # The same bytes give the same digest, whatever the chunk size.
    assert digest(tensors["lm_head"], chunk_bytes=100) == digest(tensors["lm_head"])
