import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { copyFile, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { describe, it } from "node:test";

import {
  ChatTemplateError,
  TokenizerFileError,
  checkTokenizerFixture,
  createDecodeStream,
  loadTokenizer,
} from "./index.ts";
import { llamaStyleTokenizerJson, makeLlamaStyleFolder, makeTempDir, writeFolder } from "./test-folders.ts";

const FIXTURES = join(import.meta.dirname, "../../test/fixtures");
const BYTE_LEVEL = join(FIXTURES, "tokenizer");

/** A copy of the byte-level fixture with some files replaced or added. */
async function byteLevelCopy(files: Record<string, unknown> = {}): Promise<string> {
  const dir = await makeTempDir();
  for (const name of ["tokenizer.json", "tokenizer_config.json", "tokenizer_expected.json"]) {
    await copyFile(join(BYTE_LEVEL, name), join(dir, name));
  }
  await writeFolder(dir, files);
  return dir;
}

describe("reference fixtures (transformers output)", () => {
  for (const name of ["tokenizer", "tokenizer-qwen-style", "tokenizer-llama-style"]) {
    const dir = join(FIXTURES, name);
    it(`${name}: no encode, decode or chat-template mismatch`, { skip: !existsSync(dir) && `${dir} not present` }, async () => {
      const report = await checkTokenizerFixture(dir);
      assert.deepEqual(report.details, []);
      assert.equal(report.tokenizer_mismatches, 0);
      assert.equal(report.chat_mismatches, 0);
    });
  }

  it("the oracle reports a wrong id, a wrong decode and a wrong rendering", async () => {
    const expected = JSON.parse(await readFile(join(BYTE_LEVEL, "tokenizer_expected.json"), "utf8"));
    expected.cases[0].ids[1] += 1;
    expected.cases[1].decoded += "!";
    expected.chat_cases[0].rendered = expected.chat_cases[0].rendered.replace("assistant", "model");
    expected.vocab_size += 1;
    const dir = await byteLevelCopy({ "tokenizer_expected.json": expected });
    const report = await checkTokenizerFixture(dir);
    assert.equal(report.tokenizer_mismatches, 3, report.details.join("\n"));
    assert.equal(report.chat_mismatches, 1, report.details.join("\n"));
    assert.equal(report.details.length, 4);
    assert.match(report.details.join("\n"), /case 0 .*encode: ids differ at position 1/);
    assert.match(report.details.join("\n"), /chat case 0: first difference at char/);
    await rm(dir, { recursive: true });
  });

  it("the oracle checks that a template error is expected", async () => {
    const dir = await makeLlamaStyleFolder();
    const badOrder = [{ role: "assistant", content: "hi" }];
    await writeFolder(dir, {
      "tokenizer_expected.json": {
        cases: [],
        chat_cases: [
          { messages: badOrder, add_generation_prompt: false, error: "Conversation roles must alternate user/assistant/user/assistant/..." },
          { messages: badOrder, add_generation_prompt: false, error: "some other complaint" },
          { messages: [{ role: "user", content: "x" }], add_generation_prompt: false, error: "anything" },
        ],
      },
    });
    const report = await checkTokenizerFixture(dir);
    assert.equal(report.chat_mismatches, 2, report.details.join("\n"));
    assert.match(report.details[0], /chat case 1: the template raised/);
    assert.match(report.details[1], /chat case 2: expected an error/);
    await rm(dir, { recursive: true });
  });
});

describe("loadTokenizer", () => {
  it("reads special tokens and the chat template of a ChatML folder", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    assert.equal(tok.tokenToId("<|im_end|>"), 2);
    assert.deepEqual(tok.eosTokenIds, [tok.tokenToId("<|im_end|>")]);
    assert.equal(tok.padTokenId, tok.tokenToId("<|endoftext|>"));
    assert.equal(tok.bosTokenId, null);
    assert.deepEqual(tok.chatTemplateNames, ["default"]);
    assert.equal(tok.idToToken(tok.tokenToId("<|im_start|>")!), "<|im_start|>");
    assert.equal(tok.idToToken(tok.vocabSize + 10), null);
    assert.equal(tok.tokenToId("no such token"), null);
    assert.ok(tok.isSpecialToken(2));
    assert.ok(!tok.isSpecialToken(tok.encode("a")[0]));
  });

  it("stop ids are the union of eos_token and generation_config eos_token_id (number or list)", async () => {
    const dir = await byteLevelCopy({ "generation_config.json": { eos_token_id: [0, 2], pad_token_id: 1 } });
    const tok = await loadTokenizer(dir);
    assert.deepEqual(tok.eosTokenIds, [2, 0]);
    assert.equal(tok.padTokenId, 0, "tokenizer_config's pad_token wins over generation_config");
    await writeFolder(dir, { "generation_config.json": { eos_token_id: 1 } });
    assert.deepEqual((await loadTokenizer(dir)).eosTokenIds, [2, 1]);
    await rm(dir, { recursive: true });
  });

  it("pad falls back to generation_config.json when tokenizer_config.json has none", async () => {
    const dir = await makeLlamaStyleFolder();
    await writeFolder(dir, { "generation_config.json": { eos_token_id: 2, pad_token_id: 0 } });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.padTokenId, 0);
    assert.deepEqual(tok.eosTokenIds, [2]);
    await rm(dir, { recursive: true });
  });

  it("reads AddedToken objects and honours add_bos_token / add_eos_token", async () => {
    const dir = await makeLlamaStyleFolder();
    const tok = await loadTokenizer(dir);
    assert.equal(tok.bosTokenId, 1);
    assert.deepEqual(tok.eosTokenIds, [2]);
    const plain = tok.encode("Hello world", { addSpecialTokens: false });
    assert.deepEqual(tok.encode("Hello world"), [1, ...plain]);
    assert.deepEqual(tok.encode(""), [1]);

    await writeFolder(dir, {
      "tokenizer_config.json": { bos_token: "<s>", eos_token: "</s>", add_bos_token: false, add_eos_token: true },
    });
    const flipped = await loadTokenizer(dir);
    assert.deepEqual(flipped.encode("Hello world"), [...plain, 2]);
    await rm(dir, { recursive: true });
  });

  it("without add_bos_token the post-processor of tokenizer.json decides", async () => {
    const dir = await makeLlamaStyleFolder();
    await writeFolder(dir, { "tokenizer_config.json": { bos_token: "<s>", eos_token: "</s>" } });
    const tok = await loadTokenizer(dir);
    assert.equal(tok.encode("Hello")[0], 1);
    assert.notEqual(tok.encode("Hello", { addSpecialTokens: false })[0], 1);
    await rm(dir, { recursive: true });
  });

  it("works with tokenizer.json alone", async () => {
    const dir = await makeTempDir();
    await writeFolder(dir, { "tokenizer.json": llamaStyleTokenizerJson() });
    const tok = await loadTokenizer(dir);
    assert.deepEqual(tok.eosTokenIds, []);
    assert.equal(tok.padTokenId, null);
    assert.deepEqual(tok.chatTemplateNames, []);
    assert.equal(tok.decode(tok.encode("Hello world"), { skipSpecialTokens: true }), "Hello world");
    await rm(dir, { recursive: true });
  });
});

describe("encode and decode", () => {
  const texts = ["What is 12 + 345?", "héllo wörld — ✓ 日本語 🙂", "  two  spaces\n\ttab", "<|im_start|>user\nhi<|im_end|>", ""];

  it("byte-level BPE round-trips any text, special tokens included", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    for (const text of texts) assert.equal(tok.decode(tok.encode(text)), text);
  });

  it("byte-fallback BPE round-trips text whose characters are not in the vocabulary", async () => {
    const dir = await makeLlamaStyleFolder();
    const tok = await loadTokenizer(dir);
    const ids = tok.encode("Hello 日本 the world!", { addSpecialTokens: false });
    assert.ok(ids.some((id) => /^<0x[0-9A-F]{2}>$/.test(tok.idToToken(id)!)), "expected byte tokens");
    assert.equal(tok.decode(ids), "Hello 日本 the world!");
    await rm(dir, { recursive: true });
  });

  it("skipSpecialTokens drops special tokens only", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const ids = tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>");
    assert.equal(tok.decode(ids, { skipSpecialTokens: true }), "user\nhi");
  });

  it("skips ids outside the vocabulary and rejects values that are not ids", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const ids = tok.encode("abc");
    assert.equal(tok.decode([...ids, tok.vocabSize + 5]), "abc");
    assert.equal(tok.decode([]), "");
    assert.throws(() => tok.decode([1.5]), /ids\[0\] is 1.5/);
    assert.throws(() => tok.decode([-1]), TypeError);
    assert.throws(() => tok.encode(42 as unknown as string), TypeError);
  });
});

describe("errors name the file at fault", () => {
  it("folder without tokenizer.json", async () => {
    const dir = await makeTempDir();
    await assert.rejects(loadTokenizer(dir), (err: unknown) => {
      assert.ok(err instanceof TokenizerFileError);
      assert.equal(err.code, "missing");
      assert.equal(err.file, join(dir, "tokenizer.json"));
      assert.match(err.message, /tokenizer\.json: file not found/);
      return true;
    });
    await rm(dir, { recursive: true });
  });

  for (const name of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
    it(`corrupt ${name}`, async () => {
      const dir = await byteLevelCopy({ [name]: '{"model": {"type": "BPE",' });
      await assert.rejects(loadTokenizer(dir), (err: unknown) => {
        assert.ok(err instanceof TokenizerFileError);
        assert.equal(err.code, "invalid_json");
        assert.equal(err.file, join(dir, name));
        assert.match(err.message, new RegExp(`${name.replace(".", "\\.")}: not valid JSON`));
        return true;
      });
      await rm(dir, { recursive: true });
    });
  }

  it("a JSON file that is not an object, a bad token slot, a token not in the vocabulary", async () => {
    const cases: [Record<string, unknown>, string, RegExp][] = [
      [{ "tokenizer.json": [1, 2] }, "tokenizer.json", /expected a JSON object/],
      [{ "tokenizer.json": { added_tokens: [] } }, "tokenizer.json", /no "model" object/],
      [{ "tokenizer_config.json": { eos_token: 7 } }, "tokenizer_config.json", /eos_token must be a string/],
      [{ "tokenizer_config.json": { eos_token: "<|nope|>" } }, "tokenizer_config.json", /eos_token "<\|nope\|>" is not in the vocabulary/],
      [{ "tokenizer_config.json": { chat_template: [{ name: "x" }] } }, "tokenizer_config.json", /chat_template\[0\]/],
      [{ "tokenizer_config.json": { add_bos_token: "yes" } }, "tokenizer_config.json", /add_bos_token must be true or false/],
      [{ "generation_config.json": { eos_token_id: [2, "x"] } }, "generation_config.json", /eos_token_id\[1\]/],
    ];
    for (const [files, file, pattern] of cases) {
      const dir = await byteLevelCopy(files);
      await assert.rejects(loadTokenizer(dir), (err: unknown) => {
        assert.ok(err instanceof TokenizerFileError, String(err));
        assert.equal(err.file, join(dir, file));
        assert.match(err.message, pattern);
        return true;
      });
      await rm(dir, { recursive: true });
    }
  });

  it("a template that fails names its file", async () => {
    const dir = await byteLevelCopy({ "tokenizer_config.json": { eos_token: "<|im_end|>", chat_template: "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}" } });
    const tok = await loadTokenizer(dir);
    assert.throws(() => tok.applyChatTemplate([{ role: "user", content: "x" }], { addGenerationPrompt: false }), (err: unknown) => {
      assert.ok(err instanceof ChatTemplateError);
      assert.equal(err.code, "render");
      assert.equal(err.file, join(dir, "tokenizer_config.json"));
      return true;
    });
    await rm(dir, { recursive: true });
  });
});

describe("decode stream on real tokenizers", () => {
  it("byte-level: deltas add up to the full decode and never hold a broken character", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const text = "héllo wörld — ünïcode ✓ 日本語 emoji 🙂🙃 end";
    const ids = tok.encode(text);
    const stream = createDecodeStream(tok);
    const deltas = ids.map((id) => stream.push(id));
    deltas.push(stream.flush());
    assert.equal(deltas.join(""), text);
    for (const d of deltas) assert.ok(!d.includes("\uFFFD"), `broken character in ${JSON.stringify(d)}`);
    // Some ids carry only part of a character: those steps emit nothing.
    assert.ok(deltas.filter((d) => d === "").length > 1);
    assert.deepEqual(stream.ids, ids);
  });

  it("byte fallback: a character split over <0xNN> tokens comes out whole, once", async () => {
    const dir = await makeLlamaStyleFolder();
    const tok = await loadTokenizer(dir);
    const ids = tok.encode("Hello 日本 the world!", { addSpecialTokens: false });
    const stream = createDecodeStream(tok);
    const deltas = ids.map((id) => stream.push(id));
    assert.equal(stream.flush(), "");
    assert.equal(deltas.join(""), tok.decode(ids));
    assert.ok(deltas.includes("日") && deltas.includes("本"), JSON.stringify(deltas));
    // The leading-space rule of the decoder applies once, to the start of the whole text, not to each step.
    assert.equal(deltas[0], "Hello");
    assert.equal(deltas.at(-2), " world");
    await rm(dir, { recursive: true });
  });

  it("skipSpecialTokens: special ids emit nothing", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const ids = tok.encode("<|im_start|>assistant\n42<|im_end|>");
    const stream = createDecodeStream(tok, { skipSpecialTokens: true });
    const text = stream.pushMany(ids) + stream.flush();
    assert.equal(text, "assistant\n42");
  });

  it("flush hands over an unfinished character as the full decode would", async () => {
    const tok = await loadTokenizer(BYTE_LEVEL);
    const ids = tok.encode("ok 日");
    const cut = ids.slice(0, -1); // the last byte of 日 is missing
    const stream = createDecodeStream(tok);
    const shown = stream.pushMany(cut);
    assert.equal(shown + stream.flush(), tok.decode(cut));
    assert.ok(!shown.includes("\uFFFD"));
    assert.throws(() => stream.push(-3), TypeError);
  });
});
