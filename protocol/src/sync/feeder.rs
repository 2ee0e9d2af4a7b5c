//! The feeder: this node's feed to the peer, a window of pages at a time, and the
//! documents the peer asks for.

use super::{
    DOCS_MESSAGE_BYTES, LocalEntry, Output, PAGE, PART_BYTES, POSITION_LAG_MS, Session, WINDOW,
};
use crate::DocId;
use crate::wire::{DocPayload, FeedItem, Message, WantChanges};
use serde_bytes::ByteBuf;

/// Bytes of `have` summaries one request may carry at most.
const MAX_HAVE_BYTES: usize = 8 * 1024 * 1024;

impl Session {
    pub(super) fn on_subscribe(&mut self, epoch: String, since: u64, out: &mut Vec<Output>) {
        self.subscribed = true;
        self.after = if epoch == self.config.local_epoch {
            since
        } else {
            0
        };
        self.acked = self.after;
        self.in_flight.clear();
        self.told_caught_up = false;
        self.maybe_read(out);
    }

    pub(super) fn on_ack(&mut self, upto: u64, out: &mut Vec<Output>) {
        self.acked = self.acked.max(upto);
        while self.in_flight.front().is_some_and(|u| *u <= upto) {
            self.in_flight.pop_front();
        }
        self.maybe_read(out);
    }

    pub(super) fn on_want(
        &mut self,
        req: u64,
        whole: Vec<DocId>,
        changes: Vec<WantChanges>,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if whole.len() + changes.len() > 2 * PAGE {
            return Err(format!(
                "asked for {} documents at once, more than allowed",
                whole.len() + changes.len()
            ));
        }
        if self.loading >= 2 * WINDOW {
            return Err("sent requests without waiting for the answers".into());
        }
        let have: usize = changes
            .iter()
            .map(|c| c.have.as_ref().map_or(0, |h| h.len()))
            .sum();
        if have > MAX_HAVE_BYTES || changes.iter().any(|c| !c.heads.len().is_multiple_of(32)) {
            return Err("sent a malformed request".into());
        }
        self.loading += 1;
        out.push(Output::LoadDocs {
            req,
            whole,
            changes,
        });
        Ok(())
    }

    /// The peer is still taking this side's feed: pages of it are unacknowledged, or the
    /// peer has not been told it caught up.
    pub(super) fn feeding(&self) -> bool {
        self.subscribed && (!self.told_caught_up || !self.in_flight.is_empty())
    }

    pub(super) fn maybe_read(&mut self, out: &mut Vec<Output>) {
        if !self.subscribed || self.reading || self.in_flight.len() >= WINDOW {
            return;
        }
        let behind = self.head.is_none_or(|h| h > self.after);
        if behind || !self.told_caught_up {
            self.reading = true;
            out.push(Output::ReadFeed {
                after: self.after,
                limit: PAGE,
            });
        }
    }

    /// Before the session ends (the node stops or reconnects): moves the peer's cursor
    /// past entries it did not need, so that it does not read them again next time.
    pub fn closing(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if self.is_open() && self.after > self.sent_upto {
            self.sent_upto = self.after;
            out.push(Output::Send(Message::Feed {
                entries: Vec::new(),
                upto: self.after,
                more: false,
                head: self.head.unwrap_or(self.after),
            }));
        }
        out
    }

    /// After a quiet spell, moves the peer's cursor past entries it did not need.
    pub(super) fn maybe_send_position(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let Some(skipped) = self.skipped_at else {
            return;
        };
        if now_ms.saturating_sub(skipped) < POSITION_LAG_MS
            || self.after <= self.sent_upto
            || self.reading
            || self.in_flight.len() >= WINDOW
        {
            return;
        }
        self.skipped_at = None;
        self.sent_upto = self.after;
        self.in_flight.push_back(self.after);
        out.push(Output::Send(Message::Feed {
            entries: Vec::new(),
            upto: self.after,
            more: false,
            head: self.head.unwrap_or(self.after),
        }));
    }

    /// Whether the peer has every head of this version: it announced them, or this side
    /// did in this session (a merge of the two needs no announcement).
    fn peer_has(&self, item: &FeedItem) -> bool {
        let known = |map: &std::collections::HashMap<DocId, ByteBuf>| {
            map.get(&item.id)
                .map(|heads| heads.chunks(32).map(<[u8]>::to_vec).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let mut have = known(&self.echo);
        have.extend(known(&self.announced));
        !have.is_empty()
            && item
                .heads
                .chunks(32)
                .all(|head| have.iter().any(|h| h.as_slice() == head))
    }

    pub(super) fn on_feed_read(
        &mut self,
        entries: Vec<LocalEntry>,
        last_seq: u64,
        head: u64,
        out: &mut Vec<Output>,
    ) {
        self.reading = false;
        self.head = Some(self.head.map_or(head, |h| h.max(head)));
        if !self.subscribed {
            return;
        }
        if head < self.after {
            // The peer's cursor is past the end of this feed: this store was restored
            // from an older copy. Serve the whole feed again rather than skip anything.
            self.after = 0;
            self.acked = 0;
            self.head = Some(head);
            self.told_caught_up = false;
            self.maybe_read(out);
            return;
        }
        let moved = last_seq > self.after;
        let full = entries.len() >= PAGE;
        let remote = self.config.remote_peer.clone();
        let entries: Vec<FeedItem> = entries
            .into_iter()
            .filter(|entry| {
                // Not back to where it came from, nor to a peer that gets it from there,
                // nor a version the peer is known to have.
                let from_neighbor = entry
                    .origin
                    .as_ref()
                    .is_some_and(|o| *o == remote || self.remote_neighbors.contains(o));
                !(from_neighbor || self.peer_has(&entry.item))
            })
            .map(|entry| entry.item)
            .collect();
        if self.announced.len() + entries.len() > super::ECHO_CAPACITY {
            self.announced.clear();
        }
        for entry in &entries {
            self.announced.insert(entry.id, entry.heads.clone());
        }
        if moved && entries.is_empty() && !full && self.told_caught_up {
            // Nothing the peer needs from this stretch of the feed: no page for it now
            // (the next page, or an empty one after a quiet spell, moves its cursor).
            self.after = last_seq;
            if self.in_flight.is_empty() {
                self.acked = self.acked.max(last_seq);
            }
            self.skipped_at = Some(self.skipped_at.unwrap_or(self.clock));
        } else if moved || !self.told_caught_up {
            self.after = self.after.max(last_seq);
            self.in_flight.push_back(self.after);
            self.told_caught_up = !full;
            self.sent_upto = self.after;
            self.skipped_at = None;
            out.push(Output::Send(Message::Feed {
                entries,
                upto: self.after,
                more: full,
                head: self.head.unwrap_or(self.after),
            }));
        }
        self.maybe_read(out);
    }

    /// Sends the documents of request `req`, split into frames; the last message says
    /// which documents could not be answered by heads.
    pub(super) fn send_docs(
        &mut self,
        req: u64,
        docs: Vec<DocPayload>,
        diverged: Vec<DocId>,
        out: &mut Vec<Output>,
    ) {
        let mut batch = Vec::new();
        let mut size = 0;
        for doc in docs {
            if doc.bytes.len() + doc.sigs.len() > PART_BYTES {
                if !batch.is_empty() {
                    out.push(Output::Send(Message::Docs {
                        req,
                        docs: std::mem::take(&mut batch),
                        done: false,
                        diverged: Vec::new(),
                    }));
                    size = 0;
                }
                let total = doc.bytes.len() as u64;
                // Bytes and signatures are split into the same number of parts, each
                // part holding some of the bytes (the last one completes them).
                let parts = (doc.bytes.len() + doc.sigs.len())
                    .div_ceil(PART_BYTES)
                    .clamp(1, doc.bytes.len().max(1));
                let piece = |all: &[u8], n: usize| {
                    ByteBuf::from(all[n * all.len() / parts..(n + 1) * all.len() / parts].to_vec())
                };
                for n in 0..parts {
                    out.push(Output::Send(Message::DocPart {
                        req,
                        id: doc.id,
                        collection: doc.collection.clone(),
                        total,
                        bytes: piece(&doc.bytes, n),
                        heads: doc.heads.clone(),
                        sigs: piece(&doc.sigs, n),
                    }));
                }
                continue;
            }
            if size + doc.bytes.len() + doc.sigs.len() > DOCS_MESSAGE_BYTES && !batch.is_empty() {
                out.push(Output::Send(Message::Docs {
                    req,
                    docs: std::mem::take(&mut batch),
                    done: false,
                    diverged: Vec::new(),
                }));
                size = 0;
            }
            size += doc.bytes.len() + doc.sigs.len() + doc.collection.len() + doc.heads.len() + 24;
            batch.push(doc);
        }
        out.push(Output::Send(Message::Docs {
            req,
            docs: batch,
            done: true,
            diverged,
        }));
    }
}
