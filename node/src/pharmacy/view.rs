//! The pharmacy's in-memory view of stock items and drugs, kept current from the local
//! change feed: a query reads what changed since the last one (feed entries carry the
//! collection, so only stock items and drugs are loaded) and then answers from memory —
//! stock and alerts over 10,000 items, and drug search over 20,000 names, in
//! milliseconds.

use std::collections::HashMap;

use chrono::NaiveDate;
use medmesh_protocol::DocId;
use medmesh_protocol::pharmacy::{
    LEDGER_MOVEMENTS, STOCK_LEDGERS, normalize_drug_name, stock_ledger_id,
};
use medmesh_protocol::record::Fields;
use medmesh_storage::{Store, StoreError};
use serde::Serialize;
use serde_json::Value;

/// Feed entries read per step of a refresh.
const FEED_STEP: usize = 4096;

/// One batch of one drug at one clinic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StockRow {
    /// The stock item (its deterministic id).
    pub stock_item_id: DocId,
    /// The clinic.
    pub clinic_id: String,
    /// The drug.
    pub drug_id: String,
    /// The drug's name, when the drug is known.
    pub drug_name: Option<String>,
    /// The batch.
    pub batch_number: String,
    /// Its expiry date ("YYYY-MM-DD").
    pub expiry_date: Option<String>,
    /// Units on the shelf (may be negative: the shelf is the truth).
    pub quantity: i64,
    /// Reported as low at or below this.
    pub reorder_level: Option<i64>,
    #[serde(skip)]
    pub(crate) expiry: Option<NaiveDate>,
    /// The stock item's own counter (movements before ledgers, or from elsewhere).
    #[serde(skip)]
    pub(crate) base: i64,
}

/// A ledger of a stock item's movements (see [`STOCK_LEDGERS`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ledger {
    item: DocId,
    device: String,
    index: i64,
    delta: i64,
    movements: i64,
}

/// One drug of the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct DrugRow {
    /// Its id.
    pub id: DocId,
    /// Its name as written.
    pub name: String,
    /// The lowest stock before it is reported as low, across batches.
    pub min_stock_level: Option<i64>,
    #[serde(skip)]
    normalized: String,
    #[serde(skip)]
    tokens: Vec<String>,
}

/// A drug search result.
#[derive(Debug, Clone, Serialize)]
pub struct DrugHit {
    /// The drug's id.
    pub id: DocId,
    /// Its name.
    pub name: String,
    /// Higher is better.
    pub score: u32,
}

#[derive(Default)]
pub(crate) struct View {
    /// This node's device id (its ledgers are the ones it writes into).
    device: String,
    cursor: u64,
    /// Stock items and ledgers this node just wrote, with the feed position of that
    /// write: the view already holds them as written, so the refresh need not load them.
    applied: HashMap<DocId, u64>,
    pub(crate) stock: HashMap<DocId, StockRow>,
    /// Every ledger, and the sum of the ledgers' deltas per stock item.
    ledgers: HashMap<DocId, Ledger>,
    ledger_sums: HashMap<DocId, i64>,
    /// This device's newest ledger per stock item: its index and movements.
    own_ledgers: HashMap<DocId, (i64, i64)>,
    /// Stock items per clinic and drug, so a clinic's queries and a drug's dispenses
    /// skip the others.
    by_clinic: HashMap<String, HashMap<String, std::collections::HashSet<DocId>>>,
    pub(crate) drugs: HashMap<DocId, DrugRow>,
}

fn text(record: &Fields, field: &str) -> Option<String> {
    match record.get(field)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(record: &Fields, field: &str) -> Option<i64> {
    record.get(field)?.as_i64()
}

/// A date field as a date (a "YYYY-MM-DD" text, or the date part of a timestamp).
pub(crate) fn date(value: Option<&Value>) -> Option<NaiveDate> {
    match value? {
        Value::String(s) => NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok(),
        Value::Number(n) => {
            chrono::DateTime::from_timestamp_millis(n.as_i64()?).map(|t| t.date_naive())
        }
        _ => None,
    }
}

fn deleted(record: &Fields) -> bool {
    record.get("deleted_at").is_some_and(|v| !v.is_null())
}

impl View {
    /// The view of a node whose device id is `device`.
    pub(crate) fn new(device: String) -> Self {
        Self {
            device,
            ..Self::default()
        }
    }

    /// The ledger this device writes a stock item's next movement into: its current one,
    /// or the next when that one is full. Answers its id, index, and whether it is new.
    pub(crate) fn ledger_for(&self, item: &DocId) -> (DocId, i64) {
        let index = match self.own_ledgers.get(item) {
            Some((index, movements)) if *movements < LEDGER_MOVEMENTS => *index,
            Some((index, _)) => index + 1,
            None => 0,
        };
        (stock_ledger_id(item, &self.device, index), index)
    }

    fn put_ledger(&mut self, id: DocId, record: &Fields) {
        let Some(item) = text(record, "stock_item_id").and_then(|t| t.parse::<DocId>().ok()) else {
            return;
        };
        let ledger = Ledger {
            item,
            device: text(record, "device").unwrap_or_default(),
            index: int(record, "index").unwrap_or(0),
            delta: int(record, "delta").unwrap_or(0),
            movements: int(record, "movements").unwrap_or(0),
        };
        let previous = self.ledgers.get(&id).map_or(0, |l| l.delta);
        let change = ledger.delta - previous;
        *self.ledger_sums.entry(item).or_default() += change;
        if let Some(row) = self.stock.get_mut(&item) {
            row.quantity += change;
        }
        if ledger.device == self.device {
            let own = self.own_ledgers.entry(item).or_insert((ledger.index, 0));
            if ledger.index > own.0 {
                *own = (ledger.index, ledger.movements);
            } else if ledger.index == own.0 {
                own.1 = ledger.movements;
            }
        }
        self.ledgers.insert(id, ledger);
    }

    /// Reads what changed in the feed since the last refresh.
    pub(crate) fn refresh(&mut self, store: &Store) -> Result<(), StoreError> {
        loop {
            let (entries, last) = store.feed_page(self.cursor, FEED_STEP)?;
            for entry in &entries {
                match entry.collection.as_str() {
                    "clinic_inventory" | STOCK_LEDGERS
                        if self
                            .applied
                            .get(&entry.id)
                            .is_some_and(|seq| *seq >= entry.seq) =>
                    {
                        self.applied.remove(&entry.id);
                    }
                    STOCK_LEDGERS => match store.get(STOCK_LEDGERS, &entry.id) {
                        Ok(view) => self.put_ledger(entry.id, &view.record),
                        Err(err) => {
                            tracing::warn!(doc = %entry.id, error = %err, "a stock ledger could not be read")
                        }
                    },
                    "clinic_inventory" => match store.get("clinic_inventory", &entry.id) {
                        Ok(view) if !deleted(&view.record) => {
                            self.put_stock(entry.id, &view.record)
                        }
                        Ok(_) => {
                            self.remove_stock(&entry.id);
                        }
                        Err(err) => {
                            tracing::warn!(doc = %entry.id, error = %err, "a stock item could not be read")
                        }
                    },
                    "drug_catalogue" => match store.get("drug_catalogue", &entry.id) {
                        Ok(view) if !deleted(&view.record) => self.put_drug(entry.id, &view.record),
                        Ok(_) => {
                            self.drugs.remove(&entry.id);
                        }
                        Err(err) => {
                            tracing::warn!(doc = %entry.id, error = %err, "a drug could not be read")
                        }
                    },
                    _ => {}
                }
            }
            if last == self.cursor {
                return Ok(());
            }
            self.cursor = last;
            if entries.len() < FEED_STEP {
                return Ok(());
            }
        }
    }

    /// Takes a stock item as this node just wrote it (at feed position `seq`).
    pub(crate) fn written(&mut self, collection: &str, id: DocId, record: &Fields, seq: u64) {
        match collection {
            "clinic_inventory" => self.put_stock(id, record),
            STOCK_LEDGERS => self.put_ledger(id, record),
            _ => return,
        }
        self.applied.insert(id, seq);
    }

    fn remove_stock(&mut self, id: &DocId) {
        if let Some(row) = self.stock.remove(id)
            && let Some(drugs) = self.by_clinic.get_mut(&row.clinic_id)
            && let Some(ids) = drugs.get_mut(&row.drug_id)
        {
            ids.remove(id);
        }
    }

    fn put_stock(&mut self, id: DocId, record: &Fields) {
        self.remove_stock(&id);
        let clinic = text(record, "clinic_id").unwrap_or_default();
        let drug = text(record, "drug_id").unwrap_or_default();
        self.by_clinic
            .entry(clinic)
            .or_default()
            .entry(drug)
            .or_default()
            .insert(id);
        let expiry = date(record.get("batch_expiry_date"));
        let base = int(record, "quantity_available").unwrap_or(0);
        self.stock.insert(
            id,
            StockRow {
                stock_item_id: id,
                clinic_id: text(record, "clinic_id").unwrap_or_default(),
                drug_id: text(record, "drug_id").unwrap_or_default(),
                drug_name: None,
                batch_number: text(record, "batch_number").unwrap_or_default(),
                expiry_date: expiry.map(|d| d.to_string()),
                quantity: base + self.ledger_sums.get(&id).copied().unwrap_or(0),
                base,
                reorder_level: int(record, "reorder_level"),
                expiry,
            },
        );
    }

    fn put_drug(&mut self, id: DocId, record: &Fields) {
        let name = text(record, "generic_name")
            .or_else(|| text(record, "brand_name"))
            .or_else(|| text(record, "normalized_name"))
            .unwrap_or_default();
        let normalized = normalize_drug_name(&name);
        let tokens = normalized.split(' ').map(str::to_owned).collect();
        self.drugs.insert(
            id,
            DrugRow {
                id,
                name,
                min_stock_level: int(record, "min_stock_level"),
                normalized,
                tokens,
            },
        );
    }

    /// The drug's name, if it is in the catalogue.
    fn drug_name_ref(&self, drug_id: &str) -> Option<&str> {
        let id: DocId = drug_id.parse().ok()?;
        self.drugs.get(&id).map(|d| d.name.as_str())
    }

    /// Stock rows, filtered, with drug names, ordered by drug then expiry.
    /// A ledger's delta as this view last read it (`None`: no such ledger read yet).
    pub(crate) fn ledger_delta(&self, ledger: &DocId) -> Option<i64> {
        self.ledgers.get(ledger).map(|l| l.delta)
    }

    pub(crate) fn stock_rows(&self, clinic: Option<&str>, drug: Option<&str>) -> Vec<StockRow> {
        self.stock_page(clinic, drug, None, usize::MAX)
            .map(|(rows, _)| rows)
            .unwrap_or_default()
    }

    /// One page of [`Self::stock_rows`]: at most `limit` rows after the stock item
    /// `after`, and the item to continue after when more follow. Only the page is
    /// copied and named: a listing of 10,000 items costs a sort of references. `None`
    /// when `after` is not a stock item of this listing.
    pub(crate) fn stock_page(
        &self,
        clinic: Option<&str>,
        drug: Option<&str>,
        after: Option<&DocId>,
        limit: usize,
    ) -> Option<(Vec<StockRow>, Option<DocId>)> {
        let candidates: Box<dyn Iterator<Item = &StockRow>> = match (clinic, drug) {
            (Some(c), Some(d)) => Box::new(
                self.by_clinic
                    .get(c)
                    .and_then(|drugs| drugs.get(d))
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.stock.get(id)),
            ),
            (Some(c), None) => Box::new(
                self.by_clinic
                    .get(c)
                    .into_iter()
                    .flat_map(HashMap::values)
                    .flatten()
                    .filter_map(|id| self.stock.get(id)),
            ),
            (None, _) => Box::new(self.stock.values()),
        };
        let mut rows: Vec<(Option<&str>, &StockRow)> = candidates
            .filter(|r| drug.is_none_or(|d| r.drug_id == d))
            .map(|r| (self.drug_name_ref(&r.drug_id), r))
            .collect();
        type Key<'a> = (
            Option<&'a str>,
            &'a str,
            bool,
            Option<NaiveDate>,
            &'a str,
            DocId,
        );
        fn key<'a>((name, r): &(Option<&'a str>, &'a StockRow)) -> Key<'a> {
            (
                *name,
                r.drug_id.as_str(),
                r.expiry.is_none(),
                r.expiry,
                r.batch_number.as_str(),
                r.stock_item_id,
            )
        }
        rows.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
        let start = match after {
            Some(after) => rows.iter().position(|(_, r)| r.stock_item_id == *after)? + 1,
            None => 0,
        };
        let end = start.saturating_add(limit).min(rows.len());
        let next = (end < rows.len() && end > start).then(|| rows[end - 1].1.stock_item_id);
        let page = rows[start..end]
            .iter()
            .map(|(name, r)| StockRow {
                drug_name: name.map(str::to_owned),
                ..(*r).clone()
            })
            .collect();
        Some((page, next))
    }

    /// Drugs whose names match `query`: by prefix, word prefix, or with a typo or two.
    pub(crate) fn search(&self, query: &str, limit: usize) -> Vec<DrugHit> {
        let query = normalize_drug_name(query);
        if query.is_empty() {
            return Vec::new();
        }
        let words: Vec<&str> = query.split(' ').collect();
        let mut hits: Vec<DrugHit> = self
            .drugs
            .values()
            .filter_map(|drug| {
                let score = score(&query, &words, drug)?;
                Some(DrugHit {
                    id: drug.id,
                    name: drug.name.clone(),
                    score,
                })
            })
            .collect();
        hits.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
        hits.truncate(limit);
        hits
    }
}

/// How well a drug matches: the whole name starts with the query; every word of the query
/// starts a word of the name; or every word does so with a few typos. `None`: no match.
fn score(query: &str, words: &[&str], drug: &DrugRow) -> Option<u32> {
    let closeness = 100u32.saturating_sub(drug.normalized.len().saturating_sub(query.len()) as u32);
    if drug.normalized.starts_with(query) {
        return Some(3000 + closeness);
    }
    let mut typos = 0;
    for word in words {
        let allowed = match word.chars().count() {
            0..=3 => 0,
            4..=7 => 1,
            _ => 2,
        };
        let best = drug
            .tokens
            .iter()
            .map(|token| {
                if token.starts_with(word) {
                    0
                } else {
                    prefix_distance(word, token, allowed).unwrap_or(u32::MAX)
                }
            })
            .min()
            .unwrap_or(u32::MAX);
        if best > allowed {
            return None;
        }
        typos += best;
    }
    Some(if typos == 0 {
        2000 + closeness
    } else {
        1000 - 100 * typos.min(9) + closeness
    })
}

/// The edit distance between `word` and the closest prefix of `token`, if it is at most
/// `max`. Works on bytes, without allocating (names are short; longer ones are cut).
fn prefix_distance(word: &str, token: &str, max: u32) -> Option<u32> {
    const LONGEST: usize = 48;
    let a = &word.as_bytes()[..word.len().min(LONGEST)];
    let b = &token.as_bytes()[..token.len().min(a.len() + max as usize).min(LONGEST)];
    if b.len() + (max as usize) < a.len() {
        return None;
    }
    // Rows over `a`, columns over prefixes of `b`.
    let mut previous = [0u32; LONGEST + 1];
    let mut current = [0u32; LONGEST + 1];
    for (j, cell) in previous.iter_mut().enumerate().take(b.len() + 1) {
        *cell = j as u32;
    }
    for (i, ca) in a.iter().enumerate() {
        current[0] = i as u32 + 1;
        let mut row_min = current[0];
        for (j, cb) in b.iter().enumerate() {
            let cost = u32::from(ca != cb);
            current[j + 1] = (previous[j] + cost)
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
            row_min = row_min.min(current[j + 1]);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut previous, &mut current);
    }
    let best = previous[..=b.len()].iter().copied().min()?;
    (best <= max).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drug(name: &str) -> DrugRow {
        let normalized = normalize_drug_name(name);
        DrugRow {
            id: medmesh_protocol::pharmacy::drug_id(name),
            name: name.to_owned(),
            min_stock_level: None,
            tokens: normalized.split(' ').map(str::to_owned).collect(),
            normalized,
        }
    }

    fn names(view: &View, q: &str) -> Vec<String> {
        view.search(q, 5).into_iter().map(|h| h.name).collect()
    }

    #[test]
    fn search_ranks_prefix_then_words_then_typos() {
        let mut view = View::default();
        for name in [
            "Paracetamol 500mg tablets",
            "Paracetamol 120mg/5ml syrup",
            "Amoxicillin 250mg capsules",
            "Co-trimoxazole 480mg",
            "Metronidazole 400mg",
        ] {
            let d = drug(name);
            view.drugs.insert(d.id, d);
        }
        // Both start with the query; the closer (shorter) name first.
        assert_eq!(
            names(&view, "parac"),
            vec!["Paracetamol 500mg tablets", "Paracetamol 120mg/5ml syrup"]
        );
        assert_eq!(names(&view, "500 parac"), vec!["Paracetamol 500mg tablets"]);
        assert_eq!(
            names(&view, "amoxicilin"),
            vec!["Amoxicillin 250mg capsules"],
            "one letter missing"
        );
        assert_eq!(
            names(&view, "metrnidazol"),
            vec!["Metronidazole 400mg"],
            "two typos in a long word"
        );
        assert!(names(&view, "xyz").is_empty());
        assert_eq!(prefix_distance("amoxi", "amoxicillin", 1), Some(0));
        assert_eq!(prefix_distance("amoxu", "amoxicillin", 1), Some(1));
        assert_eq!(prefix_distance("zzzzz", "amoxicillin", 1), None);
    }
}
