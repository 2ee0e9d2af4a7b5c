// The medmesh console: one page, no build step, no library. It signs in with
// POST /v1/sessions and then uses the node's API like any client; the node checks every
// request against the user's role, and the page shows only the screens the role allows.
"use strict";

(function () {
  const STRINGS = window.MEDMESH_STRINGS;
  const state = {
    token: sessionStorage.getItem("medmesh.token"),
    me: null,
    lang: localStorage.getItem("medmesh.lang") || "en",
    timer: null,
    clinics: [],
  };

  // ---- text ----------------------------------------------------------------------
  function t(key, vars) {
    const table = STRINGS.languages[state.lang] || STRINGS.languages.en;
    let text = table[key] !== undefined ? table[key] : STRINGS.languages.en[key];
    if (text === undefined) text = key;
    for (const [name, value] of Object.entries(vars || {})) {
      text = text.split("{" + name + "}").join(String(value));
    }
    return text;
  }
  function applyLanguage() {
    document.documentElement.lang = state.lang;
    document.documentElement.dir = STRINGS.rtl.includes(state.lang) ? "rtl" : "ltr";
    document.title = t("app_title");
    document.querySelector(".skip").textContent = t("skip");
  }

  // ---- DOM -----------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "text") el.textContent = value;
      else el.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }
  let ids = 0;
  // A labelled control: every input has a label bound to it.
  function field(label, control) {
    const id = control.id || "f" + ++ids;
    control.id = id;
    return h("div", { class: "field" }, h("label", { for: id, text: label }), control);
  }
  function input(name, attrs) {
    return h("input", Object.assign({ name, type: "text" }, attrs || {}));
  }
  function select(name, options, attrs) {
    return h(
      "select",
      Object.assign({ name }, attrs || {}),
      options.map(([value, text]) => h("option", { value, text })),
    );
  }
  function table(headers, rows, caption) {
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        {},
        caption ? h("caption", { class: "muted", text: caption }) : null,
        h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", text: x })))),
        h("tbody", {}, rows),
      ),
    );
  }
  function notice(text, kind) {
    const box = document.getElementById("notice");
    box.className = kind || "";
    box.textContent = text || "";
  }
  function when(text) {
    if (!text) return t("never");
    const at = new Date(text);
    if (isNaN(at)) return text;
    return at.toLocaleString(state.lang);
  }
  function yes(value) {
    return value ? h("span", { class: "ok", text: t("yes") }) : h("span", { class: "muted", text: t("no") });
  }
  function formValues(form) {
    const out = {};
    for (const [key, value] of new FormData(form).entries()) {
      if (value !== "") out[key] = value;
    }
    return out;
  }
  function confirmDialog(text, action) {
    return new Promise((resolve) => {
      const dialog = h(
        "dialog",
        { "aria-labelledby": "confirm-text" },
        h("p", { id: "confirm-text", text }),
        h(
          "div",
          { class: "form-row" },
          h("button", { type: "button", class: "danger", onclick: () => dialog.close("yes"), text: action }),
          // The focus starts on Cancel: Enter pressed by habit changes nothing.
          h("button", { type: "button", class: "secondary", autofocus: true, onclick: () => dialog.close("no"), text: t("cancel") }),
        ),
      );
      dialog.addEventListener("close", () => {
        dialog.remove();
        resolve(dialog.returnValue === "yes");
      });
      document.body.append(dialog);
      dialog.showModal();
    });
  }

  // ---- API -----------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || t("request_failed", { status }));
      this.status = status;
      this.code = error.code;
      this.field = error.field;
    }
  }
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, { error: { message: t("unreachable") } });
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (err) {
      json = null;
    }
    if (response.status === 401 && state.token && path !== "/v1/sessions") {
      signOut(t("session_ended"));
      throw new ApiError(401, json);
    }
    if (!response.ok) throw new ApiError(response.status, json);
    return json;
  }
  // Runs an action from a form or button; shows what went wrong, in the user's words.
  // A `work` that answers `{ warning }` has done its work with a warning: it is shown
  // instead of `done`.
  async function act(work, done) {
    notice("");
    try {
      const result = await work();
      if (result && typeof result.warning === "string") notice(result.warning, "warn");
      else if (done) notice(done, "info");
    } catch (err) {
      notice(err.message + (err.field ? " (" + err.field + ")" : ""));
    }
    // The control that was used may be gone (a list drawn again): the focus goes to what
    // happened, or to the screen, not back to the top of the page.
    if (!document.activeElement || document.activeElement === document.body) {
      const box = document.getElementById("notice");
      (box.textContent ? box : document.getElementById("main")).focus({ preventScroll: true });
    }
  }
  function roleName(role) {
    return STRINGS.languages.en["role_" + role] ? t("role_" + role) : role;
  }
  function may(permission) {
    return !!state.me && state.me.permissions.includes(permission);
  }

  // ---- screens -------------------------------------------------------------------
  const SCREENS = [
    { id: "health", label: "nav_health", permission: "read_status", show: showHealth },
    { id: "devices", label: "nav_devices", permission: "manage_devices", show: showDevices },
    { id: "pharmacy", label: "nav_pharmacy", permission: "read_stock", show: showPharmacy },
    { id: "records", label: "nav_records", permission: "read_patients", show: showRecords },
    { id: "users", label: "nav_users", permission: "manage_users", show: showUsers },
  ];

  function header() {
    const top = document.getElementById("top");
    top.replaceChildren();
    const languages = select(
      "lang",
      Object.keys(STRINGS.languages).map((code) => [code, STRINGS.languages[code].language_name]),
      { onchange: (e) => { state.lang = e.target.value; localStorage.setItem("medmesh.lang", state.lang); redrawKeepingForms(); } },
    );
    languages.value = state.lang;
    languages.setAttribute("aria-label", t("language"));
    top.append(h("span", { class: "brand", text: t("app_title") }));
    if (state.me) {
      const current = currentScreen();
      top.append(
        h(
          "nav",
          { "aria-label": t("nav_label") },
          SCREENS.filter((s) => may(s.permission)).map((s) =>
            h("a", { href: "#/" + s.id, "aria-current": current && current.id === s.id ? "page" : null, text: t(s.label) }),
          ),
        ),
        h(
          "div",
          { class: "who" },
          h("span", { text: t("signed_in_as", { user: state.me.user, role: roleName(state.me.role) }) }),
          languages,
          h("button", { type: "button", class: "secondary", onclick: () => signOut(), text: t("sign_out") }),
        ),
      );
    } else {
      top.append(h("div", { class: "who" }, languages));
    }
  }

  // Draws the screen again (in another language) with what was typed in its forms kept:
  // the same screen has the same controls in the same order.
  async function redrawKeepingForms() {
    const controls = () => [...document.querySelectorAll("#main form [name]")];
    const ticked = (el) => el.type === "checkbox" || el.type === "radio";
    const typed = controls().map((el) => [el.name, ticked(el) ? el.checked : el.value]);
    await render();
    controls().forEach((el, i) => {
      if (!typed[i] || typed[i][0] !== el.name) return;
      if (ticked(el)) el.checked = typed[i][1];
      else el.value = typed[i][1];
    });
  }

  function currentScreen() {
    const id = (location.hash.match(/^#\/(\w+)/) || [])[1];
    const allowed = SCREENS.filter((s) => may(s.permission));
    return allowed.find((s) => s.id === id) || allowed[0];
  }

  async function render() {
    clearInterval(state.timer);
    state.timer = null;
    applyLanguage();
    header();
    // Each render draws into a container of its own: a screen left while it still loads
    // draws into a container no longer on the page, never into the next screen.
    const main = h("div");
    document.getElementById("main").replaceChildren(main);
    if (!state.me) return showSignIn(main);
    const screen = currentScreen();
    if (!screen) {
      main.append(h("p", { text: t("nothing_allowed") }));
      return;
    }
    await screen.show(main);
  }

  // Runs `work` now and every `ms` while `node` is on the page (one run at a time).
  function refreshing(node, ms, work) {
    let busy = false;
    const run = async () => {
      if (!node.isConnected) {
        clearInterval(timer);
        return;
      }
      if (busy) return;
      busy = true;
      try {
        await work();
      } finally {
        busy = false;
      }
    };
    const timer = setInterval(run, ms);
    state.timer = timer;
    return run();
  }

  // ---- sign-in -------------------------------------------------------------------
  function showSignIn(main) {
    const form = h(
      "form",
      { class: "signin panel", "aria-labelledby": "signin-title" },
      h("h1", { id: "signin-title", text: t("sign_in_title") }),
      h("p", { class: "muted", text: t("sign_in_help") }),
      field(t("email"), input("email", { type: "email", autocomplete: "username", required: true })),
      field(t("password"), input("password", { type: "password", autocomplete: "current-password", required: true })),
      h("button", { type: "submit", text: t("sign_in") }),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        const values = formValues(form);
        const session = await api("POST", "/v1/sessions", { email: values.email, password: values.password });
        state.token = session.token;
        sessionStorage.setItem("medmesh.token", state.token);
        await loadMe();
        render();
      });
    });
    // A new device takes the mesh's records (users included) in its initial sync: the
    // page shows how far it has come, from /health (no credential needed).
    const receiving = h("section", { class: "panel receiving", hidden: true });
    const refresh = async () => {
      try {
        const health = await api("GET", "/health");
        const p = health && health.sync_progress;
        receiving.hidden = !(p && p.announced);
        if (receiving.hidden) return receiving.replaceChildren();
        receiving.replaceChildren(
          h("h2", { text: t("receiving_title") }),
          progressBar(p, t("receiving_title")),
          h("p", { class: "muted", text: t("receiving_help") }),
        );
      } catch (err) {
        receiving.hidden = true;
      }
    };
    main.append(form, receiving);
    form.querySelector("input").focus();
    refreshing(receiving, 1000, refresh);
  }
  async function loadMe() {
    state.me = await api("GET", "/v1/me");
  }
  async function signOut(reason) {
    if (state.token && !reason) {
      try { await api("DELETE", "/v1/sessions/current"); } catch (err) { /* signed out anyway */ }
    }
    state.token = null;
    state.me = null;
    sessionStorage.removeItem("medmesh.token");
    notice(reason || "", reason ? "" : "info");
    render();
  }

  // ---- mesh health ---------------------------------------------------------------
  async function showHealth(main) {
    main.append(h("h1", { text: t("health_title") }));
    // Not a live region: it is drawn again every 2 s, and a screen reader would read it
    // out each time.
    const body = h("div");
    main.append(body);
    const refresh = async () => {
      try {
        const view = await healthView();
        body.replaceChildren(...view);
      } catch (err) {
        if (body.isConnected) notice(err.message);
      }
    };
    await refreshing(body, 2000, refresh);
  }
  async function healthView() {
    const status = await api("GET", "/v1/status");
    const mesh = status.mesh;
    const out = [];
    const device = mesh ? mesh.device : {};
    out.push(
      h(
        "section",
        { class: "panel", "aria-labelledby": "node-title" },
        h("h2", { id: "node-title", text: t("this_node") }),
        h(
          "dl",
          { class: "facts" },
          h("dt", { text: t("name") }), h("dd", { text: device.name || "-" }),
          h("dt", { text: t("kind") }), h("dd", { text: device.kind || "-" }),
          h("dt", { text: t("peer_id") }), h("dd", { text: status.peer_id }),
          h("dt", { text: t("serves") }), h("dd", { text: device.serves || t("all_clinics") }),
          h("dt", { text: t("records") }), h("dd", { "data-total": status.total_records, text: String(status.total_records) }),
          h("dt", { text: t("kept_for_retry") }), h("dd", { text: String(status.held.total) }),
          h("dt", { text: t("uptime") }), h("dd", { text: t("seconds", { n: status.uptime_s }) }),
        ),
      ),
    );
    if (!mesh) {
      out.push(h("p", { class: "warn", text: t("no_mesh") }));
      return out;
    }
    for (const clinic of mesh.unreached_clinics || []) {
      out.push(h("p", { class: "warn", text: t("unreached", { clinic: clinic.name || clinic.id }) }));
    }
    const peers = (await api("GET", "/v1/peers")).peers;
    const rows = peers.map((p) =>
      h(
        "tr",
        { "data-peer": p.peer_id },
        h("td", { text: p.name || p.peer_id.slice(0, 16) + "…" }),
        h("td", { text: p.kind || "-" }),
        h("td", {}, p.connected ? h("span", { class: "ok", text: t("connected") }) : h("span", { class: "bad", text: t("disconnected") })),
        h("td", { text: when(p.last_sync) }),
        h("td", {}, progressOf(p)),
        h("td", { text: String(p.pending_out) }),
        h("td", { text: p.waiting_for || "-" }),
        h("td", { text: p.last_error || "" }),
      ),
    );
    out.push(
      h(
        "section",
        { class: "panel", "aria-labelledby": "peers-title" },
        h("h2", { id: "peers-title", text: t("peers_title", { connected: mesh.peers_connected, known: mesh.peers_known }) }),
        peers.length
          ? table([t("name"), t("kind"), t("state"), t("last_sync"), t("waiting_in"), t("waiting_out"), t("waits_for"), t("last_error")], rows)
          : h("p", { class: "muted", text: t("no_peers") }),
      ),
    );
    if (status.held.total > 0) {
      out.push(
        h(
          "section",
          { class: "panel", "aria-labelledby": "held-title" },
          h("h2", { id: "held-title", text: t("held_title", { n: status.held.total }) }),
          h("p", { class: "muted", text: t("held_help") }),
          table(
            [t("document"), t("collection"), t("why"), t("from"), t("attempts")],
            status.held.documents.map((d) =>
              h("tr", {}, h("td", { text: d.id }), h("td", { text: d.collection }), h("td", { text: d.reason }), h("td", { text: d.from || "-" }), h("td", { text: String(d.attempts) })),
            ),
          ),
        ),
      );
    }
    if (status.gateway) {
      const g = await api("GET", "/v1/gateway");
      out.push(
        h(
          "section",
          { class: "panel", "aria-labelledby": "gateway-title" },
          h("h2", { id: "gateway-title", text: t("gateway_title") }),
          h(
            "dl",
            { class: "facts" },
            h("dt", { text: t("cloud") }), h("dd", { text: g.cloud || "-" }),
            h("dt", { text: t("last_pull") }), h("dd", { text: when(g.last_pull_at) + " · " + t("rows", { n: g.last_pull_rows }) }),
            h("dt", { text: t("last_push") }), h("dd", { text: when(g.last_push_at) }),
            h("dt", { text: t("backlog") }), h("dd", { "data-backlog": g.backlog, text: String(g.backlog) }),
            h("dt", { text: t("refused_by_cloud") }), h("dd", { class: g.refused.length ? "warn" : "", text: String(g.refused.length) }),
            h("dt", { text: t("last_error") }), h("dd", { class: g.last_error ? "bad" : "", text: g.last_error ? g.last_error + " (" + when(g.last_error_at) + ")" : t("none") }),
          ),
        ),
      );
    }
    return out;
  }
  // A peer's initial sync: documents received of those announced, rate, time left.
  function progressOf(peer) {
    const p = peer.sync_progress;
    if (!p || !p.announced) return String(peer.pending_in);
    return progressBar(p, t("initial_sync_from", { name: peer.name || peer.peer_id }));
  }
  function progressBar(p, label) {
    const percent = Math.floor((100 * p.received) / p.announced);
    return h(
      "div",
      {},
      h("progress", { class: "progress", max: p.announced, value: p.received, "aria-label": label }),
      h("div", { class: "muted", text: t("progress_text", { received: p.received, announced: p.announced, percent, rate: Math.round(p.rate || 0), left: p.eta_s === null || p.eta_s === undefined ? "?" : Math.ceil(p.eta_s) }) }),
    );
  }

  // ---- devices -------------------------------------------------------------------
  async function showDevices(main) {
    main.append(h("h1", { text: t("devices_title") }));
    const list = h("section", { class: "panel" });
    main.append(list);
    const load = async () => {
      const answer = await api("GET", "/v1/devices");
      const rows = answer.devices.map((d) =>
        h(
          "tr",
          { "data-peer": d.peer_id },
          h("td", { text: d.name || "-" }),
          h("td", { text: d.kind || "-" }),
          h("td", { class: "muted", text: d.peer_id }),
          h("td", { text: (d.clinics || []).join(", ") || t("all_clinics") }),
          h("td", {}, d.revoked ? h("span", { class: "bad", text: t("revoked") }) : d.connected ? h("span", { class: "ok", text: t("connected") }) : h("span", { class: "muted", text: t("disconnected") })),
          h(
            "td",
            {},
            d.this_device || d.revoked || !answer.this_device_is_admin
              ? (d.this_device ? t("this_device") : "")
              : h("button", {
                  type: "button",
                  class: "danger",
                  "aria-label": t("revoke_named", { name: d.name || d.peer_id }),
                  text: t("revoke"),
                  onclick: async () => {
                    if (!(await confirmDialog(t("revoke_confirm", { name: d.name || d.peer_id }), t("revoke")))) return;
                    await act(async () => {
                      await api("POST", "/v1/devices/" + encodeURIComponent(d.peer_id) + "/revoke", { reason: "revoked from the console" });
                      await load();
                    }, t("revoked_done", { name: d.name || d.peer_id }));
                  },
                }),
          ),
        ),
      );
      list.replaceChildren(table([t("name"), t("kind"), t("peer_id"), t("serves"), t("state"), t("actions")], rows));
    };
    await act(load);
    const shown = h("div", { class: "qr", "aria-live": "polite" });
    const form = h(
      "form",
      { class: "inline", "aria-labelledby": "invite-title" },
      field(t("device_kind"), select("kind", [["tablet", t("kind_tablet")], ["gateway", t("kind_gateway")], ["admin", t("kind_admin")]])),
      field(t("device_name"), input("name", { placeholder: t("optional") })),
      field(t("invite_expires"), select("expires", [["1h", t("hour")], ["24h", t("hours", { n: 24 })], ["7d", t("days", { n: 7 })]], {})),
      h("button", { type: "submit", text: t("make_invite") }),
    );
    form.querySelector("[name=expires]").value = "24h";
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        const invite = await api("POST", "/v1/invites", formValues(form));
        const text = h("textarea", { readonly: true, name: "invite", rows: 4 });
        text.value = invite.invite;
        shown.replaceChildren(
          h("p", { text: t("invite_made", { kind: invite.kind, until: when(invite.expires_at) }) }),
          invite.qr_svg ? h("img", { src: "data:image/svg+xml;base64," + btoa(invite.qr_svg), alt: t("invite_qr_alt") }) : null,
          field(t("invite_text"), text),
          h("p", { class: "muted", text: t("invite_help") }),
        );
      });
    });
    main.append(
      h("section", { class: "panel" }, h("h2", { id: "invite-title", text: t("add_device") }), form, shown),
    );
  }

  // ---- pharmacy ------------------------------------------------------------------
  async function loadClinics() {
    try {
      const answer = await api("GET", "/v1/clinics?limit=1000");
      state.clinics = answer.records.map((c) => [c.id, c.name || c.id]);
    } catch (err) {
      state.clinics = [];
    }
    return state.clinics;
  }
  async function showPharmacy(main) {
    main.append(h("h1", { text: t("pharmacy_title") }));
    const clinics = await loadClinics();
    const chooser = select("clinic_id", [["", t("all_clinics")], ...clinics], { id: "pharmacy-clinic" });
    const alerts = h("div", { "aria-live": "polite" });
    const stock = h("div");
    const chart = h("div", { "aria-live": "polite" });
    let selected = null;
    const clinicQuery = () => (chooser.value ? "clinic_id=" + encodeURIComponent(chooser.value) : "");
    const load = async () => {
      const a = await api("GET", "/v1/pharmacy/alerts?" + clinicQuery());
      const kinds = [
        ["low_stock", "alert_low", "warn"],
        ["expiring_soon", "alert_expiring", "warn"],
        ["expired_with_stock", "alert_expired", "bad"],
        ["negative_stock", "alert_negative", "bad"],
      ];
      alerts.replaceChildren(
        h("h2", { text: t("alerts") }),
        h(
          "ul",
          { class: "alerts" },
          kinds.map(([key, label, cls]) =>
            h(
              "li",
              { "data-alert": key },
              h("span", { class: a[key].length ? cls : "muted", text: t(label, { n: a[key].length }) }),
              a[key].length ? ": " + a[key].slice(0, 5).map((r) => (r.drug_name || r.drug_id) + " " + r.batch_number + " (" + r.quantity + ")").join(", ") : "",
            ),
          ),
        ),
      );
      const s = await api("GET", "/v1/pharmacy/stock?limit=1000&" + clinicQuery());
      stock.replaceChildren(
        h("h2", { text: t("stock") }),
        table(
          [t("drug"), t("batch"), t("expiry"), t("quantity"), t("reorder_level"), t("chart")],
          s.items.map((r) =>
            h(
              "tr",
              { class: selected === r.stock_item_id ? "selected" : null, "data-item": r.stock_item_id },
              h("td", { text: r.drug_name || r.drug_id }),
              h("td", { text: r.batch_number }),
              h("td", { text: r.expiry_date || "-" }),
              h("td", { class: r.quantity < 0 ? "bad" : "", text: String(r.quantity) }),
              h("td", { text: r.reorder_level === null || r.reorder_level === undefined ? "-" : String(r.reorder_level) }),
              h("td", {}, h("button", {
                type: "button",
                class: "secondary",
                "aria-label": t("show_chart_of", { drug: r.drug_name || r.drug_id, batch: r.batch_number }),
                text: t("show_chart"),
                onclick: () => { selected = r.stock_item_id; act(async () => { await drawChart(chart, r); await load(); }); },
              })),
            ),
          ),
        ),
        s.next ? h("p", { class: "muted", text: t("stock_first_page", { n: s.items.length }) }) : null,
      );
      if (selected) {
        const row = s.items.find((r) => r.stock_item_id === selected);
        if (row) await drawChart(chart, row);
      }
    };
    chooser.addEventListener("change", () => act(load));
    main.append(h("div", { class: "form-row" }, field(t("clinic"), chooser)));
    main.append(h("div", { class: "grid" }, h("section", { class: "panel" }, alerts), h("section", { class: "panel" }, chart)));
    main.append(h("section", { class: "panel" }, stock));
    const operations = [];
    const drugFields = () => [
      field(t("clinic"), select("clinic_id", clinics, { required: true })),
      field(t("drug_name"), input("drug_name", { required: true, autocomplete: "off" })),
    ];
    if (may("dispense")) {
      operations.push(["dispense", t("dispense"), [...drugFields(), field(t("quantity"), input("quantity", { type: "number", min: 1, required: true })), field(t("batch"), input("batch_number", { placeholder: t("earliest_expiry") })), field(t("allow_expired"), input("allow_expired", { type: "checkbox" }))]]);
    }
    if (may("manage_stock")) {
      operations.push(["restock", t("restock"), [...drugFields(), field(t("batch"), input("batch_number", { required: true })), field(t("expiry"), input("expiry_date", { type: "date", required: true })), field(t("quantity"), input("quantity", { type: "number", min: 1, required: true })), field(t("reorder_level"), input("reorder_level", { type: "number", min: 0 }))]]);
      operations.push(["count", t("count"), [...drugFields(), field(t("batch"), input("batch_number", { required: true })), field(t("counted_quantity"), input("counted_quantity", { type: "number", min: 0, required: true }))]]);
      operations.push(["adjust", t("adjust"), [...drugFields(), field(t("batch"), input("batch_number", { required: true })), field(t("quantity_change"), input("quantity_change", { type: "number", required: true })), field(t("reason"), input("reason", { required: true }))]]);
    }
    for (const [name, title, fields] of operations) {
      const form = h("form", { class: "inline", "data-operation": name, "aria-label": title }, fields, h("button", { type: "submit", text: title }));
      const numbers = ["quantity", "reorder_level", "counted_quantity", "quantity_change"];
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const body = formValues(form);
        for (const key of numbers) if (body[key] !== undefined) body[key] = Number(body[key]);
        if (body.allow_expired !== undefined) body.allow_expired = true;
        // Dispensing an expired batch is chosen for one dispense, never left ticked.
        const expired = form.querySelector("input[name=allow_expired]");
        if (expired) expired.checked = false;
        act(async () => {
          const answer = await api("POST", "/v1/pharmacy/" + name, body);
          await load();
          if (answer && answer.negative_stock) return { warning: t("negative_after_dispense", { operation: title }) };
        }, t("done_operation", { operation: title }));
      });
      main.append(h("section", { class: "panel" }, h("h2", { text: title }), form));
    }
    await act(load);
  }
  // A stock item's level over time, from its movements, as an SVG line.
  async function drawChart(box, row) {
    const answer = await api("GET", "/v1/pharmacy/levels?stock_item_id=" + encodeURIComponent(row.stock_item_id));
    const points = answer.points;
    const title = t("chart_title", { drug: row.drug_name || row.drug_id, batch: row.batch_number });
    if (!points.length) {
      box.replaceChildren(h("h2", { text: title }), h("p", { class: "muted", text: t("no_movements") }));
      return;
    }
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    const [W, H, P] = [720, 240, 36];
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("class", "chart");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", t("chart_label", { drug: row.drug_name || row.drug_id, level: answer.level, n: answer.movements }));
    const levels = points.map((p) => p.level);
    const top = Math.max(0, ...levels);
    const bottom = Math.min(0, ...levels);
    const span = top - bottom || 1;
    // Along the time of the movements (by their order when the times do not spread).
    const times = points.map((p) => Date.parse(p.at));
    const first = times[0];
    const last = times[times.length - 1];
    const timed = times.every((v) => !isNaN(v)) && last > first;
    const x = (i) => P + (points.length === 1 ? 0 : ((timed ? (times[i] - first) / (last - first) : i / (points.length - 1)) * (W - 2 * P)));
    const y = (v) => H - P - ((v - bottom) * (H - 2 * P)) / span;
    // A level holds until the next movement: a step line.
    const corners = [];
    points.forEach((p, i) => {
      if (i > 0) corners.push([x(i), y(points[i - 1].level)]);
      corners.push([x(i), y(p.level)]);
    });
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", corners.map(([cx, cy]) => cx.toFixed(1) + "," + cy.toFixed(1)).join(" "));
    svg.dataset.points = String(points.length);
    const zero = document.createElementNS(ns, "line");
    zero.setAttribute("class", "zero");
    zero.setAttribute("x1", P); zero.setAttribute("x2", W - P);
    zero.setAttribute("y1", y(0)); zero.setAttribute("y2", y(0));
    const label = (text, lx, ly) => {
      const el = document.createElementNS(ns, "text");
      el.setAttribute("x", lx); el.setAttribute("y", ly);
      el.textContent = text;
      return el;
    };
    svg.append(zero, line, label(String(top), 2, P), label(String(bottom), 2, H - P),
      label(when(points[0].at), P, H - 8), label(when(points[points.length - 1].at), W - P - 150, H - 8));
    box.replaceChildren(
      h("h2", { text: title }),
      svg,
      h("p", { "data-level": answer.level, text: t("chart_summary", { level: answer.level, n: answer.movements }) }),
    );
  }

  // ---- records -------------------------------------------------------------------
  const BOOKKEEPING = ["updated_at", "last_modified", "server_created_at"];
  async function showRecords(main) {
    main.append(h("h1", { text: t("records_title") }));
    const results = h("div", { "aria-live": "polite" });
    const record = h("div");
    const form = h(
      "form",
      { class: "inline", role: "search" },
      field(t("patient_name"), input("name", { required: true, autocomplete: "off" })),
      h("button", { type: "submit", text: t("find") }),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const name = (formValues(form).name || "").trim();
      act(async () => {
        // "Amina Di": a given name or surname starting with all of it ("Mary Ann"), or a
        // given name starting with one word and a surname with the next (either order);
        // of those, the patients where every word starts one of their names.
        const words = name.toLowerCase().split(/\s+/).filter(Boolean);
        const prefix = (field, text) => field + "=" + encodeURIComponent(text) + "*";
        const queries = [prefix("given_name", name), prefix("surname", name)];
        if (words.length > 1) {
          queries.push(prefix("given_name", words[0]) + "&" + prefix("surname", words[1]));
          queries.push(prefix("surname", words[0]) + "&" + prefix("given_name", words[1]));
        }
        const found = new Map();
        for (const query of queries) {
          const page = await api("GET", "/v1/patients?limit=50&" + query);
          for (const p of page.records) found.set(p.id, p);
        }
        const names = (p) => [p.given_name, p.surname].filter(Boolean).join(" ").toLowerCase().split(/\s+/);
        for (const [id, p] of found) {
          if (!words.every((w) => names(p).some((n) => n.startsWith(w)))) found.delete(id);
        }
        results.replaceChildren(
          found.size
            ? table([t("name"), t("date_of_birth"), t("sex"), t("actions")], [...found.values()].map((p) =>
                h("tr", {},
                  h("td", { text: [p.given_name, p.surname].filter(Boolean).join(" ") }),
                  h("td", { text: p.date_of_birth || "-" }),
                  h("td", { text: p.sex || "-" }),
                  h("td", {}, h("button", { type: "button", class: "secondary", text: t("open"), "aria-label": t("open_named", { name: [p.given_name, p.surname].filter(Boolean).join(" ") }), onclick: () => act(() => openRecord(record, "patients", p.id)) })),
                ),
              ))
            : h("p", { class: "muted", text: t("no_patients", { name }) }),
        );
      });
    });
    main.append(h("section", { class: "panel" }, form, results), record);
  }
  async function openRecord(box, collection, id) {
    const path = "/v1/" + collection + "/" + encodeURIComponent(id);
    const [current, history, conflicts] = await Promise.all([
      api("GET", path),
      api("GET", path + "/history"),
      api("GET", path + "/conflicts"),
    ]);
    const shown = (value) => (value !== null && typeof value === "object" ? JSON.stringify(value) : String(value));
    const parts = [
      h("h2", { text: t("record_title", { name: [current.given_name, current.surname].filter(Boolean).join(" ") || id }) }),
      h("dl", { class: "facts" }, Object.entries(current).flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { "data-field": k, text: shown(v) })])),
    ];
    // When a record was last changed is kept by the node itself: two devices that both
    // changed it always differ there, and the next change settles it. Not for a person.
    const open = conflicts.conflicts.filter((c) => !BOOKKEEPING.includes(c.field));
    parts.push(h("h2", { text: t("conflicts_title", { n: open.length }) }));
    if (!open.length) parts.push(h("p", { class: "muted", text: t("no_conflicts") }));
    // Choosing a value is an edit of the record: only for a role that may edit it (the
    // node checks again). Others see the values, and who can choose.
    const mayChoose = may("register_patients");
    if (open.length && !mayChoose) parts.push(h("p", { class: "muted", text: t("conflict_not_yours") }));
    for (const c of open) {
      if (!mayChoose) {
        parts.push(h("div", { class: "conflict", "data-conflict": c.field },
          h("p", { text: t("conflict_field", { field: c.field, value: shown(c.value) }) }),
          h("ul", {}, c.values.map((v) => h("li", { text: shown(v) })))));
        continue;
      }
      const name = "conflict-" + c.field;
      const form = h(
        "form",
        { class: "conflict", "data-conflict": c.field },
        h(
          "fieldset",
          {},
          h("legend", { text: t("conflict_field", { field: c.field, value: shown(c.value) }) }),
          c.values.map((v, i) => {
            const id = name + "-" + i;
            return h("div", {}, h("input", { type: "radio", name, id, value: String(i), checked: i === 0 }), " ", h("label", { for: id, text: shown(v) }));
          }),
        ),
        h("button", { type: "submit", text: t("keep_value") }),
      );
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const chosen = c.values[Number(new FormData(form).get(name))];
        act(async () => {
          // The choice is written over every concurrent value of this field (also when
          // it is the value shown), and over no other field.
          await api("POST", path + "/conflicts", { field: c.field, value: chosen });
          await openRecord(box, collection, id);
        }, t("conflict_resolved", { field: c.field }));
      });
      parts.push(form);
    }
    parts.push(h("h2", { text: t("history_title") }));
    parts.push(
      table(
        [t("when"), t("who"), t("device"), t("fields")],
        history.changes.map((c) =>
          h("tr", {}, h("td", { text: when(c.time) }), h("td", { text: c.user || "-" }), h("td", { class: "muted", text: (c.device || "-") + (c.signature === "author" ? "" : " (" + c.signature + ")") }), h("td", { text: (c.fields || []).join(", ") })),
        ),
      ),
    );
    box.replaceChildren(h("section", { class: "panel", "data-record": id }, parts));
  }

  // ---- users ---------------------------------------------------------------------
  async function showUsers(main) {
    main.append(h("h1", { text: t("users_title") }));
    const clinics = await loadClinics();
    const list = h("div");
    const load = async () => {
      const page = await api("GET", "/v1/users?limit=1000");
      list.replaceChildren(
        table(
          [t("email"), t("name"), t("role"), t("clinic"), t("state"), t("actions")],
          page.records.map((u) => {
            const disabled = !!u.disabled_at;
            const actions = !ADMIN_ROLES.includes(u.role) || managesAdmins()
              ? [u.email === state.me.user ? null : disableButton(u, disabled, load), " ", resetButton(u)]
              : [h("span", { class: "muted", text: t("only_super_admin") })];
            return h(
              "tr",
              { "data-user": u.email },
              h("td", { text: u.email }),
              h("td", { text: u.name || "-" }),
              h("td", { text: u.role ? roleName(u.role) : "-" }),
              h("td", { text: (clinics.find((c) => c[0] === u.clinic_id) || [null, u.clinic_id || "-"])[1] }),
              h("td", {}, disabled ? h("span", { class: "bad", text: t("disabled") }) : h("span", { class: "ok", text: t("active") })),
              h("td", {}, actions),
            );
          }),
        ),
      );
    };
    const form = h(
      "form",
      { class: "inline", "aria-labelledby": "add-user-title" },
      field(t("email"), input("email", { type: "email", required: true, autocomplete: "off" })),
      field(t("name"), input("name", { required: true })),
      field(t("role"), select("role", STRINGS.roles.filter((r) => managesAdmins() || !ADMIN_ROLES.includes(r)).map((r) => [r, t("role_" + r)]))),
      field(t("clinic"), select("clinic_id", [["", t("no_clinic")], ...clinics])),
      field(t("password"), input("password", { type: "password", minlength: 8, required: true, autocomplete: "new-password" })),
      h("button", { type: "submit", text: t("add_user") }),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        await api("POST", "/v1/users", formValues(form));
        form.reset();
        await load();
      }, t("user_added"));
    });
    main.append(h("section", { class: "panel" }, list), h("section", { class: "panel" }, h("h2", { id: "add-user-title", text: t("add_user") }), form));
    await act(load);
  }
  // Only a super_admin makes or changes an admin (the node refuses the others).
  const ADMIN_ROLES = ["admin", "super_admin"];
  function managesAdmins() {
    return state.me.role === "super_admin";
  }
  // Disable a user (after a confirmation) or enable them again. Not offered on one's own
  // row: an admin who disabled themselves would be signed out at once.
  function disableButton(u, disabled, load) {
    return h("button", {
      type: "button",
      class: disabled ? "secondary" : "danger",
      "aria-label": t(disabled ? "enable_named" : "disable_named", { email: u.email }),
      text: t(disabled ? "enable" : "disable"),
      onclick: async () => {
        if (!disabled && !(await confirmDialog(t("disable_confirm", { email: u.email }), t("disable")))) return;
        await act(async () => {
          await api("PATCH", "/v1/users/" + u.id, { disabled_at: disabled ? null : new Date().toISOString() });
          await load();
        });
      },
    });
  }
  function resetButton(u) {
    return h("button", {
      type: "button",
      class: "secondary",
      "aria-label": t("reset_password_named", { email: u.email }),
      text: t("reset_password"),
      onclick: () => resetPassword(u),
    });
  }
  function resetPassword(user) {
    const password = input("password", { type: "password", minlength: 8, required: true, autocomplete: "new-password" });
    const form = h("form", { method: "dialog" },
      h("p", { text: t("reset_password_for", { email: user.email }) }),
      field(t("new_password"), password),
      h("div", { class: "form-row" },
        h("button", { type: "submit", value: "yes", text: t("reset_password") }),
        h("button", { type: "button", class: "secondary", onclick: () => dialog.close("no"), text: t("cancel") })));
    const dialog = h("dialog", { "aria-label": t("reset_password") }, form);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      act(async () => {
        await api("PATCH", "/v1/users/" + user.id, { password: password.value });
        dialog.close("yes");
      }, t("password_reset", { email: user.email }));
    });
    dialog.addEventListener("close", () => dialog.remove());
    document.body.append(dialog);
    dialog.showModal();
  }

  // ---- start ---------------------------------------------------------------------
  // After a move to another screen the focus goes to it, so a keyboard or screen-reader
  // user starts there.
  window.addEventListener("hashchange", async () => {
    notice("");
    await render();
    document.getElementById("main").focus({ preventScroll: true });
  });
  (async () => {
    if (state.token) {
      try { await loadMe(); } catch (err) { state.token = null; sessionStorage.removeItem("medmesh.token"); }
    }
    render();
  })();
})();
