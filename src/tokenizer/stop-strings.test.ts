import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { createStopStringFilter, findStopString, partialStopLength } from "./stop-strings.ts";

describe("findStopString", () => {
  it("returns the earliest match; at a tie, the longer stop string", () => {
    assert.deepEqual(findStopString("answer: 42\n\nUser: hi", ["User:", "\n\n"]), { index: 10, stop: "\n\n" });
    assert.deepEqual(findStopString("abcdef", ["cd", "cde", "ef"]), { index: 2, stop: "cde" });
    assert.equal(findStopString("abcdef", ["x"]), null);
    assert.equal(findStopString("abc", []), null);
  });
  it("searches from fromIndex", () => {
    assert.deepEqual(findStopString("stop and stop", ["stop"], 1), { index: 9, stop: "stop" });
  });
  it("rejects empty stop strings", () => {
    assert.throws(() => findStopString("abc", [""]), /non-empty/);
  });
});

describe("partialStopLength", () => {
  it("measures the end of the text that could begin a stop string", () => {
    assert.equal(partialStopLength("the answer is </ans", ["</answer>"]), 5);
    assert.equal(partialStopLength("the answer <", ["</answer>", "<|im_end|>"]), 1);
    assert.equal(partialStopLength("plain text", ["</answer>"]), 0);
    // A complete stop string is a match, not a partial one.
    assert.equal(partialStopLength("xab", ["ab"]), 0);
  });
});

describe("createStopStringFilter", () => {
  it("cuts at a stop string split over several deltas and holds back the candidate text", () => {
    const f = createStopStringFilter(["</answer>"]);
    const steps = ["The result", " is 7</", "ans", "wer> trailing"].map((d) => f.push(d));
    assert.deepEqual(steps.map((s) => s.text), ["The result", " is 7", "", ""]);
    assert.deepEqual(steps.map((s) => s.stopped), [false, false, false, true]);
    assert.equal(steps[3].stop, "</answer>");
    assert.equal(f.text, "The result is 7");
    assert.deepEqual(f.push("more"), { text: "", stopped: true, stop: "</answer>" });
    assert.equal(f.flush(), "");
  });

  it("releases held text once it cannot be a stop string, and at flush", () => {
    const f = createStopStringFilter(["<|stop|>"]);
    assert.equal(f.push("a <|st").text, "a ");
    assert.equal(f.push("ar").text, "<|star");
    assert.equal(f.push(" <").text, " ");
    assert.equal(f.flush(), "<");
    assert.equal(f.text, "a <|star <");
  });

  it("finds a stop string inside one delta, with text after it dropped", () => {
    const f = createStopStringFilter(["\n\n", "###"]);
    assert.deepEqual(f.push("one\n\ntwo###"), { text: "one", stopped: true, stop: "\n\n" });
  });

  it("with no stop strings passes everything through", () => {
    const f = createStopStringFilter([]);
    assert.equal(f.push("abc").text, "abc");
    assert.equal(f.flush(), "");
  });

  it("streamed and whole-text detection agree on every split of the text", () => {
    const text = "xx<a<ab<abc>yy<abc>zz";
    const stops = ["<abc>", "b<a", "zz!"];
    const whole = findStopString(text, stops)!;
    for (let cut1 = 0; cut1 <= text.length; cut1++) {
      for (let cut2 = cut1; cut2 <= text.length; cut2++) {
        const f = createStopStringFilter(stops);
        let out = "";
        let stop: string | null = null;
        for (const d of [text.slice(0, cut1), text.slice(cut1, cut2), text.slice(cut2)]) {
          const s = f.push(d);
          out += s.text;
          stop = s.stop;
        }
        out += f.flush();
        assert.equal(out, text.slice(0, whole.index), `splits ${cut1},${cut2}`);
        assert.equal(stop, whole.stop);
      }
    }
  });
});
