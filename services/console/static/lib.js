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
