//! The command line's side of the API: `medmesh put | get | list | delete | history |
//! status | import | export` against a running node.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::config::ApiArgs;

/// Records sent per import request.
pub const IMPORT_BATCH: usize = 1000;
/// Import requests in flight at once: the node works out one batch while it stores the
/// previous one.
const IMPORT_IN_FLIGHT: usize = 2;
/// Refusal reasons printed after an import (all are counted).
const IMPORT_REASONS_SHOWN: usize = 20;

/// A connection to a running node's API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for the node at `api` (`host:port` or a URL).
    pub fn new(api: &ApiArgs) -> Result<Self> {
        let base = if api.api.starts_with("http://") || api.api.starts_with("https://") {
            api.api.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", api.api)
        };
        let dir = api
            .data
            .clone()
            .unwrap_or_else(crate::config::default_data_dir);
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(300));
        // The node's own certificate is trusted when its data directory is at hand.
        if let Ok(pem) = std::fs::read(dir.join(crate::tls::CERT_FILE)) {
            let cert = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!(
                    "{} is not a certificate",
                    dir.join(crate::tls::CERT_FILE).display()
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().context("cannot set up the HTTP client")?;
        // The node's own token goes only to this device's node, or over HTTPS.
        let near = base.starts_with("https://")
            || reqwest::Url::parse(&base)
                .ok()
                .and_then(|url| url.host_str().map(str::to_owned))
                .is_some_and(|host| {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    host == "localhost"
                        || host
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                });
        let token = match &api.token {
            Some(token) => Some(token.trim().to_owned()),
            None if near => crate::access::tokens::read_api_token(&dir)?,
            None => None,
        };
        Ok(Self { http, base, token })
    }

    /// Sends a request; answers the JSON body of a success, or an error that says what
    /// the node said.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let method_has_body = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        match body {
            Some(body) => request = request.json(body),
            // The node takes only JSON bodies, also an empty one.
            None if method_has_body => request = request.json(&json!({})),
            None => {}
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach a medmesh node at {}: is it running? Start one with `medmesh start`, or point to it with --api",
                    self.base
                )
            } else {
                anyhow!("the request to {} failed: {e}", self.base)
            }
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("the node's answer was cut off")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok((status, value))
        } else if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            bail!(
                "the node asks for a credential and none was found: run this on the node's device as the user that runs the node (the token is in its data directory; give that directory with --data), or give a token with --token or MEDMESH_TOKEN"
            )
        } else {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            bail!("{message} (HTTP {})", status.as_u16())
        }
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn read_json_arg(json: &str) -> Result<Value> {
    let text = if json == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the record from standard input")?;
        text
    } else {
        json.to_owned()
    };
    let value: Value = serde_json::from_str(&text).context("the record is not valid JSON")?;
    if !value.is_object() {
        bail!("the record must be a JSON object like {{\"given_name\": \"Amina\"}}");
    }
    Ok(value)
}

/// `medmesh status`
pub async fn status(api: &ApiArgs) -> Result<()> {
    let client = Client::new(api)?;
    let (_, status) = client.call(Method::GET, "/v1/status", None).await?;
    println!("Node:     {}", status["peer_id"].as_str().unwrap_or("?"));
    println!("Data:     {}", status["data_dir"].as_str().unwrap_or("?"));
    if let Some(protection) = status["encryption"].as_str() {
        println!("At rest:  {protection}");
    }
    if let Some(fingerprint) = status["https"]["fingerprint"].as_str() {
        println!("HTTPS:    certificate fingerprint (SHA-256) {fingerprint}");
        println!("          a device connecting to this node should see exactly this fingerprint:");
        if let Ok(code) = qrcode::QrCode::new(fingerprint.as_bytes()) {
            println!(
                "{}",
                code.render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build()
            );
        }
    }
    println!("Records:  {}", status["total_records"]);
    if let Some(counts) = status["records"].as_object() {
        for (collection, n) in counts {
            if n.as_u64().unwrap_or(0) > 0 {
                println!("  {collection:<32} {n}");
            }
        }
    }
    println!("Changes:  {} (feed position)", status["feed"]["seq"]);
    let held = status["held"]["total"].as_u64().unwrap_or(0);
    if held > 0 {
        println!(
            "Held:     {held} document(s) from other devices could not be merged here; they are kept and retried:"
        );
        for doc in status["held"]["documents"].as_array().into_iter().flatten() {
            println!(
                "  {} ({}) from {}: {}",
                doc["id"].as_str().unwrap_or("?"),
                doc["collection"].as_str().unwrap_or("?"),
                doc["from"].as_str().unwrap_or("?"),
                doc["reason"].as_str().unwrap_or("?"),
            );
        }
    }
    if status["mesh"].is_object() {
        let mesh = &status["mesh"];
        let device = &mesh["device"];
        if device.is_object() {
            println!(
                "Device:   {} ({}{}){}",
                device["name"].as_str().unwrap_or("?"),
                device["kind"].as_str().unwrap_or("?"),
                if device["admin"] == json!(true) {
                    ", holds the owner key: can invite and revoke"
                } else {
                    ""
                },
                device["expires_at"]
                    .as_str()
                    .map(|at| format!("; certificate valid until {at}"))
                    .unwrap_or_default()
            );
        }
        println!(
            "Mesh:     {}  {} peer(s) connected of {} known; waiting: {} in, {} out; oldest sync {}",
            mesh["fingerprint"].as_str().unwrap_or("?"),
            mesh["peers_connected"],
            mesh["peers_known"],
            mesh["pending_in"],
            mesh["pending_out"],
            mesh["oldest_last_sync"].as_str().unwrap_or("-"),
        );
        if let Some(serves) = device["serves"].as_str() {
            println!("Clinics:  this device holds the records of {serves}");
        }
        let purged = mesh["purge"]["purged_since_start"].as_u64().unwrap_or(0);
        let kept = mesh["purge"]["report"]["kept"].as_u64().unwrap_or(0);
        if purged > 0 || kept > 0 {
            println!(
                "          {purged} record(s) of other clinics removed since the start; {kept} kept until a device that serves their clinic holds them"
            );
        }
        print_unreached(&mesh["unreached_clinics"]);
    }
    if status["gateway"].as_bool() == Some(true) {
        let (_, gateway) = client.call(Method::GET, "/v1/gateway", None).await?;
        print_gateway(&gateway);
    }
    Ok(())
}

fn print_gateway(gateway: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("never").to_owned();
    println!("Gateway:  to {}", text(&gateway["cloud"]));
    println!("  last pull:  {}", text(&gateway["last_pull_at"]));
    println!("  last push:  {}", text(&gateway["last_push_at"]));
    println!(
        "  backlog:    {} change(s) of the mesh not yet in the cloud",
        gateway["backlog"]
    );
    if gateway["stock_gateway"].as_bool() == Some(true) {
        println!("  stock:      this gateway brings the cloud's stock changes into the mesh");
    }
    if let Some(error) = gateway["last_error"].as_str() {
        println!("  problem:    {error}");
    }
    for item in gateway["stock_differences"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  stock item {}: {} here, {} in the cloud (restocks or counts made in the mesh do not reach the cloud: enter them there)",
            item["stock_item_id"].as_str().unwrap_or("?"),
            item["mesh"],
            item["cloud"],
        );
    }
    for refused in gateway["refused"].as_array().into_iter().flatten() {
        println!(
            "  refused by the cloud: {} {}: {}",
            refused["collection"].as_str().unwrap_or("?"),
            refused["id"].as_str().unwrap_or("?"),
            refused["error"].as_str().unwrap_or("?"),
        );
    }
}

/// `medmesh put COLLECTION JSON`
pub async fn put(api: &ApiArgs, collection: &str, json: &str) -> Result<()> {
    let client = Client::new(api)?;
    let record = read_json_arg(json)?;
    let existing = match record["id"].as_str() {
        Some(id) => client
            .call(Method::GET, &format!("/v1/{collection}/{id}"), None)
            .await
            .ok()
            .map(|_| id.to_owned()),
        None => None,
    };
    let (_, answer) = match existing {
        Some(id) => {
            client
                .call(
                    Method::PUT,
                    &format!("/v1/{collection}/{id}"),
                    Some(&record),
                )
                .await?
        }
        None => {
            client
                .call(Method::POST, &format!("/v1/{collection}"), Some(&record))
                .await?
        }
    };
    print_json(&answer);
    Ok(())
}

/// `medmesh get COLLECTION ID`
pub async fn get(api: &ApiArgs, collection: &str, id: &str) -> Result<()> {
    let client = Client::new(api)?;
    let (_, record) = client
        .call(Method::GET, &format!("/v1/{collection}/{id}"), None)
        .await?;
    print_json(&record);
    Ok(())
}

/// `medmesh delete COLLECTION ID`
pub async fn delete(api: &ApiArgs, collection: &str, id: &str) -> Result<()> {
    let client = Client::new(api)?;
    client
        .call(Method::DELETE, &format!("/v1/{collection}/{id}"), None)
        .await?;
    println!(
        "Deleted {collection}/{id} (kept as a tombstone so the deletion reaches other devices)."
    );
    Ok(())
}

/// `medmesh history COLLECTION ID`
pub async fn history(api: &ApiArgs, collection: &str, id: &str) -> Result<()> {
    let client = Client::new(api)?;
    let (_, answer) = client
        .call(Method::GET, &format!("/v1/{collection}/{id}/history"), None)
        .await?;
    for change in answer["changes"].as_array().into_iter().flatten() {
        let fields: Vec<&str> = change["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let device = match (change["device"].as_str(), change["signature"].as_str()) {
            (Some(device), Some("vouched")) => format!("{device} (vouched for it)"),
            (Some(device), _) => device.to_owned(),
            (None, _) => "? (not signed: made here before signed changes)".to_owned(),
        };
        println!(
            "{}  device {}  user {}  changed: {}",
            change["time"].as_str().unwrap_or("?"),
            device,
            change["user"].as_str().unwrap_or("-"),
            fields.join(", ")
        );
    }
    Ok(())
}

fn encode(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'*' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// Pages through a collection, calling `each` per record.
async fn for_each_record(
    client: &Client,
    collection: &str,
    filters: &[String],
    include_deleted: bool,
    max: Option<usize>,
    mut each: impl FnMut(&Value) -> Result<()>,
) -> Result<usize> {
    let mut params = String::new();
    for filter in filters {
        let (field, value) = filter.split_once('=').ok_or_else(|| {
            anyhow!("`{filter}` is not a filter: write field=value, e.g. surname=Okafor")
        })?;
        params.push_str(&format!("&{}={}", encode(field), encode(value)));
    }
    if include_deleted {
        params.push_str("&include_deleted=true");
    }
    let mut cursor: Option<String> = None;
    let mut seen = 0;
    loop {
        let page_size = max.map_or(1000, |m| (m - seen).clamp(1, 1000));
        let mut path = format!("/v1/{collection}?limit={page_size}{params}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (_, page) = client.call(Method::GET, &path, None).await?;
        for record in page["records"].as_array().into_iter().flatten() {
            each(record)?;
            seen += 1;
        }
        for unreadable in page["unreadable"].as_array().into_iter().flatten() {
            eprintln!(
                "warning: record {} could not be read: {}",
                unreadable["id"].as_str().unwrap_or("?"),
                unreadable["error"].as_str().unwrap_or("?")
            );
        }
        match page["next"].as_str() {
            Some(next) if max.is_none_or(|m| seen < m) => cursor = Some(next.to_owned()),
            _ => return Ok(seen),
        }
    }
}

/// `medmesh list COLLECTION [--where f=v]...`
pub async fn list(
    api: &ApiArgs,
    collection: &str,
    filters: &[String],
    limit: usize,
    include_deleted: bool,
) -> Result<()> {
    let client = Client::new(api)?;
    let n = for_each_record(
        &client,
        collection,
        filters,
        include_deleted,
        Some(limit),
        |r| {
            println!("{r}");
            Ok(())
        },
    )
    .await?;
    eprintln!("{n} record(s)");
    Ok(())
}

/// `medmesh export COLLECTION`: JSON Lines on standard output.
pub async fn export(api: &ApiArgs, collection: &str, include_deleted: bool) -> Result<()> {
    let client = Client::new(api)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let n = for_each_record(&client, collection, &[], include_deleted, None, |r| {
        writeln!(out, "{r}").context("cannot write the export")
    })
    .await?;
    out.flush().context("cannot write the export")?;
    eprintln!("Exported {n} record(s) from {collection}.");
    Ok(())
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImportSummary {
    /// Records stored.
    pub accepted: usize,
    /// Lines refused, with their line number and reason.
    pub refused: Vec<(usize, String)>,
}

/// `medmesh import COLLECTION FILE`: sends the file in batches; each record is its own
/// change. Prints a progress bar and a summary; fails if any line was refused.
pub async fn import(api: &ApiArgs, collection: &str, file: &Path) -> Result<()> {
    let summary = import_file(api, collection, file, true).await?;
    println!(
        "Imported {} record(s) into {collection}; {} line(s) refused.",
        summary.accepted,
        summary.refused.len()
    );
    for (line, reason) in summary.refused.iter().take(IMPORT_REASONS_SHOWN) {
        println!("  line {line}: {reason}");
    }
    if summary.refused.len() > IMPORT_REASONS_SHOWN {
        println!(
            "  ... and {} more",
            summary.refused.len() - IMPORT_REASONS_SHOWN
        );
    }
    if !summary.refused.is_empty() {
        bail!(
            "{} line(s) of {} were not imported; fix them and import those lines again",
            summary.refused.len(),
            file.display()
        );
    }
    Ok(())
}

/// Imports a JSON Lines file and answers what happened to each line.
pub async fn import_file(
    api: &ApiArgs,
    collection: &str,
    file: &Path,
    progress: bool,
) -> Result<ImportSummary> {
    let client = Client::new(api)?;
    let handle =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = handle.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let reader = std::io::BufReader::new(handle);
    let mut summary = ImportSummary::default();
    let mut batch: Vec<(usize, Value)> = Vec::with_capacity(IMPORT_BATCH);
    let mut in_flight = std::collections::VecDeque::new();
    let mut read = 0u64;
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                summary
                    .refused
                    .push((number, format!("cannot be read: {err}")));
                continue;
            }
        };
        read += line.len() as u64 + 1;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(record)) => batch.push((number, Value::Object(record))),
            Ok(_) => summary
                .refused
                .push((number, "not a JSON object (one record per line)".into())),
            Err(err) => summary
                .refused
                .push((number, format!("not valid JSON: {err}"))),
        }
        if batch.len() >= IMPORT_BATCH {
            if in_flight.len() >= IMPORT_IN_FLIGHT
                && let Some(oldest) = in_flight.pop_front()
            {
                collect_import_batch(oldest, &mut summary).await?;
                bar.set_position(read);
                bar.set_message(format!("{} imported", summary.accepted));
            }
            in_flight.push_back(tokio::spawn(send_import_batch(
                client.clone(),
                collection.to_owned(),
                std::mem::take(&mut batch),
            )));
        }
    }
    if !batch.is_empty() {
        in_flight.push_back(tokio::spawn(send_import_batch(
            client.clone(),
            collection.to_owned(),
            batch,
        )));
    }
    while let Some(oldest) = in_flight.pop_front() {
        collect_import_batch(oldest, &mut summary).await?;
    }
    bar.finish_and_clear();
    summary.refused.sort_by_key(|(line, _)| *line);
    Ok(summary)
}

type BatchResult = Result<Vec<(usize, Result<(), String>)>>;

async fn collect_import_batch(
    task: tokio::task::JoinHandle<BatchResult>,
    summary: &mut ImportSummary,
) -> Result<()> {
    let results = task.await.context("the import was interrupted")??;
    for (line, result) in results {
        match result {
            Ok(()) => summary.accepted += 1,
            Err(reason) => summary.refused.push((line, reason)),
        }
    }
    Ok(())
}

async fn send_import_batch(
    client: Client,
    collection: String,
    batch: Vec<(usize, Value)>,
) -> BatchResult {
    let (lines, records): (Vec<usize>, Vec<Value>) = batch.into_iter().unzip();
    let (_, answer) = client
        .call(
            Method::POST,
            &format!("/v1/{collection}/_import"),
            Some(&json!({ "records": records })),
        )
        .await
        .context(
            "the import stopped; the lines before this batch are stored, import the rest again",
        )?;
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    Ok(lines
        .into_iter()
        .zip(results)
        .map(|(line, result)| {
            if result["ok"].as_bool() == Some(true) {
                (line, Ok(()))
            } else {
                (
                    line,
                    Err(result["error"]["message"]
                        .as_str()
                        .unwrap_or("refused")
                        .to_owned()),
                )
            }
        })
        .collect())
}

/// `medmesh hub qr|clients|remove CLIENT_ID`.
pub async fn hub(api: &ApiArgs, action: Option<&str>, client_id: Option<&str>) -> Result<()> {
    let client = Client::new(api)?;
    match (action.unwrap_or("qr"), client_id) {
        ("qr", _) => {
            let (_, hub) = client.call(Method::GET, "/v1/hub", None).await?;
            let pairing = hub["pairing"].as_str().unwrap_or_default();
            println!(
                "Hikma app hub {} at {}",
                hub["name"].as_str().unwrap_or("?"),
                hub["url"].as_str().unwrap_or("?")
            );
            println!(
                "On the tablet: Settings, Sync, scan hub code; then sign in with a user of the mesh."
            );
            if let Ok(code) = qrcode::QrCode::new(pairing.as_bytes()) {
                println!(
                    "{}",
                    code.render::<qrcode::render::unicode::Dense1x2>()
                        .quiet_zone(true)
                        .build()
                );
            }
            println!("The code's text: {pairing}");
            Ok(())
        }
        ("clients", _) => {
            let (_, answer) = client.call(Method::GET, "/v1/hub/clients", None).await?;
            let clients = answer["clients"].as_array().cloned().unwrap_or_default();
            println!("{} tablet(s) paired since the node started", clients.len());
            for c in clients {
                let seen = c["last_seen"]
                    .as_i64()
                    .map(medmesh_protocol::record::format_timestamp)
                    .unwrap_or_default();
                println!(
                    "{}  last seen {seen}  {}",
                    c["client_id"].as_str().unwrap_or("?"),
                    c["user"].as_str().unwrap_or("(nobody signed in)")
                );
            }
            Ok(())
        }
        ("remove", Some(id)) => {
            let (_, answer) = client
                .call(Method::DELETE, &format!("/v1/hub/clients/{id}"), None)
                .await?;
            println!(
                "Removed tablet {id}: it cannot pair again, and {} sign-in(s) from it ended.",
                answer["sign_ins_ended"]
            );
            Ok(())
        }
        ("remove", None) => {
            bail!("name the tablet: medmesh hub remove CLIENT_ID (see medmesh hub clients)")
        }
        (other, _) => bail!("unknown action `{other}`: use qr, clients or remove"),
    }
}

/// `medmesh devices [list]` and `medmesh devices revoke PEER_ID [--reason TEXT]`.
pub async fn devices(
    api: &ApiArgs,
    action: Option<&str>,
    peer: Option<&str>,
    reason: &str,
    clinics: &[String],
) -> Result<()> {
    let client = Client::new(api)?;
    match (action.unwrap_or("list"), peer) {
        ("list", _) => {
            let (_, answer) = client.call(Method::GET, "/v1/devices", None).await?;
            let devices = answer["devices"].as_array().cloned().unwrap_or_default();
            println!(
                "Mesh {}: {} device(s){}",
                answer["mesh"].as_str().unwrap_or("?"),
                devices.len(),
                if answer["this_device_is_admin"] == json!(true) {
                    " (this device is an admin device)"
                } else {
                    ""
                }
            );
            for d in devices {
                let state = match d["revoked"].as_str() {
                    Some(why) => format!("REVOKED ({why})"),
                    None if d["this_device"] == json!(true) => "this device".to_owned(),
                    None if d["connected"] == json!(true) => "connected".to_owned(),
                    None => "not connected".to_owned(),
                };
                println!(
                    "{}  {:<8} {:<30} {}",
                    d["peer_id"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or(""),
                    d["name"].as_str().unwrap_or(""),
                    state
                );
                if let Some(at) = d["expires_at"].as_str() {
                    println!("    certificate valid until {at}");
                }
                match d["clinics"].as_array() {
                    Some(list) if !list.is_empty() => println!(
                        "    holds the records of clinic(s) {}",
                        list.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ if d["revoked"].is_null() => println!("    holds the records of all clinics"),
                    _ => {}
                }
            }
            Ok(())
        }
        ("revoke", Some(peer)) => {
            client
                .call(
                    Method::POST,
                    &format!("/v1/devices/{}/revoke", encode(peer)),
                    Some(&json!({ "reason": reason })),
                )
                .await?;
            println!(
                "Revoked {peer}. Every node that receives the revocation disconnects it and refuses it from then on; `medmesh devices list` shows it."
            );
            Ok(())
        }
        ("revoke", None) => {
            bail!("give the peer id: medmesh devices revoke PEER_ID (see `medmesh devices list`)")
        }
        ("clinics", Some(peer)) => {
            client
                .call(
                    Method::POST,
                    &format!("/v1/devices/{}/clinics", encode(peer)),
                    Some(&json!({ "clinics": clinics })),
                )
                .await?;
            if clinics.is_empty() {
                println!(
                    "{peer} now serves all clinics. Once it receives its new certificate (at its next sync), it fetches the records it lacks."
                );
            } else {
                println!(
                    "{peer} now serves clinic(s) {}. Once it receives its new certificate (at its next sync), it holds only their records: the others are removed from it once a device that serves them holds them.",
                    clinics.join(", ")
                );
            }
            Ok(())
        }
        ("clinics", None) => bail!(
            "give the peer id: medmesh devices clinics PEER_ID --clinic CLINIC_ID (see `medmesh devices list`)"
        ),
        (other, _) => bail!(
            "unknown devices action `{other}`: use `medmesh devices list`, `medmesh devices revoke PEER_ID` or `medmesh devices clinics PEER_ID --clinic ID`"
        ),
    }
}

/// `medmesh peers` and `medmesh peers add MULTIADDR`
pub async fn peers(api: &ApiArgs, action: Option<&str>, addr: Option<&str>) -> Result<()> {
    let client = Client::new(api)?;
    match (action, addr) {
        (Some("add"), Some(addr)) => {
            client
                .call(Method::POST, "/v1/peers", Some(&json!({ "addr": addr })))
                .await?;
            println!(
                "Connecting to {addr}; it is remembered for the next starts. See `medmesh peers`."
            );
            Ok(())
        }
        (Some("add"), None) => {
            bail!("give the address: medmesh peers add /ip4/192.168.1.20/tcp/7401")
        }
        (Some("forget"), Some(peer)) => {
            client
                .call(Method::DELETE, &format!("/v1/peers/{}", encode(peer)), None)
                .await?;
            println!("Forgot {peer}: disconnected, and it is no longer dialed or remembered.");
            Ok(())
        }
        (Some("forget"), None) => bail!("give the peer id: medmesh peers forget PEER_ID"),
        (Some(other), _) => bail!(
            "unknown peers action `{other}`: use `medmesh peers`, `medmesh peers add MULTIADDR` or `medmesh peers forget PEER_ID`"
        ),
        (None, _) => {
            let (_, answer) = client.call(Method::GET, "/v1/peers", None).await?;
            let peers = answer["peers"].as_array().cloned().unwrap_or_default();
            println!(
                "Mesh {}: {} peer(s)",
                answer["mesh"].as_str().unwrap_or("?"),
                peers.len()
            );
            for peer in peers {
                println!(
                    "{}  {}  last sync {}  waiting in {} / out {}{}",
                    peer["peer_id"].as_str().unwrap_or("?"),
                    if peer["connected"] == json!(true) {
                        "connected   "
                    } else {
                        "disconnected"
                    },
                    peer["last_sync"].as_str().unwrap_or("never"),
                    peer["pending_in"],
                    peer["pending_out"],
                    peer["last_error"]
                        .as_str()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default(),
                );
                for addr in peer["addresses"].as_array().into_iter().flatten() {
                    println!("    {}", addr.as_str().unwrap_or("?"));
                }
                match peer["clinics"].as_array() {
                    Some(list) if !list.is_empty() => println!(
                        "    serves clinic(s) {}: only their records go to it",
                        list.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => {}
                }
                if let Some(check) = peer["last_check_result"].as_str() {
                    println!(
                        "    last compared {}: {check}",
                        peer["last_check"].as_str().unwrap_or("?")
                    );
                }
            }
            print_unreached(&answer["unreached_clinics"]);
            Ok(())
        }
    }
}

/// Warns of the clinics whose records no connected peer brings.
fn print_unreached(unreached: &Value) {
    let list: Vec<String> = unreached
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| match c["name"].as_str().filter(|n| !n.is_empty()) {
            Some(name) => format!("{name} ({})", c["id"].as_str().unwrap_or("?")),
            None => c["id"].as_str().unwrap_or("?").to_owned(),
        })
        .collect();
    if !list.is_empty() {
        println!(
            "Records of clinic(s) {} reach this device through no connected peer: the peers connected serve other clinics. Connect a device that serves them (or all clinics) to receive them.",
            list.join(", ")
        );
    }
}

/// `medmesh verify --peer PEER_ID`: compares everything this node holds with a peer.
pub async fn verify(api: &ApiArgs, peer: &str) -> Result<bool> {
    let client = Client::new(api)?;
    println!("Comparing everything this node holds with {peer}...");
    let (_, report) = client
        .call(
            Method::POST,
            &format!("/v1/peers/{}/verify", encode(peer)),
            None,
        )
        .await?;
    let equal = report["equal"] == json!(true);
    let repaired = report["repaired_here"].as_u64().unwrap_or(0);
    if equal {
        println!(
            "The same: both hold {} documents at the same versions.",
            report["local_documents"]
        );
    } else {
        println!(
            "Different: this node holds {} documents, the peer {}; {} part(s) of the store still differ. Sync is repairing it; run this again in a minute.",
            report["local_documents"], report["peer_documents"], report["differing_buckets"]
        );
    }
    if repaired > 0 {
        println!(
            "{repaired} document(s) were missing here although the sync should have brought them; they were fetched now."
        );
    }
    Ok(equal)
}

/// Puts the drug into a pharmacy request: `drug_id` when it is an id, else `drug_name`.
pub fn drug_field(body: &mut Value, drug: &str) {
    if drug.parse::<medmesh_protocol::DocId>().is_ok() {
        body["drug_id"] = json!(drug);
    } else {
        body["drug_name"] = json!(drug);
    }
}

fn stock_line(item: &Value) -> String {
    format!(
        "{:<36}  batch {:<12} expires {:<10}  quantity {:>6}",
        item["drug_name"]
            .as_str()
            .or(item["drug_id"].as_str())
            .unwrap_or("?"),
        item["batch_number"].as_str().unwrap_or("?"),
        item["expiry_date"].as_str().unwrap_or("-"),
        item["quantity"]
            .as_i64()
            .map_or_else(|| "?".to_owned(), |q| q.to_string()),
    )
}

/// `medmesh stock`
pub async fn stock(api: &ApiArgs, clinic: Option<&str>, drug: Option<&str>) -> Result<()> {
    let client = Client::new(api)?;
    let mut path = "/v1/pharmacy/stock?".to_owned();
    if let Some(clinic) = clinic {
        path.push_str(&format!("clinic_id={}&", encode(clinic)));
    }
    if let Some(drug) = drug {
        path.push_str(&format!("drug_id={}", encode(drug)));
    }
    // Every page, printed as it arrives.
    let mut count = 0usize;
    let mut after: Option<String> = None;
    loop {
        let page_path = match &after {
            Some(next) => format!("{path}&after={}", encode(next)),
            None => path.clone(),
        };
        let (_, answer) = client.call(Method::GET, &page_path, None).await?;
        for item in answer["items"].as_array().into_iter().flatten() {
            println!("{}", stock_line(item));
            count += 1;
        }
        match answer["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    eprintln!("{count} batch(es)");
    Ok(())
}

/// `medmesh restock` and `medmesh dispense`
pub async fn pharmacy_post(api: &ApiArgs, operation: &str, body: &Value) -> Result<()> {
    let client = Client::new(api)?;
    let (_, answer) = client
        .call(
            Method::POST,
            &format!("/v1/pharmacy/{operation}"),
            Some(body),
        )
        .await?;
    match operation {
        "dispense" => {
            for taken in answer["taken"].as_array().into_iter().flatten() {
                println!(
                    "Dispensed {} from batch {} ({} left)",
                    taken["quantity"],
                    taken["batch_number"].as_str().unwrap_or("?"),
                    taken["balance_after"]
                );
            }
            if let Some(warning) = answer["warning"].as_str() {
                println!("Warning: {warning}");
            }
        }
        _ => println!(
            "Batch {} now holds {} (stock item {})",
            answer["batch_number"].as_str().unwrap_or("?"),
            answer["quantity"],
            answer["stock_item_id"].as_str().unwrap_or("?")
        ),
    }
    Ok(())
}

/// `medmesh alerts`
pub async fn alerts(api: &ApiArgs, clinic: Option<&str>, within_days: i64) -> Result<()> {
    let client = Client::new(api)?;
    let mut path = format!("/v1/pharmacy/alerts?within_days={within_days}");
    if let Some(clinic) = clinic {
        path.push_str(&format!("&clinic_id={}", encode(clinic)));
    }
    let (_, answer) = client.call(Method::GET, &path, None).await?;
    for (key, title) in [
        ("negative_stock", "Negative stock (count the shelf)"),
        ("expired_with_stock", "Expired, still on the shelf"),
        ("expiring_soon", "Expiring soon"),
        ("low_stock", "Low stock"),
    ] {
        let items = answer[key].as_array().cloned().unwrap_or_default();
        println!("{title}: {}", items.len());
        for item in &items {
            println!("  {}", stock_line(item));
        }
    }
    Ok(())
}

/// `medmesh verify-stock`
pub async fn verify_stock(api: &ApiArgs) -> Result<()> {
    let client = Client::new(api)?;
    let (_, answer) = client
        .call(Method::GET, "/v1/pharmacy/verify", None)
        .await?;
    let mismatches = answer["mismatches"].as_array().cloned().unwrap_or_default();
    if mismatches.is_empty() {
        println!(
            "All {} stock item(s) match the sum of their movements.",
            answer["stock_items"]
        );
        return Ok(());
    }
    for m in &mismatches {
        println!(
            "stock item {} (batch {}): quantity {} but its {} movement(s) add up to {}",
            m["stock_item_id"].as_str().unwrap_or("?"),
            m["batch_number"].as_str().unwrap_or("?"),
            m["quantity"],
            m["transactions"],
            m["sum_of_transactions"]
        );
    }
    bail!("{} stock item(s) do not add up", mismatches.len())
}

/// `medmesh users add | list`
pub async fn users(action: crate::config::UsersAction) -> Result<()> {
    use crate::config::UsersAction;
    match action {
        UsersAction::Add {
            api,
            email,
            name,
            role,
            clinic,
        } => {
            if crate::access::Role::parse(&role).is_none() {
                bail!(
                    "unknown role `{role}`: use one of {}",
                    crate::access::Role::ASSIGNABLE.join(", ")
                );
            }
            let client = Client::new(&api)?;
            let (_, existing) = client
                .call(
                    Method::GET,
                    &format!("/v1/users?email={}", encode(&email)),
                    None,
                )
                .await?;
            if existing["records"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                bail!("a user with the email {email} exists already");
            }
            // The node hashes the password (bcrypt) and never stores it as typed.
            let mut user = json!({
                "email": email,
                "name": name,
                "role": role,
                "password": read_password(&email)?,
            });
            if let Some(clinic) = clinic {
                user["clinic_id"] = json!(clinic);
            }
            // The node gives a user with a clinic their role's permissions there.
            let (_, created) = client.call(Method::POST, "/v1/users", Some(&user)).await?;
            println!(
                "User {email} ({role}) created: {}. They sign in to the Hikma app with this node's address.",
                created["id"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        UsersAction::List { api } => {
            let client = Client::new(&api)?;
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/v1/users?limit=1000&cursor={c}"),
                    None => "/v1/users?limit=1000".to_owned(),
                };
                let (_, page) = client.call(Method::GET, &path, None).await?;
                for user in page["records"].as_array().into_iter().flatten() {
                    println!(
                        "{:<36} {:<32} {:<12} {}",
                        user["email"].as_str().unwrap_or("-"),
                        user["name"].as_str().unwrap_or("-"),
                        user["role"].as_str().unwrap_or("-"),
                        user["clinic_id"].as_str().unwrap_or("-"),
                    );
                }
                match page["next"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break,
                }
            }
            Ok(())
        }
        UsersAction::Disable { api, email } => {
            let client = Client::new(&api)?;
            let id = user_id(&client, &email).await?;
            let now =
                medmesh_protocol::record::format_timestamp(chrono::Utc::now().timestamp_millis());
            client
                .call(
                    Method::PATCH,
                    &format!("/v1/users/{id}"),
                    Some(&json!({"disabled_at": now})),
                )
                .await?;
            println!(
                "User {email} is disabled: they can no longer sign in or use a token, on any node once this change has synced."
            );
            Ok(())
        }
        UsersAction::Enable { api, email } => {
            let client = Client::new(&api)?;
            let id = user_id(&client, &email).await?;
            client
                .call(
                    Method::PATCH,
                    &format!("/v1/users/{id}"),
                    Some(&json!({"disabled_at": null})),
                )
                .await?;
            println!("User {email} can sign in again.");
            Ok(())
        }
        UsersAction::Passwd { api, email } => {
            let client = Client::new(&api)?;
            let id = user_id(&client, &email).await?;
            let password = read_password(&email)?;
            client
                .call(
                    Method::PATCH,
                    &format!("/v1/users/{id}"),
                    Some(&json!({ "password": password })),
                )
                .await?;
            println!(
                "The password of {email} is changed (on every node once this change has synced)."
            );
            Ok(())
        }
    }
}

/// A password from standard input (never from the command line), at least 8 characters.
fn read_password(email: &str) -> Result<String> {
    eprintln!("Password for {email} (read from standard input):");
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("could not read the password from standard input")?;
    let password = password.trim_end_matches(['\r', '\n']).to_owned();
    if password.chars().count() < 8 {
        bail!("the password must have at least 8 characters");
    }
    Ok(password)
}

/// The id of the user with this email.
async fn user_id(client: &Client, email: &str) -> Result<String> {
    let (_, found) = client
        .call(
            Method::GET,
            &format!("/v1/users?email={}", encode(email)),
            None,
        )
        .await?;
    found["records"]
        .as_array()
        .and_then(|r| r.first())
        .and_then(|u| u["id"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("there is no user with the email {email}; see `medmesh users list`"))
}
