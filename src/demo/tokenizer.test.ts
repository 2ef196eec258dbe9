// The character tokenizer: written files load in tokenizers.js and round-trip every task string.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Tokenizer } from '@huggingface/tokenizers';
import { createTask, END_MARKER, TASK_KINDS } from './task.ts';
import { buildTokenizerFiles, createDemoTokenizer, EOS_TOKEN, loadDemoTokenizer, PAD_TOKEN, writeTokenizerFiles } from './tokenizer.ts';

test('files written to a folder load with tokenizers.js and round-trip every task string', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'demo-tok-'));
  try {
    const task = createTask({ kind: 'sort', digits: 3, heldOut: 50, seed: 1 });
    await writeTokenizerFiles(dir, task.alphabet);
    // Straight through the library, as any consumer of the folder would.
    const raw = new Tokenizer(JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8')), JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')));
    assert.deepEqual(raw.encode('s321=123').tokens, ['s', '3', '2', '1', '=', '1', '2', '3']);
    const tok = await loadDemoTokenizer(dir);
    assert.equal(tok.vocabSize, 3 + task.alphabet.length);
    for (const kind of TASK_KINDS) {
      const t = createTask({ kind, digits: 2, heldOut: 10, seed: 2 });
      for (const e of [...t.heldOut, ...t.train.slice(0, 50)]) {
        const text = e.prompt + e.answer + END_MARKER;
        const ids = tok.encode(text);
        assert.equal(ids.length, e.prompt.length + e.answer.length + 1, 'one token per character plus the marker');
        assert.equal(ids[ids.length - 1], tok.eosId);
        assert.equal(tok.decode(ids), text);
        assert.equal(tok.decode(ids, { skipSpecialTokens: true }), e.prompt + e.answer);
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('special tokens take the first ids and the config names eos and pad', () => {
  const files = buildTokenizerFiles('ab');
  const tok = createDemoTokenizer(files);
  assert.equal(tok.padId, 0);
  assert.equal(tok.eosId, 2);
  assert.equal(files.tokenizerConfig.eos_token, EOS_TOKEN);
  assert.equal(files.tokenizerConfig.pad_token, PAD_TOKEN);
  assert.deepEqual(tok.encode('ba'), [4, 3]);
});

test('characters outside the vocabulary are an error, not silently dropped', () => {
  const tok = createDemoTokenizer(buildTokenizerFiles('0123456789'));
  assert.throws(() => tok.encode('12x3'), /character "x" is not in the vocabulary/);
  assert.throws(() => buildTokenizerFiles(''), /alphabet is empty/);
  assert.throws(() => buildTokenizerFiles('a\n'), /whitespace other than ' '/);
});
