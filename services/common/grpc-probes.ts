// Client side of the standard services every moe-pilot server exposes: health checks (launchers wait
// for SERVING) and reflection (tools list what a server offers). Also used by the tests.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import {
  credentials,
  loadPackageDefinition,
  makeGenericClientConstructor,
  type Client,
  type ClientDuplexStream,
  type ServiceError,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { service as healthService } from 'grpc-health-check';
import { DeadlineExceededError, fromServiceError } from './errors.ts';

type ProbeClient = Client & Record<string, (...args: unknown[]) => unknown>;

/** Health of one service ("" = the whole server): "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ... */
export async function checkHealth(address: string, service: string, timeoutMs: number): Promise<string> {
  const Health = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');
  const client = new Health(address, credentials.createInsecure()) as ProbeClient;
  try {
    return await new Promise<string>((resolve, reject) => {
      client.check({ service }, { deadline: Date.now() + timeoutMs }, (error: ServiceError | null, response: { status: string }) => {
        if (error) reject(fromServiceError(error, 'Health.Check'));
        else resolve(response.status);
      });
    });
  } finally {
    client.close();
  }
}

/** Polls Health.Check until `service` is SERVING; rejects with DeadlineExceededError after timeoutMs. */
export async function waitForServing(address: string, service: string, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  let last = 'no answer';
  while (Date.now() < end) {
    try {
      last = await checkHealth(address, service, Math.max(50, Math.min(1000, end - Date.now())));
      if (last === 'SERVING') return;
    } catch (error) {
      last = (error as Error).message;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new DeadlineExceededError(`${address} ${service || '(server)'} not SERVING within ${timeoutMs} ms (last: ${last})`);
}

const require = createRequire(import.meta.url);
const reflectionProtoRoot = join(dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');

interface ReflectionResponse {
  list_services_response?: { service: { name: string }[] };
  file_descriptor_response?: { file_descriptor_proto: Buffer[] };
  error_response?: { error_code: number; error_message: string };
}

/** One request/response exchange with a server's reflection service (v1). */
async function askReflection(address: string, request: Record<string, string>, timeoutMs: number): Promise<ReflectionResponse> {
  const pkg = loadSync('grpc/reflection/v1/reflection.proto', { includeDirs: [reflectionProtoRoot], keepCase: true });
  const grpcObject = loadPackageDefinition(pkg) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: new (address: string, creds: unknown) => ProbeClient } } };
  };
  const client = new grpcObject.grpc.reflection.v1.ServerReflection(address, credentials.createInsecure());
  try {
    return await new Promise<ReflectionResponse>((resolve, reject) => {
      const call = client.ServerReflectionInfo({ deadline: Date.now() + timeoutMs }) as ClientDuplexStream<
        Record<string, string>,
        ReflectionResponse
      >;
      call.on('data', (response: ReflectionResponse) => {
        if (response.error_response) reject(new Error(`reflection error: ${response.error_response.error_message}`));
        else resolve(response);
        call.end();
      });
      call.on('error', (error: ServiceError) => reject(fromServiceError(error, 'ServerReflectionInfo')));
      call.write(request);
    });
  } finally {
    client.close();
  }
}

/** Service names a server lists through gRPC server reflection, sorted. */
export async function listServicesByReflection(address: string, timeoutMs: number): Promise<string[]> {
  const response = await askReflection(address, { list_services: '' }, timeoutMs);
  return (response.list_services_response?.service ?? []).map((s) => s.name).sort();
}

/** Number of file descriptors reflection returns for a symbol (the file and its imports). */
export async function reflectFilesForSymbol(address: string, symbol: string, timeoutMs: number): Promise<number> {
  const response = await askReflection(address, { file_containing_symbol: symbol }, timeoutMs);
  return response.file_descriptor_response?.file_descriptor_proto.length ?? 0;
}
