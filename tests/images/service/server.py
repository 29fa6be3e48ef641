"""A test service for the relay tests, run by the host's python3 in a FROM scratch image.

GET /big?n=BYTES      n deterministic bytes, X-Sha256 header with their digest
POST /sha256          the SHA-256 of the request body, read as it streams in
GET /events           server-sent events: "first", then "last" once /go was called
GET /go               releases /events
GET /hits             how many requests reached this server before this one
GET /ws               WebSocket echo (text and binary frames)
GET /ready            503 until READY_AFTER seconds (env, default 0) after start, then 200
Anything else: 200 "hello".
"""

import base64
import hashlib
import http.server
import os
import socketserver
import struct
import sys
import threading
import time

GO = threading.Event()
STARTED = time.monotonic()
READY_AFTER = float(os.environ.get("READY_AFTER", "0"))
HITS = [0]
LOCK = threading.Lock()
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pattern(n):
    block = hashlib.sha256(b"relay-test").digest() * 2048  # 64 KiB
    while n > 0:
        piece = block[: min(n, len(block))]
        n -= len(piece)
        yield piece


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (40 ms) and every small response measures that, not the path.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _count(self):
        with LOCK:
            seen = HITS[0]
            HITS[0] += 1
        return seen

    def _reply(self, body, status=200, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        seen = self._count()
        path, _, query = self.path.partition("?")
        if path == "/big":
            n = int(query.partition("=")[2] or 1024)
            digest = hashlib.sha256()
            for piece in pattern(n):
                digest.update(piece)
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("X-Sha256", digest.hexdigest())
            self.end_headers()
            for piece in pattern(n):
                self.wfile.write(piece)
        elif path == "/stream":
            n = int(query.partition("=")[2] or 1024)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in pattern(n):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for name in ("first", "last"):
                if name == "last":
                    GO.wait(60)
                event = b"data: " + name.encode() + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/ready":
            ready = time.monotonic() - STARTED >= READY_AFTER
            self._reply(b"ready" if ready else b"loading", 200 if ready else 503)
        elif path == "/go":
            GO.set()
            self._reply(b"go")
        elif path == "/hits":
            self._reply(str(seen).encode())
        elif path == "/ws":
            self._websocket()
        else:
            self._reply(b"hello from " + path.encode())

    def do_POST(self):
        self._count()
        digest = hashlib.sha256()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1 << 16))
                    digest.update(piece)
                    left -= len(piece)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", 0))
            while left:
                piece = self.rfile.read(min(left, 1 << 16))
                if not piece:
                    break
                digest.update(piece)
                left -= len(piece)
        self._reply(digest.hexdigest().encode())

    def _websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        digest = hashlib.sha1(key + WS_GUID).digest()  # noqa: S324 - RFC 6455 says SHA-1
        accept = base64.b64encode(digest)
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        rfile, wfile = self.rfile, self.wfile
        while True:
            head = rfile.read(2)
            if len(head) < 2:
                break
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", rfile.read(8))[0]
            mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(rfile.read(length)))
            if opcode == 8:
                wfile.write(b"\x88\x00")
                break
            out = bytes([0x80 | opcode])
            if len(data) < 126:
                out += bytes([len(data)])
            elif len(data) < 65536:
                out += bytes([126]) + struct.pack(">H", len(data))
            else:
                out += bytes([127]) + struct.pack(">Q", len(data))
            wfile.write(out + data)
            wfile.flush()
        self.close_connection = True


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 64 clients connecting at once must not overflow the backlog


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    Server(("0.0.0.0", port), Handler).serve_forever()
