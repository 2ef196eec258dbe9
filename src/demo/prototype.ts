// The in-process demo: make a tiny MoE model, SFT warm-up, evaluate, GRPO with periodic held-out
// evaluation, then print a JSON summary. Run: npx tsx src/demo/prototype.ts [--seed N] [--key value ...]
// (every DemoConfig field can be overridden by name, e.g. --grpoSteps 40 --kind add).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Engine, type Aggregation } from '../engine/engine.ts';
import { createGenerator } from '../engine/generator.ts';
import { makeTinyModel, TINY_MODEL_DEFAULTS, type TinyModelOptions } from './make-model.ts';
import { createTask, evaluateGreedy, type TaskKind } from './task.ts';
import { loadDemoTokenizer } from './tokenizer.ts';
import { grpoTrain, sftWarmup } from './train.ts';

export interface DemoConfig {
  seed: number;
  kind: TaskKind;
  digits: number;
  heldOut: number;
  model: Partial<TinyModelOptions>;
  sftSteps: number;
  sftBatch: number;
  sftLr: number;
  grpoSteps: number;
  promptsPerStep: number;
  G: number;
  temperature: number;
  grpoLr: number;
  epsLow: number;
  epsHigh: number;
  updatesPerStep: number;
  normalizeStd: boolean;
  aggregation: Aggregation;
  evalEvery: number;
}

export const DEMO_DEFAULTS: Readonly<DemoConfig> = {
  seed: 1,
  kind: 'sort',
  digits: 5,
  heldOut: 500,
  model: {},
  sftSteps: 30,
  sftBatch: 32,
  sftLr: 3e-3,
  grpoSteps: 200,
  promptsPerStep: 64,
  G: 8,
  temperature: 1,
  grpoLr: 3e-4,
  epsLow: 0.2,
  epsHigh: 0.28,
  updatesPerStep: 1,
  normalizeStd: true,
  aggregation: 'token-mean',
  evalEvery: 25,
};

export interface DemoSummary {
  task: string;
  seed: number;
  sft_accuracy: number;
  grpo_accuracy: number;
  gain_points: number;
  best_accuracy: number;
  sft_steps: number;
  steps: number;
  seconds: number;
  sft_seconds: number;
  grpo_seconds: number;
  curve: { step: number; accuracy: number; train_reward: number | null }[];
  config: DemoConfig;
}

export async function runDemo(config: DemoConfig, log: (line: string) => void = () => {}): Promise<DemoSummary> {
  const t0 = performance.now();
  const dir = await mkdtemp(join(tmpdir(), 'moe-pilot-demo-'));
  try {
    const task = createTask({ kind: config.kind, digits: config.digits, heldOut: config.heldOut, seed: config.seed });
    await makeTinyModel(dir, task.alphabet, { ...config.model, seed: config.seed });
    const tokenizer = await loadDemoTokenizer(dir);
    const engine = await Engine.fromHfFolder(dir);
    // Enough KV blocks for every held-out prompt at once (one or two 16-token blocks each).
    const maxLen = task.heldOut[0].prompt.length + task.maxAnswerChars + 1;
    const perSample = Math.ceil(maxLen / 16) + 1;
    const generator = createGenerator(engine, { numBlocks: Math.max(config.heldOut, config.promptsPerStep * config.G) * perSample, blockSize: 16, decoder: tokenizer });
    const deps = { generator, tokenizer };
    try {
      await sftWarmup(engine, tokenizer, task, {
        steps: config.sftSteps,
        batch: config.sftBatch,
        lr: config.sftLr,
        seed: config.seed,
        onStep: (s) => {
          if ((s.step + 1) % 20 === 0) log(`sft step ${s.step + 1} loss ${s.loss.toFixed(4)}`);
        },
      });
      const t1 = performance.now();
      const sft = await evaluateGreedy(deps, task);
      log(`sft held-out accuracy ${sft.accuracy.toFixed(3)} (${((t1 - t0) / 1000).toFixed(1)} s)`);
      const curve: DemoSummary['curve'] = [{ step: 0, accuracy: sft.accuracy, train_reward: null }];
      const t2 = performance.now();
      await grpoTrain(engine, generator, tokenizer, task, {
        steps: config.grpoSteps,
        promptsPerStep: config.promptsPerStep,
        G: config.G,
        temperature: config.temperature,
        lr: config.grpoLr,
        epsLow: config.epsLow,
        epsHigh: config.epsHigh,
        updatesPerStep: config.updatesPerStep,
        normalizeStd: config.normalizeStd,
        aggregation: config.aggregation,
        seed: config.seed,
        onStep: async (s) => {
          log(
            `grpo step ${s.step + 1} reward ${s.meanReward.toFixed(3)} active ${s.activeGroups}/${s.groups} tokens ${s.tokens} ` +
              `grad ${s.gradNorm.toFixed(3)} rollout ${s.rolloutSeconds.toFixed(2)}s train ${s.trainSeconds.toFixed(2)}s`,
          );
          if ((s.step + 1) % config.evalEvery === 0 || s.step + 1 === config.grpoSteps) {
            const r = await evaluateGreedy(deps, task);
            curve.push({ step: s.step + 1, accuracy: r.accuracy, train_reward: s.meanReward });
            log(`grpo step ${s.step + 1} held-out accuracy ${r.accuracy.toFixed(3)}`);
          }
        },
      });
      const t3 = performance.now();
      const final = curve[curve.length - 1].accuracy;
      return {
        task: `${config.kind}-${config.digits}`,
        seed: config.seed,
        sft_accuracy: sft.accuracy,
        grpo_accuracy: final,
        gain_points: Math.round((final - sft.accuracy) * 1000) / 10,
        best_accuracy: Math.max(...curve.map((c) => c.accuracy)),
        sft_steps: config.sftSteps,
        steps: config.grpoSteps,
        seconds: Math.round((t3 - t0) / 100) / 10,
        sft_seconds: Math.round((t1 - t0) / 100) / 10,
        grpo_seconds: Math.round((t3 - t2) / 100) / 10,
        curve,
        config,
      };
    } finally {
      await generator.close();
      await engine.dispose();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Parses `--key value` pairs over the defaults (`--model.hidden 96` sets a model option). */
export function parseDemoArgs(argv: readonly string[], base: DemoConfig = DEMO_DEFAULTS): DemoConfig {
  const c: DemoConfig = { ...base, model: { ...base.model } };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const raw = argv[i + 1];
    if (!key.startsWith('--') || raw === undefined) throw new Error(`prototype: expected --key value pairs, got '${argv.slice(i).join(' ')}'`);
    const k = key.slice(2);
    if (k.startsWith('model.')) {
      const mk = k.slice(6) as keyof TinyModelOptions;
      if (!(mk in TINY_MODEL_DEFAULTS)) throw new Error(`prototype: unknown model option '${mk}' (known: ${Object.keys(TINY_MODEL_DEFAULTS).join(', ')})`);
      (c.model as Record<string, unknown>)[mk] = mk === 'modelType' ? raw : Number(raw);
      continue;
    }
    if (!(k in base) || k === 'model') throw new Error(`prototype: unknown option '${k}' (known: ${Object.keys(base).join(', ')})`);
    let v: unknown;
    if (typeof base[k as keyof DemoConfig] === 'string') v = raw;
    else if (typeof base[k as keyof DemoConfig] === 'boolean') {
      if (raw !== 'true' && raw !== 'false') throw new Error(`prototype: option '${k}' needs true or false, got '${raw}'`);
      v = raw === 'true';
    } else {
      v = Number(raw);
      if (!Number.isFinite(v)) throw new Error(`prototype: option '${k}' needs a number, got '${raw}'`);
    }
    (c as unknown as Record<string, unknown>)[k] = v;
  }
  return c;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const config = parseDemoArgs(process.argv.slice(2));
  const summary = await runDemo(config, (l) => process.stderr.write(l + '\n'));
  process.stdout.write(JSON.stringify(summary) + '\n');
}
