// Compiles every kernel specialisation the host can emit with Tint, Dawn's WGSL compiler (the one
// a browser's WebGPU hands our WGSL to), through the prebuilt Dawn of npm's `webgpu` package.
//
// Usage: node check.mjs DUMP.json, where DUMP.json is written by tests/tint.rs from the host's own
// enumerator (`wgpu_attention::kernels::variants`):
//   { modules: { KERNEL: { source, files: [{ file, first_line, lines }] } },
//     profiles: [{ name, backend, feature_level, limits: { webgpuLimitName: value },
//                  variants: [{ kernel, overrides: { NAME: value },
//                               bindings: [{ group, binding, access, has_dynamic_offset,
//                                            min_binding_size }] }] }] }
// For each profile it asks Dawn for a device whose compute limits are exactly the profile's, so that
// Dawn validates each pipeline against the limits the host chose its tiles for; then for each
// kernel `createShaderModule` must leave no error in `getCompilationInfo`, and for each variant
// `createComputePipeline` with the host's constants and an explicit layout must raise nothing in
// validation, internal and out-of-memory error scopes. Exits 1 on any finding, naming the shader
// file and line, the profile and the override set.

import { readFileSync } from 'node:fs';
import { create, globals } from 'webgpu';

Object.assign(globalThis, globals);

const dumpPath = process.argv[2];
if (!dumpPath) {
  console.error('usage: node check.mjs DUMP.json');
  process.exit(2);
}
const dump = JSON.parse(readFileSync(dumpPath, 'utf8'));

const failures = [];
const fail = (msg) => {
  failures.push(msg);
  console.error(`FAIL ${msg}`);
};

// A line of the composed module, as the file and line it came from.
function where(module, line) {
  for (const part of module.files) {
    if (line >= part.first_line && line < part.first_line + part.lines) {
      return `shaders/${part.file}:${line - part.first_line + 1}`;
    }
  }
  return `composed line ${line}`;
}

const gpus = new Map();
function gpu(backend) {
  if (!gpus.has(backend)) {
    gpus.set(backend, create([`backend=${backend}`]));
  }
  return gpus.get(backend);
}

async function device(profile) {
  const adapter = await gpu(profile.backend).requestAdapter({ featureLevel: profile.feature_level });
  if (!adapter) {
    throw new Error(`Dawn's ${profile.backend} backend offers no ${profile.feature_level} adapter`);
  }
  for (const [name, value] of Object.entries(profile.limits)) {
    if (!(name in adapter.limits)) {
      throw new Error(`Dawn knows no limit ${name}`);
    }
    if (adapter.limits[name] < value) {
      throw new Error(
        `Dawn's ${profile.backend} adapter offers ${name} ${adapter.limits[name]}, the profile needs ${value}`,
      );
    }
  }
  for (const feature of profile.features) {
    if (!adapter.features.has(feature)) {
      throw new Error(`Dawn's ${profile.backend} adapter lacks ${feature}, which the profile's variants need`);
    }
  }
  const dev = await adapter.requestDevice({
    requiredLimits: profile.limits,
    requiredFeatures: profile.features,
  });
  for (const [name, value] of Object.entries(profile.limits)) {
    // A roomier device would let a tile choice that overflows the profile's limit pass.
    if (dev.limits[name] !== value) {
      throw new Error(`device has ${name} ${dev.limits[name]} where the profile has ${value}`);
    }
  }
  dev.addEventListener('uncapturederror', (e) => {
    fail(`${profile.name}: uncaptured error: ${e.error.message}`);
  });
  return dev;
}

const SCOPES = ['validation', 'internal', 'out-of-memory'];

// Runs `body` inside one error scope of each kind; the errors it raised.
async function scoped(dev, body) {
  for (const s of SCOPES) dev.pushErrorScope(s);
  const value = body();
  const errors = [];
  for (let i = 0; i < SCOPES.length; i++) {
    const e = await dev.popErrorScope();
    if (e) errors.push(e.message);
  }
  return { value, errors };
}

function layoutEntry(b) {
  const type = { uniform: 'uniform', read: 'read-only-storage', read_write: 'storage' }[b.access];
  if (!type) throw new Error(`unknown access ${b.access}`);
  return {
    binding: b.binding,
    visibility: GPUShaderStage.COMPUTE,
    buffer: { type, hasDynamicOffset: b.has_dynamic_offset, minBindingSize: b.min_binding_size ?? 0 },
  };
}

async function checkProfile(profile) {
  let dev;
  try {
    dev = await device(profile);
  } catch (e) {
    fail(`${profile.name}: no device: ${e.message}`);
    return;
  }
  console.log(
    `${profile.name}: Dawn ${profile.backend}, ${profile.feature_level}, ` +
      `${JSON.stringify(profile.limits)}`,
  );
  const modules = new Map();
  let pipelines = 0;
  for (const v of profile.variants) {
    const mod = dump.modules[v.kernel];
    if (!modules.has(v.kernel)) {
      const { value: sm, errors } = await scoped(dev, () =>
        dev.createShaderModule({ label: v.kernel, code: mod.source }),
      );
      const info = await sm.getCompilationInfo();
      let bad = false;
      for (const m of info.messages) {
        const line = `${m.type} at ${where(mod, m.lineNum)}:${m.linePos}: ${m.message}`;
        if (m.type === 'error') {
          bad = true;
          fail(`${profile.name}: ${v.kernel}: ${line}`);
        } else {
          console.log(`${profile.name}: ${v.kernel}: ${line}`);
        }
      }
      // The scope repeats the compilation errors; report what only it saw.
      if (!bad) {
        for (const e of errors) fail(`${profile.name}: ${v.kernel}: ${e}`);
      }
      bad ||= errors.length > 0;
      modules.set(v.kernel, bad ? null : sm);
    }
    const sm = modules.get(v.kernel);
    if (!sm) continue; // The module's errors are reported once, above.
    const groups = [];
    for (const b of v.bindings) {
      (groups[b.group] ??= []).push(layoutEntry(b));
    }
    const { errors } = await scoped(dev, () => {
      const layouts = [...groups].map((entries, group) =>
        dev.createBindGroupLayout({ label: `${v.kernel} group ${group}`, entries: entries ?? [] }),
      );
      const layout = dev.createPipelineLayout({ bindGroupLayouts: layouts });
      return dev.createComputePipeline({
        label: v.kernel,
        layout,
        compute: { module: sm, entryPoint: 'main', constants: v.overrides },
      });
    });
    for (const e of errors) {
      fail(`${profile.name}: ${v.kernel} with ${JSON.stringify(v.overrides)}: ${e}`);
    }
    if (errors.length === 0) pipelines++;
  }
  const compiled = [...modules.values()].filter((m) => m).length;
  console.log(
    `${profile.name}: ${compiled} of ${modules.size} modules and ` +
      `${pipelines} of ${profile.variants.length} pipelines built`,
  );
  dev.destroy();
}

for (const profile of dump.profiles) {
  await checkProfile(profile);
}
if (failures.length > 0) {
  console.error(`${failures.length} Tint finding(s)`);
  process.exit(1);
}
console.log('Tint accepts every kernel specialisation');
