//! A member peer, past the handshake, sending any sequence of messages, interleaved with
//! the node's own events (storage answers, ticks, local writes) in any order: the
//! session never panics, and everything it sends is a message an honest peer accepts.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use medmesh_protocol::DocId;
use medmesh_protocol::membership::{Credential, OwnerKey};
use medmesh_protocol::sync::{Cursor, Input, LocalEntry, Output, Session, SessionConfig};
use medmesh_protocol::wire::{
    DocPayload, FeedItem, FrameDecoder, Message, Summary, WantChanges, decode_body, encode,
};
use serde_bytes::ByteBuf;

fn session(local: &str, remote: &str, nonce: u8, cursor: Option<Cursor>) -> Session {
    Session::new(SessionConfig {
        local_peer: local.into(),
        remote_peer: remote.into(),
        credential: Credential::issued(&OwnerKey::from_seed([7; 32]), local, 0).expect("a certificate"),
        nonce: vec![nonce; 32],
        local_epoch: format!("epoch-{local}"),
        cursor,
    })
}

/// A few ids, so that messages often name the same documents.
fn id(u: &mut Unstructured) -> Result<DocId> {
    let mut bytes = [0u8; 16];
    bytes[15] = u.int_in_range(0..=7)?;
    bytes[0] = u.int_in_range(0..=3)?;
    Ok(DocId::from_bytes(bytes))
}

fn bytes(u: &mut Unstructured, max: usize) -> Result<ByteBuf> {
    let len = u.int_in_range(0..=max)?;
    Ok(ByteBuf::from(u.bytes(len)?.to_vec()))
}

fn heads(u: &mut Unstructured) -> Result<ByteBuf> {
    if u.ratio(1, 8)? {
        // Sometimes a length that is not a whole number of hashes.
        return bytes(u, 70);
    }
    let n = u.int_in_range(0..=2)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend(std::iter::repeat_n(u.int_in_range(0..=3u8)?, 32));
    }
    Ok(ByteBuf::from(out))
}

fn collection(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=3)? {
        0 => "patients".into(),
        1 => "_schema".into(),
        2 => "lab_reports".into(),
        _ => u.arbitrary::<String>()?,
    })
}

fn item(u: &mut Unstructured, seq: u64) -> Result<FeedItem> {
    Ok(FeedItem {
        seq,
        id: id(u)?,
        collection: collection(u)?,
        heads: heads(u)?,
        payload: if u.ratio(1, 4)? {
            Some(bytes(u, 64)?)
        } else {
            None
        },
        payload_sigs: bytes(u, 100)?,
    })
}

fn items(u: &mut Unstructured, max: usize) -> Result<Vec<FeedItem>> {
    let n = u.int_in_range(0..=max)?;
    let mut seq = u.int_in_range(0..=16u64)?;
    let mut out = Vec::new();
    for _ in 0..n {
        seq += u.int_in_range(0..=2u64)?;
        out.push(item(u, seq)?);
    }
    Ok(out)
}

fn payload(u: &mut Unstructured) -> Result<DocPayload> {
    Ok(DocPayload {
        id: id(u)?,
        collection: collection(u)?,
        bytes: bytes(u, 64)?,
        heads: heads(u)?,
        sigs: bytes(u, 200)?,
    })
}

fn summary(u: &mut Unstructured) -> Result<Summary> {
    let mut summary = Summary::default();
    if u.ratio(1, 3)? {
        summary = summary.root_only();
    }
    if u.ratio(1, 4)? {
        summary.root = bytes(u, 40)?;
    }
    summary.count = u.int_in_range(0..=16)?;
    Ok(summary)
}

fn message(u: &mut Unstructured, req: u64) -> Result<Option<Message>> {
    Ok(Some(match u.int_in_range(0..=11)? {
        0 => return Ok(decode_body(u.arbitrary::<&[u8]>()?).ok()),
        1 => Message::Feed {
            entries: items(u, 6)?,
            upto: u.int_in_range(0..=40)?,
            more: u.arbitrary()?,
            head: u.int_in_range(0..=60)?,
        },
        2 => Message::Want {
            req: u.int_in_range(0..=8)?,
            whole: (0..u.int_in_range(0..=4)?)
                .map(|_| id(u))
                .collect::<Result<_>>()?,
            changes: (0..u.int_in_range(0..=3)?)
                .map(|_| {
                    Ok(WantChanges {
                        id: id(u)?,
                        heads: heads(u)?,
                        have: if u.arbitrary()? {
                            Some(bytes(u, 32)?)
                        } else {
                            None
                        },
                    })
                })
                .collect::<Result<_>>()?,
        },
        3 => Message::Docs {
            req: if u.arbitrary()? {
                req
            } else {
                u.int_in_range(0..=8)?
            },
            docs: (0..u.int_in_range(0..=3)?)
                .map(|_| payload(u))
                .collect::<Result<_>>()?,
            done: u.arbitrary()?,
            diverged: (0..u.int_in_range(0..=2)?)
                .map(|_| id(u))
                .collect::<Result<_>>()?,
        },
        4 => Message::DocPart {
            req: if u.arbitrary()? {
                req
            } else {
                u.int_in_range(0..=8)?
            },
            id: id(u)?,
            collection: collection(u)?,
            total: u.int_in_range(0..=200)?,
            bytes: bytes(u, 100)?,
            heads: heads(u)?,
            sigs: bytes(u, 100)?,
        },
        5 => Message::Ack {
            upto: u.int_in_range(0..=40)?,
        },
        6 => Message::Summary {
            round: u.int_in_range(0..=4)?,
            summary: summary(u)?,
            reply: u.arbitrary()?,
        },
        7 => Message::WantRange {
            round: u.int_in_range(0..=4)?,
            bucket: u.int_in_range(0..=7)?,
            after: if u.arbitrary()? { Some(id(u)?) } else { None },
        },
        8 => Message::Range {
            round: u.int_in_range(0..=4)?,
            bucket: u.int_in_range(0..=7)?,
            entries: items(u, 4)?,
            more: u.arbitrary()?,
        },
        9 => Message::Neighbors {
            peers: (0..u.int_in_range(0..=3)?)
                .map(|_| u.arbitrary::<String>())
                .collect::<Result<_>>()?,
        },
        10 => Message::Subscribe {
            epoch: if u.arbitrary()? {
                "epoch-node".into()
            } else {
                u.arbitrary()?
            },
            since: u.int_in_range(0..=40)?,
        },
        _ => Message::Refuse {
            reason: u.arbitrary()?,
        },
    }))
}

/// The node's answer to one of its own requests, as the store might give it.
fn answer(u: &mut Unstructured, request: Output, feed_head: u64) -> Result<Option<Input>> {
    Ok(Some(match request {
        Output::ReadFeed { after, limit } => {
            let n = u.int_in_range(0..=limit.min(4))?;
            let mut entries = Vec::new();
            let mut seq = after;
            for _ in 0..n {
                seq += 1;
                entries.push(LocalEntry {
                    item: item(u, seq)?,
                    origin: if u.ratio(1, 4)? {
                        Some("peer".into())
                    } else {
                        None
                    },
                });
            }
            Input::FeedRead {
                entries,
                last_seq: seq,
                head: feed_head.max(seq),
            }
        }
        Output::CheckDocs { page, entries } => Input::Checked {
            page,
            missing: entries
                .iter()
                .filter(|_| u.arbitrary().unwrap_or(true))
                .map(|e| e.id)
                .collect(),
            behind: Vec::new(),
        },
        Output::LoadDocs { req, whole, .. } => Input::Loaded {
            req,
            docs: whole
                .iter()
                .map(|id| DocPayload {
                    id: *id,
                    collection: "patients".into(),
                    bytes: ByteBuf::from(vec![1, 2, 3]),
                    heads: ByteBuf::from(vec![1; 32]),
                    sigs: ByteBuf::new(),
                })
                .collect(),
            diverged: Vec::new(),
        },
        Output::PrepareHave { req, ids } => Input::HaveReady {
            req,
            changes: Vec::new(),
            whole: ids,
        },
        Output::StoreDocs { req, .. } => Input::Stored { req },
        Output::ComputeSummary => Input::SummaryComputed {
            summary: Summary::default(),
        },
        Output::ReadRange { round, bucket, .. } => Input::RangeRead {
            round,
            bucket,
            entries: items(u, 2)?,
            more: u.arbitrary()?,
        },
        _ => return Ok(None),
    }))
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mut node = session("node", "peer", 1, None);
    let mut peer = session("peer", "node", 2, None);
    // The handshake, between two honest sessions.
    let mut to_node: VecDeque<Message> = VecDeque::new();
    let mut to_peer: VecDeque<Message> = VecDeque::new();
    let mut requests: VecDeque<Output> = VecDeque::new();
    let sends = |outputs: Vec<Output>, queue: &mut VecDeque<Message>| {
        for output in outputs {
            if let Output::Send(message) = output {
                queue.push_back(message);
            }
        }
    };
    sends(node.start(), &mut to_peer);
    sends(peer.start(), &mut to_node);
    for _ in 0..8 {
        if let Some(m) = to_node.pop_front() {
            for output in node.handle(Input::Message(m), 0) {
                match output {
                    Output::Send(m) => to_peer.push_back(m),
                    other => requests.push_back(other),
                }
            }
        }
        if let Some(m) = to_peer.pop_front() {
            sends(peer.handle(Input::Message(m), 0), &mut to_node);
        }
    }
    assert!(node.is_open(), "two honest sessions complete the handshake");

    let mut now = 0u64;
    let mut feed_head = 0u64;
    let mut last_req = 1u64;
    for _ in 0..u.int_in_range(0..=48)? {
        now += u.int_in_range(0..=20_000u64)?;
        let input = match u.int_in_range(0..=9)? {
            0..=4 => match message(u, last_req)? {
                Some(m) => Input::Message(m),
                None => continue,
            },
            5 | 6 => {
                let Some(request) = requests.pop_front() else {
                    continue;
                };
                match answer(u, request, feed_head)? {
                    Some(input) => input,
                    None => continue,
                }
            }
            7 => Input::Tick,
            8 => {
                feed_head += u.int_in_range(0..=3u64)?;
                Input::LocalFeedAdvanced { seq: feed_head }
            }
            _ => Input::Verify {
                token: u.int_in_range(0..=3)?,
            },
        };
        for output in node.handle(input, now) {
            match output {
                Output::Send(message) => {
                    if let Message::Want { req, .. } = &message {
                        last_req = *req;
                    }
                    // Whatever the session sends, an honest peer can read.
                    let frame = encode(&message).expect("the session sends encodable messages");
                    let mut decoder = FrameDecoder::new();
                    decoder.push(&frame);
                    assert!(decoder.next_message().expect("within the limits").is_some());
                }
                Output::Close { .. } => return Ok(()),
                other => requests.push_back(other),
            }
        }
        if node.is_closed() {
            return Ok(());
        }
        requests.truncate(64);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
