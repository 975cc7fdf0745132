// Request logs: filter by key, user, model, status, fault class and time; open one request's detail.
import { act, api, dialog, field, fmt, h, table } from "./lib.js";

const PAGE = 50;

function localInput(id) {
  return h("input", { type: "datetime-local", id });
}

function detail(log) {
  const usage = log.usage || {};
  const rows = [
    ["Event id", log.event_id],
    ["Time", fmt.time(log.occurred_at_ms)],
    ["Status", log.status_code],
    ["End", log.end_reason],
    ["Fault class", log.error_type || "–"],
    ["Error code", log.error_code || "–"],
    ["Endpoint", log.endpoint],
    ["Model", log.model],
    ["Upstream model", log.upstream_model || "–"],
    ["Channel", log.channel_id || "–"],
    ["Key", log.key_id || "–"],
    ["User", log.user_id || "–"],
    ["Stream", log.stream ? "yes" : "no"],
    ["Cached answer", log.cached ? "yes" : "no"],
    ["Prompt tokens", fmt.int(usage.prompt_tokens)],
    ["Completion tokens", fmt.int(usage.completion_tokens)],
    ["Cost", fmt.money(log.cost_micros)],
    ["Latency", fmt.ms(Number(log.latency_ms))],
    ["Upstream time", fmt.ms(Number(log.upstream_ms))],
    ["Time to first byte", fmt.ms(Number(log.ttfb_ms))],
    ["Attempts", log.attempts],
    ["Client address", log.client_ip || "–"],
    ["Front", log.front || "–"],
    ["Trace id", log.trace_id || "–"],
  ];
  dialog(`Request ${log.event_id}`, h("dl", { class: "facts", id: "log-detail" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v ?? "–"))])));
}

export async function logs({ main }) {
  const key = h("input", { type: "text", id: "logs-key" });
  const user = h("input", { type: "text", id: "logs-user" });
  const model = h("input", { type: "text", id: "logs-model" });
  const status = h("input", { type: "text", inputmode: "numeric", id: "logs-status" });
  const fault = h("select", { id: "logs-fault" }, ["", "caller", "policy", "provider", "gateway"].map((f) => h("option", { value: f }, f || "any")));
  const since = localInput("logs-since");
  const until = localInput("logs-until");
  const form = h(
    "form",
    { class: "filters", "aria-label": "Log filters" },
    field("Key id", key),
    field("User id", user),
    field("Model", model),
    field("Status", status),
    field("Fault class", fault),
    field("From", since),
    field("To", until),
    h("button", { type: "submit", class: "primary" }, "Filter"),
  );
  const box = h("div", { id: "logs-table" });
  const more = h("button", { type: "button", id: "logs-more", hidden: true }, "Older requests");
  main.append(form, box, more);
  let rows = [];
  let cursor = "";

  function render() {
    box.replaceChildren(
      table(
        [
          { label: "Time", cell: (l) => fmt.time(l.occurred_at_ms) },
          { label: "Status", num: true, cell: (l) => l.status_code },
          { label: "Fault", cell: (l) => l.error_type || "" },
          { label: "Model", cell: (l) => l.model },
          { label: "Key", cell: (l) => h("code", {}, l.key_id) },
          { label: "Tokens", num: true, cell: (l) => fmt.int(Number(l.usage?.prompt_tokens || 0) + Number(l.usage?.completion_tokens || 0)) },
          { label: "Cost", num: true, cell: (l) => fmt.money(l.cost_micros) },
          { label: "Latency", num: true, cell: (l) => fmt.ms(Number(l.latency_ms)) },
        ],
        rows,
        { caption: "Requests, newest first (select one for its detail)", onRow: detail, empty: "No request matches." },
      ),
    );
    more.hidden = !cursor;
  }

  async function fetchPage() {
    const query = {
      key_id: key.value.trim(),
      user_id: user.value.trim(),
      model: model.value.trim(),
      status_code: status.value.trim(),
      error_type: fault.value,
      since_ms: since.value ? new Date(since.value).getTime() : "",
      until_ms: until.value ? new Date(until.value).getTime() : "",
      limit: PAGE,
      cursor,
    };
    const answer = await api.get("logs", query);
    cursor = answer.next_cursor || "";
    return answer.logs || [];
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      cursor = "";
      rows = await fetchPage();
      render();
    });
  });
  more.addEventListener("click", () =>
    act(async () => {
      rows = rows.concat(await fetchPage());
      render();
    }),
  );
  rows = await fetchPage();
  render();
}
