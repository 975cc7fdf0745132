// The console's shell: sign-in, navigation between pages (#/<page>), and the session's scopes.
import { h, session, toast } from "./lib.js";
import { overview } from "./overview.js";
import { keys } from "./keys.js";
import { usage } from "./usage.js";
import { logs } from "./logs.js";
import { channels } from "./channels.js";
import { prices } from "./prices.js";

const PAGES = { overview, keys, usage, logs, channels, prices };
const TITLES = { overview: "Overview", keys: "Keys & users", usage: "Usage", logs: "Request logs", channels: "Channels", prices: "Prices" };

const state = { info: null, stop: null, timers: [] };
// How long before the session's end the page says so.
const WARN_BEFORE_MS = 5 * 60_000;

function clearExpiry() {
  for (const t of state.timers) clearTimeout(t);
  state.timers = [];
  document.getElementById("session-note").hidden = true;
}

// The admin token ends at info.expires_at: the page says so beforehand and then asks to sign in again,
// rather than letting the next call fail. Signing in again keeps the page (#/<page>) that was open.
function scheduleExpiry(info) {
  clearExpiry();
  const endMs = info.expires_at * 1000;
  const at = new Date(endMs).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  const note = document.getElementById("session-note");
  state.timers.push(
    setTimeout(() => {
      document.getElementById("session-note-text").textContent = `Your session ends at ${at}.`;
      note.hidden = false;
    }, Math.max(0, endMs - WARN_BEFORE_MS - Date.now())),
    setTimeout(() => showSignIn(`Your session ended at ${at}. Sign in again to go on.`), Math.max(0, endMs - Date.now())),
  );
}

function showSignIn(message) {
  clearExpiry();
  if (state.stop) state.stop();
  state.stop = null;
  state.info = null;
  document.getElementById("shell").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
  document.getElementById("signin-key").focus();
}

function showShell(info) {
  state.info = info;
  document.getElementById("signin").hidden = true;
  document.getElementById("shell").hidden = false;
  const writes = info.scopes.includes("admin:write");
  document.body.classList.toggle("read-only", !writes);
  const until = new Date(info.expires_at * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  document.getElementById("whoami").textContent = `${info.user_id} · ${writes ? "read and write" : "read only"} · session until ${until}`;
  scheduleExpiry(info);
  route();
}

async function route() {
  if (!state.info) return;
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1] || "overview";
  const page = PAGES[name] || overview;
  if (state.stop) state.stop();
  state.stop = null;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name] || "Overview"} · relaygate console`;
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", {}, TITLES[name] || "Overview"));
  // Tests (and assistive tools) can tell when a page has its data.
  delete main.dataset.ready;
  main.dataset.page = name;
  const ctx = { main, canWrite: state.info.scopes.includes("admin:write"), info: state.info };
  try {
    state.stop = (await page(ctx)) || null;
  } catch (err) {
    main.append(h("p", { class: "error", role: "alert" }, err.message || String(err)));
  }
  main.dataset.ready = "1";
}

document.getElementById("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const keyInput = document.getElementById("signin-key");
  const readOnly = document.getElementById("signin-read-only").checked;
  try {
    const info = await session.signIn(keyInput.value, readOnly);
    keyInput.value = "";
    showShell(info);
  } catch (err) {
    keyInput.value = "";
    showSignIn(err.message);
  }
});

document.getElementById("session-renew").addEventListener("click", () => showSignIn("Sign in again to go on where you are."));

document.getElementById("signout").addEventListener("click", async () => {
  try {
    await session.signOut();
  } catch (err) {
    toast(err.message, true);
  }
  showSignIn("Signed out.");
});

window.addEventListener("console:signed-out", (e) => showSignIn(e.detail));
window.addEventListener("hashchange", route);

session.current().then(showShell, () => showSignIn(""));
