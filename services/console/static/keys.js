// Keys and users: list and search, create (the plaintext shown once), edit scopes and limits, rotate,
// revoke; balances, top-ups with a reason, budgets and how much of each is used.
import { act, api, dialog, field, fmt, h, idPager, localInputToSeconds, secondsToLocalInput, table, toast, unitsToMicros } from "./lib.js";

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
  const shown = (micros) => (micros ? String(micros / 1e6) : "");
  const daily = input({ inputmode: "decimal", value: shown(budgets.day) });
  const monthly = input({ inputmode: "decimal", value: shown(budgets.month) });
  const fields = [
    field("Requests per minute", rpm, "Empty: no limit."),
    field("Tokens per minute", tpm),
    field("Concurrent requests", conc),
    field("Daily budget (units)", daily, "Empty: none."),
    field("Monthly budget (units)", monthly),
  ];
  const rates = () => ({ rpm: rpm.value || "0", tpm: tpm.value || "0", max_concurrency: conc.value || "0" });
  // Only the budgets the operator changed: an untouched field must never overwrite (or erase) a budget
  // set elsewhere meanwhile. Keyed as the admin API's limits fields.
  const changedBudgets = () => {
    const changed = {};
    for (const [name, box, initial] of [["daily_budget_micros", daily, shown(budgets.day)], ["monthly_budget_micros", monthly, shown(budgets.month)]]) {
      if (box.value.trim() !== initial) changed[name] = box.value.trim() ? unitsToMicros(box.value) : 0;
    }
    return changed;
  };
  return { fields, rates, changedBudgets };
}

async function budgetsOf(scope, id) {
  // From the primary: the form's starting values must include a change just saved.
  const listing = await api.get(`budgets/${scope}/${id}`, { consistent: "true" });
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
  const [balance, budgets] = await Promise.all([api.get(`users/${user.user_id}/balance`, { consistent: "true" }), budgetsOf("user", user.user_id)]);
  const panel = h(
    "section",
    { id: "user-panel", "aria-label": `User ${user.name}` },
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
    const byPeriod = Object.fromEntries(budgets.map((b) => [b.period, Number(b.limit_micros)]));
    const { fields, changedBudgets } = limitsForm({}, byPeriod);
    const budgetForm = h("form", { class: "inline write", "aria-label": "User budgets" }, h("h3", {}, "Set budgets"), fields.slice(3), h("button", { type: "submit" }, "Save budgets"));
    budgetForm.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        const periods = { daily_budget_micros: "day", monthly_budget_micros: "month" };
        for (const [name, micros] of Object.entries(changedBudgets())) {
          await api.put(`budgets/user/${user.user_id}/${periods[name]}`, { limit_micros: micros });
        }
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
  const expires = h("input", { type: "datetime-local", value: secondsToLocalInput(key.expires_at) });
  const byPeriod = Object.fromEntries(budgets.map((b) => [b.period, Number(b.limit_micros)]));
  const { fields, rates, changedBudgets } = limitsForm(key.limits || {}, byPeriod);
  const form = h(
    "form",
    { class: "stack" },
    field("Name", name),
    field("Allowed models", models, "Comma-separated names or patterns (gpt-4o*); empty: every model."),
    field("Allowed addresses", cidrs, "Comma-separated CIDRs (10.0.0.0/8); empty: any address."),
    field("Expires", expires, "Empty: never."),
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
        limits: { ...rates(), ...changedBudgets() },
        // Sent only when changed: an expiry already past would be refused on any other edit.
        ...(expires.value !== secondsToLocalInput(key.expires_at) ? { expires_at: localInputToSeconds(expires.value) } : {}),
      });
      box.close();
      await done();
    }, "Key saved.");
  });
}

function listFooter(pager, noun, loadMore) {
  const button = h("button", { type: "button", onclick: () => act(loadMore) }, `Load more ${noun}`);
  const note = h("p", { class: "hint", role: "status" });
  const box = h("div", { class: "list-footer" }, note, button);
  const update = () => {
    const query = pager.query.q ? ` matching “${pager.query.q}”` : "";
    note.textContent = pager.partial
      ? `Showing the first ${fmt.int(pager.rows.length)} ${noun}${query}; there may be more.`
      : `${fmt.int(pager.rows.length)} ${noun}${query}.`;
    button.hidden = !pager.partial;
  };
  return { box, update };
}

// Runs `fn` once typing has paused, so a search is one request, not one per key press.
function debounced(fn, ms = 300) {
  let timer;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

export async function keys(ctx) {
  const { main } = ctx;
  const userSearch = input({ type: "search", id: "user-search", placeholder: "name, email or id" });
  const keySearch = input({ type: "search", id: "key-search", placeholder: "name, prefix (rg-…), user id or id" });
  const usersBox = h("div", { id: "users" });
  const keysBox = h("div", { id: "keys" });
  // Users and keys are searched and paged on the server (the lists can be long).
  const users = idPager("users", "users", "user_id");
  const allKeys = idPager("keys", "keys", "key_id");
  const userNames = new Map();
  const usersFooter = listFooter(users, "users", async () => {
    await users.more();
    renderUsers();
  });
  const keysFooter = listFooter(allKeys, "keys", async () => {
    await allKeys.more();
    renderKeys();
  });

  // The user's panel opens over the page (a dialog), so nothing on the page moves; a refresh after a
  // top-up or budget change replaces the open panel's content.
  async function showUser(user) {
    const panel = await userPanel(user, ctx, showUser);
    const open = document.getElementById("user-panel");
    if (open) open.replaceWith(panel);
    else dialog(`User ${user.name}`, panel);
  }

  function renderUsers() {
    for (const u of users.rows) userNames.set(u.user_id, u.name);
    usersBox.replaceChildren(
      table(
        [
          { label: "Name", cell: (u) => u.name },
          { label: "Email", cell: (u) => u.email || "–" },
          { label: "User id", cell: (u) => h("code", {}, u.user_id) },
          { label: "Admin", cell: (u) => (u.admin ? "yes" : "no") },
          { label: "Created", cell: (u) => fmt.date(u.created_at) },
        ],
        users.rows,
        { caption: "Users (select one for its balance, top-ups and budgets)", onRow: (u) => act(() => showUser(u)), empty: "No user matches." },
      ),
    );
    usersFooter.update();
    const chosen = userSelect.value;
    userSelect.replaceChildren(...users.rows.map((x) => h("option", { value: x.user_id }, `${x.name} (${x.user_id})`)));
    if (chosen && users.rows.some((x) => x.user_id === chosen)) userSelect.value = chosen;
  }

  function renderKeys() {
    keysBox.replaceChildren(
      table(
        [
          { label: "Name", cell: (k) => k.name },
          { label: "Key", cell: (k) => h("code", {}, k.display_prefix) },
          { label: "User", cell: (k) => h("span", { title: k.user_id }, userNames.get(k.user_id) || k.user_id) },
          { label: "Models", cell: (k) => (k.allowed_models || []).join(", ") || "all" },
          { label: "RPM", num: true, cell: (k) => (Number(k.limits?.rpm) ? fmt.int(k.limits.rpm) : "–") },
          { label: "State", cell: (k) => (k.revoked ? "revoked" : !k.enabled ? "disabled" : Number(k.expires_at) && Number(k.expires_at) * 1000 <= Date.now() ? "expired" : "active") },
          { label: "Expires", cell: (k) => (Number(k.expires_at) ? fmt.date(k.expires_at) : "never") },
          { label: "Last used", cell: (k) => fmt.date(k.last_used_at) },
          {
            label: "Actions",
            cell: (k) =>
              k.revoked
                ? ""
                : h(
                    "span",
                    { class: "write actions" },
                    h("button", { type: "button", onclick: () => act(async () => editKey(k, await budgetsOf("key", k.key_id), loadKeys)) }, "Edit"),
                    h("button", {
                      type: "button",
                      onclick: () =>
                        confirm(`Rotate ${k.name}? Its current secret stops working.`) &&
                        act(async () => {
                          const rotated = await api.post(`keys/${k.key_id}/rotate`);
                          showSecret(`New secret for ${k.name}`, rotated.api_key);
                          await loadKeys();
                        }),
                    }, "Rotate"),
                    h("button", {
                      type: "button",
                      class: "danger",
                      onclick: () =>
                        confirm(`Revoke ${k.name}? Every relay refuses it within a second.`) &&
                        act(async () => {
                          await api.post(`keys/${k.key_id}/revoke`);
                          await loadKeys();
                        }, "Key revoked."),
                    }, "Revoke"),
                  ),
          },
        ],
        allKeys.rows,
        { caption: "API keys", empty: "No key matches." },
      ),
    );
    keysFooter.update();
  }

  async function loadUsers() {
    await users.load({ q: userSearch.value.trim() });
    renderUsers();
    // Owners found by this search get their names in the keys list too.
    if (allKeys.rows.length) renderKeys();
  }

  async function loadKeys() {
    await allKeys.load({ q: keySearch.value.trim() });
    renderKeys();
  }

  async function load() {
    await Promise.all([loadUsers(), loadKeys()]);
    // The keys' owners are named from the users loaded, which may have arrived second.
    renderKeys();
  }

  userSearch.addEventListener("input", debounced(() => act(loadUsers)));
  keySearch.addEventListener("input", debounced(() => act(loadKeys)));
  for (const [box, reload] of [[userSearch, loadUsers], [keySearch, loadKeys]]) {
    box.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        act(reload);
      }
    });
  }

  // Create forms: hidden for a read-only session (the API refuses its writes anyway).
  const newName = input({ required: true, id: "new-user-name" });
  const newEmail = input({ type: "email", id: "new-user-email" });
  const newAdmin = h("input", { type: "checkbox", id: "new-user-admin" });
  const userForm = h("form", { class: "inline write", "aria-label": "Create user" }, h("h2", {}, "New user"), field("Name", newName), field("Email", newEmail), h("label", { class: "check" }, newAdmin, " Admin"), h("button", { type: "submit", class: "primary" }, "Create user"));
  userForm.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      const created = await api.post("users", { name: newName.value, email: newEmail.value, admin: newAdmin.checked });
      userForm.reset();
      // The new user is listed (and offered for a key) even when the list is searched or paged.
      userSearch.value = "";
      await load();
      if (!users.rows.some((u) => u.user_id === created.user_id)) {
        users.rows.push(created);
        renderUsers();
      }
      userSelect.value = created.user_id;
    }, "User created.");
  });

  const userSelect = h("select", { id: "new-key-user", required: true });
  const keyName = input({ required: true, id: "new-key-name" });
  const keyModels = input({ id: "new-key-models" });
  const keyCidrs = input({ id: "new-key-cidrs" });
  const keyExpires = h("input", { type: "datetime-local", id: "new-key-expires" });
  const limits = limitsForm();
  const keyForm = h(
    "form",
    { class: "inline write", "aria-label": "Create key" },
    h("h2", {}, "New key"),
    field("User", userSelect, "The users listed below; search them to find another."),
    field("Name", keyName),
    field("Allowed models", keyModels, "The key's scope: comma-separated names or patterns (gpt-4o*); empty: every model."),
    field("Allowed addresses", keyCidrs, "Comma-separated CIDRs (10.0.0.0/8); empty: any address."),
    field("Expires", keyExpires, "Empty: never."),
    h("div", { class: "grid3" }, limits.fields.slice(0, 3)),
    h("div", { class: "grid3" }, limits.fields.slice(3)),
    h("button", { type: "submit", class: "primary" }, "Create key"),
  );
  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      const body = {
        user_id: userSelect.value,
        name: keyName.value,
        allowed_models: list(keyModels.value),
        allowed_cidrs: list(keyCidrs.value),
        expires_at: localInputToSeconds(keyExpires.value),
        limits: { ...limits.rates(), ...limits.changedBudgets() },
      };
      const created = await api.post("keys", body);
      keyForm.reset();
      await loadKeys();
      showSecret(`Key ${created.key.name} created`, created.api_key);
    });
  });

  main.append(
    h("div", { class: "grid2 write" }, userForm, keyForm),
    h("section", {}, h("h2", {}, "Users"), field("Search users", userSearch), usersBox, usersFooter.box),
    h("section", {}, h("h2", {}, "Keys"), field("Search keys", keySearch), keysBox, keysFooter.box),
  );
  await load();
}
