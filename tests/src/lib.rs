//! # medmesh-tests
//!
//! Multi-process tests and benchmarks: helpers to find the `medmesh` binary, start real
//! nodes as child processes on loopback, wait for them, and read their memory use.
//! The tests are in `tests/`, the benchmark programs in `src/bin/`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod cloud;
pub mod hub;
pub mod proxy;
pub mod sim;

/// The `medmesh` binary of this build (`MEDMESH_BIN` overrides).
pub fn medmesh_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MEDMESH_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/test-xxxx or target/<profile>/bench
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(format!("medmesh{}", std::env::consts::EXE_SUFFIX));
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the medmesh binary was not found next to {}; build it first (cargo build -p medmesh) or set MEDMESH_BIN",
        exe.display()
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A `medmesh start` child process on loopback, without mDNS.
pub struct NodeProcess {
    /// The child.
    pub child: Child,
    /// Its API address (`127.0.0.1:port`).
    pub api: String,
    /// Its data directory.
    pub data: PathBuf,
    /// Its libp2p listen address.
    pub listen: String,
}

impl NodeProcess {
    /// Starts a node on `data` and waits until its API answers.
    pub fn start(data: &Path) -> Result<Self> {
        Self::start_with(medmesh_bin().as_path(), data)
    }

    /// Starts a node from a given binary.
    pub fn start_with(bin: &Path, data: &Path) -> Result<Self> {
        Self::start_full(bin, data, &[], None, &[])
    }

    /// Starts a node connecting to `peers`, on `listen` (a free port when `None`).
    pub fn start_peered(data: &Path, peers: &[String], listen: Option<String>) -> Result<Self> {
        Self::start_full(medmesh_bin().as_path(), data, peers, listen, &[])
    }

    /// Starts a node connecting to `peers`, with more `start` arguments.
    pub fn start_with_args(data: &Path, peers: &[String], extra: &[&str]) -> Result<Self> {
        Self::start_full(medmesh_bin().as_path(), data, peers, None, extra)
    }

    /// Starts a gateway node to the cloud at `url` with the hub key in `key_file`,
    /// connecting to `peers`, a round every `interval` seconds.
    pub fn start_gateway(
        data: &Path,
        url: &str,
        key_file: &Path,
        peers: &[String],
        interval: &str,
    ) -> Result<Self> {
        let key_file = key_file
            .to_str()
            .context("the key file's path is not text")?;
        Self::start_with_args(
            data,
            peers,
            &[
                "--gateway",
                url,
                "--hub-key-file",
                key_file,
                "--gateway-interval",
                interval,
            ],
        )
    }

    /// Starts a node connecting to `peers` with more environment variables.
    pub fn start_peered_env(data: &Path, peers: &[String], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_full_env(medmesh_bin().as_path(), data, peers, None, &[], env)
    }

    fn start_full(
        bin: &Path,
        data: &Path,
        peers: &[String],
        listen: Option<String>,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_full_env(bin, data, peers, listen, extra, &[])
    }

    fn start_full_env(
        bin: &Path,
        data: &Path,
        peers: &[String],
        listen: Option<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        // A free port found here can be taken by another test's node before this one
        // binds it: such a node exits at once, and a second try takes other ports.
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(bin, data, peers, listen.clone(), extra, env) {
                Err(err)
                    if tries < 3
                        && listen.is_none()
                        && format!("{err:#}").contains("exited before it was ready") =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn start_once(
        bin: &Path,
        data: &Path,
        peers: &[String],
        listen: Option<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        give_test_token(data)?;
        let api = format!("127.0.0.1:{}", free_port());
        let listen = listen.unwrap_or_else(|| format!("/ip4/127.0.0.1/tcp/{}", free_port()));
        let mut command = Command::new(bin);
        if std::env::var_os("MEDMESH_LOG").is_none() {
            command.env("MEDMESH_LOG", "warn");
        }
        command
            .args(["start", "--no-mdns", "--data"])
            .arg(data)
            .args(["--api", &api, "--listen", &listen]);
        for peer in peers {
            command.args(["--peer", peer]);
        }
        command.args(extra);
        command.envs(env.iter().copied());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut node = Self {
            child,
            api,
            data: data.to_path_buf(),
            listen,
        };
        node.wait_ready(Duration::from_secs(30))?;
        Ok(node)
    }

    /// The API's base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the node exited before it was ready: {status}");
            }
            if std::net::TcpStream::connect(&self.api).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the node did not answer on {} within {timeout:?}", self.api)
    }

    /// Kills the node with SIGKILL (no chance to flush anything).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the node with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: sending a signal to our own child process by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    /// Resident memory now and at its peak, in bytes (Linux).
    pub fn rss(&self) -> Option<(u64, u64)> {
        process_rss(self.child.id())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Current and peak resident memory of a process, in bytes, from /proc.
pub fn process_rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A generated patient record of about 600 bytes of JSON, like a Hikma Health patient.
pub fn patient(i: usize) -> serde_json::Value {
    const GIVEN: [&str; 8] = [
        "Amina", "Bola", "Chidi", "Dina", "Emeka", "Fatima", "Grace", "Hassan",
    ];
    const SURNAME: [&str; 8] = [
        "Okafor", "Bello", "Haddad", "Mensah", "Diallo", "Nwosu", "Kamara", "Osei",
    ];
    const TOWNS: [&str; 4] = ["Kano", "Jos", "Maiduguri", "Yola"];
    const BLOOD: [&str; 4] = ["A+", "B+", "O+", "AB-"];
    serde_json::json!({
        "id": uuid::Uuid::now_v7().to_string(),
        "given_name": format!("{}{}", GIVEN[i % 8], i),
        "surname": SURNAME[(i / 8) % 8],
        "date_of_birth": format!("{:04}-{:02}-{:02}", 1950 + i % 70, 1 + i % 12, 1 + i % 28),
        "citizenship": "Nigerian",
        "hometown": TOWNS[i % 4],
        "phone": format!("+234 803 {:03} {:04}", i % 1000, i % 10000),
        "sex": if i.is_multiple_of(2) { "female" } else { "male" },
        "camp": format!("Camp {}", i % 12),
        "government_id": format!("NIN-{:011}", i),
        "external_patient_id": format!("EXT-{i:08}"),
        "primary_clinic_id": "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e",
        "additional_data": {"blood_group": BLOOD[i % 4], "allergies": ["penicillin"], "notes": "registered at outreach", "emergency_contact": format!("+234 806 {:03} {:04}", (i * 7) % 1000, (i * 13) % 10000)},
        "image_timestamp": 1_715_000_000_000i64 + i as i64,
        "metadata": {"source": "hikma-mobile", "app_version": "2.4.1"},
        "photo_url": ""
    })
}

/// A node running inside this process: store, mesh and API, on 127.0.0.1 with ports the
/// system picks, without mDNS.
pub struct InProcessNode {
    /// The store.
    pub store: medmesh_storage::Store,
    /// The mesh handle.
    pub mesh: medmesh::mesh::Mesh,
    /// The node's peer id.
    pub peer_id: String,
    /// The API address.
    pub api: std::net::SocketAddr,
    /// Its libp2p address, with `/p2p/<peer id>`.
    pub addr: libp2p::Multiaddr,
    shutdown: tokio_util::sync::CancellationToken,
    mesh_task: Option<tokio::task::JoinHandle<()>>,
    api_task: Option<medmesh::server::RunningApi>,
}

impl InProcessNode {
    /// Starts a node on `dir` (created when new), connecting to `peers`.
    pub async fn start(dir: &Path, peers: Vec<libp2p::Multiaddr>) -> Result<Self> {
        // A node of this directory that was just stopped in this process may still be
        // letting go of its database (connections and tasks end after `stop` returns),
        // as a restarted process waits for the old one to exit.
        give_test_token(dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let opened = loop {
            match medmesh::server::open_data_async(dir.to_path_buf(), None).await {
                Ok(opened) => break opened,
                Err(err)
                    if format!("{err:#}").contains("already using it")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err),
            }
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (mesh, mesh_task) = medmesh::mesh::start(
            opened.store.clone(),
            opened.keypair.clone(),
            opened.trust.clone(),
            medmesh::mesh::MeshConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
                peers,
                mdns: false,
                mdns_interfaces: Vec::new(),
                data_dir: Some(dir.to_path_buf()),
            },
            shutdown.clone(),
        )
        .await?;
        let state = medmesh::api::AppState::new(
            opened.store.clone(),
            opened.peer_id.clone(),
            Some(dir.to_path_buf()),
        )?
        .with_mesh(mesh.clone());
        let api = medmesh::server::serve_api(state, "127.0.0.1:0".parse()?).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listen = loop {
            if let Some(addr) = mesh.listen_addrs().await?.into_iter().next() {
                break addr;
            }
            if Instant::now() > deadline {
                bail!("the node never listened");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let peer: libp2p::PeerId = opened.peer_id.parse()?;
        Ok(Self {
            store: opened.store,
            mesh,
            peer_id: opened.peer_id,
            api: api.addr,
            addr: listen.with(libp2p::multiaddr::Protocol::P2p(peer)),
            shutdown,
            mesh_task: Some(mesh_task),
            api_task: Some(api),
        })
    }

    /// The API's URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Stops the node cleanly and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.mesh_task.take() {
            let _ = task.await;
        }
        if let Some(api) = self.api_task.take() {
            api.shutdown.cancel();
            let _ = api.task.await;
        }
    }
}

/// Admits the device of data directory `to` (created when new) to the mesh of `from`, an
/// admin device's directory, as a tablet: what `medmesh init --join` gets from an invite,
/// without the invite's round trip.
pub fn join_mesh(from: &Path, to: &Path) -> Result<()> {
    join_mesh_with(from, to, true)
}

/// [`join_mesh`], the new device's store encrypted or not (for benchmarks).
pub fn join_mesh_with(from: &Path, to: &Path, encrypt: bool) -> Result<()> {
    join_mesh_serving(from, to, encrypt, &[])
}

/// [`join_mesh_with`], the new device serving `clinics` (none: all).
pub fn join_mesh_serving(from: &Path, to: &Path, encrypt: bool, clinics: &[String]) -> Result<()> {
    let owner =
        medmesh::trust::read_owner(from)?.context("the first directory holds no owner key")?;
    // Its own thread: the store blocks, and tests call this from inside a runtime.
    let dir = to.to_path_buf();
    let keypair = std::thread::spawn(move || {
        medmesh::server::open_identity_with(&dir, encrypt).map(|(store, keypair)| {
            drop(store);
            keypair
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("opening the new device's store failed"))??;
    let peer = medmesh::identity::peer_id(&keypair).to_string();
    let mut cert = medmesh_protocol::membership::DeviceCert::new(
        &peer,
        &format!("test device {}", &peer[peer.len() - 4..]),
        medmesh_protocol::membership::DeviceKind::Tablet,
        chrono::Utc::now().timestamp_millis(),
    );
    cert.clinics = clinics.to_vec();
    let cert = owner.issue(cert)?;
    medmesh::trust::write_membership(to, &owner.root(), &cert, None)
}

#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct StreamOnly {
    stream: libp2p_stream::Behaviour,
}

/// Opens the sync stream to the node `peer` at `target` from a fresh libp2p identity, as
/// any program on the network could (hostile peers in tests). Answers the stream, this
/// side's peer id, and the task driving the connection (abort it when done).
pub async fn open_sync_stream(
    target: &libp2p::Multiaddr,
    peer: libp2p::PeerId,
) -> Result<(libp2p::Stream, libp2p::PeerId, tokio::task::JoinHandle<()>)> {
    open_sync_stream_as(target, peer, libp2p::identity::Keypair::generate_ed25519()).await
}

/// [`open_sync_stream`] as the device of `identity`.
pub async fn open_sync_stream_as(
    target: &libp2p::Multiaddr,
    peer: libp2p::PeerId,
    identity: libp2p::identity::Keypair,
) -> Result<(libp2p::Stream, libp2p::PeerId, tokio::task::JoinHandle<()>)> {
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| StreamOnly {
            stream: libp2p_stream::Behaviour::new(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let local = *swarm.local_peer_id();
    let mut control = swarm.behaviour().stream.new_control();
    swarm.dial(target.clone())?;
    let driver = tokio::spawn(async move {
        loop {
            let _ = futures::StreamExt::select_next_some(&mut swarm).await;
        }
    });
    let stream = control
        .open_stream(peer, medmesh::mesh::SYNC_PROTOCOL)
        .await
        .context("cannot open the sync stream")?;
    Ok((stream, local, driver))
}

/// A benchmark row's verdict: (printed, in BENCHMARKS.md). A figure without a target has
/// none; one that misses its target says so.
pub fn verdict(target: &str, holds: bool) -> (&'static str, &'static str) {
    match (target.is_empty(), holds) {
        (true, _) => ("", ""),
        (false, true) => ("holds", "yes"),
        (false, false) => ("MISSED", "**no**"),
    }
}

/// One figure of a benchmark, with its target (empty when it has none).
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The target, in words ("≥ 5,000 records/s"), or empty.
    pub target: String,
    /// Whether the figure meets its target.
    pub holds: bool,
}

/// The Markdown table of a benchmark's figures, each with its verdict.
pub fn figures_table(figures: &[Figure]) -> String {
    let mut table = String::from("| figure | value | target | holds |\n|---|---|---|---|\n");
    for f in figures {
        let value = if f.value >= 100.0 {
            format!("{:.0}", f.value)
        } else {
            format!("{:.3}", f.value)
        };
        let (_, holds) = verdict(&f.target, f.holds);
        table.push_str(&format!(
            "| {} | {value} {} | {} | {holds} |\n",
            f.name, f.unit, f.target
        ));
    }
    table
}

/// Waits until `check` holds, polling; fails after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Replaces (or appends) the section of BENCHMARKS.md between `<!-- name:start -->` and
/// `<!-- name:end -->`.
pub fn update_benchmarks(path: &Path, name: &str, section: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# medmesh benchmarks\n\nFigures written by the benchmark programs; each section says how to reproduce it.\n\n".into()
    });
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->\n");
    let updated = match (existing.find(&start), existing.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!("{existing}\n{section}"),
    };
    std::fs::write(path, updated).with_context(|| format!("cannot write {}", path.display()))
}

/// A data key from 64 hex digits (the crash tests' encrypted stores).
pub fn key_from_hex(hex: &str) -> Result<medmesh_storage::DataKey> {
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(
            hex.get(2 * i..2 * i + 2)
                .context("a key has 64 hex digits")?,
            16,
        )
        .context("a key has 64 hex digits")?;
    }
    Ok(medmesh_storage::DataKey::from_bytes(bytes))
}

/// The API token every node of the tests is given (written into its data directory
/// before it starts, where a node keeps its token across starts), so that one HTTP
/// client of the tests can call every node.
pub const TEST_TOKEN: &str = "mm_the-token-of-every-node-in-the-tests-0000";

/// Imports the patients `records` (of [`patient`]) into `node`, 1,000 a request.
pub async fn import_patients(
    http: &reqwest::Client,
    node: &NodeProcess,
    records: std::ops::Range<usize>,
) -> Result<()> {
    let indexes: Vec<usize> = records.collect();
    for chunk in indexes.chunks(1000) {
        let batch: Vec<serde_json::Value> = chunk.iter().copied().map(patient).collect();
        let response = http
            .post(node.url("/v1/patients/_import"))
            .json(&serde_json::json!({ "records": batch }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the import answered {}",
            response.status()
        );
    }
    Ok(())
}

/// Gives the node of data directory `dir` the tests' token.
pub fn give_test_token(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    medmesh::access::tokens::write_private(
        &dir.join(medmesh::access::tokens::API_TOKEN_FILE),
        TEST_TOKEN,
    )
}

/// The HTTP client of the tests: every request carries the tests' token. Every test
/// calls the API through this client (or [`Api`]), so what a request must carry is set
/// in one place.
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {TEST_TOKEN}");
    if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap_or_default()
}

/// `medmesh init --data DIR`: a new node founding a new mesh (its first admin's password
/// generated, as with no terminal).
pub fn init_node(dir: &Path) {
    let out = medmesh_command()
        .args(["init", "--data"])
        .arg(dir)
        .output()
        .expect("init");
    assert!(out.status.success(), "medmesh init failed: {out:?}");
}

/// `medmesh invite --data DIR EXTRA…` on an admin node's directory: the invite (the
/// output's last line).
pub fn invite_device(dir: &Path, extra: &[&str]) -> String {
    let out = medmesh_command()
        .args(["invite", "--data"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run medmesh invite");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("an invite line")
        .trim()
        .to_owned()
}

/// `medmesh init --data DIR --join INVITE --name NAME`: a device joining with an invite
/// (its admin node running).
pub fn join_with_invite(dir: &Path, invite: &str, name: &str) -> std::process::Output {
    medmesh_command()
        .args(["init", "--data"])
        .arg(dir)
        .args(["--join", invite, "--name", name])
        .output()
        .expect("run medmesh init --join")
}

/// A `medmesh` command with the tests' token (for the commands that call a node).
pub fn medmesh_command() -> Command {
    let mut command = Command::new(medmesh_bin());
    command.env("MEDMESH_TOKEN", TEST_TOKEN);
    command
}

/// A node's HTTP API, as the tests call it: every request of the tests goes through here,
/// so what every request must carry is added in one place.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// The API at `addr` (`127.0.0.1:port`).
    pub fn new(addr: &str) -> Self {
        Self {
            http: http(),
            base: format!("http://{addr}"),
        }
    }

    /// The API at `addr` with another client (other credentials, or none).
    pub fn with_client(addr: &str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: format!("http://{addr}"),
        }
    }

    /// A request; answers the status and the JSON body (null when there is none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}
