"""Reads one NATS message ({"headers": {...}, "body_b64": "..."} on stdin)
with the CloudEvents Python SDK's binary-mode binding and prints the
event's attributes as JSON. NATS's binding maps attributes to `ce-`
headers and `Content-Type` exactly as the HTTP binding does."""

import base64
import json
import sys

from cloudevents.core.bindings import http

message = json.load(sys.stdin)
event = http.from_binary_event(
    http.HTTPMessage(headers=message["headers"], body=base64.b64decode(message["body_b64"]))
)
attributes = {k: str(v) for k, v in event.get_attributes().items()}
data = event.get_data()
attributes["data_bytes"] = len(data) if isinstance(data, (bytes, bytearray, str)) else -1
print(json.dumps(attributes))
