//! The web console in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver), against `medmesh` processes on loopback. It signs in, sees
//! two peers connected, makes an invite (QR and text) that admits a device, revokes a
//! device and sees it disconnected, dispenses, restocks, counts and adjusts (and is told
//! when the API refuses) and sees the chart and the alerts change, resolves a conflict and
//! sees the value on the other node, adds a user, and checks that a registrar has no
//! pharmacy screen; on a tablet's and a phone's screen, right to left in Arabic, with
//! labels on every control, keyboard navigation and readable contrast. A new device's
//! sign-in page shows its initial sync; a gateway's health screen, its rounds with the
//! cloud.
//!
//! Screenshots of every screen are saved in `target/console-screenshots/` (not
//! committed) for a person to look at. The test needs `/usr/bin/chromium` and
//! `/usr/bin/chromedriver` (Debian's `chromium` and `chromium-driver`; `.ci/run`
//! installs them) and fails, saying so, without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use medmesh_tests::{Api, NodeProcess, eventually, free_port};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ADMIN: (&str, &str) = ("admin@clinic.test", "admin-password-1");
const REGISTRAR: (&str, &str) = ("registrar@clinic.test", "registrar-password-1");
/// The registrar's password after an admin resets it in the console.
const REGISTRAR_RESET: (&str, &str) = ("registrar@clinic.test", "registrar-password-2");
const CLINIC: &str = "0c1a1c00-0000-4000-8000-00000000c0de";

/// chromedriver, ended with the test.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: the console's browser tests need Debian's Chromium and its driver (`apt-get install chromium chromium-driver`; .ci/run installs them)"
        );
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

async fn screenshot(page: &Client, name: &str) {
    js(page, "window.scrollTo(0, 0); return true").await;
    let png = page.screenshot().await.expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("save screenshot");
}

/// Runs `script` (a function body returning a value) in the page.
async fn js(page: &Client, script: &str) -> Value {
    page.execute(script, vec![]).await.expect("run a script")
}

/// Waits until `script` returns true in the page.
async fn until(page: &Client, script: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if js(page, script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let notice = js(page, "return document.getElementById('notice').textContent").await;
            let main = js(page, "return document.getElementById('main').innerText").await;
            panic!("timed out waiting for {what}; notice: {notice}; page: {main}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(page: &Client, css: &str) {
    page.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("cannot click {css}: {e}"));
}

async fn type_into(page: &Client, css: &str, text: &str) {
    let field = page
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"));
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

/// Presses Tab; answers the attribute `property` of the control that has the focus then.
async fn tab(page: &Client, property: &str) -> Value {
    press(page, fantoccini::key::Key::Tab).await;
    js(page, &format!("return document.activeElement.{property}")).await
}

/// Presses `key` on the control that has the focus.
async fn press(page: &Client, key: fantoccini::key::Key) {
    page.active_element()
        .await
        .expect("focus")
        .send_keys(&char::from(key).to_string())
        .await
        .expect("press a key");
}

/// Opens `screen` with the keyboard alone: Tab from the top of the page to its link in
/// the navigation, then Enter.
async fn go_by_keyboard(page: &Client, screen: &str) {
    js(page, "document.activeElement.blur(); return true").await;
    let link = format!("#/{screen}");
    let mut reached = false;
    for _ in 0..20 {
        if tab(page, "getAttribute('href')").await == link.as_str() {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab does not reach the link to {screen}");
    press(page, fantoccini::key::Key::Enter).await;
    until(
        page,
        &format!("return location.hash === '{link}' && !!document.querySelector('main h1')"),
        screen,
    )
    .await;
}

async fn go(page: &Client, screen: &str) {
    click(page, &format!("header nav a[href='#/{screen}']")).await;
    until(
        page,
        &format!("return location.hash === '#/{screen}' && !!document.querySelector('main h1')"),
        screen,
    )
    .await;
}

async fn sign_in(page: &Client, base: &str, (email, password): (&str, &str)) {
    page.goto(base).await.expect("open the console");
    type_into(page, "input[name=email]", email).await;
    type_into(page, "input[name=password]", password).await;
    click(page, "form.signin button[type=submit]").await;
    until(
        page,
        "return !!document.querySelector('header nav')",
        "signed in",
    )
    .await;
}

/// What the page fails of the accessibility basics: a control without a label, a button
/// without a name, text whose contrast with its background is under 4.5:1.
async fn accessibility_faults(page: &Client) -> Value {
    js(
        page,
        r#"
        const faults = [];
        const visible = (el) => el.getClientRects().length > 0;
        for (const el of document.querySelectorAll("input, select, textarea")) {
          if (el.type === "hidden" || !visible(el)) continue;
          if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label")) faults.push("no label: " + el.outerHTML.slice(0, 80));
        }
        for (const el of document.querySelectorAll("button, a[href]")) {
          if (visible(el) && !el.textContent.trim() && !el.getAttribute("aria-label")) faults.push("no name: " + el.outerHTML.slice(0, 80));
        }
        const rgb = (text) => (text.match(/[\d.]+/g) || []).map(Number);
        const lum = ([r, g, b]) => {
          const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
          return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
        };
        const background = (el) => {
          for (let at = el; at; at = at.parentElement) {
            const c = rgb(getComputedStyle(at).backgroundColor);
            if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
          }
          return [255, 255, 255];
        };
        for (const el of document.querySelectorAll("body *")) {
          if (!visible(el) || el.closest("svg")) continue;
          const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
          if (!own) continue;
          const fg = lum(rgb(getComputedStyle(el).color));
          const bg = lum(background(el));
          const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
          if (ratio < 4.5) faults.push("contrast " + ratio.toFixed(2) + ": " + el.textContent.trim().slice(0, 40));
        }
        return faults;
        "#,
    )
    .await
}

async fn check_accessible(page: &Client, screen: &str) {
    let faults = accessibility_faults(page).await;
    assert_eq!(faults, json!([]), "accessibility faults on {screen}");
}

/// Fills the pharmacy's `operation` form for the test's clinic and drug with `fields`
/// and sends it; waits for the console to say it was done, or to show a refusal.
async fn stock_form(page: &Client, operation: &str, fields: &[(&str, &str)]) {
    let form = format!("form[data-operation={operation}]");
    page.find(Locator::Css(&format!("{form} select[name=clinic_id]")))
        .await
        .expect("clinic")
        .select_by_value(CLINIC)
        .await
        .expect("choose the clinic");
    type_into(
        page,
        &format!("{form} input[name=drug_name]"),
        "amoxicillin 250 mg capsules",
    )
    .await;
    for (name, value) in fields {
        let css = format!("{form} input[name={name}]");
        if name.ends_with("_date") {
            // A date field's typing follows the browser's locale; set its value instead.
            js(
                page,
                &format!("document.querySelector('{css}').value = '{value}'; return true"),
            )
            .await;
        } else {
            type_into(page, &css, value).await;
        }
    }
    js(
        page,
        "document.getElementById('notice').textContent = ''; return true",
    )
    .await;
    click(page, &format!("{form} button[type=submit]")).await;
    until(
        page,
        "return document.getElementById('notice').textContent !== ''",
        &format!("an answer to the {operation} form"),
    )
    .await;
}

/// Waits until the chart shows `level` as the item's level now.
async fn at_level(page: &Client, level: i64, when: &str) {
    until(
        page,
        &format!(
            "const p = document.querySelector('[data-level]'); return !!p && p.dataset.level === '{level}'"
        ),
        &format!("the chart at {level} {when}"),
    )
    .await;
}

async fn peer_id(api: &Api) -> String {
    let (_, status) = api.get("/v1/status").await.expect("status");
    status["peer_id"].as_str().expect("peer id").to_owned()
}

async fn connected(api: &Api, peer: &str) -> bool {
    let Ok((_, peers)) = api.get("/v1/peers").await else {
        return false;
    };
    peers["peers"].as_array().is_some_and(|list| {
        list.iter()
            .any(|p| p["peer_id"] == peer && p["connected"] == true)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_the_mesh_in_a_real_browser() {
    let driver = start_driver();
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db, dc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    medmesh_tests::init_node(&da);
    let a = NodeProcess::start(&da).expect("node a");
    let api_a = Api::new(&a.api);
    for (d, name) in [(&db, "tablet-b"), (&dc, "tablet-c")] {
        let invite = medmesh_tests::invite_device(&da, &["--kind", "tablet"]);
        let out = medmesh_tests::join_with_invite(d, &invite, name);
        assert!(out.status.success(), "{out:?}");
    }
    let b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");
    let c = NodeProcess::start_peered(&dc, std::slice::from_ref(&a.listen), None).expect("c");
    let (api_b, api_c) = (Api::new(&b.api), Api::new(&c.api));
    let (id_b, id_c) = (peer_id(&api_b).await, peer_id(&api_c).await);

    // The mesh's people, made through the API: the password is hashed by the node.
    let (code, admin) = api_a
        .post(
            "/v1/users",
            &json!({"email": ADMIN.0, "name": "Clinic admin", "role": "admin", "password": ADMIN.1}),
        )
        .await
        .expect("admin user");
    assert_eq!(code, 201, "{admin}");
    assert_eq!(admin["hashed_password"], "************", "{admin}");
    let (code, _) = api_a
        .post(
            "/v1/clinics",
            &json!({"id": CLINIC, "name": "Hillside clinic"}),
        )
        .await
        .expect("clinic");
    assert_eq!(code, 201);
    let (code, restocked) = api_a
        .post(
            "/v1/pharmacy/restock",
            &json!({"clinic_id": CLINIC, "drug_name": "Amoxicillin 250mg capsules", "batch_number": "AMX-1",
                    "expiry_date": "2030-06-30", "quantity": 20, "reorder_level": 10}),
        )
        .await
        .expect("restock");
    assert_eq!(code, 200, "{restocked}");
    let (code, patient) = api_a
        .post(
            "/v1/patients",
            &json!({"given_name": "Amina", "surname": "Diallo", "sex": "female"}),
        )
        .await
        .expect("patient");
    assert_eq!(code, 201);
    let patient_id = patient["id"].as_str().expect("id").to_owned();
    eventually(
        Duration::from_secs(30),
        "b and c connected to a",
        async || connected(&api_a, &id_b).await && connected(&api_a, &id_c).await,
    )
    .await
    .expect("peers");

    let profile = tempfile::tempdir().expect("profile");
    let page = browser(&driver, profile.path()).await;
    let base = a.url("/");

    // Sign-in: labelled, reachable by keyboard (Tab from the email to the password to
    // the button).
    page.goto(&base).await.expect("open the console");
    until(
        &page,
        "return document.activeElement && document.activeElement.name === 'email'",
        "the email field focused",
    )
    .await;
    check_accessible(&page, "sign-in").await;
    screenshot(&page, "01-sign-in").await;
    assert_eq!(tab(&page, "name").await, "password");
    assert_eq!(tab(&page, "type").await, "submit");
    sign_in(&page, &base, ADMIN).await;

    // Mesh health: both peers connected, live (the page refreshes itself).
    until(
        &page,
        &format!(
            "const row = (id) => document.querySelector(`tr[data-peer='${{id}}']`);
             return ['{id_b}', '{id_c}'].every((id) => row(id) && row(id).querySelector('.ok'))"
        ),
        "two peers connected on the health screen",
    )
    .await;
    check_accessible(&page, "health").await;
    screenshot(&page, "02-health").await;
    // Live: a record written on B shows in A's count without a reload.
    let before = js(&page, "window.notReloaded = true; return Number(document.querySelector('[data-total]').dataset.total)").await;
    let (code, _) = api_b
        .post(
            "/v1/patients",
            &json!({"given_name": "Live", "surname": "Update"}),
        )
        .await
        .expect("write on b");
    assert_eq!(code, 201);
    until(
        &page,
        &format!("return window.notReloaded === true && Number(document.querySelector('[data-total]').dataset.total) > {before}"),
        "the health screen to refresh itself",
    )
    .await;

    // Devices: an invite as a QR code and as text, which admits a real device.
    go(&page, "devices").await;
    click(&page, "form button[type=submit]").await;
    until(&page, "return !!document.querySelector('.qr img') && document.querySelector('textarea[name=invite]').value.startsWith('medmesh-invite-')", "the invite").await;
    let qr = js(
        &page,
        "return document.querySelector('.qr img').naturalWidth",
    )
    .await;
    assert!(
        qr.as_u64().unwrap_or(0) >= 256,
        "the QR code is drawn: {qr}"
    );
    check_accessible(&page, "devices").await;
    screenshot(&page, "03-devices-invite").await;
    let invite = js(
        &page,
        "return document.querySelector('textarea[name=invite]').value",
    )
    .await;
    // Only an admin device invites, and a wrong kind is named.
    let (code, refused) = api_b
        .post("/v1/invites", &json!({}))
        .await
        .expect("invite on b");
    assert_eq!(
        (code, refused["error"]["code"].clone()),
        (403, json!("not_admin_device")),
        "{refused}"
    );
    let (code, refused) = api_a
        .post("/v1/invites", &json!({"kind": "printer"}))
        .await
        .expect("bad kind");
    assert_eq!(
        (code, refused["error"]["field"].clone()),
        (400, json!("kind")),
        "{refused}"
    );
    let dd = dir.path().join("d");
    let out = medmesh_tests::join_with_invite(&dd, invite.as_str().expect("invite"), "tablet-d");
    assert!(
        out.status.success(),
        "the console's invite admits a device: {out:?}"
    );

    // By keyboard: Enter on Revoke opens the confirmation with the focus inside it, and
    // Escape cancels it; nothing is revoked.
    let revoke = format!("tr[data-peer='{id_c}'] button.danger");
    js(
        &page,
        &format!("document.querySelector(\"{revoke}\").focus(); return true"),
    )
    .await;
    press(&page, fantoccini::key::Key::Enter).await;
    until(
        &page,
        "const d = document.querySelector('dialog[open]'); return !!d && d.contains(document.activeElement)",
        "the confirmation, holding the focus",
    )
    .await;
    press(&page, fantoccini::key::Key::Escape).await;
    until(
        &page,
        "return !document.querySelector('dialog')",
        "the confirmation closed by Escape",
    )
    .await;
    // (A request the page would have sent has landed by then.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, devices) = api_a.get("/v1/devices").await.expect("devices");
    let c_revoked = devices["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|d| d["peer_id"] == id_c.as_str()))
        .map(|d| d["revoked"].clone());
    assert_eq!(
        c_revoked,
        Some(Value::Null),
        "a cancelled revocation revoked nothing: {devices}"
    );

    // Revoke tablet C, confirmed in a dialog; the health screen shows it disconnected.
    click(&page, &revoke).await;
    until(
        &page,
        "return !!document.querySelector('dialog[open]')",
        "the confirmation",
    )
    .await;
    screenshot(&page, "04-devices-revoke-confirm").await;
    click(&page, "dialog[open] button.danger").await;
    until(
        &page,
        &format!("const row = document.querySelector(`tr[data-peer='{id_c}']`); return !!row && row.innerText.includes('revoked')"),
        "tablet C revoked",
    )
    .await;
    // The button used is gone with the list drawn again: the focus is on what happened
    // or on the screen, not lost to the top of the page.
    until(
        &page,
        "return ['notice', 'main'].includes(document.activeElement.id)",
        "the focus after the revocation",
    )
    .await;
    go(&page, "health").await;
    until(
        &page,
        // Once the screen is drawn (the node's panel is there): C is gone from the peers or
        // shown disconnected.
        &format!("const row = document.querySelector(`tr[data-peer='{id_c}']`);
                  return !!document.querySelector('[data-total]') && (!row || !!row.querySelector('.bad'))"),
        "tablet C disconnected on the health screen",
    )
    .await;
    assert!(
        !connected(&api_a, &id_c).await,
        "a still talks to the revoked device"
    );
    screenshot(&page, "05-health-after-revoke").await;

    // Pharmacy, reached by keyboard (Tab to its link, Enter): the chart of the item, then
    // a dispense; the chart and the alerts change.
    go_by_keyboard(&page, "pharmacy").await;
    until(
        &page,
        "return !!document.querySelector('tr[data-item] button')",
        "the stock table",
    )
    .await;
    assert_eq!(
        js(
            &page,
            "return document.querySelector('[data-alert=low_stock] span').className"
        )
        .await,
        "muted",
        "no low-stock alert before the dispense"
    );
    click(&page, "tr[data-item] button").await;
    until(
        &page,
        "const p = document.querySelector('[data-level]'); return !!p && p.dataset.level === '20'",
        "the chart at 20",
    )
    .await;
    stock_form(&page, "dispense", &[("quantity", "15")]).await;
    at_level(&page, 5, "after the dispense").await;
    until(
        &page,
        "return document.querySelector('[data-alert=low_stock] span').className === 'warn'",
        "a low-stock alert",
    )
    .await;
    let points = js(
        &page,
        "return Number(document.querySelector('svg.chart').dataset.points)",
    )
    .await;
    assert_eq!(
        points, 2,
        "the chart has a point per movement (restock, dispense)"
    );
    let (_, stock) = api_a
        .get(&format!("/v1/pharmacy/stock?clinic_id={CLINIC}"))
        .await
        .expect("stock");
    assert_eq!(stock["items"][0]["quantity"], 5, "{stock}");
    check_accessible(&page, "pharmacy").await;
    screenshot(&page, "06-pharmacy").await;

    // The other forms, with the API's rules: a restock, a count, an adjustment of 0
    // refused with the field named (nothing changes), and one that is taken. The chart
    // follows each movement, and the low-stock alert goes once the level is above 10.
    let batch = [("batch_number", "AMX-1")];
    stock_form(
        &page,
        "restock",
        &[batch[0], ("expiry_date", "2030-06-30"), ("quantity", "25")],
    )
    .await;
    at_level(&page, 30, "after the restock").await;
    stock_form(&page, "count", &[batch[0], ("counted_quantity", "28")]).await;
    at_level(&page, 28, "after the count").await;
    stock_form(
        &page,
        "adjust",
        &[batch[0], ("quantity_change", "0"), ("reason", "none")],
    )
    .await;
    until(
        &page,
        "return /cannot be 0 \\(quantity_change\\)/.test(document.getElementById('notice').textContent)",
        "the refusal of an adjustment of 0, naming the field",
    )
    .await;
    stock_form(
        &page,
        "adjust",
        &[
            batch[0],
            ("quantity_change", "-3"),
            ("reason", "broken bottle"),
        ],
    )
    .await;
    at_level(&page, 25, "after the adjustment").await;
    until(
        &page,
        "return document.querySelector('[data-alert=low_stock] span').className === 'muted'
            && Number(document.querySelector('svg.chart').dataset.points) === 5",
        "five points on the chart and no low-stock alert",
    )
    .await;
    let (_, stock) = api_a
        .get(&format!("/v1/pharmacy/stock?clinic_id={CLINIC}"))
        .await
        .expect("stock");
    assert_eq!(stock["items"][0]["quantity"], 25, "{stock}");
    check_accessible(&page, "pharmacy forms").await;
    screenshot(&page, "06b-pharmacy-forms").await;
    // Dispensing more than the records show is done, and the pharmacist is warned: the
    // level goes below zero, with a negative-stock alert, until a count puts it right.
    stock_form(
        &page,
        "dispense",
        &[("quantity", "30"), ("batch_number", "")],
    )
    .await;
    at_level(&page, -5, "after dispensing more than the records show").await;
    until(
        &page,
        "const n = document.getElementById('notice');
         return n.className === 'warn' && /Count the shelf/.test(n.textContent)
           && document.querySelector('[data-alert=negative_stock] span').className !== 'muted'",
        "the warning and the negative-stock alert",
    )
    .await;
    check_accessible(&page, "pharmacy with a warning").await;
    screenshot(&page, "06c-pharmacy-negative").await;
    stock_form(&page, "count", &[batch[0], ("counted_quantity", "25")]).await;
    at_level(&page, 25, "after the count").await;

    // Records: a conflict made by two nodes apart, resolved in the console on A, and the
    // chosen value on B.
    eventually(Duration::from_secs(30), "the patient on b", async || {
        matches!(
            api_b.get(&format!("/v1/patients/{patient_id}")).await,
            Ok((200, _))
        )
    })
    .await
    .expect("patient on b");
    let (code, _) = api_a
        .delete(&format!("/v1/peers/{id_b}"))
        .await
        .expect("forget");
    assert_eq!(code, 200);
    let (code, _) = api_b
        .delete(&format!("/v1/peers/{}", peer_id(&api_a).await))
        .await
        .expect("forget");
    assert_eq!(code, 200);
    eventually(Duration::from_secs(30), "a and b apart", async || {
        !connected(&api_a, &id_b).await
    })
    .await
    .expect("apart");
    let path = format!("/v1/patients/{patient_id}");
    api_a
        .patch(&path, &json!({"hometown": "Kati", "phone": "111"}))
        .await
        .expect("edit on a");
    api_b
        .patch(&path, &json!({"hometown": "Kita", "phone": "222"}))
        .await
        .expect("edit on b");
    let (code, _) = api_a
        .post("/v1/peers", &json!({"addr": b.listen}))
        .await
        .expect("reconnect");
    assert_eq!(code, 202);
    eventually(Duration::from_secs(30), "the conflict on a", async || {
        let Ok((_, c)) = api_a.get(&format!("{path}/conflicts")).await else {
            return false;
        };
        c["conflicts"].as_array().is_some_and(|l| l.len() >= 2)
    })
    .await
    .expect("conflict");
    let (_, conflicts) = api_a
        .get(&format!("{path}/conflicts"))
        .await
        .expect("conflicts");
    let conflict = |field: &str| {
        conflicts["conflicts"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["field"] == field))
            .cloned()
            .unwrap_or_else(|| panic!("no conflict on {field}: {conflicts}"))
    };
    let (hometown, phone) = (conflict("hometown"), conflict("phone"));
    let shown = hometown["value"].as_str().expect("value").to_owned();
    let chosen = if shown == "Kati" { "Kita" } else { "Kati" };
    // The phone is kept as shown: choosing the value shown also settles a conflict.
    let phone_kept = phone["value"].as_str().expect("value").to_owned();
    go(&page, "records").await;
    // Two words: the start of the given name and of the surname.
    type_into(&page, "form[role=search] input[name=name]", "ami dia").await;
    click(&page, "form[role=search] button[type=submit]").await;
    click(&page, "main table button.secondary").await;
    until(
        &page,
        "return !!document.querySelector('form[data-conflict=hometown]')",
        "the conflict on the record",
    )
    .await;
    until(
        &page,
        "return document.querySelectorAll('[data-record] table tbody tr').length >= 3",
        "the record's history",
    )
    .await;
    check_accessible(&page, "records").await;
    screenshot(&page, "07-records-conflict").await;
    let offered = |conflict: &Value, value: &str| {
        conflict["values"]
            .as_array()
            .and_then(|l| l.iter().position(|v| v == value))
            .expect("the chosen value is offered")
    };
    let index = offered(&phone, &phone_kept);
    click(&page, &format!("#conflict-phone-{index}")).await;
    click(&page, "form[data-conflict=phone] button[type=submit]").await;
    until(
        &page,
        "return !document.querySelector('form[data-conflict=phone]') && !!document.querySelector('form[data-conflict=hometown]')",
        "the phone's conflict settled, the hometown's still open",
    )
    .await;
    let index = offered(&hometown, chosen);
    click(&page, &format!("#conflict-hometown-{index}")).await;
    click(&page, "form[data-conflict=hometown] button[type=submit]").await;
    until(&page, &format!("const d = document.querySelector('[data-field=hometown]'); return !!d && d.textContent === '{chosen}' && !document.querySelector('form[data-conflict]')"), "the conflict resolved").await;
    screenshot(&page, "08-records-resolved").await;
    eventually(
        Duration::from_secs(30),
        "the chosen value on b",
        async || {
            let Ok((_, record)) = api_b.get(&path).await else {
                return false;
            };
            let Ok((_, c)) = api_b.get(&format!("{path}/conflicts")).await else {
                return false;
            };
            record["hometown"] == chosen
                && record["phone"] == phone_kept.as_str()
                && c["conflicts"] == json!([])
        },
    )
    .await
    .expect("resolved on b");

    // Users: an admin adds a registrar through the form.
    go(&page, "users").await;
    let form = "form[aria-labelledby=add-user-title]";
    type_into(&page, &format!("{form} input[name=email]"), REGISTRAR.0).await;
    type_into(&page, &format!("{form} input[name=name]"), "Front desk").await;
    page.find(Locator::Css(&format!("{form} select[name=role]")))
        .await
        .expect("role")
        .select_by_value("registrar")
        .await
        .expect("choose the role");
    type_into(&page, &format!("{form} input[name=password]"), REGISTRAR.1).await;
    click(&page, &format!("{form} button[type=submit]")).await;
    until(
        &page,
        &format!(
            "return !!document.querySelector(`tr[data-user='{}']`)",
            REGISTRAR.0
        ),
        "the new user listed",
    )
    .await;
    check_accessible(&page, "users").await;
    screenshot(&page, "09-users").await;
    // The admin resets the new user's password in a dialog.
    let row = format!("tr[data-user='{}']", REGISTRAR.0);
    click(&page, &format!("{row} button[aria-label^='Reset']")).await;
    type_into(
        &page,
        "dialog[open] input[name=password]",
        REGISTRAR_RESET.1,
    )
    .await;
    check_accessible(&page, "reset password").await;
    click(&page, "dialog[open] button[type=submit]").await;
    until(&page, "return !document.querySelector('dialog[open]') && document.getElementById('notice').className === 'info'", "the password reset").await;

    // Right to left in Arabic, then back; what was typed in a form stays.
    let half_typed = "form[aria-labelledby=add-user-title] input[name=name]";
    type_into(&page, half_typed, "Half typed").await;
    page.find(Locator::Css("header select[name=lang]"))
        .await
        .expect("language")
        .select_by_value("ar")
        .await
        .expect("arabic");
    until(
        &page,
        "return document.documentElement.dir === 'rtl'",
        "right to left",
    )
    .await;
    until(
        &page,
        &format!("const f = document.querySelector('{half_typed}'); return !!f && f.value === 'Half typed'"),
        "the form's text kept in another language",
    )
    .await;
    until(
        &page,
        "return document.documentElement.scrollWidth <= window.innerWidth + 1",
        "the page fits its screen right to left",
    )
    .await;
    screenshot(&page, "10-users-arabic").await;
    page.find(Locator::Css("header select[name=lang]"))
        .await
        .expect("language")
        .select_by_value("en")
        .await
        .expect("english");

    // A phone-sized screen: nothing wider than the screen but the tables' own scroll.
    page.set_window_size(390, 844).await.expect("phone size");
    go(&page, "health").await;
    until(
        &page,
        "return document.documentElement.scrollWidth <= window.innerWidth + 1",
        "the page fits a phone",
    )
    .await;
    screenshot(&page, "11-health-phone").await;
    page.set_window_size(1280, 800).await.expect("tablet size");

    // The registrar (signed in with the password typed into the form) has no pharmacy.
    click(&page, "header button.secondary").await;
    until(
        &page,
        "return !!document.querySelector('form.signin')",
        "signed out",
    )
    .await;
    sign_in(&page, &base, REGISTRAR_RESET).await;
    let screens = js(
        &page,
        "return [...document.querySelectorAll('header nav a')].map((a) => a.getAttribute('href'))",
    )
    .await;
    assert_eq!(
        screens,
        json!(["#/health", "#/records"]),
        "a registrar's screens"
    );
    page.goto(&format!("{base}#/pharmacy"))
        .await
        .expect("pharmacy by address");
    until(
        &page,
        "return !!document.querySelector('main h1')",
        "a screen",
    )
    .await;
    assert_ne!(
        js(
            &page,
            "return document.querySelector('main h1').textContent"
        )
        .await,
        "Pharmacy"
    );
    let token = js(&page, "return sessionStorage.getItem('medmesh.token')").await;
    let refused = reqwest::Client::new()
        .get(a.url("/v1/pharmacy/stock"))
        .bearer_auth(token.as_str().expect("token"))
        .send()
        .await
        .expect("stock as the registrar");
    assert_eq!(
        refused.status().as_u16(),
        403,
        "the node refuses a registrar the stock"
    );
    screenshot(&page, "12-registrar").await;

    // Disabled by the admin, the registrar can no longer sign in, and is told why.
    click(&page, "header button.secondary").await;
    sign_in(&page, &base, ADMIN).await;
    go(&page, "users").await;
    click(&page, &format!("{row} button.danger")).await;
    click(&page, "dialog[open] button.danger").await;
    until(
        &page,
        &format!(
            "const r = document.querySelector(`{row}`); return !!r && !!r.querySelector('.bad')"
        ),
        "the registrar disabled",
    )
    .await;
    click(&page, "header button.secondary").await;
    page.goto(&base).await.expect("open the console");
    type_into(&page, "input[name=email]", REGISTRAR_RESET.0).await;
    type_into(&page, "input[name=password]", REGISTRAR_RESET.1).await;
    click(&page, "form.signin button[type=submit]").await;
    until(
        &page,
        "return document.getElementById('notice').textContent.includes('disabled')",
        "the refusal naming the reason",
    )
    .await;
    screenshot(&page, "13-disabled-user-refused").await;

    // Everything the page loaded came from the node itself (it works with no internet).
    let foreign = js(&page, "return performance.getEntriesByType('resource').map((r) => r.name).filter((n) => !n.startsWith(location.origin))").await;
    assert_eq!(foreign, json!([]), "the console loads only from the node");

    page.close().await.expect("close the browser");
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_console_shows_its_rounds_with_the_cloud() {
    let driver = start_driver();
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = medmesh_tests::cloud::Cloud::new();
    let (url, key_file) = cloud
        .serve_with_clinic(dir.path(), CLINIC, "Hillside clinic")
        .await
        .expect("cloud");
    let dg = dir.path().join("gateway");
    medmesh_tests::init_node(&dg);
    let gateway = NodeProcess::start_gateway(&dg, &url, &key_file, &[], "1").expect("gateway node");
    let api = Api::new(&gateway.api);
    let (code, _) = api
        .post(
            "/v1/users",
            &json!({"email": ADMIN.0, "name": "Clinic admin", "role": "admin", "password": ADMIN.1}),
        )
        .await
        .expect("admin user");
    assert_eq!(code, 201);

    let profile = tempfile::tempdir().expect("profile");
    let page = browser(&driver, profile.path()).await;
    let base = gateway.url("/");
    sign_in(&page, &base, ADMIN).await;
    until(
        &page,
        "const b = document.querySelector('[data-backlog]'); return !!b && b.dataset.backlog === '0'",
        "the gateway panel with nothing waiting for the cloud",
    )
    .await;
    // A record made here reaches the cloud; the panel shows the push and an empty backlog.
    let (code, _) = api
        .post(
            "/v1/patients",
            &json!({"given_name": "Cloudward", "primary_clinic_id": CLINIC}),
        )
        .await
        .expect("patient");
    assert_eq!(code, 201);
    eventually(
        Duration::from_secs(30),
        "the patient in the cloud",
        async || {
            cloud
                .rows("patients")
                .iter()
                .any(|p| p.get("given_name") == Some(&json!("Cloudward")))
        },
    )
    .await
    .expect("pushed");
    until(
        &page,
        "const panel = document.querySelector('[aria-labelledby=gateway-title]');
         const text = panel ? panel.innerText : '';
         return document.querySelector('[data-backlog]').dataset.backlog === '0'
           && !/Last pull\\s*never/.test(text) && !/Last push\\s*never/.test(text)",
        "the last pull and push on the panel",
    )
    .await;
    check_accessible(&page, "health of a gateway").await;
    screenshot(&page, "14-gateway-health").await;
    page.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_devices_sign_in_page_shows_its_initial_sync() {
    let driver = start_driver();
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    medmesh_tests::init_node(&da);
    medmesh_tests::join_mesh(&da, &db).expect("join");
    let a = NodeProcess::start_peered(&da, &[], None).expect("a");
    let (code, _) = Api::new(&a.api)
        .post(
            "/v1/users",
            &json!({"email": ADMIN.0, "name": "Clinic admin", "role": "admin", "password": ADMIN.1}),
        )
        .await
        .expect("admin user");
    assert_eq!(code, 201);
    let total = 20_000;
    medmesh_tests::import_patients(&medmesh_tests::http(), &a, 0..total)
        .await
        .expect("import");
    // The browser is up before the new device starts, so its sync cannot be over before
    // the page is open.
    let profile = tempfile::tempdir().expect("profile");
    let page = browser(&driver, profile.path()).await;
    let b = NodeProcess::start_peered(&db, std::slice::from_ref(&a.listen), None).expect("b");

    // The new device's console, before anyone can sign in there: how far it has come.
    let base = b.url("/");
    page.goto(&base).await.expect("open the console");
    until(
        &page,
        "const bar = document.querySelector('section.receiving:not([hidden]) progress');
         return !!bar && bar.value > 0 && bar.value < bar.max && bar.max >= 20000",
        "the initial sync's progress on the sign-in page",
    )
    .await;
    check_accessible(&page, "sign-in during an initial sync").await;
    screenshot(&page, "15-sign-in-during-initial-sync").await;

    // Once the sync is done the progress goes, and the mesh's admin signs in here.
    let deadline = Instant::now() + Duration::from_secs(120);
    while js(
        &page,
        "return document.querySelector('section.receiving').hidden",
    )
    .await
        != Value::Bool(true)
    {
        assert!(
            Instant::now() < deadline,
            "the initial sync did not finish in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sign_in(&page, &base, ADMIN).await;
    until(
        &page,
        &format!(
            "const t = document.querySelector('[data-total]'); return !!t && Number(t.dataset.total) >= {total}"
        ),
        "every record on the new device's health screen",
    )
    .await;
    page.close().await.expect("close the browser");
}
