//! One sync session over one libp2p stream: bytes in and out, store work, status.
//!
//! Frames are decoded and handled one at a time, with the protocol's small handshake
//! limits until the peer has proven its membership. Nothing about a peer (status entry,
//! remembered address) is kept before that.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use futures::{AsyncReadExt, AsyncWriteExt};
use medmesh_protocol::membership::Credential;
use medmesh_protocol::record;
use medmesh_protocol::scope::Scope;
use medmesh_protocol::sync::{Cursor, Input, Output, RoundReport, Session, SessionConfig};
use medmesh_protocol::wire::{self, FrameDecoder, Limits};
use medmesh_storage::{PeerUpdate, Store, WriteBatch, WriteOp, escape};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{SharedStatus, update_existing, update_status};

/// Frames that may wait to be written to the peer. The protocol's windows bound what is
/// in flight far below this, so the session never stops reading while it waits.
const OUTGOING_FRAMES: usize = 256;
/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Batches of received documents being stored at once (the next one is worked out
/// while the writer stores the previous).
const STORES_IN_FLIGHT: usize = 2;
/// A peer that has not proven its membership by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the session is told that time passed (anti-entropy rounds).
const TICK: Duration = Duration::from_millis(500);
/// Feed positions the peer confirms between two saves of its confirmation (also saved
/// when the session ends), or the time after which a confirmation that moved is saved.
const ACKED_SAVE_STEP: u64 = 1_000;
const ACKED_SAVE_EVERY: Duration = Duration::from_secs(10);
/// Commands that may wait for a session.
pub(crate) const SESSION_COMMANDS: usize = 8;

/// What a session needs from the node.
#[derive(Clone)]
pub(crate) struct SessionContext {
    pub store: Store,
    pub local_peer: String,
    pub credential: Credential,
    pub status: SharedStatus,
    /// Tells the network actor that a peer proved its membership.
    pub established: mpsc::Sender<String>,
    /// The peers this node has sync sessions with (kept by the network actor).
    pub neighbors: tokio::sync::watch::Receiver<Vec<String>>,
}

/// What the node may ask of a running session.
pub(crate) enum SessionCommand {
    /// Compare with the peer now (an anti-entropy round); answer what it found.
    Verify { reply: oneshot::Sender<RoundReport> },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the sync session with `remote` on `stream` until either side ends it, the
/// stream breaks or `cancel` fires. Answers why it ended.
pub(crate) async fn run(
    stream: libp2p::Stream,
    remote: String,
    context: SessionContext,
    commands: mpsc::Receiver<SessionCommand>,
    cancel: CancellationToken,
) -> Result<String> {
    let span = tracing::info_span!("sync", peer = %remote);
    drive(stream, remote, context, commands, cancel)
        .instrument(span)
        .await
}

async fn drive(
    stream: libp2p::Stream,
    remote: String,
    context: SessionContext,
    mut commands: mpsc::Receiver<SessionCommand>,
    cancel: CancellationToken,
) -> Result<String> {
    let store = context.store.clone();
    let key = remote.clone();
    let peer = tokio::task::spawn_blocking(move || store.peer(&key))
        .await
        .context("reading the peer's state was interrupted")??
        .unwrap_or_default();
    let cursor = peer.cursor_epoch.clone().map(|epoch| Cursor {
        epoch,
        seq: peer.cursor_seq,
    });
    let nonce: [u8; 32] = rand::random();
    let mut session = Session::new(SessionConfig {
        local_peer: context.local_peer.clone(),
        remote_peer: remote.clone(),
        credential: context.credential.clone(),
        nonce: nonce.to_vec(),
        local_epoch: context.store.info().feed_epoch.clone(),
        cursor,
    });
    let (mut reader, mut writer) = stream.split();
    let (frames, mut outgoing) = mpsc::channel::<Vec<u8>>(OUTGOING_FRAMES);
    let write_task = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            writer.write_all(&frame).await?;
            if outgoing.is_empty() {
                writer.flush().await?;
            }
        }
        writer.close().await
    });
    let mut feed = context.store.subscribe_feed();
    let mut neighbors = context.neighbors.clone();
    session.handle(
        Input::LocalNeighbors {
            peers: neighbors.borrow_and_update().clone(),
        },
        now_ms(),
    );
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut driver = Driver {
        context: &context,
        remote: &remote,
        frames,
        storing: tokio::task::JoinSet::new(),
        verifies: HashMap::new(),
        next_token: 1,
        seals_sent: Default::default(),
        // Nothing is sent before the peer's certificate is known.
        peer_scope: Scope::of_clinics(&["(none yet)"]),
        acked_saved: 0,
        acked_saved_at: tokio::time::Instant::now(),
    };
    let first = session.start();
    let mut ended = driver.execute(&mut session, first).await?;
    let handshake_deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut tick = tokio::time::interval(TICK);
    while ended.is_none() {
        let input = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let last = session.closing();
                let _ = driver.execute(&mut session, last).await;
                ended = Some("the node is stopping or reconnecting".to_owned());
                break;
            }
            () = tokio::time::sleep_until(handshake_deadline), if !session.is_open() => {
                tracing::warn!("closing the sync: the peer did not complete the handshake in time");
                ended = Some("the peer did not complete the handshake in time".to_owned());
                break;
            }
            Some(command) = commands.recv() => match command {
                SessionCommand::Verify { reply } => {
                    let token = driver.next_token;
                    driver.next_token += 1;
                    driver.verifies.insert(token, reply);
                    vec![Input::Verify { token }]
                }
            },
            read = reader.read(&mut buffer) => {
                let n = read.context("the connection to the peer broke")?;
                if n == 0 {
                    ended = Some("the peer closed the connection".to_owned());
                    break;
                }
                decoder.push(&buffer[..n]);
                // One frame at a time: each is handled (its documents queued for
                // storing, its answers sent) before the next is decoded.
                loop {
                    let limits = if session.is_open() { Limits::OPEN } else { Limits::HANDSHAKE };
                    match decoder.next_message_within(limits) {
                        Ok(Some(message)) => {
                            let outputs = session.handle(Input::Message(message), now_ms());
                            if let Some(reason) = driver.execute(&mut session, outputs).await? {
                                ended = Some(reason);
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            tracing::warn!(error = %err, "closing the sync: the peer sent something unreadable");
                            ended = Some(format!("the peer sent something unreadable: {err}"));
                            break;
                        }
                    }
                }
                Vec::new()
            }
            Some(stored) = driver.storing.join_next(), if !driver.storing.is_empty() => {
                let req = stored.context("storing documents from the peer was interrupted")??;
                vec![Input::Stored { req }]
            }
            changed = feed.changed() => {
                if changed.is_err() {
                    ended = Some("the store closed".to_owned());
                    break;
                }
                let seq = *feed.borrow_and_update();
                vec![Input::LocalFeedAdvanced { seq }]
            }
            _ = tick.tick() => vec![Input::Tick],
            Ok(()) = neighbors.changed() => {
                vec![Input::LocalNeighbors { peers: neighbors.borrow_and_update().clone() }]
            }
        };
        for input in input {
            if ended.is_some() {
                break;
            }
            let outputs = session.handle(input, now_ms());
            if let Some(reason) = driver.execute(&mut session, outputs).await? {
                ended = Some(reason);
            }
        }
        if ended.is_none() && session.is_open() {
            driver.save_acked(session.acked(), false).await?;
            update_existing(&context.status, &remote, |v| {
                v.pending_in = session.pending_in();
                v.pending_out = session.pending_out();
                v.waiting_for = Some(session.waiting_for());
                v.sync_progress = session.progress().map(crate::mesh::SyncProgress::of);
                if let Some(ms) = session.last_synced_ms() {
                    v.last_sync = Some(record::format_timestamp(ms as i64));
                }
            });
        }
    }
    if session.is_open() {
        let _ = driver.save_acked(session.acked(), true).await;
    }
    drop(driver);
    let _ = write_task.await;
    let reason = ended.unwrap_or_else(|| "ended".into());
    update_existing(&context.status, &remote, |v| {
        v.syncing = false;
        v.pending_in = 0;
        v.waiting_for = None;
        v.sync_progress = None;
        v.last_error = Some(escape(&reason));
    });
    Ok(reason)
}

struct Driver<'a> {
    context: &'a SessionContext,
    remote: &'a str,
    frames: mpsc::Sender<Vec<u8>>,
    /// Batches of received documents being stored; each answers its request number.
    storing: tokio::task::JoinSet<Result<u64>>,
    /// Verify requests waiting for their round.
    verifies: HashMap<u64, oneshot::Sender<RoundReport>>,
    next_token: u64,
    /// The seals this connection has sent (each travels once per connection).
    seals_sent: medmesh_storage::SealsSent,
    /// The clinics the peer serves (from its certificate): only their records are sent.
    peer_scope: Scope,
    /// How far the peer confirmed this node's feed, as last saved, and when.
    acked_saved: u64,
    acked_saved_at: tokio::time::Instant,
}

impl Driver<'_> {
    /// What this device and the peer both serve: what their summaries compare.
    fn shared_scope(&self) -> Scope {
        self.context.store.scope().intersect(&self.peer_scope)
    }

    /// Saves how far the peer confirmed this node's feed (what lets a narrowed device
    /// purge what it no longer serves): when it moved by many positions or a while ago,
    /// or `now`. (Each save is a write of its own; not one per change.)
    async fn save_acked(&mut self, acked: u64, now: bool) -> Result<()> {
        let due = now
            || acked >= self.acked_saved + ACKED_SAVE_STEP
            || self.acked_saved_at.elapsed() >= ACKED_SAVE_EVERY;
        if acked <= self.acked_saved || !due {
            return Ok(());
        }
        self.acked_saved = acked;
        self.acked_saved_at = tokio::time::Instant::now();
        self.context
            .store
            .update_peer(
                self.remote,
                PeerUpdate::Acked {
                    epoch: self.context.store.info().feed_epoch.clone(),
                    seq: acked,
                },
            )
            .await
            .context("saving how far the peer holds this node's changes failed")
    }

    /// Performs outputs (and the outputs their answers produce) until none are left.
    /// Answers `Some(reason)` when the session ended.
    async fn execute(
        &mut self,
        session: &mut Session,
        outputs: Vec<Output>,
    ) -> Result<Option<String>> {
        let mut queue: VecDeque<Output> = outputs.into();
        while let Some(output) = queue.pop_front() {
            let store = self.context.store.clone();
            let input = match output {
                Output::Send(mut message) => {
                    store.seals_for_send(&mut message, &mut self.seals_sent);
                    let frame = wire::encode(&message)?;
                    self.frames
                        .send(frame)
                        .await
                        .map_err(|_| anyhow!("the connection to the peer closed"))?;
                    None
                }
                Output::ReadFeed { after, limit } => {
                    let head = *store.subscribe_feed().borrow();
                    let scope = self.peer_scope.clone();
                    let (entries, last_seq) =
                        blocking(move || store.local_feed_page(after, limit, &scope)).await?;
                    Some(Input::FeedRead {
                        entries,
                        last_seq,
                        head: head.max(last_seq),
                    })
                }
                Output::CheckDocs { page, entries } => {
                    let scope = self.peer_scope.clone();
                    let remote = self.remote.to_owned();
                    let (missing, behind) =
                        blocking(move || store.check_docs_from(&remote, &entries, &scope)).await?;
                    Some(Input::Checked {
                        page,
                        missing,
                        behind,
                    })
                }
                Output::LoadDocs {
                    req,
                    whole,
                    changes,
                } => {
                    let scope = self.peer_scope.clone();
                    let (docs, diverged) =
                        blocking(move || store.load_for_peer_diverged(&whole, &changes, &scope))
                            .await?;
                    Some(Input::Loaded {
                        req,
                        docs,
                        diverged,
                    })
                }
                Output::PrepareHave { req, ids } => {
                    let (changes, whole) = blocking(move || store.prepare_have(&ids)).await?;
                    Some(Input::HaveReady {
                        req,
                        changes,
                        whole,
                    })
                }
                Output::StoreDocs {
                    req,
                    docs,
                    tentative,
                } => {
                    // Stored in the background; `Input::Stored` follows when durable.
                    while self.storing.len() >= STORES_IN_FLIGHT {
                        if let Some(done) = self.storing.join_next().await {
                            let req =
                                done.context("storing documents from the peer was interrupted")??;
                            queue.extend(session.handle(Input::Stored { req }, now_ms()));
                        }
                    }
                    // Seals that came with these documents are known before a later
                    // batch (stored alongside) can refer to them: checked here, in order,
                    // off the async runtime (a peer decides how many it sends).
                    let admitting = store.clone();
                    let docs = blocking(move || {
                        admitting.admit_seals(docs.iter().map(|d| d.sigs.as_slice()));
                        Ok(docs)
                    })
                    .await?;
                    self.storing.spawn(store_docs(
                        store,
                        req,
                        docs,
                        self.remote.to_owned(),
                        tentative,
                    ));
                    None
                }
                Output::SaveCursor(cursor) => {
                    store
                        .update_peer(
                            self.remote,
                            PeerUpdate::Cursor {
                                epoch: cursor.epoch,
                                seq: cursor.seq,
                                synced_ms: Some(now_ms() as i64),
                            },
                        )
                        .await
                        .context("saving the sync position failed")?;
                    None
                }
                Output::ComputeSummary => {
                    let scope = self.shared_scope();
                    let summary = blocking(move || store.summary_for(&scope)).await?;
                    Some(Input::SummaryComputed { summary })
                }
                Output::ReadRange {
                    round,
                    bucket,
                    after,
                    limit,
                } => {
                    let scope = self.shared_scope();
                    let (entries, more) =
                        blocking(move || store.read_range(bucket, after, limit, &scope)).await?;
                    Some(Input::RangeRead {
                        round,
                        bucket,
                        entries,
                        more,
                    })
                }
                Output::RoundDone(report) => {
                    self.round_done(&report);
                    None
                }
                Output::Verified { token, report } => {
                    if let Some(reply) = self.verifies.remove(&token) {
                        let _ = reply.send(report);
                    }
                    None
                }
                Output::Established {
                    remote_epoch,
                    device,
                } => {
                    self.peer_scope = Scope::of_clinics(&device.clinics);
                    tracing::info!(%remote_epoch, name = %escape(&device.name), kind = device.kind.as_str(), clinics = %self.peer_scope.describe(), "sync session established: the peer's certificate is valid");
                    store
                        .update_peer(
                            self.remote,
                            PeerUpdate::Clinics {
                                clinics: device.clinics.clone(),
                            },
                        )
                        .await
                        .context("saving the peer's clinics failed")?;
                    let _ = self.context.established.send(self.remote.to_owned()).await;
                    update_status(&self.context.status, self.remote, |v| {
                        v.syncing = true;
                        v.last_error = None;
                        v.name = Some(device.name.clone());
                        v.kind = Some(device.kind.as_str().to_owned());
                        v.clinics = Some(device.clinics.clone());
                    });
                    None
                }
                Output::Close { reason } => {
                    tracing::info!(reason = %escape(&reason), "sync session ended");
                    return Ok(Some(reason));
                }
            };
            if let Some(input) = input {
                queue.extend(session.handle(input, now_ms()));
            }
        }
        Ok(None)
    }

    fn round_done(&self, report: &RoundReport) {
        if report.fetched > 0 {
            tracing::warn!(
                fetched = report.fetched,
                buckets = report.differing_buckets,
                "anti-entropy: this node lacked documents (or changes) that the sync had not brought; they were fetched from the peer"
            );
        } else {
            tracing::debug!(
                buckets = report.differing_buckets,
                local = report.local_count,
                remote = report.remote_count,
                "anti-entropy round done"
            );
        }
        let text = if report.differing_buckets == 0 {
            "same documents on both".to_owned()
        } else if report.fetched > 0 {
            format!(
                "{} documents were missing here and were fetched",
                report.fetched
            )
        } else {
            "nothing missing here (the peer fetches what it lacks)".to_owned()
        };
        update_existing(&self.context.status, self.remote, |v| {
            v.last_check = Some(record::format_timestamp(now_ms() as i64));
            v.last_check_result = Some(text);
        });
    }
}

/// Merges documents from the peer; answers the request they answered.
/// Every document is stored, or held with its reason (the store keeps what cannot be
/// merged); anything else fails the batch, so the cursor never passes a document that
/// is in neither state.
async fn store_docs(
    store: Store,
    req: u64,
    docs: Vec<medmesh_protocol::wire::DocPayload>,
    from: String,
    tentative: bool,
) -> Result<u64> {
    let count = docs.len();
    let ops = docs
        .into_iter()
        .map(|doc| WriteOp::received(doc, Some(from.clone()), tentative))
        .collect();
    let results = store
        .write(WriteBatch { ops, atomic: false })
        .await
        .context("storing documents from the peer failed")?;
    let mut held = 0;
    for result in results {
        match result {
            Ok(outcome) if outcome.held.is_some() => held += 1,
            Ok(_) => {}
            Err(err) => {
                return Err(anyhow!(
                    "a document from the peer could not be stored or kept: {}; the sync will resume from the last stored position",
                    escape(&err.to_string())
                ));
            }
        }
    }
    if held > 0 {
        tracing::warn!(
            held,
            "documents from the peer could not be merged; they are kept aside and shown in `medmesh status`"
        );
    }
    tracing::debug!(req, count, "stored documents from the peer");
    Ok(req)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> medmesh_storage::Result<T> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .context("a store task was interrupted")??)
}
