//! The local HTTP API (axum), for apps on the device and the `medmesh` CLI.
//!
//! Every answer is JSON; every error is `{"error": {"code", "message"}}` with a status
//! that says whose fault it was (see [`error`]). Handlers never touch redb on the async
//! threads: reads run on blocking threads, writes go to the store's writer thread.

pub mod error;
mod hub;
pub(crate) mod mobile;
mod peers;
mod pharmacy;
pub(crate) mod records;
mod sessions;
mod status;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use medmesh_storage::Store;

pub use error::ApiError;

/// Largest request body for one record.
pub const MAX_RECORD_BODY: usize = 1024 * 1024;
/// Largest request body for an import batch.
pub const MAX_IMPORT_BODY: usize = 32 * 1024 * 1024;
/// Records in one import request, at most.
pub const MAX_IMPORT_RECORDS: usize = 5_000;
/// Default and largest page of a list.
pub const DEFAULT_PAGE: usize = 50;
/// Largest page of a list.
pub const MAX_PAGE: usize = 1000;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    store: Store,
    pharmacy: Arc<crate::pharmacy::Pharmacy>,
    mobile: Arc<crate::mobile::MobileSync>,
    users: Arc<crate::users::Users>,
    access: Arc<crate::access::AccessControl>,
    access_log: crate::access::log::AccessLog,
    mesh: Option<crate::mesh::Mesh>,
    gateway: Option<crate::gateway::GatewayHandle>,
    hub: Option<Arc<crate::hub::Hub>>,
    peer_id: String,
    data_dir: Option<PathBuf>,
    tls: Option<(String, PathBuf)>,
    protection: Option<crate::keys::Protection>,
    started: std::time::Instant,
}

impl AppState {
    /// State for a node with this store and identity: its API token and sessions are kept
    /// in `data_dir` (in memory only without one). Starts the access log's writer, so it
    /// must be called inside a tokio runtime.
    pub fn new(store: Store, peer_id: String, data_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::with_access(
            store,
            peer_id,
            data_dir,
            crate::access::AccessConfig::default(),
        )
    }

    /// [`AppState::new`] with the API's host names and CORS origins.
    pub fn with_access(
        store: Store,
        peer_id: String,
        data_dir: Option<PathBuf>,
        config: crate::access::AccessConfig,
    ) -> anyhow::Result<Self> {
        let api_token = match &data_dir {
            Some(dir) => crate::access::ApiToken::load_or_create(dir)?,
            None => crate::access::ApiToken::ephemeral().0,
        };
        let access = Arc::new(crate::access::AccessControl::new(
            api_token,
            crate::access::Sessions::open(data_dir.as_deref()),
            config,
        ));
        let access_log = crate::access::log::AccessLog::start(store.clone(), peer_id.clone());
        let pharmacy = Arc::new(crate::pharmacy::Pharmacy::new(
            store.clone(),
            peer_id.clone(),
        ));
        Ok(Self {
            inner: Arc::new(StateInner {
                access,
                access_log,
                mobile: Arc::new(crate::mobile::MobileSync::new(
                    store.clone(),
                    pharmacy.clone(),
                    peer_id.clone(),
                )),
                users: Arc::new(crate::users::Users::new(store.clone())),
                pharmacy,
                store,
                mesh: None,
                gateway: None,
                hub: None,
                peer_id,
                data_dir,
                tls: None,
                protection: None,
                started: std::time::Instant::now(),
            }),
        })
    }

    /// The same state with the Hikma hub this node serves (for `/v1/hub`).
    pub fn with_hub(self, hub: Arc<crate::hub::Hub>) -> Self {
        self.rebuilt(|inner| inner.hub = Some(hub))
    }

    /// The Hikma hub this node serves, if it serves one.
    pub fn hub(&self) -> Option<&Arc<crate::hub::Hub>> {
        self.inner.hub.as_ref()
    }

    /// The same state with the mesh attached (for `/v1/peers`).
    pub fn with_mesh(self, mesh: crate::mesh::Mesh) -> Self {
        self.rebuilt(|inner| inner.mesh = Some(mesh))
    }

    /// The same state with the node's gateway attached (for `/v1/gateway`).
    pub fn with_gateway(self, gateway: crate::gateway::GatewayHandle) -> Self {
        self.rebuilt(|inner| inner.gateway = Some(gateway))
    }

    /// The same state serving HTTPS with this certificate (for `/v1/status`).
    pub fn with_tls(self, fingerprint: String, cert: PathBuf) -> Self {
        self.rebuilt(|inner| inner.tls = Some((fingerprint, cert)))
    }

    /// The same state knowing how the store is protected at rest (for `/v1/status`).
    pub fn with_protection(self, protection: crate::keys::Protection) -> Self {
        self.rebuilt(|inner| inner.protection = Some(protection))
    }

    /// How the store is protected at rest, when known.
    pub fn protection(&self) -> Option<crate::keys::Protection> {
        self.inner.protection
    }

    /// The API certificate's fingerprint and file, when it serves HTTPS.
    pub fn tls(&self) -> Option<&(String, PathBuf)> {
        self.inner.tls.as_ref()
    }

    fn rebuilt(self, change: impl FnOnce(&mut StateInner)) -> Self {
        let mut inner = StateInner {
            store: self.inner.store.clone(),
            pharmacy: self.inner.pharmacy.clone(),
            mobile: self.inner.mobile.clone(),
            users: self.inner.users.clone(),
            access: self.inner.access.clone(),
            access_log: self.inner.access_log.clone(),
            mesh: self.inner.mesh.clone(),
            gateway: self.inner.gateway.clone(),
            hub: self.inner.hub.clone(),
            peer_id: self.inner.peer_id.clone(),
            data_dir: self.inner.data_dir.clone(),
            tls: self.inner.tls.clone(),
            protection: self.inner.protection,
            started: self.inner.started,
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The node's gateway to the cloud, when it is one.
    pub fn gateway(&self) -> Option<&crate::gateway::GatewayHandle> {
        self.inner.gateway.as_ref()
    }

    /// The pharmacy.
    pub fn pharmacy(&self) -> Arc<crate::pharmacy::Pharmacy> {
        self.inner.pharmacy.clone()
    }

    /// The Hikma app's sync.
    pub fn mobile(&self) -> Arc<crate::mobile::MobileSync> {
        self.inner.mobile.clone()
    }

    /// The users who sign in to the app.
    pub fn users(&self) -> Arc<crate::users::Users> {
        self.inner.users.clone()
    }

    /// The node's credentials and rules.
    pub fn access(&self) -> &crate::access::AccessControl {
        &self.inner.access
    }

    /// The access log.
    pub fn access_log(&self) -> &crate::access::log::AccessLog {
        &self.inner.access_log
    }

    /// The mesh, when the node runs one.
    pub fn mesh(&self) -> Option<&crate::mesh::Mesh> {
        self.inner.mesh.as_ref()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The node's peer id.
    pub fn peer_id(&self) -> &str {
        &self.inner.peer_id
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let import = Router::new()
        .route("/v1/{collection}/_import", post(records::import))
        .layer(DefaultBodyLimit::max(MAX_IMPORT_BODY));
    let app = Router::new()
        .route("/api/v2/sync", get(mobile::pull).post(mobile::push))
        .route("/api/login", post(mobile::login))
        .layer(DefaultBodyLimit::max(mobile::MAX_PUSH_BODY));
    let router = Router::new()
        .route("/health", get(status::health))
        .route("/v1/status", get(status::status))
        .route("/v1/changes", get(status::changes))
        .route("/v1/gateway", get(status::gateway))
        .route("/v1/peers", get(peers::list).post(peers::add))
        .route("/v1/peers/{peer_id}", axum::routing::delete(peers::forget))
        .route("/v1/peers/{peer_id}/verify", post(peers::verify))
        .route("/v1/devices", get(peers::devices))
        .route("/v1/devices/{peer_id}/revoke", post(peers::revoke))
        .route("/v1/devices/{peer_id}/clinics", post(peers::set_clinics))
        .route("/v1/invites", post(peers::invite))
        .route("/v1/hub", get(hub::info))
        .route("/v1/hub/clients", get(hub::clients))
        .route(
            "/v1/hub/clients/{client_id}",
            axum::routing::delete(hub::remove),
        )
        .route("/v1/pharmacy/restock", post(pharmacy::restock))
        .route("/v1/pharmacy/dispense", post(pharmacy::dispense))
        .route("/v1/pharmacy/count", post(pharmacy::count))
        .route("/v1/pharmacy/adjust", post(pharmacy::adjust))
        .route("/v1/pharmacy/stock", get(pharmacy::stock))
        .route("/v1/pharmacy/alerts", get(pharmacy::alerts))
        .route("/v1/pharmacy/verify", get(pharmacy::verify))
        .route("/v1/pharmacy/levels", get(pharmacy::levels))
        .route("/v1/drugs/search", get(pharmacy::search))
        .route("/v1/{collection}", post(records::create).get(records::list))
        .route(
            "/v1/{collection}/{id}",
            get(records::get_one)
                .patch(records::patch)
                .put(records::replace)
                .delete(records::delete),
        )
        .route("/v1/{collection}/{id}/history", get(records::history))
        .route(
            "/v1/{collection}/{id}/conflicts",
            get(records::conflicts).post(records::choose),
        )
        .layer(DefaultBodyLimit::max(MAX_RECORD_BODY))
        .route("/v1/sessions", post(sessions::open))
        .route(
            "/v1/sessions/current",
            axum::routing::delete(sessions::close),
        )
        .route("/v1/me", get(sessions::me))
        .merge(import)
        .merge(app)
        .merge(crate::console::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::access::guard,
        ))
        .with_state(state.clone());
    cors(&state, router)
}

/// CORS answers for the configured origins only; none by default, so a web page of
/// another origin cannot read the node's answers.
fn cors(state: &AppState, router: Router) -> Router {
    let origins: Vec<axum::http::HeaderValue> = state
        .access()
        .cors_origins()
        .iter()
        .filter_map(|o| o.parse().ok())
        .collect();
    if origins.is_empty() {
        return router;
    }
    router.layer(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::PUT,
                axum::http::Method::PATCH,
                axum::http::Method::DELETE,
            ])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
            ]),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_endpoint",
        "there is no such endpoint; see the README for the API",
    )
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request was interrupted; try again",
        )
    })?
}
