//! The reference Hikma cloud of the tests as a program, to try a gateway without a real
//! cloud: serves the sync API on loopback with one clinic, writes a hub key for it to a
//! file, and prints how to start a gateway against it.
//!
//! `cargo run -p medmesh-tests --bin reference-cloud -- [--listen 127.0.0.1:7480] [--key-file hub.key]`

use anyhow::{Context, Result};
use medmesh_tests::cloud::Cloud;
use serde_json::json;

/// The demo clinic.
const CLINIC: &str = "0192f0c4-6a1e-7cc3-9d0e-5b8f1c2a3d4e";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen = value("--listen").unwrap_or_else(|| "127.0.0.1:7480".into());
    let key_file = value("--key-file").unwrap_or_else(|| "hub.key".into());
    let runtime = tokio::runtime::Runtime::new()?;
    let cloud = Cloud::new();
    cloud.put("clinics", json!({"id": CLINIC, "name": "Demo Clinic"}));
    let key = cloud.add_hub_key(&[CLINIC]);
    std::fs::write(&key_file, format!("{key}\n"))
        .with_context(|| format!("cannot write the hub key to {key_file}"))?;
    let addr =
        runtime.block_on(cloud.serve(listen.parse().with_context(|| {
            format!("--listen {listen} is not an address like 127.0.0.1:7480")
        })?))?;
    println!("Reference Hikma cloud on http://{addr} (clinic {CLINIC}).");
    println!("Its hub key is in {key_file}. Start a gateway against it with:");
    println!("  medmesh start --no-mdns --gateway http://{addr} --hub-key-file {key_file}");
    println!("Everything is kept in memory; press Ctrl-C to stop.");
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    Ok(())
}
