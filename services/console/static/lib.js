// Shared helpers: DOM building (no innerHTML: every value is text), formatting, the admin API client.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
const money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 6 });
const percent = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });

export const fmt = {
  int: (n) => integer.format(Number(n || 0)),
  num: (n) => decimal.format(Number(n || 0)),
  // Money is an integer count of micro-units everywhere in the API; shown in units.
  money: (micros) => money.format(Number(micros || 0) / 1e6),
  ms: (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : `${decimal.format(n)} ms`),
  pct: (ratio) => percent.format(ratio || 0),
  // Times in the viewer's own zone, which is named.
  time: (ms) => (Number(ms) ? new Date(Number(ms)).toLocaleString(undefined, { timeZoneName: "short" }) : "–"),
  date: (seconds) => fmt.time(Number(seconds) * 1000),
};

// <input type="datetime-local"> values in the viewer's zone <-> unix seconds (0: none).
export function secondsToLocalInput(seconds) {
  const n = Number(seconds || 0);
  if (!n) return "";
  const d = new Date(n * 1000);
  const pad = (v) => String(v).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function localInputToSeconds(value) {
  return value ? Math.floor(new Date(value).getTime() / 1000) : 0;
}

export function unitsToMicros(text) {
  const value = Number(String(text).trim());
  if (!Number.isFinite(value)) throw new Error(`${text} is not a number`);
  return Math.round(value * 1e6);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function csrfToken() {
  const found = document.cookie.split("; ").find((c) => c.startsWith("rg_console_csrf="));
  return found ? found.slice("rg_console_csrf=".length) : "";
}

async function request(method, url, body) {
  const headers = { accept: "application/json" };
  if (method !== "GET") headers["x-console-csrf"] = csrfToken();
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const message = (data.error && data.error.message) || data.detail || response.statusText;
    if (response.status === 401) window.dispatchEvent(new CustomEvent("console:signed-out", { detail: message }));
    throw new ApiError(response.status, message);
  }
  return data;
}

// Every call goes to /admin/v1/<route> with the session's admin token (see services/console).
export const api = {
  get: (route, query = {}) => {
    const params = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v !== undefined));
    const qs = params.toString();
    return request("GET", `api/${route}${qs ? `?${qs}` : ""}`);
  },
  post: (route, body) => request("POST", `api/${route}`, body ?? {}),
  put: (route, body) => request("PUT", `api/${route}`, body ?? {}),
  patch: (route, body) => request("PATCH", `api/${route}`, body ?? {}),
  del: (route) => request("DELETE", `api/${route}`),
};

export const session = {
  current: () => request("GET", "session"),
  signIn: (key, readOnly) => request("POST", "session", { key, read_only: readOnly }),
  signOut: () => request("DELETE", "session"),
};

// A list the admin API serves in pages ordered by id (users, keys): each page starts after the last id of
// the one before. load() starts over (with the current query), more() appends the next page; partial
// says whether the API may hold more than is loaded.
export function idPager(route, listName, idName, { pageSize = 200 } = {}) {
  const state = { rows: [], partial: false, query: {} };
  async function page(after, query) {
    const answer = await api.get(route, { ...query, limit: pageSize, after });
    return answer[listName] || [];
  }
  // A page that arrives after a newer search started is dropped (typing fires searches quickly).
  let generation = 0;
  state.load = async (query = {}) => {
    const mine = ++generation;
    const rows = await page("", query);
    if (mine === generation) {
      state.query = query;
      state.rows = rows;
      state.partial = rows.length === pageSize;
    }
    return state.rows;
  };
  state.more = async () => {
    const mine = generation;
    const last = state.rows.length ? state.rows[state.rows.length - 1][idName] : "";
    const rows = await page(last, state.query);
    if (mine === generation) {
      state.rows = state.rows.concat(rows);
      state.partial = rows.length === pageSize;
    }
    return state.rows;
  };
  return state;
}

// Names of users and keys for pages that get only ids (usage, logs): read once per page view, in pages,
// up to `limit` of each; an id not found is shown as itself.
export async function directory({ limit = 20_000 } = {}) {
  async function all(route, listName, idName) {
    const pager = idPager(route, listName, idName, { pageSize: 1000 });
    await pager.load();
    while (pager.partial && pager.rows.length < limit) await pager.more();
    return pager.rows;
  }
  const [users, keys] = await Promise.all([all("users", "users", "user_id"), all("keys", "keys", "key_id")]);
  const userNames = new Map(users.map((u) => [u.user_id, u.name]));
  const keyNames = new Map(keys.map((k) => [k.key_id, k.name]));
  return {
    name: (dimension, id) => (dimension === "key" ? keyNames.get(id) : dimension === "user" ? userNames.get(id) : undefined) ?? id,
  };
}

export function toast(message, isError = false) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.toggle("error", isError);
  el.classList.add("shown");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("shown"), 4000);
}

// Runs an action from a button or form: the error is shown, never swallowed.
export async function act(fn, done) {
  try {
    const result = await fn();
    if (done) toast(done);
    return result;
  } catch (err) {
    toast(err.message || String(err), true);
    return undefined;
  }
}

export function table(columns, rows, { caption, onRow, empty = "Nothing to show." } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : "" }, c.label))));
  const body = h(
    "tbody",
    {},
    rows.length
      ? rows.map((row) => {
          const tr = h("tr", {}, columns.map((c) => h("td", { class: c.num ? "num" : "" }, c.cell(row))));
          if (onRow) {
            tr.tabIndex = 0;
            tr.classList.add("clickable");
            tr.addEventListener("click", () => onRow(row));
            tr.addEventListener("keydown", (e) => {
              if (e.key === "Enter" || e.key === " ") {
                e.preventDefault();
                onRow(row);
              }
            });
          }
          return tr;
        })
      : h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty)),
  );
  return h("table", {}, caption ? h("caption", {}, caption) : null, head, body);
}

export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("small", {}, hint) : null);
}

export function dialog(title, content, { onClose } = {}) {
  const box = h(
    "dialog",
    { "aria-label": title },
    h("h2", {}, title),
    content,
    h("div", { class: "actions" }, h("button", { type: "button", onclick: () => box.close() }, "Close")),
  );
  box.addEventListener("close", () => {
    box.remove();
    if (onClose) onClose();
  });
  document.body.append(box);
  box.showModal();
  return box;
}

export function csv(rows, columns) {
  const quote = (v) => {
    const s = String(v ?? "");
    return /[",\n]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
  };
  return [columns.map((c) => quote(c.label)).join(","), ...rows.map((r) => columns.map((c) => quote(c.raw(r))).join(","))].join("\n");
}

export function download(name, text, type = "text/csv") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function percentile(values, p) {
  if (!values.length) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}
