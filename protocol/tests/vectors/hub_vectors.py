#!/usr/bin/env python3
"""Known answers for the Hikma hub's RPC cryptography, made with an implementation
independent of medmesh's (pyca/cryptography, i.e. OpenSSL), so that a mistake in
medmesh's code cannot hide in its own tests. Regenerate: python3 hub_vectors.py > hub_vectors.json
"""
import base64, json
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

def b64(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")

def public(private):
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

cases = []
for n in range(3):
    hub_secret = bytes((7 * n + 3 * i + 1) % 256 for i in range(32))
    client_secret = bytes((11 * n + 5 * i + 2) % 256 for i in range(32))
    hub, client = X25519PrivateKey.from_private_bytes(hub_secret), X25519PrivateKey.from_private_bytes(client_secret)
    hub_pub, client_pub = public(hub), public(client)
    shared = hub.exchange(X25519PrivateKey.from_private_bytes(client_secret).public_key())
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hikma-health-pairing-v1",
               info=hub_pub + client_pub).derive(shared)
    sealed = []
    for aad, plain in [("command", {"command": "login", "data": {"email": "nurse@clinic.example", "password": "Sehr geheim"}, "token": None}),
                       ("command_response", {"token": "t", "user_id": "u", "provider_name": "Dr. Amina"}),
                       ("query", {"query": "sync_pull", "params": {"lastPulledAt": 1715000000000}, "token": "abc"}),
                       ("query_response", {"changes": {}, "timestamp": 1715000000001})]:
        nonce = bytes((13 * n + i + len(aad)) % 256 for i in range(12))
        text = json.dumps(plain, separators=(",", ":")).encode()
        sealed.append({"aad": aad, "nonce": b64(nonce), "plaintext": text.decode(),
                       "sealed": b64(nonce + AESGCM(key).encrypt(nonce, text, aad.encode()))})
    cases.append({"hub_secret": b64(hub_secret), "hub_public": b64(hub_pub),
                  "client_secret": b64(client_secret), "client_public": b64(client_pub),
                  "session_key": b64(key), "sealed": sealed})
print(json.dumps({"generator": "pyca/cryptography " + __import__("cryptography").__version__, "cases": cases}, indent=1))
