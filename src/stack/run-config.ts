// run.yaml -> pilot.v1.RunConfig. The YAML mirrors the proto field by field (snake_case); every field is checked
// against one schema table, and every problem is reported at once with the field's path and its line in the file.
import { dirname, isAbsolute, resolve } from 'node:path';
import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Node as YamlNode } from 'yaml';
import type { RunConfig } from '../../proto/gen/pilot/v1/run.ts';
import { KlEstimator, LossAggregation } from '../../proto/gen/pilot/v1/trainer.ts';

type FieldType =
  | { kind: 'string'; nonEmpty?: boolean; path?: boolean; oneOf?: readonly string[] }
  | { kind: 'uint'; min?: number; max?: number }
  | { kind: 'number'; min?: number; max?: number; exclusiveMin?: boolean }
  | { kind: 'bool' }
  | { kind: 'enum'; values: Readonly<Record<string, number>> }
  | { kind: 'object'; fields: Readonly<Record<string, Field>> }
  | { kind: 'list'; of: FieldType }
  /** Free-form parameters (a scorer's params): any mapping. */
  | { kind: 'mapping' };

interface Field {
  type: FieldType;
  /** Name of the ts-proto property (camelCase). */
  to: string;
  required?: boolean;
}

const f = (to: string, type: FieldType, required = false): Field => ({ to, type, required });
const uint = (min = 0, max?: number): FieldType => ({ kind: 'uint', min, max });
const num = (min?: number, max?: number): FieldType => ({ kind: 'number', min, max });

const KL_NAMES: Record<string, number> = { k1: KlEstimator.KL_ESTIMATOR_K1, k2: KlEstimator.KL_ESTIMATOR_K2, k3: KlEstimator.KL_ESTIMATOR_K3 };
const AGGREGATION_NAMES: Record<string, number> = {
  'token-mean': LossAggregation.LOSS_AGGREGATION_TOKEN_MEAN,
  'seq-mean-token-mean': LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_MEAN,
  'seq-mean-token-sum': LossAggregation.LOSS_AGGREGATION_SEQ_MEAN_TOKEN_SUM,
};

/** The one table: YAML key -> proto property and type. */
const RUN_CONFIG_FIELDS: Record<string, Field> = {
  name: f('name', { kind: 'string' }),
  model_dir: f('modelDir', { kind: 'string', nonEmpty: true, path: true }, true),
  dtype: f('dtype', { kind: 'string', oneOf: ['f32', 'bf16'] }),
  dataset: f('dataset', { kind: 'string', nonEmpty: true }),
  group_size: f('groupSize', uint(2), true),
  prompts_per_step: f('promptsPerStep', uint(1), true),
  steps: f('steps', uint(1), true),
  sampling: f('sampling', {
    kind: 'object',
    fields: {
      temperature: f('temperature', num(0)),
      top_k: f('topK', uint(0)),
      top_p: f('topP', num(0, 1)),
      min_p: f('minP', num(0, 1)),
      seed: f('seed', uint(0)),
      max_new_tokens: f('maxNewTokens', uint(1)),
      stop: f('stop', { kind: 'list', of: { kind: 'string', nonEmpty: true } }),
      stop_token_ids: f('stopTokenIds', { kind: 'list', of: uint(0) }),
    },
  }),
  loss: f('loss', {
    kind: 'object',
    fields: {
      eps_low: f('epsLow', num(0, 1)),
      eps_high: f('epsHigh', num(0)),
      beta: f('beta', num(0)),
      kl: f('kl', { kind: 'enum', values: KL_NAMES }),
      aggregation: f('aggregation', { kind: 'enum', values: AGGREGATION_NAMES }),
      // 0 / unset: the sampling temperature and max_new_tokens (the coordinator fills them).
      temperature: f('temperature', num(0)),
      norm_length: f('normLength', uint(0)),
    },
  }),
  advantage: f('advantage', { kind: 'object', fields: { std_normalize: f('stdNormalize', { kind: 'bool' }) } }),
  dynamic_sampling: f('dynamicSampling', {
    kind: 'object',
    fields: { enabled: f('enabled', { kind: 'bool' }), max_draws: f('maxDraws', uint(0)) },
  }),
  mu: f('mu', uint(1)),
  micro_batch_size: f('microBatchSize', uint(1)),
  optimizer: f('optimizer', {
    kind: 'object',
    fields: {
      lr: f('lr', { kind: 'number', min: 0, exclusiveMin: true }, true),
      beta1: f('beta1', num(0, 1)),
      beta2: f('beta2', num(0, 1)),
      eps: f('eps', num(0)),
      weight_decay: f('weightDecay', num(0)),
      max_grad_norm: f('maxGradNorm', num(0)),
    },
  }),
  checkpoint_every: f('checkpointEvery', uint(0)),
  reward: f('reward', {
    kind: 'object',
    fields: {
      scorers: f('scorers', {
        kind: 'list',
        of: {
          kind: 'object',
          fields: {
            name: f('name', { kind: 'string', nonEmpty: true }, true),
            weight: f('weight', num()),
            params: f('params', { kind: 'mapping' }),
            label: f('label', { kind: 'string' }),
          },
        },
      }, true),
    },
  }, true),
  seed: f('seed', uint(0)),
  world_size: f('worldSize', uint(1)),
};

export interface RunConfigIssue {
  /** "sampling.max_new_tokens", "reward.scorers[1].name"; "" for the whole file. */
  field: string;
  /** 1-based; null when the field is missing (no line to point at). */
  line: number | null;
  message: string;
}

export class RunConfigError extends Error {
  constructor(
    readonly file: string,
    readonly issues: readonly RunConfigIssue[],
  ) {
    super(
      `${file}: ${issues.length} problem${issues.length === 1 ? '' : 's'}:\n` +
        issues.map((i) => `  ${file}${i.line !== null ? `:${i.line}` : ''}: ${i.field ? `${i.field}: ` : ''}${i.message}`).join('\n'),
    );
    this.name = 'RunConfigError';
  }
}

/** Every RunConfig field at its proto default; parsing overlays what the file sets. */
function emptyRunConfig(): RunConfig {
  return {
    name: '',
    modelDir: '',
    dtype: '',
    dataset: '',
    groupSize: 0,
    promptsPerStep: 0,
    steps: 0,
    sampling: undefined,
    loss: undefined,
    advantage: undefined,
    dynamicSampling: undefined,
    mu: 0,
    microBatchSize: 0,
    optimizer: undefined,
    checkpointEvery: 0,
    reward: undefined,
    seed: 0,
    worldSize: 0,
  };
}

// Proto defaults for the nested messages, so a partially written section still gives a full message.
const NESTED_DEFAULTS: Record<string, () => Record<string, unknown>> = {
  // temperature and std_normalize are the fields whose zero is a real setting (greedy, Dr. GRPO) rather than
  // "use the default", so leaving them out of a written section must mean the coordinator's defaults (1, true).
  sampling: () => ({ temperature: 1, topK: 0, topP: 0, minP: 0, maxNewTokens: 0, stop: [], stopTokenIds: [] }),
  loss: () => ({ epsLow: 0, epsHigh: 0, beta: 0, kl: 0, aggregation: 0, temperature: 0, normLength: 0 }),
  advantage: () => ({ stdNormalize: true }),
  dynamicSampling: () => ({ enabled: false, maxDraws: 0 }),
  optimizer: () => ({ lr: 0, beta1: 0, beta2: 0, eps: 0, weightDecay: 0, maxGradNorm: 0 }),
  reward: () => ({ scorers: [] }),
  // A scorer written without a weight counts fully (weight 0 would silence it).
  scorers: () => ({ name: '', weight: 1, params: undefined, label: '' }),
};

/**
 * Parses and checks run.yaml text. `file` names it in errors and anchors a relative model_dir (the services run
 * in another directory). Throws RunConfigError listing every problem.
 */
export function parseRunConfig(text: string, file: string): RunConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, uniqueKeys: true });
  const issues: RunConfigIssue[] = [];
  const lineOf = (node: YamlNode | null | undefined): number | null => (node?.range ? lineCounter.linePos(node.range[0]).line : null);
  for (const e of doc.errors) issues.push({ field: '', line: e.linePos?.[0].line ?? null, message: `YAML syntax: ${e.message.split('\n')[0]}` });
  if (issues.length) throw new RunConfigError(file, issues);
  const root = doc.contents;
  if (!isMap(root)) throw new RunConfigError(file, [{ field: '', line: lineOf(root as YamlNode), message: 'expected a mapping of run settings (key: value lines)' }]);
  const baseDir = dirname(resolve(file));

  function convert(node: YamlNode | null, type: FieldType, path: string, defaultsKey: string): unknown {
    const line = lineOf(node);
    const bad = (message: string) => {
      issues.push({ field: path, line, message });
      return undefined;
    };
    switch (type.kind) {
      case 'object': {
        if (!isMap(node)) return bad('expected a mapping');
        const out: Record<string, unknown> = NESTED_DEFAULTS[defaultsKey]?.() ?? {};
        const seen = new Set<string>();
        for (const pair of node.items) {
          const keyNode = pair.key as YamlNode;
          const key = isScalar(keyNode) ? String(keyNode.value) : '';
          const fieldPath = path ? `${path}.${key}` : key;
          const field = type.fields[key];
          if (!field) {
            const known = Object.keys(type.fields);
            const hint = known.find((k) => editDistance(k, key.replace(/-/g, '_').toLowerCase()) <= 2);
            issues.push({ field: fieldPath, line: lineOf(keyNode), message: `unknown field${hint ? ` (did you mean ${hint}?)` : ''}; known: ${known.join(', ')}` });
            continue;
          }
          seen.add(key);
          const v = convert(pair.value as YamlNode | null, field.type, fieldPath, field.to);
          if (v !== undefined) out[field.to] = v;
        }
        for (const [key, field] of Object.entries(type.fields)) {
          if (field.required && !seen.has(key)) issues.push({ field: path ? `${path}.${key}` : key, line: path ? line : null, message: 'required field is missing' });
        }
        return out;
      }
      case 'list': {
        if (!isSeq(node)) return bad('expected a list');
        return node.items.map((item, i) => convert(item as YamlNode, type.of, `${path}[${i}]`, defaultsKey));
      }
      case 'mapping': {
        if (!isMap(node)) return bad('expected a mapping of parameters');
        return (node.toJSON() as Record<string, unknown>) ?? {};
      }
    }
    if (!isScalar(node) || node.value === null) return bad(`expected ${describe(type)}, got ${node === null || (isScalar(node) && node.value === null) ? 'nothing' : 'a ' + (isMap(node) ? 'mapping' : 'list')}`);
    const v = node.value;
    switch (type.kind) {
      case 'string': {
        if (typeof v !== 'string') return bad(`expected a string, got ${JSON.stringify(v)} (quote it)`);
        if (type.nonEmpty && v.trim() === '') return bad('must not be empty');
        if (type.oneOf && !type.oneOf.includes(v)) return bad(`must be one of ${type.oneOf.join(', ')}, got ${JSON.stringify(v)}`);
        return type.path && !isAbsolute(v) ? resolve(baseDir, v) : v;
      }
      case 'bool':
        return typeof v === 'boolean' ? v : bad(`expected true or false, got ${JSON.stringify(v)}`);
      case 'uint': {
        if (typeof v !== 'number' || !Number.isInteger(v)) return bad(`expected an integer, got ${JSON.stringify(v)}`);
        if (v < (type.min ?? 0)) return bad(`must be >= ${type.min ?? 0}, got ${v}`);
        if (type.max !== undefined && v > type.max) return bad(`must be <= ${type.max}, got ${v}`);
        return v;
      }
      case 'number': {
        if (typeof v !== 'number' || !Number.isFinite(v)) return bad(`expected a number, got ${JSON.stringify(v)}`);
        if (type.min !== undefined && (type.exclusiveMin ? v <= type.min : v < type.min)) return bad(`must be ${type.exclusiveMin ? '>' : '>='} ${type.min}, got ${v}`);
        if (type.max !== undefined && v > type.max) return bad(`must be <= ${type.max}, got ${v}`);
        return v;
      }
      case 'enum': {
        const names = Object.keys(type.values);
        if (typeof v !== 'string' || !names.includes(v)) return bad(`must be one of ${names.join(', ')}, got ${JSON.stringify(v)}`);
        return type.values[v];
      }
    }
  }

  const parsed = convert(root, { kind: 'object', fields: RUN_CONFIG_FIELDS }, '', '') as Partial<RunConfig> | undefined;
  if (issues.length || !parsed) throw new RunConfigError(file, issues);
  return { ...emptyRunConfig(), ...parsed };
}

function editDistance(a: string, b: string): number {
  const d = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = d[0];
    d[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = d[j];
      d[j] = Math.min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return d[b.length];
}

function describe(t: FieldType): string {
  switch (t.kind) {
    case 'string':
      return 'a string';
    case 'uint':
      return `an integer >= ${t.min ?? 0}`;
    case 'number':
      return 'a number';
    case 'bool':
      return 'true or false';
    case 'enum':
      return `one of ${Object.keys(t.values).join(', ')}`;
    default:
      return t.kind;
  }
}

/** The inverse used by `pilot demo` to write the run.yaml it submits (and by tests): RunConfig -> YAML object. */
export function runConfigToYamlObject(c: RunConfig): Record<string, unknown> {
  const invert = (fields: Record<string, Field>, value: Record<string, unknown>): Record<string, unknown> => {
    const out: Record<string, unknown> = {};
    for (const [key, field] of Object.entries(fields)) {
      const v = value[field.to];
      if (v === undefined || v === '' || (Array.isArray(v) && v.length === 0)) continue;
      const t = field.type;
      // proto3 zero = unset for fields whose valid values start at 1 (mu, micro_batch_size).
      if (t.kind === 'uint' && (t.min ?? 0) > 0 && v === 0) continue;
      if (t.kind === 'object') out[key] = invert(t.fields, v as Record<string, unknown>);
      else if (t.kind === 'list' && t.of.kind === 'object') out[key] = (v as Record<string, unknown>[]).map((x) => invert((t.of as { fields: Record<string, Field> }).fields, x));
      else if (t.kind === 'enum' && typeof v === 'number') {
        // 0 is the proto's UNSPECIFIED: left out, so the coordinator's default applies.
        const name = Object.keys(t.values).find((n) => t.values[n] === v);
        if (name !== undefined) out[key] = name;
      }
      else out[key] = v;
    }
    return out;
  };
  return invert(RUN_CONFIG_FIELDS, c as unknown as Record<string, unknown>);
}
