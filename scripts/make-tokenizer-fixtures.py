#!/usr/bin/env python3
"""Tokenizer oracle fixtures: two tiny tokenizers trained here on a synthetic corpus (nothing downloaded),
shaped like the two families the engine must read, with the encodings the Hugging Face `tokenizers` library
produces and the chat renderings transformers' apply_chat_template(tokenize=False) produces.

  tokenizer-qwen-style/   byte-level BPE (Qwen2 split regex + ByteLevel, NFC), ~600 tokens,
                          <|endoftext|> <|im_start|> <|im_end|>, a long ChatML template (default system
                          message, tools, tool calls and tool responses, reasoning kept only after the last
                          user turn, add_generation_prompt)
  tokenizer-llama-style/  SentencePiece-like BPE (Metaspace "▁" with prepend_scheme "first", byte_fallback,
                          <unk> <s> </s> and the 256 <0xNN> byte tokens), <s> added by a TemplateProcessing
                          post-processor, a Mixtral-style [INST] template that raises on bad role order

Each folder: tokenizer.json, tokenizer_config.json, tokenizer_expected.json with
  vocab_size, add_special_tokens (true: ids are tok.encode(text).ids with the default, which runs the
  post-processor), cases [{text, ids, tokens, decoded}] (decoded with skip_special_tokens=False),
  chat_cases [{messages, tools?, add_generation_prompt, rendered}] or {..., error} where the template raises.

Usage: python3 scripts/make-tokenizer-fixtures.py --out DIR   (needs tokenizers, transformers, jinja2)
"""
import argparse
import json
import os
import random
import shutil

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import tokenizers
import transformers
from transformers import AutoTokenizer

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
META = "\u2581"  # ▁


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- corpus

WORDS = ("the a of to and in is it that for on with as was at by this be are from or have an they which "
         "one you had not but what all were when we there can your more if will about out up them then she "
         "many some so these would other into has her two like him see time could no make than first been "
         "its who now people my made over did down only way find use may water long little very after "
         "words called just where most know get through back much before go good new write our used me man "
         "too any day same right look think also around another came come work three word must because "
         "does part even place well such here take why things help put years different away again off went "
         "number answer function call tool weather city temperature result search query sum list reverse "
         "sort count step reason assistant user system").split()
ACCENTED = "café naïve résumé über façade jalapeño smörgåsbord déjà vu crème brûlée".split()


def corpus(seed):
    """Sentences, arithmetic, code and tool-call JSON: the kinds of text the fixtures' cases contain, so
    the merges are meaningful. Only ASCII and Latin-1 letters: CJK and emoji stay out of the vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        n = rng.randint(4, 16)
        s = " ".join(rng.choice(WORDS + ACCENTED[:2]) for _ in range(n))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":"]))
        a, b = rng.randint(0, 9999), rng.randint(0, 999)
        lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        city = rng.choice(["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo"])
        lines.append(json.dumps({"name": "get_weather", "arguments": {"city": city, "unit": rng.choice(["c", "f"])}}))
        lines.append(f"def f{rng.randint(0, 99)}(x, y):\n    return x * {rng.randint(2, 9)} + y\n")
        lines.append(f"I'm sure they'll say it's {rng.choice(WORDS)} and we've {rng.choice(WORDS)} -- don't worry.")
    lines.extend(ACCENTED * 20)
    return lines


# ---------------------------------------------------------------------------------------- qwen style

QWEN_TEMPLATE = r"""{#- ChatML in the style of Qwen2.5/Qwen3, written for this fixture.
   system: the first message if it is a system message, else a default one; tools (if given) are listed
   inside the system turn. Assistant tool calls become <tool_call> blocks; consecutive tool messages are
   grouped into one user turn of <tool_response> blocks. Reasoning (<think>...</think>) is kept only in
   assistant turns after the last real user query. -#}
{%- set default_system = 'You are Tiny, a careful assistant. Answer briefly.' -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_text = messages[0].content -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = default_system -%}
    {%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' ~ system_text -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou can call the functions described below. Their signatures, one JSON object per line:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' ~ ((tool.function if tool.function is defined else tool) | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, answer with one block per call:\n<tool_call>\n{"name": <function name>, "arguments": <JSON object of arguments>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{% set ns = namespace(last_query=-1) -%}
{%- for m in rest -%}
    {%- if m.role == 'user' and not (m.content is string and m.content.startswith('<tool_response>')) -%}
        {%- set ns.last_query = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for m in rest -%}
    {%- if m.role == 'system' -%}
        {{- raise_exception('a system message may only come first') -}}
    {%- elif m.role == 'user' -%}
        {{- '<|im_start|>user\n' ~ m.content ~ '<|im_end|>\n' -}}
    {%- elif m.role == 'assistant' -%}
        {%- set text = m.content if m.content is string else '' -%}
        {%- if '</think>' in text -%}
            {%- set reasoning = text.split('</think>')[0].split('<think>')[-1].strip() -%}
            {%- set text = text.split('</think>')[-1].lstrip('\n') -%}
        {%- else -%}
            {%- set reasoning = '' -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if reasoning and loop.index0 > ns.last_query -%}
            {{- '<think>\n' ~ reasoning ~ '\n</think>\n\n' -}}
        {%- endif -%}
        {{- text -}}
        {%- if m.tool_calls -%}
            {%- for call in m.tool_calls -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if text or not loop.first %}{{ '\n' }}{% endif -%}
                {{- '<tool_call>\n{"name": "' ~ fn.name ~ '", "arguments": ' -}}
                {%- if fn.arguments is string -%}
                    {{- fn.arguments -}}
                {%- else -%}
                    {{- fn.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or rest[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' ~ m.content ~ '\n</tool_response>' -}}
        {%- if loop.last or rest[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('unknown role: ' ~ m.role) -}}
    {%- endif -%}
{%- endfor -%}
{#- written as raw text on purpose: HF renders with trim_blocks and lstrip_blocks, which eat the newline
    after the if tag and keep the one after "assistant" -#}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif -%}
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
SUM_TOOL = {"type": "function", "function": {
    "name": "sum_list", "description": "Adds numbers — exactly.",
    "parameters": {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}}},
                   "required": ["xs"]}}}

QWEN_TEXTS = [
    "What is 12 + 345?", "The answer is 357.", "  leading spaces and\ttabs\n\nnewlines\r\n", "DON'T Won't I'LL they're",
    "héllo wörld — ünïcode ✓ 日本語", "e\u0301 vs \u00e9 (NFC)", "emoji 🙂🙃 mix", "1234567890", "", " ",
    "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "def f(x, y):\n    return x * 3 + y\n", "<think>1+1</think> 2<|endoftext|>", "a  b   c    d",
]

QWEN_CHATS = [
    dict(messages=[{"role": "user", "content": "What is 7 + 8?"}], add_generation_prompt=True),
    dict(messages=[{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "12+30?"},
                   {"role": "assistant", "content": "42"}, {"role": "user", "content": "And 5+5?"}],
         add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         add_generation_prompt=False),
    dict(messages=[{"role": "system", "content": "Use tools when useful."},
                   {"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_TOOL, SUM_TOOL],
         add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Sum 1, 2 and 3.5"}], tools=[SUM_TOOL], add_generation_prompt=True),
    dict(messages=[
        {"role": "user", "content": "Weather in Paris and Lima, in f?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "f"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\", \"unit\": \"f\"}"}}]},
        {"role": "tool", "content": "{\"temperature\": 61}"},
        {"role": "tool", "content": "{\"temperature\": 70}"},
        {"role": "assistant", "content": "Paris 61F, Lima 70F."}], tools=[WEATHER_TOOL], add_generation_prompt=False),
    dict(messages=[
        {"role": "user", "content": "Check Tokyo."},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "{\"temperature\": 18, \"sky\": \"clear\"}"}], tools=[WEATHER_TOOL],
         add_generation_prompt=True),
    dict(messages=[
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>three doubled</think>6"}],
         add_generation_prompt=False),
    dict(messages=[{"role": "system", "content": "Réponds en français 🙂"}, {"role": "user", "content": "日本語は?"}],
         add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], add_generation_prompt=True),
]


def make_qwen(outdir):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600 - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(7), trainer)
    # added after training so they get the last ids, as in Qwen2 (the engine must not assume 0..2)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(outdir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "chat_template": QWEN_TEMPLATE}
    with open(os.path.join(outdir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return QWEN_TEXTS, QWEN_CHATS


# --------------------------------------------------------------------------------------- llama style

LLAMA_TEMPLATE = r"""{#- [INST] template in the style of Mixtral-Instruct, written for this fixture: an optional leading
   system message is folded into the first user turn; user and assistant must alternate, starting with user. -#}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set preamble = messages[0]['content'] | trim ~ '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set preamble = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for turn in turns -%}
    {%- set expect_user = loop.index0 is even -%}
    {%- if (turn['role'] == 'user') != expect_user -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... (message ' ~ loop.index ~ ' is ' ~ turn['role'] ~ ')') -}}
    {%- endif -%}
    {%- if turn['role'] == 'user' -%}
        {{- '[INST] ' ~ (preamble if loop.first else '') ~ turn['content'] | trim ~ ' [/INST]' -}}
    {%- elif turn['role'] == 'assistant' -%}
        {{- ' ' ~ turn['content'] | trim ~ eos_token -}}
    {%- else -%}
        {{- raise_exception('Only user and assistant roles are supported after an optional system message') -}}
    {%- endif -%}
{%- endfor -%}
"""

LLAMA_TEXTS = [
    "Hello world", " Hello world", "Hello  world   three", "line one\nline two\n\nend", "What is 12 + 345?",
    "café naïve résumé", "日本語", "emoji 🙂🙃!", "mixed 中文 and ✓ marks", "tab\there", "", " ", "▁already",
    "<s>[INST] What is 2+2? [/INST] 4</s>", "I'm sure they'll say it's fine -- don't worry.", "x" * 40,
]

LLAMA_CHATS = [
    dict(messages=[{"role": "user", "content": "What is 7 + 8?"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "  How are you?  "}], add_generation_prompt=False),
    dict(messages=[{"role": "system", "content": "Answer with a number. "}, {"role": "user", "content": "12+30?"},
                   {"role": "assistant", "content": " 42 "}, {"role": "user", "content": "And 5+5?"}],
         add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "日本語で 🙂"}, {"role": "assistant", "content": "はい ✓"}],
         add_generation_prompt=False),
    dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
         add_generation_prompt=False),
    dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], add_generation_prompt=True),
    dict(messages=[{"role": "assistant", "content": "I start"}], add_generation_prompt=True),
    dict(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "{}"}], add_generation_prompt=True),
]


def make_llama(outdir):
    # train the merges on Metaspace-split words, then lay the vocabulary out as Llama does:
    # <unk>=0 <s>=1 </s>=2, the 256 byte tokens <0x00>..<0xFF> at 3..258, learned pieces after them
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    n_fixed = 3 + 256
    trainer = trainers.BpeTrainer(vocab_size=600 - n_fixed, show_progress=False)
    trainer_tok.train_from_iterator(corpus(11), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(os.path.join(outdir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "chat_template": LLAMA_TEMPLATE}
    with open(os.path.join(outdir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return LLAMA_TEXTS, LLAMA_CHATS


# ---------------------------------------------------------------------------------------- expected

def expected(outdir, texts, chats):
    tok = Tokenizer.from_file(os.path.join(outdir, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(outdir)
    cases = []
    disagreements = []
    for text in texts:
        enc = tok.encode(text)  # default add_special_tokens=True: the post-processor runs
        ids = enc.ids
        hf_ids = hf(text)["input_ids"]
        if hf_ids != ids:
            disagreements.append({"text": text, "tokenizers": ids, "transformers": hf_ids})
        cases.append({"text": text, "ids": ids, "tokens": enc.tokens,
                      "decoded": tok.decode(ids, skip_special_tokens=False)})
    byte_fallback_used = any(t.startswith("<0x") for c in cases for t in c["tokens"])
    chat_cases = []
    for c in chats:
        entry = {"messages": c["messages"]}
        if "tools" in c:
            entry["tools"] = c["tools"]
        entry["add_generation_prompt"] = c["add_generation_prompt"]
        try:
            entry["rendered"] = hf.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False,
                                                       add_generation_prompt=c["add_generation_prompt"])
        except Exception as e:  # the template's raise_exception surfaces as jinja2 TemplateError
            entry["error"] = str(e)
            entry["error_type"] = type(e).__name__
        chat_cases.append(entry)
    out = {"vocab_size": tok.get_vocab_size(), "add_special_tokens": True,
           "special_tokens_added": "post-processor of tokenizer.json, via tok.encode(text) defaults",
           "tokenizers_version": tokenizers.__version__, "transformers_version": transformers.__version__,
           "transformers_encode_agrees": not disagreements, "byte_fallback_used": byte_fallback_used,
           "cases": cases, "chat_cases": chat_cases}
    if disagreements:
        out["transformers_disagreements"] = disagreements
    with open(os.path.join(outdir, "tokenizer_expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    log(outdir, "vocab", out["vocab_size"], "cases", len(cases), "chat cases", len(chat_cases),
        "errors", sum("error" in c for c in chat_cases), "byte fallback", byte_fallback_used,
        "transformers agrees", not disagreements)
    for c in chat_cases:
        log(json.dumps(c.get("rendered", c.get("error")), ensure_ascii=False)[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder that receives tokenizer-qwen-style/ and tokenizer-llama-style/")
    args = ap.parse_args()
    log("tokenizers", tokenizers.__version__, "transformers", transformers.__version__)
    for name, make in (("tokenizer-qwen-style", make_qwen), ("tokenizer-llama-style", make_llama)):
        outdir = os.path.join(args.out, name)
        if os.path.exists(outdir):
            shutil.rmtree(outdir)
        os.makedirs(outdir)
        texts, chats = make(outdir)
        expected(outdir, texts, chats)


if __name__ == "__main__":
    main()
