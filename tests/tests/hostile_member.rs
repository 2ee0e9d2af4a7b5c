//! A hostile *member*: a device with a valid certificate of the mesh (so it passes the handshake)
//! and then sends what no honest node would — documents nested hundreds of levels deep,
//! damaged bytes, a record whose `id` field names another record, a change that
//! rewrites an existing record's `id`, a document claiming a terabyte, a page larger
//! than allowed, answers to questions never asked. The node, a separate process, keeps
//! every honest record, holds the bad documents with their reasons, closes the sessions
//! that break the protocol, and keeps serving the API and an honest peer throughout.
//! A member that writes as another device (a change naming the node's own key, signed
//! with the member's) is held too: history shows each change's real device.

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Automerge, ROOT};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use medmesh_protocol::DocId;
use medmesh_protocol::authorship::{self, SigningKey};
use medmesh_protocol::membership::{Credential, OwnerKey};
use medmesh_protocol::sync::{Input, Output, Session, SessionConfig};
use medmesh_protocol::wire::{self, DocPayload, FeedItem, FrameDecoder, Message};
use medmesh_tests::{NodeProcess, join_mesh, open_sync_stream_as};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};

/// The hostile side of one sync session, past the handshake.
struct Member {
    /// The member's device key (it signs, or vouches for, what it sends).
    key: SigningKey,
    /// Its peer id.
    peer: PeerId,
    stream: libp2p::Stream,
    decoder: FrameDecoder,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Member {
    /// Dials the node and proves membership with a certificate, as an honest node
    /// would.
    async fn join(target: &Multiaddr, peer: PeerId, owner: &OwnerKey) -> Self {
        let identity = libp2p::identity::Keypair::generate_ed25519();
        let secret: [u8; 32] = identity
            .clone()
            .try_into_ed25519()
            .expect("ed25519")
            .secret()
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let (stream, local, driver) = open_sync_stream_as(target, peer, identity)
            .await
            .expect("open the sync stream");
        let mut member = Self {
            key: SigningKey::from_bytes(&secret),
            peer: local,
            stream,
            decoder: FrameDecoder::new(),
            driver,
        };
        let mut session = Session::new(SessionConfig {
            local_peer: local.to_string(),
            remote_peer: peer.to_string(),
            credential: Credential::issued(owner, &local.to_string(), 0).expect("a certificate"),
            nonce: rand::random::<[u8; 32]>().to_vec(),
            local_epoch: "hostile".into(),
            cursor: None,
        });
        let mut outputs = session.start();
        loop {
            for output in outputs {
                if let Output::Send(message) = output {
                    member.send(&message).await;
                }
            }
            if session.is_open() {
                return member;
            }
            let message = member
                .recv()
                .await
                .expect("the node completes the handshake with a member");
            outputs = session.handle(Input::Message(message), 0);
        }
    }

    async fn send(&mut self, message: &Message) {
        let frame = wire::encode(message).expect("encode");
        self.send_raw(&frame).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The node's next message; `None` when it closed the session (or said nothing for
    /// ten seconds).
    async fn recv(&mut self) -> Option<Message> {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            if let Some(message) = self.decoder.next_message().expect("the node's frames") {
                return Some(message);
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buffer)).await;
            match read {
                Ok(Ok(n)) if n > 0 => self.decoder.push(&buffer[..n]),
                _ => return None,
            }
        }
    }

    /// Skips the node's own traffic (its feed, summaries) until `pick` matches.
    async fn recv_until<T>(&mut self, mut pick: impl FnMut(Message) -> Option<T>) -> Option<T> {
        while let Some(message) = self.recv().await {
            if let Message::Refuse { .. } = message {
                return None;
            }
            if let Some(found) = pick(message) {
                return Some(found);
            }
        }
        None
    }

    /// Whether the node ended the session (refused it, or closed the stream).
    async fn closed_by_node(&mut self) -> bool {
        self.recv_until(|_| None::<()>).await.is_none()
    }

    /// Announces documents, answers the node's request for them with `docs`, and waits
    /// for its acknowledgement of the page: whatever the bytes, the node must answer.
    async fn deliver(&mut self, upto: u64, docs: Vec<(FeedItem, DocPayload)>) {
        let entries = docs.iter().map(|(item, _)| item.clone()).collect();
        self.send(&Message::Feed {
            entries,
            upto,
            more: false,
            head: 0,
        })
        .await;
        let asked = self
            .recv_until(|m| match m {
                Message::Want {
                    req,
                    whole,
                    changes,
                } => Some((req, whole, changes)),
                _ => None,
            })
            .await
            .expect("the node asks for the announced documents");
        let (req, whole, changes) = asked;
        let wanted: Vec<DocId> = whole
            .into_iter()
            .chain(changes.into_iter().map(|c| c.id))
            .collect();
        let docs = docs
            .into_iter()
            .filter(|(item, _)| wanted.contains(&item.id))
            .map(|(_, payload)| payload)
            .collect();
        self.send(&Message::Docs {
            req,
            docs,
            done: true,
            diverged: Vec::new(),
        })
        .await;
        let acked = self
            .recv_until(|m| match m {
                Message::Ack { upto: acked } if acked >= upto => Some(acked),
                _ => None,
            })
            .await;
        assert_eq!(
            acked,
            Some(upto),
            "the node acknowledges the page once every document is stored or held"
        );
    }
}

/// A feed entry and the document it announces, its changes vouched for by `key` (they
/// name no device: the documents are made with random actors).
fn offer(key: &SigningKey, seq: u64, id: DocId, doc: &mut Automerge) -> (FeedItem, DocPayload) {
    let heads = wire::join_heads(&doc.get_heads().iter().map(|h| h.0).collect::<Vec<_>>());
    let bytes = ByteBuf::from(doc.save());
    let sigs: Vec<_> = authorship::facts_of_doc(doc, &[])
        .iter()
        .map(|f| authorship::vouch(key, f.hash))
        .collect();
    (
        FeedItem {
            seq,
            id,
            collection: "patients".into(),
            heads: heads.clone(),
            payload: None,
            payload_sigs: Default::default(),
        },
        DocPayload {
            id,
            collection: "patients".into(),
            bytes,
            heads,
            sigs: ByteBuf::from(authorship::encode(&sigs)),
        },
    )
}

fn patient_doc(id_field: &str, name: &str) -> Automerge {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "id", id_field).expect("put");
    doc.put(ROOT, "given_name", name).expect("put");
    doc.put(ROOT, "updated_at", chrono::Utc::now().timestamp_millis())
        .expect("put");
    doc.commit();
    doc.document().clone()
}

fn deep_doc(id: DocId, depth: usize) -> Automerge {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "id", id.to_string()).expect("put");
    let mut obj = doc
        .put_object(ROOT, "notes", automerge::ObjType::Map)
        .expect("map");
    for _ in 0..depth {
        obj = doc
            .put_object(&obj, "more", automerge::ObjType::Map)
            .expect("map");
    }
    doc.commit();
    doc.document().clone()
}

async fn status(http: &reqwest::Client, node: &NodeProcess) -> Value {
    http.get(node.url("/v1/status"))
        .send()
        .await
        .expect("the node answers")
        .json()
        .await
        .expect("status json")
}

async fn healthy(http: &reqwest::Client, node: &NodeProcess, after: &str) {
    let response = http
        .get(node.url("/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("after {after}, the node does not answer: {e}"));
    assert!(
        response.status().is_success(),
        "after {after}, the node is not healthy"
    );
}

async fn get(http: &reqwest::Client, node: &NodeProcess, id: DocId) -> (u16, Value) {
    let response = http
        .get(node.url(&format!("/v1/patients/{id}")))
        .send()
        .await
        .expect("get");
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_member_cannot_crash_flood_or_poison_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let out = medmesh_tests::medmesh_command()
        .args(["init", "--data"])
        .arg(&da)
        .output()
        .expect("init");
    assert!(out.status.success());
    join_mesh(&da, &db).expect("join");
    let owner = medmesh::trust::read_owner(&da)
        .expect("read the owner key")
        .expect("an owner key");
    let node = NodeProcess::start(&da).expect("the node");
    let http = medmesh_tests::http();
    let peer: PeerId = status(&http, &node).await["peer_id"]
        .as_str()
        .expect("peer id")
        .parse()
        .expect("peer id");
    let target: Multiaddr = format!("{}/p2p/{peer}", node.listen)
        .parse()
        .expect("listen address");

    // Session 1: documents an honest node never sends, among honest ones.
    let mut member = Member::join(&target, peer, &owner).await;
    let key = member.key.clone();
    let honest = DocId::new_v7();
    let rewritten = DocId::new_v7();
    let deep = DocId::new_v7();
    let mismatched = DocId::new_v7();
    let damaged = DocId::new_v7();
    let mut rewritten_doc = patient_doc(&rewritten.to_string(), "Amina");
    let mut damaged_offer = offer(
        &key,
        5,
        damaged,
        &mut patient_doc(&damaged.to_string(), "x"),
    );
    let mut bytes = damaged_offer.1.bytes.to_vec();
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..] {
        *byte ^= 0x5A;
    }
    damaged_offer.1.bytes = ByteBuf::from(bytes);
    member
        .deliver(
            5,
            vec![
                offer(
                    &key,
                    1,
                    honest,
                    &mut patient_doc(&honest.to_string(), "Honest"),
                ),
                offer(&key, 2, rewritten, &mut rewritten_doc),
                offer(&key, 3, deep, &mut deep_doc(deep, 5_000)),
                offer(
                    &key,
                    4,
                    mismatched,
                    &mut patient_doc(&DocId::new_v7().to_string(), "Someone else"),
                ),
                damaged_offer,
            ],
        )
        .await;
    healthy(&http, &node, "deep, damaged and mismatched documents").await;
    assert_eq!(
        get(&http, &node, honest).await.0,
        200,
        "the honest record is kept"
    );
    assert_eq!(get(&http, &node, rewritten).await.0, 200);
    for (what, id) in [
        ("the deep record", deep),
        ("the mismatched record", mismatched),
        ("the damaged record", damaged),
    ] {
        assert_ne!(get(&http, &node, id).await.0, 200, "{what} is not served");
    }

    // A change that rewrites an existing record's `id`.
    let mut forked = rewritten_doc.fork();
    {
        let mut tx = forked.transaction();
        tx.put(ROOT, "id", DocId::new_v7().to_string())
            .expect("put");
        tx.put(ROOT, "given_name", "Hijacked").expect("put");
        tx.commit();
    }
    member
        .deliver(6, vec![offer(&key, 6, rewritten, &mut forked)])
        .await;
    let (code, record) = get(&http, &node, rewritten).await;
    assert_eq!(code, 200);
    assert_eq!(record["id"], json!(rewritten.to_string()), "{record}");
    assert_eq!(record["given_name"], json!("Amina"), "{record}");

    // A change that names the node's own device, signed with the member's key.
    let victim: [u8; 32] = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest())
        .expect("the node's public key")
        .try_into_ed25519()
        .expect("an ed25519 key")
        .to_bytes();
    let forged = DocId::new_v7();
    let mut forged_doc = {
        let mut actor = victim.to_vec();
        actor.extend_from_slice(&[9; 8]);
        let mut doc = AutoCommit::new().with_actor(ActorId::from(actor));
        doc.put(ROOT, "id", forged.to_string()).expect("put");
        doc.put(ROOT, "given_name", "Forged").expect("put");
        doc.commit();
        doc.document().clone()
    };
    let (item, mut payload) = offer(&key, 7, forged, &mut forged_doc);
    let as_victim: Vec<_> = authorship::facts_of_doc(&forged_doc, &[])
        .iter()
        .map(|f| authorship::sign(&key, f.hash))
        .collect();
    payload.sigs = ByteBuf::from(authorship::encode(&as_victim));
    member.deliver(7, vec![(item, payload)]).await;
    assert_ne!(
        get(&http, &node, forged).await.0,
        200,
        "a change forged in the node's name is not served"
    );
    // History names the device that signed: the member vouched for its honest record.
    let history: Value = http
        .get(node.url(&format!("/v1/patients/{honest}/history")))
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    assert_eq!(
        history["changes"][0]["device"],
        json!(member.peer.to_string()),
        "{history}"
    );
    assert_eq!(
        history["changes"][0]["signature"],
        json!("vouched"),
        "{history}"
    );

    let held = status(&http, &node).await["held"].clone();
    let reason = |id: DocId| {
        held["documents"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"] == json!(id.to_string()))
            .map(|d| d["reason"].as_str().unwrap_or_default().to_owned())
    };
    assert!(
        reason(deep).is_some_and(|r| r.contains("deeper than")),
        "the deep record is held with its reason: {held}"
    );
    assert!(
        reason(mismatched).is_some_and(|r| r.contains("`id` field")),
        "the mismatched record is held with its reason: {held}"
    );
    assert!(
        reason(damaged).is_some_and(|r| r.contains("damaged")),
        "the damaged record is held with its reason: {held}"
    );
    assert!(
        reason(rewritten).is_some_and(|r| r.contains("`id` field")),
        "the rewrite is held with its reason: {held}"
    );
    assert!(
        reason(forged).is_some_and(|r| r.contains("not signed by the device it names")),
        "the forged change is held with its reason: {held}"
    );
    drop(member);

    // Session 2 onwards: breaking the protocol ends the session, nothing else.
    let unasked = {
        let mut doc = patient_doc(&DocId::new_v7().to_string(), "Unasked");
        let id = DocId::new_v7();
        offer(&SigningKey::from_bytes(&[3; 32]), 1, id, &mut doc).1
    };
    let floods: Vec<(&str, Vec<Message>)> = vec![
        (
            "a feed page larger than allowed",
            vec![Message::Feed {
                entries: (0..5_000)
                    .map(|seq| FeedItem {
                        seq,
                        id: DocId::new_v7(),
                        collection: "patients".into(),
                        heads: ByteBuf::from(vec![7u8; 32]),
                        payload: None,
                        payload_sigs: Default::default(),
                    })
                    .collect(),
                upto: 5_000,
                more: false,
                head: 0,
            }],
        ),
        (
            "documents that were never asked for",
            vec![Message::Docs {
                req: 999,
                docs: vec![unasked],
                done: true,
                diverged: Vec::new(),
            }],
        ),
    ];
    for (what, messages) in floods {
        let mut member = Member::join(&target, peer, &owner).await;
        for message in &messages {
            member.send(message).await;
        }
        assert!(
            member.closed_by_node().await,
            "{what}: the session is closed"
        );
        healthy(&http, &node, what).await;
    }

    // A document claiming a terabyte, in answer to a real request.
    let mut member = Member::join(&target, peer, &owner).await;
    let huge = DocId::new_v7();
    member
        .send(&Message::Feed {
            entries: vec![
                offer(
                    &SigningKey::from_bytes(&[3; 32]),
                    1,
                    huge,
                    &mut patient_doc(&huge.to_string(), "h"),
                )
                .0,
            ],
            upto: 1,
            more: false,
            head: 0,
        })
        .await;
    let req = member
        .recv_until(|m| match m {
            Message::Want { req, .. } => Some(req),
            _ => None,
        })
        .await
        .expect("the node asks");
    member
        .send(&Message::DocPart {
            req,
            id: huge,
            collection: "patients".into(),
            total: 1 << 40,
            bytes: ByteBuf::from(vec![0u8; 1024]),
            heads: ByteBuf::new(),
            sigs: ByteBuf::new(),
        })
        .await;
    assert!(
        member.closed_by_node().await,
        "a document of a terabyte ends the session"
    );
    drop(member);
    healthy(&http, &node, "a document claiming a terabyte").await;

    // A frame longer than any allowed, after the handshake.
    let mut member = Member::join(&target, peer, &owner).await;
    let mut frame = ((64u32 << 20).to_be_bytes()).to_vec();
    frame.extend_from_slice(&[1, 0]);
    frame.extend(std::iter::repeat_n(0u8, 64 * 1024));
    member.send_raw(&frame).await;
    assert!(
        member.closed_by_node().await,
        "a 64 MiB frame ends the session"
    );
    drop(member);
    healthy(&http, &node, "a frame of 64 MiB").await;

    // Everything honest is still there, and an honest peer still syncs, both ways.
    let written: Value = http
        .post(node.url("/v1/patients"))
        .json(&json!({"given_name": "Written after the attack"}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let honest_peer = NodeProcess::start_peered(&db, std::slice::from_ref(&node.listen), None)
        .expect("an honest peer");
    let written = written["id"].as_str().expect("id").to_owned();
    for path in [
        format!("/v1/patients/{written}"),
        format!("/v1/patients/{honest}"),
    ] {
        medmesh_tests::eventually(Duration::from_secs(30), "the honest peer syncs", || {
            let (http, url) = (http.clone(), honest_peer.url(&path));
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await
        .expect("the honest peer gets the node's records");
    }
    let (_, record) = get(&http, &node, rewritten).await;
    assert_eq!(record["given_name"], json!("Amina"));
}
