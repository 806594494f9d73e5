#!/usr/bin/env node
// Fake vLLM OpenAI-compatible server for client-overhead benchmarks (plain Node, no npm deps).
//
//   node benchmarks/fake_server.js [--port 8000] [--latency MS] [--host 127.0.0.1]
//
// POST /v1/completions: `prompt` is a string or a list of strings; `n` choices per prompt, prompt-major
//   (index = prompt_idx * n + j). Each choice's text is the tag found in its prompt as [[TAG]], then a few
//   fixed words; finish_reason "length"; usage with rough counts (prompt_tokens ~ words,
//   completion_tokens = max_tokens per choice). With "return_token_ids": true, each choice also carries
//   token_ids (max_tokens small ints) and prompt_token_ids (a short list).
// GET /v1/models, GET /health (empty 200).
// GET /stats[?reset=1]: own CPU (process.cpuUsage, µs), requests/prompts answered, max requests and prompts
//   in flight (reset=1 restarts the max counters after reading them).
// With --latency MS every completion is answered MS milliseconds after its request arrived: the server's own
//   work (parsing, building and serializing the answer) is done inside that time, as on a real server, so
//   packs arriving together do not queue behind each other's processing on top of the latency.
'use strict';
const http = require('http');
const { performance } = require('perf_hooks');

const args = process.argv.slice(2);
function opt(name, dflt) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
}
const PORT = parseInt(opt('--port', '8000'), 10);
const HOST = opt('--host', '127.0.0.1');
const LATENCY = parseFloat(opt('--latency', '0'));
const MODEL = opt('--model', 'fake-model');
const MAX_MODEL_LEN = 4096;
const WORDS = ' lorem ipsum dolor sit amet';
const TAG_RE = /\[\[([^\]]*)\]\]/;

const stats = { requests: 0, prompts: 0, inflight: 0, inflight_prompts: 0, max_inflight: 0, max_inflight_prompts: 0, errors: 0 };
let seq = 0;

function countWords(s) {
  let n = 1;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) === 32) n++;
  return n;
}

function send(res, status, obj) {
  const body = obj === null ? '' : JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function error(res, status, message) {
  stats.errors++;
  send(res, status, { error: { message, type: 'BadRequestError', param: null, code: status } });
}

function completion(body) {
  let prompts = body.prompt;
  if (typeof prompts === 'string') prompts = [prompts];
  if (!Array.isArray(prompts) || prompts.length === 0 || prompts.some((p) => typeof p !== 'string')) {
    return [400, 'prompt must be a non-empty string or list of strings'];
  }
  const n = body.n == null ? 1 : body.n;
  const maxTokens = body.max_tokens == null ? 16 : body.max_tokens;
  const withIds = body.return_token_ids === true;
  const tokenIds = withIds ? Array.from({ length: maxTokens }, (_, k) => (k % 100) + 1) : null;
  const choices = [];
  let promptTokens = 0;
  for (let p = 0; p < prompts.length; p++) {
    const m = TAG_RE.exec(prompts[p]);
    const text = (m ? m[1] : '') + WORDS;
    promptTokens += countWords(prompts[p]);
    for (let j = 0; j < n; j++) {
      const c = { index: p * n + j, text, logprobs: null, finish_reason: 'length', stop_reason: null };
      if (withIds) {
        c.token_ids = tokenIds;
        c.prompt_token_ids = [1, 2, 3, 4];
      }
      choices.push(c);
    }
  }
  const completionTokens = maxTokens * n * prompts.length;
  return [200, {
    id: 'cmpl-' + (++seq), object: 'text_completion', created: Math.floor(Date.now() / 1000),
    model: body.model || MODEL, choices, service_tier: null, system_fingerprint: null,
    usage: { prompt_tokens: promptTokens, total_tokens: promptTokens + completionTokens,
      completion_tokens: completionTokens, prompt_tokens_details: null },
  }, prompts.length];
}

const server = http.createServer((req, res) => {
  const url = req.url;
  if (req.method === 'POST' && url === '/v1/completions') {
    const arrived = performance.now();
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch (e) {
        return error(res, 400, 'invalid JSON');
      }
      const [status, payload, np] = completion(body);
      if (status !== 200) return error(res, status, payload);
      stats.requests++;
      stats.prompts += np;
      stats.inflight++;
      stats.inflight_prompts += np;
      if (stats.inflight > stats.max_inflight) stats.max_inflight = stats.inflight;
      if (stats.inflight_prompts > stats.max_inflight_prompts) stats.max_inflight_prompts = stats.inflight_prompts;
      const body200 = JSON.stringify(payload);
      const done = () => {
        stats.inflight--;
        stats.inflight_prompts -= np;
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body200) });
        res.end(body200);
      };
      if (LATENCY > 0) setTimeout(done, Math.max(0, LATENCY - (performance.now() - arrived)));
      else done();  // answered inside its own callback: max in flight is 1 without latency
    });
    return;
  }
  if (req.method === 'GET' && url === '/v1/models') {
    return send(res, 200, { object: 'list', data: [{ id: MODEL, object: 'model', created: 0, owned_by: 'vllm',
      root: MODEL, parent: null, max_model_len: MAX_MODEL_LEN, permission: [] }] });
  }
  if (req.method === 'GET' && url === '/health') return send(res, 200, null);
  if (req.method === 'GET' && (url === '/stats' || url === '/stats?reset=1')) {
    const cpu = process.cpuUsage();
    send(res, 200, { ...stats, cpu_user_us: cpu.user, cpu_system_us: cpu.system, cpu_us: cpu.user + cpu.system,
      rss_mb: process.memoryUsage().rss / 1048576 });
    if (url === '/stats?reset=1') {
      stats.max_inflight = stats.inflight;
      stats.max_inflight_prompts = stats.inflight_prompts;
    }
    return;
  }
  send(res, 404, { detail: 'Not Found' });
});
server.keepAliveTimeout = 60000;
server.headersTimeout = 65000;
server.maxRequestsPerSocket = 0;
server.listen(PORT, HOST, () => console.log(`fake vLLM listening on http://${HOST}:${PORT} latency=${LATENCY}ms`));
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0));
