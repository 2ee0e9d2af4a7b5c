//! Starting and stopping a node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use medmesh_protocol::Schema;
use medmesh_protocol::authorship::Authority;
use medmesh_storage::{Store, StoreOptions};
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::StartArgs;
use crate::gateway;
use crate::identity;
use crate::mesh::{self, MeshConfig};
use libp2p::identity::Keypair;
use medmesh_protocol::membership::{DeviceKind, EnrollAnswer, Invite, OwnerKey};

use crate::trust::{self, Founding, Trust};

/// The store's file inside a data directory.
pub const STORE_FILE: &str = "medmesh.redb";
/// Where medmesh before 0.2 kept a copy of the deployment's schema file; read (and
/// declared into the mesh's schema) when present.
pub const SCHEMA_FILE: &str = "schema.json";

/// A node's data directory, opened: its store and identity.
pub struct OpenedData {
    /// The directory.
    pub dir: PathBuf,
    /// The store.
    pub store: Store,
    /// The node's peer id.
    pub peer_id: String,
    /// The node's key pair.
    pub keypair: Keypair,
    /// This device's place in its mesh.
    pub trust: Trust,
    /// Whether this open founded a mesh or upgraded one of the old format.
    pub founding: Founding,
    /// True when this call created the directory's store.
    pub created: bool,
    /// How the store is protected at rest.
    pub protection: crate::keys::Protection,
}

impl OpenedData {
    /// What the person at the device must know about how the directory was opened.
    pub fn founding_note(&self) -> Option<String> {
        match self.founding {
            Founding::Member => None,
            Founding::Founded => Some(format!(
                "This device founded a new mesh and is its first admin device: it holds the mesh's owner key ({}). Keep a copy of that file somewhere safe; invite other devices with `medmesh invite`.",
                self.dir.join(trust::OWNER_FILE).display()
            )),
            Founding::Upgraded => Some(
                "This mesh was made by a medmesh from before device certificates. It was upgraded: every device that held the old mesh key becomes an admin device of the same mesh when it is upgraded, and devices still on the old version are refused until they are upgraded too. Invites printed before the upgrade no longer work; make new ones with `medmesh invite`. Anyone who saw an old invite could still derive the mesh's owner key: if one may have leaked, make a new mesh and move the records to it.".to_owned(),
            ),
        }
    }
}

/// Creates the data directory when new, and makes it readable by its owner only: it holds
/// patient records and the device's keys.
pub fn create_data_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the data directory {}; choose another with --data",
            dir.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
            || {
                format!(
                    "cannot make the data directory {} private to its owner; check who owns it",
                    dir.display()
                )
            },
        )?;
    }
    Ok(())
}

/// Opens (creating when new) the data directory: the store and the node identity.
/// `extra_schema` is a schema file to use and keep for later starts.
pub fn open_data(dir: &Path, extra_schema: Option<&Path>) -> Result<OpenedData> {
    create_data_dir(dir)?;
    // Extra collections are mesh state: a schema file given now (or kept by an older
    // medmesh in the data directory) is declared into the mesh's schema document once
    // the store is open, and reaches every node from there.
    let kept_schema = dir.join(SCHEMA_FILE);
    let mut declarations = Vec::new();
    for source in extra_schema
        .map(Path::to_path_buf)
        .into_iter()
        .chain(kept_schema.exists().then_some(kept_schema))
    {
        let text = std::fs::read_to_string(&source)
            .with_context(|| format!("cannot read the schema file {}", source.display()))?;
        let found = Schema::hikma()
            .declarations_of_file(&text, &source.display().to_string())
            .with_context(|| format!("the schema file {} is not valid", source.display()))?;
        for declaration in found {
            if !declarations
                .iter()
                .any(|d: &medmesh_protocol::schema::Declaration| d.name == declaration.name)
            {
                declarations.push(declaration);
            }
        }
    }
    let schema = Schema::hikma();
    let path = dir.join(STORE_FILE);
    let created = !path.exists();
    let authority = trust::ChangeAuthority::default();
    let unsigned = std::env::var_os(UNSIGNED_FOR_BENCHMARK).is_some();
    if unsigned {
        tracing::warn!(
            "{UNSIGNED_FOR_BENCHMARK} is set: this node neither signs its changes nor checks the signatures of what it receives, and other nodes will refuse its changes. It is for benchmarks only: unset it"
        );
    }
    let options = StoreOptions {
        authority: (!unsigned).then(|| Arc::new(authority.clone()) as Arc<dyn Authority>),
        ..StoreOptions::default()
    };
    let (store, protection) =
        crate::keys::open_store(dir, &path, schema, options, crate::keys::encrypting())
            .with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let keypair = identity::load_or_create(&store)?;
    if !unsigned {
        sign_as(&store, &keypair)?;
    }
    if !declarations.is_empty() {
        let author = medmesh_protocol::ChangeAuthor {
            device: identity::peer_id(&keypair).to_string(),
            user: None,
        };
        let notes = store
            .declare_schema_blocking(&declarations, author)
            .context("cannot write the schema into the store")?;
        for note in notes {
            println!("Schema: {note}");
        }
    }
    let peer_id = identity::peer_id(&keypair).to_string();
    // A node started without an invite founds a new mesh.
    let (mut trust, founding) = trust::load_or_found(dir, &peer_id)?;
    // Secrets written by an older medmesh are sealed with the data key now.
    trust::seal_secret_files(dir)?;
    // One set of revoked devices, for the sessions and for the store's checks.
    trust.revoked = authority.revoked;
    // An admin may have changed this device's clinics while it was stopped.
    if let Some((cert, device)) = trust::newer_own_cert(&store, &trust)? {
        trust::adopt_cert(dir, &mut trust, cert, device)?;
    }
    // The store holds this device's clinics' records only (all when it names none).
    store
        .set_scope_blocking(medmesh_protocol::scope::Scope::of_clinics(
            &trust.device.clinics,
        ))
        .context("cannot set the clinics this device serves")?;
    // Best effort here: the device list is refreshed at every start.
    if let Err(err) = trust::publish_self(&store, &trust) {
        tracing::warn!(error = %format!("{err:#}"), "this device's certificate could not be published to the mesh's device list");
    }
    Ok(OpenedData {
        dir: dir.to_path_buf(),
        store,
        peer_id,
        keypair,
        trust,
        founding,
        created,
        protection,
    })
}

/// Opens a data directory's store and identity only (for a device about to join).
pub fn open_identity(dir: &Path) -> Result<(Store, Keypair)> {
    open_identity_with(dir, crate::keys::encrypting())
}

/// [`open_identity`], with the store encrypted or not (benchmarks compare the two).
pub fn open_identity_with(dir: &Path, encrypt: bool) -> Result<(Store, Keypair)> {
    create_data_dir(dir)?;
    let (store, _) = crate::keys::open_store(
        dir,
        &dir.join(STORE_FILE),
        Schema::hikma(),
        StoreOptions::default(),
        encrypt,
    )
    .with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let keypair = identity::load_or_create(&store)?;
    sign_as(&store, &keypair)?;
    Ok((store, keypair))
}

/// With this environment variable set, a node neither signs nor checks changes: only
/// `mesh-bench` sets it, to measure what signatures cost side by side.
pub const UNSIGNED_FOR_BENCHMARK: &str = "MEDMESH_BENCHMARK_UNSIGNED";

/// Has the store sign this device's changes with its identity key.
fn sign_as(store: &Store, keypair: &Keypair) -> Result<()> {
    let ed25519 = keypair
        .clone()
        .try_into_ed25519()
        .context("this device's identity is not an Ed25519 key; start with a new data directory")?;
    let secret: [u8; 32] = ed25519
        .secret()
        .as_ref()
        .try_into()
        .context("this device's identity key has an unexpected length")?;
    store
        .sign_as_blocking(&secret)
        .context("cannot set up the signing of this device's changes")
}

/// [`open_data`] on a blocking thread, for async callers.
pub async fn open_data_async(dir: PathBuf, extra_schema: Option<PathBuf>) -> Result<OpenedData> {
    tokio::task::spawn_blocking(move || open_data(&dir, extra_schema.as_deref()))
        .await
        .context("opening the data directory was interrupted")?
}

/// A running node's HTTP API, for tests and the binary.
pub struct RunningApi {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Finishes when the server has stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Cancel to stop it.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Serves the API for `state` on `addr` until `shutdown` is cancelled.
pub async fn serve_api(state: AppState, addr: SocketAddr) -> Result<RunningApi> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for the API on {addr}: is another node running? choose another address with --api")
    })?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let app = api::router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
    });
    Ok(RunningApi {
        addr,
        task,
        shutdown,
    })
}

/// Serves the API for `state` over HTTPS with the certificate in `files`.
pub async fn serve_api_tls(
    state: AppState,
    addr: SocketAddr,
    files: &crate::tls::TlsFiles,
) -> Result<RunningApi> {
    let config = crate::tls::server_config(files)?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot listen for the API on {addr}: is another node running? choose another address with --api")
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        token.cancelled().await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(config),
    )?
    .handle(handle);
    let app = api::router(state);
    let task = tokio::spawn(async move { server.serve(app.into_make_service()).await });
    Ok(RunningApi {
        addr,
        task,
        shutdown,
    })
}

/// `medmesh start`: runs a node until Ctrl-C or SIGTERM.
pub async fn start(args: StartArgs) -> Result<()> {
    let dir = args.data.dir();
    for addr in args.listen.iter().chain(args.peer.iter()) {
        if !addr.starts_with('/') {
            bail!("`{addr}` is not a libp2p address; write it like /ip4/192.168.1.20/tcp/7401");
        }
    }
    let gateway_config = gateway_config(&args)?;
    let off_loopback = !args.api.ip().is_loopback();
    let https = (off_loopback && !args.insecure_http) || args.https;
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        bail!(
            "give both --tls-cert and --tls-key (the certificate and its private key), or neither to use the node's own certificate"
        );
    }
    let opened = open_data_async(dir, args.schema.clone()).await?;
    let scope = opened.store.scope();
    if gateway_config.is_some() && !scope.is_all() {
        bail!(
            "a gateway carries the records of every clinic between the mesh and the cloud, and this device serves only clinic(s) {}. Run the gateway on a device that serves all clinics, or ask an admin to widen this one: `medmesh devices clinics {}` (no --clinic: all clinics)",
            scope.describe(),
            opened.peer_id
        );
    }
    if opened.created {
        println!("Created a new medmesh node in {}", opened.dir.display());
        first_admin(&opened, None).await?;
    }
    let counts = opened.store.counts().unwrap_or_default();
    let total: u64 = counts.values().sum();
    let mesh_config = MeshConfig {
        listen: parse_addrs(&args.listen, "--listen")?,
        peers: parse_addrs(&args.peer, "--peer")?,
        mdns: !args.no_mdns,
        mdns_interfaces: args.mdns_interfaces.clone(),
        data_dir: Some(opened.dir.clone()),
    };
    let mesh_shutdown = tokio_util::sync::CancellationToken::new();
    if let Some(note) = opened.founding_note() {
        println!("{note}");
    }
    if let Some(at) = opened.trust.device.expires_at
        && at <= chrono::Utc::now().timestamp_millis()
    {
        println!(
            "This device's certificate expired at {}: the other devices refuse it. Ask an admin for a new invite and join again in a new data directory.",
            medmesh_protocol::record::format_timestamp(at)
        );
    }
    let (mesh, mesh_task) = mesh::start(
        opened.store.clone(),
        opened.keypair.clone(),
        opened.trust.clone(),
        mesh_config,
        mesh_shutdown.clone(),
    )
    .await?;
    let mut state = AppState::with_access(
        opened.store.clone(),
        opened.peer_id.clone(),
        Some(opened.dir.clone()),
        crate::access::AccessConfig {
            hosts: args.api_hosts.clone(),
            cors_origins: args.cors_origins.clone(),
        },
    )?
    .with_mesh(mesh.clone())
    .with_protection(opened.protection);
    let gateway_shutdown = tokio_util::sync::CancellationToken::new();
    let mut gateway_task = None;
    let mut gateway_line = None;
    match gateway_config {
        Some(config) => {
            let http = gateway::http_client()?;
            let hub = match gateway::verify_key(&http, &config.url, &config.key).await {
                Ok(hub) => {
                    let clinics = hub
                        .get("clinic_ids")
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "[]".into());
                    gateway_line = Some(format!(
                        "{} (hub key accepted; clinics {clinics})",
                        config.url
                    ));
                    Some(hub)
                }
                Err(err @ gateway::CloudError::Refused { .. }) => {
                    bail!("{err}. The node was not started.")
                }
                Err(err) => {
                    gateway_line = Some(format!(
                        "{} (not reachable now: {err}; the gateway keeps trying)",
                        config.url
                    ));
                    None
                }
            };
            let gateway = gateway::Gateway::new(
                opened.store.clone(),
                state.pharmacy(),
                opened.peer_id.clone(),
                config,
                hub,
            )?;
            state = state.with_gateway(gateway.handle());
            gateway_task = Some(tokio::spawn(gateway.run(gateway_shutdown.clone())));
        }
        None => {
            let store = opened.store.clone();
            let peer = opened.peer_id.clone();
            tokio::task::spawn_blocking(move || gateway::retire(&store, &peer))
                .await
                .context("starting was interrupted")??;
        }
    }
    let tls = if https {
        let files = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => crate::tls::own_certificate(&opened.dir, &args.api_hosts)?,
        };
        let fingerprint = crate::tls::fingerprint(&files.cert)?;
        Some((files, fingerprint))
    } else {
        None
    };
    if let Some((files, fingerprint)) = &tls {
        state = state.with_tls(fingerprint.clone(), files.cert.clone());
    }
    let hub_shutdown = tokio_util::sync::CancellationToken::new();
    let mut hub_line = None;
    let mut hub_task = None;
    if let Some(addr) = args.hub_listen {
        let listener = crate::hub::rpc::bind(addr).await?;
        let bound = listener.local_addr()?;
        let url = args
            .hub_url
            .clone()
            .unwrap_or_else(|| crate::hub::url_for(bound));
        let (store, id, name) = (
            opened.store.clone(),
            opened.peer_id.clone(),
            opened.trust.device.name.clone(),
        );
        let hub = tokio::task::spawn_blocking(move || crate::hub::Hub::start(store, id, name, url))
            .await
            .context("starting was interrupted")??;
        let hub = std::sync::Arc::new(hub);
        state = state.with_hub(hub.clone());
        let task =
            crate::hub::rpc::serve(listener, state.clone(), hub.clone(), hub_shutdown.clone());
        hub_line = Some(format!(
            "{} (listening on {bound}; tablets pair by scanning `medmesh hub qr`)",
            hub.url()
        ));
        hub_task = Some(task);
    }
    let (api, scheme) = match &tls {
        Some((files, _)) => (serve_api_tls(state, args.api, files).await?, "https"),
        None => (serve_api(state, args.api).await?, "http"),
    };
    println!("medmesh node {} is running", opened.peer_id);
    println!(
        "  data:    {} ({total} records; {})",
        opened.dir.display(),
        opened.protection.describe()
    );
    println!(
        "  API:     {scheme}://{} (every request needs a user's credentials or a token; the command line uses {})",
        api.addr,
        opened
            .dir
            .join(crate::access::tokens::API_TOKEN_FILE)
            .display()
    );
    if let Some((files, fingerprint)) = &tls {
        println!(
            "  HTTPS:   certificate {} with fingerprint {fingerprint} (check it on a client before signing in; `medmesh status` shows it as a QR code)",
            files.cert.display()
        );
    }
    if off_loopback && !https {
        println!(
            "  WARNING: the API is served over plain HTTP on the network (--insecure-http): anyone on it can read passwords and records that cross it."
        );
        tracing::warn!(api = %api.addr, "the API is served over plain HTTP on the network (--insecure-http)");
    }
    println!(
        "  mesh:    {} (listening on {})",
        mesh.fingerprint(),
        args.listen.join(", ")
    );
    println!(
        "  device:  {} ({}{})",
        opened.trust.device.name,
        opened.trust.device.kind.as_str(),
        if opened.trust.owner.is_some() {
            " device: `medmesh invite` admits others"
        } else {
            ""
        }
    );
    if let Some(line) = &gateway_line {
        println!("  gateway: {line}");
    }
    if let Some(line) = &hub_line {
        println!("  app hub: {line}");
    }
    if args.no_mdns {
        println!(
            "           discovery off (--no-mdns): other nodes come from --peer or `medmesh peers add`"
        );
    }
    println!(
        "  console: open {scheme}://{}/ in a browser and sign in with a user of the mesh",
        api.addr
    );
    println!("Press Ctrl-C to stop.");
    tracing::info!(peer = %opened.peer_id, api = %api.addr, "node started");
    let progress = {
        use std::io::IsTerminal;
        std::io::stderr()
            .is_terminal()
            .then(|| tokio::spawn(show_sync_progress(mesh.clone())))
    };
    shutdown_signal().await;
    if let Some(task) = progress {
        task.abort();
    }
    println!("Stopping: finishing the writes in progress...");
    gateway_shutdown.cancel();
    if let Some(task) = gateway_task {
        let _ = task.await;
    }
    hub_shutdown.cancel();
    if let Some(task) = hub_task {
        let _ = task.await;
    }
    mesh_shutdown.cancel();
    let _ = mesh_task.await;
    api.shutdown.cancel();
    match api.task.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "the API stopped with an error"),
        Err(err) => tracing::warn!(error = %err, "the API task failed"),
    }
    // Everything to the store file itself (tasks that still hold the store may outlive
    // this function until the process exits).
    let store = opened.store.clone();
    match tokio::task::spawn_blocking(move || store.checkpoint_blocking()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "the last writes stay in the store's journal; they are applied at the next start")
        }
        Err(err) => tracing::warn!(error = %err, "the last checkpoint was interrupted"),
    }
    drop(opened.store);
    println!("Stopped. Everything written is saved.");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        biased;
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// The gateway's settings from `--gateway`, `--hub-key-file` or `MEDMESH_HUB_KEY`.
fn gateway_config(args: &StartArgs) -> Result<Option<gateway::GatewayConfig>> {
    let Some(url) = &args.gateway else {
        if args.hub_key_file.is_some() {
            bail!("--hub-key-file is for a gateway: add --gateway URL (the Hikma cloud's address)");
        }
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("--gateway {url} is not a web address; write it like https://demo.hikmahealth.org");
    }
    let key = match (&args.hub_key_file, std::env::var("MEDMESH_HUB_KEY")) {
        (Some(file), _) => std::fs::read_to_string(file).with_context(|| {
            format!(
                "cannot read the hub key file {}; put the key the cloud gave for this hub in it",
                file.display()
            )
        })?,
        (None, Ok(key)) => key,
        (None, Err(_)) => bail!(
            "a gateway needs the cloud's hub key: give --hub-key-file FILE (a file holding the key) or set MEDMESH_HUB_KEY"
        ),
    };
    let key = key.trim();
    if let Err(what) = gateway::check_key_form(key) {
        bail!(
            "the hub key given for --gateway is not valid: {what}. Copy it again from the cloud's admin page"
        );
    }
    let mut config = gateway::GatewayConfig::new(url, key);
    config.interval = std::time::Duration::from_secs(args.gateway_interval.max(1));
    Ok(Some(config))
}

fn parse_addrs(addrs: &[String], flag: &str) -> Result<Vec<libp2p::Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse().with_context(|| {
                format!(
                    "{flag} {a} is not a libp2p address; write it like /ip4/192.168.1.20/tcp/7401"
                )
            })
        })
        .collect()
}

/// `medmesh rekey`: keeps the data key under a new protection.
pub fn rekey(dir: &Path, new_passphrase_file: Option<&Path>, no_passphrase: bool) -> Result<()> {
    let new = match new_passphrase_file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the new passphrase file {}", file.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        None => std::env::var("MEDMESH_NEW_PASSPHRASE").ok(),
    }
    .filter(|p| !p.is_empty());
    if new.is_none() && !no_passphrase {
        bail!(
            "give the new passphrase with --new-passphrase-file FILE (or MEDMESH_NEW_PASSPHRASE), or choose --no-passphrase to keep the key in the key file"
        );
    }
    if new.as_ref().is_some_and(|p| p.chars().count() < 8) {
        bail!("the new passphrase must have at least 8 characters");
    }
    let protection = crate::keys::rewrap(dir, new.as_deref())?;
    println!(
        "Done: the data of {} is {}.",
        dir.display(),
        protection.describe()
    );
    Ok(())
}

/// `medmesh compact`: gives back the free space of the database file of a stopped node.
pub async fn compact(dir: &Path, details: bool) -> Result<()> {
    if !dir.join(STORE_FILE).exists() {
        bail!(
            "{} holds no medmesh store; give the node's directory with --data DIR",
            dir.display()
        );
    }
    let opened = open_data_async(dir.to_path_buf(), None)
        .await
        .context("stop the node first (`medmesh compact` needs its store to itself)")?;
    let store = opened.store.clone();
    let started = std::time::Instant::now();
    let (before, after) = tokio::task::spawn_blocking(move || store.compact_file_blocking())
        .await
        .context("the compaction was interrupted; the store is as it was, run it again")??;
    let tables = if details {
        opened.store.table_sizes()?
    } else {
        Vec::new()
    };
    drop(opened);
    let mb = |bytes: u64| bytes as f64 / 1_000_000.0;
    for table in &tables {
        println!(
            "  {:<28} {:>8.1} MB of entries, {:>6.1} MB of tree, {:>6.1} MB free in its pages",
            table.name,
            mb(table.entry_bytes),
            mb(table.tree_bytes),
            mb(table.free_bytes)
        );
    }
    println!(
        "The database file of {} went from {:.1} MB to {:.1} MB ({:.1} MB given back) in {:.1} s.",
        dir.display(),
        mb(before),
        mb(after),
        mb(before.saturating_sub(after)),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The email of the first admin a new node makes.
pub const FIRST_ADMIN_EMAIL: &str = "admin@medmesh.local";

/// Makes the first admin user of a new mesh when it has no admin yet: the password is
/// `password` or, when `None`, generated and printed once.
pub async fn first_admin(opened: &OpenedData, password: Option<String>) -> Result<()> {
    let store = opened.store.clone();
    let device = opened.peer_id.clone();
    let made = tokio::task::spawn_blocking(move || -> Result<Option<String>> {
        let users = store.list(&medmesh_storage::Query {
            collection: "users".into(),
            limit: 1000,
            ..medmesh_storage::Query::default()
        })?;
        let has_admin = users.records.iter().any(|u| {
            u.record
                .get("role")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|r| r == "admin" || r == "super_admin")
        });
        if has_admin {
            return Ok(None);
        }
        let password = password.unwrap_or_else(|| {
            crate::access::tokens::new_token()
                .trim_start_matches("mm_")
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(16)
                .collect()
        });
        let mut fields = medmesh_protocol::record::Fields::new();
        fields.insert("email".into(), FIRST_ADMIN_EMAIL.into());
        fields.insert("name".into(), "Administrator".into());
        fields.insert("role".into(), "super_admin".into());
        fields.insert(
            "hashed_password".into(),
            crate::users::hash_password(&password)?.into(),
        );
        let author = medmesh_protocol::ChangeAuthor { device, user: None };
        store
            .write_blocking(medmesh_storage::WriteBatch::one(
                medmesh_storage::WriteOp::new(
                    "users",
                    None,
                    medmesh_storage::WriteKind::Create(fields),
                    author,
                ),
            ))?
            .into_iter()
            .next()
            .context("the store gave no answer for the first admin")??;
        Ok(Some(password))
    })
    .await
    .context("making the first admin was interrupted")??;
    if let Some(password) = made {
        println!(
            "The first admin of this mesh is {FIRST_ADMIN_EMAIL}, password: {password}\n  Write it down now: it is not shown again. Add people with `medmesh users add`; change it with `medmesh users passwd {FIRST_ADMIN_EMAIL}`."
        );
    }
    Ok(())
}

/// The first admin's password typed at a terminal; `None` (generate one) when standard
/// input is not a terminal or the answer is empty.
fn prompted_password() -> Result<Option<String>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    println!(
        "Password for the first admin, {FIRST_ADMIN_EMAIL} (at least 8 characters; press Enter to have one made):"
    );
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("could not read the password")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Ok(None);
    }
    if password.chars().count() < 8 {
        bail!("the password must have at least 8 characters; run `medmesh init` again");
    }
    Ok(Some(password))
}

/// `medmesh init`: creates the identity and store, in a new mesh or, with an invite,
/// admitted by the admin device that made it; says what to do next.
pub async fn init(dir: &Path, join: Option<&str>, name: Option<&str>) -> Result<()> {
    let dir = dir.to_path_buf();
    let Some(text) = join else {
        let opened = open_data_async(dir, None).await?;
        if opened.created {
            println!("Created a new medmesh node in {}", opened.dir.display());
            first_admin(&opened, prompted_password()?).await?;
            crate::tls::own_certificate(&opened.dir, &[])?;
        } else {
            println!(
                "{} already holds a medmesh node; nothing changed.",
                opened.dir.display()
            );
        }
        if let Some(note) = opened.founding_note() {
            println!("{note}");
        }
        println!("Mesh:    {}", opened.trust.root.fingerprint());
        println!("Node id: {}", opened.peer_id);
        println!(
            "Start it with: medmesh start --data {}",
            opened.dir.display()
        );
        return Ok(());
    };
    let invite = Invite::from_text(text)?;
    let root = invite.root()?;
    if invite.expires_at <= chrono::Utc::now().timestamp_millis() {
        bail!("this invite has expired; ask an admin of the mesh for a new one");
    }
    if let Some(existing) = trust::read_root(&dir)? {
        if existing != root {
            bail!(
                "{} already belongs to mesh {}; to join mesh {} use a new --data directory",
                dir.display(),
                existing.fingerprint(),
                root.fingerprint()
            );
        }
        if dir.join(trust::CERT_FILE).exists() {
            println!(
                "{} already belongs to mesh {}; nothing changed.",
                dir.display(),
                root.fingerprint()
            );
            return Ok(());
        }
    }
    if dir.join(trust::LEGACY_SECRET_FILE).exists() {
        bail!(
            "{} holds a node of another mesh (made before device certificates); join with a new --data directory",
            dir.display()
        );
    }
    create_data_dir(&dir)?;
    crate::files::write_private(&dir.join(trust::JOINING_FILE), &invite.inviter)
        .with_context(|| format!("cannot write in the data directory {}", dir.display()))?;
    let open_dir = dir.clone();
    let (store, keypair) = tokio::task::spawn_blocking(move || open_identity(&open_dir))
        .await
        .context("opening the data directory was interrupted")??;
    let peer_id = identity::peer_id(&keypair).to_string();
    let asked = name
        .map(str::to_owned)
        .unwrap_or_else(|| trust::default_name(&peer_id));
    println!("Asking the device that made the invite to admit this one...");
    let answer = mesh::enroll::join(keypair, &invite, &asked).await?;
    let (cert, owner) = match answer {
        EnrollAnswer::Admitted { cert, owner_key } => (cert, owner_key),
        EnrollAnswer::Refused { reason } => bail!("not admitted: {reason}"),
    };
    let device = root
        .check_cert(
            &cert,
            &peer_id,
            chrono::Utc::now().timestamp_millis(),
            |_| false,
        )
        .map_err(|err| {
            anyhow::anyhow!(
                "the inviting device answered with a certificate that is not valid: {err}"
            )
        })?;
    let owner = match owner {
        Some(seed) => {
            let seed: [u8; 32] = seed
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("the inviting device sent a damaged owner key"))?;
            let owner = OwnerKey::from_seed(seed);
            if owner.root() != root {
                bail!("the inviting device sent the owner key of another mesh");
            }
            Some(owner)
        }
        None => None,
    };
    trust::write_membership(&dir, &root, &cert, owner.as_ref())?;
    let addrs = invite.addrs.clone();
    let pin_store = store.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for addr in &addrs {
            pin_store
                .update_peer_blocking(
                    &format!("addr:{addr}"),
                    medmesh_storage::PeerUpdate::Pin { addr: addr.clone() },
                )
                .context("cannot remember the invite's addresses")?;
        }
        Ok(())
    })
    .await
    .context("init was interrupted")??;
    drop(store);
    println!(
        "Joined mesh {} in {} as {} \"{}\"",
        root.fingerprint(),
        dir.display(),
        device.kind.as_str(),
        device.name
    );
    println!("Node id: {peer_id}");
    println!("Start it with: medmesh start --data {}", dir.display());
    Ok(())
}

/// The file where a running node keeps the addresses it listens on (for `medmesh invite`).
pub const LISTEN_FILE: &str = "listen.addrs";

/// A progress bar on the terminal while this node takes a large part of a peer's feed
/// (an initial sync, or catching up after days apart): documents received of those
/// announced, the rate and the time left.
async fn show_sync_progress(mesh: mesh::Mesh) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let busy = mesh.largest_sync();
        match (busy, &bar) {
            (Some((name, progress)), _) => {
                let shown = bar.get_or_insert_with(|| {
                    let bar = indicatif::ProgressBar::new(progress.announced);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {bar:30} {pos}/{len} documents, {per_sec}, {eta} left",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar
                });
                shown.set_length(progress.announced);
                shown.set_position(progress.received);
                shown.set_message(format!("syncing from {name}:"));
            }
            (None, Some(shown)) => {
                shown.finish_with_message("initial sync done:");
                bar = None;
            }
            (None, None) => {}
        }
    }
}

/// A single-use invite to this mesh, made on an admin device whose node listens (or
/// listened) in `dir`: it carries `addrs` and the node's listening addresses, the LAN's
/// before loopback, at most eight. For `medmesh invite` and `POST /v1/invites`.
pub fn new_invite(
    dir: &Path,
    me: &Trust,
    mut addrs: Vec<String>,
    options: &trust::InviteOptions,
) -> Result<Invite> {
    me.owner().context("this device cannot admit others")?;
    let listening = std::fs::read_to_string(dir.join(LISTEN_FILE)).unwrap_or_default();
    let mut lan = Vec::new();
    let mut loopback = Vec::new();
    for line in listening.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("/ip4/127.") || line.starts_with("/ip6/::1/") {
            loopback.push(line.to_owned());
        } else {
            lan.push(line.to_owned());
        }
    }
    for addr in lan.into_iter().chain(loopback) {
        if !addrs.contains(&addr) && addrs.len() < 8 {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        bail!(
            "the node of {} is not running (it has no listening address on record): start it with `medmesh start --data {}` and make the invite again; the new device gets its certificate from it",
            dir.display(),
            dir.display()
        );
    }
    trust::make_invite(dir, me, &me.device.peer_id, addrs, options)
}

/// `medmesh invite`: makes an invite that admits one device, printed as the last line.
pub fn invite(args: &crate::config::InviteArgs) -> Result<()> {
    let dir = args.data.dir();
    if trust::read_root(&dir)?.is_none() {
        bail!(
            "{} holds no medmesh node yet; create one with `medmesh init --data {}`",
            dir.display(),
            dir.display()
        );
    }
    let me = trust::load(&dir, None)?;
    let kind: DeviceKind = args.kind.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let options = trust::InviteOptions {
        valid_for: trust::parse_duration(&args.expires)?,
        kind,
        name: args.name.clone(),
        clinics: args.clinics.clone(),
        cert_valid_for: args
            .valid_for
            .as_deref()
            .map(trust::parse_duration)
            .transpose()?,
    };
    let invite = new_invite(&dir, &me, args.addrs.clone(), &options)?;
    let text = invite.to_text();
    let expires = chrono::DateTime::from_timestamp_millis(invite.expires_at)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default();
    println!(
        "Invite to mesh {} for one {} device, valid until {expires}.",
        me.root.fingerprint(),
        kind.as_str()
    );
    println!("On the new device run (this node must be running and reachable from it):");
    println!("  medmesh init --data DIR --join INVITE");
    println!(
        "It admits one device only; anyone holding it before then can use it, so keep it private."
    );
    if args.qr {
        match qrcode::QrCode::new(text.as_bytes()) {
            Ok(code) => println!(
                "{}",
                code.render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build()
            ),
            Err(err) => println!("(the invite is too long for a QR code: {err})"),
        }
    }
    println!("{text}");
    Ok(())
}
