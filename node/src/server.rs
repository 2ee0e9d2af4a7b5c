//! Starting and stopping a node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use medmesh_protocol::Schema;
use medmesh_storage::{Store, StoreOptions};
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::StartArgs;
use crate::identity;

/// The store's file inside a data directory.
pub const STORE_FILE: &str = "medmesh.redb";
/// The kept copy of the deployment's schema file inside a data directory.
pub const SCHEMA_FILE: &str = "schema.json";

/// A node's data directory, opened: its store and identity.
pub struct OpenedData {
    /// The directory.
    pub dir: PathBuf,
    /// The store.
    pub store: Store,
    /// The node's peer id.
    pub peer_id: String,
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
    let kept_schema = dir.join(SCHEMA_FILE);
    if let Some(source) = extra_schema {
        let text = std::fs::read_to_string(source)
            .with_context(|| format!("cannot read the schema file {}", source.display()))?;
        // Check it before keeping it.
        Schema::hikma()
            .extend_from_json(&text, &source.display().to_string())
            .with_context(|| format!("the schema file {} is not valid", source.display()))?;
        std::fs::write(&kept_schema, &text).with_context(|| {
            format!(
                "cannot keep a copy of the schema file in {}",
                kept_schema.display()
            )
        })?;
    }
    let mut schema = Schema::hikma();
    if kept_schema.exists() {
        let text = std::fs::read_to_string(&kept_schema)
            .with_context(|| format!("cannot read {}", kept_schema.display()))?;
        schema
            .extend_from_json(&text, &kept_schema.display().to_string())
            .with_context(|| {
                format!(
                    "the kept schema file {} is not valid",
                    kept_schema.display()
                )
            })?;
    }
    let path = dir.join(STORE_FILE);
    let created = !path.exists();
    let store = Store::open(&path, schema, StoreOptions::default())
        .with_context(|| format!("cannot open the store in {}", dir.display()))?;
    let keypair = identity::load_or_create(&store)?;
    Ok(OpenedData {
        dir: dir.to_path_buf(),
        store,
        peer_id: identity::peer_id(&keypair).to_string(),
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
    let opened = open_data_async(dir, args.schema.clone()).await?;
    if opened.created {
        println!("Created a new medmesh node in {}", opened.dir.display());
    }
    let counts = opened.store.counts().unwrap_or_default();
    let total: u64 = counts.values().sum();
    let state = AppState::new(
        opened.store.clone(),
        opened.peer_id.clone(),
        Some(opened.dir.clone()),
    );
    let api = serve_api(state, args.api).await?;
    println!("medmesh node {} is running", opened.peer_id);
    println!("  data:    {} ({total} records)", opened.dir.display());
    println!("  API:     http://{}", api.addr);
    if args.no_mdns {
        println!("  mesh:    discovery off (--no-mdns)");
    }
    println!("Press Ctrl-C to stop.");
    tracing::info!(peer = %opened.peer_id, api = %api.addr, "node started");
    shutdown_signal().await;
    println!("Stopping: finishing the writes in progress...");
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

/// `medmesh init`: creates the identity and store; says what to do next.
pub fn init(dir: &Path) -> Result<()> {
    let opened = open_data(dir, None)?;
    if opened.created {
        println!("Created a new medmesh node in {}", opened.dir.display());
    } else {
        println!(
            "{} already holds a medmesh node; nothing changed.",
            opened.dir.display()
        );
    }
    println!("Node id: {}", opened.peer_id);
    println!(
        "Start it with: medmesh start --data {}",
        opened.dir.display()
    );
    Ok(())
}
