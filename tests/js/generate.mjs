// transformers.js (Node) as a client of mlxgpt export folders, used by tests/test_clients.py
// and scripts/bench_clients.py. One Node process serves many jobs, so Node and each model
// load once.
//
// stdin: one JSON job per line
//   {folder, prompts: [str], max_new_tokens, batch: bool, pad_token_id: int | null,
//    timed_runs: int, dtype: str (optional: transformers.js's dtype option)}
// stdout: one JSON result per line, in order
//   {encoded: [[id]], generated: [[id]], texts: [str], batch: [[id]] | null, seconds: [s]}
// `generated` holds the new tokens of each prompt alone (greedy), `texts` their decoding,
// `batch` the new tokens of all prompts as one left-padded batch (when `batch`), and
// `seconds` the wall time of each of `timed_runs` further greedy runs of the first prompt.
// Models load only from the local folder: remote models are off.
import path from "node:path";
import readline from "node:readline";
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

env.allowRemoteModels = false;
env.allowLocalModels = true;

const loaded = new Map();

// Without a `dtype` option the model file is the one config.json's
// transformers.js_config.dtype names (what `mlxgpt export` wrote: fp32, fp16 or q8).
async function load(folder, dtype) {
  const key = `${folder}\n${dtype ?? ""}`;
  if (!loaded.has(key)) {
    env.localModelPath = path.dirname(folder);
    const name = path.basename(folder);
    const tokenizer = await AutoTokenizer.from_pretrained(name);
    const model = await AutoModelForCausalLM.from_pretrained(name, dtype ? { dtype } : {});
    loaded.set(key, { tokenizer, model });
  }
  return loaded.get(key);
}

const newTokens = (output, promptLength) =>
  output.tolist().map((row) => row.slice(promptLength).map(Number));

async function run(job) {
  const { tokenizer, model } = await load(job.folder, job.dtype);
  const settings = { max_new_tokens: job.max_new_tokens, do_sample: false };
  const result = { encoded: [], generated: [], texts: [], batch: null, seconds: [] };
  for (const prompt of job.prompts) {
    const inputs = tokenizer(prompt);
    const [ids] = newTokens(await model.generate({ ...inputs, ...settings }), inputs.input_ids.dims[1]);
    result.encoded.push(Array.from(inputs.input_ids.data, Number));
    result.generated.push(ids);
    result.texts.push(tokenizer.decode(ids, { skip_special_tokens: true }));
  }
  if (job.batch) {
    if (job.pad_token_id != null) tokenizer.pad_token_id = job.pad_token_id;
    const inputs = tokenizer(job.prompts, { padding: true });
    const output = await model.generate({ ...inputs, ...settings });
    result.batch = newTokens(output, inputs.input_ids.dims[1]);
  }
  const inputs = tokenizer(job.prompts[0]);
  for (let i = 0; i < (job.timed_runs ?? 0); i++) {
    const start = process.hrtime.bigint();
    await model.generate({ ...inputs, ...settings });
    result.seconds.push(Number(process.hrtime.bigint() - start) / 1e9);
  }
  return result;
}

for await (const line of readline.createInterface({ input: process.stdin })) {
  if (line.trim()) process.stdout.write(`${JSON.stringify(await run(JSON.parse(line)))}\n`);
}
