"""A multi-turn conversation with a `Model`: history, trimming to the context, transcripts. No printing.

    session = ChatSession(model, system="Be brief.", temperature=0.7, seed=0)
    turn = session.send("Hello")
    for piece in turn:            # streamed text; the reply joins the history as it ends
        print(piece, end="")
    turn.dropped_turns            # oldest user/assistant pairs dropped to make room (0 usually)

Every turn renders the whole conversation (system prompt, kept turns, the new user message)
through the checkpoint's chat template. The reply budget is `max_new_tokens`, by default a quarter
of the context (at most 2048 tokens), so that a short context still holds a few turns of history.
When that prompt plus the budget would not fit in the context, the oldest user/assistant pairs are dropped from the history, never the system
prompt; if the new message alone still leaves less room than `max_new_tokens`, this turn's
`max_new_tokens` is lowered to what is left, and if it leaves no room at all the turn is refused
with an `OffloadMoeError` and the history is untouched.

With a `seed`, one random generator is seeded once for the whole session: each turn draws where the
previous one stopped (so turns differ), and replaying the same messages repeats the same replies.

A reply that stops early (the caller stops iterating, Ctrl-C, an error while generating) keeps
what was generated so far in the history, marked `interrupted`; a reply with no text at all is
dropped together with its user message, so roles keep alternating as chat templates expect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .model import GenerationRun
from ..base.errors import OffloadMoeError
from ..base.user_files import write_text


class ChatSession:
    """History of one conversation with `model`; `generation` holds the keyword arguments of `Model.stream`
    (max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos), checked here."""

    def __init__(self, model, *, system: str | None = None, **generation):
        if generation.get("max_new_tokens") is None:
            generation.pop("max_new_tokens", None)
        GenerationRun(model, [0], **generation)  # bad sampling settings fail here, not on every turn
        self.model = model
        self.system = system or None
        self.generation = dict(generation)
        seed = generation.get("seed")
        self.generator = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
        self.history: list[dict] = []       # alternating user/assistant messages still in the context
        self.log: list[dict] = []           # every message of this conversation, trimmed ones included
        self.trimmed_turns = 0
        self.started = time.time()

    @property
    def max_new_tokens(self) -> int:
        """The reply budget: the caller's max_new_tokens, else a quarter of the context (16 to 2048)."""
        if "max_new_tokens" in self.generation:
            return self.generation["max_new_tokens"]
        return default_reply_budget(self.model.context_length)

    def messages(self) -> list[dict]:
        """The conversation as the model sees it: the system prompt (if any), then the kept turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.history]

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.history, self.log, self.trimmed_turns = [], [], 0
        self.started = time.time()

    def set_system(self, text: str | None) -> None:
        """Replace (or, with None or "", remove) the system prompt; the turns so far are kept."""
        self.system = text or None

    def send(self, text: str) -> ChatTurn:
        """Prepare the reply to `text`: trims the history now, generates when iterated."""
        if not isinstance(text, str) or not text.strip():
            raise OffloadMoeError("message is empty (expected some text)")
        user = {"role": "user", "content": text}
        kept = list(self.history)
        context = self.model.context_length
        want = self.max_new_tokens
        dropped = 0
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.model.chat_ids(head + [{"role": m["role"], "content": m["content"]} for m in kept] + [user])
            if len(ids) + want <= context or not kept:
                break
            kept = kept[2:]  # the oldest user message and the reply to it
            dropped += 1
        if len(ids) >= context:
            raise OffloadMoeError(f"this message makes a prompt of {len(ids)} tokens, which leaves no room in "
                                  f"the context of {context} tokens (shorten it or raise the context length)")
        max_new = min(want, context - len(ids))
        self.history = kept
        self.trimmed_turns += dropped
        return ChatTurn(self, user, ids, dropped, max_new)

    def transcript(self) -> dict:
        """Everything needed to read or replay the conversation, as plain JSON-able data."""
        model = self.model
        settings = {"model": str(model.path), "device": str(model.device),
                    "dtype": str(model.dtype).removeprefix("torch."), "context_length": model.context_length,
                    **{k: v for k, v in model.settings.as_dict().items() if _jsonable(v)},
                    **self.generation}
        head = [{"role": "system", "content": self.system}] if self.system else []
        return {"format": "offload-moe-chat-transcript/1",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "messages": head + [dict(m) for m in self.log],
                "messages_in_context": len(head) + len(self.history),
                "trimmed_turns": self.trimmed_turns,
                "settings": settings}

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the transcript as JSON (UTF-8, indented); an existing file only with `force`."""
        return write_text(path, json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n", force=force,
                          what="transcript", hint="use /save FILE --force to overwrite it")

    def _commit(self, user: dict, reply: str, interrupted: bool) -> None:
        if not reply:
            return
        assistant = {"role": "assistant", "content": reply}
        if interrupted:
            assistant["interrupted"] = True
        self.history += [user, assistant]
        self.log += [user, assistant]


class ChatTurn:
    """One reply. Iterate for text pieces; when iteration ends (or stops early) the reply joins the history."""

    def __init__(self, session: ChatSession, user: dict, prompt_ids: list[int], dropped_turns: int,
                 max_new_tokens: int):
        self.session = session
        self.user = user
        self.prompt_ids = prompt_ids
        self.dropped_turns = dropped_turns
        self.max_new_tokens = max_new_tokens      # lowered below the session's when the context is short
        self.text = ""
        self.done = False                         # the model finished (EOS, stop string or length)
        self.result = None                        # the `Generation` once done
        self._pieces = self._generate()

    @property
    def capped(self) -> bool:
        return self.max_new_tokens < self.session.max_new_tokens

    @property
    def cut_by_context(self) -> bool:
        """The reply ran out of room in the context (it would have gone on): worth telling the user."""
        return (self.result is not None and self.result.finish_reason == "length"
                and (self.capped or self.result.context_full))

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self, shown: str | None = None) -> None:
        """Stop early (if still running) and settle the history now rather than at garbage collection.
        `shown`: the part of the reply the user saw (a prefix of `text`), kept instead of all of it."""
        if shown is not None and not self.done:
            self.text = shown
        self._pieces.close()

    def _generate(self) -> Iterator[str]:
        model = self.session.model
        kwargs = dict(self.session.generation, max_new_tokens=self.max_new_tokens,
                      generator=self.session.generator)
        try:
            for piece in model.stream(self.prompt_ids, **kwargs):
                self.text += piece
                yield piece
            self.done = True
            self.result = getattr(model, "last_result", None)
        finally:
            self.session._commit(self.user, self.text, interrupted=not self.done)


def default_reply_budget(context_length: int) -> int:
    return max(16, min(context_length // 4, 2048))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
