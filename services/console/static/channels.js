// Channels: health, breakers (every relay's), pool use, TTFB and error rate from the performance view
// (server-side, all traffic, merged across relays), refreshed every 5 s; create, edit, enable/disable,
// test, reset the breaker (on every relay), delete. Credentials are write-only.
import { act, api, dialog, field, fmt, h, table, toast, ApiError } from "./lib.js";

const TYPES = ["openai", "azure-openai", "anthropic", "gemini"];
const WINDOWS = ["5m", "1m", "1h"];
const REFRESH_MS = 5000;

const commaList = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

// "public=upstream" per line, or a comma-separated list of them.
function parseModelMap(text) {
  const map = {};
  for (const part of text.split(/[\n,]/).map((s) => s.trim()).filter(Boolean)) {
    const [from, to] = part.split("=").map((s) => s.trim());
    if (!from || !to) throw new Error(`Model map entry "${part}" is not public=upstream.`);
    map[from] = to;
  }
  return map;
}

const showModelMap = (map) => Object.entries(map || {}).map(([from, to]) => `${from}=${to}`).join("\n");

// The figures of one channel: its entry in the view's "now" (pools, breakers per relay) and in the window.
function figuresOf(perf, windowName, channel) {
  if (!perf) return { now: null, window: null };
  const now = (perf.now.channels || []).find((c) => c.channel_id === channel.channel_id) || null;
  const window = (perf.windows[windowName]?.channels || {})[channel.channel_id] || null;
  return { now, window };
}

function breakerText(now) {
  if (!now) return "–";
  const states = Object.entries(now.breakers).filter(([, n]) => n > 0);
  const relays = now.by_relay.length;
  if (states.length === 1) return relays === 1 ? states[0][0].replace("_", "-") : `${states[0][0].replace("_", "-")} on all ${relays} relays`;
  // They differ: say which relay has which.
  return now.by_relay.map((r) => `${r.breaker.replace("_", "-")} on ${r.instance}`).join("; ");
}

function health(channel, { now, window }) {
  if (!channel.enabled) return ["disabled", "disabled"];
  if (!now) return ["idle", "idle"];
  const relays = now.by_relay.length;
  if (now.breakers.open === relays) return ["failing (breaker open)", "open"];
  if (now.breakers.open > 0) return [`degraded (open on ${now.breakers.open} of ${relays} relays)`, "open"];
  if (now.breakers.half_open > 0) return ["recovering", "half_open"];
  if (window && window.requests && window.errors.rate >= 0.5) return ["failing", "open"];
  return window && window.requests ? ["healthy", "closed"] : ["idle", "idle"];
}

function channelForm(channel, { creating }) {
  const name = h("input", { type: "text", value: channel.name || "", required: true, id: "channel-name" });
  const type = h("select", { id: "channel-type" }, TYPES.map((t) => h("option", { value: t, selected: (channel.type || "openai") === t }, t)));
  const baseUrl = h("input", { type: "url", value: channel.base_url || "", required: true, id: "channel-base-url" });
  const models = h("input", { type: "text", value: (channel.models || []).join(", "), id: "channel-models" });
  const modelMap = h("textarea", { rows: 3, id: "channel-model-map" }, showModelMap(channel.model_map));
  const priority = h("input", { type: "number", value: channel.priority ?? 0, id: "channel-priority" });
  const weight = h("input", { type: "number", value: channel.weight ?? 1, min: 0, id: "channel-weight" });
  const apiVersion = h("input", { type: "text", value: channel.api_version || "", id: "channel-api-version" });
  // Write-only: the stored key is never sent to the page; empty keeps it (the API takes back its mask).
  const apiKey = h("input", { type: "password", autocomplete: "new-password", placeholder: creating ? "" : "unchanged", id: "channel-api-key" });
  const form = h(
    "form",
    { class: "stack" },
    field("Name", name),
    field("Type", type, "The provider's wire format; the relay converts for the last three."),
    field("Base URL", baseUrl, "OpenAI-compatible ones include /v1."),
    field("Models", models, "Comma-separated public model names."),
    field("Model map", modelMap, "public=upstream, one a line: the name sent to the provider."),
    field("Priority", priority, "Higher first; failover goes down."),
    field("Weight", weight, "Share of traffic among channels of one priority."),
    field("API version", apiVersion, "Azure OpenAI only."),
    field("API key", apiKey, creating ? "Write-only: never shown again." : `Stored: ${channel.api_key || "none"}. Leave empty to keep it.`),
    h("button", { type: "submit", class: "primary" }, creating ? "Create channel" : "Save"),
  );
  const read = () => ({
    ...channel,
    name: name.value,
    type: type.value,
    base_url: baseUrl.value,
    models: commaList(models.value),
    model_map: parseModelMap(modelMap.value),
    priority: Number(priority.value || 0),
    weight: Number(weight.value || 0),
    api_version: apiVersion.value,
    api_key: apiKey.value || channel.api_key || "",
    enabled: creating ? true : channel.enabled,
  });
  return { form, read };
}

function editChannel(channel, done, { creating = false } = {}) {
  const { form, read } = channelForm(channel, { creating });
  const box = dialog(creating ? "New channel" : `Edit channel ${channel.name}`, form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      await api.post("channels", read());
      // The table is reloaded before the dialog closes, so no row action can act on the old values.
      await done();
      box.close();
    }, creating ? "Channel created." : "Channel saved.");
  });
}

// The whole channel is written back, so it is read again first: a row rendered before another edit
// (here or in another tab) must not put old values back.
async function current(channel) {
  const listing = await api.get("channels");
  return (listing.channels || []).find((c) => c.channel_id === channel.channel_id) ?? channel;
}

function showTest(result, channel, out) {
  const verdict = result.ok ? "OK" : "Failed";
  const status = result.status ? `status ${result.status}` : "no answer";
  const shown = [h("strong", { class: result.ok ? "" : "error" }, `${verdict}: ${channel.name}`), ` · ${result.model} · ${status} · ${fmt.ms(result.latency_ms)}`];
  if (result.error) shown.push(h("pre", { class: "error" }, result.error));
  out.replaceChildren(...shown);
}

export async function channels({ main, canWrite }) {
  const box = h("div", { id: "channels-table" });
  const windowSelect = h("select", { id: "channels-window" }, WINDOWS.map((w) => h("option", { value: w }, `last ${w}`)));
  const source = h("p", { class: "hint", id: "channels-source" });
  const testResult = h("div", { id: "channel-test-result", role: "status", "aria-live": "polite" });
  const create = h("button", { type: "button", class: "primary write", onclick: () => editChannel({ enabled: true, weight: 1 }, load, { creating: true }) }, "New channel");
  main.append(h("div", { class: "filters" }, field("Window", windowSelect), canWrite ? create : null), source, testResult, box);
  let perf = null;

  async function load() {
    const [listing, view] = await Promise.all([
      api.get("channels"),
      api.get("performance").catch((err) => {
        // 503: a relay that keeps no performance windows; the table still lists the channels.
        if (err instanceof ApiError && err.status === 503) return null;
        throw err;
      }),
    ]);
    perf = view;
    const windowName = windowSelect.value;
    source.textContent = perf
      ? `Breakers and pools: every relay right now (${perf.now.relays} relay${perf.now.relays === 1 ? "" : "s"}); requests, TTFB and error rate: all traffic of the last ${windowName}, from the performance view.`
      : "This relay keeps no performance windows: no health figures.";
    const rows = listing.channels || [];
    const fig = Object.fromEntries(rows.map((c) => [c.channel_id, figuresOf(perf, windowName, c)]));
    box.replaceChildren(
      table(
        [
          { label: "Name", cell: (c) => c.name },
          { label: "Type", cell: (c) => c.type || "openai" },
          {
            label: "Health",
            cell: (c) => {
              const [text, cls] = health(c, fig[c.channel_id]);
              return h("span", { class: `health ${cls}` }, text);
            },
          },
          { label: "Breaker", cell: (c) => breakerText(fig[c.channel_id].now) },
          { label: "Pool in use", num: true, cell: (c) => (fig[c.channel_id].now ? `${fmt.int(fig[c.channel_id].now.in_flight)} / ${fmt.int(fig[c.channel_id].now.connections)}` : "–") },
          { label: "Waiting", num: true, cell: (c) => (fig[c.channel_id].now ? fmt.int(fig[c.channel_id].now.waiting) : "–") },
          { label: "Requests", num: true, cell: (c) => fmt.int(fig[c.channel_id].window?.requests) },
          { label: "TTFB p50", num: true, cell: (c) => (fig[c.channel_id].window?.ttfb_ms.count ? fmt.ms(fig[c.channel_id].window.ttfb_ms.p50) : "–") },
          { label: "TTFB p99", num: true, cell: (c) => (fig[c.channel_id].window?.ttfb_ms.count ? fmt.ms(fig[c.channel_id].window.ttfb_ms.p99) : "–") },
          { label: "Error rate", num: true, cell: (c) => (fig[c.channel_id].window?.requests ? fmt.pct(fig[c.channel_id].window.errors.rate) : "–") },
          { label: "Models", cell: (c) => (c.models || []).join(", ") },
          {
            label: "Actions",
            cell: (c) => {
              if (!canWrite) return "";
              const now = fig[c.channel_id].now;
              const tripped = now && now.breakers.closed < now.by_relay.length;
              return h(
                "span",
                { class: "actions write" },
                h("button", { type: "button", dataset: { action: "toggle" }, onclick: () => act(async () => { await api.post("channels", { ...(await current(c)), enabled: !c.enabled }); await load(); }, c.enabled ? "Channel disabled." : "Channel enabled.") }, c.enabled ? "Disable" : "Enable"),
                h("button", { type: "button", onclick: () => act(async () => { testResult.replaceChildren(`Testing ${c.name}…`); showTest(await api.post(`channels/${c.channel_id}/test`), c, testResult); }) }, "Test"),
                h("button", {
                  type: "button",
                  disabled: !tripped,
                  onclick: () => act(async () => {
                    const answer = await api.post(`channels/${c.channel_id}/breaker/reset`);
                    await load();
                    toast(`Breaker closed on ${answer.relays} relay${answer.relays === 1 ? "" : "s"}.`);
                  }),
                }, "Reset breaker"),
                h("button", { type: "button", onclick: () => editChannel(c, load) }, "Edit"),
                h("button", {
                  type: "button",
                  class: "danger",
                  onclick: () => {
                    if (!window.confirm(`Delete channel ${c.name}? Requests for its models go to the other channels serving them, if any.`)) return;
                    act(async () => { await api.del(`channels/${c.channel_id}`); await load(); }, "Channel deleted.");
                  },
                }, "Delete"),
              );
            },
          },
        ],
        rows,
        { caption: "Upstream channels" },
      ),
    );
  }
  windowSelect.addEventListener("change", () => act(load));
  await load();
  // Live: breakers trip and close by themselves. A failed refresh is left to the next one.
  const timer = setInterval(() => load().catch(() => {}), REFRESH_MS);
  return () => clearInterval(timer);
}
