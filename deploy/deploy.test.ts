// Checks of the deployment files that need no Docker daemon and no cluster: the compose file against
// the Compose schema (docker-compose, when installed) and against the structure this stack needs;
// the Kubernetes manifests' structure and cross-references; and that the environment both set for
// each service is exactly what that service's main.ts reads (no drift either way).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, parseAllDocuments } from 'yaml';
import { isRuntimeVariable, readServiceEnv } from './service-env.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const composePath = join(root, 'deploy/docker-compose.yml');
const k8sDir = join(root, 'deploy/k8s');

type Json = Record<string, any>;
const compose = parse(readFileSync(composePath, 'utf8'), { merge: true }) as Json;
const services = compose.services as Record<string, Json>;

/** The main.ts a container command runs ("node --import tsx services/x/main.ts"). */
function mainOf(command: unknown, where: string): string {
  assert.ok(Array.isArray(command), `${where}: command must be a list`);
  const script = (command as string[]).find((a) => a.endsWith('/main.ts'));
  assert.ok(script, `${where}: command ${JSON.stringify(command)} runs no services/*/main.ts`);
  assert.deepEqual((command as string[]).slice(0, 3), ['node', '--import', 'tsx'], `${where}: services run as node --import tsx <main.ts>`);
  return script!;
}

/** Compares what a deployment sets for one container with what its main.ts reads; returns problems. */
function envDrift(where: string, script: string, env: Record<string, string>): string[] {
  const file = join(root, script);
  if (!existsSync(file)) return [`${where}: runs ${script}, which does not exist`];
  const reads = readServiceEnv(readFileSync(file, 'utf8'));
  const names = new Set(reads.map((r) => r.name));
  const problems: string[] = [];
  for (const name of Object.keys(env)) {
    if (!names.has(name) && !isRuntimeVariable(name)) problems.push(`${where}: sets ${name}, which ${script} does not read`);
  }
  for (const r of reads.filter((r) => r.required)) {
    if (!(r.name in env)) problems.push(`${where}: ${script} requires ${r.name}, which is not set`);
  }
  return problems;
}

const pilotServices = Object.entries(services).filter(([, s]) => typeof s.image === 'string' && s.image.startsWith('moe-pilot:'));
const ranksOf = (profile: string) => pilotServices.filter(([, s]) => s.profiles?.includes(profile) && mainOf(s.command, '').includes('services/rank/'));
const coordinatorOf = (profile: string) => {
  const found = pilotServices.filter(([, s]) => s.profiles?.includes(profile) && mainOf(s.command, '').includes('services/coordinator/'));
  assert.equal(found.length, 1, `one coordinator in profile ${profile}`);
  return found[0]!;
};

test('docker-compose accepts the file (Compose schema, anchors, profiles)', (t) => {
  const which = spawnSync('docker-compose', ['version'], { encoding: 'utf8' });
  if (which.error) {
    t.skip('docker-compose is not installed (Debian: apt-get install docker-compose); the structure test below still runs');
    return;
  }
  for (const profile of ['gpu', 'cpu']) {
    const r = spawnSync('docker-compose', ['-f', composePath, '--profile', profile, 'config', '-q'], { encoding: 'utf8', env: { ...process.env, MODEL_DIR: '' } });
    assert.equal(r.status, 0, `docker-compose config (${profile}): ${r.stderr}`);
  }
});

test('compose structure: services, images, health checks, restarts, volumes', () => {
  const allowedTop = new Set(['services', 'volumes', 'networks', 'configs', 'secrets', 'version']);
  for (const key of Object.keys(compose)) assert.ok(allowedTop.has(key) || key.startsWith('x-'), `unexpected top-level key ${key}`);
  for (const name of ['nats', 'otel-collector', 'jaeger', 'reward', 'checkpoint']) {
    assert.ok(services[name], `service ${name}`);
    assert.equal(services[name]!.profiles, undefined, `${name} runs in every profile`);
  }
  assert.deepEqual(services.nats!.command.slice(0, 3), ['-js', '-sd', '/data/jetstream'], 'JetStream with a store directory');
  assert.ok(services.nats!.volumes.some((v: string) => v.startsWith('nats-data:/data')), 'JetStream store on the nats-data volume');
  assert.ok(services['otel-collector']!.volumes.some((v: string) => v.startsWith('./otel-collector.yaml:')), 'collector config mounted');
  const collector = parse(readFileSync(join(root, 'deploy/otel-collector.yaml'), 'utf8')) as Json;
  assert.deepEqual(collector.service.pipelines.traces.receivers, ['otlp']);
  assert.ok(collector.exporters['otlp/jaeger'].endpoint.startsWith('jaeger:'), 'collector exports to the jaeger service');

  const declaredVolumes = new Set(Object.keys(compose.volumes ?? {}));
  for (const [name, s] of Object.entries(services)) {
    assert.ok(['unless-stopped', 'always', 'on-failure'].includes(s.restart), `${name}: restart policy`);
    for (const v of (s.volumes ?? []) as string[]) {
      const source = v.split(':')[0]!;
      if (!source.startsWith('.') && !source.startsWith('/')) assert.ok(declaredVolumes.has(source), `${name}: volume ${source} is declared`);
    }
    for (const dep of Array.isArray(s.depends_on) ? s.depends_on : Object.keys(s.depends_on ?? {})) {
      assert.ok(services[dep], `${name}: depends on ${dep}, which exists`);
      const shared = !services[dep]!.profiles || services[dep]!.profiles.some((p: string) => s.profiles?.includes(p));
      assert.ok(shared, `${name}: depends on ${dep}, which runs in the same profile`);
    }
  }
  for (const [name, s] of pilotServices) {
    assert.ok(s.build?.dockerfile === 'deploy/Dockerfile' && s.build.context === '..', `${name}: built from deploy/Dockerfile`);
    assert.equal(s.build.target, s.image === 'moe-pilot:cuda' ? 'runtime-cuda' : 'runtime-cpu', `${name}: image tag matches its build target`);
    // The health check probes the port the service is told to listen on, with the gRPC health probe.
    const test = s.healthcheck?.test as string[];
    assert.deepEqual(test?.slice(0, 5), ['CMD', 'node', '--import', 'tsx', 'deploy/health-probe.ts'], `${name}: gRPC health probe`);
    const portVar = Object.keys(s.environment).find((k) => k.endsWith('_PORT'));
    assert.ok(portVar, `${name}: sets its port`);
    assert.equal(test[5], `127.0.0.1:${s.environment[portVar!]}`, `${name}: probes its own port`);
    assert.ok(test.slice(6).every((svc) => /^pilot\.v1\.[A-Z]\w+Service$/.test(svc)), `${name}: probes pilot services`);
  }
});

test('compose GPU profile: eight ranks, one GPU each, EP=8, NCCL for one NVLink node', () => {
  const ranks = ranksOf('gpu');
  assert.equal(ranks.length, 8);
  const gpus = new Set<string>();
  for (const [name, s] of ranks) {
    const devices = s.deploy.resources.reservations.devices as Json[];
    assert.equal(devices.length, 1, `${name}: one device reservation`);
    assert.equal(devices[0]!.driver, 'nvidia');
    assert.deepEqual(devices[0]!.capabilities, ['gpu']);
    assert.equal(devices[0]!.device_ids.length, 1, `${name}: pinned to one GPU`);
    gpus.add(devices[0]!.device_ids[0]);
    assert.equal(devices[0]!.device_ids[0], s.environment.RANK, `${name}: rank r on GPU r`);
    assert.equal(s.environment.WORLD_SIZE, '8');
    assert.equal(s.environment.RANK_DEVICE, 'cuda', `${name}: trains on its GPU (seen as device 0 in the container)`);
    assert.equal(s.environment.NCCL_NVLS_ENABLE, '0');
    assert.equal(s.ipc, 'host');
    assert.ok(s.shm_size, `${name}: shm_size`);
    assert.equal(s.image, 'moe-pilot:cuda');
    assert.ok(s.volumes.includes('models:/data/models:ro'), `${name}: shared models volume`);
  }
  assert.deepEqual([...gpus].sort(), ['0', '1', '2', '3', '4', '5', '6', '7']);
  assert.deepEqual(ranks.map(([, s]) => s.environment.RANK).sort(), ['0', '1', '2', '3', '4', '5', '6', '7']);
});

test('compose profiles: each coordinator lists exactly its ranks, which meet at its rendezvous', () => {
  for (const [profile, world] of [['gpu', 8], ['cpu', 2]] as const) {
    const ranks = ranksOf(profile);
    assert.equal(ranks.length, world, `${profile}: ${world} ranks`);
    const [coordName, coord] = coordinatorOf(profile);
    const byRank = [...ranks].sort((a, b) => Number(a[1].environment.RANK) - Number(b[1].environment.RANK));
    assert.deepEqual(
      coord.environment.RANK_ADDRS.split(','),
      byRank.map(([name, s]) => `${name}:${s.environment.RANK_PORT}`),
      `${profile}: RANK_ADDRS in rank order`,
    );
    for (const [name, s] of ranks) {
      assert.equal(s.environment.WORLD_SIZE, String(world), `${name}: WORLD_SIZE`);
      assert.equal(s.environment.RENDEZVOUS_ADDR, `${coordName}:${coord.environment.COORDINATOR_PORT}`, `${name}: rendezvous at its coordinator`);
      if (profile === 'cpu') assert.equal(s.deploy, undefined, `${name}: no GPU reservation`);
    }
    assert.equal(coord.environment.NATS_URL, 'nats://nats:4222');
    assert.equal(coord.environment.REWARD_ADDR, `reward:${services.reward!.environment.REWARD_PORT}`);
    assert.equal(coord.environment.CHECKPOINT_ADDR, `checkpoint:${services.checkpoint!.environment.CHECKPOINT_PORT}`);
  }
  assert.ok(services.checkpoint!.volumes.includes(`checkpoints:${services.checkpoint!.environment.CHECKPOINT_ROOT}`), 'checkpoints on the shared volume');
});

test('compose environment matches what each main.ts reads (both ways)', () => {
  const problems = pilotServices.flatMap(([name, s]) => envDrift(`compose ${name}`, mainOf(s.command, name), s.environment ?? {}));
  assert.deepEqual(problems, []);
});

// ---- Kubernetes --------------------------------------------------------------------------------

const manifestFiles = readdirSync(k8sDir).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml').sort();
const docs: Json[] = manifestFiles.flatMap((f) =>
  parseAllDocuments(readFileSync(join(k8sDir, f), 'utf8')).map((d) => {
    assert.deepEqual(d.errors, [], `${f}: YAML errors`);
    return { ...(d.toJS() as Json), __file: f };
  }),
);
const byKind = (kind: string) => docs.filter((d) => d.kind === kind);
const named = (kind: string, name: string) => {
  const d = docs.find((x) => x.kind === kind && x.metadata?.name === name);
  assert.ok(d, `${kind}/${name} exists`);
  return d!;
};
const workloads = () => [...byKind('Deployment'), ...byKind('StatefulSet')];
const envOf = (c: Json) => Object.fromEntries((c.env ?? []).map((e: Json) => [e.name, e.value ?? '(from field)'])) as Record<string, string>;

test('k8s manifests: every document is well-formed and listed in the kustomization', () => {
  const known: Record<string, string> = {
    Namespace: 'v1',
    ConfigMap: 'v1',
    Service: 'v1',
    PersistentVolumeClaim: 'v1',
    Deployment: 'apps/v1',
    StatefulSet: 'apps/v1',
  };
  for (const d of docs) {
    assert.ok(d.kind in known, `${d.__file}: unexpected kind ${d.kind}`);
    assert.equal(d.apiVersion, known[d.kind], `${d.__file} ${d.kind}: apiVersion`);
    assert.match(d.metadata?.name ?? '', /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, `${d.__file} ${d.kind}: DNS-1123 name`);
    if (d.kind !== 'Namespace') assert.equal(d.metadata.namespace, 'moe-pilot', `${d.__file} ${d.kind}/${d.metadata.name}: namespace`);
  }
  const kustomization = parse(readFileSync(join(k8sDir, 'kustomization.yaml'), 'utf8')) as Json;
  assert.deepEqual([...kustomization.resources].sort(), manifestFiles);
  for (const w of workloads()) {
    const labels = w.spec.template.metadata.labels;
    for (const [k, v] of Object.entries(w.spec.selector.matchLabels)) assert.equal(labels[k], v, `${w.kind}/${w.metadata.name}: selector matches its pods`);
    for (const c of w.spec.template.spec.containers) {
      assert.ok(c.resources?.requests, `${w.metadata.name}/${c.name}: resource requests`);
      assert.ok(c.readinessProbe, `${w.metadata.name}/${c.name}: readiness probe`);
    }
  }
});

test('k8s manifests: Services select pods and name ports that exist; volumes name claims that exist', () => {
  for (const svc of byKind('Service')) {
    const targets = workloads().filter((w) =>
      Object.entries(svc.spec.selector).every(([k, v]) => w.spec.template.metadata.labels[k] === v),
    );
    assert.equal(targets.length, 1, `Service/${svc.metadata.name} selects one workload`);
    const ports = targets[0]!.spec.template.spec.containers.flatMap((c: Json) => c.ports ?? []);
    for (const p of svc.spec.ports) {
      const ok = typeof p.targetPort === 'string' ? ports.some((cp: Json) => cp.name === p.targetPort) : ports.some((cp: Json) => cp.containerPort === p.targetPort);
      assert.ok(ok, `Service/${svc.metadata.name}: targetPort ${p.targetPort} is a container port`);
    }
  }
  const claims = new Set(byKind('PersistentVolumeClaim').map((d) => d.metadata.name));
  const configMaps = new Set(byKind('ConfigMap').map((d) => d.metadata.name));
  for (const w of workloads()) {
    const spec = w.spec.template.spec;
    const volumes = new Set<string>((spec.volumes ?? []).map((v: Json) => v.name));
    for (const t of w.spec.volumeClaimTemplates ?? []) volumes.add(t.metadata.name);
    for (const v of spec.volumes ?? []) {
      if (v.persistentVolumeClaim) assert.ok(claims.has(v.persistentVolumeClaim.claimName), `${w.metadata.name}: claim ${v.persistentVolumeClaim.claimName} exists`);
      if (v.configMap) assert.ok(configMaps.has(v.configMap.name), `${w.metadata.name}: ConfigMap ${v.configMap.name} exists`);
    }
    for (const c of spec.containers) for (const m of c.volumeMounts ?? []) assert.ok(volumes.has(m.name), `${w.metadata.name}/${c.name}: mount ${m.name} is a volume`);
  }
  const nats = named('StatefulSet', 'nats');
  assert.equal(nats.spec.volumeClaimTemplates[0].spec.accessModes[0], 'ReadWriteOnce', 'JetStream store on a PersistentVolume');
  assert.match(named('ConfigMap', 'nats-config').data['nats.conf'], /jetstream\s*\{[^}]*store_dir:\s*\/data\//);
});

test('k8s ranks: one GPU per pod, EP over every replica, NCCL over the cluster network', () => {
  const ranks = named('StatefulSet', 'rank');
  const spec = ranks.spec.template.spec;
  const c = spec.containers[0];
  const env = envOf(c);
  assert.equal(c.resources.limits['nvidia.com/gpu'], 1);
  assert.equal(c.resources.requests['nvidia.com/gpu'], 1);
  assert.equal(ranks.spec.podManagementPolicy, 'Parallel', 'ranks meet at the rendezvous, so they start together');
  assert.equal(Number(env.WORLD_SIZE), ranks.spec.replicas);
  assert.equal(env.RANK_DEVICE, 'cuda', 'each pod trains on its GPU');
  const rankEnv = c.env.find((e: Json) => e.name === 'RANK');
  assert.equal(rankEnv.valueFrom.fieldRef.fieldPath, "metadata.labels['apps.kubernetes.io/pod-index']", 'rank = pod ordinal');
  assert.ok(env.NCCL_SOCKET_IFNAME, 'NCCL_SOCKET_IFNAME');
  assert.equal(env.NCCL_NVLS_ENABLE, '0');
  assert.ok(spec.volumes.some((v: Json) => v.name === 'dshm' && v.emptyDir?.medium === 'Memory'), '/dev/shm sized for NCCL');
  const headless = named('Service', ranks.spec.serviceName);
  assert.equal(headless.spec.clusterIP, 'None');
  const coord = envOf(named('Deployment', 'coordinator').spec.template.spec.containers[0]);
  const expected = Array.from({ length: ranks.spec.replicas }, (_, i) => `rank-${i}.${headless.metadata.name}.moe-pilot.svc.cluster.local:${env.RANK_PORT}`);
  assert.deepEqual(coord.RANK_ADDRS.split(','), expected, 'coordinator lists every rank pod in order');
  assert.equal(env.RENDEZVOUS_ADDR, `coordinator:${coord.COORDINATOR_PORT}`);
});

test('k8s environment matches what each main.ts reads (both ways)', () => {
  const problems: string[] = [];
  for (const w of workloads()) {
    for (const c of w.spec.template.spec.containers) {
      if (!String(c.image).startsWith('moe-pilot:')) continue;
      problems.push(...envDrift(`k8s ${w.kind}/${w.metadata.name}`, mainOf(c.command, w.metadata.name), envOf(c)));
      // The gRPC probes ask for the port the service is told to listen on.
      const portVar = Object.keys(envOf(c)).find((k) => k.endsWith('_PORT'));
      assert.equal(String(c.readinessProbe.grpc.port), envOf(c)[portVar!], `${w.metadata.name}: probe port`);
    }
  }
  assert.deepEqual(problems, []);
});

test('the Dockerfile has the stages the deployment files name', () => {
  const dockerfile = readFileSync(join(root, 'deploy/Dockerfile'), 'utf8');
  const stages = [...dockerfile.matchAll(/^FROM\s+\S+\s+AS\s+(\S+)/gim)].map((m) => m[1]);
  for (const s of ['build-cuda', 'build-cpu', 'runtime-cuda', 'runtime-cpu']) assert.ok(stages.includes(s), `stage ${s}`);
  assert.match(dockerfile, /FROM nvidia\/cuda:\$\{CUDA_VERSION\}-devel-/);
  assert.match(dockerfile, /FROM nvidia\/cuda:\$\{CUDA_VERSION\}-runtime-/);
  assert.match(dockerfile, /bash scripts\/build-native\.sh/);
  // Every COPY source of the build context exists in the repository.
  for (const m of dockerfile.matchAll(/^COPY\s+(?!--from)(.+)$/gm)) {
    const parts = m[1]!.trim().split(/\s+/);
    for (const src of parts.slice(0, -1)) assert.ok(existsSync(join(root, src)), `COPY source ${src} exists`);
  }
});
