//! The puller: feed pages (and anti-entropy range pages) in, wants out, documents to
//! store, the cursor saved only after everything of a page is stored.

use serde_bytes::ByteBuf;

use super::{ECHO_CAPACITY, Output, PAGE, Session, WINDOW};
use crate::DocId;
use crate::schema::is_valid_collection_name;
use crate::wire::{DocPayload, FeedItem, Message, WantChanges};

/// What a page came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PageKind {
    /// A page of the peer's feed.
    Feed,
    /// A page of an anti-entropy bucket: no cursor moves when it completes.
    Range {
        /// The bucket.
        bucket: u8,
        /// The last document of the page (where the next page of the bucket starts).
        last: Option<DocId>,
        /// The bucket has more documents.
        more: bool,
    },
}

#[derive(Debug)]
pub(super) enum PageState {
    /// The latest changes that came with the entries are being stored (request `req`);
    /// then the entries are checked.
    Pushing {
        req: u64,
        entries: Vec<FeedItem>,
    },
    Checking,
    Wanting {
        /// Requests not fully answered yet.
        reqs: Vec<u64>,
        /// Batches of received documents being stored.
        storing: usize,
    },
    Complete,
}

/// Entries received from the peer, worked through in order.
#[derive(Debug)]
pub(super) struct Page {
    pub(super) id: u64,
    pub(super) upto: u64,
    pub(super) kind: PageKind,
    pub(super) wanted: usize,
    pub(super) state: PageState,
}

impl Page {
    pub(super) fn waiting_for(&self) -> String {
        match &self.state {
            PageState::Pushing { .. } => {
                format!("the changes sent with feed page {} to be stored", self.upto)
            }
            PageState::Checking => format!("the local check of feed page {}", self.upto),
            PageState::Wanting { reqs, storing } => format!(
                "documents of requests {reqs:?} ({} still to come, batches being stored: {storing})",
                self.wanted
            ),
            PageState::Complete => "the cursor to be saved".into(),
        }
    }

    fn complete(&self) -> bool {
        match &self.state {
            PageState::Complete => true,
            PageState::Wanting { reqs, storing } => reqs.is_empty() && *storing == 0,
            PageState::Checking | PageState::Pushing { .. } => false,
        }
    }
}

/// A document arriving in parts.
#[derive(Debug)]
pub(super) struct PartialDoc {
    pub(super) req: u64,
    pub(super) id: DocId,
    pub(super) collection: String,
    pub(super) total: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) heads: ByteBuf,
    pub(super) sigs: Vec<u8>,
}

/// A collection name a peer may send: a valid name, or an internal one.
pub(super) fn acceptable_collection(name: &str) -> bool {
    is_valid_collection_name(name.strip_prefix('_').unwrap_or(name))
}

/// Checks entries from the peer (a feed page or a bucket).
pub(super) fn check_entries(entries: &[FeedItem], upto: Option<u64>) -> Result<(), String> {
    if entries.len() > PAGE {
        return Err(format!(
            "sent a page of {} entries, more than {PAGE}",
            entries.len()
        ));
    }
    for entry in entries {
        if upto.is_some_and(|upto| entry.seq > upto)
            || entry.heads.is_empty()
            || !entry.heads.len().is_multiple_of(32)
            || !acceptable_collection(&entry.collection)
        {
            return Err("sent a malformed page".into());
        }
    }
    Ok(())
}

fn check_docs(docs: &[DocPayload]) -> Result<(), String> {
    for doc in docs {
        if !acceptable_collection(&doc.collection) || !doc.heads.len().is_multiple_of(32) {
            return Err(format!("sent document {} with a malformed header", doc.id));
        }
    }
    Ok(())
}

impl Session {
    pub(super) fn on_feed(
        &mut self,
        entries: Vec<FeedItem>,
        upto: u64,
        more: bool,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        check_entries(&entries, Some(upto))?;
        let feed_pages = self
            .pages
            .iter()
            .filter(|p| p.kind == PageKind::Feed)
            .count();
        if feed_pages >= 2 * WINDOW {
            return Err("sent feed pages without waiting for acknowledgements".into());
        }
        let last = self.last_upto();
        if upto < last && self.pages.is_empty() {
            // The peer's feed went back within the same epoch (its store was restored
            // from a backup): start over from its beginning, so nothing is skipped.
            self.cursor_seq = 0;
        } else if upto < last {
            return Err("sent a feed page that goes backwards".into());
        }
        self.caught_up = !more && entries.len() < PAGE;
        if entries.is_empty() {
            self.push_page(upto, PageKind::Feed, PageState::Complete);
            self.advance(now_ms, out);
            return Ok(());
        }
        if self.echo.len() + entries.len() > ECHO_CAPACITY {
            self.echo.clear();
        }
        for entry in &entries {
            self.echo.insert(entry.id, entry.heads.clone());
        }
        self.check_or_push(upto, PageKind::Feed, entries, out);
        Ok(())
    }

    /// Starts a page: its entries' latest changes stored first (when some came with
    /// them), then the entries checked.
    pub(super) fn check_or_push(
        &mut self,
        upto: u64,
        kind: PageKind,
        mut entries: Vec<FeedItem>,
        out: &mut Vec<Output>,
    ) -> u64 {
        let docs: Vec<DocPayload> = entries
            .iter_mut()
            .filter_map(|entry| {
                let bytes = entry.payload.take()?;
                Some(DocPayload {
                    id: entry.id,
                    collection: entry.collection.clone(),
                    bytes,
                    heads: entry.heads.clone(),
                    sigs: std::mem::take(&mut entry.payload_sigs),
                })
            })
            .collect();
        if docs.is_empty() {
            let page = self.push_page(upto, kind, PageState::Checking);
            out.push(Output::CheckDocs { page, entries });
            return page;
        }
        let req = self.next_req;
        self.next_req += 1;
        let page = self.push_page(upto, kind, PageState::Pushing { req, entries });
        self.storing_reqs.insert(req, page);
        out.push(Output::StoreDocs {
            req,
            docs,
            tentative: true,
        });
        page
    }

    /// The position the last page reaches (the cursor when there are none).
    pub(super) fn last_upto(&self) -> u64 {
        self.pages.back().map_or(self.cursor_seq, |p| p.upto)
    }

    pub(super) fn push_page(&mut self, upto: u64, kind: PageKind, state: PageState) -> u64 {
        let id = self.next_page;
        self.next_page += 1;
        self.pages.push_back(Page {
            id,
            upto,
            kind,
            wanted: 0,
            state,
        });
        id
    }

    pub(super) fn on_checked(
        &mut self,
        page_id: u64,
        missing: Vec<DocId>,
        behind: Vec<WantChanges>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let req = self.next_req;
        let Some(page) = self
            .pages
            .iter_mut()
            .find(|p| p.id == page_id && matches!(p.state, PageState::Checking))
        else {
            return;
        };
        let wanted = missing.len() + behind.len();
        let kind = page.kind.clone();
        if wanted == 0 {
            page.state = PageState::Complete;
        } else {
            self.next_req += 1;
            page.wanted = wanted;
            page.state = PageState::Wanting {
                reqs: vec![req],
                storing: 0,
            };
            out.push(Output::Send(Message::Want {
                req,
                whole: missing,
                changes: behind,
            }));
        }
        if let PageKind::Range { bucket, last, more } = kind {
            self.on_range_checked(bucket, last, more, wanted as u64, out);
        }
        self.advance(now_ms, out);
    }

    pub(super) fn on_docs(
        &mut self,
        req: u64,
        docs: Vec<DocPayload>,
        done: bool,
        diverged: Vec<crate::DocId>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if self.partial.is_some() {
            return Err("sent documents in the middle of a split document".into());
        }
        check_docs(&docs)?;
        let follow_up = self.next_req;
        let repeated = self.have_reqs.contains(&req);
        let Some(page) = self.page_of_req(req) else {
            return Err(format!(
                "sent documents for request {req}, which was not asked"
            ));
        };
        if diverged.len() > page.wanted.max(1) {
            return Err("named more documents than were asked for".into());
        }
        let page_id = page.id;
        if let PageState::Wanting { reqs, storing } = &mut page.state {
            if !docs.is_empty() {
                *storing += 1;
            }
            if !diverged.is_empty() {
                reqs.push(follow_up);
            }
            if done {
                reqs.retain(|r| *r != req);
            }
        }
        page.wanted = page.wanted.saturating_sub(docs.len());
        if !docs.is_empty() {
            self.storing_reqs.insert(req, page_id);
        }
        if !docs.is_empty() {
            out.push(Output::StoreDocs {
                req,
                docs,
                tentative: false,
            });
        }
        if !diverged.is_empty() {
            self.next_req += 1;
            if repeated {
                // Asked with a summary and still not answerable: take them whole.
                out.push(Output::Send(Message::Want {
                    req: follow_up,
                    whole: diverged,
                    changes: Vec::new(),
                }));
            } else {
                self.have_reqs.push(follow_up);
                out.push(Output::PrepareHave {
                    req: follow_up,
                    ids: diverged,
                });
            }
        }
        if done {
            self.have_reqs.retain(|r| *r != req);
        }
        self.advance(now_ms, out);
        Ok(())
    }

    /// The page a request belongs to (outstanding, or answered and being stored).
    fn page_of_req(&mut self, req: u64) -> Option<&mut Page> {
        self.pages
            .iter_mut()
            .find(|p| matches!(&p.state, PageState::Wanting { reqs, .. } if reqs.contains(&req)))
    }

    pub(super) fn on_stored(&mut self, req: u64, now_ms: u64, out: &mut Vec<Output>) {
        if let Some(page_id) = self.storing_reqs.get(&req).copied()
            && let Some(page) = self.pages.iter_mut().find(|p| p.id == page_id)
        {
            match &mut page.state {
                PageState::Wanting { storing, .. } => *storing = storing.saturating_sub(1),
                PageState::Pushing {
                    req: pushed,
                    entries,
                } if *pushed == req => {
                    let entries = std::mem::take(entries);
                    page.state = PageState::Checking;
                    self.storing_reqs.remove(&req);
                    out.push(Output::CheckDocs {
                        page: page_id,
                        entries,
                    });
                }
                _ => {}
            }
        }
        self.advance(now_ms, out);
    }

    pub(super) fn on_doc_part(
        &mut self,
        part: PartialDoc,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        let total = part.total;
        if total > super::MAX_DOC_BYTES {
            return Err(format!(
                "sent a document of {total} bytes, more than allowed"
            ));
        }
        if !acceptable_collection(&part.collection) || !part.heads.len().is_multiple_of(32) {
            return Err(format!("sent document {} with a malformed header", part.id));
        }
        let partial = match &mut self.partial {
            Some(partial) => {
                if partial.req != part.req || partial.id != part.id || partial.total != total {
                    return Err("interleaved the parts of two documents".into());
                }
                if partial.bytes.len() as u64 + part.bytes.len() as u64 > total {
                    return Err("sent more parts than the document has".into());
                }
                if (partial.sigs.len() + part.sigs.len()) as u64 > super::MAX_DOC_BYTES {
                    return Err("sent more change signatures than a document may have".into());
                }
                partial.bytes.extend_from_slice(&part.bytes);
                partial.sigs.extend_from_slice(&part.sigs);
                partial
            }
            None => {
                if part.bytes.len() as u64 > total || part.sigs.len() as u64 > super::MAX_DOC_BYTES
                {
                    return Err("sent more parts than the document has".into());
                }
                if self.page_of_req(part.req).is_none() {
                    return Err(format!(
                        "sent part of a document for request {}, which was not asked",
                        part.req
                    ));
                }
                self.partial.insert(part)
            }
        };
        if partial.bytes.len() as u64 == total
            && let Some(done) = self.partial.take()
        {
            let req = done.req;
            let docs = vec![DocPayload {
                id: done.id,
                collection: done.collection,
                bytes: ByteBuf::from(done.bytes),
                heads: done.heads,
                sigs: ByteBuf::from(done.sigs),
            }];
            if let Some(page) = self.page_of_req(req) {
                let page_id = page.id;
                if let PageState::Wanting { storing, .. } = &mut page.state {
                    *storing += 1;
                }
                page.wanted = page.wanted.saturating_sub(1);
                self.storing_reqs.insert(req, page_id);
            }
            out.push(Output::StoreDocs {
                req,
                docs,
                tentative: false,
            });
            self.advance(now_ms, out);
        }
        Ok(())
    }

    /// Pops the pages whose documents are all stored; saves the cursor and acknowledges.
    pub(super) fn advance(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let mut reached = None;
        let mut ranges_done = 0;
        while let Some(page) = self.pages.front() {
            if !page.complete() {
                break;
            }
            match page.kind {
                PageKind::Feed => reached = Some(page.upto),
                PageKind::Range { .. } => ranges_done += 1,
            }
            self.pages.pop_front();
        }
        // Requests answered and stored: forget which page they belonged to.
        let live: Vec<u64> = self.pages.iter().map(|p| p.id).collect();
        self.storing_reqs.retain(|_, page| live.contains(page));
        if let Some(upto) = reached {
            if upto > self.cursor_seq {
                self.cursor_seq = upto;
                out.push(Output::SaveCursor(super::Cursor {
                    epoch: self.remote_epoch.clone(),
                    seq: upto,
                }));
            }
            out.push(Output::Send(Message::Ack { upto }));
        }
        if self.caught_up && self.pages.iter().all(|p| p.kind != PageKind::Feed) {
            self.last_synced_ms = Some(now_ms);
        }
        if ranges_done > 0 {
            self.on_range_pages_done(now_ms, out);
        }
    }
}
