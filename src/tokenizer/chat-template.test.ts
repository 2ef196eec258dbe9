import assert from "node:assert/strict";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { describe, it } from "node:test";

import { strftime } from "./chat-template.ts";
import { ChatTemplateError, loadTokenizer } from "./index.ts";
import type { Tokenizer } from "./index.ts";
import { makeLlamaStyleFolder, makeTempDir, writeFolder } from "./test-folders.ts";

const BYTE_LEVEL = join(import.meta.dirname, "../../test/fixtures/tokenizer");

/** A folder with the byte-level fixture's tokenizer.json and the given config and extra files. */
async function folderWith(config: Record<string, unknown>, files: Record<string, unknown> = {}): Promise<string> {
  const dir = await makeTempDir();
  await copyFile(join(BYTE_LEVEL, "tokenizer.json"), join(dir, "tokenizer.json"));
  await writeFolder(dir, { "tokenizer_config.json": { eos_token: "<|im_end|>", pad_token: "<|endoftext|>", ...config }, ...files });
  return dir;
}

const user = (content: string) => ({ role: "user", content });

// Written in the style of Qwen's templates: a system turn listing tools as JSON, loops, namespace().
const TOOLS_TEMPLATE =
  "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}<|im_end|>\n{% endif %}" +
  "{%- set ns = namespace(users=0) %}" +
  "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}" +
  "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" +
  "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}" +
  "{{- '[users=' ~ ns.users ~ ']' }}";

describe("applyChatTemplate", () => {
  it("renders the fixture's ChatML template with and without the generation prompt", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const messages = [{ role: "system", content: "Be brief." }, user("1+1?")];
    const withPrompt = tok.applyChatTemplate(messages, { addGenerationPrompt: true });
    assert.equal(withPrompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n");
    assert.equal(tok.applyChatTemplate(messages, { addGenerationPrompt: false }), withPrompt.slice(0, -"<|im_start|>assistant\n".length));
    // The rendered prompt encodes with its special tokens as single ids.
    const ids = tok.encode(withPrompt, { addSpecialTokens: false });
    assert.equal(ids[0], tok.tokenToId("<|im_start|>"));
    assert.equal(tok.decode(ids), withPrompt);
  });

  it("passes tools as JSON-ready objects; no tools means tools is none", async () => {
    const dir = await folderWith({ chat_template: TOOLS_TEMPLATE });
    const tok = await loadTokenizer(dir);
    const tool = { type: "function", function: { name: "add", parameters: { type: "object", properties: { a: { type: "integer" } } } } };
    const out = tok.applyChatTemplate([user("hi"), { role: "assistant", content: "yo" }, user("sum")], { addGenerationPrompt: true, tools: [tool] });
    assert.equal(
      out,
      // trim_blocks (on, as in transformers) eats the newline right after the for tag.
      '<|im_start|>system\nTools:{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}<|im_end|>\n' +
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nsum<|im_end|>\n<|im_start|>assistant\n[users=2]",
    );
    assert.ok(tok.applyChatTemplate([user("hi")], { addGenerationPrompt: false }).startsWith("<|im_start|>user"));
    await rm(dir, { recursive: true });
  });

  it("exposes special tokens and caller variables to the template", async () => {
    const dir = await folderWith({
      bos_token: { content: "<|endoftext|>", special: true },
      additional_special_tokens: [{ content: "<|im_start|>" }],
      chat_template: "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ additional_special_tokens[0] }}|{{ unk_token is defined }}|{{ enable_thinking }}",
    });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.bosTokenId, 0);
    assert.equal(
      tok.applyChatTemplate([user("x")], { addGenerationPrompt: false, variables: { enable_thinking: false } }),
      "<|endoftext|>|<|im_end|>|<|endoftext|>|<|im_start|>|false|false",
    );
    assert.throws(() => tok.applyChatTemplate([user("x")], { addGenerationPrompt: false, variables: { messages: [] } }), /variables\.messages/);
    assert.throws(() => tok.applyChatTemplate([{ content: "no role" } as never], { addGenerationPrompt: false }), /messages\[0\]/);
    await rm(dir, { recursive: true });
  });

  it("raise_exception becomes a ChatTemplateError with the template's message and file", async () => {
    const dir = await makeLlamaStyleFolder();
    const tok = await loadTokenizer(dir);
    assert.equal(
      tok.applyChatTemplate([user("hi"), { role: "assistant", content: "yo" }], { addGenerationPrompt: false }),
      "<s>[INST] hi [/INST] yo </s>",
    );
    assert.throws(() => tok.applyChatTemplate([{ role: "assistant", content: "first" }], { addGenerationPrompt: false }), (err: unknown) => {
      assert.ok(err instanceof ChatTemplateError);
      assert.equal(err.code, "raised");
      assert.equal(err.file, join(dir, "tokenizer_config.json"));
      assert.match(err.message, /Conversation roles must alternate/);
      return true;
    });
    await rm(dir, { recursive: true });
  });

  it("a template that is not valid Jinja fails when first used, naming its file", async () => {
    const dir = await folderWith({ chat_template: "{% for m in messages %}{{ m.content }}" });
    const tok = await loadTokenizer(dir);
    assert.throws(() => tok.applyChatTemplate([user("x")], { addGenerationPrompt: false }), (err: unknown) => {
      assert.ok(err instanceof ChatTemplateError);
      assert.equal(err.code, "syntax");
      assert.match(err.message, /tokenizer_config\.json: invalid Jinja/);
      return true;
    });
    await rm(dir, { recursive: true });
  });

  describe("choosing among several templates", () => {
    let tok: Tokenizer;
    let dir: string;
    it("loads a list of {name, template}", async () => {
      dir = await folderWith({
        chat_template: [
          { name: "default", template: "D{{ messages | length }}" },
          { name: "tool_use", template: "T{{ tools | length }}" },
          { name: "rag", template: "R{{ documents[0].title }}" },
        ],
      });
      tok = await loadTokenizer(dir);
      assert.deepEqual(tok.chatTemplateNames, ["default", "tool_use", "rag"]);
    });
    it("uses default, tool_use when tools are given, or the named one", () => {
      assert.equal(tok.applyChatTemplate([user("a"), user("b")], { addGenerationPrompt: false }), "D2");
      assert.equal(tok.applyChatTemplate([user("a")], { addGenerationPrompt: false, tools: [{}, {}, {}] }), "T3");
      assert.equal(tok.applyChatTemplate([user("a")], { addGenerationPrompt: false, templateName: "rag", documents: [{ title: "doc" }] }), "Rdoc");
    });
    it("an unknown name lists the available ones", async () => {
      assert.throws(() => tok.applyChatTemplate([user("a")], { addGenerationPrompt: false, templateName: "nope" }), (err: unknown) => {
        assert.ok(err instanceof ChatTemplateError);
        assert.equal(err.code, "no_template");
        assert.match(err.message, /available: default, tool_use, rag/);
        return true;
      });
      await rm(dir, { recursive: true });
    });
  });

  it("chat_template.jinja and additional_chat_templates/ take precedence over tokenizer_config.json", async () => {
    const dir = await folderWith({ chat_template: "from config" }, { "chat_template.jinja": "from file {{ messages[0].content }}" });
    await mkdir(join(dir, "additional_chat_templates"));
    await writeFolder(join(dir, "additional_chat_templates"), { "tool_use.jinja": "tools file" });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.applyChatTemplate([user("x")], { addGenerationPrompt: false }), "from file x");
    assert.equal(tok.applyChatTemplate([user("x")], { addGenerationPrompt: false, tools: [{}] }), "tools file");
    await rm(dir, { recursive: true });
  });

  it("a folder without a template says so", async () => {
    const dir = await folderWith({});
    const tok = await loadTokenizer(dir);
    assert.throws(() => tok.applyChatTemplate([user("x")], { addGenerationPrompt: true }), (err: unknown) => {
      assert.ok(err instanceof ChatTemplateError);
      assert.equal(err.code, "no_template");
      return true;
    });
    await rm(dir, { recursive: true });
  });

  it("strftime_now and range work as in Python", async () => {
    const dir = await folderWith({ chat_template: "{{ strftime_now('%Y') }}|{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}|{{ range(3) | length }}" });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.applyChatTemplate([], { addGenerationPrompt: false }), `${new Date().getFullYear()}|135|3`);
    assert.equal(strftime(new Date(2024, 6, 4, 9, 5, 3), "%d %b %Y %H:%M:%S %A %j %B %I%p %%"), "04 Jul 2024 09:05:03 Thursday 186 July 09AM %");
    assert.throws(() => strftime(new Date(), "%Q"), /unsupported directive %Q/);
    await rm(dir, { recursive: true });
  });
});
