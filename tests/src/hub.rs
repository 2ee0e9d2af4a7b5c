//! A client of a node's Hikma hub RPC that does what the Hikma app does: it pairs
//! (handshakes with a fresh X25519 key, under one `client_id` per install), signs in with
//! `login`, and sends sealed commands and queries, handshaking again whenever the app does.

use anyhow::{Context, Result, bail};
use medmesh_protocol::hub::{Aad, HubKey, b64, open, seal};
use serde_json::{Value, json};

/// How the hub answered a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 200 with a payload that decrypted: the result.
    Ok(Value),
    /// 200 with `success: false` (what the app shows as a failure).
    Failed(String),
    /// Another status, with the body's text.
    Status(u16, String),
}

impl Answer {
    /// The result, or an error saying what came instead.
    pub fn ok(self) -> Result<Value> {
        match self {
            Answer::Ok(value) => Ok(value),
            other => bail!("the hub answered {other:?}"),
        }
    }
}

/// One app install paired with one hub.
pub struct HubClient {
    http: reqwest::Client,
    url: String,
    /// The install's `hub_client_id`.
    pub client_id: String,
    key: [u8; 32],
    /// The hub's public key, as the handshake gave it.
    pub hub_public_key: String,
    /// The hub's id, as the handshake gave it.
    pub hub_id: String,
    /// The token from `login`.
    pub token: Option<String>,
    /// The last request body sent (to replay it).
    pub last_request: Option<(String, Value)>,
}

impl HubClient {
    /// Pairs with the hub at `url` (what the QR code names) as a new install.
    pub async fn pair(url: &str) -> Result<Self> {
        let mut client = Self {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            client_id: uuid::Uuid::new_v4().to_string(),
            key: [0; 32],
            hub_public_key: String::new(),
            hub_id: String::new(),
            token: None,
            last_request: None,
        };
        client.handshake().await?;
        Ok(client)
    }

    /// A new handshake: a fresh ephemeral key, the same client id.
    pub async fn handshake(&mut self) -> Result<()> {
        let mine = HubKey::generate()?;
        let response = self
            .http
            .post(format!("{}/rpc/handshake", self.url))
            .json(&json!({"client_id": self.client_id, "client_public_key": b64(&mine.public())}))
            .send()
            .await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if status != 200 {
            bail!("the handshake was refused ({status}): {text}");
        }
        let answer: Value = serde_json::from_str(&text).context("the handshake's answer")?;
        if answer["success"] != json!(true) {
            bail!("the handshake failed: {answer}");
        }
        let hub_public = answer["hub_public_key"].as_str().context("no hub key")?;
        let hub_bytes = medmesh_protocol::hub::unb64(hub_public)?;
        self.key = mine.client_session_key(&hub_bytes)?;
        self.hub_public_key = hub_public.to_owned();
        self.hub_id = answer["hub_id"].as_str().unwrap_or_default().to_owned();
        Ok(())
    }

    /// `login` with these credentials; keeps the token when it succeeds.
    pub async fn login(&mut self, email: &str, password: &str) -> Result<Answer> {
        let answer = self
            .command("login", json!({"email": email, "password": password}))
            .await?;
        if let Answer::Ok(value) = &answer {
            self.token = value["token"].as_str().map(str::to_owned);
        }
        Ok(answer)
    }

    /// A sealed command.
    pub async fn command(&mut self, name: &str, data: Value) -> Result<Answer> {
        let inner = json!({"command": name, "data": data, "token": self.token});
        self.sealed("command", Aad::Command, Aad::CommandResponse, &inner)
            .await
    }

    /// A sealed query.
    pub async fn query(&mut self, name: &str, params: Value) -> Result<Answer> {
        let inner = json!({"query": name, "params": params, "token": self.token});
        self.sealed("query", Aad::Query, Aad::QueryResponse, &inner)
            .await
    }

    /// What the app does in online mode: a fresh handshake, then the query.
    pub async fn online_query(&mut self, name: &str, params: Value) -> Result<Value> {
        self.handshake().await?;
        self.query(name, params).await?.ok()
    }

    /// What the app does in online mode: a fresh handshake, then the command.
    pub async fn online_command(&mut self, name: &str, data: Value) -> Result<Value> {
        self.handshake().await?;
        self.command(name, data).await?.ok()
    }

    async fn sealed(
        &mut self,
        endpoint: &str,
        aad: Aad,
        reply: Aad,
        inner: &Value,
    ) -> Result<Answer> {
        let payload = seal(&self.key, aad, inner.to_string().as_bytes())?;
        let body = json!({"client_id": self.client_id, "payload": payload});
        self.last_request = Some((endpoint.to_owned(), body.clone()));
        self.post(endpoint, &body, reply).await
    }

    /// Sends the last request again, as it was (a replay).
    pub async fn replay(&mut self) -> Result<Answer> {
        let (endpoint, body) = self.last_request.clone().context("nothing sent yet")?;
        let reply = if endpoint == "command" {
            Aad::CommandResponse
        } else {
            Aad::QueryResponse
        };
        self.post(&endpoint, &body, reply).await
    }

    async fn post(&self, endpoint: &str, body: &Value, reply: Aad) -> Result<Answer> {
        let response = self
            .http
            .post(format!("{}/rpc/{endpoint}", self.url))
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if status != 200 {
            return Ok(Answer::Status(status, text));
        }
        let answer: Value = serde_json::from_str(&text).context("the answer is not JSON")?;
        if answer["success"] != json!(true) {
            return Ok(Answer::Failed(
                answer["error"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        let payload = answer["payload"].as_str().context("no payload")?;
        let (plain, _) = open(&self.key, reply, payload).context("the payload does not decrypt")?;
        Ok(Answer::Ok(serde_json::from_slice(&plain)?))
    }
}
