#!/usr/bin/env node
// Fake vLLM OpenAI-compatible server for client-overhead and load benchmarks (plain Node, no npm deps).
//
//   node benchmarks/fake_server.js [--port 8000] [--latency MS] [--host 127.0.0.1] [--no-batch-chat]
//        [--fault-rate R --seed S --fault-kinds 500,503,... --retry-after SECONDS] [--poison MARKER]
//
// POST /v1/completions: `prompt` is a string or a list of strings; `n` choices per prompt, prompt-major
//   (index = prompt_idx * n + j). Each choice's text is the tag found in its prompt as [[TAG]], then a few
//   fixed words; finish_reason "length"; usage with rough counts (prompt_tokens ~ words,
//   completion_tokens = max_tokens per choice). With "return_token_ids": true, each choice also carries
//   token_ids (max_tokens small ints) and prompt_token_ids (a short list).
// POST /v1/chat/completions: one conversation, `n` choices, each the tag found in its last message, as above.
// POST /v1/chat/completions/batch (off with --no-batch-chat: 404, as vLLM before it): `messages` is a list of
//   conversations, choice i answers conversation i; `n` must be 1 and `tool_choice` "none" (else 400, as vLLM);
//   usage is summed over the conversations and there is no prompt_token_ids; one poisoned conversation fails
//   the whole request.
// GET /v1/models, GET /health (empty 200).
// GET /stats[?reset=1]: own CPU (process.cpuUsage, µs), requests/prompts answered, max requests and prompts
//   in flight (reset=1 restarts the max counters after reading them); with faults, what was injected.
//
// Faults (off by default; the normal path is then unchanged). With --fault-rate R each generation request,
// in arrival order, draws from a PRNG seeded by --seed: with probability R it gets one fault, the kind drawn
// uniformly from --fault-kinds (default all of them):
//   500        {"error": ...} "Internal server error", as vLLM's InternalServerError
//   503        the engine is busy, with `Retry-After: <--retry-after, default 0.05>` (a float, as the SDK reads it)
//   429        too many requests
//   502        an HTML page, as a proxy in front of a dead server answers
//   reset      the connection is reset (TCP RST) once the request is read: no answer at all
//   cut        a 200 whose body stops half-way: content-length promises more, then the connection closes
//   truncated  a complete 200 whose JSON is cut in half (as through a broken proxy); not retryable
// With --poison MARKER every prompt (or last chat message) containing MARKER is "too long": the request is
// refused with vLLM's 400 (param "input_tokens"), so a pack holding one fails whole, as on vLLM.
// /stats then also gives `received` (every generation request, faults included), `faults` {kind: requests},
// `fault_prompts` {kind: {retry: prompts}} (retry = the SDK's x-stainless-retry-count header; a pack's prompts
// are counted once per fault) and `poisoned` {requests, single}: 400s sent, and those for a single prompt.
// With --latency MS every completion is answered MS milliseconds after its request arrived: the server's own
//   work (parsing, building and serializing the answer) is done inside that time, as on a real server, so
//   packs arriving together do not queue behind each other's processing on top of the latency.
// With --max-num-seqs N (as vLLM's) at most N sequences (prompts x n) are worked on at once: a request that
//   does not fit waits, first come first served, and its MS start when it is taken up; so the server's
//   throughput is at most N / latency sequences per second. A request with header
//   `endpoint-load-metrics-format` gets `endpoint-load-metrics: TEXT named_metrics.num_requests_waiting=W,
//   named_metrics.kv_cache_usage_perc=U` (W: sequences waiting, U: the share of N running), as vLLM answers.
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
const FAULT_RATE = parseFloat(opt('--fault-rate', '0'));
const FAULT_KINDS = opt('--fault-kinds', '500,503,429,502,reset,cut,truncated').split(',');
const RETRY_AFTER = opt('--retry-after', '0.05');
const POISON = opt('--poison', '');
const BATCH_CHAT = !args.includes('--no-batch-chat');
const MAX_NUM_SEQS = parseInt(opt('--max-num-seqs', '0'), 10);  // 0: no limit
let running = 0;  // sequences worked on (with --max-num-seqs)
const waiting = [];  // [sequences, start] of requests waiting for room, first come first served

const stats = { requests: 0, prompts: 0, inflight: 0, inflight_prompts: 0, max_inflight: 0, max_inflight_prompts: 0, errors: 0,
  received: 0, faults: {}, fault_prompts: {}, poisoned: { requests: 0, single: 0 } };
let seq = 0;

// mulberry32: a small seeded PRNG, so a run's sequence of fault draws is the same every time.
let prngState = parseInt(opt('--seed', '1'), 10) >>> 0;
function random() {
  prngState = (prngState + 0x6d2b79f5) >>> 0;
  let t = prngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
for (const kind of FAULT_KINDS) {
  if (!['500', '503', '429', '502', 'reset', 'cut', 'truncated'].includes(kind)) throw new Error('unknown fault kind ' + kind);
}

function countWords(s) {
  let n = 1;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) === 32) n++;
  return n;
}

function send(res, status, obj, headers) {
  const body = obj === null ? '' : JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

function error(res, status, message, type = 'BadRequestError', param = null, headers = undefined) {
  stats.errors++;
  send(res, status, { error: { message, type, param, code: status } }, headers);
}

// The fault for this request, or null: two draws per request whatever the outcome, so the sequence is stable.
function drawFault() {
  const hit = random() < FAULT_RATE;
  const kind = FAULT_KINDS[Math.floor(random() * FAULT_KINDS.length)];
  return hit ? kind : null;
}

function countFault(kind, req, prompts) {
  const retry = req.headers['x-stainless-retry-count'] || '0';
  stats.faults[kind] = (stats.faults[kind] || 0) + 1;
  const byRetry = stats.fault_prompts[kind] || (stats.fault_prompts[kind] = {});
  byRetry[retry] = (byRetry[retry] || 0) + prompts;
}

// Answers a request with `kind`; `answer` builds the 200 body (for the faults that send one).
function injectFault(kind, req, res, prompts, answer) {
  countFault(kind, req, prompts);
  if (kind === '500') return error(res, 500, 'Internal server error', 'InternalServerError');
  if (kind === '503') {
    return error(res, 503, 'The engine is currently busy and cannot accept new requests. Please retry later.',
      'ServiceUnavailableError', null, { 'retry-after': RETRY_AFTER });
  }
  if (kind === '429') return error(res, 429, 'Too many requests', 'RateLimitError');
  if (kind === '502') {
    stats.errors++;
    const page = '<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>'
      + '<hr><center>nginx</center></body></html>';
    res.writeHead(502, { 'content-type': 'text/html', 'content-length': Buffer.byteLength(page) });
    return res.end(page);
  }
  if (kind === 'reset') return req.socket.resetAndDestroy();
  const full = JSON.stringify(answer());
  const half = full.slice(0, full.length >> 1);
  if (kind === 'cut') {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(full) });
    return res.write(half, () => req.socket.destroy());  // closed once the half is sent
  }
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(half) });
  return res.end(half);  // truncated
}

function tooLong(res, chat) {
  const count = MAX_MODEL_LEN + 1000;
  const message = `This model's maximum context length is ${MAX_MODEL_LEN} tokens. However, your prompt contains `
    + `${count} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of `
    + 'the input prompt.' + (chat ? '' : ` (parameter=input_tokens, value=${count})`);
  return error(res, 400, message, 'BadRequestError', 'input_tokens');
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
  const poisoned = POISON !== '' && prompts.some((p) => p.includes(POISON));
  return [200, {
    id: 'cmpl-' + (++seq), object: 'text_completion', created: Math.floor(Date.now() / 1000),
    model: body.model || MODEL, choices, service_tier: null, system_fingerprint: null,
    usage: { prompt_tokens: promptTokens, total_tokens: promptTokens + completionTokens,
      completion_tokens: completionTokens, prompt_tokens_details: null },
  }, prompts.length, poisoned];
}

function chatCompletion(body) {
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0 || messages.some((m) => typeof m?.content !== 'string')) {
    return [400, 'messages must be a non-empty list of messages with string content'];
  }
  const n = body.n == null ? 1 : body.n;
  const maxTokens = body.max_tokens == null ? 16 : body.max_tokens;
  const withIds = body.return_token_ids === true;
  const m = TAG_RE.exec(messages[messages.length - 1].content);
  const text = (m ? m[1] : '') + WORDS;
  let promptTokens = 0;
  for (const message of messages) promptTokens += countWords(message.content);
  const choices = [];
  for (let j = 0; j < n; j++) {
    const c = { index: j, message: { role: 'assistant', content: text, reasoning: null, tool_calls: [] },
      logprobs: null, finish_reason: 'length', stop_reason: null };
    if (withIds) c.token_ids = Array.from({ length: maxTokens }, (_, k) => (k % 100) + 1);
    choices.push(c);
  }
  const poisoned = POISON !== '' && messages.some((message) => message.content.includes(POISON));
  return [200, {
    id: 'chatcmpl-' + (++seq), object: 'chat.completion', created: Math.floor(Date.now() / 1000),
    model: body.model || MODEL, choices, service_tier: null, system_fingerprint: null,
    usage: { prompt_tokens: promptTokens, total_tokens: promptTokens + maxTokens * n,
      completion_tokens: maxTokens * n, prompt_tokens_details: null },
    prompt_logprobs: null, prompt_token_ids: withIds ? [1, 2, 3, 4] : null,
  }, 1, poisoned];
}

function chatChoice(messages, index, maxTokens, withIds) {
  const m = TAG_RE.exec(messages[messages.length - 1].content);
  const c = { index, message: { role: 'assistant', content: (m ? m[1] : '') + WORDS, reasoning: null },
    logprobs: null, finish_reason: 'length', stop_reason: null };
  if (withIds) c.token_ids = Array.from({ length: maxTokens }, (_, k) => (k % 100) + 1);
  return c;
}

function batchChatCompletion(body) {
  const conversations = body.messages;
  if (!Array.isArray(conversations) || conversations.length === 0 || conversations.some((messages) =>
    !Array.isArray(messages) || messages.length === 0 || messages.some((m) => typeof m?.content !== 'string'))) {
    return [400, 'messages must be a non-empty list of non-empty conversations with string content'];
  }
  if (body.n != null && body.n !== 1) {
    return [400, `Batch chat completions do not support \`n > 1\`. Please set \`n\` to 1. (parameter=n, value=${body.n})`,
      'n'];
  }
  if (body.tool_choice != null && body.tool_choice !== 'none') return [400, "Input should be 'none'", 'body.tool_choice'];
  const maxTokens = body.max_tokens == null ? 16 : body.max_tokens;
  const withIds = body.return_token_ids === true;
  const choices = [];
  let promptTokens = 0;
  let poisoned = false;
  for (let i = 0; i < conversations.length; i++) {
    const messages = conversations[i];
    for (const message of messages) {
      promptTokens += countWords(message.content);
      if (POISON !== '' && message.content.includes(POISON)) poisoned = true;
    }
    choices.push(chatChoice(messages, i, maxTokens, withIds));
  }
  const completionTokens = maxTokens * conversations.length;
  return [200, {
    id: 'chatcmpl-' + (++seq), object: 'chat.completion', created: Math.floor(Date.now() / 1000),
    model: body.model || MODEL, choices, service_tier: null, system_fingerprint: null,
    usage: { prompt_tokens: promptTokens, total_tokens: promptTokens + completionTokens,
      completion_tokens: completionTokens, prompt_tokens_details: null },
    prompt_logprobs: null, prompt_token_ids: null,
  }, conversations.length, poisoned];
}

// A generation request: `build(body)` gives [status, payload or message, prompts, poisoned] (or, for a 400,
// [status, message, param]).
function generation(req, res, build, chat) {
  const arrived = performance.now();
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    stats.received++;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      return error(res, 400, 'invalid JSON');
    }
    const [status, payload, np, poisoned] = build(body);
    if (status !== 200) return error(res, status, payload, 'BadRequestError', np ?? null);
    if (FAULT_RATE > 0) {
      const kind = drawFault();
      if (kind !== null) return injectFault(kind, req, res, np, () => payload);
    }
    if (poisoned) {
      stats.poisoned.requests++;
      if (np === 1) stats.poisoned.single++;
      return tooLong(res, chat);
    }
    stats.requests++;
    stats.prompts += np;
    stats.inflight++;
    stats.inflight_prompts += np;
    if (stats.inflight > stats.max_inflight) stats.max_inflight = stats.inflight;
    if (stats.inflight_prompts > stats.max_inflight_prompts) stats.max_inflight_prompts = stats.inflight_prompts;
    const body200 = JSON.stringify(payload);
    const seqs = np * (body.n || 1);
    const headers = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body200) };
    const metrics = req.headers['endpoint-load-metrics-format'] !== undefined;
    const done = () => {
      stats.inflight--;
      stats.inflight_prompts -= np;
      if (MAX_NUM_SEQS > 0) {
        running -= seqs;
        while (waiting.length && (running === 0 || running + waiting[0][0] <= MAX_NUM_SEQS)) {
          const [next, start] = waiting.shift();
          running += next;
          start();
        }
      }
      if (metrics) headers['endpoint-load-metrics'] = loadMetrics();
      res.writeHead(200, headers);
      res.end(body200);
    };
    if (MAX_NUM_SEQS > 0) {
      const start = () => setTimeout(done, LATENCY);
      if (waiting.length === 0 && (running === 0 || running + seqs <= MAX_NUM_SEQS)) {
        running += seqs;
        start();
      } else waiting.push([seqs, start]);
    } else if (LATENCY > 0) setTimeout(done, Math.max(0, LATENCY - (performance.now() - arrived)));
    else done();  // answered inside its own callback: max in flight is 1 without latency
  });
}

function loadMetrics() {
  const queued = waiting.reduce((sum, [seqs]) => sum + seqs, 0);
  const usage = MAX_NUM_SEQS > 0 ? running / MAX_NUM_SEQS : 0;
  return `TEXT named_metrics.num_requests_waiting=${queued.toFixed(1)}, named_metrics.kv_cache_usage_perc=${usage.toFixed(3)}`;
}

const server = http.createServer((req, res) => {
  const url = req.url;
  if (req.method === 'POST' && url === '/v1/completions') return generation(req, res, completion, false);
  if (req.method === 'POST' && url === '/v1/chat/completions') return generation(req, res, chatCompletion, true);
  if (BATCH_CHAT && req.method === 'POST' && url === '/v1/chat/completions/batch') {
    return generation(req, res, batchChatCompletion, true);
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
