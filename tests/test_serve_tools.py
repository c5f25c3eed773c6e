"""The server's sampling extras, log-probabilities and tool calling, through the official openai client.

Log-probabilities are checked against the log-softmax of the model's own logits at every step; tool
prompts against transformers' `apply_chat_template(messages, tools=...)` on a tiny Qwen3-MoE with a
Qwen3-style template; tool-call output (forced by a scripted model that runs the real forward and then
puts all the mass on the next scripted token) comes back as `tool_calls`, streamed and not."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import offload_moe  # noqa: E402
from offload_moe.server import create_app  # noqa: E402
from offload_moe.server.tools import HARMONY, HERMES, MISTRAL, tool_format  # noqa: E402
from serve_fixtures import feed_all, running_server  # noqa: E402
from serve_fixtures import checkpoint, reference  # noqa: E402,F401  (fixtures)

NAME = "tiny"


def client_for(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------- logprobs and penalties


@pytest.fixture(scope="module")
def client(checkpoint):
    with running_server(create_app(offload_moe.load(checkpoint, device="cpu"), model_name=NAME)) as base:
        yield client_for(base)


def step_logprobs(model, prompt_ids, new_ids):
    """log-softmax of the model's logits at each generated position: (len(new_ids), V)."""
    ids = torch.tensor([prompt_ids + new_ids])
    logits = model.logits(ids)[0, len(prompt_ids) - 1:len(prompt_ids) - 1 + len(new_ids)]
    return torch.log_softmax(logits.double(), -1)


def test_completion_logprobs_are_the_log_softmax_of_the_models_logits(client, reference):
    prompt = "The quick brown fox"
    for stream in (False, True):
        kwargs = dict(model=NAME, prompt=prompt, max_tokens=6, temperature=0.9, seed=3, logprobs=3)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
            tops = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.top_logprobs]
        else:
            lp = client.completions.create(**kwargs).choices[0].logprobs
            tokens, lps, tops = lp.tokens, lp.token_logprobs, lp.top_logprobs
        expected = reference.generate(prompt, max_new_tokens=6, temperature=0.9, seed=3)
        new = expected.token_ids
        assert len(lps) == len(new) == 6
        ref = step_logprobs(reference, reference.encode_prompt(prompt), new)
        for i, t in enumerate(new):
            assert lps[i] == pytest.approx(float(ref[i, t]), abs=1e-4)
            top = torch.topk(ref[i], 3).values.tolist()
            # a dict keyed by token text: two ids with the same text share a key (OpenAI's legacy shape)
            assert tops[i] and all(any(abs(v - x) < 1e-4 for x in top) for v in tops[i].values())
            assert max(tops[i].values()) == pytest.approx(top[0], abs=1e-4)
        assert "".join(tokens) == expected.text


def test_chat_logprobs_streamed_and_not(client, reference):
    messages = [{"role": "user", "content": "Hello world"}]
    ids = reference.chat_ids(messages)
    expected = reference.generate(ids, max_new_tokens=5, temperature=0)
    ref = step_logprobs(reference, ids, expected.token_ids)
    kwargs = dict(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    for content in (whole, streamed):
        assert len(content) == len(expected.token_ids)
        for i, (entry, t) in enumerate(zip(content, expected.token_ids)):
            assert entry.logprob == pytest.approx(float(ref[i, t]), abs=1e-4)
            assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy: the top one
            assert [x.logprob for x in entry.top_logprobs] == pytest.approx(torch.topk(ref[i], 2).values.tolist(),
                                                                             abs=1e-4)
        assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == expected.text


def test_penalties_and_min_p_reach_the_sampler(client, reference):
    prompt = "Hello world"
    extras = dict(presence_penalty=1.5, frequency_penalty=0.5, min_p=0.05)
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body=dict(
        repetition_penalty=1.7), **{k: v for k, v in extras.items() if k != "min_p"}).choices[0].text
    expected = reference.generate(prompt, max_new_tokens=12, temperature=0, repetition_penalty=1.7,
                                  presence_penalty=1.5, frequency_penalty=0.5).text
    plain = reference.generate(prompt, max_new_tokens=12, temperature=0).text
    assert got == expected and got != plain
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                         temperature=1.0, seed=5, extra_body=dict(min_p=0.2)).choices[0].message.content
    ids = reference.chat_ids([{"role": "user", "content": prompt}])
    assert got == reference.generate(ids, max_new_tokens=8, temperature=1.0, seed=5, min_p=0.2).text


# ---------------------------------------------------------------- tools on a tiny Qwen3-MoE

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3-MoE (transformers) with a byte-level BPE tokenizer carrying Qwen's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    d = tmp_path_factory.mktemp("qwen3")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What is the weather in Paris today?", "get_weather city function arguments name",
                             CALL_TEXT, "It is sunny and 21 degrees."] * 4, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in
                    ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": QWEN3_TEMPLATE}))
    config = Qwen3MoeConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=40,
                            moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=1024, bos_token_id=None,
                            eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=0)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).eval().save_pretrained(d)
    return d


class Scripted:
    """The real transformer, with its logits replaced by a one-hot on the next scripted token."""

    def __init__(self, transformer, script: list[int]):
        self.inner, self.script, self.step, self.next = transformer, script, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, tokens, start, **kwargs):
        logits = self.inner(tokens, start=start, **kwargs)
        # a prompt (which may start after a reused prefix) restarts the script; a decode step advances it
        self.step = 0 if tokens.shape[1] > 1 or start != self.next else self.step + 1
        self.next = start + tokens.shape[1]
        forced = torch.full_like(logits, -1e4)
        forced[..., self.script[min(self.step, len(self.script) - 1)]] = 0.0
        return forced


def test_tool_prompt_ids_equal_transformers_apply_chat_template(qwen3):
    from transformers import AutoTokenizer

    ours = offload_moe.load(qwen3, device="cpu")
    hf = AutoTokenizer.from_pretrained(qwen3)
    conversations = [
        [{"role": "user", "content": "What is the weather in Paris?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}],
    ]
    with running_server(create_app(ours, model_name=NAME)) as base:
        client = client_for(base)
        for messages in conversations:
            expected = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
            expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
            assert ours.chat_ids(messages, tools=TOOLS) == list(expected)
            usage = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=1,
                                                   temperature=0).usage
            assert usage.prompt_tokens == len(expected)


def test_a_tool_call_comes_back_as_tool_calls_streamed_and_not(qwen3):
    model = offload_moe.load(qwen3, device="cpu")
    eos = model.tokenizer.token_id("<|im_end|>")
    script = model.tokenizer.encode("Let me check.\n" + CALL_TEXT, add_special_tokens=False) + [eos]
    model.transformer = Scripted(model.transformer, script)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with running_server(create_app(model, model_name=NAME)) as base:
        client = client_for(base)
        reply = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check.\n"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        stream = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0,
                                                stream=True)
        content, calls, reasons = "", {}, []
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for c in delta.tool_calls or []:
                entry = calls.setdefault(c.index, {"name": "", "arguments": ""})
                entry["name"] += c.function.name or ""
                entry["arguments"] += c.function.arguments or ""
            reasons.append(chunk.choices[0].finish_reason)
        assert content == "Let me check.\n" and "<tool_call>" not in content
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
        assert reasons[-1] == "tool_calls"

        # the tool's answer goes back as a role "tool" message and the conversation continues
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
        again = client.chat.completions.create(model=NAME, messages=follow, tools=TOOLS, max_tokens=3, temperature=0)
        assert again.usage.prompt_tokens == len(model.chat_ids(
            messages + [{"role": "assistant", "content": "Let me check.\n", "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}], tools=TOOLS))


# ---------------------------------------------------------------- the parsers, fed piece by piece




def test_parsers_for_each_family():
    assert feed_all(HERMES, "Sure." + CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Rome")) == \
        ("Sure.", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})])
    assert feed_all(HERMES, "No tools <tool here") == ("No tools <tool here", [])
    assert feed_all(MISTRAL, 'Ok[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]') == \
        ("Ok", [("get_weather", {"city": "Paris"})])
    assert feed_all(MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}') == ("", [("get_weather", {"city": "Oslo"})])
    harmony = ("<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary "
               'to=functions.get_weather <|constrain|>json<|message|>{"city": "Lima"}')
    assert feed_all(HARMONY, harmony) == ("", [("get_weather", {"city": "Lima"})])
    answer = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>It is 21 C."
    assert feed_all(HARMONY, answer) == ("It is 21 C.", [])


def test_the_format_is_read_from_the_template():
    assert tool_format(QWEN3_TEMPLATE) == HERMES
    assert tool_format("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") == MISTRAL
    assert tool_format("<|channel|>commentary to=functions.{{ name }}") == HARMONY
    assert tool_format("{{ messages[0].content }}") is None
