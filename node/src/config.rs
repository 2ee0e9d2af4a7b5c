//! Command-line flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The default address of the local HTTP API: loopback only.
pub const DEFAULT_API: &str = "127.0.0.1:7400";
/// The default libp2p listen address.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/7401";

/// medmesh keeps a clinic's records in sync between devices, with no server.
#[derive(Debug, Parser)]
#[command(name = "medmesh", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where a node keeps its data.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// The node's data directory (default: the platform's data directory, e.g.
    /// ~/.local/share/medmesh).
    #[arg(long, env = "MEDMESH_DATA")]
    pub data: Option<PathBuf>,
    /// A file holding the passphrase that protects the node's data key (made with it on
    /// the first start; the passphrase may instead be in MEDMESH_PASSPHRASE).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl DataArgs {
    /// The directory to use.
    pub fn dir(&self) -> PathBuf {
        self.data.clone().unwrap_or_else(default_data_dir)
    }
}

/// The platform's data directory for medmesh.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("medmesh")
}

/// Which running node to talk to.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The node's HTTP API address.
    #[arg(long, env = "MEDMESH_API", default_value = DEFAULT_API)]
    pub api: String,
    /// The node's data directory, where the command finds the node's token (default: the
    /// platform's data directory).
    #[arg(long, env = "MEDMESH_DATA")]
    pub data: Option<PathBuf>,
    /// A token for the API (the node's own, or one from `POST /v1/sessions`), instead of
    /// the one in the data directory. Better given in MEDMESH_TOKEN than on the command
    /// line.
    #[arg(long, env = "MEDMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Flags of `medmesh start`.
#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    #[command(flatten)]
    /// Data directory.
    pub data: DataArgs,
    /// Address of the HTTP API. Loopback by default; use 0.0.0.0:7400 to serve the LAN.
    #[arg(long, env = "MEDMESH_API", default_value = DEFAULT_API)]
    pub api: SocketAddr,
    /// libp2p address to listen on for other nodes (repeatable).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: Vec<String>,
    /// A node to connect to directly, when discovery cannot see it (repeatable).
    #[arg(long)]
    pub peer: Vec<String>,
    /// Do not use mDNS discovery on the local network.
    #[arg(long)]
    pub no_mdns: bool,
    /// Use mDNS only on this network interface (repeatable; default all).
    #[arg(long = "mdns-interface", value_name = "NAME")]
    pub mdns_interfaces: Vec<String>,
    /// A schema file declaring extra collections (kept in the data directory for the
    /// next starts).
    #[arg(long, env = "MEDMESH_SCHEMA")]
    pub schema: Option<PathBuf>,
    /// Make this node the mesh's gateway to the Hikma cloud at this URL
    /// (e.g. https://demo.hikmahealth.org).
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// A file holding the cloud's hub key (hh_...) for --gateway. The key may instead be
    /// given in the MEDMESH_HUB_KEY environment variable; never on the command line.
    #[arg(long, value_name = "FILE")]
    pub hub_key_file: Option<PathBuf>,
    /// Seconds between the gateway's rounds when nothing changes.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub gateway_interval: u64,
    /// A name the API is reached by, e.g. clinic-laptop.local (repeatable); IP addresses
    /// and `localhost` always work. Requests naming another host are refused.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// A web origin allowed to call the API from a browser, e.g. https://console.example
    /// (repeatable; none by default).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Serve the API over plain HTTP on a non-loopback --api address (passwords and
    /// records then cross the network readable by anyone on it).
    #[arg(long, conflicts_with = "https")]
    pub insecure_http: bool,
    /// Serve the API over HTTPS also on loopback (it always is on the network).
    #[arg(long)]
    pub https: bool,
    /// The API's certificate chain (PEM), instead of the node's own self-signed one.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve the Hikma app's hub here (the app pairs by scanning `medmesh hub qr`);
    /// 0.0.0.0:4001 is what the app's own hub uses. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub hub_listen: Option<SocketAddr>,
    /// The URL tablets call for the hub (default: http:// this machine's address on its
    /// network and the --hub-listen port).
    #[arg(long, value_name = "URL", requires = "hub_listen")]
    pub hub_url: Option<String>,
}

/// `medmesh invite`.
#[derive(Debug, Args)]
pub struct InviteArgs {
    #[command(flatten)]
    /// Data directory.
    pub data: DataArgs,
    /// An address where this node can be reached, added to the invite (repeatable;
    /// default: the addresses the running node listens on).
    #[arg(long = "addr", value_name = "MULTIADDR")]
    pub addrs: Vec<String>,
    /// How long the invite may be used: 30m, 24h, 7d.
    #[arg(long, default_value = "24h")]
    pub expires: String,
    /// What the device will be: tablet, gateway or admin (admin devices get the mesh's
    /// owner key and can invite and revoke).
    #[arg(long, default_value = "tablet")]
    pub kind: String,
    /// The device's name (default: the one the device gives).
    #[arg(long)]
    pub name: Option<String>,
    /// A clinic the device serves (repeatable; default all).
    #[arg(long = "clinic", value_name = "CLINIC_ID")]
    pub clinics: Vec<String>,
    /// The device's certificate stops being valid after this long (default: never).
    #[arg(long, value_name = "DURATION")]
    pub valid_for: Option<String>,
    /// Also show the invite as a QR code in the terminal.
    #[arg(long)]
    pub qr: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node's identity and an empty store in a data directory, in a new mesh or
    /// joining one with an invite.
    Init {
        #[command(flatten)]
        /// Data directory.
        data: DataArgs,
        /// Join the mesh of this invite (from `medmesh invite` on an admin device, which
        /// must be running and reachable).
        #[arg(long, value_name = "INVITE")]
        join: Option<String>,
        /// A name for this device that people recognise (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print an invite that admits one device to this node's mesh (the last line). Run it
    /// on an admin device while its node is running: the new device gets its
    /// certificate from it.
    Invite(InviteArgs),
    /// The Hikma app's hub on this node: `hub qr` (the code a tablet scans to pair),
    /// `hub clients` (the tablets paired), `hub remove CLIENT_ID` (a lost tablet).
    Hub {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// `qr` (default), `clients` or `remove`.
        action: Option<String>,
        /// The tablet's client id for `remove` (see `medmesh hub clients`).
        client: Option<String>,
    },
    /// The mesh's devices: `devices list`, `devices revoke PEER_ID [--reason TEXT]`,
    /// `devices clinics PEER_ID [--clinic ID]...` (the clinics whose records it holds;
    /// no `--clinic`: all).
    Devices {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// `list` (default), `revoke` or `clinics`.
        action: Option<String>,
        /// The peer id for `revoke` and `clinics` (see `medmesh devices list`).
        peer: Option<String>,
        /// Why the device is revoked (kept with the revocation).
        #[arg(long, default_value = "")]
        reason: String,
        /// For `clinics`: a clinic the device serves (repeatable; none: all clinics).
        #[arg(long = "clinic")]
        clinics: Vec<String>,
    },
    /// List the other nodes; `peers add MULTIADDR` connects to one, `peers forget
    /// PEER_ID` drops one.
    Peers {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// `add` or `forget`
        action: Option<String>,
        /// The address for `add` (e.g. /ip4/192.168.1.20/tcp/7401), the peer id for
        /// `forget`
        addr: Option<String>,
    },
    /// The people who sign in to the Hikma app (on any node of the mesh).
    Users {
        #[command(subcommand)]
        /// `add` or `list`.
        action: UsersAction,
    },
    /// Run a node (creates the data directory on first start).
    Start(StartArgs),
    /// Compare everything this node holds with a peer, repair what differs, and say
    /// whether they now agree (exit status 1 when they do not).
    Verify {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The peer to compare with (see `medmesh peers`).
        #[arg(long)]
        peer: String,
    },
    /// Change how the node's data key is protected: with the passphrase in
    /// --new-passphrase-file (or MEDMESH_NEW_PASSPHRASE), or in the key file beside the
    /// database with --no-passphrase. The current passphrase, if any, is given as usual.
    Rekey {
        #[command(flatten)]
        /// Data directory.
        data: DataArgs,
        /// A file holding the new passphrase.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Keep the key in the key file, without a passphrase.
        #[arg(long, conflicts_with = "new_passphrase_file")]
        no_passphrase: bool,
    },
    /// Give back the database file's free space, with the node stopped: after a large
    /// import or many edits the file keeps pages it no longer uses; this moves the data
    /// to the front of the file and shortens it.
    Compact {
        #[command(flatten)]
        /// Data directory.
        data: DataArgs,
        /// Also list what each table of the database holds.
        #[arg(long)]
        details: bool,
    },
    /// Show a running node's status.
    Status {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
    },
    /// Create a record, or replace it when the JSON has the id of an existing one.
    Put {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection, e.g. patients.
        collection: String,
        /// The record as JSON; `-` reads it from standard input.
        json: String,
    },
    /// Show one record.
    Get {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// List records, optionally filtered: --where surname=Okafor --where given_name=Am*
    List {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// field=value (exact) or field=start* (beginning of a name); repeatable.
        #[arg(long = "where", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Include deleted records.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Delete a record (it stays as a tombstone so the deletion syncs).
    Delete {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// Show who changed a record, when, and which fields.
    History {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// Import records from a JSON Lines file (one record per line).
    Import {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// The file.
        file: PathBuf,
    },
    /// Show stock: every batch, with quantity and expiry.
    Stock {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// Only this clinic.
        #[arg(long)]
        clinic: Option<String>,
        /// Only this drug (id).
        #[arg(long)]
        drug: Option<String>,
    },
    /// Receive stock of a drug's batch.
    Restock {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The clinic's id.
        #[arg(long)]
        clinic: String,
        /// The drug: its name (created if new) or its id.
        #[arg(long)]
        drug: String,
        /// The batch number.
        #[arg(long)]
        batch: String,
        /// The batch's expiry date (YYYY-MM-DD).
        #[arg(long)]
        expiry: Option<String>,
        /// Units received.
        #[arg(long)]
        quantity: i64,
        /// Report the batch as low at or below this quantity.
        #[arg(long)]
        reorder_level: Option<i64>,
    },
    /// Dispense a drug (earliest-expiring batch first unless --batch).
    Dispense {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The clinic's id.
        #[arg(long)]
        clinic: String,
        /// The drug: its name or its id.
        #[arg(long)]
        drug: String,
        /// Units to dispense.
        #[arg(long)]
        quantity: i64,
        /// Take from this batch.
        #[arg(long)]
        batch: Option<String>,
        /// The patient's id.
        #[arg(long)]
        patient: Option<String>,
        /// The prescription item dispensed.
        #[arg(long)]
        prescription_item: Option<String>,
        /// Dispense from an expired batch.
        #[arg(long)]
        allow_expired: bool,
    },
    /// Show stock alerts: low, expiring soon, expired with stock, negative.
    Alerts {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// Only this clinic.
        #[arg(long)]
        clinic: Option<String>,
        /// "Expiring soon" means within this many days.
        #[arg(long, default_value_t = 90)]
        within_days: i64,
    },
    /// Check that every stock item's quantity equals the sum of its movements.
    VerifyStock {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
    },
    /// Print every record of a collection as JSON Lines.
    Export {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The collection.
        collection: String,
        /// Include deleted records.
        #[arg(long)]
        include_deleted: bool,
    },
}

/// `medmesh users ...`
#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Create a user; the password is read from standard input (never give it on the
    /// command line).
    Add {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The email the user signs in with.
        email: String,
        /// The user's name, as the app shows it.
        #[arg(long)]
        name: String,
        /// registrar, provider, pharmacist, admin or super_admin.
        #[arg(long)]
        role: String,
        /// The user's clinic (their permissions there are the role's defaults).
        #[arg(long = "clinic")]
        clinic: Option<String>,
    },
    /// List the users (without their password hashes).
    List {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
    },
    /// Stop a user from signing in (on every node, once the change has synced).
    Disable {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The user's email.
        email: String,
    },
    /// Let a disabled user sign in again.
    Enable {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The user's email.
        email: String,
    },
    /// Set a user's password; the new one is read from standard input.
    Passwd {
        #[command(flatten)]
        /// Node.
        api: ApiArgs,
        /// The user's email.
        email: String,
    },
}
