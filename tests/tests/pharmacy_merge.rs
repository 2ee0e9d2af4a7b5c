//! The stock invariant under merges: 3–5 nodes apart, each restocking, dispensing
//! (sometimes from the same batch), counting and adjusting; documents exchanged between
//! random pairs in random orders. After they converge every node shows the same
//! quantities, and every stock item's quantity equals the sum of its transactions.
//!
//! `PHARMACY_SEED=n` replays one seed; `PHARMACY_SEEDS=n` runs that many.

use medmesh::pharmacy::Pharmacy;
use medmesh_protocol::Schema;
use medmesh_storage::{Store, WriteBatch, WriteKind, WriteOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Copies every document of `from` into `to` (what a sync session does, all at once).
fn exchange(from: &Store, to: &Store) {
    let (entries, _) = from.feed_page(0, 1_000_000).expect("feed");
    let ops: Vec<WriteOp> = entries
        .iter()
        .map(|e| {
            let bytes = from.document(&e.collection, &e.id).expect("doc").save();
            WriteOp::new(
                &e.collection,
                Some(e.id),
                WriteKind::Merge(bytes.into()),
                Default::default(),
            )
        })
        .collect();
    for result in to
        .write_blocking(WriteBatch { ops, atomic: false })
        .expect("merge")
    {
        result.expect("merged");
    }
}

const DRUGS: [&str; 2] = ["Paracetamol 500mg tablets", "Amoxicillin 250mg capsules"];
const BATCHES: [&str; 3] = ["A-1", "b-2", "C3"];

fn random_op(rng: &mut StdRng, pharmacy: &Pharmacy, clinic: &str) {
    let drug = DRUGS[rng.random_range(0..DRUGS.len())];
    // Each node spells the drug its own way: they must still be one drug.
    let spelling = if rng.random_bool(0.5) {
        drug.to_uppercase()
    } else {
        drug.to_lowercase()
    };
    let batch = BATCHES[rng.random_range(0..BATCHES.len())];
    let body = match rng.random_range(0..10) {
        0..=2 => {
            let body = fields(
                json!({"clinic_id": clinic, "drug_name": spelling, "batch_number": batch, "expiry_date": "2031-01-01", "quantity": rng.random_range(1..50)}),
            );
            pharmacy.restock(&body, Some("sim")).map(|_| ())
        }
        3..=6 => {
            let mut body = json!({"clinic_id": clinic, "drug_name": spelling, "quantity": rng.random_range(1..20)});
            if rng.random_bool(0.5) {
                body["batch_number"] = json!(batch);
            }
            pharmacy.dispense(&fields(body), Some("sim")).map(|_| ())
        }
        7..=8 => {
            let body = fields(
                json!({"clinic_id": clinic, "drug_name": spelling, "batch_number": batch, "counted_quantity": rng.random_range(0..60)}),
            );
            pharmacy.count(&body, Some("sim")).map(|_| ())
        }
        _ => {
            let change = if rng.random_bool(0.5) {
                -rng.random_range(1..5)
            } else {
                rng.random_range(1..5)
            };
            let body = fields(
                json!({"clinic_id": clinic, "drug_name": spelling, "batch_number": batch, "quantity_change": change, "reason": "sim"}),
            );
            pharmacy.adjust(&body, Some("sim")).map(|_| ())
        }
    };
    // A dispense or count of a batch this node has never stocked is refused; fine.
    if let Err(err) = body {
        assert!(
            matches!(err, medmesh::pharmacy::PharmacyError::Invalid { .. }),
            "unexpected failure: {err}"
        );
    }
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(3..=5);
    let stores: Vec<Store> = (0..n)
        .map(|_| Store::memory(Schema::hikma()).expect("store"))
        .collect();
    let pharmacies: Vec<Pharmacy> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| Pharmacy::new(s.clone(), format!("node-{i}")))
        .collect();
    // One clinic, known everywhere.
    let out = stores[0]
        .write_blocking(WriteBatch::one(WriteOp::new(
            "clinics",
            None,
            WriteKind::Create(fields(json!({"name": "Camp"}))),
            Default::default(),
        )))
        .expect("clinic");
    let clinic = out[0].as_ref().expect("clinic").id.to_string();
    for store in &stores[1..] {
        exchange(&stores[0], store);
    }
    for _ in 0..rng.random_range(60..150) {
        if rng.random_bool(0.15) {
            let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
            if a != b {
                exchange(&stores[a], &stores[b]);
            }
        } else {
            let i = rng.random_range(0..n);
            random_op(&mut rng, &pharmacies[i], &clinic);
        }
    }
    // Converge: every node hears from every other, in a random order, twice.
    for _ in 0..2 {
        let mut pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (0..n).map(move |b| (a, b)))
            .filter(|(a, b)| a != b)
            .collect();
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, rng.random_range(0..=i));
        }
        for (a, b) in pairs {
            exchange(&stores[a], &stores[b]);
        }
    }
    let reference: Vec<(String, i64)> = pharmacies[0]
        .stock(None, None)
        .expect("stock")
        .into_iter()
        .map(|r| (r.stock_item_id.to_string(), r.quantity))
        .collect();
    assert!(!reference.is_empty(), "seed {seed}: some stock");
    for (i, pharmacy) in pharmacies.iter().enumerate() {
        let stock: Vec<(String, i64)> = pharmacy
            .stock(None, None)
            .expect("stock")
            .into_iter()
            .map(|r| (r.stock_item_id.to_string(), r.quantity))
            .collect();
        assert_eq!(
            stock, reference,
            "seed {seed}: node {i} shows other quantities"
        );
        let verify = pharmacy.verify().expect("verify");
        assert_eq!(
            verify["mismatches"],
            json!([]),
            "seed {seed}: node {i}: {verify}"
        );
        let drugs = stores[i]
            .counts()
            .expect("counts")
            .get("drug_catalogue")
            .copied();
        assert_eq!(
            drugs,
            Some(2),
            "seed {seed}: one drug per name, on node {i}"
        );
    }
    println!(
        "seed {seed}: {n} nodes, {} stock items, quantities agree and add up",
        reference.len()
    );
}

#[test]
fn stock_adds_up_on_every_node_after_any_merge_order() {
    if let Some(seed) = std::env::var("PHARMACY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return run(seed);
    }
    let seeds = std::env::var("PHARMACY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        run(seed);
    }
}

#[test]
fn dispenses_against_one_prescription_item_on_two_devices_add_up() {
    let a = Store::memory(Schema::hikma()).expect("a");
    let b = Store::memory(Schema::hikma()).expect("b");
    let (pa, pb) = (
        Pharmacy::new(a.clone(), "a".into()),
        Pharmacy::new(b.clone(), "b".into()),
    );
    let create = |collection: &str, v: Value| {
        let out = a
            .write_blocking(WriteBatch::one(WriteOp::new(
                collection,
                None,
                WriteKind::Create(fields(v)),
                Default::default(),
            )))
            .expect("create");
        out[0].as_ref().expect("created").id.to_string()
    };
    let clinic = create("clinics", json!({"name": "Camp"}));
    let restock = fields(
        json!({"clinic_id": clinic, "drug_name": "Cotrimoxazole 480mg", "batch_number": "X", "expiry_date": "2031-01-01", "quantity": 100}),
    );
    pa.restock(&restock, None).expect("restock");
    let drug = medmesh_protocol::pharmacy::drug_id("Cotrimoxazole 480mg").to_string();
    let prescription = create("prescriptions", json!({"patient_id": "p1"}));
    let item = create(
        "prescription_items",
        json!({"prescription_id": prescription, "drug_id": drug, "quantity_prescribed": 100}),
    );
    exchange(&a, &b);
    // Apart, each dispenses part of the same prescription item.
    let dispense = |q: i64| {
        fields(
            json!({"clinic_id": clinic, "drug_id": drug, "quantity": q, "prescription_item_id": item}),
        )
    };
    pa.dispense(&dispense(10), None).expect("a dispenses");
    pb.dispense(&dispense(20), None).expect("b dispenses");
    exchange(&a, &b);
    exchange(&b, &a);
    let id: medmesh_protocol::DocId = item.parse().expect("id");
    for store in [&a, &b] {
        let record = store.get("prescription_items", &id).expect("item").record;
        assert_eq!(
            record["quantity_dispensed"],
            json!(30),
            "both dispenses count: {record:?}"
        );
    }
    assert_eq!(pa.stock(None, None).expect("stock")[0].quantity, 70);
}
