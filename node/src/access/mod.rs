//! Who is asking, and whether they may: every API request passes [`guard`] first.
//!
//! - The `Host` header must name the node: an IP address, `localhost`, or a name given
//!   with `--api-host`. A web page that rebinds its own domain name to the node gets 421.
//! - A request with a body must say it is JSON (`/v1`: 415 otherwise), so a cross-site
//!   form cannot post to the node. No CORS headers are sent unless origins are configured.
//! - Every `/v1` endpoint needs a credential: HTTP Basic with a user of the mesh, a
//!   session token from `POST /v1/sessions`, or the node's own token (`DIR/api-token`,
//!   what the command line uses). `/health` and the console's files (`/`, `/console/`)
//!   need none; the Hikma app's `/api` endpoints check the app's own credentials and
//!   answer in the app's forms.
//! - What a caller may do is the role matrix in [`roles`].

pub mod log;
pub mod roles;
pub mod tokens;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use medmesh_protocol::ChangeAuthor;
use medmesh_protocol::record::Fields;
use medmesh_storage::{Filter, Query};
use serde_json::Value;

use crate::api::{ApiError, AppState};
pub use roles::{Access as AccessKind, ClinicFlags, Permission, Role};
pub use tokens::{ApiToken, Sessions};

/// What the API accepts beyond its defaults.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Names the node may be reached by (besides IP addresses and `localhost`).
    pub hosts: Vec<String>,
    /// Web origins allowed to call the API from a browser (CORS); none by default.
    pub cors_origins: Vec<String>,
}

/// The node's credentials and rules.
#[derive(Debug)]
pub struct AccessControl {
    api_token: ApiToken,
    /// The open sessions.
    pub sessions: Sessions,
    config: AccessConfig,
}

impl AccessControl {
    /// Access with this node token, these sessions and this configuration.
    pub fn new(api_token: ApiToken, sessions: Sessions, config: AccessConfig) -> Self {
        Self {
            api_token,
            sessions,
            config: AccessConfig {
                hosts: config
                    .hosts
                    .iter()
                    .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                cors_origins: config.cors_origins,
            },
        }
    }

    /// The configured CORS origins.
    pub fn cors_origins(&self) -> &[String] {
        &self.config.cors_origins
    }

    /// Whether the `Host` header names this node.
    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let host = host.trim();
        // `[v6]:port`, `v4:port`, `name:port`, or without the port.
        let name = if let Some(rest) = host.strip_prefix('[') {
            match rest.split_once(']') {
                Some((inside, _)) => inside,
                None => return false,
            }
        } else {
            host.rsplit_once(':').map_or(host, |(name, _)| name)
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || self.config.hosts.contains(&name)
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user's record id (none for the node's own token).
    pub user_id: Option<String>,
    /// How the caller is named in history and the access log (a user's email).
    pub name: String,
    /// Their role.
    pub role: Role,
    /// Their `user_clinic_permissions` rows.
    pub flags: Arc<ClinicFlags>,
}

impl Caller {
    /// The node's own command line.
    pub fn device() -> Self {
        Self {
            user_id: None,
            name: "this device's command line".into(),
            role: Role::Device,
            flags: Arc::default(),
        }
    }

    /// Whether the caller has `permission` (at `clinic`, when the record names one).
    pub fn allows(&self, permission: Permission, clinic: Option<&str>) -> bool {
        self.role.may(permission)
            && permission
                .flag()
                .is_none_or(|flag| self.flags.grants(self.role, flag, clinic))
    }

    /// Ok when the caller has `permission`; else the 403 that names it.
    pub fn require(&self, permission: Permission, clinic: Option<&str>) -> Result<(), ApiError> {
        if !self.role.may(permission) {
            return Err(forbidden(
                permission,
                format!(
                    "{} is a {} and may not do this: it needs the permission `{permission}`; ask an admin if that is wrong",
                    self.name, self.role
                ),
            ));
        }
        if let Some(flag) = permission.flag()
            && !self.flags.grants(self.role, flag, clinic)
        {
            let place = clinic.map_or_else(
                || "at any of their clinics".to_owned(),
                |c| format!("at clinic {c}"),
            );
            return Err(forbidden(
                permission,
                format!(
                    "{} may not do this {place}: it needs the permission `{permission}` (`{}` in their clinic permissions); an admin can grant it",
                    self.name,
                    flag.column()
                ),
            ));
        }
        Ok(())
    }

    /// The author of the changes this caller makes on `device`.
    pub fn author(&self, device: &str) -> ChangeAuthor {
        ChangeAuthor {
            device: device.to_owned(),
            user: Some(self.name.clone()),
        }
    }
}

fn forbidden(permission: Permission, message: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::FORBIDDEN, "forbidden", message);
    error.permission = Some(permission.name());
    error
}

fn unauthenticated(message: impl Into<String>) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer realm=\"medmesh\""),
    );
    response
}

const HOW_TO_SIGN_IN: &str = "sign in with POST /v1/sessions (email and password) and send the token as `Authorization: Bearer TOKEN`, or send a user's email and password with HTTP Basic; on this device, the command line finds the node's token in its data directory (or give --token)";

fn is_json(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Some(
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")),
    )
}

/// The guard in front of every endpoint (see the module's documentation).
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let access = state.access();
    if !access.host_allowed(request.headers()) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_host",
            "this request names another host than this node: open the node by its IP address or `localhost` (or start it with --api-host NAME for a name)",
        )
        .into_response();
    }
    let path = request.uri().path().to_owned();
    let has_body = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    if has_body {
        let json = is_json(request.headers());
        // The app's endpoints take what the app sends; a browser form never says JSON.
        let refused = if path.starts_with("/api/") {
            json == Some(false)
        } else {
            json != Some(true)
        };
        if refused {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not_json",
                "the request body must be JSON, sent with `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    let signs_in = path == "/v1/sessions" && *request.method() == Method::POST;
    let page = matches!(*request.method(), Method::GET | Method::HEAD)
        && crate::console::is_console(&path);
    if path == "/health"
        || page
        || path.starts_with("/api/")
        || signs_in
        || *request.method() == Method::OPTIONS
    {
        return next.run(request).await;
    }
    match authenticate(&state, request.headers()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(answer) => answer,
    }
}

/// The credentials of a request: `Basic` (email, password) or `Bearer` (token).
pub enum Credential {
    /// Email and password.
    Basic(String, String),
    /// A token.
    Bearer(String),
}

/// The credential a request carries, if any.
pub fn credential(headers: &HeaderMap) -> Option<Credential> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Credential::Bearer(rest.trim().to_owned()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (email, password) = text.split_once(':')?;
    Some(Credential::Basic(email.to_owned(), password.to_owned()))
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(credential) = credential(headers) else {
        return Err(unauthenticated(format!(
            "this request has no credential: {HOW_TO_SIGN_IN}"
        )));
    };
    // The node's own token needs no store read: checked here, without a thread hop.
    if let Credential::Bearer(token) = &credential
        && state.access().api_token.matches(token)
    {
        return Ok(Caller::device());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let state = state.clone();
    let found = tokio::task::spawn_blocking(move || -> anyhow::Result<Result<Caller, String>> {
        let user = match credential {
            Credential::Bearer(token) => {
                if state.access().api_token.matches(&token) {
                    return Ok(Ok(Caller::device()));
                }
                let Some(session) = state.access().sessions.find(&token, now) else {
                    return Ok(Err(format!(
                        "this token is unknown, expired or signed out: {HOW_TO_SIGN_IN}"
                    )));
                };
                match user_of_session(&state, &session)? {
                    Ok(user) => user,
                    Err(reason) => return Ok(Err(reason)),
                }
            }
            Credential::Basic(email, password) => {
                match state.users().authenticate(&email, &password)? {
                    Some(user) => user,
                    None => {
                        return Ok(Err(
                            "the email or password is wrong (or the user has no password set)"
                                .into(),
                        ));
                    }
                }
            }
        };
        caller_of(&state, &user)
    })
    .await;
    match found {
        Ok(Ok(Ok(caller))) => Ok(caller),
        Ok(Ok(Err(reason))) => Err(unauthenticated(reason)),
        Ok(Err(err)) => {
            tracing::error!(error = %format!("{err:#}"), "checking a credential failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the credential could not be checked; try again",
            )
            .into_response())
        }
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request was interrupted; try again",
        )
        .into_response()),
    }
}

/// The user record of a session.
pub fn user_of_session(
    state: &AppState,
    session: &tokens::Session,
) -> anyhow::Result<Result<Fields, String>> {
    match session.user_id.parse() {
        Ok(id) => match state.store().get("users", &id) {
            Ok(view) => Ok(Ok(view.record)),
            Err(medmesh_storage::StoreError::NotFound { .. }) => Ok(Err(format!(
                "the user of this token ({}) no longer exists",
                session.email
            ))),
            Err(err) => Err(err.into()),
        },
        Err(_) => Ok(Err("this token's user id is not valid".into())),
    }
}

/// Whether a user record is disabled or deleted.
pub fn is_disabled(user: &Fields) -> bool {
    ["disabled_at", "deleted_at"]
        .iter()
        .any(|f| user.get(*f).is_some_and(|v| !v.is_null()))
        || user
            .get("is_deleted")
            .and_then(Value::as_bool)
            .unwrap_or(false)
}

/// The caller a live user record makes: `Err(reason)` for a disabled user or an unknown
/// role. Reads their clinic permissions.
pub fn caller_of(state: &AppState, user: &Fields) -> anyhow::Result<Result<Caller, String>> {
    let email = user
        .get("email")
        .and_then(Value::as_str)
        .unwrap_or("a user")
        .to_owned();
    if is_disabled(user) {
        return Ok(Err(format!(
            "the user {email} is disabled; ask an admin (`medmesh users enable`)"
        )));
    }
    let role_name = user.get("role").and_then(Value::as_str).unwrap_or("");
    let Some(role) = Role::parse(role_name) else {
        return Ok(Err(format!(
            "the user {email} has the role `{role_name}`, which medmesh does not know (use one of {}); ask an admin to fix it",
            Role::ASSIGNABLE.join(", ")
        )));
    };
    let user_id = user.get("id").and_then(Value::as_str).map(str::to_owned);
    let mut rows = Vec::new();
    if let Some(id) = &user_id {
        let page = state.store().list(&Query {
            collection: "user_clinic_permissions".into(),
            filters: vec![Filter::Equals {
                field: "user_id".into(),
                value: id.clone(),
            }],
            limit: 1000,
            ..Query::default()
        })?;
        rows = page.records.into_iter().map(|v| v.record).collect();
    }
    let home = user
        .get("clinic_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Ok(Caller {
        user_id,
        name: email,
        role,
        flags: Arc::new(ClinicFlags::new(rows).at_home(home)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse().expect("header"));
        headers
    }

    #[test]
    fn only_hosts_that_name_the_node_pass() {
        let (token, _) = ApiToken::ephemeral();
        let access = AccessControl::new(
            token,
            Sessions::open(None),
            AccessConfig {
                hosts: vec!["Clinic-Laptop.local".into()],
                cors_origins: Vec::new(),
            },
        );
        for host in [
            "127.0.0.1:7400",
            "localhost:7400",
            "[::1]:7400",
            "192.168.1.20",
            "clinic-laptop.local:7400",
        ] {
            assert!(access.host_allowed(&headers(host)), "{host}");
        }
        for host in [
            "evil.example:7400",
            "localhost.evil.example",
            "127.0.0.1.nip.io:7400",
        ] {
            assert!(!access.host_allowed(&headers(host)), "{host}");
        }
        assert!(!access.host_allowed(&HeaderMap::new()));
    }
}
