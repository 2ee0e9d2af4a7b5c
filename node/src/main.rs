//! The `medmesh` command.

use clap::Parser;
use medmesh::config::{Cli, Command};
use medmesh::{client, server};

// mimalloc: glibc's allocator fragments under many small documents (see BENCHMARKS.md).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's option enum (libmimalloc-sys 0.1.49, pinned).
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 16;

/// mimalloc keeps freed memory for a second by default; a node that loads and drops
/// many documents then holds twice the memory it uses. Give it back at once (measured:
/// receiver peak RSS of a 100,000-record sync 165 MB → 70 MB, same speed).
fn tune_allocator() {
    #[cfg(not(feature = "system-allocator"))]
    #[allow(unsafe_code)]
    // SAFETY: setting a mimalloc option is allowed at any time, from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,medmesh=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The store's writer is a busy thread of its own: one core is left to it. On a
    // two-core tablet one runtime thread answered sequential writes 10-30% faster than
    // two (fewer wake-ups of a second thread that finds nothing to do), and eight
    // clients' writes no slower. TOKIO_WORKER_THREADS still sets it.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.saturating_sub(1).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let passphrase_file = match &cli.command {
        Command::Init { data, .. }
        | Command::Rekey { data, .. }
        | Command::Compact { data, .. } => data.passphrase_file.clone(),
        Command::Start(args) => args.data.passphrase_file.clone(),
        Command::Invite(args) => args.data.passphrase_file.clone(),
        _ => None,
    };
    if let Some(file) = passphrase_file {
        medmesh::keys::set_passphrase_file(&file);
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Init { data, join, name } => {
                server::init(&data.dir(), join.as_deref(), name.as_deref()).await
            }
            Command::Start(args) => server::start(args).await,
            Command::Invite(args) => server::invite(&args),
            Command::Devices { api, action, peer, reason, clinics } => {
                client::devices(&api, action.as_deref(), peer.as_deref(), &reason, &clinics).await
            }
            Command::Hub { api, action, client } => {
                client::hub(&api, action.as_deref(), client.as_deref()).await
            }
            Command::Peers { api, action, addr } => {
                client::peers(&api, action.as_deref(), addr.as_deref()).await
            }
            Command::Status { api } => client::status(&api).await,
            Command::Rekey { data, new_passphrase_file, no_passphrase } => {
                server::rekey(&data.dir(), new_passphrase_file.as_deref(), no_passphrase)
            }
            Command::Users { action } => client::users(action).await,
            Command::Compact { data, details } => server::compact(&data.dir(), details).await,
            Command::Verify { api, peer } => match client::verify(&api, &peer).await {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(err) => Err(err),
            },
            Command::Stock { api, clinic, drug } => {
                client::stock(&api, clinic.as_deref(), drug.as_deref()).await
            }
            Command::Restock { api, clinic, drug, batch, expiry, quantity, reorder_level } => {
                let mut body = serde_json::json!({"clinic_id": clinic, "batch_number": batch, "quantity": quantity});
                client::drug_field(&mut body, &drug);
                if let Some(expiry) = expiry {
                    body["expiry_date"] = serde_json::json!(expiry);
                }
                if let Some(level) = reorder_level {
                    body["reorder_level"] = serde_json::json!(level);
                }
                client::pharmacy_post(&api, "restock", &body).await
            }
            Command::Dispense { api, clinic, drug, quantity, batch, patient, prescription_item, allow_expired } => {
                let mut body = serde_json::json!({"clinic_id": clinic, "quantity": quantity, "batch_number": batch, "patient_id": patient, "prescription_item_id": prescription_item, "allow_expired": allow_expired});
                client::drug_field(&mut body, &drug);
                client::pharmacy_post(&api, "dispense", &body).await
            }
            Command::Alerts { api, clinic, within_days } => client::alerts(&api, clinic.as_deref(), within_days).await,
            Command::VerifyStock { api } => client::verify_stock(&api).await,
            Command::Put {
                api,
                collection,
                json,
            } => client::put(&api, &collection, &json).await,
            Command::Get {
                api,
                collection,
                id,
            } => client::get(&api, &collection, &id).await,
            Command::List {
                api,
                collection,
                filters,
                limit,
                include_deleted,
            } => client::list(&api, &collection, &filters, limit, include_deleted).await,
            Command::Delete {
                api,
                collection,
                id,
            } => client::delete(&api, &collection, &id).await,
            Command::History {
                api,
                collection,
                id,
            } => client::history(&api, &collection, &id).await,
            Command::Import {
                api,
                collection,
                file,
            } => client::import(&api, &collection, &file).await,
            Command::Export {
                api,
                collection,
                include_deleted,
            } => client::export(&api, &collection, include_deleted).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
