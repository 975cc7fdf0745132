// Prices: the price book (per million tokens, in units), each model's price history, and setting a
// new version of a price.
import { act, api, field, fmt, h, table, unitsToMicros } from "./lib.js";

export async function prices({ main, canWrite }) {
  const box = h("div", { id: "prices-table" });
  const historyBox = h("section", { id: "price-history", "aria-live": "polite" });
  main.append(box, historyBox);
  const model = h("input", { type: "text", required: true, id: "price-model" });
  const input = h("input", { type: "text", inputmode: "decimal", required: true, id: "price-input" });
  const output = h("input", { type: "text", inputmode: "decimal", required: true, id: "price-output" });
  const cached = h("input", { type: "text", inputmode: "decimal", id: "price-cached" });
  const form = h(
    "form",
    { class: "inline write", "aria-label": "Set a price" },
    h("h2", {}, "Set a price"),
    h("p", { class: "hint" }, "Setting a price adds a new version; charges already made keep the version they were made with."),
    field("Model", model),
    field("Input per million tokens (units)", input),
    field("Output per million tokens (units)", output),
    field("Cached input per million tokens (units)", cached, "Empty: the input price."),
    h("button", { type: "submit", class: "primary" }, "Save price"),
  );

  let current = [];

  const columns = [
    { label: "Input / Mtok", num: true, cell: (p) => fmt.money(p.input_per_mtok) },
    { label: "Output / Mtok", num: true, cell: (p) => fmt.money(p.output_per_mtok) },
    { label: "Cached input / Mtok", num: true, cell: (p) => fmt.money(p.cached_input_per_mtok) },
    { label: "Per request", num: true, cell: (p) => fmt.money(p.per_request) },
    { label: "Per image", num: true, cell: (p) => fmt.money(p.per_image) },
    { label: "Default max output", num: true, cell: (p) => fmt.int(p.default_max_output_tokens) },
  ];

  async function showHistory(name) {
    const versions = (await api.get("prices", { model: name })).prices || [];
    historyBox.replaceChildren(
      h("h2", {}, `Price history of ${name}`),
      table(
        [{ label: "Version", num: true, cell: (p) => fmt.int(p.price_id) }, { label: "Set", cell: (p) => fmt.date(p.created_at) }, ...columns],
        versions,
        { caption: "Every version, newest first; each charge keeps the version it was made at." },
      ),
    );
  }

  function select(p) {
    act(() => showHistory(p.model));
    if (!canWrite) return;
    model.value = p.model;
    input.value = Number(p.input_per_mtok) / 1e6;
    output.value = Number(p.output_per_mtok) / 1e6;
    cached.value = Number(p.cached_input_per_mtok) ? Number(p.cached_input_per_mtok) / 1e6 : "";
  }

  async function load() {
    const book = await api.get("prices");
    current = book.prices || [];
    const rows = [...current].sort((a, b) => a.model.localeCompare(b.model));
    box.replaceChildren(
      table(
        [
          { label: "Model", cell: (p) => p.model },
          { label: "Version", num: true, cell: (p) => fmt.int(p.price_id) },
          { label: "Since", cell: (p) => fmt.date(p.created_at) },
          ...columns,
        ],
        rows,
        { caption: "Price book: the current version of each model's price (select one for its history)", onRow: select },
      ),
    );
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      // A new version keeps the fields this form does not show (per request, per image, output cap).
      const existing = current.find((p) => p.model === model.value.trim()) || {};
      const { model: _model, price_id: _id, ...kept } = existing;
      const body = { ...kept, input_per_mtok: unitsToMicros(input.value), output_per_mtok: unitsToMicros(output.value) };
      body.cached_input_per_mtok = cached.value ? unitsToMicros(cached.value) : 0;
      await api.put(`prices/${encodeURIComponent(model.value.trim())}`, body);
      await load();
      await showHistory(model.value.trim());
    }, "Price saved.");
  });
  if (canWrite) main.append(form);
  await load();
}
