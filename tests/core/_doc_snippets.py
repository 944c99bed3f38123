"""The fenced code blocks of README.md and docs/*.md, and how the docs tests run them.

A Python block runs as it is, in a fresh interpreter whose working directory is an
empty temporary folder. An HTML comment on the line before the fence (blank lines
between are allowed) changes that:

* ``<!-- illustrative -->`` (optionally ``<!-- illustrative: why -->``): not run;
* ``<!-- setup: NAME -->``: :data:`SETUPS` ``[NAME]`` runs first, in the same
  namespace, defining what the block takes as given (``model``, ``adapter``, ...);
* ``<!-- file: PATH -->``: the block is (part of) the file ``PATH`` of the page's
  example; blocks naming one file are joined in page order.

A setup whose block needs an optional package (torchtitan, s3fs) starts with
``pytest.importorskip("torchtitan")``: where it is missing the block is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its marker and its code."""

    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str | None  # "illustrative", "setup", "file" or None
    value: str | None  # the setup name or file path
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with the marker comment just before it."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        marker = value = None
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mm = _MARKER.match(lines[k].strip()) if k >= 0 else None
        if mm:
            marker, value = mm.group(1), mm.group(2)
        code = "\n".join(lines[start + 1 : j]) + "\n"
        out.append(Block(page, start + 1, lang, marker, value, code))
        i = j + 1
    return out


def python_blocks() -> list[Block]:
    """Every Python block of every page."""
    return [b for page in PAGES for b in blocks(page) if b.lang == "python"]


def files_of(page: Path) -> dict[str, str]:
    """The files a page spells out in ``<!-- file: PATH -->`` blocks, joined in page order."""
    out: dict[str, list[str]] = {}
    for block in blocks(page):
        if block.marker == "file":
            out.setdefault(block.value, []).append(block.code)
    return {path: "\n".join(parts) for path, parts in out.items()}


# -- setups: what a block takes as given ----------------------------------------------

_TINY_LLAMA = '''
import torch
from ckpt_core.content.families import model_family

_family = model_family("llama")
_config = _family.config_for("tiny")
torch.manual_seed(0)
model = _family.build_model(_config)          # the reference Llama, tiny flavor
adapter = _family.adapter(_config)            # its HF state-dict adapter
steps, tokens = 3, 2 * 16
batch = torch.randint(0, 256, (2, 16))


class _Loader:
    """A data loader that is Stateful: where it is in the data."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


loader = _Loader()


def train_step(tokens=batch):
    loader.position += 1
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    return loss
'''

_TRAINER = (
    _TINY_LLAMA
    + """
from ckpt_core import ConverterSet

converters = ConverterSet.from_config(["lora"], {"lora": {"rank": 4}})
converters.convert(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
sched = torch.optim.lr_scheduler.LinearLR(opt)
ema = torch.optim.swa_utils.AveragedModel(model)
"""
)

_MANAGER = (
    _TRAINER
    + """
from ckpt_core import CheckpointConfig, CheckpointManager

manager = CheckpointManager(CheckpointConfig(folder="ckpt", interval=2), model, optimizers=opt,
                            converters=converters, sd_adapter=adapter)
start = 1
"""
)

_HF_LLAMA_FOLDER = """
import torch
from tests.core.hf_helpers import hf_llama

hf_llama(layers=1, vocab=64).save_pretrained("models/llama-hf")
tokens = torch.randint(0, 64, (2, 8))
"""

_TRANSFORMERS_DISTRIBUTED = """
import os
import torch
import torch.distributed as dist
from tests.core._qwen3_hf import hf_model

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
dist.init_process_group("gloo", rank=0, world_size=1)
hf_model("qwen3").save_pretrained("models/qwen3-0.6b")   # a tiny stand-in
steps = 2
batches = iter(torch.randint(0, 96, (2, 12)) for _ in range(steps))
"""

_GPT2_EXPORT = """
from transformers import GPT2Config, GPT2LMHeadModel

GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
                ).save_pretrained("exported")
"""

_TINY_LLAMA_S3 = (
    _TINY_LLAMA
    + """
import os
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")
import boto3
from moto.server import ThreadedMotoServer

_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # loopback S3
_server.start()
os.environ.update(
    AWS_ENDPOINT_URL="http://%s:%d" % _server.get_host_and_port(),
    AWS_ACCESS_KEY_ID="docs",
    AWS_SECRET_ACCESS_KEY="docs",
    AWS_DEFAULT_REGION="us-east-1",
)
boto3.client("s3").create_bucket(Bucket="my-bucket")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
"""
)

#: setup name → (code run first, whether it needs an interpreter of its own)
SETUPS: dict[str, tuple[str, bool]] = {
    "tiny-llama": (_TINY_LLAMA, False),
    "tiny-llama-trainer": (_TRAINER, False),
    "tiny-llama-manager": (_MANAGER, False),
    "hf-llama-folder": (_HF_LLAMA_FOLDER, False),
    "transformers-distributed": (_TRANSFORMERS_DISTRIBUTED, True),
    "gpt2-export": (_GPT2_EXPORT, False),
    "tiny-llama-s3": (_TINY_LLAMA_S3, False),
}

#: Runs jobs (a JSON list of {"id", "setup", "code", "cwd"}) one after another in one
#: interpreter, each in its own folder and namespace; prints one JSON result per job.
RUNNER = r"""
import json, os, sys, traceback
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    os.chdir(job["cwd"])
    names = {"__name__": "__doc_snippet__"}
    try:
        exec(compile(job["setup"], "<setup of " + job["id"] + ">", "exec"), names)
        exec(compile(job["code"], job["id"], "exec"), names)
        manager = names.get("manager")
        if manager is not None and hasattr(manager, "close"):
            manager.close()
        result = {"id": job["id"], "ok": True}
    except BaseException as exc:
        if type(exc).__name__ == "Skipped":  # pytest.importorskip in a setup
            result = {"id": job["id"], "ok": True, "skipped": str(exc)}
        else:
            result = {"id": job["id"], "ok": False, "error": traceback.format_exc()[-4000:]}
    print("RESULT " + json.dumps(result), flush=True)
"""
