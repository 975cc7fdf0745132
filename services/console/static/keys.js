// Keys and users: list and search, create (the plaintext shown once), edit scopes and limits, rotate,
// revoke; balances, top-ups with a reason, budgets and how much of each is used.
import { act, api, dialog, field, fmt, h, table, toast, unitsToMicros } from "./lib.js";

function input(attrs = {}) {
  return h("input", { type: "text", ...attrs });
}

function list(text) {
  return String(text || "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

// Shows a key's plaintext once, with a copy button; it is not kept anywhere after the dialog closes.
function showSecret(title, plaintext) {
  const code = h("code", { id: "new-key-plaintext", class: "secret" }, plaintext);
  const copy = h("button", {
    type: "button",
    class: "primary",
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(plaintext);
        toast("Copied.");
      } catch {
        const range = document.createRange();
        range.selectNodeContents(code);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        toast("Selected: press Ctrl+C to copy.");
      }
    },
  }, "Copy");
  dialog(title, h("div", {}, h("p", {}, "This is the only time the key is shown. Store it now."), h("p", {}, code, " ", copy)), {
    onClose: () => code.remove(),
  });
}

function limitsForm(current = {}, budgets = {}) {
  const rpm = input({ inputmode: "numeric", value: current.rpm && current.rpm !== "0" ? current.rpm : "" });
  const tpm = input({ inputmode: "numeric", value: current.tpm && current.tpm !== "0" ? current.tpm : "" });
  const conc = input({ inputmode: "numeric", value: current.max_concurrency && current.max_concurrency !== "0" ? current.max_concurrency : "" });
  const daily = input({ inputmode: "decimal", value: budgets.day ? budgets.day / 1e6 : "" });
  const monthly = input({ inputmode: "decimal", value: budgets.month ? budgets.month / 1e6 : "" });
  const fields = [
    field("Requests per minute", rpm, "Empty: no limit."),
    field("Tokens per minute", tpm),
    field("Concurrent requests", conc),
    field("Daily budget (units)", daily, "Empty: none."),
    field("Monthly budget (units)", monthly),
  ];
  const read = () => ({
    rpm: rpm.value || "0",
    tpm: tpm.value || "0",
    max_concurrency: conc.value || "0",
    daily_budget_micros: daily.value ? unitsToMicros(daily.value) : 0,
    monthly_budget_micros: monthly.value ? unitsToMicros(monthly.value) : 0,
  });
  return { fields, read };
}

async function budgetsOf(scope, id) {
  const listing = await api.get(`budgets/${scope}/${id}`);
  return listing.budgets || [];
}

function budgetTable(budgets) {
  const shown = budgets.filter((b) => Number(b.limit_micros));
  return table(
    [
      { label: "Period", cell: (b) => b.period },
      { label: "Limit", num: true, cell: (b) => fmt.money(b.limit_micros) },
      { label: "Spent", num: true, cell: (b) => fmt.money(b.spent_micros) },
      { label: "Held", num: true, cell: (b) => fmt.money(b.reserved_micros) },
      { label: "Used", num: true, cell: (b) => fmt.pct((Number(b.spent_micros) + Number(b.reserved_micros)) / Number(b.limit_micros)) },
      { label: "Resets", cell: (b) => fmt.date(b.resets_at) },
    ],
    shown,
    { empty: "No budget set." },
  );
}

async function userPanel(user, ctx, refresh) {
  const [balance, budgets] = await Promise.all([api.get(`users/${user.user_id}/balance`), budgetsOf("user", user.user_id)]);
  const panel = h(
    "section",
    { class: "card", id: "user-panel", "aria-label": `User ${user.name}` },
    h("h2", {}, `User ${user.name}`),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "User id"), h("dd", {}, user.user_id),
      h("dt", {}, "Balance"), h("dd", { id: "user-balance" }, fmt.money(balance.balance_micros)),
      h("dt", {}, "Held"), h("dd", {}, fmt.money(balance.reserved_micros)),
      h("dt", {}, "Available"), h("dd", { id: "user-available" }, fmt.money(balance.available_micros)),
    ),
    h("h3", {}, "Budgets"),
    budgetTable(budgets),
  );
  if (ctx.canWrite) {
    const amount = input({ inputmode: "decimal", required: true, id: "topup-amount" });
    const reason = input({ required: true, id: "topup-reason" });
    const form = h(
      "form",
      { class: "inline write", "aria-label": "Top up" },
      h("h3", {}, "Top up"),
      field("Amount (units; negative to remove)", amount),
      field("Reason", reason),
      h("button", { type: "submit", class: "primary" }, "Top up"),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        await api.post(`users/${user.user_id}/topups`, {
          amount_micros: unitsToMicros(amount.value),
          reason: reason.value,
          idempotency_key: crypto.randomUUID(),
        });
        await refresh(user);
      }, "Credit added.");
    });
    const { fields, read } = limitsForm();
    const budgetForm = h("form", { class: "inline write", "aria-label": "User budgets" }, h("h3", {}, "Set budgets"), fields.slice(3), h("button", { type: "submit" }, "Save budgets"));
    budgetForm.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        const v = read();
        await api.put(`budgets/user/${user.user_id}/day`, { limit_micros: v.daily_budget_micros });
        await api.put(`budgets/user/${user.user_id}/month`, { limit_micros: v.monthly_budget_micros });
        await refresh(user);
      }, "Budgets saved.");
    });
    panel.append(h("div", { class: "grid2" }, form, budgetForm));
  }
  return panel;
}

function editKey(key, budgets, done) {
  const name = input({ value: key.name });
  const models = input({ value: (key.allowed_models || []).join(", ") });
  const cidrs = input({ value: (key.allowed_cidrs || []).join(", ") });
  const enabled = h("input", { type: "checkbox", checked: key.enabled });
  const byPeriod = Object.fromEntries(budgets.map((b) => [b.period, Number(b.limit_micros)]));
  const { fields, read } = limitsForm(key.limits || {}, byPeriod);
  const form = h(
    "form",
    { class: "stack" },
    field("Name", name),
    field("Allowed models", models, "Comma-separated names or patterns (gpt-4o*); empty: every model."),
    field("Allowed addresses", cidrs, "Comma-separated CIDRs (10.0.0.0/8); empty: any address."),
    h("label", { class: "check" }, enabled, " Enabled"),
    fields,
    h("h3", {}, "Budgets in force"),
    budgetTable(budgets),
    h("button", { type: "submit", class: "primary" }, "Save"),
  );
  const box = dialog(`Edit key ${key.name}`, form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      await api.patch(`keys/${key.key_id}`, {
        name: name.value,
        allowed_models: list(models.value),
        allowed_cidrs: list(cidrs.value),
        enabled: enabled.checked,
        limits: read(),
      });
      box.close();
      await done();
    }, "Key saved.");
  });
}

export async function keys(ctx) {
  const { main } = ctx;
  const userSearch = input({ type: "search", id: "user-search", placeholder: "name, email or id" });
  const keySearch = input({ type: "search", id: "key-search", placeholder: "name, prefix, user or id" });
  const usersBox = h("div", { id: "users" });
  const keysBox = h("div", { id: "keys" });
  const detail = h("div", { id: "user-detail" });
  let users = [];
  let allKeys = [];

  async function showUser(user) {
    detail.replaceChildren(await userPanel(user, ctx, showUser));
  }

  function renderUsers() {
    const q = userSearch.value.trim().toLowerCase();
    const rows = users.filter((u) => !q || [u.name, u.email, u.user_id].some((v) => String(v).toLowerCase().includes(q)));
    usersBox.replaceChildren(
      table(
        [
          { label: "Name", cell: (u) => u.name },
          { label: "Email", cell: (u) => u.email || "–" },
          { label: "User id", cell: (u) => h("code", {}, u.user_id) },
          { label: "Admin", cell: (u) => (u.admin ? "yes" : "no") },
          { label: "Created", cell: (u) => fmt.date(u.created_at) },
        ],
        rows,
        { caption: "Users (select one for its balance, top-ups and budgets)", onRow: (u) => act(() => showUser(u)) },
      ),
    );
  }

  function renderKeys() {
    const q = keySearch.value.trim().toLowerCase();
    const rows = allKeys.filter((k) => !q || [k.name, k.display_prefix, k.user_id, k.key_id].some((v) => String(v).toLowerCase().includes(q)));
    const byUser = Object.fromEntries(users.map((u) => [u.user_id, u.name]));
    keysBox.replaceChildren(
      table(
        [
          { label: "Name", cell: (k) => k.name },
          { label: "Key", cell: (k) => h("code", {}, k.display_prefix) },
          { label: "User", cell: (k) => byUser[k.user_id] || k.user_id },
          { label: "Models", cell: (k) => (k.allowed_models || []).join(", ") || "all" },
          { label: "RPM", num: true, cell: (k) => (Number(k.limits?.rpm) ? fmt.int(k.limits.rpm) : "–") },
          { label: "State", cell: (k) => (k.revoked ? "revoked" : k.enabled ? "active" : "disabled") },
          { label: "Last used", cell: (k) => fmt.date(k.last_used_at) },
          {
            label: "Actions",
            cell: (k) =>
              k.revoked
                ? ""
                : h(
                    "span",
                    { class: "write actions" },
                    h("button", { type: "button", onclick: () => act(async () => editKey(k, await budgetsOf("key", k.key_id), load)) }, "Edit"),
                    h("button", {
                      type: "button",
                      onclick: () =>
                        confirm(`Rotate ${k.name}? Its current secret stops working.`) &&
                        act(async () => {
                          const rotated = await api.post(`keys/${k.key_id}/rotate`);
                          showSecret(`New secret for ${k.name}`, rotated.api_key);
                          await load();
                        }),
                    }, "Rotate"),
                    h("button", {
                      type: "button",
                      class: "danger",
                      onclick: () =>
                        confirm(`Revoke ${k.name}? Every relay refuses it within a second.`) &&
                        act(async () => {
                          await api.post(`keys/${k.key_id}/revoke`);
                          await load();
                        }, "Key revoked."),
                    }, "Revoke"),
                  ),
          },
        ],
        rows,
        { caption: "API keys" },
      ),
    );
  }

  async function load() {
    const [u, k] = await Promise.all([api.get("users", { limit: 1000 }), api.get("keys", { limit: 1000 })]);
    users = u.users || [];
    allKeys = k.keys || [];
    renderUsers();
    renderKeys();
    userSelect.replaceChildren(...users.map((x) => h("option", { value: x.user_id }, `${x.name} (${x.user_id})`)));
  }

  userSearch.addEventListener("input", renderUsers);
  keySearch.addEventListener("input", renderKeys);

  // Create forms: hidden for a read-only session (the API refuses its writes anyway).
  const newName = input({ required: true, id: "new-user-name" });
  const newEmail = input({ type: "email", id: "new-user-email" });
  const newAdmin = h("input", { type: "checkbox", id: "new-user-admin" });
  const userForm = h("form", { class: "inline write", "aria-label": "Create user" }, h("h2", {}, "New user"), field("Name", newName), field("Email", newEmail), h("label", { class: "check" }, newAdmin, " Admin"), h("button", { type: "submit", class: "primary" }, "Create user"));
  userForm.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      await api.post("users", { name: newName.value, email: newEmail.value, admin: newAdmin.checked });
      userForm.reset();
      await load();
    }, "User created.");
  });

  const userSelect = h("select", { id: "new-key-user", required: true });
  const keyName = input({ required: true, id: "new-key-name" });
  const keyModels = input({ id: "new-key-models" });
  const limits = limitsForm();
  const keyForm = h("form", { class: "inline write", "aria-label": "Create key" }, h("h2", {}, "New key"), field("User", userSelect), field("Name", keyName), field("Allowed models", keyModels, "Comma-separated; empty: every model."), limits.fields[0], limits.fields[3], h("button", { type: "submit", class: "primary" }, "Create key"));
  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      const v = limits.read();
      const body = { user_id: userSelect.value, name: keyName.value, allowed_models: list(keyModels.value), limits: { rpm: v.rpm } };
      if (v.daily_budget_micros) body.limits.daily_budget_micros = v.daily_budget_micros;
      const created = await api.post("keys", body);
      keyForm.reset();
      await load();
      showSecret(`Key ${created.key.name} created`, created.api_key);
    });
  });

  main.append(
    h("div", { class: "grid2 write" }, userForm, keyForm),
    h("section", {}, h("h2", {}, "Users"), field("Search users", userSearch), usersBox),
    detail,
    h("section", {}, h("h2", {}, "Keys"), field("Search keys", keySearch), keysBox),
  );
  await load();
}
