// Channels: health (breaker, pool use on the answering relay; TTFB and error rate from the recent
// request logs), enable/disable, reset the breaker, edit (credentials write-only).
import { act, api, dialog, field, fmt, h, percentile, table } from "./lib.js";

const WINDOW_MS = 15 * 60 * 1000;

function health(channel, status) {
  if (!channel.enabled) return "disabled";
  if (!status) return "idle";
  if (status.breaker === "open") return "failing (breaker open)";
  if (status.breaker === "half_open") return "recovering";
  return "healthy";
}

function editChannel(channel, done) {
  const name = h("input", { type: "text", value: channel.name, required: true });
  const baseUrl = h("input", { type: "url", value: channel.base_url, required: true });
  const models = h("input", { type: "text", value: (channel.models || []).join(", ") });
  const priority = h("input", { type: "number", value: channel.priority });
  const weight = h("input", { type: "number", value: channel.weight, min: 0 });
  // Write-only: the stored key is never sent to the page; empty keeps it (the API takes back its mask).
  const apiKey = h("input", { type: "password", autocomplete: "new-password", placeholder: "unchanged", id: "channel-api-key" });
  const form = h(
    "form",
    { class: "stack" },
    field("Name", name),
    field("Base URL", baseUrl),
    field("Models", models, "Comma-separated."),
    field("Priority", priority),
    field("Weight", weight),
    field("API key", apiKey, `Stored: ${channel.api_key || "none"}. Leave empty to keep it.`),
    h("button", { type: "submit", class: "primary" }, "Save"),
  );
  const box = dialog(`Edit channel ${channel.name}`, form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      await api.post("channels", {
        ...channel,
        name: name.value,
        base_url: baseUrl.value,
        models: models.value.split(",").map((s) => s.trim()).filter(Boolean),
        priority: Number(priority.value || 0),
        weight: Number(weight.value || 0),
        api_key: apiKey.value || channel.api_key,
      });
      // The table is reloaded before the dialog closes, so no row action can act on the old values.
      await done();
      box.close();
    }, "Channel saved.");
  });
}

// The whole channel is written back, so it is read again first: a row rendered before another edit
// (here or in another tab) must not put old values back.
async function current(channel) {
  const listing = await api.get("channels");
  return (listing.channels || []).find((c) => c.channel_id === channel.channel_id) ?? channel;
}

export async function channels({ main, canWrite }) {
  const box = h("div", { id: "channels-table" });
  main.append(h("p", { class: "hint" }, "Breaker and pool figures are the answering relay process's own; TTFB and error rate come from the last 15 minutes of request logs."), box);

  async function load() {
    const [listing, status, recent] = await Promise.all([
      api.get("channels"),
      api.get("channels/status"),
      api.get("logs", { since_ms: Date.now() - WINDOW_MS, limit: 1000 }),
    ]);
    const byId = Object.fromEntries((status.channels || []).map((s) => [s.channel_id, s]));
    const perChannel = {};
    for (const l of recent.logs || []) {
      if (!l.channel_id) continue;
      const c = (perChannel[l.channel_id] ||= { requests: 0, errors: 0, ttfb: [] });
      c.requests += 1;
      if (l.error_type === "provider" || l.error_type === "gateway") c.errors += 1;
      if (Number(l.ttfb_ms)) c.ttfb.push(Number(l.ttfb_ms));
    }
    const rows = listing.channels || [];
    box.replaceChildren(
      table(
        [
          { label: "Name", cell: (c) => c.name },
          { label: "Health", cell: (c) => h("span", { class: `health ${c.enabled ? (byId[c.channel_id]?.breaker ?? "idle") : "disabled"}` }, health(c, byId[c.channel_id])) },
          { label: "Breaker", cell: (c) => byId[c.channel_id]?.breaker ?? "–" },
          { label: "Pool in use", num: true, cell: (c) => (byId[c.channel_id] ? `${fmt.int(byId[c.channel_id].in_flight)} / ${fmt.int(c.max_connections || byId[c.channel_id].connections)}` : "–") },
          { label: "Waiting", num: true, cell: (c) => fmt.int(byId[c.channel_id]?.waiting) },
          { label: "TTFB p50", num: true, cell: (c) => fmt.ms(percentile(perChannel[c.channel_id]?.ttfb || [], 50)) },
          { label: "Error rate", num: true, cell: (c) => (perChannel[c.channel_id] ? fmt.pct(perChannel[c.channel_id].errors / perChannel[c.channel_id].requests) : "–") },
          { label: "Models", cell: (c) => (c.models || []).join(", ") },
          {
            label: "Actions",
            cell: (c) =>
              canWrite
                ? h(
                    "span",
                    { class: "actions write" },
                    h("button", { type: "button", dataset: { action: "toggle" }, onclick: () => act(async () => { await api.post("channels", { ...(await current(c)), enabled: !c.enabled }); await load(); }, c.enabled ? "Channel disabled." : "Channel enabled.") }, c.enabled ? "Disable" : "Enable"),
                    h("button", { type: "button", disabled: !byId[c.channel_id] || byId[c.channel_id].breaker === "closed", onclick: () => act(async () => { await api.post(`channels/${c.channel_id}/breaker/reset`); await load(); }, "Breaker closed.") }, "Reset breaker"),
                    h("button", { type: "button", onclick: () => editChannel(c, load) }, "Edit"),
                  )
                : "",
          },
        ],
        rows,
        { caption: "Upstream channels" },
      ),
    );
  }
  await load();
}
