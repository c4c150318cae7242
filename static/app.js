// The live dashboard: initial state over REST, then every event from the firehose
// (/v1/events/stream), resuming with ?since= after a reconnect. With auth on it asks for a read
// token, sent as a bearer header over REST and as the subprotocol `bearer.<token>` on the stream.
"use strict";

const state = {
  token: sessionStorage.getItem("ltmc-token") || "",
  lastSeq: null,
  agents: new Map(),      // agent_id → row element
  workflows: new Map(),   // workflow_id → element
  handoffs: new Map(),    // handoff_id → element
  sessions: new Map(),    // session_id → element
  pending: new Set(),     // workflow ids to refresh
  retry: 500,
  page: 500,              // list page size (lowered if the server allows less)
  timers: false,
};

/// Workflows kept on the page, and refreshed per beat, at most.
const MAX_WORKFLOWS = 50;
const REFRESH_PER_BEAT = 20;

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
};

class AuthError extends Error {}
class HttpError extends Error {
  constructor(path, status) { super(`${path}: ${status}`); this.status = status; }
}

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(path, { headers });
  if (response.status === 401 || response.status === 403) throw new AuthError(path);
  if (!response.ok) throw new HttpError(path, response.status);
  return response.json();
}

/// A list page; a server configured with a smaller page limit gets the default size instead.
async function page(path, limit) {
  const sep = path.includes("?") ? "&" : "?";
  try {
    return await api(`${path}${sep}limit=${Math.min(limit, state.page)}`);
  } catch (e) {
    if (!(e instanceof HttpError) || e.status !== 422) throw e;
    state.page = 50;
    return api(path);
  }
}

/// Every page of a list endpoint, up to `max` items.
async function all(path, max = 5000) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const next = await page(cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path, 500);
    items.push(...next.items);
    cursor = next.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

// ---- agents -------------------------------------------------------------------------------

function renderAgent(agent) {
  let row = state.agents.get(agent.agent_id);
  if (!row) {
    row = el("tr", { "data-agent": agent.agent_id },
      el("td", {}, agent.agent_id), el("td"), el("td"), el("td"));
    state.agents.set(agent.agent_id, row);
    $("agents").append(row);
  }
  const [, status, load, caps] = row.children;
  status.textContent = agent.status;
  status.className = agent.status;
  const share = agent.max_concurrent_tasks ? agent.current_tasks / agent.max_concurrent_tasks : 0;
  load.replaceChildren(el("span", { class: "bar", title: `${agent.current_tasks}/${agent.max_concurrent_tasks}` },
    el("span", { style: `width:${Math.min(100, share * 100)}%` })),
    ` ${agent.current_tasks}/${agent.max_concurrent_tasks}`);
  caps.textContent = agent.capabilities.join(", ");
  $("agent-count").textContent = `${state.agents.size}`;
}

async function loadAgents() {
  for (const agent of await all("/v1/agents")) renderAgent(agent);
}

// ---- workflows ----------------------------------------------------------------------------

function renderWorkflow(run) {
  let node = state.workflows.get(run.workflow_id);
  if (!node) {
    node = el("div", { class: "workflow", "data-workflow": run.workflow_id });
    state.workflows.set(run.workflow_id, node);
    $("workflows").prepend(node);
  }
  const done = run.steps.filter((s) => ["succeeded", "failed", "timed_out", "skipped", "cancelled"].includes(s.status)).length;
  // Keep the newest runs: drop the oldest beyond the limit.
  while (state.workflows.size > MAX_WORKFLOWS) {
    const oldest = $("workflows").lastElementChild;
    state.workflows.delete(oldest.dataset.workflow);
    oldest.remove();
  }
  node.replaceChildren(
    el("div", {},
      el("strong", {}, run.name), ` ${run.pattern} `,
      el("span", { class: `badge ${run.status}`, "data-status": run.status }, run.status),
      ` ${done}/${run.steps.length} steps`,
      run.current_step ? el("small", {}, ` · now: ${run.current_step}`) : ""),
    el("div", { class: "steps" }, ...run.steps.map((s) =>
      el("span", { class: `step ${s.status}`, title: `${s.step_id}: ${s.status}${s.agent_id ? ` (${s.agent_id})` : ""}` }))));
  $("workflow-count").textContent = `${state.workflows.size}`;
}

async function refreshWorkflows() {
  const ids = [...state.pending].slice(0, REFRESH_PER_BEAT);
  for (const id of ids) state.pending.delete(id);
  for (const id of ids) {
    try { renderWorkflow(await api(`/v1/workflows/${encodeURIComponent(id)}`)); } catch (e) { console.warn(e); }
  }
}

async function loadWorkflows() {
  const runs = await page("/v1/workflows", MAX_WORKFLOWS);
  for (const run of runs.items.reverse()) renderWorkflow(run);
}

// ---- handoffs, sessions, queues, SLA ------------------------------------------------------

function renderHandoff(h) {
  let item = state.handoffs.get(h.handoff_id);
  if (!item) {
    item = el("li", { "data-handoff": h.handoff_id });
    state.handoffs.set(h.handoff_id, item);
    $("handoffs").prepend(item);
    while ($("handoffs").children.length > 50) {
      const last = $("handoffs").lastElementChild;
      state.handoffs.delete(last.dataset.handoff);
      last.remove();
    }
  }
  item.replaceChildren(`${h.from_agent} → ${h.to_agent} `, el("span", { class: h.status }, h.status));
}

function renderSession(s) {
  let item = state.sessions.get(s.session_id);
  if (s.status !== "active") {
    if (item) { item.remove(); state.sessions.delete(s.session_id); }
    return;
  }
  if (!item) {
    item = el("li", { "data-session": s.session_id },
      `${s.session_type} `, el("small", {}, s.session_id), " · ", el("span", { class: "count" }), " activities");
    state.sessions.set(s.session_id, item);
    $("sessions").prepend(item);
  }
  item.querySelector(".count").textContent = String(s.activity_count ?? 0);
}

async function loadLists() {
  for (const h of (await page("/v1/handoffs", 50)).items.reverse()) renderHandoff(h);
  for (const s of (await page("/v1/sessions?status=active", 200)).items.reverse()) renderSession(s);
}

async function refreshStats() {
  await Promise.all([refreshQueues(), refreshSla()]);
}

async function refreshQueues() {
  const report = await api("/v1/metrics");
  const q = report.queues;
  $("queues").replaceChildren(...["queued", "claimed", "dead"].flatMap((k) =>
    [el("dt", {}, k), el("dd", { "data-queue": k }, String(q[k] ?? 0))]),
    el("dt", {}, "agents present"), el("dd", {}, String(report.agent_coordination.active_agents ?? "?")),
    el("dt", {}, "workflows executing"), el("dd", {}, String(report.workflow_performance.active_workflows)));
}

async function refreshSla() {
  const sla = await api("/v1/sla");
  // Each badge names what it covers (the broker's part says which broker runs); a component
  // without enough samples yet is neither green nor red.
  const look = { compliant: ["passed", "✓"], violated: ["failed", "✗"], insufficient_data: ["", "…"] };
  $("sla").replaceChildren(...Object.values(sla.components).map((c) => {
    const [cls, mark] = look[c.status];
    const title = c.status === "insufficient_data"
      ? `insufficient data (fewer than ${sla.min_samples} samples)`
      : c.violations.join(", ") || "compliant";
    return el("span", { class: `badge ${cls}`, title }, `${c.label} ${mark}`);
  }));
}

// ---- the event stream ---------------------------------------------------------------------

function logEvent(frame) {
  const list = $("events");
  list.prepend(el("li", {}, `${frame.seq} ${frame.type}`));
  while (list.children.length > 100) list.lastElementChild.remove();
}

function apply(frame) {
  const d = frame.data || {};
  if (frame.type.startsWith("workflow.")) {
    if (d.workflow_id) state.pending.add(d.workflow_id);
  } else if (frame.type.startsWith("handoff.")) {
    renderHandoff(d);
  } else if (frame.type.startsWith("session.")) {
    if (frame.type === "session.created") renderSession({ ...d, status: "active", activity_count: 0 });
    else if (frame.type === "session.activity") {
      const count = state.sessions.get(d.session_id)?.querySelector(".count");
      if (count) count.textContent = String(d.activity_count);
    } else renderSession({ ...d, status: "ended" });
  } else if (frame.type.startsWith("agent.")) {
    if (frame.type === "agent.deleted") {
      state.agents.get(d.agent_id)?.remove();
      state.agents.delete(d.agent_id);
    } else if (d.agent_id) {
      api(`/v1/agents/${encodeURIComponent(d.agent_id)}`).then(renderAgent, () => {});
    }
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const since = state.lastSeq === null ? "" : `?since=${state.lastSeq}`;
  const protocols = state.token ? [`bearer.${state.token}`] : [];
  let ws;
  try {
    ws = new WebSocket(`${scheme}://${location.host}/v1/events/stream${since}`, protocols);
  } catch (e) {
    return askToken("that token cannot be sent on a WebSocket");
  }
  ws.onopen = () => {
    $("connection").textContent = "live";
    $("connection").className = "badge on";
    state.retry = 500;
  };
  ws.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.type === "resumed") {
      // Events were missed for good (pruned, or a new database): reload the state.
      if (!frame.recovered) load().catch(console.warn);
      return;
    }
    if (typeof frame.seq === "number") state.lastSeq = frame.seq;
    logEvent(frame);
    apply(frame);
  };
  ws.onclose = (close) => {
    $("connection").textContent = `reconnecting (${close.code})`;
    $("connection").className = "badge off";
    if (close.code === 4401 || close.code === 4403) return askToken("the stream refused the token");
    setTimeout(connect, state.retry);
    state.retry = Math.min(state.retry * 2, 10000);
  };
}

// ---- start --------------------------------------------------------------------------------

function askToken(why) {
  $("login").hidden = false;
  $("board").hidden = true;
  $("login-error").textContent = why || "";
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("ltmc-token", state.token);
  $("login").hidden = true;
  $("board").hidden = false;
  start();
});

function load() {
  return Promise.all([loadAgents(), loadWorkflows(), loadLists(), refreshStats()]);
}

async function start() {
  // The token is checked first, so a refused one asks again rather than opening a stream.
  try {
    await api("/v1/sla");
  } catch (e) {
    if (e instanceof AuthError) return askToken(state.token ? "that token was refused" : "");
  }
  // The stream first, then the snapshot: what changes in between arrives as events.
  connect();
  await load().catch(console.warn);
  if (state.timers) return;
  state.timers = true;
  setInterval(() => refreshWorkflows().catch(console.warn), 300);
  setInterval(() => refreshStats().catch(console.warn), 2000);
  // Heartbeats touch only the broker (no event): load and status are polled.
  setInterval(() => loadAgents().catch(console.warn), 5000);
}

start();
