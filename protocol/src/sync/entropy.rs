//! Anti-entropy: the two sides compare summaries of everything they hold, and fetch,
//! bucket by bucket, what the feed did not bring.
//!
//! A round, from the side that starts it: compute the local [`Summary`] and send its
//! root with `reply`. The peer compares it with its own: the same, it answers with its
//! root and the round is over (a hundred bytes when nothing differs). Different, it
//! answers with its whole summary and asks for ours; each side then fetches, from its
//! side, the buckets that differ — asked for one page at a time (`WantRange`), each page
//! going through the puller like a feed page (checked, wanted, stored) except that no
//! cursor moves. When the last page is stored the round ends with a [`RoundReport`].
//! The first round waits [`FIRST_ROUND_DELAY_MS`] after the session opens.

use std::collections::VecDeque;

use super::puller::{PageKind, PageState, check_entries};
use super::{ENTROPY_INTERVAL_MS, Output, PAGE, RoundReport, Session};
use crate::DocId;
use crate::wire::{FeedItem, Message, Summary};

/// Summaries of the peer's rounds that may wait for ours.
const MAX_WAITING_ANSWERS: usize = 2;
/// The first round of a session starts this long after it opened (once caught up).
pub const FIRST_ROUND_DELAY_MS: u64 = 10_000;

/// The anti-entropy state of a session.
#[derive(Debug, Default)]
pub(super) struct Entropy {
    next_round: u64,
    /// A summary computation is in flight.
    computing: bool,
    /// When it is done, start a round of ours.
    start_when_computed: bool,
    /// The peer's rounds waiting for our summary: (round, its summary).
    answers: Vec<(u64, Summary)>,
    /// Our summary, as sent in our round.
    local: Option<Summary>,
    /// Our round whose summary awaits the peer's reply.
    awaiting_reply: Option<u64>,
    /// The buckets being fetched.
    fetch: Option<Fetch>,
    /// A range of the peer is being read for it.
    pub(super) reading_range: bool,
    /// Verify tokens to answer when the current (or next) round ends.
    tokens: Vec<u64>,
    last_end_ms: Option<u64>,
    last_report: Option<(RoundReport, u64)>,
}

#[derive(Debug)]
struct Fetch {
    round: u64,
    /// Buckets still to ask for.
    buckets: VecDeque<u8>,
    /// A `WantRange` is out.
    asked: Option<u8>,
    /// Range pages in the puller's queue.
    pages: usize,
    report: RoundReport,
}

impl Entropy {
    pub(super) fn last_report(&self) -> Option<(&RoundReport, u64)> {
        self.last_report.as_ref().map(|(r, t)| (r, *t))
    }

    fn busy(&self) -> bool {
        self.computing || self.awaiting_reply.is_some() || self.fetch.is_some()
    }
}

impl Session {
    /// Starts a round when one is due: at connect once caught up, then every
    /// [`ENTROPY_INTERVAL_MS`], and only while no feed page is in flight either way (a
    /// peer still taking this side's feed holds less than this side, and would list all
    /// it holds so far).
    pub(super) fn maybe_start_round(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if !self.is_open()
            || !self.caught_up
            || !self.pages.is_empty()
            || self.feeding()
            || self.entropy.busy()
        {
            return;
        }
        let due = match self.entropy.last_end_ms {
            Some(end) => now_ms.saturating_sub(end) >= ENTROPY_INTERVAL_MS,
            None => now_ms.saturating_sub(self.opened_ms) >= FIRST_ROUND_DELAY_MS,
        };
        if due {
            self.start_round(out);
        }
    }

    fn start_round(&mut self, out: &mut Vec<Output>) {
        self.entropy.start_when_computed = true;
        if !self.entropy.computing {
            self.entropy.computing = true;
            out.push(Output::ComputeSummary);
        }
    }

    /// A round on demand; [`Output::Verified`] answers.
    pub(super) fn verify(&mut self, token: u64, now_ms: u64, out: &mut Vec<Output>) {
        self.entropy.tokens.push(token);
        if !self.is_open() {
            return;
        }
        if !self.entropy.busy() {
            self.start_round(out);
        }
        let _ = now_ms;
    }

    pub(super) fn on_summary_computed(
        &mut self,
        summary: Summary,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        self.entropy.computing = false;
        if std::mem::take(&mut self.entropy.start_when_computed) {
            let round = self.entropy.next_round;
            self.entropy.next_round += 1;
            self.entropy.awaiting_reply = Some(round);
            out.push(Output::Send(Message::Summary {
                round,
                summary: summary.root_only(),
                reply: true,
            }));
        }
        for (round, theirs) in std::mem::take(&mut self.entropy.answers) {
            if summary.same_as(&theirs) {
                // The same: say so with the root; nothing to fetch either way.
                out.push(Output::Send(Message::Summary {
                    round,
                    summary: summary.root_only(),
                    reply: false,
                }));
            } else if theirs.is_whole() {
                out.push(Output::Send(Message::Summary {
                    round,
                    summary: summary.clone(),
                    reply: false,
                }));
                self.start_fetch(round, &summary, &theirs, now_ms, out);
            } else {
                // Different: the whole summary, and theirs in return.
                self.entropy.awaiting_reply = Some(round);
                out.push(Output::Send(Message::Summary {
                    round,
                    summary: summary.clone(),
                    reply: true,
                }));
            }
        }
        self.entropy.local = Some(summary);
    }

    pub(super) fn on_summary(
        &mut self,
        round: u64,
        theirs: Summary,
        reply: bool,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if !theirs.is_well_formed() {
            return Err("sent a malformed summary".into());
        }
        if reply {
            if self.entropy.answers.len() >= MAX_WAITING_ANSWERS {
                return Err("sent summaries without waiting for the answers".into());
            }
            if theirs.is_whole() && self.entropy.awaiting_reply == Some(round) {
                // Our root differed from theirs: answer with ours whole, from the summary
                // just sent, and fetch.
                self.entropy.awaiting_reply = None;
                let local = self.entropy.local.clone().unwrap_or_default();
                out.push(Output::Send(Message::Summary {
                    round,
                    summary: local.clone(),
                    reply: false,
                }));
                self.start_fetch(round, &local, &theirs, now_ms, out);
                return Ok(());
            }
            self.entropy.answers.push((round, theirs));
            if !self.entropy.computing {
                self.entropy.computing = true;
                out.push(Output::ComputeSummary);
            }
            return Ok(());
        }
        if self.entropy.awaiting_reply != Some(round) {
            // The answer to a round that is over (or never was): nothing to do.
            return Ok(());
        }
        self.entropy.awaiting_reply = None;
        let local = self.entropy.local.clone().unwrap_or_default();
        // The fetch is this side's round: its number is ours.
        self.start_fetch(round, &local, &theirs, now_ms, out);
        Ok(())
    }

    /// Compares two summaries; fetches the buckets that differ (or ends the round).
    fn start_fetch(
        &mut self,
        round: u64,
        local: &Summary,
        theirs: &Summary,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        if self.entropy.fetch.is_some() {
            // One fetch at a time; the next round catches what this one would.
            return;
        }
        let catching_up = !self.caught_up || self.pages.iter().any(|p| p.kind == PageKind::Feed);
        if (catching_up || self.feeding()) && self.entropy.tokens.is_empty() {
            // The peer's round while either side still reads the other's feed: what
            // differs is on its way. A round once both are caught up fetches what remains.
            return;
        }
        let differing = local.differing(theirs);
        let report = RoundReport {
            differing_buckets: differing.len(),
            local_count: local.count,
            remote_count: theirs.count,
            ..RoundReport::default()
        };
        self.entropy.fetch = Some(Fetch {
            round,
            buckets: differing.into(),
            asked: None,
            pages: 0,
            report,
        });
        self.ask_next_range(None, out);
        self.maybe_end_round(now_ms, out);
    }

    /// Asks for the next page of ranges: more of `bucket` after `after`, or the next
    /// bucket.
    fn ask_next_range(&mut self, more: Option<(u8, DocId)>, out: &mut Vec<Output>) {
        let Some(fetch) = self.entropy.fetch.as_mut() else {
            return;
        };
        if fetch.asked.is_some() {
            return;
        }
        let (bucket, after) = match more {
            Some((bucket, after)) => (bucket, Some(after)),
            None => match fetch.buckets.pop_front() {
                Some(bucket) => (bucket, None),
                None => return,
            },
        };
        fetch.asked = Some(bucket);
        out.push(Output::Send(Message::WantRange {
            round: fetch.round,
            bucket,
            after,
        }));
    }

    /// The peer asks for the documents of a bucket.
    pub(super) fn on_want_range(
        &mut self,
        round: u64,
        bucket: u8,
        after: Option<DocId>,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        if self.entropy.reading_range {
            return Err("asked for summary buckets without waiting for the answers".into());
        }
        self.entropy.reading_range = true;
        out.push(Output::ReadRange {
            round,
            bucket,
            after,
            limit: PAGE,
        });
        Ok(())
    }

    /// The documents of a bucket we asked for: checked like a feed page.
    pub(super) fn on_range(
        &mut self,
        round: u64,
        bucket: u8,
        entries: Vec<FeedItem>,
        more: bool,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), String> {
        check_entries(&entries, None)?;
        let Some(fetch) = self.entropy.fetch.as_mut() else {
            return Err("sent summary bucket entries that were not asked for".into());
        };
        if fetch.round != round || fetch.asked != Some(bucket) {
            return Err("sent summary bucket entries that were not asked for".into());
        }
        if entries.iter().any(|e| Summary::bucket_of(&e.id) != bucket) {
            return Err("sent entries of another summary bucket".into());
        }
        fetch.asked = None;
        fetch.report.compared += entries.len() as u64;
        let last = entries.last().map(|e| e.id);
        let upto = self.last_upto();
        if entries.is_empty() {
            self.ask_next_range(more.then_some(bucket).zip(last), out);
            self.maybe_end_round(now_ms, out);
            return Ok(());
        }
        if let Some(fetch) = self.entropy.fetch.as_mut() {
            fetch.pages += 1;
        }
        let page = self.push_page(
            upto,
            PageKind::Range { bucket, last, more },
            PageState::Checking,
        );
        out.push(Output::CheckDocs { page, entries });
        Ok(())
    }

    /// A range page was checked: count what it lacked, ask for the next one.
    pub(super) fn on_range_checked(
        &mut self,
        bucket: u8,
        last: Option<DocId>,
        more: bool,
        wanted: u64,
        out: &mut Vec<Output>,
    ) {
        if let Some(fetch) = self.entropy.fetch.as_mut() {
            fetch.report.fetched += wanted;
        }
        let next = if more {
            last.map(|l| (bucket, l))
        } else {
            None
        };
        self.ask_next_range(next, out);
    }

    /// Range pages left the puller's queue (stored).
    pub(super) fn on_range_pages_done(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let in_queue = self
            .pages
            .iter()
            .filter(|p| matches!(p.kind, PageKind::Range { .. }))
            .count();
        if let Some(fetch) = self.entropy.fetch.as_mut() {
            fetch.pages = in_queue;
        }
        self.maybe_end_round(now_ms, out);
    }

    fn maybe_end_round(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let done = self
            .entropy
            .fetch
            .as_ref()
            .is_some_and(|f| f.buckets.is_empty() && f.asked.is_none() && f.pages == 0);
        if !done {
            return;
        }
        let Some(fetch) = self.entropy.fetch.take() else {
            return;
        };
        self.entropy.last_end_ms = Some(now_ms);
        self.entropy.last_report = Some((fetch.report.clone(), now_ms));
        out.push(Output::RoundDone(fetch.report.clone()));
        for token in std::mem::take(&mut self.entropy.tokens) {
            out.push(Output::Verified {
                token,
                report: fetch.report.clone(),
            });
        }
    }
}
