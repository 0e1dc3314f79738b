// TF.js reference for tests/reference/test_mobilenet_parity.py.
//
//   node tests/reference/tfjs_reference.mjs --encoder-dir DIR --input X.f32 --n N --out OUTDIR
//
// Loads the ORIGINAL nsfwjs MobileNetV2 bundle (DIR/nsfwjs/package/dist/models/mobilenet_v2) with
// @tensorflow/tfjs from DIR/npm (pure-JS CPU backend) and runs it on N images given as raw
// little-endian float32 NHWC [N,224,224,3] (RGB/255). The bundle's modules are evaluated here (in
// a vm sandbox): this side is the reference, deliberately independent of the Python converter's
// parser and dequantiser (TF.js dequantises the weights itself).
//
// Writes OUTDIR/{probs,logits,pooled,block_2,block_5}.f32 (float32; block_* in NCHW) and
// OUTDIR/meta.json with their shapes; prints one summary line per image on stdout.
import fs from "node:fs";
import path from "node:path";
import vm from "node:vm";
import { createRequire } from "node:module";

function die(msg) {
  process.stderr.write(`tfjs_reference: ${msg}\n`);
  process.exit(2);
}

const args = {};
for (let i = 2; i < process.argv.length; i += 2) {
  const k = process.argv[i];
  if (!k.startsWith("--") || i + 1 >= process.argv.length) die(`bad argument ${k}`);
  args[k.slice(2)] = process.argv[i + 1];
}
for (const k of ["encoder-dir", "input", "n", "out"]) if (!(k in args)) die(`--${k} is required`);
const encDir = path.resolve(args["encoder-dir"]);
const n = parseInt(args.n, 10);
const SIZE = 224;

const npmDir = path.join(encDir, "npm");
if (!fs.existsSync(path.join(npmDir, "node_modules", "@tensorflow", "tfjs", "package.json")))
  die(`${npmDir}: @tensorflow/tfjs is not installed (run scripts/install-encoders.sh)`);
const require = createRequire(path.join(npmDir, "package.json"));
// Quieten tfjs' "install tfjs-node" hint (stdout must stay ours).
const origLog = console.log;
console.log = (...a) => process.stderr.write(a.join(" ") + "\n");
const tf = require("@tensorflow/tfjs");
console.log = origLog;

// A browserify UMD bundle: evaluate it with a CommonJS-shaped sandbox and take module.exports.
function loadBundle(file) {
  if (!fs.existsSync(file)) die(`${file}: file not found`);
  const code = fs.readFileSync(file, "utf8");
  const module = { exports: {} };
  vm.runInNewContext(code, { module, exports: module.exports }, { filename: file, timeout: 60000 });
  // Objects made in the sandbox belong to another realm (tfjs-layers' `instanceof Array` checks
  // fail on them): bring the data over as plain JSON.
  return JSON.parse(JSON.stringify(module.exports));
}

const bdir = path.join(encDir, "nsfwjs", "package", "dist", "models", "mobilenet_v2");
const modelJson = loadBundle(path.join(bdir, "model.min.js"));
if (!modelJson.modelTopology || !modelJson.weightsManifest) die(`${bdir}/model.min.js: no modelTopology/weightsManifest`);
const weightSpecs = [];
const buffers = [];
for (const group of modelJson.weightsManifest) {
  weightSpecs.push(...group.weights);
  for (const p of group.paths) {
    const b64 = loadBundle(path.join(bdir, `${p}.min.js`));
    if (typeof b64 !== "string") die(`${bdir}/${p}.min.js: not a base64 string`);
    buffers.push(Buffer.from(b64, "base64"));
  }
}
const all = Buffer.concat(buffers);
const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);

await tf.setBackend("cpu");
await tf.ready();
const model = await tf.loadLayersModel(
  tf.io.fromMemory({ modelTopology: modelJson.modelTopology, weightSpecs, weightData }));

const raw = fs.readFileSync(args.input);
if (raw.byteLength !== n * SIZE * SIZE * 3 * 4) die(`${args.input}: ${raw.byteLength} bytes, ${n}x${SIZE}x${SIZE}x3 float32 expected`);
const xs = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [n, SIZE, SIZE, 3]);

// Sub-model for the intermediate tensors; the logits are dense_3 before its softmax: the same
// kernel/bias applied in TF.js to dense_2's output (dropout is the identity at inference).
const inter = tf.model({
  inputs: model.inputs,
  outputs: ["block_2_add", "block_5_add", "flatten_1", "dense_2"].map((l) => model.getLayer(l).output),
});
const dense3 = model.getLayer("dense_3");
if (dense3.getConfig().activation !== "softmax") die("dense_3 is not a softmax layer");
const [k3, b3] = dense3.getWeights();

const probs = model.predict(xs);
const [b2, b5, pooled, h2] = inter.predict(xs);
const logits = tf.add(tf.matMul(h2, k3), b3);
const nchw = (t) => tf.transpose(t, [0, 3, 1, 2]);

fs.mkdirSync(args.out, { recursive: true });
const outs = { probs, logits, pooled, block_2: nchw(b2), block_5: nchw(b5) };
const meta = { tfjs: tf.version.tfjs, backend: tf.getBackend(), shapes: {} };
for (const [name, t] of Object.entries(outs)) {
  const data = t.dataSync();
  fs.writeFileSync(path.join(args.out, `${name}.f32`), Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  meta.shapes[name] = t.shape;
}
fs.writeFileSync(path.join(args.out, "meta.json"), JSON.stringify(meta));
const L = logits.arraySync();
const P = probs.arraySync();
for (let i = 0; i < n; i++)
  process.stdout.write(`tfjs image ${i}: logits [${L[i].map((v) => v.toFixed(5)).join(", ")}] `
    + `probs [${P[i].map((v) => v.toFixed(5)).join(", ")}]\n`);
