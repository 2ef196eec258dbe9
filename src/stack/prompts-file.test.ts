import assert from 'node:assert/strict';
import { test } from 'node:test';

import { parsePromptsJsonl } from './prompts-file.ts';

test('good lines become prompts; each bad line is reported with its number and the rest are kept', () => {
  const text = [
    '{"prompt": "s3819=", "answer": "1389", "metadata": {"kind": "sort", "digits": 4}}',
    '',
    '{"text": "12+30=", "reference": 42}',
    '{"prompt": "x", "answer": "1"', // truncated JSON
    '{"messages": [{"role": "user", "content": "hi"}], "reference_answer": "hello", "id": 7}',
    '["not", "an", "object"]',
    '{"prompt": "a", "text": "b"}',
    '{"answer": "no prompt"}',
    '{"prompt": "y", "answr": "1"}',
    '{"messages": [{"role": "user"}]}',
    '{"prompt": "last", "answer": "ok"}',
  ].join('\n');
  const r = parsePromptsJsonl(text);
  assert.deepEqual(r.lines, [1, 3, 5, 11]);
  assert.deepEqual(r.prompts[0], { id: '', input: { $case: 'text', value: 's3819=' }, referenceAnswer: '1389', metadata: { kind: 'sort', digits: '4' } });
  assert.deepEqual(r.prompts[1].input, { $case: 'text', value: '12+30=' });
  assert.equal(r.prompts[1].referenceAnswer, '42');
  assert.deepEqual(r.prompts[2].input, { $case: 'messages', value: { messages: [{ role: 'user', content: 'hi' }] } });
  assert.equal(r.prompts[2].id, '7');
  assert.equal(r.prompts[3].referenceAnswer, 'ok');
  assert.deepEqual(
    r.issues.map((i) => i.line),
    [4, 6, 7, 8, 9, 10],
  );
  const msg = (line: number) => r.issues.find((i) => i.line === line)!.message;
  assert.match(msg(4), /not valid JSON/);
  assert.match(msg(6), /expected a JSON object, got an array/);
  assert.match(msg(7), /one of "prompt", "text" or "messages", not "prompt" and "text"/);
  assert.match(msg(8), /missing "prompt"/);
  assert.match(msg(9), /unknown field "answr"/);
  assert.match(msg(10), /messages\[0\] must be/);
});

test('an empty file gives nothing and no issues; CRLF line ends are fine', () => {
  assert.deepEqual(parsePromptsJsonl(''), { prompts: [], lines: [], issues: [] });
  const r = parsePromptsJsonl('{"prompt": "a", "answer": "1"}\r\n{"prompt": "b", "answer": "2"}\r\n');
  assert.equal(r.prompts.length, 2);
  assert.equal(r.issues.length, 0);
});
