// What a load run calls: one entry per RPC under test. A target turns a call number into a request
// and counts the "units" of work in each answer (prompts accepted, tokens generated, items scored),
// so throughput is reported in the unit that matters and not only in calls per second.
//
// Targets run inside worker threads, so their options are plain JSON (passed through workerData).
import { Metadata, type Client, type ServiceError } from '@grpc/grpc-js';
import { RewardServiceService, type ScoreRequest, type ScoreResponse } from '../proto/gen/pilot/v1/reward.ts';
import { RolloutServiceService, type GenerateRequest, type GenerateResponse } from '../proto/gen/pilot/v1/rollout.ts';
import { RunServiceService, type SubmitPromptsRequest, type SubmitPromptsResponse } from '../proto/gen/pilot/v1/run.ts';

export interface SubmitTargetOptions {
  kind: 'submit';
  /** Queue the prompts go to. */
  dataset: string;
  /** Prompts per SubmitPrompts call (1 = single-prompt calls). */
  batch: number;
  /** Characters of each prompt's text (padded), so payload size is controlled. */
  promptChars: number;
}

export interface GenerateTargetOptions {
  kind: 'generate';
  /** Prompt as token ids (the tiny test models have no meaningful text); used when promptText is null. */
  promptTokenIds: number[];
  promptText: string | null;
  applyChatTemplate: boolean;
  /** Prompts per Generate call. */
  batch: number;
  /** Samples per prompt. */
  n: number;
  maxNewTokens: number;
  temperature: number;
  /** Seed of call i is seed + i, so runs are repeatable and calls are not identical. */
  seed: number;
}

export interface ScoreTargetOptions {
  kind: 'score';
  /** Items per Score call. */
  batch: number;
  scorer: string;
}

export type TargetOptions = SubmitTargetOptions | GenerateTargetOptions | ScoreTargetOptions;
export type TargetKind = TargetOptions['kind'];

export const TARGET_KINDS: readonly TargetKind[] = ['submit', 'generate', 'score'];

/** What one finished call reports back to the worker loop. */
export interface CallOutcome {
  /** 0 = OK, else the gRPC status code. */
  code: number;
  message: string;
  /** Work done by the call (0 on error). */
  units: number;
  /** Milliseconds from sending to the first streamed answer (streams only; NaN otherwise). */
  firstResponseMs: number;
}

export interface Target {
  readonly kind: TargetKind;
  /** Unit of `units`: "prompts", "tokens", "items". */
  readonly unit: string;
  /** Starts call number `index` (unique within the run for this worker); `done` is called exactly once. */
  call(client: Client, index: number, deadline: number, done: (outcome: CallOutcome) => void): void;
}

export const TARGET_DEFAULTS: { [K in TargetKind]: Extract<TargetOptions, { kind: K }> } = {
  submit: { kind: 'submit', dataset: 'loadtest', batch: 1, promptChars: 64 },
  generate: {
    kind: 'generate',
    promptTokenIds: [1, 2, 3, 4, 5, 6, 7, 8],
    promptText: null,
    applyChatTemplate: false,
    batch: 1,
    n: 1,
    maxNewTokens: 16,
    temperature: 1,
    seed: 1,
  },
  score: { kind: 'score', batch: 1, scorer: 'math' },
};

function failure(error: ServiceError | Error): CallOutcome {
  const code = typeof (error as ServiceError).code === 'number' ? (error as ServiceError).code : 2; // UNKNOWN
  return { code, message: (error as ServiceError).details || error.message, units: 0, firstResponseMs: Number.NaN };
}

/**
 * Builds the target a worker calls. `tag` makes the ids of this run and worker unique, so the prompt
 * queue's de-duplication does not swallow repeated load runs.
 */
export function createTarget(options: TargetOptions, tag: string): Target {
  switch (options.kind) {
    case 'submit':
      return createSubmitTarget(options, tag);
    case 'generate':
      return createGenerateTarget(options, tag);
    case 'score':
      return createScoreTarget(options);
    default: {
      const kind = (options as { kind: unknown }).kind;
      throw new TypeError(`unknown load target "${String(kind)}"; valid: ${TARGET_KINDS.join(', ')}`);
    }
  }
}

function createSubmitTarget(o: SubmitTargetOptions, tag: string): Target {
  const method = RunServiceService.submitPrompts;
  const pad = 'x'.repeat(Math.max(0, o.promptChars));
  return {
    kind: 'submit',
    unit: 'prompts',
    call(client, index, deadline, done) {
      const prompts: SubmitPromptsRequest['prompts'] = [];
      for (let k = 0; k < o.batch; k++) {
        const id = `${tag}-${index}-${k}`;
        const a = (index * 7 + k) % 1000;
        prompts.push({
          id,
          input: { $case: 'text', value: `What is ${a} + ${k}? ${pad}`.slice(0, Math.max(16, o.promptChars)) },
          referenceAnswer: String(a + k),
          metadata: {},
        });
      }
      const request: SubmitPromptsRequest = { dataset: o.dataset, prompts };
      client.makeUnaryRequest<SubmitPromptsRequest, SubmitPromptsResponse>(
        method.path,
        method.requestSerialize,
        method.responseDeserialize,
        request,
        new Metadata(),
        { deadline },
        (error, response) => {
          if (error) return done(failure(error));
          done({ code: 0, message: '', units: response!.acceptedIds.length, firstResponseMs: Number.NaN });
        },
      );
    },
  };
}

function createGenerateTarget(o: GenerateTargetOptions, tag: string): Target {
  const method = RolloutServiceService.generate;
  return {
    kind: 'generate',
    unit: 'tokens',
    call(client, index, deadline, done) {
      const request: GenerateRequest = {
        prompts: Array.from({ length: o.batch }, (_, k) => ({
          promptId: `${tag}-${index}-${k}`,
          input: o.promptText !== null ? { $case: 'text', value: o.promptText } : { $case: 'tokenIds', value: { ids: o.promptTokenIds } },
          applyChatTemplate: o.applyChatTemplate,
        })),
        n: o.n,
        sampling: {
          temperature: o.temperature,
          topK: 0,
          topP: 0,
          minP: 0,
          seed: o.seed + index,
          maxNewTokens: o.maxNewTokens,
          stop: [],
          stopTokenIds: [],
        },
        returnExperts: false,
        returnText: false,
      };
      const start = performance.now();
      let first = Number.NaN;
      let tokens = 0;
      let finished = false;
      const finish = (outcome: CallOutcome) => {
        if (finished) return;
        finished = true;
        done(outcome);
      };
      const stream = client.makeServerStreamRequest<GenerateRequest, GenerateResponse>(
        method.path,
        method.requestSerialize,
        method.responseDeserialize,
        request,
        new Metadata(),
        { deadline },
      );
      stream.on('data', (sample: GenerateResponse) => {
        if (Number.isNaN(first)) first = performance.now() - start;
        tokens += sample.tokenIds.length;
      });
      stream.on('error', (error: ServiceError) => finish(failure(error)));
      // 'status' follows the last message; an error status also raised 'error' above.
      stream.on('status', (s: { code: number; details: string }) => {
        if (s.code === 0) finish({ code: 0, message: '', units: tokens, firstResponseMs: first });
      });
    },
  };
}

function createScoreTarget(o: ScoreTargetOptions): Target {
  const method = RewardServiceService.score;
  return {
    kind: 'score',
    unit: 'items',
    call(client, index, deadline, done) {
      const request: ScoreRequest = {
        items: Array.from({ length: o.batch }, (_, k) => ({
          completion: `The answer is \\boxed{${(index + k) % 97}}`,
          referenceAnswer: String((index + k) % 89),
          metadata: {},
          completionTokens: 8,
          prompt: '',
        })),
        spec: { scorers: [{ name: o.scorer, weight: 1, params: undefined, label: '' }] },
      };
      client.makeUnaryRequest<ScoreRequest, ScoreResponse>(
        method.path,
        method.requestSerialize,
        method.responseDeserialize,
        request,
        new Metadata(),
        { deadline },
        (error, response) => {
          if (error) return done(failure(error));
          done({ code: 0, message: '', units: response!.scores.length, firstResponseMs: Number.NaN });
        },
      );
    },
  };
}
