//! Starting and stopping a node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use medmesh_protocol::Schema;
use medmesh_storage::{Store, StoreOptions};
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::StartArgs;
use crate::gateway;
use crate::identity;
use crate::mesh::{self, MeshConfig};
use libp2p::identity::Keypair;
use medmesh_protocol::membership::{Credential, MeshSecret};

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
    /// The mesh this node belongs to.
    pub secret: MeshSecret,
    /// True when this call created the directory's store.
    pub created: bool,
}

/// Opens (creating when new) the data directory: the store and the node identity.
/// `extra_schema` is a schema file to use and keep for later starts.
pub fn open_data(dir: &Path, extra_schema: Option<&Path>) -> Result<OpenedData> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the data directory {}; choose another with --data",
            dir.display()
        )
    })?;
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
    let store = Store::open(&path, schema, StoreOptions::default())
        .with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let keypair = identity::load_or_create(&store)?;
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
    let secret = match mesh::read_mesh_secret(dir)? {
        Some(secret) => secret,
        None => {
            // A node started without an invite founds a new mesh.
            let secret = MeshSecret::from_bytes(rand::random());
            mesh::write_mesh_secret(dir, &secret)?;
            secret
        }
    };
    Ok(OpenedData {
        dir: dir.to_path_buf(),
        store,
        peer_id: identity::peer_id(&keypair).to_string(),
        keypair,
        secret,
        created,
    })
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

/// `medmesh start`: runs a node until Ctrl-C or SIGTERM.
pub async fn start(args: StartArgs) -> Result<()> {
    let dir = args.data.dir();
    for addr in args.listen.iter().chain(args.peer.iter()) {
        if !addr.starts_with('/') {
            bail!("`{addr}` is not a libp2p address; write it like /ip4/192.168.1.20/tcp/7401");
        }
    }
    let gateway_config = gateway_config(&args)?;
    let opened = open_data_async(dir, args.schema.clone()).await?;
    if opened.created {
        println!("Created a new medmesh node in {}", opened.dir.display());
    }
    let counts = opened.store.counts().unwrap_or_default();
    let total: u64 = counts.values().sum();
    let mesh_config = MeshConfig {
        listen: parse_addrs(&args.listen, "--listen")?,
        peers: parse_addrs(&args.peer, "--peer")?,
        mdns: !args.no_mdns,
        mdns_interfaces: args.mdns_interfaces.clone(),
    };
    let mesh_shutdown = tokio_util::sync::CancellationToken::new();
    let (mesh, mesh_task) = mesh::start(
        opened.store.clone(),
        opened.keypair.clone(),
        Credential::SharedSecret(opened.secret.clone()),
        mesh_config,
        mesh_shutdown.clone(),
    )
    .await?;
    let mut state = AppState::new(
        opened.store.clone(),
        opened.peer_id.clone(),
        Some(opened.dir.clone()),
    )
    .with_mesh(mesh.clone());
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
    let api = serve_api(state, args.api).await?;
    println!("medmesh node {} is running", opened.peer_id);
    println!("  data:    {} ({total} records)", opened.dir.display());
    println!("  API:     http://{}", api.addr);
    println!(
        "  mesh:    {} (listening on {})",
        mesh.fingerprint(),
        args.listen.join(", ")
    );
    if let Some(line) = &gateway_line {
        println!("  gateway: {line}");
    }
    if args.no_mdns {
        println!(
            "           discovery off (--no-mdns): other nodes come from --peer or `medmesh peers add`"
        );
    }
    println!("Press Ctrl-C to stop.");
    tracing::info!(peer = %opened.peer_id, api = %api.addr, "node started");
    shutdown_signal().await;
    println!("Stopping: finishing the writes in progress...");
    gateway_shutdown.cancel();
    if let Some(task) = gateway_task {
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

/// `medmesh init`: creates the identity and store, in a new mesh or the invite's;
/// says what to do next.
pub fn init(dir: &Path, join: Option<&str>) -> Result<()> {
    if let Some(invite) = join {
        let (secret, addrs) = MeshSecret::from_invite(invite)?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
        match mesh::read_mesh_secret(dir)? {
            Some(existing) if existing != secret => bail!(
                "{} already belongs to mesh {}; to join mesh {} use a new --data directory",
                dir.display(),
                existing.fingerprint(),
                secret.fingerprint()
            ),
            Some(_) => {}
            None => mesh::write_mesh_secret(dir, &secret)?,
        }
        let opened = open_data(dir, None)?;
        for addr in &addrs {
            opened
                .store
                .update_peer_blocking(
                    &format!("addr:{addr}"),
                    medmesh_storage::PeerUpdate::Pin { addr: addr.clone() },
                )
                .context("cannot remember the invite's addresses")?;
        }
        println!("Joined mesh {} in {}", secret.fingerprint(), dir.display());
        println!("Node id: {}", opened.peer_id);
        println!("Start it with: medmesh start --data {}", dir.display());
        return Ok(());
    }
    let opened = open_data(dir, None)?;
    if opened.created {
        println!("Created a new medmesh node in {}", opened.dir.display());
    } else {
        println!(
            "{} already holds a medmesh node; nothing changed.",
            opened.dir.display()
        );
    }
    println!("Mesh:    {}", opened.secret.fingerprint());
    println!("Node id: {}", opened.peer_id);
    println!(
        "Start it with: medmesh start --data {}",
        opened.dir.display()
    );
    Ok(())
}

/// `medmesh invite`: prints an invite to this node's mesh, as the last line.
pub fn invite(dir: &Path, addrs: &[String]) -> Result<()> {
    let secret = mesh::read_mesh_secret(dir)?.with_context(|| {
        format!(
            "{} holds no medmesh node yet; create one with `medmesh init --data {}`",
            dir.display(),
            dir.display()
        )
    })?;
    println!(
        "Invite to mesh {}. On the other device run:",
        secret.fingerprint()
    );
    println!("  medmesh init --data DIR --join INVITE");
    println!("Keep it private: anyone with it can join the mesh and read its records.");
    println!("{}", secret.invite(addrs));
    Ok(())
}
