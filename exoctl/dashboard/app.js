// exoctl dashboard: polls GET /state every second and draws it; places, deletes and chats through
// the same HTTP API as any client. No framework and no build step: this file is served as it is.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "exoctl-api-key";
// one colour per node, the same in every panel (node order: the inventory's)
const PALETTE = ["#4f8cff", "#f59e0b", "#10b981", "#e879f9", "#f97316", "#22d3ee", "#a3e635", "#f43f5e"];

const ui = {
  state: null,
  models: [],
  apiKeyRequired: false,
  polling: false,
  previewSeq: 0,
  chosenPreview: null,
  chat: [],
  chatBusy: false,
  started: false,
  liveNodes: null,
};

const $ = (id) => document.getElementById(id);

// h("div", {class: "x", style: {"--node": c}}, child, "text", ...)
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "style") for (const [k, v] of Object.entries(value)) el.style.setProperty(k, v);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

function tag(doc) { // a tagged union {"Tag": {...}} as [tag, body]
  const [name] = Object.keys(doc || {});
  return [name, name ? doc[name] : {}];
}

function nodeNames() { return ui.state ? ui.state.topology.nodes : []; }
function nodeColor(name) {
  const index = nodeNames().indexOf(name);
  return PALETTE[(index < 0 ? 0 : index) % PALETTE.length];
}
function dot(name) { return h("span", { class: "dot", style: { "--node": nodeColor(name) } }); }

// --- talking to serve ------------------------------------------------------------------------

class AuthError extends Error {}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    askKey("That key was refused: type the key `exoctl serve` was started with.");
    throw new AuthError("API key refused");
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function askKey(message) {
  setConn("wait", "API key needed");
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function setConn(kind, text) {
  const conn = $("conn");
  conn.className = `pill pill-${kind}`;
  conn.textContent = text;
}

async function poll() {
  if (ui.polling) return;
  ui.polling = true;
  try {
    ui.state = await apiJson("/state");
    setConn("ok", "live");
    render();
  } catch (error) {
    if (!(error instanceof AuthError)) setConn("bad", "serve unreachable");
  } finally {
    ui.polling = false;
  }
}

async function loadModels() {
  try {
    const list = await apiJson("/models");
    ui.models = list.data;
    renderModelChoices();
  } catch (error) {
    if (!(error instanceof AuthError)) $("preview").textContent = `Cannot list models: ${error.message}`;
  }
}

// --- drawing the state -------------------------------------------------------------------------

function render() {
  const state = ui.state;
  const names = nodeNames();
  const up = names.filter((n) => state.nodeProfiles[n] && state.nodeProfiles[n].status === "up").length;
  $("cluster").textContent = `cluster ${state.cluster}`;
  $("summary").textContent =
    `${up}/${names.length} nodes up · ${Object.keys(state.instances).length} instance(s)`;
  $("nodes").replaceChildren(...names.map(renderNode));
  const instances = Object.entries(state.instances).map(([id, doc]) => renderInstance(id, doc));
  $("instances").replaceChildren(...(instances.length ? instances : [h("p", { class: "muted" }, "No instance placed.")]));
  renderDownloads(state.downloads || {});
  renderReformations(state.reformations || []);
  renderNodeChoices(up);
  renderChatChoices();
  // a preview is only as good as the live nodes it was made for
  const live = names.filter((n) => state.nodeProfiles[n] && state.nodeProfiles[n].status === "up").join(",");
  if (ui.liveNodes !== null && live !== ui.liveNodes) refreshPreview();
  ui.liveNodes = live;
}

function meter(label, fraction, text) {
  const pct = Math.max(0, Math.min(1, fraction)) * 100;
  const level = pct > 90 ? "full" : pct > 75 ? "hot" : "";
  return h("div", { class: "meter" },
    h("span", { class: "muted" }, label),
    h("div", { class: "track" }, h("div", { class: `fill ${level}`, style: { width: `${pct.toFixed(1)}%` } })),
    h("span", {}, text));
}

function renderNode(name) {
  const profile = ui.state.nodeProfiles[name] || {};
  const memory = ui.state.nodeMemory[name];
  const isUp = profile.status === "up";
  const card = h("div", {
    class: `node ${isUp ? "up" : "down"}`, "data-node": name, "data-status": isUp ? "up" : "down",
    style: { "--node": nodeColor(name) },
  });
  card.append(h("div", { class: "node-head" },
    dot(name), h("span", { class: "node-name" }, name),
    h("span", { class: `pill ${isUp ? "pill-ok" : "pill-bad"}` }, isUp ? "up" : "down")));
  card.append(h("div", { class: "node-meta mono" }, profile.address || ""));
  if (!isUp) {
    card.append(h("div", { class: "error" }, profile.error || "not answering"));
    return card;
  }
  const total = memory.ramTotal.inBytes;
  const used = total - memory.ramAvailable.inBytes;
  card.append(meter("RAM", used / total, `${bytes(used)} / ${bytes(total)}`));
  card.append(meter("CPU", profile.cpuPercent / 100, `${profile.cpuPercent.toFixed(0)}%`));
  card.append(h("div", { class: "node-meta" },
    h("span", {}, `${profile.cpuCount} cores${profile.threads ? ` · ${profile.threads} threads` : ""}`),
    h("span", {}, `v${profile.version}`),
    h("span", {}, `${profile.runners.length} runner${profile.runners.length === 1 ? "" : "s"}`),
    h("span", {}, `worker ${bytes(profile.processRss.inBytes)}`)));
  if (profile.cpuModel) card.append(h("div", { class: "node-meta" }, profile.cpuModel));
  // the vector path the node's kernels run (avx512+vnni+bf16, avx2, portable)
  if (profile.kernelPath) card.append(h("div", { class: "node-meta", "data-role": "kernel" }, `kernel: ${profile.kernelPath}`));
  // measured speed: what its kernels read weights at (decode is memory-bound)
  if (profile.readRates) {
    card.append(h("div", { class: "node-meta", "data-role": "speed" },
      `reads ${(profile.readRates.float32 / 1e9).toFixed(1)} GB/s f32 · ${(profile.readRates.int4 / 1e9).toFixed(1)} GB/s int4`));
  }
  // its links as it measured them (exoctl nodes --probe, or when a model is placed)
  const links = Object.entries((ui.state.topology.connections || {})[name] || {})
    .filter(([, edges]) => edges.length && edges[0].latencyMs !== null && edges[0].latencyMs !== undefined);
  if (links.length) {
    card.append(h("div", { class: "node-meta", "data-role": "links" },
      ...links.map(([sink, edges]) => h("span", { "data-sink": sink },
        `→ ${sink}: ${edges[0].latencyMs.toFixed(2)} ms, ${edges[0].bandwidthMbps >= 1000 ? (edges[0].bandwidthMbps / 1000).toFixed(2) + " Gbit/s" : edges[0].bandwidthMbps.toFixed(0) + " Mbit/s"}`))));
  }
  return card;
}

function statusPill(status) {
  const kind = { ready: "ok", running: "ok", loading: "wait", failed: "bad" }[status] || "plain";
  return h("span", { class: `pill pill-${kind}`, "data-role": "status" }, status);
}

function runnerOf(runnerId) {
  return tag((ui.state.runners || {})[runnerId]);
}

function renderInstance(instanceId, doc) {
  const [kind, inst] = tag(doc);
  const assignments = inst.shardAssignments;
  const shards = Object.entries(assignments.nodeToRunner).map(([node, runnerId]) => {
    const [, meta] = tag(assignments.runnerToShard[runnerId]);
    const [runnerStatus, runner] = runnerOf(runnerId);
    return { node, runnerId, meta, runnerStatus, runner };
  }).sort((a, b) => a.meta.deviceRank - b.meta.deviceRank);
  const nLayers = shards.length ? shards[0].meta.nLayers : 0;
  const tps = inst.decodeTokensPerSecond ? `${inst.decodeTokensPerSecond.toFixed(1)} tok/s` : null;
  const cache = inst.prefixCache;  // the head's word on cached prefixes (absent: an older worker)
  const spec = inst.speculation;  // speculative decoding (absent: no drafter)
  const card = h("div", {
    class: "instance", "data-instance": instanceId, "data-sharding": inst.sharding,
    "data-status": inst.status,
  });
  card.append(h("div", { class: "instance-head" },
    h("span", { class: "instance-model" }, assignments.modelId),
    h("span", { class: "pill pill-plain" }, inst.sharding),
    h("span", { class: "pill pill-plain" }, inst.dtype),
    statusPill(inst.status),
    tps && h("span", { class: "pill pill-plain", title: "decode tokens/s of the last request" }, tps),
    cache && h("span", {
      class: "pill pill-plain", "data-role": "prefix-cache",
      "data-hits": cache.hits, "data-reused": cache.reusedTokens,
      title: cache.budgetPositions
        ? `cached prefixes: ${cache.hits} of ${cache.lookups} requests reused one, ${cache.reusedTokens} prompt tokens not read again, ${cache.evictions} evicted (budget ${cache.budgetPositions} positions)`
        : "cached prefixes are off for this instance",
    }, cache.budgetPositions ? `cache ${cache.hits}/${cache.lookups} hits · ${cache.reusedTokens} tok` : "cache off"),
    spec && h("span", {
      class: "pill pill-plain", "data-role": "speculation",
      "data-accepted": spec.accepted, "data-drafted": spec.drafted,
      title: `speculative decoding by ${spec.drafter}: ${spec.accepted} of ${spec.drafted} guessed tokens accepted over ${spec.verifyPasses} verification passes; ${spec.tokens} tokens in ${spec.passes} decode passes`,
    }, `${spec.drafter} · ${spec.tokensPerPass.toFixed(2)} tok/pass · ${(100 * spec.acceptance).toFixed(0)}% accepted`),
    h("span", { class: "spacer" }),
    h("button", { class: "danger", type: "button", "data-action": "delete", onclick: () => removeInstance(instanceId) }, "Delete")));
  card.append(h("div", { class: "instance-id mono" }, `${kind} · ${instanceId}`));
  if (inst.sharding === "Tensor") card.append(renderTensor(shards, nLayers));
  else card.append(renderPipeline(shards, nLayers));
  if (inst.expertTokensByNode) card.append(renderExperts(inst.expertTokensByNode));
  if (inst.error) card.append(h("p", { class: "error" }, inst.error));
  return card;
}

function loadProgress(shard) {
  if (shard.runnerStatus !== "RunnerLoading") return null;
  const total = shard.runner.totalLayers || 1;
  const pct = (100 * shard.runner.layersLoaded) / total;
  return h("div", { class: "progress", title: `${shard.runner.layersLoaded}/${total} layers loaded` },
    h("div", { style: { width: `${pct.toFixed(0)}%` } }));
}

function legendRow(shard, what) {
  const memory = shard.runner && shard.runner.memoryBytes ? bytes(shard.runner.memoryBytes) : "";
  const prefix = shard.runner && shard.runner.prefixCache;
  const cached = prefix && prefix.budgetBytes
    ? `cache ${bytes(prefix.bytes)} / ${bytes(prefix.budgetBytes)}, ${prefix.hits} hits` : "";
  const state = shard.runnerStatus === "RunnerLoading"
    ? `loading ${shard.runner.layersLoaded}/${shard.runner.totalLayers}`
    : shard.runnerStatus === "RunnerFailed" ? "failed" : "";
  return h("div", {},
    h("div", { class: "legend-row", "data-node": shard.node },
      dot(shard.node), h("strong", {}, shard.node), h("span", {}, what),
      h("span", { class: "muted", "data-role": "runner-note" }, [memory, cached, state].filter(Boolean).join(" · "))),
    loadProgress(shard));
}

function renderPipeline(shards, nLayers) {
  const bar = h("div", { class: "layerbar", "data-role": "layerbar", title: `layers [0, ${nLayers})` });
  for (const s of shards) {
    const count = s.meta.endLayer - s.meta.startLayer;
    bar.append(h("div", {
      class: `seg ${s.runnerStatus === "RunnerLoading" ? "loading" : ""}`,
      "data-node": s.node, "data-start": s.meta.startLayer, "data-end": s.meta.endLayer,
      style: { "--node": nodeColor(s.node), "flex-grow": String(count) },
      title: `${s.node}: layers [${s.meta.startLayer}, ${s.meta.endLayer})`,
    }, `${s.node} · ${s.meta.startLayer}–${s.meta.endLayer - 1}`));
  }
  return h("div", {}, bar,
    h("div", { class: "axis" }, h("span", {}, "layer 0"), h("span", {}, `${nLayers} layers`)),
    h("div", { class: "legend" },
      shards.map((s) => legendRow(s, `layers [${s.meta.startLayer}, ${s.meta.endLayer}) · ${s.meta.endLayer - s.meta.startLayer} of ${nLayers}`))));
}

function renderTensor(shards, nLayers) {
  const k = shards.length;
  const rows = shards.map((s) => h("div", { class: "tensor-row", "data-node": s.node, "data-rank": s.meta.deviceRank },
    h("span", {}, dot(s.node), " ", h("strong", {}, s.node)),
    h("div", { class: "tensor-bar", style: { "--node": nodeColor(s.node) } },
      `rank ${s.meta.deviceRank}: 1/${k} of every layer [0, ${nLayers})`)));
  return h("div", {}, h("div", { class: "tensor-rows", "data-role": "tensor" }, rows),
    h("div", { class: "legend" }, shards.map((s) => legendRow(s, `rank ${s.meta.deviceRank} of ${k}`))));
}

function renderExperts(byNode) {
  const nodes = Object.keys(byNode);
  const experts = [...new Set(nodes.flatMap((n) => Object.keys(byNode[n]).map(Number)))].sort((a, b) => a - b);
  const most = Math.max(1, ...nodes.flatMap((n) => Object.values(byNode[n])));
  const head = h("tr", {}, h("th", {}, ""), experts.map((e) => h("th", { style: { "text-align": "center" } }, `E${e}`)));
  const rows = nodes.map((node) => h("tr", { "data-node": node },
    h("th", {}, node),
    experts.map((e) => {
      const tokens = byNode[node][String(e)];
      if (tokens === undefined) return h("td", { class: "absent", title: `${node} does not hold expert ${e}` }, "·");
      const strength = 0.18 + 0.82 * (tokens / most);
      return h("td", {
        "data-expert": e, "data-tokens": tokens,
        style: { background: `color-mix(in srgb, ${nodeColor(node)} ${(strength * 100).toFixed(0)}%, #0f1216)` },
        title: `${node}, expert ${e}: ${tokens} tokens`,
      }, tokens);
    })));
  return h("div", { class: "heat", "data-role": "experts" },
    h("div", { class: "muted" }, "Experts by node: tokens routed to each"),
    h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

function renderDownloads(byNode) {
  // EXO's shape: node -> [{"DownloadOngoing" | "DownloadCompleted" | ...: {...}}], oldest first.
  // One row per node, model and layer range (its latest download); running ones first, then newest.
  const latest = new Map();
  for (const [node, list] of Object.entries(byNode)) {
    for (const doc of list) {
      const [kind, body] = tag(doc);
      const shard = tag(body.shardMetadata)[1];
      latest.set(`${node}|${body.modelId}|${shard.startLayer}|${shard.endLayer}`, { node, kind, body, shard });
    }
  }
  const order = { DownloadOngoing: 0, DownloadPending: 1, DownloadFailed: 2, DownloadCompleted: 3 };
  const newest = (a, b) => (b.body.startedAt || 0) - (a.body.startedAt || 0);
  const rows = [...latest.values()].sort((a, b) => order[a.kind] - order[b.kind] || newest(a, b)).slice(0, 8)
    .map(({ node, kind, body, shard }) => {
      const progress = body.downloadProgress;
      const total = progress ? progress.total.inBytes : body.total ? body.total.inBytes : 0;
      const done = progress ? progress.downloaded.inBytes : kind === "DownloadCompleted" ? total : 0;
      const state = kind.replace("Download", "").toLowerCase();
      const detail = {
        ongoing: () => `${bytes(done)} / ${bytes(total)} · ${bytes(progress.speed)}/s · ${progress.completedFiles}/${progress.totalFiles} files`,
        completed: () => bytes(total),
        failed: () => body.errorMessage,
        pending: () => "waiting",
      }[state]();
      const pct = total ? (100 * done) / total : state === "completed" ? 100 : 0;
      return h("div", { class: `download ${state}`, "data-node": node, "data-model": body.modelId, "data-state": state, style: { "--node": nodeColor(node) } },
        h("div", { class: "download-head" }, dot(node), h("strong", {}, node), " ",
          `${body.modelId} [${shard.startLayer}, ${shard.endLayer})`, h("span", { class: "muted" }, ` ${state}`)),
        h("div", { class: "download-bar" },
          h("div", { class: "track" }, h("div", { class: "fill", style: { width: `${pct.toFixed(1)}%` } })),
          h("span", {}, detail)));
    });
  $("downloads").replaceChildren(...(rows.length ? rows
    : [h("p", { class: "muted" }, "None yet: exoctl download MODEL fetches a model onto the nodes.")]));
}

function renderReformations(events) {
  const list = $("reformations");
  if (!events.length) {
    list.replaceChildren(h("li", { class: "muted" }, "None: no instance has lost a node."));
    return;
  }
  list.replaceChildren(...events.slice().reverse().map((event) => {
    const when = new Date(event.time * 1000).toLocaleTimeString();
    const short = (id) => (id || "").slice(0, 8);
    const placedOn = () => `as ${short(event.newInstanceId)} on ${event.nodes.join(", ")}`;
    const what = {
      "replaced": () => `placed again ${placedOn()}`,
      "restored": () => `restored ${placedOn()}`,
      "not replaced": () => `not placed again: ${event.error}`,
      "not restored": () => `not restored yet: ${event.error}`,
    }[event.action]?.() || event.action;
    const lost = event.action.endsWith("replaced") ? " lost a node: " : ": ";
    return h("li", { class: event.action.startsWith("not") ? "bad" : "", "data-action": event.action },
      h("span", { class: "when" }, when),
      `${event.modelId} (${short(event.instanceId)})${lost}${event.reason}. `, h("strong", {}, what));
  }));
}

// --- placing -------------------------------------------------------------------------------------

function keepValue(select, options) {
  const value = select.value;
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === value)) select.value = value;
}

function renderModelChoices() {
  const cpu = ui.models.filter((m) => !m.tags.includes("cuda") && !m.tags.includes("local"));
  const local = ui.models.filter((m) => m.tags.includes("local"));
  const label = (m) => `${m.name} · ${m.id} · ${bytes(m.storage_size_bytes)}${m.downloaded ? " · on this machine" : ""}`;
  const groups = [h("option", { value: "" }, "choose a model…")];
  groups.push(h("optgroup", { label: "Catalog" }, cpu.map((m) => h("option", { value: m.id }, label(m)))));
  if (local.length) groups.push(h("optgroup", { label: "In the nodes' model directories" }, local.map((m) => h("option", { value: m.id }, label(m)))));
  keepValue($("place-model"), groups);
}

function renderNodeChoices(up) {
  const select = $("place-nodes");
  const options = [h("option", { value: "" }, "any")];
  for (let i = 1; i <= Math.max(up, 1); i++) options.push(h("option", { value: String(i) }, String(i)));
  if (select.options.length !== options.length) keepValue(select, options);
}

function placeTarget() {
  return $("place-ref").value.trim() || $("place-model").value;
}

function pickPreview(previews) {
  const sharding = $("place-sharding").value;
  const nodes = $("place-nodes").value ? Number($("place-nodes").value) : null;
  const matching = previews.filter((p) => (sharding === "auto" || p.sharding === sharding) && (nodes === null || p.nodes === nodes));
  // as `place` chooses when not told: the fewest nodes that fit, pipeline before tensor
  return { matching, chosen: matching.find((p) => p.error === null) || null };
}

async function refreshPreview() {
  const target = placeTarget();
  const seq = ++ui.previewSeq;
  ui.chosenPreview = null;
  $("place-button").disabled = true;
  if (!target) {
    $("preview").textContent = "Pick a model to see where it would go.";
    return;
  }
  $("preview").textContent = "Working out where it would go…";
  const dtype = $("place-dtype").value;
  try {
    const body = await apiJson(`/instance/previews?model_id=${encodeURIComponent(target)}&dtype=${dtype}&instance_meta=CpuRing`);
    if (seq !== ui.previewSeq) return;
    const { matching, chosen } = pickPreview(body.previews);
    ui.chosenPreview = chosen;
    $("preview").replaceChildren(renderPreview(matching, chosen));
    $("place-button").disabled = !chosen;
  } catch (error) {
    if (seq === ui.previewSeq && !(error instanceof AuthError)) {
      $("preview").replaceChildren(h("span", { class: "error" }, error.message));
    }
  }
}

function renderPreview(matching, chosen) {
  if (!matching.length) return h("span", { class: "error" }, "No node is up to place it on.");
  const rows = matching.map((p) => h("tr", { class: p === chosen ? "chosen" : "", "data-sharding": p.sharding, "data-nodes": p.nodes },
    h("td", {}, p.sharding), h("td", {}, String(p.nodes)),
    h("td", {}, p.error === null
      ? p.shards.map((s) => h("span", { class: "chip" }, dot(s.node), `${s.node} `,
          h("span", { class: "muted" }, p.sharding === "Tensor" ? `1/${p.nodes} · ${bytes(s.memory_bytes)}` : `[${s.start_layer}, ${s.end_layer}) · ${bytes(s.memory_bytes)}`)))
      : h("span", { class: "error" }, p.error))));
  return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Sharding"), h("th", {}, "Nodes"), h("th", { title: "weights plus the KV cache reserved for the full context" }, "Where (memory reserved)"))),
    h("tbody", {}, rows));
}

async function place(event) {
  event.preventDefault();
  const chosen = ui.chosenPreview;
  if (!chosen) return;
  const request = {
    model_id: placeTarget(),
    sharding: chosen.sharding,
    nodes: chosen.nodes,
    dtype: $("place-dtype").value,
    draft: $("place-draft").value,
    wait: false,
  };
  $("place-button").disabled = true;
  $("place-status").textContent = `Placing ${request.model_id} (${chosen.sharding.toLowerCase()}, ${chosen.nodes} node${chosen.nodes === 1 ? "" : "s"})…`;
  try {
    const body = await apiJson("/place_instance", { method: "POST", body: JSON.stringify(request) });
    $("place-status").textContent = `Loading as ${body.instance_id.slice(0, 8)}: ${body.reason}`;
    watchLoad(body.instance_id);
  } catch (error) {
    if (!(error instanceof AuthError)) $("place-status").replaceChildren(h("span", { class: "error" }, error.message));
  } finally {
    $("place-button").disabled = !ui.chosenPreview;
  }
}

async function watchLoad(instanceId) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    let doc;
    try { doc = await apiJson(`/instance/${instanceId}`); } catch (_) { return; }
    const [, inst] = tag(doc);
    if (inst.status === "loading") continue;
    const line = inst.status === "failed"
      ? h("span", { class: "error" }, `Failed: ${inst.error}`)
      : `Ready: ${instanceId.slice(0, 8)} serves ${inst.shardAssignments.modelId}.`;
    $("place-status").replaceChildren(line);
    loadModels();
    refreshPreview();
    return;
  }
}

async function removeInstance(instanceId) {
  try {
    await apiJson(`/instance/${instanceId}`, { method: "DELETE" });
    $("place-status").textContent = `Deleted ${instanceId.slice(0, 8)}.`;
    poll();
    refreshPreview();
  } catch (error) {
    if (!(error instanceof AuthError)) $("place-status").replaceChildren(h("span", { class: "error" }, error.message));
  }
}

// --- chat ----------------------------------------------------------------------------------------

function renderChatChoices() {
  const ready = Object.entries(ui.state.instances)
    .map(([id, doc]) => [id, tag(doc)[1]])
    .filter(([, inst]) => inst.status === "ready" || inst.status === "running");
  const options = ready.length
    ? ready.map(([id, inst]) => h("option", { value: id }, `${inst.shardAssignments.modelId} · ${inst.sharding.toLowerCase()} · ${id.slice(0, 8)}`))
    : [h("option", { value: "" }, "no instance ready")];
  const select = $("chat-instance");
  const before = [...select.options].map((o) => o.value + o.textContent).join("|");
  const after = options.map((o) => o.value + o.textContent).join("|");
  if (before !== after) keepValue(select, options);
  $("chat-send").disabled = ui.chatBusy || !select.value;
}

function addMessage(role, text) {
  const el = h("div", { class: `msg ${role}`, "data-role": role }, text);
  $("chat-log").append(el);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return el;
}

// Server-sent events from a fetch body: "data: {...}\n\n" records, split wherever the chunks fall.
async function* sseRecords(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const record = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = record.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield data;
    }
  }
}

function numberOr(text, fallback) {
  const value = Number(text);
  return text.trim() !== "" && Number.isFinite(value) ? value : fallback;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  const instanceId = $("chat-instance").value;
  if (!text || !instanceId || ui.chatBusy) return;
  ui.chatBusy = true;
  $("chat-send").disabled = true;
  $("chat-input").value = "";
  ui.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "…");
  answer.setAttribute("data-state", "streaming");
  const started = performance.now();
  let first = null;
  let content = "";
  let usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      body: JSON.stringify({
        model: instanceId,
        messages: ui.chat,
        stream: true,
        stream_options: { include_usage: true },
        temperature: numberOr($("chat-temperature").value, 0.7),
        max_tokens: Math.round(numberOr($("chat-max-tokens").value, 256)),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body && body.error ? body.error.message : `${response.status} ${response.statusText}`);
    }
    for await (const data of sseRecords(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta.content : "";
      if (delta) {
        if (first === null) first = performance.now();
        content += delta;
        answer.textContent = content;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    }
    ui.chat.push({ role: "assistant", content });
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : null;
    const details = usage && usage.prompt_tokens_details;
    const cachedTokens = details ? details.cached_tokens : null;
    const ttft = first === null ? null : first - started;
    const decodeSeconds = first === null ? 0 : (ended - first) / 1000;
    const rate = tokens && tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null;
    $("chat-stats").textContent = [
      ttft === null ? null : `first token ${ttft.toFixed(0)} ms`,
      rate === null ? null : `${rate.toFixed(1)} tok/s`,
      tokens === null ? null : `${tokens} tokens`,
      cachedTokens === null ? null : `${cachedTokens} of ${usage.prompt_tokens} prompt tokens cached`,
    ].filter(Boolean).join(" · ");
    answer.setAttribute("data-state", "done");
  } catch (error) {
    ui.chat.pop();
    answer.classList.add("failed");
    answer.textContent = content ? `${content}\n[${error.message}]` : error.message;
    answer.setAttribute("data-state", "failed");
  } finally {
    ui.chatBusy = false;
    $("chat-send").disabled = !$("chat-instance").value;
  }
}

// --- start ---------------------------------------------------------------------------------------

function start() {
  poll();
  loadModels();
  if (!ui.started) setInterval(poll, POLL_MS);
  ui.started = true;
}

async function boot() {
  $("place-form").addEventListener("submit", place);
  for (const id of ["place-model", "place-sharding", "place-dtype", "place-nodes"]) {
    $(id).addEventListener("change", () => { if (id === "place-model") $("place-ref").value = ""; refreshPreview(); });
  }
  let typing = null;
  $("place-ref").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refreshPreview, 500); });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-clear").addEventListener("click", () => { ui.chat = []; $("chat-log").replaceChildren(); $("chat-stats").textContent = ""; });
  $("chat-instance").addEventListener("change", () => { $("chat-send").disabled = ui.chatBusy || !$("chat-instance").value; });
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY_STORE, $("key-input").value);
    $("key-input").value = "";
    start();
  });
  $("key-dialog").addEventListener("cancel", (event) => event.preventDefault()); // nothing works without it

  let health;
  try {
    health = await (await fetch("/healthz")).json();
  } catch (_) {
    setConn("bad", "serve unreachable");
    return;
  }
  ui.apiKeyRequired = health.api_key_required;
  if (ui.apiKeyRequired && !sessionStorage.getItem(KEY_STORE)) askKey("");
  else start();
}

boot();
